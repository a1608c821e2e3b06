"""Block functions of the RS@k kernel: the loss of a block of queries and d loss / d similarity.

A block function takes the block's similarity rows against every item and returns the
block's loss (times `scale`) and, when asked, its gradient with respect to those rows. The
kernel (rskdist/loss/rsk.py) calls one through the backend table (rskdist/loss/backends.py).

- `eager_block`: unfused. For bq queries, P positive slots and N = B + V items it forms the
  (bq x P x N) sigmoid tensor once, takes the ranks from it and d loss / d rank in closed
  form, and derives sigma' = sigma (1 - sigma) from the same tensor.
- `fused_block`: the (bq x P x N) tensor is never formed (docs/loss.md, "Fused kernel"):

      pass 1, streaming over z:  above_qp = sum_z sigma(t_qz - t_qp),  dsum_qp = sum_z sigma'(.)
      O(bq x P) in between:      rank = 1 + above -> R_k, loss, coef_qp = d loss / d rank_qp / tau2
      pass 2, streaming over p:  dsim_qz = sum_p coef_qp sigma'(t_qz - t_qp),  dsim_qp -= coef_qp dsum_qp

  with t = s / tau2, z == p left out always and z == q unless count_self. The two passes
  are given (`rank_sums`, `grad_rows`): the Triton kernels (rskdist/loss/triton_kernels.py)
  or their plain torch form (rskdist/loss/reference.py, the kernels' test oracle).
Both share `recall_surrogate`, the step from ranks to the loss.
"""

from __future__ import annotations

from typing import Callable

import torch

# Elements of the eager block's (block x P x N) sigmoid tensor when block_size is None:
# 2M float32 = 8 MB, small enough to stay near the cache on CPU, large enough for GPUs.
EAGER_BLOCK_ELEMS = 1 << 21


def recall_surrogate(rank, valid, num_pos, opts, scale: float, need_grad: bool):
    """From ranks (bq, P) to the block's loss (times `scale`) and d loss / d rank (bq, P).

    R_k(q) = min(hits_qk, k) / min(k, |P(q)|), hits_qk = sum_p sigmoid((k - rank_qp) / tau1_k).
    """
    ks = torch.tensor(opts.ks, dtype=rank.dtype, device=rank.device)
    tau1_k = torch.tensor(opts.tau1_per_k(), dtype=rank.dtype, device=rank.device)
    sk_qpk = torch.sigmoid((ks - rank[:, :, None]) / tau1_k) * valid[:, :, None]
    hits_qk = sk_qpk.sum(1)
    denom_qk = torch.minimum(num_pos[:, None].to(ks.dtype), ks)
    loss = (1.0 - (torch.clamp(hits_qk, max=ks) / denom_qk).mean(1)).sum() * scale
    if not need_grad:
        return loss, None
    # d loss / d hits (clamp passes the gradient while hits <= k), then through the sigmoid.
    dhits_qk = (hits_qk <= ks).to(ks.dtype) * (-scale / len(opts.ks)) / denom_qk
    g_qp = -(dhits_qk[:, None, :] * sk_qpk * (1.0 - sk_qpk) / tau1_k).sum(-1)
    return loss, g_qp


def eager_block(sim_qx, q, pos, valid, num_pos, opts, scale: float, need_grad: bool):
    """Loss of a block of queries (times `scale`) and its gradient w.r.t. sim_qx (bq, N)."""
    inv_t2 = 1.0 / opts.tau2
    sim_qp = torch.gather(sim_qx, 1, pos)
    # (bq, P, N): the one big tensor of the block; sigmoid in place, then sigmoid' in place.
    sig = (sim_qx * inv_t2)[:, None, :] - (sim_qp * inv_t2)[:, :, None]
    sig.sigmoid_()
    # Leave out z == p always and z == q unless counting the query itself.
    sig.scatter_(2, pos[:, :, None], 0.0)
    if not opts.count_self:
        sig.scatter_(2, q[:, None, None].expand(-1, sig.shape[1], 1), 0.0)
    rank = sig.sum(-1).add_(1.0)
    loss, g_qp = recall_surrogate(rank, valid, num_pos, opts, scale, need_grad)
    if not need_grad:
        return loss, None

    # d rank_qp / d s_qz = sig'_qpz / tau2 (z != p), d rank_qp / d s_qp = -sum_z sig'_qpz / tau2.
    sig.addcmul_(sig, sig, value=-1.0)  # sig' = sig (1 - sig); masked entries stay 0
    coef_qp = g_qp * inv_t2
    dsim_qx = torch.bmm(coef_qp[:, None, :], sig).squeeze(1)
    dsim_qx.scatter_add_(1, pos, -coef_qp * sig.sum(-1))
    return loss, dsim_qx


def eager_block_in_chunks(sim_qx, q, pos, valid, num_pos, opts, scale, need_grad):
    """`eager_block` over row chunks of its own default size (the fallback of a fused
    backend, whose blocks are larger: memory O(block x N) instead of O(block x P x N))."""
    rows = max(1, EAGER_BLOCK_ELEMS // (pos.shape[1] * sim_qx.shape[1]))
    parts = [
        eager_block(sim_qx[r : r + rows], q[r : r + rows], pos[r : r + rows], valid[r : r + rows],
                    num_pos[r : r + rows], opts, scale, need_grad)
        for r in range(0, q.numel(), rows)
    ]
    loss = sum(part[0] for part in parts)
    return loss, (torch.cat([part[1] for part in parts]) if need_grad else None)


def fused_block(sim_qx, q, pos, valid, num_pos, opts, scale: float, need_grad: bool, *,
                rank_sums: Callable, grad_rows: Callable):
    """Loss of a block of queries (times `scale`) and its gradient w.r.t. sim_qx (bq, N),
    by the two streaming passes `rank_sums` and `grad_rows`."""
    inv_t2 = 1.0 / opts.tau2
    t_qx = sim_qx * inv_t2
    t_qp = torch.gather(t_qx, 1, pos)
    above, dsum = rank_sums(t_qx, t_qp, pos, q, opts.count_self)
    loss, g_qp = recall_surrogate(above + 1.0, valid, num_pos, opts, scale, need_grad)
    if not need_grad:
        return loss, None
    # d rank_qp / d s_qz = sigma'_qpz / tau2 (z != p), d rank_qp / d s_qp = -sum_z sigma'_qpz / tau2.
    coef = g_qp * inv_t2
    dsim_qx = grad_rows(t_qx, t_qp, pos, q, coef, opts.count_self)
    dsim_qx.scatter_add_(1, pos, -coef * dsum)
    return loss, dsim_qx


def on_extended_rows(block_fn: Callable) -> Callable:
    """A block function of extended rows (bq, N = B + V) as one of real rows (bq, B): the
    SiMix columns are appended before it and folded back onto their parents after."""

    def run(sim_qr, q, items, opts, scale, need_grad, out=None):  # out: unused (see backends.BlockFn)
        pos, valid, num_pos = items.positives(q)
        loss, dsim_qx = block_fn(items.extend_columns(sim_qr), q, pos, valid, num_pos, opts, scale, need_grad)
        return loss, (items.fold_columns(dsim_qx) if need_grad else None)

    return run
