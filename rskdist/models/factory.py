"""create_model: a timm or open_clip backbone + retrieval head, with weights from hub or file.

Weight sources (`pretrained`):
- None: random init.
- a file path: safetensors or torch checkpoint (loaded with weights_only=True) holding
  either a whole RetrievalModel ("backbone.*" + "head.*") or the backbone alone (a timm
  state dict, an open_clip visual tower, or a full CLIP checkpoint whose "visual.*"
  part is used). The preprocessing the weights were trained with (mean, std, native image
  size, interpolation; QuickGELU for open_clip) is read from the file's own config: the
  metadata fetch_weights writes into it, else the config file the library's hub layout keeps
  beside it (timm config.json, open_clip_config.json), else the registry entry of the tag
  in the backbone name (timm) or of the file's recorded tag (open_clip).
- "hub" (timm's default tag of the architecture, or the tag in the backbone name) or a
  hub tag ("augreg_in21k" for timm, "openai"/"laion2b_s32b_b82k" for open_clip):
  downloaded via the Hugging Face Hub cache. Offline and not cached -> WeightsNotFoundError
  that says how to fetch the file elsewhere and pass it as a path.

Each library has its own builder: `timm_backbone.build_timm` and
`open_clip_backbone.build_open_clip` (how each library is called is said there); reading
files is weights.py, what is said about a file that cannot be used is messages.py.
"""

from __future__ import annotations

import os
from typing import Any

from .model import RetrievalModel
from .open_clip_backbone import build_open_clip
from .spec import make_spec
from .timm_backbone import build_timm
from .weights import OPEN_CLIP_PREFIX


def create_model(
    backbone: str,
    *,
    embed_dim: int = 512,
    pretrained: str | os.PathLike | None = None,
    pool: str = "auto",
    gem_p: float = 3.0,
    gem_learnable: bool = False,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
    freeze_bn: bool = True,
    drop_path_rate: float = 0.0,
    backbone_kwargs: dict[str, Any] | None = None,
) -> RetrievalModel:
    """Build a RetrievalModel: backbone -> pool -> LayerNorm -> Linear(embed_dim) -> L2 norm.

    Args:
        backbone: a timm model name, optionally with a pretrained tag
            ("vit_base_patch16_224", "vit_base_patch16_224.augreg_in21k", "resnet50"), or
            "open_clip:<config>" for an open_clip visual tower ("open_clip:ViT-L-14").
        embed_dim: output embedding size.
        pretrained: None (random init), a weights file, "hub", or a hub tag (module doc).
        pool: "auto" = GeM for CNNs whose timm head is a plain global pool (ResNet,
            EfficientNet, ...), otherwise the backbone's own pooling (CLS token for ViT,
            the projected image embedding for open_clip). "gem" forces GeM; "cls" is an
            alias of timm's "token"; any other value is passed to timm as `global_pool`
            ("token", "avg", "max", "avgmax", ...).
        gem_p: GeM exponent (3 in the paper).
        gem_learnable: train the GeM exponent as a parameter, starting at gem_p (the published code).
        image_size: input size the model is built for; None = the weights' native size.
            ViTs are built for it (timm `img_size` for models with a fixed input size,
            open_clip `vision_cfg.image_size`) and loaded weights' position embeddings are
            resampled to it; CNNs take any size.
        grad_checkpointing: checkpoint the backbone's blocks (recompute in backward).
        freeze_bn: keep BatchNorm layers in eval mode in training (see RetrievalModel).
        drop_path_rate: stochastic depth rate (timm backbones and timm-based open_clip towers).
        backbone_kwargs: extra constructor arguments: timm kwargs (depth=2, embed_dim=64, ...)
            or open_clip `vision_cfg` overrides (layers=2, width=64, ...; plus quick_gelu).
    """
    if pool != "auto" and not isinstance(pool, str):
        raise ValueError(f"pool must be a string, got {pool!r}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if drop_path_rate < 0 or drop_path_rate >= 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    pretrained = (os.fspath(pretrained) or None) if pretrained is not None else None  # "": random init
    common = dict(embed_dim=embed_dim, pool=pool, image_size=image_size, freeze_bn=freeze_bn,
                  drop_path_rate=drop_path_rate, backbone_kwargs=dict(backbone_kwargs or {}))
    if backbone.startswith(OPEN_CLIP_PREFIX):  # the tower's own output: no GeM
        model = build_open_clip(backbone.removeprefix(OPEN_CLIP_PREFIX), pretrained=pretrained, **common)
    else:
        model = build_timm(backbone, pretrained=pretrained, gem_p=gem_p, gem_learnable=gem_learnable, **common)
    # What was asked for, with what the weights decided filled in: rebuilds the model without them.
    model.spec = make_spec(model, dict(backbone=backbone, gem_p=gem_p, gem_learnable=gem_learnable, **common))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


__all__ = ["OPEN_CLIP_PREFIX", "create_model"]
