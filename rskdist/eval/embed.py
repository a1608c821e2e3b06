"""Embed an evaluation stream on every rank and gather the whole set, in index order."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from rskdist.comm import comm_device, gather_rows, group_rank_and_size


@torch.no_grad()
def embed_local(
    model: torch.nn.Module,
    loader,
    *,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Embed this rank's share of an evaluation stream, nothing gathered.

    Returns ``(embeddings (n, d) float32, labels (n,), index (n,), num_unreadable)`` on
    ``device``, padding (``index == -1``) included; ``num_unreadable`` is this rank's
    ``loader.bad_samples`` (0 for streams without it). d is -1 when no batch came."""
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
    emb = torch.cat(embs) if embs else torch.zeros(0, 0, device=device)
    lab = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.int64, device=device)
    idx = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.int64, device=device)
    return emb, lab, idx, int(getattr(loader, "bad_samples", 0))  # read after the pass: this pass's count


def agree_on_width(emb: torch.Tensor, num_unreadable: int, group: ProcessGroup | None) -> tuple[torch.Tensor, int]:
    """A rank may have had no batch at all: every rank learns the embedding width (and the
    unreadable count summed over ranks, in the same collective); empty pieces get it."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return emb, num_unreadable
    comm = comm_device(group, emb.device)
    dim = emb.shape[1] if emb.shape[0] else -1
    dims, _ = gather_rows(torch.tensor([[dim, num_unreadable]], device=comm), group)
    dim, num_unreadable = int(dims[:, 0].max()), int(dims[:, 1].sum())
    return (emb if emb.shape[1] == dim else emb.reshape(0, dim)), num_unreadable


def first_copies(idx: torch.Tensor) -> torch.Tensor:
    """(n,) bool: True for the first row of each index, in row order (padding excluded)."""
    order = torch.argsort(idx, stable=True)
    first = torch.ones_like(idx, dtype=torch.bool)
    s = idx[order]
    first[order[1:]] = s[1:] != s[:-1]
    return first & (idx >= 0)


def warn_unreadable(num_unreadable: int, rank: int) -> None:
    if num_unreadable and rank == 0:
        warnings.warn(f"{num_unreadable} unreadable evaluation image(s) left out of the metrics", stacklevel=3)


def embed_dataset(
    model: torch.nn.Module,
    loader,
    *,
    device: str | torch.device,
    group: ProcessGroup | None = None,
    amp_dtype: torch.dtype | None = None,
    normalize: bool = True,
    return_num_unreadable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, int]:
    """Embed this rank's share of an evaluation set and gather the whole set on every rank.

    ``loader`` yields ``(images, labels, index)`` where ``index`` is the global sample
    index and padding samples (added to even out ranks) have ``index == -1``. Returns
    ``(embeddings (N, d) float32, labels (N,) int64)`` on CPU, padding dropped, sorted by
    index, identical on every rank of ``group`` (``None``: this process alone).
    ``normalize`` L2-normalises (cosine retrieval).

    Images the loader could not read are yielded as padding; a loader that counts them
    in ``loader.bad_samples`` (the shard EvalLoader) gets them summed over ranks, and
    ``return_num_unreadable=True`` returns that total as a third element (0 for streams
    without the attribute).
    """
    emb, lab, idx, num_unreadable = embed_local(model, loader, device=device, amp_dtype=amp_dtype,
                                                normalize=normalize)
    emb, lab, _, num_unreadable = gather_embedded(emb, lab, idx, num_unreadable, group)
    return (emb, lab, num_unreadable) if return_num_unreadable else (emb, lab)


def gather_embedded(emb: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor, num_unreadable: int,
                    group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """embed_local's pieces of every rank -> the whole set on every rank, on CPU, padding
    dropped, in index order (the first copy of an index embedded twice, with a warning):
    embeddings, labels, indices, and the unreadable count summed over ranks."""
    rank, _ = group_rank_and_size(group)
    emb, num_unreadable = agree_on_width(emb, num_unreadable, group)
    comm = comm_device(group, emb.device)
    emb, _ = gather_rows(emb.to(comm), group)
    lab, _ = gather_rows(lab.to(comm), group)
    idx, _ = gather_rows(idx.to(comm), group)
    emb, lab, idx = emb.cpu(), lab.cpu(), idx.cpu()
    keep = _keep_first(idx, rank)
    emb, lab, idx = emb[keep], lab[keep], idx[keep]
    order = torch.argsort(idx)
    warn_unreadable(num_unreadable, rank)
    return emb[order], lab[order], idx[order], num_unreadable


def local_rows(emb: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor, num_unreadable: int,
               group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """embed_local's pieces -> this rank's rows only (padding and repeated indices dropped
    as gather_embedded drops them; only the indices travel), for sharded evaluation."""
    rank, _ = group_rank_and_size(group)
    emb, num_unreadable = agree_on_width(emb, num_unreadable, group)
    all_idx, counts = gather_rows(idx.to(comm_device(group, idx.device)), group)
    start = sum(counts[:rank])
    keep = _keep_first(all_idx.cpu(), rank)[start : start + idx.shape[0]].to(idx.device)
    warn_unreadable(num_unreadable, rank)
    return emb[keep], lab[keep], idx[keep], num_unreadable


def _keep_first(idx: torch.Tensor, rank: int) -> torch.Tensor:
    """first_copies(idx), with a warning when an index was embedded twice."""
    keep = first_copies(idx)
    repeated = int((idx >= 0).sum() - keep.sum())
    if repeated:
        warnings.warn(f"rank {rank}: {repeated} samples were embedded twice (padding not marked with index -1?); "
                      f"keeping the first copy", stacklevel=3)
    return keep


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
