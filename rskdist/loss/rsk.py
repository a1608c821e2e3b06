"""Blockwise RS@k (recall@k surrogate) with SiMix, exact and memory-bounded.

Notation (docs/method.md section 1): for query q and positive p,

    rank(q,p) = 1 + sum_{z != q, p} sigmoid((s_qz - s_qp) / tau2)
    R_k(q)    = min(sum_p sigmoid((k - rank(q,p)) / tau1), k) / min(k, |P(q)|)
    loss      = mean_q [1 - mean_k R_k(q)]

tau1 is one temperature for every k, or "k": tau1 = k for each k (the published code's
default from 2022 to late 2024).

How it is computed
- Items live in an *extended* index space: the B real samples, then V virtual (SiMix)
  samples. Similarities to virtual items are combined from real ones
  (s(q, v) = a s(q, i) + (1 - a) s(q, j)), so every matrix product runs over the B
  real embeddings only; virtual items cost scalar work.
- Queries are processed in blocks of `block_size` rows. For a block we form its
  similarity rows against all N = B + V items and hand them to a block function
  (rskdist/loss/blocks.py, chosen by rskdist/loss/backends.py), which returns the block's
  loss and d loss / d similarity; nothing of size B x B x P is ever stored.
- The gradient with respect to the embeddings is computed during the forward call
  (the loss is always followed by its backward in training) and handed to autograd.
- Similarity rows come from one of two sources, behind one small interface (`begin` a
  panel, `rows` of a block of its real queries, `mixed_rows` of a block of its virtual
  queries, `push`/`push_mixed` their d loss / d similarity back, `end` the panel,
  `gradient` at the end), so the block loop reads once for both. A panel (`_Panel`) is
  a set of real rows holding whole classes; a virtual (SiMix) query's row is the mixture
  a row(i) + (1 - a) row(j) of its parents' rows in the panel of its class, and its
  gradient flows back to them the same way:
  * "dense": S = E E^T is kept whole, d loss / d S is accumulated whole, and the
    embedding gradient is one product (dS + dS^T) E. Two B x B x d products in all;
    used when both B x B buffers fit in `sim_cache_mb` and every real row is a query.
  * "stream": rows are formed per panel (E_p E^T) and gradients pushed out per panel
    (dS_p E and dS_p^T E_p): three products over real rows only (virtual queries cost
    none), memory O(panel x B + block x P x N + B x d).
- Everything is accumulated in float32 (or float64 when the embeddings are float64):
  with tau2 = 0.01, bf16 similarities are far too coarse for the sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rskdist.loss.backends import BACKENDS, Backends

DEFAULT_SIM_CACHE_MB = 256.0
# Similarity rows per panel in the stream path: 8M float32 = 32 MB (and as much for their gradient).
DEFAULT_PANEL_ELEMS = 1 << 23
# loss.tau1 = "k": one recall temperature per k, tau1 = k.
TAU1_PER_K = "k"


@dataclass(frozen=True)
class RSkOptions:
    """Hyper-parameters of RS@k, validated once."""

    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    tau1: float | str = 1.0  # a temperature > 0, or TAU1_PER_K
    tau2: float = 0.01
    count_self: bool = False
    virtual_queries: bool = True

    def __post_init__(self) -> None:
        if len(self.ks) == 0 or any(int(k) != k or k < 1 for k in self.ks):
            raise ValueError(f"RS@k: ks must be a non-empty list of positive integers, got {self.ks}")
        per_k = self.tau1 == TAU1_PER_K
        if not ((per_k or (isinstance(self.tau1, (int, float)) and self.tau1 > 0)) and self.tau2 > 0):
            raise ValueError(f"RS@k: tau1 and tau2 must be > 0 (tau1 may also be {TAU1_PER_K!r}: tau1 = k for "
                             f"each k), got tau1={self.tau1!r}, tau2={self.tau2!r}")

    def tau1_per_k(self) -> tuple[float, ...]:
        """The recall sigmoid's temperature for each k of `ks`."""
        return tuple(float(k) for k in self.ks) if self.tau1 == TAU1_PER_K else (float(self.tau1),) * len(self.ks)


