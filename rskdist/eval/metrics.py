"""Retrieval metrics: Recall@k, MAP@R and R-precision (Musgrave et al., 2020).

Leave-one-out (every sample queries all the others) or query-vs-gallery. For a query
with R >= 1 relevant gallery items (same label; the query itself excluded):

* recall@k    = 1 if at least one relevant item is among the k nearest, else 0
                (k larger than the number of candidates means "all candidates").
* r_precision = (#relevant among the R nearest) / R
* map@r       = (1 / R) * sum_{i <= R, item i relevant} precision@i

Each is averaged over queries with R >= 1; queries with R == 0 (a class with no
other sample) are excluded from every metric and counted in
``num_excluded_queries``. Neighbours come from :mod:`rskdist.eval.neighbors` (exact,
ties broken by lower gallery index, identical for every backend; queries whose k-th
neighbour lies in a near-tie cluster larger than ``max_tie_cluster`` are exact only
down to that cluster and counted in ``num_tie_capped_queries``).

With a ``group`` of W > 1 ranks every rank passes the same full set, ranks its share of
the queries, and the per-query values are summed over ``group``; each per-query value is
computed by one rank in a fixed order and the means are exactly rounded sums
(``math.fsum``), so every rank returns the single-process dict, bit for bit.
``group=None`` is this process alone (rskdist.comm). rskdist.eval.sharded computes the
same dict when each rank holds only its part of the gallery.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from rskdist.comm import comm_device, group_rank_and_size
from rskdist.eval.neighbors import (
    MAX_TIE_CLUSTER,
    ExactSearch,
    as_float32_matrix,
    resolve_backend,
    warn_if_costly,
    warn_if_tie_capped,
    work_device,
)

METRICS = ("recall", "map_at_r", "r_precision")

# k lists per dataset as the RS@k paper's (CVPR 2022) result tables and the published code
# evaluate them (docs/method.md section 6); configs pick from here. Cars196 / CUB: the tables
# report 1, 2, 4, 8 and the code also evaluates 16.
DEFAULT_KS: dict[str, tuple[int, ...]] = {
    "inat": (1, 4, 16, 32),
    "sop": (1, 10, 100, 1000),
    "cars196": (1, 2, 4, 8, 16),
    "cub": (1, 2, 4, 8, 16),
    "vehicleid": (1, 5),
    "demo": (1, 2, 4, 8),
}


def default_ks(dataset: str) -> tuple[int, ...]:
    """The usual Recall@k list for ``dataset`` (a key of DEFAULT_KS)."""
    if dataset not in DEFAULT_KS:
        raise ValueError(f"no default k list for dataset {dataset!r}; known: {', '.join(DEFAULT_KS)}")
    return DEFAULT_KS[dataset]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {ks}")
    return tuple(sorted(set(ks)))


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; valid choices: {', '.join(METRICS)}")
    return tuple(metrics)


def _encode_labels(*label_sets) -> list[torch.Tensor]:
    """Map labels of any hashable dtype to dense int64 codes shared by all sets."""
    arrays = []
    for lab in label_sets:
        a = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
        if a.ndim != 1:
            raise ValueError(f"labels must be 1-D; got shape {a.shape}")
        arrays.append(a)
    _, codes = np.unique(np.concatenate(arrays), return_inverse=True)
    out, start = [], 0
    for a in arrays:
        out.append(torch.from_numpy(codes[start : start + len(a)].astype(np.int64)))
        start += len(a)
    return out


def _sum_over_ranks(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """all_reduce(SUM) from the device the group's backend needs (NCCL: CUDA, else CPU)."""
    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else x.device
    y = x.to(comm_device(group, cuda))
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y.to(x.device)


def metric_names(ks: tuple[int, ...], metrics: tuple[str, ...]) -> list[str]:
    """The output keys of the requested metrics, in the order the dict holds them."""
    names = [f"recall@{k}" for k in ks] if "recall" in metrics else []
    return names + [name for name, m in (("map@r", "map_at_r"), ("r_precision", "r_precision")) if m in metrics]


def neighbours_needed(num_relevant: torch.Tensor, ks: tuple[int, ...], metrics: tuple[str, ...],
                      num_available: int) -> torch.Tensor:
    """(N_q,) int64: how many leading neighbours of each query must be exact; 0 for the
    queries that do not count (R == 0). Recall needs max(ks) (all candidates at most),
    MAP@R and R-precision need R."""
    k_need = torch.full_like(num_relevant, min(max(ks), num_available) if "recall" in metrics else 0)
    if "map_at_r" in metrics or "r_precision" in metrics:
        k_need = torch.maximum(k_need, num_relevant)
    return torch.where(num_relevant > 0, k_need, torch.zeros_like(k_need))


