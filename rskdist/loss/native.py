"""The fused RS@k block as a C kernel built for this CPU (`impl="native"`).

`csrc/rsk_rows.c` computes, per query, the rank sums, the recall surrogate and d loss /
d similarity in one go over the query's similarity row (docs/loss.md, "Fused kernel"):
the (block x P x N) tensor is never formed, SiMix columns are built and folded inside
the kernel, and each query needs only O(N) scratch (one exp per item and group of
positives, docs/loss.md). The loops are written so that the compiler vectorises them
(AVX2: 8 floats).

It is compiled on first use with the system C compiler (`$CC`, else cc, gcc or clang),
`-O3 -march=native`, into a cache keyed by the source, the compiler, the flags and the CPU
(`$RSKDIST_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rskdist/kernels`, else
`~/.cache/rskdist/kernels`), which keeps the newest KEEP_BUILDS kernels; ranks on one node
that build at once each write their own temporary file and rename it into place. It takes
about a second. The library is loaded with ctypes and called without the GIL with one
struct of named fields (`_Args`, struct rsk_rows_args) and a range of rows: the rows of a
block are split over `torch.get_num_threads()` threads. `NativeKernel` holds the compiler,
cache and flags and the loaded library; rskdist/loss/backends.py holds the one training
uses.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("rsk_rows.c", "rsk_rows_impl.h")]
# -ffinite-math-only and -fno-signed-zeros let the clamp compile to min/max (the inputs are
# checked finite and every value stays finite; a failed allocation is an error code, not a
# NaN, since NaN tests may be folded away under these flags); -std=gnu11 allows fused
# multiply-adds.
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-ffinite-math-only", "-fno-signed-zeros", "-fPIC", "-shared")
ABI = 5  # rsk_rows_abi() of the source this module calls
KEEP_BUILDS = 4  # kernels kept in the cache: the newest few (other sources, compilers, flags)
RSK_ENOMEM = 1  # rsk_rows_*: scratch memory could not be allocated

_POOL: dict[int, ThreadPoolExecutor] = {}


class _Args(ctypes.Structure):
    """struct rsk_rows_args of csrc/rsk_rows.c, field by field."""

    _fields_ = [(name, kind) for name, kind in (
        ("sim", ctypes.c_void_p), ("sim_stride", ctypes.c_int64), ("n_real", ctypes.c_int64),
        ("n_virtual", ctypes.c_int64), ("real_at", ctypes.c_void_p), ("real_col", ctypes.c_void_p),
        ("virt_at", ctypes.c_void_p), ("first", ctypes.c_void_p), ("second", ctypes.c_void_p),
        ("alpha", ctypes.c_void_p), ("q", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("width", ctypes.c_int64),
        ("num_pos", ctypes.c_void_p), ("ks", ctypes.c_void_p), ("num_ks", ctypes.c_int64),
        ("tau1", ctypes.c_void_p), ("tau2", ctypes.c_double), ("count_self", ctypes.c_int64),
        ("scale", ctypes.c_double), ("dsim", ctypes.c_void_p), ("dsim_stride", ctypes.c_int64),
    )]


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def find_compiler() -> str | None:
    """The system C compiler: `$CC`, else cc, gcc or clang; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def default_cache() -> Path:
    """`$RSKDIST_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rskdist/kernels`, else ~/.cache/rskdist/kernels."""
    if os.environ.get("RSKDIST_KERNEL_CACHE"):
        return Path(os.environ["RSKDIST_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rskdist" / "kernels"


class NativeKernel:
    """The C kernel: where it is built, with what, and the library once loaded.

    cc: the compiler (default: `find_compiler()`; "" means none). cache: the build cache
    (default: `default_cache()`, read when the kernel is first built). flags: compiler
    flags (default FLAGS). Tests build their own instance into a private cache."""

    def __init__(self, *, cc: str | None = None, cache: Path | str | None = None, flags=FLAGS):
        self._cc, self._cache, self.flags = cc, cache, tuple(flags)
        self._lock = threading.Lock()
        self._library = None

    @property
    def cc(self) -> str | None:
        return (find_compiler() if self._cc is None else self._cc) or None

    @property
    def cache(self) -> Path:
        return default_cache() if self._cache is None else Path(self._cache)

    def why_not(self) -> str | None:
        """None if the kernel can run here, else why not (nothing is built by asking)."""
        if self._library is not None or self.cc is not None:
            return None
        return "no C compiler (set CC, or install gcc or clang)"

    def library_path(self) -> Path:
        """The cache file of this source, compiler, flags and CPU."""
        version = subprocess.run([self.cc, "--version"], capture_output=True, text=True).stdout
        digest = hashlib.sha256()
        for part in [*(p.read_bytes() for p in SOURCES), version.encode(), " ".join(self.flags).encode(),
                     _cpu_key().encode()]:
            digest.update(part)
        return self.cache / f"rsk_rows-{digest.hexdigest()[:16]}.so"

    def build(self, target: Path) -> None:
        """Compile the kernel to `target` (atomically: a temporary file renamed into place),
        then drop all but the newest KEEP_BUILDS kernels of the folder."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
        try:
            done = subprocess.run([self.cc, *self.flags, "-o", tmp, str(SOURCES[0])], capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no output"])[0]
                raise RuntimeError(f"C compile failed ({self.cc}): {first}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        prune(target.parent, keep=target)

    def load(self):
        """The kernel library (built on first use); RuntimeError says why it cannot be had."""
        with self._lock:
            if self._library is not None:
                return self._library
            if self.cc is None:
                raise RuntimeError("no C compiler (set CC, or install gcc or clang)")
            path = self.library_path()
            if not path.exists():
                try:
                    self.build(path)
                except OSError:  # a cache that cannot be written: build into a private temporary one
                    path = Path(tempfile.gettempdir()) / f"rskdist-kernels-{os.getuid()}" / path.name
                    if not path.exists():
                        self.build(path)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                if path.exists():
                    raise
                self.build(path)  # pruned by another process's build before this load: build again
                lib = ctypes.CDLL(str(path))
            if lib.rsk_rows_abi() != ABI:
                raise RuntimeError(f"{path} is not the kernel this rskdist calls; delete it to rebuild")
            for fn in (lib.rsk_rows_f32, lib.rsk_rows_f64):
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.POINTER(_Args), ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
            self._library = lib
            return lib

    def block_loss_and_grad(self, sim_qr: torch.Tensor, q: torch.Tensor, items, opts, scale: float,
                            need_grad: bool, out: torch.Tensor | None = None):
        """Loss of a block of queries (times `scale`) and d loss / d sim_qr (bq, B), from the
        real similarity rows; `items` is rsk._ExtendedItems (positives, SiMix columns). The
        gradient is written into `out` when given (rows of unit stride), else a new tensor."""
        return _block_loss_and_grad(self.load(), sim_qr, q, items, opts, scale, need_grad, out)


def prune(folder: Path, *, keep: Path, newest: int = KEEP_BUILDS) -> None:
    """Delete all but the `newest` kernels (by modification time) of `folder`, never `keep`.
    A kernel another process has loaded stays mapped; one deleted before its load is
    rebuilt by `NativeKernel.load`."""
    builds = sorted(folder.glob("rsk_rows-*.so"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in [p for p in builds if p != keep][max(newest - 1, 0):]:
        try:
            old.unlink()
        except OSError:
            pass


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="rsk-native")
    return _POOL[threads]


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


class _Layout:
    """Where the kernel keeps the extended items of a query (positions 0..N-1).

    With SiMix: class by class, each class's real items then its virtual ones, so that a
    virtual item is built from parents a few places away and folded back there. Classes
    come in the order of their first image in the batch: on the batches of the class-
    balanced sampler (groups of m images of a class, rskdist/data/sampler.py) the real
    items' reads of the similarity row and writes of its gradient then also go forward
    through the batch. Without SiMix: batch order (nothing to fold)."""

    def __init__(self, items, dtype: torch.dtype):
        n_real = items.num_real
        if items.num_virtual == 0:
            self.where = torch.arange(n_real)
            self.real_at = self.real_col = self.where
            self.virt_at = self.first = self.second = self.alpha = None
            return
        labels = items.labels.cpu()
        _, cls = torch.unique(labels, return_inverse=True)
        first_seen = torch.full((int(cls.max()) + 1,), n_real).scatter_reduce(0, cls, torch.arange(n_real), "amin")
        key = first_seen[torch.cat([cls, cls[items.first.cpu()]])]
        order = torch.argsort(key, stable=True)  # per class: real items in batch order, then virtual
        self.where = torch.empty_like(order)
        self.where[order] = torch.arange(order.numel())
        self.real_at = torch.nonzero(order < n_real).flatten()
        self.real_col = order[self.real_at].contiguous()
        self.virt_at = self.where[n_real:].contiguous()
        self.first = self.where[items.first.cpu()].contiguous()
        self.second = self.where[items.second.cpu()].contiguous()
        self.alpha = items.alpha.cpu().to(dtype).contiguous()


def layout(items, dtype: torch.dtype) -> _Layout:
    """The layout of `items` for `dtype`, made once per item set (it serves every block)."""
    cached = getattr(items, "_native_layout", None)
    if cached is None or cached[0] != dtype:
        cached = (dtype, _Layout(items, dtype))
        items._native_layout = cached
    return cached[1]


def _block_loss_and_grad(lib, sim_qr: torch.Tensor, q: torch.Tensor, items, opts, scale: float, need_grad: bool,
                         out: torch.Tensor | None):
    dtype = sim_qr.dtype
    if dtype not in (torch.float32, torch.float64) or sim_qr.device.type != "cpu":
        raise TypeError(f"the native kernel takes float32/float64 CPU rows, got {dtype} on {sim_qr.device}")
    if sim_qr.stride(1) != 1:
        sim_qr = sim_qr.contiguous()
    fn = lib.rsk_rows_f32 if dtype == torch.float32 else lib.rsk_rows_f64
    lay = layout(items, dtype)
    pos, _, num_pos = items.positives(q)
    pos, num_pos, q = lay.where[pos].contiguous(), num_pos.contiguous(), lay.where[q].contiguous()
    ks = torch.tensor(opts.ks, dtype=torch.float64)
    tau1_k = torch.tensor(opts.tau1_per_k(), dtype=torch.float64)
    rows = sim_qr.shape[0]
    dsim = None
    if need_grad:
        usable = out is not None and out.dtype == dtype and out.shape == sim_qr.shape and out.stride(1) == 1
        dsim = out if usable else torch.empty(rows, items.num_real, dtype=dtype)
    args = _Args(
        sim=sim_qr.data_ptr(), sim_stride=sim_qr.stride(0), n_real=items.num_real, n_virtual=items.num_virtual,
        real_at=_ptr(lay.real_at), real_col=_ptr(lay.real_col), virt_at=_ptr(lay.virt_at), first=_ptr(lay.first),
        second=_ptr(lay.second), alpha=_ptr(lay.alpha), q=q.data_ptr(), pos=pos.data_ptr(), width=pos.shape[1],
        num_pos=num_pos.data_ptr(), ks=ks.data_ptr(), num_ks=len(opts.ks), tau1=tau1_k.data_ptr(),
        tau2=opts.tau2, count_self=int(opts.count_self), scale=scale, dsim=_ptr(dsim),
        dsim_stride=0 if dsim is None else dsim.stride(0),
    )

    def run(r0: int, r1: int) -> float:  # the library is called without the GIL (ctypes.CDLL)
        loss = ctypes.c_double(0.0)
        if fn(ctypes.byref(args), r0, r1, ctypes.byref(loss)) == RSK_ENOMEM:
            raise MemoryError(f"RS@k native kernel: out of memory for the scratch rows of {items.num} items")
        return loss.value

    threads = max(1, min(torch.get_num_threads(), rows))
    bounds = [(rows * i // threads, rows * (i + 1) // threads) for i in range(threads)]
    if threads == 1:
        parts = [run(0, rows)]
    else:
        parts = list(_pool(threads).map(lambda b: run(*b), bounds))
    return sim_qr.new_tensor(sum(parts)), dsim
