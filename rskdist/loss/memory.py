"""Peak added memory of one loss call (forward + backward) on a global batch: the one model
the trainer's start-up check (`check_loss_fits`) and the memory estimator
(rskdist/planning/memory.py, tools/estimate_memory.py) use.

N is the number of rows entering the loss: the global batch B, plus its mixed samples
with mix="embedding" (all same-class pairs, or `mix_pairs_per_class` of them).

RS@k (`rsk_memory_bytes`) holds, besides the gathered fp32 rows and their gradient (8 N d
bytes; 16 N d with mix="embedding": the mixed rows and a normalised copy too), either the
whole S and dS (2 N^2 floats: one process, or mix="embedding", and within sim_cache_mb) or
one panel of this rank's similarity rows and their gradient (rskdist/loss/rsk.py), plus
the block buffers of the backend that runs (rskdist/loss/backends.py: eager's
(block x P x N) tensor, Triton's (block x N) rows, none for the native kernel, which
reads the rows in place). None of it grows faster than the batch.

PML's losses hold whole pair (N x N), triplet or (N x N x N) tensors:

    bytes = n2 * N^2 + n3 * N^3 [smooth_ap; triplet while N^3 < 2^31] + t * T [triplet]
            + nc * N * C [proxy losses] + 16 * N * d   (gathered rows, their gradient,
                                                        mixed rows, a normalised copy)

with T = sum over classes of n_c (n_c - 1) (N - n_c) the (anchor, positive, negative)
triplets PML enumerates, and the constants measured with tools/bench_loss.py (peak
resident memory above the inputs, CPU, fp32, m = 4, d = 512; docs/loss.md gives the
runs); each is the ratio at the largest measured batch, where its term dominates.
"""

from __future__ import annotations

from rskdist.loss.backends import BACKENDS, Backend, Backends
from rskdist.loss.rsk import DEFAULT_PANEL_ELEMS, DEFAULT_SIM_CACHE_MB

GB = 1e9
MB = 2**20

# Measured bytes per unit of each term (docs/loss.md, "Memory of the baselines").
MEMORY_COEFFICIENTS: dict[str, dict[str, float]] = {
    "contrastive": {"n2": 40.1},  # 160.5 MB at B = 2048
    "multi_similarity": {"n2": 92.8},  # 371.2 MB at B = 2048 (loss + miner)
    "triplet": {"n3": 1.0, "triplets": 66.8},  # boolean N^3 grid below 1290 rows; 799.6 MB at B = 2048
    "smooth_ap": {"n3": 22.6},  # 361.7 MB at B = 256, 2745.5 MB at 512
    "proxy_anchor": {"nc": 46.6},  # 1489.5 MB at B = 4096, C = 8192
    "norm_softmax": {"nc": 17.3},  # 551.9 MB at B = 4096, C = 8192
    "arcface": {"nc": 20.4},  # 650.3 MB at B = 4096, C = 8192
    "cosface": {"nc": 21.5},  # 720.4 MB at B = 4096, C = 8192
}

# PML enumerates all triplets in one N x N x N boolean tensor below this many elements,
# and anchor by anchor above it (pytorch_metric_learning.utils.loss_and_miner_utils).
_PML_VECTORISED_TRIPLETS = 2**31 - 1


def mixed_pairs(per_class: int, mix_pairs_per_class: int | None) -> int:
    """Mixed samples per class: all same-class pairs, or `mix_pairs_per_class` of them."""
    pairs = per_class * (per_class - 1) // 2
    return pairs if mix_pairs_per_class is None else min(pairs, mix_pairs_per_class)


def loss_items(batch: int, *, per_class: int = 4, mix: str = "none",
               mix_pairs_per_class: int | None = None) -> tuple[int, int]:
    """(N, n) rows entering the loss and rows per class: the batch, plus the mixed samples
    with mix="embedding"."""
    n = per_class + (mixed_pairs(per_class, mix_pairs_per_class) if mix == "embedding" else 0)
    return batch // per_class * n, n


def planned_backend(impl: str = "auto", device_type: str = "cpu", backends: Backends | None = None) -> Backend:
    """The backend record `impl` runs on a device of `device_type` where it is available
    (for planning another machine; the trainer passes the backend resolved on its device)."""
    backends = BACKENDS if backends is None else backends
    name = backends.auto.get(device_type, backends.fallback) if backends.check(impl) == "auto" else impl
    return backends.records[name]


