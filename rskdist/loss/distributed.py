"""The RS@k loss as an autograd Function, on one process or across a process group.

Across ranks the loss gathers the embeddings and labels (rskdist/comm.py), computes the
terms of this rank's queries with the kernel (rskdist/loss/rsk.py), sums the loss over
ranks and hands each rank the gradient of its own rows. Why that gradient is exact, and
how it meets DeepSpeed's averaging, is in rskdist/parallel/gradients.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rskdist.comm import gather_rows, group_rank_and_size, sum_rows_to_owner
from rskdist.loss.rsk import rsk_forward_backward, validate_mix


class RSkFunction(torch.autograd.Function):
    """Loss value in forward; the gradient is computed there too and replayed in backward.

    `all_labels`: the global batch's labels when the caller has gathered them (to draw its
    mix plan), else None and they are gathered here: once per call either way."""

    @staticmethod
    def forward(ctx, embeddings, labels, all_labels, pairs, alphas, opts, block_size, sim_cache_mb, group, impl,
                backends):
        need_grad = ctx.needs_input_grad[0]
        rank, world = group_rank_and_size(group)
        if world == 1:
            loss, grad = rsk_forward_backward(
                embeddings, labels, opts=opts, pairs=pairs, alphas=alphas,
                block_size=block_size, sim_cache_mb=sim_cache_mb, need_grad=need_grad, impl=impl,
                backends=backends,
            )
        else:
            # Gather in float32 at least: the loss needs full-precision similarities.
            keys, counts = gather_rows(embeddings.detach().float() if embeddings.dtype != torch.float64
                                       else embeddings.detach(), group)
            if all_labels is None:
                all_labels, _ = gather_rows(labels, group)
            if pairs is not None:
                validate_mix((pairs, alphas), all_labels)
            start = sum(counts[:rank])
            queries = torch.arange(start, start + counts[rank], device=labels.device)
            num_virtual = 0 if pairs is None else pairs.shape[0]
            if num_virtual:
                v0, v1 = num_virtual * rank // world, num_virtual * (rank + 1) // world
                queries = torch.cat([queries, torch.arange(v0, v1, device=labels.device) + keys.shape[0]])
            loss, grad = rsk_forward_backward(
                keys, all_labels, opts=opts, pairs=pairs, alphas=alphas, queries=queries,
                block_size=block_size, need_grad=need_grad, impl=impl, backends=backends,
            )
            dist.all_reduce(loss, group=group)
            if need_grad:
                grad = sum_rows_to_owner(grad, counts, group)
        if need_grad:
            # Kept in the compute dtype (fp32): rounding it to fp16 here, before the caller's
            # loss scale arrives as grad_out, flushes its small entries to (sub)normal zeros.
            ctx.save_for_backward(grad)
            ctx.input_dtype = embeddings.dtype
        return loss.to(embeddings.dtype if embeddings.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # Scale first, round to the input dtype last (autograd would cast it anyway).
        grad_in = (grad * grad_out.to(grad.dtype)).to(ctx.input_dtype)
        return grad_in, *([None] * 10)
