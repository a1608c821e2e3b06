"""Exact inner-product k-nearest-neighbour search with backend-independent ranking.

Backends (faiss on GPU, faiss on CPU, blockwise torch matmul + topk) only *propose*
candidates with float32 scores. The final ranking is computed here, identically for
every backend:

* Order = descending exact score, ties broken by lower gallery index.
* "Exact score" = the float64 sum of the (exact) float64 products of the float32
  embeddings, added in a fixed pairwise tree. Every operation is a separate IEEE
  elementwise op, so the value is bit-identical on CPU and GPU, and equal
  embeddings or exactly tied dot products (quantised data) give equal values.
* A backend's float32 score differs from the real dot product by at most
  ``gamma_d * |q| * |x|`` (gamma_d = d u / (1 - d u), u = 2**-24) whatever its
  summation order. Candidates whose float32 scores lie within twice that bound of
  each other form a "cluster"; only clusters of two or more are re-scored exactly,
  everything else is already in its exact order.
* The candidate list is complete when the k-th item beats the last retrieved score
  by more than the bound; otherwise the query is searched once more with
  ``k_fetch + max(k_fetch, max_tie_cluster)`` candidates (up to the whole gallery).
* Work per query is bounded (at most two searches): a query whose near-tie cluster
  at the k-th position is still open after the retry, or already holds
  ``max_tie_cluster`` fetched members after the first search, is "tie-capped". Its
  ranking is exact down to the start of that cluster; inside it, the fetched members
  are ordered by exact score, then lower index, but unfetched gallery items of the
  same near-tie cluster may belong among them. Non-degenerate embeddings never reach
  the cap; collapsed ones (an untrained model) would otherwise re-search and re-score
  the whole gallery for every query. ``max_tie_cluster=None`` restores the unbounded
  exact search (retries double the candidates up to the whole gallery).

Memory stays bounded: queries are processed in chunks of at most
``max_candidates // k`` rows, and the torch backend scores at most
``torch_block_elems`` query x gallery entries at once (no N x N matrix).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

try:  # faiss is optional: the torch backend covers its absence.
    import faiss
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    faiss = None

BACKENDS = ("auto", "faiss", "faiss_cpu", "faiss_gpu", "torch")

# faiss on GPU selects at most this many neighbours per query (GPU_MAX_SELECTION_K).
FAISS_GPU_MAX_K = 2048
# Largest near-tie cluster at the k-th position resolved exactly (module docstring).
# Small enough that collapsed embeddings cost one search plus ~k re-scored pairs per
# query; non-degenerate data needs 32 float32-indistinguishable neighbours in a row.
MAX_TIE_CLUSTER = 32
# float64 re-scoring block on CPU: 2^18 values (2 MB) stay in cache; 2^23 ran 2.7x
# slower at d=128 (memory-bound temporaries). GPUs want large blocks.
RESCORE_BLOCK_ELEMS_CPU = 1 << 18
RESCORE_BLOCK_ELEMS_GPU = 1 << 23
_U32 = 2.0**-24
_U64 = 2.0**-53


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and a CUDA device is visible."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0 and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - some builds raise when no driver is present
        return False


def resolve_backend(backend: str = "auto") -> str:
    """Map ``auto``/``faiss`` to a concrete backend: faiss_gpu, faiss_cpu or torch.

    ``auto`` = faiss_gpu when faiss has GPU support and CUDA is visible, else torch
    (on CUDA when available). Not faiss_cpu: on the 2-core reference machine torch's
    MKL matmul + topk ran the same search in 2.6x less CPU time (docs/evaluation.md).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss_gpu" if faiss_gpu_available() else "torch"
    if backend in ("faiss", "faiss_cpu", "faiss_gpu") and faiss is None:
        raise ValueError(f"backend={backend!r} needs faiss (pip install faiss-cpu or faiss-gpu)")
    if backend == "faiss":
        return "faiss_gpu" if faiss_gpu_available() else "faiss_cpu"
    if backend == "faiss_gpu" and not faiss_gpu_available():
        raise ValueError("backend='faiss_gpu' needs a faiss build with GPU support and a CUDA device")
    return backend


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls at full precision: TF32 would break the float32 error bound."""
    old_flag = torch.backends.cuda.matmul.allow_tf32
    old_prec = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        torch.set_float32_matmul_precision(old_prec)


# ----------------------------------------------------------------------------- searchers
class _TorchSearcher:
    """Blockwise ``q @ g.T`` + topk on the gallery's device (float32, no TF32)."""

    def __init__(self, gallery: torch.Tensor, block_elems: int):
        self.gallery = gallery  # (N_g, d) float32 on the work device
        self.block_rows = max(1, block_elems // max(1, gallery.shape[0]))

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_s, out_i = [], []
        with _no_tf32():
            for start in range(0, q.shape[0], self.block_rows):
                sim_qg = q[start : start + self.block_rows] @ self.gallery.T  # (b, N_g)
                s, i = torch.topk(sim_qg, k, dim=1, largest=True, sorted=True)
                out_s.append(s)
                out_i.append(i)
        return torch.cat(out_s), torch.cat(out_i)


class _FaissCpuSearcher:
    """faiss IndexFlatIP (exhaustive, float32 BLAS) on CPU."""

    def __init__(self, gallery: torch.Tensor):
        self.index = faiss.IndexFlatIP(gallery.shape[1])
        self.index.add(np.ascontiguousarray(gallery.cpu().numpy(), dtype=np.float32))

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, i = self.index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        return torch.from_numpy(s).to(q.device), torch.from_numpy(i).to(q.device)


class _FaissGpuSearcher:
    """faiss brute-force ``knn_gpu`` (float32 cuBLAS, no reduced precision) per query chunk.

    knn_gpu streams the gallery per call instead of keeping a GPU index, which avoids
    the temporary-memory failures seen with large GPU indexes. Requests above faiss's
    selection limit go to the torch searcher on the same GPU.
    """

    def __init__(self, gallery: torch.Tensor, block_elems: int):
        self.res = faiss.StandardGpuResources()
        self.gallery_np = np.ascontiguousarray(gallery.cpu().numpy(), dtype=np.float32)
        self.device = gallery.device.index if gallery.device.type == "cuda" else -1
        self.fallback = _TorchSearcher(gallery, block_elems)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k > FAISS_GPU_MAX_K:
            return self.fallback.search(q, k)
        s, i = faiss.knn_gpu(
            self.res,
            np.ascontiguousarray(q.cpu().numpy()),
            self.gallery_np,
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
            device=-1 if self.device is None else self.device,
        )
        return torch.from_numpy(s).to(q.device), torch.from_numpy(i).to(q.device)


def work_device(requested: str, backend: str, device: str | torch.device | None, *tensors) -> torch.device:
    """Where search, re-scoring and metrics run: ``device`` if given; the GPU for
    faiss_gpu; for torch, the inputs' CUDA device, else CUDA when the backend was
    chosen automatically, else the CPU."""
    if device is not None:
        return torch.device(device)
    if backend == "faiss_gpu":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "torch":
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                return t.device
        if requested == "auto" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _make_searcher(backend: str, gallery: torch.Tensor, block_elems: int):
    if backend == "torch":
        return _TorchSearcher(gallery, block_elems)
    if backend == "faiss_cpu":
        return _FaissCpuSearcher(gallery)
    if backend == "faiss_gpu":
        return _FaissGpuSearcher(gallery, block_elems)
    raise AssertionError(backend)


# ------------------------------------------------------------------------ exact re-scoring
def fixed_order_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products (P, d) x (P, d) -> (P,) float64, bit-identical on any device.

    float32 x float32 products are exact in float64; they are then added in a fixed
    pairwise tree (zero padding to a power of two is exact), one IEEE op per element.
    """
    p = a.to(torch.float64, copy=True).mul_(b)  # (P, d) exact products; b cast on the fly
    d = p.shape[1]
    width = 1 << max(0, (d - 1).bit_length())
    if width != d:
        p = torch.nn.functional.pad(p, (0, width - d))
    # In place, same tree as p[:, :h] + p[:, h:]: no temporaries per level.
    while width > 1:
        width //= 2
        p[:, :width].add_(p[:, width : 2 * width])
    return p[:, 0].clone()


def _bound_coeff(d: int) -> float:
    """Relative error bound of a float32 dot product of length d (any summation order,
    FMA or not) plus the float64 tree's own bound, with 1% slack."""
    gamma32 = d * _U32 / (1.0 - d * _U32)
    tree64 = max(1, math.ceil(math.log2(max(d, 2)))) * _U64
    return 1.01 * (gamma32 + tree64)


@dataclass
class _Ranked:
    query_idx: torch.Tensor  # (B,) positions in the query set
    ids: torch.Tensor  # (B, K) gallery indices in exact order; first k_need[b] are final
    scores: torch.Tensor  # (B, K) backend float32 scores in that order
    capped: torch.Tensor  # (B,) bool: tie-capped (exact only down to the k-th item's cluster)


class ExactSearch:
    """Exact ranked neighbours of queries in a gallery, one chunk of queries at a time.

    ``queries`` and ``gallery`` are (N, d) float32 on the work device. With
    ``self_index`` (LOO), query b's own gallery row ``self_index[b]`` is never returned.

    With ``query_labels``/``gallery_labels`` (int64, work device) only the *relevance
    sequence* is made exact: near-tied candidates that are all relevant or all
    irrelevant are not re-scored, since their order cannot change any metric. That
    saves most of the re-scoring for metrics; ``knn`` leaves the labels out.

    ``max_tie_cluster`` bounds the work per query (module docstring); ``num_capped``
    counts the queries that hit it, ``num_retries`` the re-searched queries and
    ``num_rescored`` the exactly re-scored (query, candidate) pairs.
    """

    def __init__(
        self,
        queries: torch.Tensor,
        gallery: torch.Tensor,
        *,
        backend: str,
        self_index: torch.Tensor | None = None,
        max_candidates: int = 1 << 22,
        torch_block_elems: int = 1 << 25,
        rescore_block_elems: int | None = None,
        query_labels: torch.Tensor | None = None,
        gallery_labels: torch.Tensor | None = None,
        max_tie_cluster: int | None = MAX_TIE_CLUSTER,
        searcher=None,
    ):
        if max_tie_cluster is not None and (isinstance(max_tie_cluster, bool) or max_tie_cluster < 1):
            raise ValueError(f"max_tie_cluster={max_tie_cluster!r} must be a positive integer or None (no cap)")
        self.queries, self.gallery = queries, gallery
        self.query_labels, self.gallery_labels = query_labels, gallery_labels
        self.self_index = self_index
        self.num_gallery, self.dim = gallery.shape
        self.max_candidates = max_candidates
        self.max_tie_cluster = max_tie_cluster
        if rescore_block_elems is None:
            on_gpu = queries.device.type == "cuda"
            rescore_block_elems = RESCORE_BLOCK_ELEMS_GPU if on_gpu else RESCORE_BLOCK_ELEMS_CPU
        self.rescore_rows = max(1, rescore_block_elems // max(1, self.dim))
        # A searcher built over this gallery may be passed in and reused across query sets.
        self.searcher = searcher if searcher is not None else _make_searcher(backend, gallery, torch_block_elems)
        # Per-query absolute error radius of a float32 score (see module docstring).
        # float32 norms are within d*u (~3e-5 relative) of the truth: inflate by 0.1%
        # rather than copying the gallery to float64.
        q_norm = queries.norm(dim=1).double() * 1.001
        g_norm_max = float(gallery.norm(dim=1).max()) * 1.001 if self.num_gallery else 0.0
        self.radius = _bound_coeff(self.dim) * q_norm * g_norm_max + 1e-30  # (N_q,) float64
        self.num_retries = 0
        self.num_rescored = 0
        self.num_capped = 0

    # The most neighbours a query can have (the gallery minus itself under LOO).
    @property
    def num_available(self) -> int:
        return self.num_gallery - (1 if self.self_index is not None else 0)

    def ranked(self, k_need: torch.Tensor) -> Iterator[_Ranked]:
        """Yield exact rankings for every query; ``k_need[b]`` (<= num_available) is how
        many leading neighbours must be exact for query b. Queries with k_need == 0
        are skipped. Chunks come in increasing order of k_need."""
        k_need = k_need.to(torch.int64).cpu()
        if k_need.numel() and int(k_need.max()) > self.num_available:
            raise AssertionError("k_need exceeds the number of available neighbours")
        order = torch.argsort(k_need, stable=True)
        order = order[k_need[order] > 0]
        fetch = self._fetch_k(k_need[order])  # (n,) non-decreasing
        start = 0
        while start < order.numel():
            # Largest chunk whose rows x fetched candidates (set by its last, largest
            # row) stays within the budget; at least one row.
            cost = torch.arange(1, order.numel() - start + 1) * fetch[start:]
            rows = max(1, int((cost <= self.max_candidates).sum()))
            idx = order[start : start + rows]
            start += rows
            yield from self._rank_chunk(idx.to(self.queries.device), k_need[idx].to(self.queries.device))

    def _fetch_k(self, k):
        """Neighbours to request for k exact ones: a margin, plus one for the query itself."""
        extra = (1 if self.self_index is not None else 0)
        if isinstance(k, torch.Tensor):
            return torch.clamp(k + torch.clamp(k // 8, min=8) + extra, max=self.num_gallery)
        return min(self.num_gallery, k + max(8, k // 8) + extra)

    def _rank_chunk(self, idx: torch.Tensor, k_need: torch.Tensor) -> Iterator[_Ranked]:
        cap = self.max_tie_cluster
        pending = [(idx, k_need, self._fetch_k(int(k_need.max())), False)]
        while pending:
            idx, k_need, k_fetch, retried = pending.pop()
            rows = max(1, self.max_candidates // k_fetch)  # the budget holds on retries too
            if idx.numel() > rows:
                pending.append((idx[rows:], k_need[rows:], k_fetch, retried))
                idx, k_need = idx[:rows], k_need[:rows]
            ranked, ok, tie_size = self._try_rank(idx, k_need, k_fetch)
            if bool(ok.all()):
                yield ranked
                continue
            capped = torch.zeros_like(ok)
            if cap is None:
                # Unbounded: double the candidates until the near-tie cluster closes (at
                # the whole gallery it does).
                done, next_fetch = ok, 2 * k_fetch
            else:
                # One retry, with at least `cap` more candidates so that a cluster still
                # open afterwards holds about `cap` fetched members; a cluster that
                # already does is not worth a second search over the whole gallery.
                capped = ~ok & (tie_size >= cap) if not retried else ~ok
                self.num_capped += int(capped.sum())
                done, next_fetch = ok | capped, k_fetch + max(k_fetch, cap)
            yield _Ranked(ranked.query_idx[done], ranked.ids[done], ranked.scores[done], capped[done])
            again = ~done
            if bool(again.any()):
                self.num_retries += int(again.sum())
                pending.append((idx[again], k_need[again], min(self.num_gallery, next_fetch), True))

    def _try_rank(self, idx: torch.Tensor, k_need: torch.Tensor, k_fetch: int):
        dev = idx.device
        s, ids = self.searcher.search(self.queries[idx], k_fetch)  # (B, k_fetch) float32 / int64
        s, ids = s.to(dev), ids.to(dev)
        if bool((ids < 0).any()):
            raise RuntimeError("search returned missing neighbours (non-finite embeddings?)")
        complete = k_fetch >= self.num_gallery
        thr = s.min(dim=1).values.double()  # every non-retrieved item scores <= thr (float32)
        # Re-sort by float32 score (backends return sorted lists; this makes it certain).
        s, perm = torch.sort(s, dim=1, descending=True, stable=True)
        ids = torch.gather(ids, 1, perm)
        if self.self_index is not None:
            # Drop the query itself, or the last column when it was not retrieved.
            is_self = ids == self.self_index[idx].unsqueeze(1)
            is_self[:, -1] |= ~is_self.any(dim=1)
            keep = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :-1]
            s, ids = torch.gather(s, 1, keep), torch.gather(ids, 1, keep)
        B, K = ids.shape
        s64 = s.double()
        tol = 2.0 * self.radius[idx].unsqueeze(1)  # (B, 1): gap that guarantees the order
        # Clusters: maximal runs whose consecutive float32 scores are within tol.
        brk = (s64[:, :-1] - s64[:, 1:]) > tol  # (B, K-1)
        cid = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=dev), brk.cumsum(1)], dim=1)
        c_k = torch.gather(cid, 1, (k_need - 1).unsqueeze(1))  # (B, 1) cluster of the k-th item
        # Fetched members of that cluster; when the list is incomplete it is the last one.
        tie_size = (cid >= c_k).sum(dim=1)  # (B,)
        # Is the candidate list complete for the first k_need items?
        if complete:
            ok = torch.ones(B, dtype=torch.bool, device=dev)
        else:
            c_min = torch.where(cid == c_k, s64, torch.full_like(s64, math.inf)).min(dim=1).values
            ok = (c_min - thr) > tol.squeeze(1)
        # Exact scores for members of near-tie clusters (size >= 2) that reach into the
        # first k_need positions; later clusters cannot move into them.
        if K > 1:
            tied = torch.zeros(B, K, dtype=torch.bool, device=dev)
            tied[:, :-1] |= ~brk
            tied[:, 1:] |= ~brk
            tied &= cid <= c_k
            if self.query_labels is not None:
                # Only clusters that mix relevant and irrelevant items matter for metrics.
                rel = (self.gallery_labels[ids] == self.query_labels[idx].unsqueeze(1)).to(torch.int64)
                pos_c = torch.zeros_like(rel).scatter_add_(1, cid, rel)  # relevant per cluster
                size_c = torch.zeros_like(rel).scatter_add_(1, cid, torch.ones_like(rel))
                mixed_c = (pos_c > 0) & (pos_c < size_c)
                tied &= torch.gather(mixed_c, 1, cid)
            r = self.rescore(idx, ids, tied)
        else:
            r = torch.zeros(B, K, dtype=torch.float64, device=dev)
        # Final order: cluster, then exact score (desc), then gallery index (asc).
        perm = torch.argsort(ids, dim=1, stable=True)
        perm = torch.gather(perm, 1, torch.argsort(-torch.gather(r, 1, perm), dim=1, stable=True))
        perm = torch.gather(perm, 1, torch.argsort(torch.gather(cid, 1, perm), dim=1, stable=True))
        capped = torch.zeros(B, dtype=torch.bool, device=dev)
        return _Ranked(idx, torch.gather(ids, 1, perm), torch.gather(s, 1, perm), capped), ok, tie_size

    def rescore(self, idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) float64: exact scores where ``mask``, 0 elsewhere."""
        r = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
        rows, cols = mask.nonzero(as_tuple=True)
        self.num_rescored += rows.numel()
        if rows.numel() == 0:
            return r
        q_rows, g_rows = idx[rows], ids[rows, cols]
        vals = torch.empty(rows.numel(), dtype=torch.float64, device=ids.device)
        for a in range(0, rows.numel(), self.rescore_rows):
            b = a + self.rescore_rows
            # index_select gathers rows ~3x faster than advanced indexing on CPU.
            q_pd = torch.index_select(self.queries, 0, q_rows[a:b])  # (P, d)
            g_pd = torch.index_select(self.gallery, 0, g_rows[a:b])
            vals[a:b] = fixed_order_dot(q_pd, g_pd)
        r[rows, cols] = vals
        return r


# ------------------------------------------------------------------------------ public API
def as_float32_matrix(x, name: str) -> torch.Tensor:
    """Torch tensor or numpy array (N, d) -> contiguous float32 torch tensor (same device)."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, d); got shape {tuple(t.shape)}")
    t = t.to(torch.float32).contiguous()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def knn(
    queries,
    gallery=None,
    k: int = 1,
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_candidates: int = 1 << 22,
    max_tie_cluster: int | None = MAX_TIE_CLUSTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by inner product, ties broken by lower gallery index.

    With ``gallery=None`` this is leave-one-out on ``queries`` (a query never returns
    itself). Returns ``(ids, scores)``, both (N_q, k) on CPU: int64 gallery indices in
    the exact order, and the backend's float32 scores (the order is backend-independent,
    the scores may differ by float32 rounding). Queries whose k-th neighbour sits in a
    near-tie cluster of ``max_tie_cluster`` or more candidates are only exact down to
    that cluster (a warning says how many; module docstring); ``None`` lifts the cap.
    """
    requested, backend = backend, resolve_backend(backend)
    dev = work_device(requested, backend, device, queries, gallery)
    q = as_float32_matrix(queries, "queries").to(dev)
    loo = gallery is None
    g = q if loo else as_float32_matrix(gallery, "gallery").to(dev)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}")
    self_index = torch.arange(q.shape[0], device=dev) if loo else None
    search = ExactSearch(
        q, g, backend=backend, self_index=self_index, max_candidates=max_candidates, max_tie_cluster=max_tie_cluster
    )
    if not 1 <= k <= search.num_available:
        raise ValueError(f"k={k} must be in [1, {search.num_available}] (available neighbours)")
    ids = torch.empty(q.shape[0], k, dtype=torch.int64)
    scores = torch.empty(q.shape[0], k, dtype=torch.float32)
    for part in search.ranked(torch.full((q.shape[0],), k)):
        ids[part.query_idx.cpu()] = part.ids[:, :k].cpu()
        scores[part.query_idx.cpu()] = part.scores[:, :k].cpu()
    warn_if_tie_capped(search.num_capped, q.shape[0], max_tie_cluster)
    return ids, scores


def warn_if_tie_capped(num_capped: int, num_queries: int, max_tie_cluster: int | None) -> None:
    if num_capped:
        warnings.warn(
            f"{num_capped} of {num_queries} queries have a near-tie cluster of max_tie_cluster="
            f"{max_tie_cluster} or more float32-indistinguishable candidates at their k-th neighbour "
            f"(collapsed or near-duplicate embeddings?): their neighbours are exact only down to that "
            f"cluster; max_tie_cluster=None resolves it at up to a whole-gallery search per query",
            stacklevel=3,
        )


def warn_if_costly(k_max: int, num_queries: int) -> None:
    if k_max > 4096:
        warnings.warn(
            f"MAP@R needs the {k_max} nearest neighbours for the largest class; the cost "
            f"grows with class size (queries from that class search and rank that many).",
            stacklevel=3,
        )
