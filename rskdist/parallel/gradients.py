"""How gradients flow through every collective of rskdist. Read this before changing any.

The global batch is the concatenation, in rank order, of every rank's local batch
(E_r, y_r), r = 0..W-1. Write E = [E_0; ...; E_{W-1}] (B x d) and L(E) for the RS@k loss
of the global batch (mean over all its queries).

1. Forward of the loss (`rsk_loss(..., group=...)`, `_RSkFunction` in rskdist/loss/__init__.py)
   Only an explicit group gathers: group=None is the one-process loss of the rows given,
   with no collective, even inside an initialised process group.
   - `gather_rows` all-gathers E_r and y_r WITHOUT autograd (raw all_gather; sizes may
     differ per rank). Every rank now holds E and y.
   - Rank r computes the loss terms of its own queries: its real rows, plus its share of
     the virtual (SiMix) rows (virtual rows are split evenly by rank in plan order). The
     plan (pairs, alphas) indexes the global batch and must be identical on every rank
     (same seeded generator; the trainer gathers y once before the loss to draw it, a
     B-long int64 all-gather). Each term is divided by the number of queries of the WHOLE
     batch, which every rank computes from y alone, so the terms of all ranks add up to L.
   - The kernel returns that partial loss L_r and G_r = d L_r / d E (B x d, all rows: a
     rank's queries look at every key).
   - all_reduce(SUM) of L_r gives L on every rank (what is logged and returned).
   - The gradient of L with respect to this rank's rows is sum_r' G_r'[rows of r]:
     one reduce-scatter (NCCL, equal sizes) or an all_reduce + slice (gloo, or uneven
     sizes). The result is exactly this rank's slice of the single-process gradient.
   The collectives run inside the forward call (gradients are computed eagerly there),
   so every rank runs them in the same order whether or not it calls backward.

2. Backward of the loss: autograd receives d L / d E_r for the local embeddings and
   continues into the backbone of this rank only. No collective runs in backward.

3. Data-parallel averaging. DeepSpeed (and DDP) average parameter gradients over the W
   ranks. The true gradient of L with respect to a parameter is the SUM over ranks of
   each rank's contribution (each rank backpropagates only its own rows). Hence the
   trainer backpropagates W * L (`loss_scale_for_averaging(W)`), so that the average
   DeepSpeed forms equals the sum we need. The logged loss is L, unscaled.

4. Two-pass step (`rskdist.parallel.step`). Pass 1 forwards the local batch in chunks
   under no_grad; the gathered loss gives d L / d E_r. Pass 3 recomputes each chunk with
   grad and backpropagates the surrogate sum(e * stop_grad(W * dL/de)), whose gradient
   with respect to the chunk's parameters is exactly that chunk's contribution. dL/de
   and the surrogate are fp32 whatever the model's precision: DeepSpeed's fp16 loss
   scale multiplies them before the gradient is rounded to the model's dtype. Chunks
   are accumulated into one optimizer step without DeepSpeed dividing by the number of
   chunks (scale_wrt_gas=False) and with one gradient reduction per step.
"""

from __future__ import annotations

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


def loss_scale_for_averaging(world_size: int) -> float:
    """Factor on the backpropagated loss that turns DeepSpeed's gradient mean into a sum."""
    return float(world_size)