def write_query_values(per_query: torch.Tensor, names: list[str], qi: torch.Tensor, rel_bk: torch.Tensor,
                       R: torch.Tensor, ks: tuple[int, ...]) -> None:
    """Each query's metric values into column ``qi`` of ``per_query`` (metrics, N_q) float64.

    ``rel_bk`` (B, K) says which of the exactly ranked neighbours are relevant; only the
    first k_need columns of a row are read, so any K >= k_need gives the same values.
    """
    row = {name: i for i, name in enumerate(names)}
    K = rel_bk.shape[1]
    for k in ks:
        if f"recall@{k}" in row:
            per_query[row[f"recall@{k}"], qi] = rel_bk[:, : min(k, K)].any(dim=1).double()
    if "map@r" not in row and "r_precision" not in row:
        return
    ranks = torch.arange(1, K + 1, device=rel_bk.device, dtype=torch.float64)  # (K,)
    rel_r = rel_bk & (ranks.unsqueeze(0) <= R.unsqueeze(1))  # relevant and within top R
    hits = rel_r.cumsum(dim=1, dtype=torch.float64)  # (B, K) relevant so far (integers)
    at_r = (R - 1).unsqueeze(1)  # (B, 1) column of rank R; K >= R
    if "map@r" in row:
        # A cumulative sum read at column R-1 adds the same terms in the same order
        # whatever K the chunk fetched.
        ap = ((hits / ranks) * rel_r).cumsum(dim=1)
        per_query[row["map@r"], qi] = ap.gather(1, at_r).squeeze(1) / R.double()
    if "r_precision" in row:
        per_query[row["r_precision"], qi] = hits.gather(1, at_r).squeeze(1) / R.double()


def metrics_dict(names: list[str], sums: list[float], num_valid: int, num_excluded: int, num_capped: int,
                 max_tie_cluster: int | None, warn: bool) -> dict[str, float | int]:
    """Means of exactly rounded per-query sums, and the query counts; ``warn`` on rank 0."""
    if warn:
        if num_valid == 0:
            warnings.warn("no query has a relevant item (all classes are singletons): metrics are NaN", stacklevel=4)
        warn_if_tie_capped(num_capped, num_valid, max_tie_cluster)
    out: dict[str, float | int] = {n: s / num_valid if num_valid else math.nan for n, s in zip(names, sums)}
    out["num_queries"] = num_valid
    out["num_excluded_queries"] = num_excluded
    out["num_tie_capped_queries"] = num_capped
    return out


def _metrics_from_search(search: ExactSearch, q_labels: torch.Tensor, g_labels: torch.Tensor,
                         num_relevant: torch.Tensor, ks: tuple[int, ...], metrics: tuple[str, ...],
                         group: ProcessGroup | None) -> dict[str, float | int]:
    """Per-query metric values over exact ranked chunks, summed over ranks. Labels are
    int64 on CPU; in a group of W ranks this rank ranks queries rank, rank + W, ..."""
    rank, world = group_rank_and_size(group)
    num_q = num_relevant.numel()
    valid = num_relevant > 0
    k_need = neighbours_needed(num_relevant, ks, metrics, search.num_available)
    if rank == 0:
        warn_if_costly(int(k_need.max()) if k_need.numel() else 0, int(valid.sum()))
    if world > 1:
        # Strided shares: class-sorted or shuffled sets alike give every rank a similar
        # mix of class sizes, hence of k_need and of work.
        mine = torch.arange(num_q) % world == rank
        k_need = torch.where(mine, k_need, torch.zeros_like(k_need))

    names = metric_names(ks, metrics)
    dev = search.queries.device
    q_labels, g_labels, num_relevant = q_labels.to(dev), g_labels.to(dev), num_relevant.to(dev)
    # (metrics, N_q) float64: each query's value is written by one rank only, so the
    # sum over ranks is exact and so is the final fsum, whatever the chunking.
    per_query = torch.zeros(len(names), num_q, dtype=torch.float64, device=dev)
    for part in search.ranked(k_need):
        qi = part.query_idx
        rel_bk = g_labels[part.ids] == q_labels[qi].unsqueeze(1)  # (B, K)
        write_query_values(per_query, names, qi, rel_bk, num_relevant[qi], ks)

    num_capped = torch.tensor([float(search.num_capped)], dtype=torch.float64, device=dev)
    if world > 1:
        packed = _sum_over_ranks(torch.cat([per_query.flatten(), num_capped]), group)
        per_query, num_capped = packed[:-1].view(len(names), num_q), packed[-1:]
    sums = [math.fsum(values) for values in per_query.cpu().tolist()]
    return metrics_dict(names, sums, int(valid.sum()), int((~valid).sum()), int(num_capped.item()),
                        search.max_tie_cluster, warn=rank == 0)


