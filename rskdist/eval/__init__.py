"""Retrieval evaluation: exact kNN, Recall@k / MAP@R / R-precision, distributed embedding,
replicated or sharded over ranks, and retrievals as pictures."""

from __future__ import annotations

from torch.distributed import ProcessGroup

from rskdist.comm import gather_objects, group_rank_and_size
from rskdist.eval.embed import embed_dataset, embed_local, gather_embedded, load_embeddings, local_rows, save_embeddings
from rskdist.eval.examples import find_examples, write_examples
from rskdist.eval.neighbors import BACKENDS, knn, resolve_backend
from rskdist.eval.metrics import (
    DEFAULT_KS,
    METRICS,
    default_ks,
    format_metrics_table,
    retrieval_metrics,
    retrieval_metrics_qg,
)
from rskdist.eval.sharded import SHARD_ABOVE, sharded_retrieval_metrics, sharded_retrieval_metrics_qg
from rskdist.eval.tracking import EMA_PREFIX, BestTracker, evaluated_splits, split_metric

__all__ = [
    "BACKENDS",
    "DEFAULT_KS",
    "METRICS",
    "SHARD_ABOVE",
    "BestTracker",
    "default_ks",
    "embed_dataset",
    "evaluate_model",
    "evaluated_splits",
    "find_examples",
    "format_metrics_table",
    "knn",
    "load_embeddings",
    "resolve_backend",
    "retrieval_metrics",
    "retrieval_metrics_qg",
    "save_embeddings",
    "sharded_retrieval_metrics",
    "sharded_retrieval_metrics_qg",
    "split_metric",
    "write_examples",
    "EMA_PREFIX",
]


def evaluate_model(model, loader, *, device, group: ProcessGroup | None = None, amp_dtype=None,
                   shard_above: int = SHARD_ABOVE, examples: int = 0, **metric_kwargs):
    """Embed ``loader`` on every rank of ``group`` and compute :func:`retrieval_metrics`.

    Up to ``shard_above`` images every rank gathers all embeddings and ranks 1/W of the
    queries; above it (and with W > 1) each rank keeps only its own rows and the search is
    sharded (rskdist.eval.sharded); ``shard_above=0`` always shards, -1 never. Both give
    the same dict on every rank; when test images could not be read (left out of the
    metrics), ``num_unreadable_images`` says how many (absent when there were none).

    ``examples=n``: also find n example queries (rskdist.eval.examples) and return
    ``(metrics, examples)``, the list on rank 0 and [] elsewhere.
    """
    rank, world = group_rank_and_size(group)
    emb, lab, idx, num_unreadable = embed_local(model, loader, device=device, amp_dtype=amp_dtype)
    total = sum(gather_objects(int((idx >= 0).sum()), group))
    search_kw = {k: metric_kwargs[k] for k in ("backend", "device") if k in metric_kwargs}
    if world > 1 and 0 <= shard_above < total:
        emb, lab, idx, num_unreadable = local_rows(emb, lab, idx, num_unreadable, group)
        metrics = sharded_retrieval_metrics(emb, lab, ids=idx, group=group, **metric_kwargs)
        shown = find_examples(emb, lab, idx, group=group, count=examples, **search_kw) if examples else []
    else:
        emb, lab, idx, num_unreadable = gather_embedded(emb, lab, idx, num_unreadable, group)
        metrics = retrieval_metrics(emb, lab, group=group, **metric_kwargs)
        # Every rank holds everything: rank 0 searches its few queries alone (short).
        shown = find_examples(emb, lab, idx, count=examples, **search_kw) if examples and rank == 0 else []
    if num_unreadable:
        metrics["num_unreadable_images"] = num_unreadable
    return (metrics, shown) if examples else metrics
