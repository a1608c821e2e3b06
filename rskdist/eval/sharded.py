"""Exact retrieval metrics with the gallery sharded over ranks: each rank holds N/W rows.

Replicated evaluation (rskdist.eval.metrics) gives every rank all N embeddings and splits
the queries; its memory per rank grows with N. Here rank r holds only its own rows (any
subset of the gallery, each row with a global id that breaks ties) and:

1. every rank learns the ids and labels of all rows (16 bytes a row: the only O(N) state);
2. queries go in blocks; the rank that holds a block broadcasts its embeddings;
3. every rank ranks the block exactly against its own rows (ExactSearch, the same
   (exact score desc, lower index) order as one process, local rows sorted by id) and
   returns its first k_need neighbours with their exact float64 scores
   (neighbors.fixed_order_dot) and global positions;
4. the block's holder merges the W lists by (exact score desc, lower id): the first
   k_need of W exact lists are the first k_need of the whole gallery, in the order one
   process gives them; it then writes each query's metric values;
5. every rank's sums are split into exact float64 partials (``exact_partials``) and the
   final means are ``math.fsum`` over all of them: the exactly rounded sum of every
   per-query value, as one process computes it.

So every rank returns the single-process dict bit for bit (tie-capped queries excepted,
as between world sizes of the replicated evaluation: docs/evaluation.md). Work per rank
is the replicated one (N/W x N scores); traffic is the query embeddings once (N x d) plus
W x k_need (id, score) pairs per query, gathered on the holder only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from rskdist.comm import comm_device, gather_objects, gather_rows, group_rank_and_size
from rskdist.eval.metrics import (
    METRICS,
    _encode_labels,
    check_request,
    metric_names,
    metrics_dict,
    neighbours_needed,
    relevant_in_gallery,
    write_query_values,
)
from rskdist.eval.neighbors import (
    MAX_TIE_CLUSTER,
    ExactSearch,
    _make_searcher,
    as_float32_matrix,
    warn_if_costly,
)

# Replicated evaluation holds N x d float32 on every rank; above this many gallery rows
# the trainer shards it instead (eval.shard_above; docs/evaluation.md has the plan).
SHARD_ABOVE = 1_000_000


def exact_partials(values: Sequence[float]) -> list[float]:
    """Floats whose exact sum equals the exact sum of ``values`` (at most ~40, usually 2-3).

    ``math.fsum`` rounds the exact sum once; the exact rest is summed again until it is
    zero. ``math.fsum`` over the partials of several sets is then the exactly rounded
    sum over the union: what one process gets from ``math.fsum`` over all values.
    """
    rest, out = list(values), []
    while True:
        p = math.fsum(rest)
        if p == 0.0:  # a non-zero sum of floats is at least 2**-1074, never rounded to 0
            return out
        out.append(p)
        rest.append(-p)


def _int_labels(labels, name: str) -> torch.Tensor:
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array for sharded evaluation; got {a.dtype} {a.shape} "
                         f"(map other labels to integers first)")
    return torch.from_numpy(a.astype(np.int64))


def _gather_cpu(x: torch.Tensor, group: ProcessGroup | None, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``x`` in rank order, on CPU (sent from where the backend needs)."""
    y, counts = gather_rows(x.to(comm_device(group, device)), group)
    return y.cpu(), counts


