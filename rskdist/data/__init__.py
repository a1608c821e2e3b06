"""Data: shard writers (sources, writer, synthetic) and the training/evaluation streams.

The loaders import torch; they are loaded lazily so the shard writer stays light.
"""

from .shards import SplitTable, load_index, load_split
from .sources import DataSourceError, list_source

_LAZY = {
    "build_train_loader": "loader",
    "build_eval_loader": "loader",
    "TrainLoader": "loader",
    "EvalLoader": "loader",
    "ClassBalancedPlan": "sampler",
    "ReferencePlan": "sampler",
    "make_plan": "sampler",
    "StoreReading": "remote",
}

__all__ = ["SplitTable", "load_index", "load_split", "DataSourceError", "list_source", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
