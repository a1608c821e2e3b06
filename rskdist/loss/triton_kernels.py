"""Hand-written Triton kernels for the two streaming passes of the fused RS@k block.

Both read the block's scaled similarity rows t_qz = s_qz / tau2 (bq, N) and never form the
(bq x P x N) tensor (docs/loss.md, "Fused kernel"):
- `rank_sums`: one program per (query, positive) pair streams over the N items and sums
  sigma(t_qz - t_qp) and sigma' in registers: the rank (minus 1) and sum_z sigma'.
- `grad_rows`: one program per (query, tile of BLOCK_N items) loops over the P positives
  and writes d loss / d s_qz for its tile: sum_p coef_qp sigma'(t_qz - t_qp).
z == p is left out always and z == q unless `count_self`, by index comparison. Their plain
torch form (`rank_sums`, `grad_rows` in rskdist/loss/reference.py) is what they compute;
`blocks.fused_block` runs them, `backends.triton_backend` makes them a backend.

On a GPU these run on CUDA tensors; with TRITON_INTERPRET=1 set before triton is imported,
they run on CPU tensors through triton's interpreter (slow, exact), which is how the tests
check them without a GPU. Accumulation is in the input dtype (float32 or float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rank_sums_kernel(t_ptr, tp_ptr, pos_ptr, q_ptr, above_ptr, dsum_ptr, N, P, stride_t,
                      COUNT_SELF: tl.constexpr, BLOCK_N: tl.constexpr):
    pair = tl.program_id(0)  # one (query row, positive slot)
    row = (pair // P).to(tl.int64)
    t_p = tl.load(tp_ptr + pair)
    p = tl.load(pos_ptr + pair)
    q = tl.load(q_ptr + row)
    acc_sig = tl.zeros([BLOCK_N], dtype=t_ptr.dtype.element_ty)
    acc_der = tl.zeros([BLOCK_N], dtype=t_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        inside = z < N
        t = tl.load(t_ptr + row * stride_t + z, mask=inside, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(t_p - t))
        keep = inside & (z != p)
        if not COUNT_SELF:
            keep = keep & (z != q)
        sig = tl.where(keep, sig, 0.0)
        acc_sig += sig
        acc_der += sig * (1.0 - sig)
    tl.store(above_ptr + pair, tl.sum(acc_sig, axis=0))
    tl.store(dsum_ptr + pair, tl.sum(acc_der, axis=0))


@triton.jit
def _grad_rows_kernel(t_ptr, tp_ptr, pos_ptr, q_ptr, coef_ptr, out_ptr, N, P, stride_t, stride_o,
                      COUNT_SELF: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = z < N
    t = tl.load(t_ptr + row * stride_t + z, mask=inside, other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=t_ptr.dtype.element_ty)
    for j in range(0, P):
        t_p = tl.load(tp_ptr + row * P + j)
        p = tl.load(pos_ptr + row * P + j)
        coef = tl.load(coef_ptr + row * P + j)
        sig = 1.0 / (1.0 + tl.exp(t_p - t))
        acc += tl.where(z != p, coef * (sig * (1.0 - sig)), 0.0)
    if not COUNT_SELF:
        acc = tl.where(z != tl.load(q_ptr + row), acc, 0.0)
    tl.store(out_ptr + row * stride_o + z, acc, mask=inside)


def _block_n(num_items: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(num_items)))


def rank_sums(t_qx, t_qp, pos, q, count_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bq, P) sums over items of sigma(t_qz - t_qp) and of its derivative, masked."""
    t_qx, t_qp, pos, q = t_qx.contiguous(), t_qp.contiguous(), pos.contiguous(), q.contiguous()
    bq, num_pos = t_qp.shape
    above = torch.empty_like(t_qp)
    dsum = torch.empty_like(t_qp)
    if above.numel():
        _rank_sums_kernel[(bq * num_pos,)](t_qx, t_qp, pos, q, above, dsum, t_qx.shape[1], num_pos,
                                           t_qx.stride(0), COUNT_SELF=count_self, BLOCK_N=_block_n(t_qx.shape[1]))
    return above, dsum


def grad_rows(t_qx, t_qp, pos, q, coef, count_self: bool) -> torch.Tensor:
    """(bq, N): sum_p coef_qp sigma'(t_qz - t_qp), masked like `rank_sums`."""
    t_qx, t_qp, pos, q, coef = (x.contiguous() for x in (t_qx, t_qp, pos, q, coef))
    bq, num_items = t_qx.shape
    out = torch.empty_like(t_qx)
    block_n = _block_n(num_items)
    if out.numel():
        _grad_rows_kernel[(bq, triton.cdiv(num_items, block_n))](
            t_qx, t_qp, pos, q, coef, out, num_items, t_qp.shape[1], t_qx.stride(0), out.stride(0),
            COUNT_SELF=count_self, BLOCK_N=block_n)
    return out
