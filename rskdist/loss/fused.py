"""The fused RS@k block: loss and d loss / d similarity of a block of queries without the
(block x P x N) tensor, and the choice of backend (`impl=`).

For a block of bq queries with similarity rows s (bq, N) and P positive slots each
(docs/method.md section 1; t = s / tau2):

    pass 1, streaming over z:  above_qp = sum_z sigma(t_qz - t_qp),  dsum_qp = sum_z sigma'(.)
    O(bq x P) in between:      rank = 1 + above -> R_k, loss, coef_qp = d loss / d rank_qp / tau2
    pass 2, streaming over p:  dsim_qz = sum_p coef_qp sigma'(t_qz - t_qp),  dsim_qp -= coef_qp dsum_qp

with z == p left out always and z == q unless count_self. Memory is O(bq x N) (the rows,
their gradient); the sigmoid is evaluated twice per (q, p, z) instead of being kept.

Backends of the two passes (`rank_sums`, `grad_rows`):
- "compiled": the plain torch formulation below through torch.compile (inductor emits one
  C++/OpenMP loop nest per pass on CPU, one Triton kernel per pass on CUDA); compiled once
  per process and per dtype/count_self (shapes are dynamic).
- "triton": the hand-written kernels of rskdist/loss/triton_kernels.py (CUDA; on CPU only
  under TRITON_INTERPRET=1, for tests).
- "native": a C kernel built for this CPU (rskdist/loss/native.py, csrc/rsk_rows.c) that
  also builds the SiMix columns and folds them back, one query at a time.
- "eager": not fused; today's blockwise kernel (`_block_loss_and_grad` in rsk.py).
"auto" picks per device what was fastest where measured (docs/loss.md); a backend that is
unavailable, or fails on its first call, falls back to "eager" with a one-line warning.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from typing import Callable

import torch

IMPLS = ("auto", "eager", "native", "compiled", "triton")
# What "auto" runs on a CPU: native, measured fastest on 2 cores (docs/loss.md).
AUTO_CPU = "native"
# Similarity-row elements per fused block when block_size is None: three (bq, N) buffers
# (rows, scaled rows, their gradient) of this many elements, 8 MB each in float32 on CPU.
FUSED_BLOCK_ELEMS = {"cpu": 1 << 21, "cuda": 1 << 24}
# The native kernel keeps nothing of size N per row but the rows and their gradient (real
# columns only); larger blocks mean fewer calls from Python: 4M elements, 16 MB each.
NATIVE_BLOCK_ELEMS = 1 << 22

_NOTED: set[str] = set()
_FAILED: set[tuple[str, str]] = set()  # (impl, device type) whose first call failed in this process


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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


def _differences_and_mask(t_qx, t_qp, pos, q, count_self: bool):
    """(bq, P, N) t_qz - t_qp and which (q, p, z) count (z != p, and z != q unless count_self).
    Under torch.compile both are inlined into the reductions that read them, never stored."""
    z = torch.arange(t_qx.shape[1], device=t_qx.device)
    keep = z != pos[:, :, None]
    if not count_self:
        keep = keep & (z != q[:, None, None])
    return t_qx[:, None, :] - t_qp[:, :, None], keep


# sigma'(x) = sigma(x) (1 - sigma(x)) = 1 / (2 + 2 cosh x), written without reusing sigma(x):
# inductor stores any reused exp/sigmoid expression on CPU (should_realize_on_reuse), which
# would bring the (bq, P, N) tensor back. It is also accurate where sigma' is tiny.
def rank_sums_torch(t_qx, t_qp, pos, q, count_self: bool):
    x, keep = _differences_and_mask(t_qx, t_qp, pos, q, count_self)
    above = torch.where(keep, torch.sigmoid(x), 0.0).sum(-1)
    dsum = torch.where(keep, 0.5 / (1.0 + torch.cosh(x)), 0.0).sum(-1)
    return above, dsum


def grad_rows_torch(t_qx, t_qp, pos, q, coef, count_self: bool):
    x, keep = _differences_and_mask(t_qx, t_qp, pos, q, count_self)
    return torch.where(keep, coef[:, :, None] * (0.5 / (1.0 + torch.cosh(x))), 0.0).sum(1)


def fused_block_loss_and_grad(sim_qx, q, pos, valid, num_pos, opts, scale: float, need_grad: bool,
                              rank_sums: Callable, grad_rows: Callable):
    """Loss of a block of queries (times `scale`) and its gradient w.r.t. sim_qx (bq, N)."""
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


_COMPILED: dict[str, Callable] = {}


def _compiled_passes() -> tuple[Callable, Callable]:
    if not _COMPILED:
        # dynamic=True: one compile serves every block, panel and batch size.
        _COMPILED["rank_sums"] = torch.compile(rank_sums_torch, dynamic=True, fullgraph=True)
        grad_rows = torch.compile(grad_rows_torch, dynamic=True, fullgraph=True)

        def grad_rows_p_major(t_qx, t_qp, pos, q, coef, count_self):
            # (bq, P) inputs stored p-major, so the only unit-stride axis is z: inductor then
            # vectorises over items (8 floats) rather than over the P <= 9 positives.
            return grad_rows(t_qx, _p_major(t_qp), _p_major(pos), q, _p_major(coef), count_self)

        _COMPILED["grad_rows"] = grad_rows_p_major
    return _COMPILED["rank_sums"], _COMPILED["grad_rows"]


def _p_major(x_qp: torch.Tensor) -> torch.Tensor:
    return x_qp.T.contiguous().T


def _triton_passes() -> tuple[Callable, Callable]:
    from rskdist.loss import triton_kernels

    return triton_kernels.rank_sums, triton_kernels.grad_rows


def _unavailable(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device` here, or None if it can."""
    kind = device.type
    if (impl, kind) in _FAILED:
        return "it failed on its first call in this process"
    if impl == "native":
        if kind != "cpu":
            return "it is a CPU kernel"
        from rskdist.loss import native

        return native.available()
    if impl == "compiled":
        if kind == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
            return "torch.compile needs a C++ compiler (g++ or clang++) on CPU"
        if kind not in ("cpu", "cuda"):
            return f"not set up for device type {kind}"
    if impl == "triton" or (impl == "compiled" and kind == "cuda"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if impl == "triton":
        if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for tests on CPU)"
        if kind not in ("cpu", "cuda"):
            return f"not set up for device type {kind}"
    if impl in ("compiled", "triton") and kind == "cuda":
        if torch.cuda.get_device_capability(device) < (7, 0):
            return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def resolve_impl(impl: str, device: torch.device) -> str:
    """The backend that will run: "eager", "native", "compiled" or "triton" (never fails for a valid name)."""
    if impl not in IMPLS:
        raise ValueError(f"RS@k: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        choice = {"cuda": "triton", "cpu": AUTO_CPU}.get(device.type, "eager")
        if choice != "eager" and _unavailable(choice, device) is not None:
            choice = "eager"  # auto says nothing: eager is a valid pick
        return choice
    if impl == "eager":
        return impl
    why = _unavailable(impl, device)
    if why is not None:
        _note_once(f"RS@k: impl={impl!r} is unavailable on {device.type} ({why}); using the eager kernel")
        return "eager"
    return impl


def default_block_rows(impl: str, device: torch.device, num_items: int) -> int:
    """Queries per fused block when block_size is None."""
    elems = NATIVE_BLOCK_ELEMS if impl == "native" else FUSED_BLOCK_ELEMS.get(device.type, FUSED_BLOCK_ELEMS["cpu"])
    return max(1, elems // max(num_items, 1))


def on_extended_rows(block_fn: Callable) -> Callable:
    """A block function of extended rows (bq, N = B + V) as one of real rows (bq, B): the
    SiMix columns are appended before it and folded back onto their parents after."""

    def run(sim_qr, q, items, opts, scale, need_grad, out=None):  # out: see FusedKernel
        pos, valid, num_pos = items.positives(q)
        loss, dsim_qx = block_fn(items.extend_columns(sim_qr), q, pos, valid, num_pos, opts, scale, need_grad)
        return loss, (items.fold_columns(dsim_qx) if need_grad else None)

    return run


class FusedKernel:
    """Block function of a fused backend, on real similarity rows (bq, B); if its first
    call in this process fails (no compiler, a build error), it warns once and runs
    `fallback` from then on."""

    def __init__(self, impl: str, device: torch.device, fallback: Callable):
        self.impl, self.kind, self.fallback = impl, device.type, fallback
        if impl == "native":
            from rskdist.loss import native

            self.block = native.block_loss_and_grad
        else:
            rank_sums, grad_rows = _compiled_passes() if impl == "compiled" else _triton_passes()
            self.block = on_extended_rows(functools.partial(fused_block_loss_and_grad, rank_sums=rank_sums,
                                                            grad_rows=grad_rows))

    def __call__(self, sim_qr, q, items, opts, scale, need_grad, out=None):
        """`out`: where the caller would like d loss / d sim_qr written (a backend may use
        it, saving a copy, or return its own tensor)."""
        if (self.impl, self.kind) in _FAILED:
            return self.fallback(sim_qr, q, items, opts, scale, need_grad)
        key = (self.impl, self.kind, opts.count_self, sim_qr.dtype)
        try:
            result = self.block(sim_qr, q, items, opts, scale, need_grad, out=out)
        except Exception as err:  # a backend that cannot build; once it has run, errors are real
            if key in _PROVEN:
                raise
            _FAILED.add((self.impl, self.kind))
            first = (str(err).strip().splitlines() or [""])[0][:160]
            _note_once(f"RS@k: impl={self.impl!r} failed on {self.kind} ({type(err).__name__}: {first}); "
                       "using the eager kernel")
            return self.fallback(sim_qr, q, items, opts, scale, need_grad)
        _PROVEN.add(key)
        return result


_PROVEN: set = set()  # (impl, device type, count_self, dtype) that have run once
