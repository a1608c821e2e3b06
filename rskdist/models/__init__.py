"""Retrieval backbones: timm / open_clip encoder -> pooled feature -> LayerNorm -> Linear -> L2.

Public API: create_model, RetrievalModel, GeM, param_groups, count_params, describe,
read_state_dict, rebuild_model, read_spec, write_spec, WeightsNotFoundError, WeightsMismatchError. See docs/models.md.
"""

from .factory import create_model
from .model import GeM, RetrievalModel, count_params, describe
from .params import param_groups
from .spec import read_spec, rebuild_model, write_spec
from .weights import OPEN_CLIP_PREFIX, WeightsMismatchError, WeightsNotFoundError, read_state_dict

__all__ = [
    "OPEN_CLIP_PREFIX",
    "GeM",
    "RetrievalModel",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "count_params",
    "create_model",
    "describe",
    "param_groups",
    "read_spec",
    "read_state_dict",
    "rebuild_model",
    "write_spec",
]
