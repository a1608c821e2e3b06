"""Plain implementations of RS@k, kept for tests and benchmarks.

`rsk_loss_per_query` follows docs/method.md section 1 literally, one query at a time, and is
written to be read, not to be fast. `rsk_loss_dense` is the straightforward vectorised
form: it materialises the (queries x positives x batch) tensor, so its memory grows as
B^2 * |P|; it is the baseline that `tools/bench_loss.py` compares against.
Neither knows about SiMix: tests materialise mixed embeddings and call these on the
extended batch. `tau1` is a temperature or "k" (tau1 = k for each k).

`rank_sums` and `grad_rows` are the two streaming passes of the fused block
(rskdist/loss/blocks.py) in plain torch, forming the (bq x P x N) differences: the test
oracle of the Triton kernels (rskdist/loss/triton_kernels.py), which compute the same
sums without that tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _tau1(tau1: float | str, k: int) -> float:
    return float(k) if tau1 == "k" else float(tau1)


def _recall_terms(ranks: torch.Tensor, num_pos: int, ks: Sequence[int], tau1: float | str) -> torch.Tensor:
    """1 - mean_k R_k for one query, given the ranks of its positives."""
    recalls = []
    for k in ks:
        hits = torch.sigmoid((k - ranks) / _tau1(tau1, k)).sum()
        recalls.append(torch.clamp(hits, max=float(k)) / min(k, num_pos))
    return 1.0 - torch.stack(recalls).mean()


def rsk_loss_per_query(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau1: float | str = 1.0,
    tau2: float = 0.01,
    count_self: bool = False,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """RS@k exactly as written in docs/method.md, one query and one positive at a time.

    `queries` (bool mask over the batch) limits which samples act as queries; every
    sample is always in the database. With `count_self`, the query's own similarity
    counts in the rank of its positives, as in the published code.
    """
    num = embeddings.shape[0]
    sim = embeddings @ embeddings.T
    per_query = []
    for q in range(num):
        if queries is not None and not bool(queries[q]):
            continue
        positives = [p for p in range(num) if p != q and labels[p] == labels[q]]
        if not positives:
            continue
        ranks = []
        for p in positives:
            others = [z for z in range(num) if z != p and (count_self or z != q)]
            above = torch.sigmoid((sim[q, others] - sim[q, p]) / tau2).sum()
            ranks.append(1.0 + above)
        per_query.append(_recall_terms(torch.stack(ranks), len(positives), ks, tau1))
    if not per_query:
        return embeddings.sum() * 0.0
    return torch.stack(per_query).mean()


def rsk_loss_dense(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau1: float | str = 1.0,
    tau2: float = 0.01,
    count_self: bool = False,
) -> torch.Tensor:
    """Vectorised RS@k with plain autograd: one (B x P x B) tensor, P = largest class - 1.

    Memory is O(B^2 * P) for the forward and as much again saved for backward.
    """
    num = embeddings.shape[0]
    device = embeddings.device
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(num, dtype=torch.bool, device=device)
    pos_mask_qz = same & ~eye
    num_pos_q = pos_mask_qz.sum(1)
    max_pos = int(num_pos_q.max()) if num else 0
    if max_pos == 0:
        return embeddings.sum() * 0.0
    # Positive indices per query, padded: (B, P); sorting puts positives first.
    order = torch.argsort(pos_mask_qz.to(torch.int8), dim=1, descending=True, stable=True)
    pos_qp = order[:, :max_pos]
    valid_qp = torch.arange(max_pos, device=device)[None, :] < num_pos_q[:, None]

    sim_qz = embeddings @ embeddings.T
    sim_qp = torch.gather(sim_qz, 1, pos_qp)
    sig_qpz = torch.sigmoid((sim_qz[:, None, :] - sim_qp[:, :, None]) / tau2)
    # Leave out z == p always, and z == q unless counting the query itself.
    keep_qpz = pos_qp[:, :, None] != torch.arange(num, device=device)[None, None, :]
    if not count_self:
        keep_qpz = keep_qpz & ~eye[:, None, :]
    rank_qp = 1.0 + (sig_qpz * keep_qpz).sum(-1)

    recall_qk = []
    for k in ks:
        hits_q = (torch.sigmoid((k - rank_qp) / _tau1(tau1, k)) * valid_qp).sum(1)
        # clamp(min=1) keeps the (later dropped) queries without positives finite in backward.
        recall_qk.append(torch.clamp(hits_q, max=float(k)) / torch.clamp(num_pos_q, min=1, max=k))
    loss_q = 1.0 - torch.stack(recall_qk, 1).mean(1)
    has_pos_q = num_pos_q > 0
    return loss_q[has_pos_q].mean()


def _differences_and_mask(t_qx, t_qp, pos, q, count_self: bool):
    """(bq, P, N) t_qz - t_qp and which (q, p, z) count (z != p, and z != q unless count_self)."""
    z = torch.arange(t_qx.shape[1], device=t_qx.device)
    keep = z != pos[:, :, None]
    if not count_self:
        keep = keep & (z != q[:, None, None])
    return t_qx[:, None, :] - t_qp[:, :, None], keep


def rank_sums(t_qx, t_qp, pos, q, count_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bq, P) sums over items of sigma(t_qz - t_qp) and of sigma' = 1 / (2 + 2 cosh), masked."""
    x, keep = _differences_and_mask(t_qx, t_qp, pos, q, count_self)
    above = torch.where(keep, torch.sigmoid(x), 0.0).sum(-1)
    dsum = torch.where(keep, 0.5 / (1.0 + torch.cosh(x)), 0.0).sum(-1)
    return above, dsum


def grad_rows(t_qx, t_qp, pos, q, coef, count_self: bool) -> torch.Tensor:
    """(bq, N): sum_p coef_qp sigma'(t_qz - t_qp), masked like `rank_sums`."""
    x, keep = _differences_and_mask(t_qx, t_qp, pos, q, count_self)
    return torch.where(keep, coef[:, :, None] * (0.5 / (1.0 + torch.cosh(x))), 0.0).sum(1)
