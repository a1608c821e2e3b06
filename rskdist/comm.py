"""Collectives rskdist needs, on any process group; imports nothing of rskdist.

Every package that talks across ranks (the loss, evaluation, the trainer) goes through
these few functions, so there is one row all-gather and one rule for `group`:
group=None means this process alone, even inside an initialised process group; only an
explicit group communicates. How gradients flow through them is told in
rskdist/parallel/gradients.py.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) inside `group`; (0, 1) for group=None.

    group=None means local, also inside an initialised process group: torch.distributed
    would read None as the default group, and a per-rank loss (a validation loss, a
    baseline) would silently become the loss of the gathered batch.
    """
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(tensor: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """All-gather along dim 0 without autograd; ranks may hold different row counts.

    Returns the concatenation in rank order and each rank's row count.
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return tensor, [tensor.shape[0]]
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]  # a host sync: sizes decide the buffers
    longest = max(counts)
    padded = tensor
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(pieces, counts)]), counts


class _GatherRowsReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        gathered, counts = gather_rows(tensor.detach(), group)
        rank, _ = group_rank_and_size(group)
        ctx.rows = (sum(counts[:rank]), sum(counts[: rank + 1]))
        return gathered if gathered is not tensor else gathered.clone()

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.rows
        return grad[start:stop], None


def gather_rows_replicated(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 (uneven row counts allowed) for a loss that every rank then
    computes whole; backward keeps this rank's rows of the gradient, with no collective.

    Exact when every rank runs the identical computation downstream of the gather (same
    gathered batch, same plan, same parameters): then every rank holds the same full
    gradient dL/dE, and this rank's rows of it are the gradient of its own inputs. A sum
    over ranks (what torch.distributed.nn.all_gather's backward does) would count it W
    times. Cost: one all-gather, and every rank computes the whole loss (W-fold redundant
    work and memory, versus RS@k's blockwise split of the queries). Parameters used after
    the gather (class proxies) get the full gradient dL/dP on every rank, identical
    everywhere, so DeepSpeed's mean over ranks returns it unchanged. The W * L scaling that
    rskdist/parallel/gradients.py applies for the embeddings' per-rank rows must therefore
    not reach these parameters (it would multiply their gradient by W).
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return tensor
    return _GatherRowsReplicated.apply(tensor, group)


def sum_rows_to_owner(grad: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Sum (B x d) per-rank gradients over ranks and return this rank's rows."""
    rank, world = group_rank_and_size(group)
    if world == 1:
        return grad
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    even = all(c == counts[0] for c in counts)
    if even and dist.get_backend(group) == "nccl":
        out = grad.new_empty((counts[rank],) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out
    grad = grad.contiguous()
    dist.all_reduce(grad, group=group)
    return grad[offsets[rank] : offsets[rank + 1]].clone()


def comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL needs CUDA tensors, gloo CPU ones."""
    if group is None:
        return device
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def broadcast_flag(flag: bool, group, device: torch.device | str = "cpu") -> bool:
    """Rank 0's boolean on every rank of `group` (one-element broadcast)."""
    if group is None:
        return bool(flag)
    t = torch.tensor([int(flag)], dtype=torch.int64, device=comm_device(group, torch.device(device)))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return bool(t.item())


def broadcast_object(obj, group):
    """Rank 0's picklable `obj` on every rank of `group` (small objects: a tag, a flag)."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def gather_objects(obj, group) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank of `group`."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
