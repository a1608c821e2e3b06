"""Similarity mixup (SiMix): the mixing plan.

A virtual sample is v = a * x_i + (1 - a) * x_j for two samples i, j of the same class,
with a ~ U(0, 1) and no re-normalisation. Every similarity that involves v is then a
linear combination of real similarities, so the loss kernel never needs v's embedding
as a key; this module only decides which pairs are mixed and with which weights.
"""

from __future__ import annotations

import torch


def simix_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s plan: every rank seeds it alike (same plan, no
    communication), and a resumed run draws the plans of an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 7_919 + step)


def simix_plan(
    labels: torch.Tensor,
    *,
    per_class: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build a mixing plan for a batch.

    Args:
        labels: (B,) integer class labels of the (global) batch, any order.
        per_class: virtual samples per class; None mixes every same-class pair
            (4 images per class -> 6 virtual samples). With a number n, n distinct pairs
            are drawn per class (all of them when the class has fewer).
        generator: CPU generator for the pair choice and the weights; pass one seeded
            identically on every rank to get the same plan everywhere.

    Returns:
        pairs: (V, 2) int64 indices into the batch, i < j, same label, grouped by class.
        alphas: (V,) float32 weights in [0, 1); v = alphas * x[pairs[:, 0]] + (1 - alphas) * x[pairs[:, 1]].
    """
    if labels.dim() != 1:
        raise ValueError(f"simix_plan: labels must be 1-D, got shape {tuple(labels.shape)}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"simix_plan: per_class must be >= 0 or None, got {per_class}")
    device = labels.device
    labels_cpu = labels.detach().to("cpu", torch.int64)
    order = torch.argsort(labels_cpu, stable=True)
    _, counts = torch.unique_consecutive(labels_cpu[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts

    pair_chunks, group_chunks = [], []
    # Classes of equal size are handled together: (num_classes_of_size_c, c) index grid.
    for size in torch.unique(counts).tolist():
        if size < 2:
            continue
        groups = torch.nonzero(counts == size).flatten()
        members = order[starts[groups][:, None] + torch.arange(size)[None, :]]
        members, _ = members.sort(dim=1)
        first, second = torch.triu_indices(size, size, offset=1)
        pair_chunks.append(torch.stack([members[:, first], members[:, second]], -1).reshape(-1, 2))
        group_chunks.append(groups.repeat_interleave(first.numel()))
    if not pair_chunks:
        empty = torch.zeros(0, 2, dtype=torch.int64, device=device)
        return empty, torch.zeros(0, dtype=torch.float32, device=device)
    pairs = torch.cat(pair_chunks)
    group = torch.cat(group_chunks)

    if per_class is not None:
        # A random key per pair; keep the per_class smallest keys of each class.
        key = torch.rand(pairs.shape[0], generator=generator)
        by_key = torch.argsort(key)
        by_group = by_key[torch.argsort(group[by_key], stable=True)]
        group_sorted = group[by_group]
        first_of_group = torch.searchsorted(group_sorted, group_sorted, right=False)
        rank_in_group = torch.arange(group_sorted.numel()) - first_of_group
        keep = by_group[rank_in_group < per_class]
        pairs, group = pairs[keep], group[keep]

    # Canonical order: by class, then by pair, independent of how pairs were found.
    canon = torch.argsort(pairs[:, 0] * labels_cpu.numel() + pairs[:, 1])
    canon = canon[torch.argsort(group[canon], stable=True)]
    pairs = pairs[canon]
    alphas = torch.rand(pairs.shape[0], generator=generator)
    return pairs.to(device), alphas.to(device)


def materialise_mix(embeddings: torch.Tensor, pairs: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The virtual embeddings themselves, (V, d): for tests and references only."""
    a = alphas.to(embeddings.dtype)[:, None]
    return a * embeddings[pairs[:, 0]] + (1 - a) * embeddings[pairs[:, 1]]
