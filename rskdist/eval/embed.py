"""Embed an evaluation stream on every rank and gather the whole set, in index order."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _comm_device(group, device: torch.device) -> torch.device:
    """NCCL needs CUDA tensors; gloo (and others) take CPU tensors."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def all_gather_variable(x: torch.Tensor, *, world_size: int, group=None) -> list[torch.Tensor]:
    """all_gather of tensors whose first dimension differs across ranks.

    Rows are padded to the largest count, gathered, then trimmed. Every rank must pass
    the same trailing shape and dtype. Returns the pieces of ranks 0..world_size-1.
    """
    n_local = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(n_local) for _ in range(world_size)]
    dist.all_gather(counts, n_local, group=group)
    counts = [int(c) for c in counts]
    n_max = max(counts)
    padded = torch.zeros((n_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded, group=group)
    return [p[:c] for p, c in zip(pieces, counts)]


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module,
    loader,
    *,
    device: str | torch.device,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    amp_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed this rank's share of an evaluation set and gather the whole set on every rank.

    ``loader`` yields ``(images, labels, index)`` where ``index`` is the global sample
    index and padding samples (added to even out ranks) have ``index == -1``. Returns
    ``(embeddings (N, d) float32, labels (N,) int64)`` on CPU, padding dropped, sorted by
    index, identical on every rank. ``normalize`` L2-normalises (cosine retrieval).
    ``rank`` is only used in messages; collectives use ``group`` and ``world_size``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    embs, labs, idxs = [], [], []
    try:
        for images, labels, index in loader:
            with autocast:
                out = model(images.to(device, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError(f"model must return a (batch, dim) tensor; got {type(out).__name__}")
            out = out.float()
            embs.append(F.normalize(out, dim=1) if normalize else out)
            labs.append(torch.as_tensor(labels, dtype=torch.int64).reshape(-1).to(device))
            idxs.append(torch.as_tensor(index, dtype=torch.int64).reshape(-1).to(device))
    finally:
        model.train(was_training)

    dim = embs[0].shape[1] if embs else -1
    emb = torch.cat(embs) if embs else torch.zeros(0, 0, device=device)
    lab = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.int64, device=device)
    idx = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.int64, device=device)
    if world_size > 1:
        comm = _comm_device(group, device)
        # A rank may have no batch at all: agree on the embedding width first.
        dims = all_gather_variable(torch.tensor([dim], device=comm), world_size=world_size, group=group)
        dim = max(int(d) for d in dims)
        if emb.shape[1] != dim:
            emb = emb.reshape(0, dim)
        emb = torch.cat(all_gather_variable(emb.to(comm), world_size=world_size, group=group))
        lab = torch.cat(all_gather_variable(lab.to(comm), world_size=world_size, group=group))
        idx = torch.cat(all_gather_variable(idx.to(comm), world_size=world_size, group=group))
    emb, lab, idx = emb.cpu(), lab.cpu(), idx.cpu()

    keep = idx >= 0  # drop padding
    emb, lab, idx = emb[keep], lab[keep], idx[keep]
    order = torch.argsort(idx, stable=True)
    emb, lab, idx = emb[order], lab[order], idx[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    if not bool(first.all()):
        warnings.warn(
            f"rank {rank}: {int((~first).sum())} samples were embedded twice (padding not marked "
            f"with index -1?); keeping the first copy",
            stacklevel=2,
        )
        emb, lab, idx = emb[first], lab[first], idx[first]
    return emb, lab


def save_embeddings(path: str | os.PathLike, embeddings, labels, **extra) -> None:
    """Write embeddings + labels as ``.pt`` (torch.save dict) or ``.npz``."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        np.savez(path, embeddings=np.asarray(embeddings), labels=np.asarray(labels), **extra)
    else:
        torch.save({"embeddings": torch.as_tensor(embeddings), "labels": torch.as_tensor(labels), **extra}, path)


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``(embeddings, labels)`` from a ``.npz`` or ``.pt`` file (keys ``embeddings``
    and ``labels``; a ``.pt`` may also hold an ``(embeddings, labels)`` tuple)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            missing = {"embeddings", "labels"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {data.files}")
            return torch.from_numpy(data["embeddings"]), torch.from_numpy(data["labels"])
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return torch.as_tensor(obj[0]), torch.as_tensor(obj[1])
    if isinstance(obj, dict) and "embeddings" in obj and "labels" in obj:
        return torch.as_tensor(obj["embeddings"]), torch.as_tensor(obj["labels"])
    raise ValueError(f"{path}: expected a dict with 'embeddings' and 'labels' (or a 2-tuple)")