def check_request(ks: Sequence[int], metrics: Sequence[str], backend: str, device, *tensors):
    """The checked ks and metrics, the concrete backend and the work device."""
    ks, metrics = _check_ks(ks), _check_metrics(metrics)
    requested, backend = backend, resolve_backend(backend)
    return ks, metrics, backend, work_device(requested, backend, device, *tensors)


def retrieval_metrics(
    embeddings,
    labels,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = METRICS,
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_candidates: int = 1 << 22,
    max_tie_cluster: int | None = MAX_TIE_CLUSTER,
    group: ProcessGroup | None = None,
) -> dict[str, float | int]:
    """Leave-one-out retrieval metrics: each sample queries all the others by inner product.

    ``embeddings`` (N, d) and ``labels`` (N,) are torch tensors or numpy arrays (normalise
    the embeddings first for cosine similarity). Returns ``recall@k`` for each k,
    ``map@r``, ``r_precision`` (those requested in ``metrics``), ``num_queries`` (queries
    that count), ``num_excluded_queries`` (singleton classes) and
    ``num_tie_capped_queries`` (queries that hit ``max_tie_cluster``; None: no cap, at
    up to a whole-gallery search per query). ``backend``: auto (faiss_gpu if possible,
    else torch), faiss, faiss_cpu, faiss_gpu or torch; ``max_candidates`` bounds the
    number of (query, neighbour) pairs held at once.

    Distributed: every rank of ``group`` calls this with the same embeddings and labels,
    ranks 1/W of the queries, and gets the same dict, equal to the single-process one
    (``group=None``: this process alone). Warnings come from rank 0 only. A gallery too
    large for every rank to hold: rskdist.eval.sharded.
    """
    ks, metrics, backend, dev = check_request(ks, metrics, backend, device, embeddings)
    emb = as_float32_matrix(embeddings, "embeddings").to(dev)
    (lab,) = _encode_labels(labels)
    if lab.numel() != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings but {lab.numel()} labels")
    num_relevant = torch.bincount(lab)[lab] - 1  # other samples of the same class
    lab_dev = lab.to(dev)
    search = ExactSearch(
        emb, emb, backend=backend, self_index=torch.arange(emb.shape[0], device=dev), max_candidates=max_candidates,
        query_labels=lab_dev, gallery_labels=lab_dev, max_tie_cluster=max_tie_cluster,
    )
    return _metrics_from_search(search, lab, lab, num_relevant, ks, metrics, group)


def retrieval_metrics_qg(
    query_embeddings,
    query_labels,
    gallery_embeddings,
    gallery_labels,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = METRICS,
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_candidates: int = 1 << 22,
    max_tie_cluster: int | None = MAX_TIE_CLUSTER,
    group: ProcessGroup | None = None,
) -> dict[str, float | int]:
    """Query-vs-gallery retrieval metrics (separate query and gallery sets).

    Same keys and keywords as :func:`retrieval_metrics` (distributed use included); R
    is the number of gallery items with the query's label, and queries with R == 0 are
    excluded. Nothing is removed from the gallery, so a query that also sits in the
    gallery will find itself.
    """
    ks, metrics, backend, dev = check_request(ks, metrics, backend, device, query_embeddings, gallery_embeddings)
    q = as_float32_matrix(query_embeddings, "query_embeddings").to(dev)
    g = as_float32_matrix(gallery_embeddings, "gallery_embeddings").to(dev)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    q_lab, g_lab = _encode_labels(query_labels, gallery_labels)
    if q_lab.numel() != q.shape[0] or g_lab.numel() != g.shape[0]:
        raise ValueError("the number of labels must match the number of embeddings")
    search = ExactSearch(
        q, g, backend=backend, max_candidates=max_candidates, query_labels=q_lab.to(dev),
        gallery_labels=g_lab.to(dev), max_tie_cluster=max_tie_cluster,
    )
    return _metrics_from_search(search, q_lab, g_lab, relevant_in_gallery(q_lab, g_lab), ks, metrics, group)


def relevant_in_gallery(q_lab: torch.Tensor, g_lab: torch.Tensor) -> torch.Tensor:
    """(N_q,) int64: gallery items with each query's label (label codes, CPU)."""
    num_codes = int(torch.cat([q_lab, g_lab]).max()) + 1 if q_lab.numel() + g_lab.numel() else 0
    return torch.bincount(g_lab, minlength=num_codes)[q_lab]


def format_metrics_table(metrics: dict[str, float | int], title: str | None = None) -> str:
    """A two-column text table; fractions shown as percentages."""
    rows = [(name, f"{100 * v:6.2f}" if isinstance(v, float) else str(v)) for name, v in metrics.items()]
    width = max([len(n) for n, _ in rows] + [6])
    lines = [title] if title else []
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{n:<{width}}  {v:>6}" for n, v in rows]
    return "\n".join(lines)
