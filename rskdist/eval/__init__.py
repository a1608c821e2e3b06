"""Retrieval evaluation: exact kNN, Recall@k / MAP@R / R-precision, distributed embedding."""

from rskdist.eval.embed import embed_dataset, load_embeddings, save_embeddings
from rskdist.eval.neighbors import BACKENDS, knn, resolve_backend
from rskdist.eval.metrics import (
    DEFAULT_KS,
    METRICS,
    default_ks,
    format_metrics_table,
    retrieval_metrics,
    retrieval_metrics_qg,
)
from rskdist.eval.tracking import EMA_PREFIX, BestTracker, evaluated_splits, split_metric

__all__ = [
    "BACKENDS",
    "DEFAULT_KS",
    "METRICS",
    "BestTracker",
    "default_ks",
    "embed_dataset",
    "evaluate_model",
    "evaluated_splits",
    "format_metrics_table",
    "knn",
    "load_embeddings",
    "resolve_backend",
    "retrieval_metrics",
    "retrieval_metrics_qg",
    "save_embeddings",
    "split_metric",
    "EMA_PREFIX",
]


def evaluate_model(model, loader, *, device, rank=0, world_size=1, group=None, amp_dtype=None, **metric_kwargs):
    """Embed ``loader`` on all ranks, then compute :func:`retrieval_metrics` with the
    queries split over the ranks. Every rank returns the same metrics dict; when test
    images could not be read (left out of the metrics), ``num_unreadable_images`` says
    how many (the key is absent when there were none)."""
    emb, labels, num_unreadable = embed_dataset(
        model, loader, device=device, rank=rank, world_size=world_size, group=group, amp_dtype=amp_dtype,
        return_num_unreadable=True,
    )
    metrics = retrieval_metrics(emb, labels, rank=rank, world_size=world_size, group=group, **metric_kwargs)
    if num_unreadable:
        metrics["num_unreadable_images"] = num_unreadable
    return metrics