class _ExtendedItems:
    """Labels, positives and mixing of the extended (real + virtual) item set."""

    def __init__(self, labels: torch.Tensor, pairs: torch.Tensor | None, alphas: torch.Tensor | None, dtype):
        self.num_real = labels.numel()
        if pairs is None or pairs.numel() == 0:
            self.num_virtual = 0
            labels_x = labels
        else:
            self.num_virtual = pairs.shape[0]
            self.first = pairs[:, 0].contiguous()
            self.second = pairs[:, 1].contiguous()
            self.alpha = alphas.to(dtype)
            self.beta = 1 - self.alpha
            labels_x = torch.cat([labels, labels[self.first]])
        self.num = labels_x.numel()
        self.labels = labels
        # Groups of equal label in sorted order: every item knows where its class starts
        # in `order`, how many items the class has and where the item itself sits.
        order = torch.argsort(labels_x, stable=True)
        _, counts = torch.unique_consecutive(labels_x[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group_of_sorted = torch.repeat_interleave(torch.arange(counts.numel(), device=labels.device), counts)
        self.order = order
        self.count = torch.empty_like(order)
        self.count[order] = counts[group_of_sorted]
        self.start = torch.empty_like(order)
        self.start[order] = starts[group_of_sorted]
        self.slot = torch.empty_like(order)
        self.slot[order] = torch.arange(self.num, device=labels.device) - starts[group_of_sorted]
        self.max_pos = int(counts.max()) - 1 if self.num else 0

    def is_query(self, virtual_queries: bool) -> torch.Tensor:
        """Which extended items are queries: they have a positive (and are allowed to ask)."""
        mask = self.count >= 2
        if not virtual_queries:
            mask[self.num_real :] = False
        return mask

    def positives(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positives of a block of queries, padded: (bq, P) indices, (bq, P) valid, (bq,) count."""
        num_pos = self.count[q] - 1
        width = max(int(num_pos.max()), 1)
        j = torch.arange(width, device=q.device)[None, :]
        # Skip the query's own slot inside its class.
        slot = j + (j >= self.slot[q][:, None]).long()
        valid = j < num_pos[:, None]
        pos = self.order[torch.clamp(self.start[q][:, None] + slot, max=self.num - 1)]
        return pos, valid, num_pos

    def extend_columns(self, sim_qr: torch.Tensor) -> torch.Tensor:
        """(bq, B) similarities to real items -> (bq, B + V) with virtual items appended."""
        if self.num_virtual == 0:
            return sim_qr
        bq = sim_qr.shape[0]
        sim_qx = torch.empty(bq, self.num, dtype=sim_qr.dtype, device=sim_qr.device)
        sim_qx[:, : self.num_real] = sim_qr
        # gather with an expanded index is ~4x faster than sim_qr[:, idx] on CPU.
        first = torch.gather(sim_qr, 1, self.first[None, :].expand(bq, -1))
        second = torch.gather(sim_qr, 1, self.second[None, :].expand(bq, -1))
        torch.mul(first, self.alpha, out=sim_qx[:, self.num_real :])
        sim_qx[:, self.num_real :].addcmul_(second, self.beta)
        return sim_qx

    def fold_columns(self, dsim_qx: torch.Tensor) -> torch.Tensor:
        """Adjoint of extend_columns: (bq, B + V) -> (bq, B)."""
        if self.num_virtual == 0:
            return dsim_qx
        dsim_qr = dsim_qx[:, : self.num_real]
        dsim_qv = dsim_qx[:, self.num_real :]
        bq = dsim_qx.shape[0]
        dsim_qr.scatter_add_(1, self.first[None, :].expand(bq, -1), dsim_qv * self.alpha)
        dsim_qr.scatter_add_(1, self.second[None, :].expand(bq, -1), dsim_qv * self.beta)
        return dsim_qr


def rsk_forward_backward(
    keys: torch.Tensor,
    labels: torch.Tensor,
    *,
    opts: RSkOptions,
    pairs: torch.Tensor | None = None,
    alphas: torch.Tensor | None = None,
    queries: torch.Tensor | None = None,
    block_size: int | None = None,
    sim_cache_mb: float = DEFAULT_SIM_CACHE_MB,
    need_grad: bool = True,
    impl: str = "auto",
    backends: Backends | None = None,
    panel_elems: int = DEFAULT_PANEL_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The kernel: part of the RS@k loss of (keys, labels) and its gradient w.r.t. keys.

    Args:
        keys: (B, d) embeddings of the whole (global) batch, any float dtype.
        labels: (B,) int64 labels.
        pairs, alphas: SiMix plan over the batch (see `simix_plan`), or None.
        queries: extended indices (real rows 0..B-1, virtual rows B..B+V-1) that this
            caller computes; None = all. Items without positives are skipped. A rank of
            a data-parallel job passes its own rows (and its share of virtual rows).
        block_size: queries per block; None takes the backend's default size.
        sim_cache_mb: allow the dense path when 2 x B x B similarities fit in this.
        impl: block backend, "auto" | "eager" | "native" | "triton" (rskdist/loss/backends.py);
            an unavailable one falls back to "eager" with a warning.
        backends: the backend table (default: rskdist.loss.backends.BACKENDS).
        panel_elems: similarity elements per panel of the stream source (at least a block).

    Returns:
        loss_part: sum over `queries` of the per-query loss divided by the number of
            queries of the *whole* batch, so parts from disjoint query sets add up to
            the loss.
        grad_keys: d loss_part / d keys, (B, d) in the compute dtype, or None.
    """
    compute_dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    emb = keys.detach().to(compute_dtype)
    num_real = emb.shape[0]
    backends = BACKENDS if backends is None else backends
    impl = backends.resolve(impl, emb.device)
    items = _ExtendedItems(labels, pairs, alphas, compute_dtype)
    query_mask = items.is_query(opts.virtual_queries)
    num_queries = int(query_mask.sum())
    if queries is None:
        mine = torch.nonzero(query_mask).flatten()
        all_rows = True
    else:
        mine = queries[query_mask[queries]]
        all_rows = False
    if num_queries == 0 or mine.numel() == 0:
        return emb.new_zeros(()), (torch.zeros_like(emb) if need_grad else None)

    block_fn = backends.block_fn(impl, emb.device)
    if block_size is None:
        block_size = backends.records[impl].default_rows(emb.device.type, items.num, items.max_pos)
    elif block_size < 1:
        raise ValueError(f"RS@k: block_size must be >= 1, got {block_size}")
    cache_bytes = 2 * num_real * num_real * emb.element_size()
    if all_rows and cache_bytes <= sim_cache_mb * 2**20:
        source = _DenseSimilarity(emb, query_mask[:num_real], need_grad)
        panels = [_Panel.whole(items, mine)]
    else:
        source = _StreamSimilarity(emb, need_grad)
        panels = _Panel.by_class(items, mine, max(block_size, panel_elems // max(num_real, 1)))

    scale = 1.0 / num_queries
    total = emb.new_zeros(())
    # Panel by panel (real rows whose similarities are formed together, whole classes), block
    # by block: real queries first, then the virtual ones mixed from the panel's rows. The
    # source gives each block's similarity rows and takes back its d loss / d similarity.
    for panel in panels:
        source.begin(panel)
        for b0 in range(0, panel.num_real_queries, block_size):
            rows = slice(b0, min(b0 + block_size, panel.num_real_queries))
            out = source.out_rows(rows)
            loss_b, dsim_qr = block_fn(source.rows(rows), panel.real_queries[rows], items, opts, scale, need_grad,
                                       out=out)
            total += loss_b
            if need_grad:
                source.push(rows, dsim_qr)
        for b0 in range(0, panel.num_virtual_queries, block_size):
            rows = slice(b0, b0 + block_size)
            loss_b, dsim_qr = block_fn(source.mixed_rows(rows), panel.virtual_queries[rows], items, opts, scale,
                                       need_grad)
            total += loss_b
            if need_grad:
                source.push_mixed(rows, dsim_qr)
        source.end()
    return total, source.gradient()


class _Panel:
    """Real rows whose similarity rows are formed together, the real queries among them
    (local rows 0..num_real_queries-1 unless `whole`) and the virtual (SiMix) queries mixed
    from them: a virtual row is alpha row(first) + (1 - alpha) row(second), parents given
    as local rows. Panels hold whole classes, so a virtual query's parents are always in
    the panel of its class."""

    def __init__(self, ids, real_queries, real_local, virtual_queries, first_local, second_local, alpha, beta):
        self.ids = ids  # global real rows of the panel, by local row
        self.real_queries, self.real_local = real_queries, real_local
        self.virtual_queries, self.first_local, self.second_local = virtual_queries, first_local, second_local
        self.alpha, self.beta = alpha, beta
        self.num_real_queries, self.num_virtual_queries = real_queries.numel(), virtual_queries.numel()

    @classmethod
    def whole(cls, items: _ExtendedItems, mine: torch.Tensor) -> "_Panel":
        """Every real row, in order (the dense source: local rows are global rows)."""
        real, virtual = mine[mine < items.num_real], mine[mine >= items.num_real]
        ids = torch.arange(items.num_real, device=mine.device)
        return cls(ids, real, real, virtual, *_parents(items, virtual))

    @classmethod
    def by_class(cls, items: _ExtendedItems, mine: torch.Tensor, max_rows: int) -> list["_Panel"]:
        """The real queries of `mine` and the parents of its virtual queries, sorted by class
        and cut into panels of at most max_rows rows, at a class boundary unless one class
        alone is larger. A virtual query goes to the panel of its first parent; its second
        parent, if elsewhere (split classes only), joins that panel too as an extra row.
        Each panel's real queries come first (local rows 0..), rows that are only parents
        after them."""
        num_real, device = items.num_real, mine.device
        real, virtual = mine[mine < num_real], mine[mine >= num_real]
        first, second, _, _ = _parents(items, virtual)
        rows = torch.unique(torch.cat([real, first, second]))
        rows = rows[torch.argsort(items.labels[rows], stable=True)]
        row_labels = items.labels[rows].tolist()
        cuts, start = [0], 0
        while start < len(rows):
            end = min(start + max_rows, len(rows))
            if end < len(rows) and row_labels[end] == row_labels[end - 1]:
                back = end - 1
                while back > start and row_labels[back - 1] == row_labels[end - 1]:
                    back -= 1
                end = back if back > start else end  # a class larger than a panel is split
            cuts.append(end)
            start = end
        panel_of = torch.full((num_real,), -1, dtype=torch.long, device=device)
        for k in range(len(cuts) - 1):
            panel_of[rows[cuts[k] : cuts[k + 1]]] = k
        virtual = virtual[torch.argsort(panel_of[first], stable=True)]
        first, second, alpha, beta = _parents(items, virtual)
        v_cuts = [0] + torch.cumsum(torch.bincount(panel_of[first], minlength=len(cuts) - 1), 0).tolist()
        is_query = torch.zeros(num_real, dtype=torch.bool, device=device)
        is_query[real] = True
        local = torch.empty(num_real, dtype=torch.long, device=device)
        panels = []
        for k in range(len(cuts) - 1):
            own = rows[cuts[k] : cuts[k + 1]]
            v = slice(v_cuts[k], v_cuts[k + 1])
            away = second[v][panel_of[second[v]] != k]
            ids = torch.cat([own[is_query[own]], own[~is_query[own]], torch.unique(away)])
            local[ids] = torch.arange(ids.numel(), device=device)
            n_real = int(is_query[own].sum())
            panels.append(cls(ids, ids[:n_real], torch.arange(n_real, device=device), virtual[v], local[first[v]],
                              local[second[v]], alpha[v], beta[v]))
        return panels


def _parents(items: _ExtendedItems, virtual: torch.Tensor):
    """Global parent rows and weights of virtual queries (extended indices >= num_real)."""
    if virtual.numel() == 0:
        none, weights = virtual.new_empty(0), torch.empty(0, device=virtual.device)
        return none, none, weights, weights
    v = virtual - items.num_real
    return items.first[v], items.second[v], items.alpha[v], items.beta[v]


class _DenseSimilarity:
    """S = E E^T and d loss / d S kept whole (one process, every real row a query); one
    panel of all rows, local rows = global rows.

    Two B x B x d products in all: S, then (dS + dS^T) E at the end (S is symmetric).
    """

    def __init__(self, emb: torch.Tensor, real_is_query: torch.Tensor, need_grad: bool):
        self.emb, self.need_grad = emb, need_grad
        self.sim = emb @ emb.T
        if need_grad:
            # Rows of real queries are written whole by `push`; only the others need zeros.
            self.dsim = torch.empty_like(self.sim)
            if bool((~real_is_query).any()):
                self.dsim[~real_is_query] = 0

    def begin(self, panel: _Panel) -> None:
        self.panel = panel

    def rows(self, rows: slice) -> torch.Tensor:
        return self.sim[self.panel.real_local[rows]]

    def out_rows(self, rows: slice) -> None:
        return None  # rows are scattered in S: written by `push`

    def push(self, rows: slice, dsim_qr: torch.Tensor) -> None:
        self.dsim.index_copy_(0, self.panel.real_local[rows], dsim_qr)

    def mixed_rows(self, rows: slice) -> torch.Tensor:
        return _mix(self.sim, self.panel, rows)

    def push_mixed(self, rows: slice, dsim_qr: torch.Tensor) -> None:
        _unmix(self.dsim, self.panel, rows, dsim_qr)

    def end(self) -> None:
        pass

    def gradient(self) -> torch.Tensor | None:
        if not self.need_grad:
            return None
        return _symmetrise_(self.dsim, out=self.sim) @ self.emb


class _StreamSimilarity:
    """Similarity rows formed per panel (E_p E^T), gradients pushed out per panel (dS_p^T E_p
    to the keys, dS_p E to the panel's rows): three products over the panels' real rows,
    memory O(panel x B). Virtual queries mix rows of their panel, so they cost no product.

    Panels group many blocks so the products are few and large instead of many and thin;
    the panel buffers are allocated once and reused.
    """

    def __init__(self, emb: torch.Tensor, need_grad: bool):
        self.emb, self.need_grad = emb, need_grad
        self.grad = torch.zeros_like(emb) if need_grad else None
        self.buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def begin(self, panel: _Panel) -> None:
        self.panel = panel
        n = panel.ids.numel()
        if self.buffers is None or self.buffers[0].shape[0] < n:
            width = self.emb.shape[0]
            self.buffers = (self.emb.new_empty(n, width), self.emb.new_empty(n, width) if self.need_grad else None)
        self.emb_p = self.emb[panel.ids]
        self.sim_pr = torch.mm(self.emb_p, self.emb.T, out=self.buffers[0][:n])
        if self.need_grad:
            self.dsim_pr = self.buffers[1][:n]
            self.dsim_pr[panel.num_real_queries :] = 0  # rows that only parents receive

    def rows(self, rows: slice) -> torch.Tensor:
        return self.sim_pr[rows]  # the panel's real queries are its first rows

    def out_rows(self, rows: slice) -> torch.Tensor | None:
        return self.dsim_pr[rows] if self.need_grad else None

    def push(self, rows: slice, dsim_qr: torch.Tensor) -> None:
        target = self.dsim_pr[rows]
        if dsim_qr.data_ptr() != target.data_ptr():
            target.copy_(dsim_qr)

    def mixed_rows(self, rows: slice) -> torch.Tensor:
        return _mix(self.sim_pr, self.panel, rows)

    def push_mixed(self, rows: slice, dsim_qr: torch.Tensor) -> None:
        _unmix(self.dsim_pr, self.panel, rows, dsim_qr)

    def end(self) -> None:
        if self.need_grad:
            # Keys side: s_qz = <emb_q, emb_z>  ->  d emb_z += dsim_qz * emb_q; then the rows' side.
            self.grad.addmm_(self.dsim_pr.T, self.emb_p)
            self.grad.index_add_(0, self.panel.ids, self.dsim_pr @ self.emb)

    def gradient(self) -> torch.Tensor | None:
        return self.grad


def _mix(mat: torch.Tensor, panel: _Panel, rows: slice) -> torch.Tensor:
    """Similarity rows of a block of the panel's virtual queries, from its rows of `mat`."""
    alpha, beta = panel.alpha[rows, None], panel.beta[rows, None]
    return mat[panel.first_local[rows]] * alpha + mat[panel.second_local[rows]] * beta


def _unmix(dmat: torch.Tensor, panel: _Panel, rows: slice, dsim_qr: torch.Tensor) -> None:
    """Adjoint of _mix: a virtual row's gradient flows to its parents' rows."""
    dmat.index_add_(0, panel.first_local[rows], dsim_qr * panel.alpha[rows, None])
    dmat.index_add_(0, panel.second_local[rows], dsim_qr * panel.beta[rows, None])


def _symmetrise_(mat: torch.Tensor, out: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """out = mat + mat^T, by square tiles: a whole-matrix transposed read thrashes the cache
    (about 3x slower on CPU at 4096 x 4096)."""
    n = mat.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper = out[i : i + tile, j : j + tile]
            torch.add(mat[i : i + tile, j : j + tile], mat[j : j + tile, i : i + tile].T, out=upper)
            if j != i:
                out[j : j + tile, i : i + tile].copy_(upper.T)
    return out


def validate_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    mix: tuple[torch.Tensor, torch.Tensor] | None,
    check_finite: bool = True,
) -> None:
    """Raise ValueError with the problem and the fix for malformed loss inputs."""
    if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("RS@k: embeddings and labels must be torch tensors")
    if embeddings.dim() != 2:
        raise ValueError(f"RS@k: embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"RS@k: labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"RS@k: {embeddings.shape[0]} embeddings but {labels.shape[0]} labels; pass one label per embedding"
        )
    if embeddings.shape[0] == 0:
        raise ValueError("RS@k: empty batch; the loss needs at least two samples of one class")
    if not embeddings.is_floating_point():
        raise ValueError(f"RS@k: embeddings must be floating point, got {embeddings.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"RS@k: labels must be integers, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise ValueError(f"RS@k: labels on {labels.device} but embeddings on {embeddings.device}")
    # One device sync; cheap next to the loss itself and it turns a silent NaN run into an error.
    if check_finite and not bool(torch.isfinite(embeddings).all()):
        raise ValueError("RS@k: embeddings contain NaN or Inf; check the model output and the learning rate")
    if mix is not None:
        validate_mix(mix, labels)


def validate_mix(mix: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> None:
    """A SiMix plan must index the batch, pair same-class items and carry weights in [0, 1]."""
    if not (isinstance(mix, (tuple, list)) and len(mix) == 2):
        raise ValueError("RS@k: mix must be a (pairs, alphas) tuple from rskdist.loss.simix_plan")
    pairs, alphas = mix
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int64:
        raise ValueError(f"RS@k: mix pairs must be an int64 (V, 2) tensor, got {pairs.dtype} {tuple(pairs.shape)}")
    if alphas.shape != (pairs.shape[0],):
        raise ValueError(f"RS@k: mix alphas must have shape ({pairs.shape[0]},), got {tuple(alphas.shape)}")
    if pairs.numel() == 0:
        return
    if int(pairs.min()) < 0 or int(pairs.max()) >= labels.numel():
        raise ValueError(f"RS@k: mix pairs index outside the batch of {labels.numel()} samples")
    if not bool((labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()):
        raise ValueError("RS@k: mix pairs must join samples of the same class")
    if not bool(((alphas >= 0) & (alphas <= 1)).all()):
        raise ValueError("RS@k: mix alphas must lie in [0, 1]")

