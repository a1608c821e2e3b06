"""rskdist: recall@k surrogate (RS@k) + similarity mixup on global batches across GPUs and nodes."""

__version__ = "0.1.0"