def rsk_memory_bytes(batch: int, *, embed_dim: int, world_size: int = 1, per_class: int = 4, mix: str = "simix",
                     mix_pairs_per_class: int | None = None, impl: str = "auto", device_type: str = "cpu",
                     block_size: int | None = None, sim_cache_mb: float = DEFAULT_SIM_CACHE_MB,
                     panel_elems: int = DEFAULT_PANEL_ELEMS, backends: Backends | None = None) -> float:
    """Peak memory one RS@k call adds on one rank, in bytes (float32), for a global batch
    of `batch` with `per_class` images per class, run by backend `impl` on `device_type`."""
    backend = planned_backend(impl, device_type, backends)
    items, _ = loss_items(batch, per_class=per_class, mix=mix, mix_pairs_per_class=mix_pairs_per_class)
    whole = world_size == 1 or mix == "embedding"  # every rank computes the whole loss
    virtual = batch // per_class * mixed_pairs(per_class, mix_pairs_per_class) if mix == "simix" else 0
    num = items + virtual  # extended items: real and SiMix
    max_pos = per_class - 1 + (mixed_pairs(per_class, mix_pairs_per_class) if mix != "none" else 0)
    real_rows = items if whole else -(-items // world_size)  # this rank's real queries
    queries = real_rows + (virtual if whole else -(-virtual // world_size))
    linear = (16.0 if mix == "embedding" else 8.0) * items * embed_dim
    rows = block_size or backend.default_rows(device_type, num, max_pos)
    per_row = num * (max(max_pos, 1) if backend.per_positive else 1)
    blocks = backend.buffers * min(rows, queries) * per_row * 4
    dense = 2 * items * items * 4
    if whole and dense <= sim_cache_mb * MB:
        return float(linear + blocks + dense)
    panel_rows = max(rows, panel_elems // max(items, 1))
    return float(linear + blocks + 2 * min(panel_rows, real_rows) * items * 4)


def loss_memory_bytes(name: str, batch: int, *, embed_dim: int, num_classes: int = 0, mix: str = "none",
                      per_class: int = 4, mix_pairs_per_class: int | None = None, world_size: int = 1,
                      impl: str = "auto", device_type: str = "cpu", block_size: int | None = None) -> float:
    """Estimated peak memory one loss call adds, in bytes, for a global batch of `batch`
    with `per_class` images per class. `world_size` only matters for RS@k without
    embedding mixup (each rank then holds its share of the queries); every other loss is
    computed whole on every rank. `impl`, `device_type`, `block_size`: RS@k's backend
    (rskdist/loss/backends.py), the device it runs on and its block size (None: default)."""
    if name == "rsk":
        return rsk_memory_bytes(batch, embed_dim=embed_dim, world_size=world_size, per_class=per_class, mix=mix,
                                mix_pairs_per_class=mix_pairs_per_class, impl=impl, device_type=device_type,
                                block_size=block_size)
    items, n = loss_items(batch, per_class=per_class, mix=mix, mix_pairs_per_class=mix_pairs_per_class)
    linear = 16.0 * items * embed_dim
    if name not in MEMORY_COEFFICIENTS:
        raise ValueError(f"loss_memory_bytes: unknown loss {name!r}; known: rsk, {', '.join(MEMORY_COEFFICIENTS)}")
    c = MEMORY_COEFFICIENTS[name]
    total = linear + c.get("n2", 0.0) * items**2 + c.get("nc", 0.0) * items * max(num_classes, 1)
    if name == "triplet":
        triplets = items * (n - 1) * (items - n)
        cube = items**3
        total += c["triplets"] * triplets + (c["n3"] * cube if cube < _PML_VECTORISED_TRIPLETS else 0.0)
    else:
        total += c.get("n3", 0.0) * items**3
    return float(total)


def check_loss_fits(name: str, batch: int, *, embed_dim: int, num_classes: int = 0, mix: str = "none",
                    available_bytes: float, per_class: int = 4, mix_pairs_per_class: int | None = None,
                    world_size: int = 1, impl: str = "auto", device_type: str = "cpu",
                    block_size: int | None = None) -> float:
    """Raise ValueError, with the numbers, when one loss call on this global batch needs
    more than `available_bytes`; return the estimate otherwise."""
    kw = dict(embed_dim=embed_dim, num_classes=num_classes, mix=mix, per_class=per_class,
              mix_pairs_per_class=mix_pairs_per_class, world_size=world_size, impl=impl,
              device_type=device_type, block_size=block_size)
    need = loss_memory_bytes(name, batch, **kw)
    if need <= available_bytes:
        return need
    largest = largest_fitting_batch(name, available_bytes=available_bytes, **kw)
    what = {"smooth_ap": "its N x N x N tensors", "proxy_anchor": "its batch x classes matrices",
            "norm_softmax": "its batch x classes matrices", "arcface": "its batch x classes matrices",
            "cosface": "its batch x classes matrices",
            "triplet": "its triplet lists"}.get(name, "its B x B matrices")
    mixed = f" ({loss_items(batch, per_class=per_class, mix=mix, mix_pairs_per_class=mix_pairs_per_class)[0]} rows " \
            "with the mixed samples)" if mix == "embedding" else ""
    raise ValueError(
        f"loss.name={name} on a global batch of {batch}{mixed} needs about {need / GB:.1f} GB for {what}, "
        f"more than the {available_bytes / GB:.1f} GB available; the largest batch that fits is {largest}; "
        "use loss.name=rsk (linear memory) or a smaller data.global_batch"
    )


def largest_fitting_batch(name: str, *, available_bytes: float, per_class: int = 4, **kw) -> int:
    """The largest global batch (a multiple of per_class) whose estimate fits; 0 if none."""
    def fits(b: int) -> bool:
        return loss_memory_bytes(name, b, per_class=per_class, **kw) <= available_bytes

    lo, hi = 0, 1
    while fits(hi * per_class):
        lo, hi = hi, hi * 2
        if hi > 2**40:
            break
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * per_class) else (lo, mid)
    return lo * per_class
