"""Retrieval evaluation: exact kNN, Recall@k / MAP@R / R-precision, distributed embedding."""

from rskdist.eval.embed import all_gather_variable, embed_dataset, load_embeddings, save_embeddings
from rskdist.eval.neighbors import BACKENDS, knn, resolve_backend
from rskdist.eval.metrics import (
    DEFAULT_KS,
    METRICS,
    default_ks,
    format_metrics_table,
    retrieval_metrics,
    retrieval_metrics_qg,
)
from rskdist.eval.tracking import BestTracker

__all__ = [
    "BACKENDS",
    "DEFAULT_KS",
    "METRICS",
    "BestTracker",
    "all_gather_variable",
    "default_ks",
    "embed_dataset",
    "evaluate_model",
    "format_metrics_table",
    "knn",
    "load_embeddings",
    "resolve_backend",
    "retrieval_metrics",
    "retrieval_metrics_qg",
    "save_embeddings",
]


def evaluate_model(model, loader, *, device, rank=0, world_size=1, group=None, amp_dtype=None, **metric_kwargs):
    """Embed ``loader`` on all ranks, then compute :func:`retrieval_metrics` on rank 0.

    Returns the metrics dict on rank 0 and None elsewhere (the search is not split
    across ranks; broadcast the dict if every rank needs it).
    """
    emb, labels = embed_dataset(
        model, loader, device=device, rank=rank, world_size=world_size, group=group, amp_dtype=amp_dtype
    )
    if rank != 0:
        return None
    return retrieval_metrics(emb, labels, **metric_kwargs)
