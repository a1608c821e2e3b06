"""Embed an evaluation stream on every rank and gather the whole set, in index order."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rskdist.comm import comm_device, gather_rows


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
    return_num_unreadable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, int]:
    """Embed this rank's share of an evaluation set and gather the whole set on every rank.

    ``loader`` yields ``(images, labels, index)`` where ``index`` is the global sample
    index and padding samples (added to even out ranks) have ``index == -1``. Returns
    ``(embeddings (N, d) float32, labels (N,) int64)`` on CPU, padding dropped, sorted by
    index, identical on every rank. ``normalize`` L2-normalises (cosine retrieval).
    ``rank`` is only used in messages; collectives use ``group`` and ``world_size``.

    Images the loader could not read are yielded as padding; a loader that counts them
    in ``loader.bad_samples`` (the shard EvalLoader) gets them summed over ranks, and
    ``return_num_unreadable=True`` returns that total as a third element (0 for streams
    without the attribute).
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
    num_unreadable = int(getattr(loader, "bad_samples", 0))  # read after the pass: this rank's count
    if world_size > 1:
        group = dist.group.WORLD if group is None else group
        comm = comm_device(group, device)
        # A rank may have no batch at all: agree on the embedding width first (with the
        # unreadable counts in the same collective).
        dims, _ = gather_rows(torch.tensor([[dim, num_unreadable]], device=comm), group)
        dim, num_unreadable = int(dims[:, 0].max()), int(dims[:, 1].sum())
        if emb.shape[1] != dim:
            emb = emb.reshape(0, dim)
        emb, _ = gather_rows(emb.to(comm), group)
        lab, _ = gather_rows(lab.to(comm), group)
        idx, _ = gather_rows(idx.to(comm), group)
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
    if num_unreadable and rank == 0:
        warnings.warn(f"{num_unreadable} unreadable evaluation image(s) left out of the metrics", stacklevel=3)
    return (emb, lab, num_unreadable) if return_num_unreadable else (emb, lab)


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
