"""Optimizer parameter groups for retrieval models."""

from __future__ import annotations

import torch.nn as nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_norm_bias: bool = True,
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    With exclude_norm_bias (default, common practice for ViTs/AdamW, as in timm and
    open_clip), every 1-d parameter (biases, LayerNorm/BatchNorm scales) and the names
    the backbone lists in `no_weight_decay()` (position embeddings, CLS token) get
    weight_decay=0; weight matrices and conv kernels get `weight_decay`. Pass
    exclude_norm_bias=False to decay everything alike (one group). Frozen parameters
    (requires_grad=False) are left out. Group dicts carry only "params" and
    "weight_decay", so any torch optimizer or DeepSpeed accepts them.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_norm_bias:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            skip.update(f"{prefix}.{n}" if prefix else n for n in names())
    decay, no_decay = [], []
    for name, p in trainable:
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
