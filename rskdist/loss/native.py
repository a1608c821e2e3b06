"""The fused RS@k block as a C kernel built for this CPU (`impl="native"`).

`csrc/rsk_rows.c` computes, per query, the rank sums, the recall surrogate and d loss /
d similarity in one go over the query's similarity row (docs/loss.md, "Fused kernel"):
the (block x P x N) tensor is never formed, SiMix columns are built and folded inside
the kernel, and sigma' lives only in a (P x N) scratch row of the one query being worked
on. The loops are written so that the compiler vectorises them (AVX2: 8 floats).

It is compiled on first use with the system C compiler (`$CC`, else cc, gcc or clang),
`-O3 -march=native`, into a cache keyed by the source, the compiler and the CPU
(`$RSKDIST_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rskdist/kernels`, else
`~/.cache/rskdist/kernels`); ranks on one node that build at once each write their own
temporary file and rename it into place. It takes about a second. The library is loaded
with ctypes and called without the GIL: rows of a block are split over
`torch.get_num_threads()` threads.
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
# checked finite and every value stays finite); -std=gnu11 allows fused multiply-adds.
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-ffinite-math-only", "-fno-signed-zeros", "-fPIC", "-shared"]
ABI = 1  # rsk_rows_abi() of the source this module calls
# Keep sigma' of a query in scratch for the second pass while its P x N floats fit in
# this many bytes (the CPU caches); beyond it, evaluate sigma' again (docs/loss.md).
KEEP_MAX_BYTES = 4 << 20

_LOCK = threading.Lock()
_LIBRARY: list = []  # the loaded library, once
_POOL: dict[int, ThreadPoolExecutor] = {}


def compiler() -> str | None:
    """The C compiler that builds the kernel, or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get("RSKDIST_KERNEL_CACHE"):
        return Path(os.environ["RSKDIST_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rskdist" / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), version.encode(), " ".join(FLAGS).encode(),
                 _cpu_key().encode()]:
        digest.update(part)
    return cache_dir() / f"rsk_rows-{digest.hexdigest()[:16]}.so"


def build(cc: str, target: Path) -> None:
    """Compile the kernel to `target` (atomically: a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCES[0])], capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"C compile failed ({cc}): {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The kernel library (built on first use); RuntimeError says why it cannot be had."""
    with _LOCK:
        if _LIBRARY:
            return _LIBRARY[0]
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc or clang)")
        path = library_path(cc)
        if not path.exists():
            try:
                build(cc, path)
            except OSError:  # a cache that cannot be written: build into a private temporary one
                path = Path(tempfile.gettempdir()) / f"rskdist-kernels-{os.getuid()}" / path.name
                if not path.exists():
                    build(cc, path)
        lib = ctypes.CDLL(str(path))
        if lib.rsk_rows_abi() != ABI:
            raise RuntimeError(f"{path} is not the kernel this rskdist calls; delete it to rebuild")
        ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        for fn in (lib.rsk_rows_f32, lib.rsk_rows_f64):
            fn.restype = f64
            fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64,
                           f64, f64, ctypes.c_int, f64, ctypes.c_int, ptr, i64]
        _LIBRARY.append(lib)
        return lib


def available() -> str | None:
    """None if the kernel can run here, else why not (nothing is built by asking)."""
    if _LIBRARY:
        return None
    return None if compiler() is not None else "no C compiler (set CC, or install gcc or clang)"


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="rsk-native")
    return _POOL[threads]


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def block_loss_and_grad(sim_qr: torch.Tensor, q: torch.Tensor, items, opts, scale: float, need_grad: bool,
                        out: torch.Tensor | None = None, keep: bool | None = None):
    """Loss of a block of queries (times `scale`) and d loss / d sim_qr (bq, B), from the
    real similarity rows; `items` is rsk._ExtendedItems (positives, SiMix columns). The
    gradient is written into `out` when given (rows of unit stride), else a new tensor."""
    lib = load()
    dtype = sim_qr.dtype
    if dtype not in (torch.float32, torch.float64) or sim_qr.device.type != "cpu":
        raise TypeError(f"the native kernel takes float32/float64 CPU rows, got {dtype} on {sim_qr.device}")
    if sim_qr.stride(1) != 1:
        sim_qr = sim_qr.contiguous()
    fn = lib.rsk_rows_f32 if dtype == torch.float32 else lib.rsk_rows_f64
    pos, _, num_pos = items.positives(q)
    pos, num_pos, q = pos.contiguous(), num_pos.contiguous(), q.contiguous()
    width = pos.shape[1]
    n_real, n_virtual = items.num_real, items.num_virtual
    first = second = alpha = None
    if n_virtual:
        first, second, alpha = items.first, items.second, items.alpha.to(dtype).contiguous()
    if keep is None:
        keep = width * items.num * sim_qr.element_size() <= KEEP_MAX_BYTES
    ks = torch.tensor(opts.ks, dtype=torch.float64)
    rows = sim_qr.shape[0]
    dsim = None
    if need_grad:
        usable = out is not None and out.dtype == dtype and out.shape == sim_qr.shape and out.stride(1) == 1
        dsim = out if usable else torch.empty(rows, n_real, dtype=dtype)

    def run(r0: int, r1: int) -> float:
        return fn(sim_qr.data_ptr() + r0 * sim_qr.stride(0) * sim_qr.element_size(), sim_qr.stride(0), r1 - r0,
                  n_real, n_virtual, _ptr(first), _ptr(second), _ptr(alpha), q.data_ptr() + 8 * r0,
                  pos.data_ptr() + 8 * r0 * width, width, num_pos.data_ptr() + 8 * r0, ks.data_ptr(),
                  len(opts.ks), opts.tau1, opts.tau2, int(opts.count_self), scale, int(keep),
                  None if dsim is None else dsim.data_ptr() + r0 * dsim.stride(0) * dsim.element_size(),
                  dsim.stride(0) if dsim is not None else 0)

    threads = max(1, min(torch.get_num_threads(), rows))
    bounds = [(rows * i // threads, rows * (i + 1) // threads) for i in range(threads)]
    if threads == 1:
        parts = [run(0, rows)]
    else:
        parts = list(_pool(threads).map(lambda b: run(*b), bounds))
    if any(part != part for part in parts):  # NaN: the kernel could not allocate its scratch
        raise MemoryError("RS@k native kernel: out of memory for its scratch rows")
    return sim_qr.new_tensor(sum(parts)), dsim
