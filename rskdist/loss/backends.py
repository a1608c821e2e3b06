"""The block backends of RS@k (`impl=`): one record each, one table, one fallback rule.

| backend  | block function                                               | runs on                 |
|----------|--------------------------------------------------------------|-------------------------|
| `eager`  | `blocks.eager_block`: the (block x P x N) tensor, plain torch | anywhere (the fallback) |
| `native` | a C kernel built for this CPU (rskdist/loss/native.py)        | CPU with a C compiler   |
| `triton` | `blocks.fused_block` with the Triton passes                   | CUDA (CPU: interpreter) |

"auto" runs, per device type, what was measured fastest there (docs/loss.md): native on
CPU, triton on CUDA, eager elsewhere. The one rule: a backend that is unavailable here, or
whose first call in this process fails (no compiler, a build error), is replaced by
eager, with one warning when it was asked for by name (auto says nothing). Once a backend
has run for a dtype, its errors are real and are raised.

`BACKENDS` is the table training uses; tests build their own `Backends` (other records,
fresh fallback state) and pass it to `rsk_loss(..., backends=)`.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from rskdist.loss.blocks import EAGER_BLOCK_ELEMS, eager_block, eager_block_in_chunks, fused_block, on_extended_rows

# A block function on real similarity rows: (sim_qr (bq, B), q, items, opts, scale, need_grad,
# out=None) -> (loss times scale, d loss / d sim_qr or None); `out` is where the caller
# would like the gradient written (a backend may use it, saving a copy, or return its own).
BlockFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Backend:
    """One block backend.

    why_not(device): None when it can run on `device` here, else the reason (asking
    builds nothing). make_block(): its block function on real rows, built on first use.
    block_elems: elements of its block buffer by device type ("cpu" for any other) when
    block_size is None; the buffer is (block x P x N) when `per_positive`, else (block x N).
    buffers: block buffers of that size alive at once (the memory model,
    rskdist/loss/memory.py)."""

    name: str
    why_not: Callable[[torch.device], "str | None"]
    make_block: Callable[[], BlockFn]
    block_elems: Mapping[str, int]
    buffers: int
    per_positive: bool = False

    def default_rows(self, device_type: str, num_items: int, max_pos: int) -> int:
        """Queries per block when block_size is None."""
        elems = self.block_elems.get(device_type, self.block_elems["cpu"])
        per_row = max(num_items, 1) * (max(max_pos, 1) if self.per_positive else 1)
        return max(1, elems // per_row)


class Backends:
    """The table of backends (`records`), what "auto" runs per device type (`auto`), and
    the fallback state of one process: which backends failed, which have run, which
    warnings were given."""

    def __init__(self, records: Iterable[Backend], *, auto: Mapping[str, str], fallback: str = "eager"):
        self.records = {r.name: r for r in records}
        if fallback not in self.records:
            raise ValueError(f"the fallback backend {fallback!r} is not in the table")
        self.auto, self.fallback = dict(auto), fallback
        self.failed: set[tuple[str, str]] = set()  # (backend, device type) whose first call failed
        self.proven: set[tuple] = set()  # (backend, device type, count_self, dtype) that have run once
        self.noted: set[str] = set()
        self._blocks: dict[str, BlockFn] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """What `impl=` accepts."""
        return ("auto", *self.records)

    def check(self, impl: str) -> str:
        if impl not in self.names:
            raise ValueError(f"RS@k: impl={impl!r} is not a loss backend; the available ones are "
                             f"{', '.join(self.names)} (docs/loss.md, \"Fused kernel\")")
        return impl

    def why_not(self, impl: str, device: torch.device) -> str | None:
        """Why `impl` cannot run on `device` here, or None if it can."""
        if (impl, device.type) in self.failed:
            return "it failed on its first call in this process"
        return self.records[impl].why_not(device)

    def resolve(self, impl: str, device: torch.device) -> str:
        """The backend that will run (never fails for a valid name)."""
        self.check(impl)
        if impl == "auto":
            choice = self.auto.get(device.type, self.fallback)
            return choice if self.why_not(choice, device) is None else self.fallback  # auto says nothing
        if impl == self.fallback:
            return impl
        why = self.why_not(impl, device)
        if why is not None:
            self._note(f"RS@k: impl={impl!r} is unavailable on {device.type} ({why}); using the {self.fallback} "
                       "kernel")
            return self.fallback
        return impl

    def block_fn(self, impl: str, device: torch.device) -> BlockFn:
        """The block function of a resolved backend; any but the fallback falls back to
        the fallback's (in row chunks of its own size) if its first call fails."""
        if impl not in self._blocks:
            self._blocks[impl] = self.records[impl].make_block()
        if impl == self.fallback:
            return self._blocks[impl]
        return functools.partial(self._guarded, impl, device.type)

    def _guarded(self, impl: str, kind: str, sim_qr, q, items, opts, scale, need_grad, out=None):
        if (impl, kind) in self.failed:
            return _FALLBACK_IN_CHUNKS(sim_qr, q, items, opts, scale, need_grad)
        key = (impl, kind, opts.count_self, sim_qr.dtype)
        try:
            result = self._blocks[impl](sim_qr, q, items, opts, scale, need_grad, out=out)
        except Exception as err:  # a backend that cannot build; once it has run, errors are real
            if key in self.proven:
                raise
            self.failed.add((impl, kind))
            first = (str(err).strip().splitlines() or [""])[0][:160]
            self._note(f"RS@k: impl={impl!r} failed on {kind} ({type(err).__name__}: {first}); "
                       f"using the {self.fallback} kernel")
            return _FALLBACK_IN_CHUNKS(sim_qr, q, items, opts, scale, need_grad)
        self.proven.add(key)
        return result

    def _note(self, message: str) -> None:
        if message not in self.noted:
            self.noted.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