class _Shards:
    """Rows of every rank, in rank order (each rank's rows sorted by id): counts, ids."""

    def __init__(self, local_ids: torch.Tensor, group: ProcessGroup | None, name: str, device: torch.device):
        self.rank, self.world = group_rank_and_size(group)
        ids, counts = _gather_cpu(local_ids, group, device)
        self.counts, self.ids = counts, ids
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        # Dense position of each row in id order: the tie-break of one process.
        self.pos = torch.empty_like(ids)
        self.pos[torch.argsort(ids)] = torch.arange(ids.numel())
        if ids.numel() and int(torch.unique(ids).numel()) != ids.numel():
            raise ValueError(f"{name}: the same id is held twice (by one rank or by two); ids must be unique")

    def of(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        return x[self.offsets[rank] : self.offsets[rank + 1]]

    @property
    def total(self) -> int:
        return self.offsets[-1]


def _sort_by_id(emb: torch.Tensor, labels: torch.Tensor, ids, name: str, group) -> tuple:
    """Local rows sorted by id (ids default to positions in rank order)."""
    n = emb.shape[0]
    if labels.numel() != n:
        raise ValueError(f"{name}: {n} embeddings but {labels.numel()} labels")
    if ids is None:
        counts = gather_objects(n, group)
        rank, _ = group_rank_and_size(group)
        ids = torch.arange(n) + sum(counts[:rank])
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    if ids.numel() != n:
        raise ValueError(f"{name}: {n} embeddings but {ids.numel()} ids")
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return emb, labels, ids  # already in order (an evaluation stream's rows are): no copy
    order = torch.argsort(ids)
    return emb[order.to(emb.device)], labels[order], ids[order]


class ShardedRanker:
    """Exact ranked neighbours of queries held across ranks in a gallery held across ranks.

    ``gallery`` (n_r, d) float32 on the work device: this rank's rows, sorted by id;
    ``gallery_pos`` their dense positions (id order over all ranks), ``num_gallery`` the
    total. Every rank calls :meth:`rank` with the same ``k_need`` and query counts.
    """

    def __init__(self, gallery: torch.Tensor, gallery_pos: torch.Tensor, num_gallery: int, *, backend: str,
                 group: ProcessGroup | None, max_candidates: int, max_tie_cluster: int | None):
        self.gallery, self.num_gallery = gallery, num_gallery
        self.gallery_pos = gallery_pos.to(gallery.device)
        self.backend, self.group = backend, group
        self.rank, self.world = group_rank_and_size(group)
        self.max_candidates, self.max_tie_cluster = max_candidates, max_tie_cluster
        self.searcher = _make_searcher(backend, gallery, 1 << 25)  # built once, reused by every block
        self.comm = comm_device(group, gallery.device)
        self.num_rescored = 0

    def rank_queries(self, queries: torch.Tensor, k_need: list[torch.Tensor], loo: bool
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield, on the rank holding them, ``(rows, ids, capped)`` for blocks of this rank's
        queries: ``rows`` index ``queries``, ``ids`` (B, K) dense gallery positions in exact
        order (first k_need[row] valid) and ``capped`` (B,) bool. ``k_need[s]`` lists the
        neighbours each of rank s's queries needs (0: skip). With ``loo`` query j of a rank
        is its gallery row j and never its own neighbour."""
        dim = self.gallery.shape[1]
        for src in range(self.world):
            kn = k_need[src]
            order = torch.argsort(kn, stable=True)
            order = order[kn[order] > 0]
            start = 0
            while start < order.numel():
                # A block's merged lists (W x rows x k) stay within max_candidates.
                cost = torch.arange(1, order.numel() - start + 1) * kn[order[start:]] * self.world
                rows = max(1, int((cost <= self.max_candidates).sum()))
                block_rows = order[start : start + rows]
                start += rows
                if src == self.rank:
                    block = queries[block_rows.to(queries.device)].to(self.comm)
                else:
                    block = torch.empty(rows, dim, dtype=torch.float32, device=self.comm)
                if self.world > 1:
                    dist.broadcast(block, src=dist.get_global_rank(self.group, src), group=self.group)
                self_rows = block_rows if loo and src == self.rank else None
                packed = self._local_top(block.to(self.gallery.device), kn[block_rows], self_rows)
                merged = self._merge_on(src, packed)
                if merged is not None:
                    yield (block_rows, *merged)

    def _local_top(self, block: torch.Tensor, k_need: torch.Tensor, self_rows) -> torch.Tensor:
        """(B, 2K + 1) float64: exact scores, dense ids, capped flag of this rank's first
        min(k_need, available) neighbours; padding -inf / num_gallery."""
        dev = self.gallery.device
        B, K = block.shape[0], int(k_need.max())
        scores = torch.full((B, K), -math.inf, dtype=torch.float64, device=dev)
        ids = torch.full((B, K), float(self.num_gallery), dtype=torch.float64, device=dev)
        capped = torch.zeros(B, dtype=torch.float64, device=dev)
        self_index = None if self_rows is None else self_rows.to(dev)
        search = ExactSearch(block, self.gallery, backend=self.backend, self_index=self_index,
                             max_candidates=self.max_candidates, max_tie_cluster=self.max_tie_cluster,
                             searcher=self.searcher)
        k_local = torch.clamp(k_need, max=search.num_available)
        for part in search.ranked(k_local):
            qi = part.query_idx
            take = min(part.ids.shape[1], K)
            ids_bk = part.ids[:, :take]
            valid = torch.arange(take, device=dev).unsqueeze(0) < k_local.to(dev)[qi].unsqueeze(1)
            if self.world > 1:  # alone, the list is final: no merge, no scores needed
                exact = search.rescore(qi, ids_bk, valid)  # float64 where valid
                scores[qi, :take] = torch.where(valid, exact, torch.full_like(exact, -math.inf))
            ids[qi, :take] = torch.where(valid, self.gallery_pos[ids_bk].double(), float(self.num_gallery))
            capped[qi] = part.capped.double()
        self.num_rescored += search.num_rescored
        return torch.cat([scores, ids, capped.unsqueeze(1)], dim=1)

    def _merge_on(self, src: int, packed: torch.Tensor):
        """Gather every rank's lists on ``src``; there, the first K by (score desc, id asc)."""
        K = (packed.shape[1] - 1) // 2
        if self.world > 1:
            packed = packed.to(self.comm)
            parts = [torch.empty_like(packed) for _ in range(self.world)] if src == self.rank else None
            dist.gather(packed, parts, dst=dist.get_global_rank(self.group, src), group=self.group)
            if src != self.rank:
                return None
            packed = torch.stack(parts).to(self.gallery.device)  # (W, B, 2K + 1)
        else:  # one list, already in exact order
            return packed[:, K : 2 * K].long(), packed[:, -1] > 0
        B = packed.shape[1]
        scores = packed[:, :, :K].permute(1, 0, 2).reshape(B, -1)
        ids = packed[:, :, K : 2 * K].permute(1, 0, 2).reshape(B, -1).long()
        perm = torch.argsort(ids, dim=1, stable=True)
        perm = torch.gather(perm, 1, torch.argsort(-torch.gather(scores, 1, perm), dim=1, stable=True))
        return torch.gather(ids, 1, perm)[:, :K], packed[:, :, -1].amax(dim=0) > 0


def _sharded_metrics(queries, q_codes: list[torch.Tensor], num_relevant: list[torch.Tensor], gallery,
                     g_shards: _Shards, g_codes: torch.Tensor, *, loo: bool, ks, metrics, backend, group,
                     max_candidates, max_tie_cluster) -> dict[str, float | int]:
    """q_codes / num_relevant: per rank, its queries' label codes and R; g_codes: the
    label code of every gallery position (dense, id order)."""
    rank = g_shards.rank
    n_avail = g_shards.total - (1 if loo else 0)
    k_need = [neighbours_needed(r, ks, metrics, n_avail) for r in num_relevant]
    all_k = torch.cat(k_need)
    if rank == 0:
        warn_if_costly(int(all_k.max()) if all_k.numel() else 0, int((all_k > 0).sum()))
    ranker = ShardedRanker(gallery, g_shards.of(rank, g_shards.pos), g_shards.total, backend=backend,
                           group=group, max_candidates=max_candidates, max_tie_cluster=max_tie_cluster)
    dev = gallery.device
    names = metric_names(ks, metrics)
    g_codes = torch.cat([g_codes, torch.tensor([-1])]).to(dev)  # position num_gallery: padding, never relevant
    my_codes, my_r = q_codes[rank].to(dev), num_relevant[rank].to(dev)
    per_query = torch.zeros(len(names), my_codes.numel(), dtype=torch.float64, device=dev)
    num_capped = 0
    for rows, ids, capped in ranker.rank_queries(queries, k_need, loo):
        rows = rows.to(dev)
        rel_bk = g_codes[ids] == my_codes[rows].unsqueeze(1)
        write_query_values(per_query, names, rows, rel_bk, my_r[rows], ks)
        num_capped += int(capped.sum())
    partials = [exact_partials(v) for v in per_query.cpu().tolist()]
    everyone = gather_objects((partials, num_capped), group)
    sums = [math.fsum(p for parts, _ in everyone for p in parts[i]) for i in range(len(names))]
    valid = torch.cat(num_relevant) > 0
    return metrics_dict(names, sums, int(valid.sum()), int((~valid).sum()), sum(c for _, c in everyone),
                        max_tie_cluster, warn=rank == 0)


def sharded_retrieval_metrics(
    embeddings,
    labels,
    *,
    ids=None,
    group: ProcessGroup | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = METRICS,
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_candidates: int = 1 << 22,
    max_tie_cluster: int | None = MAX_TIE_CLUSTER,
) -> dict[str, float | int]:
    """Leave-one-out metrics of the set whose rows the ranks of ``group`` hold between them.

    Each rank passes its own rows: ``embeddings`` (n_r, d), integer ``labels`` (n_r,) and
    ``ids`` (n_r,), unique over all ranks; the whole set is the rows in id order (ties go
    to the lower id). ``ids=None``: rank order (rank 0's rows first). Returns on every rank
    the dict :func:`rskdist.eval.retrieval_metrics` returns for the whole set, bit for bit.
    """
    ks, metrics, backend, dev = check_request(ks, metrics, backend, device, embeddings)
    emb = as_float32_matrix(embeddings, "embeddings").to(dev)
    emb, lab, ids = _sort_by_id(emb, _int_labels(labels, "labels"), ids, "embeddings", group)
    shards = _Shards(ids, group, "ids", dev)
    all_lab, _ = _gather_cpu(lab, group, dev)
    (codes,) = _encode_labels(all_lab)
    num_relevant = torch.bincount(codes)[codes] - 1 if codes.numel() else codes
    g_codes = torch.empty_like(codes)
    g_codes[shards.pos] = codes
    per_rank = [shards.of(r, codes) for r in range(shards.world)]
    return _sharded_metrics(emb, per_rank, [shards.of(r, num_relevant) for r in range(shards.world)], emb, shards,
                            g_codes, loo=True, ks=ks, metrics=metrics, backend=backend, group=group,
                            max_candidates=max_candidates, max_tie_cluster=max_tie_cluster)


def sharded_retrieval_metrics_qg(
    query_embeddings,
    query_labels,
    gallery_embeddings,
    gallery_labels,
    *,
    gallery_ids=None,
    group: ProcessGroup | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = METRICS,
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_candidates: int = 1 << 22,
    max_tie_cluster: int | None = MAX_TIE_CLUSTER,
) -> dict[str, float | int]:
    """Query-vs-gallery metrics with queries and gallery both spread over ``group``.

    Each rank passes its own queries (any share) and its own gallery rows with
    ``gallery_ids`` (unique over all ranks; None: rank order). Every rank returns the dict
    :func:`rskdist.eval.retrieval_metrics_qg` returns for all queries against the whole
    gallery in id order, bit for bit.
    """
    ks, metrics, backend, dev = check_request(ks, metrics, backend, device, query_embeddings, gallery_embeddings)
    q = as_float32_matrix(query_embeddings, "query_embeddings").to(dev)
    g = as_float32_matrix(gallery_embeddings, "gallery_embeddings").to(dev)
    dims = {d for d in gather_objects(q.shape[1] if q.shape[0] else None, group) if d is not None}
    dims |= {d for d in gather_objects(g.shape[1] if g.shape[0] else None, group) if d is not None}
    if len(dims) > 1:
        raise ValueError(f"query and gallery embeddings of different widths over the ranks: {sorted(dims)}")
    q_lab = _int_labels(query_labels, "query_labels")
    if q_lab.numel() != q.shape[0]:
        raise ValueError(f"query_embeddings: {q.shape[0]} embeddings but {q_lab.numel()} labels")
    g, g_lab, g_ids = _sort_by_id(g, _int_labels(gallery_labels, "gallery_labels"), gallery_ids, "gallery", group)
    shards = _Shards(g_ids, group, "gallery_ids", dev)
    all_q, q_counts = _gather_cpu(q_lab, group, dev)
    all_g, _ = _gather_cpu(g_lab, group, dev)
    q_codes, g_rank_codes = _encode_labels(all_q, all_g)
    num_relevant = relevant_in_gallery(q_codes, g_rank_codes)
    g_codes = torch.empty_like(g_rank_codes)
    g_codes[shards.pos] = g_rank_codes
    q_off = np.concatenate([[0], np.cumsum(q_counts)]).tolist()
    split = [slice(q_off[r], q_off[r + 1]) for r in range(shards.world)]
    return _sharded_metrics(q, [q_codes[s] for s in split], [num_relevant[s] for s in split], g, shards, g_codes,
                            loo=False, ks=ks, metrics=metrics, backend=backend, group=group,
                            max_candidates=max_candidates, max_tie_cluster=max_tie_cluster)
