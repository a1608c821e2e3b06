"""rskdist: recall@k surrogate (RS@k) + similarity mixup on global batches across GPUs and nodes.

`rskdist.load(run)` gives a trained model that embeds images (rskdist/inference.py).
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # Imported on first use: `import rskdist` (the config tools) stays free of torch.
    if name == "load":
        from rskdist.inference import load

        return load
    raise AttributeError(f"module 'rskdist' has no attribute {name!r}")