_FALLBACK_IN_CHUNKS = on_extended_rows(eager_block_in_chunks)


def eager_backend() -> Backend:
    return Backend("eager", why_not=lambda device: None, make_block=lambda: on_extended_rows(eager_block),
                   block_elems={"cpu": EAGER_BLOCK_ELEMS}, buffers=3, per_positive=True)


def native_backend(kernel=None) -> Backend:
    """The C kernel (`kernel`: a rskdist.loss.native.NativeKernel; default: one with the
    environment's compiler and cache). Its block is as many rows as fit 4M elements, 16 MB
    in float32: it reads the rows where they are and writes the gradient where the caller
    wants it, so no block buffer of its own (per thread, O(N x P) scratch)."""
    from rskdist.loss.native import NativeKernel

    kernel = NativeKernel() if kernel is None else kernel

    def why_not(device: torch.device) -> str | None:
        return "it is a CPU kernel" if device.type != "cpu" else kernel.why_not()

    return Backend("native", why_not=why_not, make_block=lambda: kernel.block_loss_and_grad,
                   block_elems={"cpu": 1 << 22}, buffers=0)


def triton_backend(rank_sums: Callable | None = None, grad_rows: Callable | None = None,
                   name: str = "triton") -> Backend:
    """The fused block with the Triton passes (or, for tests, other `rank_sums` and
    `grad_rows`: rskdist.loss.reference has their plain torch form). A block holds about
    five (block x N) buffers: the rows, with SiMix columns, scaled, their gradient, and the
    gradient folded to real columns; 2M elements on CPU, 16M (64 MB) on CUDA."""

    def make_block() -> BlockFn:
        passes = (rank_sums, grad_rows)
        if rank_sums is None:
            from rskdist.loss import triton_kernels

            passes = (triton_kernels.rank_sums, triton_kernels.grad_rows)
        return on_extended_rows(functools.partial(fused_block, rank_sums=passes[0], grad_rows=passes[1]))

    why_not = _triton_why_not if rank_sums is None else (lambda device: None)
    return Backend(name, why_not=why_not, make_block=make_block, block_elems={"cpu": 1 << 21, "cuda": 1 << 24},
                   buffers=5)


def _triton_why_not(device: torch.device) -> str | None:
    kind = device.type
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for tests on CPU)"
    if kind not in ("cpu", "cuda"):
        return f"not set up for device type {kind}"
    if kind == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def default_backends() -> Backends:
    """The table: eager, native, triton; auto = native on CPU (measured fastest on 2 cores),
    triton on CUDA (docs/loss.md)."""
    return Backends([eager_backend(), native_backend(), triton_backend()], auto={"cpu": "native", "cuda": "triton"})


BACKENDS = default_backends()  # the process's table and fallback state
