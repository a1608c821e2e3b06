"""A timm backbone with its retrieval head: `build_timm`, called by create_model.

The backbone is `timm.create_model(...)` with `num_classes=0`. Weights from a file go
through timm's own pretrained loader (`pretrained_cfg_overlay=dict(state_dict=...)`: the
model's checkpoint filter converts original layouts and resamples position embeddings,
then the load is strict); hub weights through `timm.create_model(pretrained=True)` and the
Hugging Face Hub cache. Preprocessing comes from the file's own config (weights.py), else
timm's pretrained_cfg of the tag.
"""

from __future__ import annotations

import difflib
import os
import textwrap
from typing import Any

import torch
import torch.nn as nn

from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD

from .messages import check_recorded_backbone, mismatch_fix, offline_message_timm, warn_other_architecture
from .model import GeM, RetrievalModel
from .weights import (
    WeightsConfig,
    WeightsMismatchError,
    WeightsNotFoundError,
    hub_offline,
    is_unavailable_error,
    layout_summary,
    load_retrieval_rest,
    looks_like_path,
    read_state_dict,
    read_weights_config,
    split_retrieval_state,
)

def build_timm(
    name: str,
    *,
    embed_dim: int,
    pretrained: str | None,
    pool: str,
    gem_p: float,
    gem_learnable: bool,
    image_size: int | None,
    freeze_bn: bool,
    drop_path_rate: float,
    backbone_kwargs: dict[str, Any],
) -> RetrievalModel:
    """The RetrievalModel of timm model `name` ("arch" or "arch.tag"); the arguments are
    create_model's (`pretrained` normalised: None, a file path, "hub" or a tag)."""
    import timm
    from timm.layers import SelectAdaptivePool2d

    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {arch!r}; close matches: {close}")

    file_state = head_state = None
    weights_cfg: WeightsConfig | None = None
    hub_tag = None
    from_hub = pretrained is not None and not looks_like_path(pretrained)
    source = "random init"
    if pretrained is not None:
        if not from_hub:
            file_state, file_meta = read_state_dict(pretrained)
            weights_cfg = read_weights_config(pretrained, file_meta, "timm")
            file_state, head_state = split_retrieval_state(file_state)
            source = f"file {pretrained}"
            check_recorded_backbone(weights_cfg, name, pretrained, library="timm")
        else:
            hub_tag = tag if pretrained == "hub" else pretrained
            if pretrained != "hub" and tag and tag != pretrained:
                raise ValueError(
                    f"backbone {name!r} names tag {tag!r} but pretrained={pretrained!r}; give the tag once"
                )
    timm_name = f"{arch}.{hub_tag or tag}" if (hub_tag or tag) else arch
    # None for architectures without registered weights; timm then uses PretrainedCfg() defaults.
    tag_cfg = _timm_pretrained_cfg(arch, timm_name)

    if pool == "cls":
        pool = "token"  # timm's name for CLS-token pooling
    kwargs: dict[str, Any] = dict(num_classes=0)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pool not in ("auto", "gem"):
        kwargs["global_pool"] = pool
    # The size the weights were trained at, where the file records it (DINOv2: 518; a
    # fine-tuned export: its own); the model is built for it when image_size is None.
    weights_size = weights_cfg.image_size if weights_cfg else None
    build_size = image_size or weights_size
    if build_size is not None and tag_cfg is not None and tag_cfg.fixed_input_size:
        # timm's own rule: models marked fixed_input_size take img_size; building at the target
        # size lets timm resample loaded position embeddings once, straight to this grid.
        # Other models (CNNs) take any input size.
        kwargs["img_size"] = build_size
    kwargs.update(backbone_kwargs)

    if from_hub:
        backbone = _timm_from_hub(arch, timm_name, tag_cfg, kwargs)
        source = f"hub {backbone.pretrained_cfg.get('hf_hub_id') or backbone.pretrained_cfg.get('url')}"
    else:
        backbone = _timm_create(timm_name, kwargs, file_state, tag_cfg, source, weights_cfg)
        if file_state is not None:
            warn_other_architecture(weights_cfg, name, pretrained)

    cfg = dict(backbone.pretrained_cfg)
    # The registry's size, not the built one (img_size above changes pretrained_cfg's input_size).
    registry_size = tag_cfg.input_size[-1] if tag_cfg is not None else cfg.get("input_size", (3, 224, 224))[-1]
    native_size = int(weights_size or registry_size)

    # GeM replaces the model's own global pool only where that pool is a plain 2D pool
    # applied to the last feature map with nothing after it but the (removed) classifier.
    plain_2d_pool = isinstance(getattr(backbone, "global_pool", None), SelectAdaptivePool2d) and (
        getattr(backbone, "head_hidden_size", backbone.num_features) == backbone.num_features
    )
    use_gem = pool == "gem" or (pool == "auto" and plain_2d_pool)
    if use_gem:
        if not plain_2d_pool:
            raise ValueError(
                f"pool='gem' needs a CNN whose head is a plain global pool; {arch!r} is not one "
                "(it outputs tokens or has layers after pooling). Use pool='auto' or a timm "
                "global_pool such as 'token' or 'avg'."
            )
        backbone.reset_classifier(0, global_pool="")  # backbone(x) -> [b, c, h, w]
        pool_module: nn.Module = GeM(gem_p, learnable=gem_learnable)
        pool_name = f"gem(p={gem_p})"
    else:
        pool_module = nn.Identity()
        pool_name = str(getattr(backbone, "global_pool", pool))
        if isinstance(getattr(backbone, "global_pool", None), nn.Module):
            pool_name = getattr(backbone.global_pool, "pool_type", type(backbone.global_pool).__name__)
        if pool_name == "token":
            pool_name = "token (CLS)"
    feat_dim = backbone.num_features if use_gem else getattr(backbone, "head_hidden_size", backbone.num_features)

    recorded = weights_cfg or WeightsConfig(source="")
    mean = tuple(recorded.mean or cfg.get("mean", IMAGENET_MEAN))
    std = tuple(recorded.std or cfg.get("std", IMAGENET_STD))
    if recorded.mean or recorded.std:
        preprocessing = recorded.source
    elif tag_cfg is not None:
        preprocessing = f"timm pretrained_cfg of {timm_name if tag else f'{arch} (default tag {tag_cfg.tag})'}"
    else:
        preprocessing = "ImageNet defaults (no pretrained_cfg)"
    model = RetrievalModel(
        backbone,
        feat_dim=feat_dim,
        embed_dim=embed_dim,
        pool=pool_module,
        freeze_bn=freeze_bn,
        mean=mean,
        std=std,
        image_size=image_size or native_size,
        interpolation=recorded.interpolation or cfg.get("interpolation", "bicubic"),
        info=dict(backbone=name, library="timm", weights=source, pool=pool_name,
                  native_image_size=native_size, preprocessing=preprocessing),
    )
    if head_state is not None:
        load_retrieval_rest(model, head_state, source)
    return model


def _timm_pretrained_cfg(arch: str, timm_name: str):
    """timm's PretrainedCfg for a name (default tag if none), None if the architecture has none."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # a tag the architecture does not have
        raise ValueError(f"cannot build timm model {timm_name!r}: {err}; "
                         f"known tags: {timm.list_pretrained(arch + '.*')}") from err


def _timm_create(
    timm_name: str, kwargs: dict[str, Any], state: dict | None, tag_cfg, source: str,
    weights_cfg: WeightsConfig | None = None,
) -> nn.Module:
    """timm.create_model, loading `state` (a timm-layout backbone state dict) when given.

    timm's pretrained loader does the adaptation: the model's own checkpoint_filter_fn
    (original checkpoint layouts, position-embedding and patch-embedding resampling to
    this model's size), then a strict load_state_dict (relaxed only where timm relaxes
    it for that model). Only the classifier is dealt with here, see below.
    """
    import timm

    overlay = None
    if state is not None:
        file_layout = layout_summary(state)  # before timm converts the layout
        state = dict(state)
        if kwargs.get("num_classes") == 0:
            # The backbone has no classifier (num_classes=0), so drop one the file may carry
            # (a plain timm checkpoint). Telling timm the state has none (classifier=None)
            # keeps its load strict: timm drops a classifier itself only together with
            # switching to strict=False, which would let a file with wrong keys load silently.
            classifiers = getattr(tag_cfg, "classifier", None) or ()
            for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
                state.pop(f"{prefix}.weight", None)
                state.pop(f"{prefix}.bias", None)
        overlay = dict(state_dict=state, classifier=None)
    try:
        backbone = timm.create_model(
            timm_name, pretrained=state is not None, pretrained_cfg_overlay=overlay, **kwargs
        )
    except (TypeError, AssertionError) as err:
        raise ValueError(f"cannot build timm model {timm_name!r} with {kwargs}: {err}") from err
    except RuntimeError as err:
        if state is None:
            raise ValueError(f"cannot build timm model {timm_name!r} with {kwargs}: {err}") from err
        # torch's load_state_dict error lists every key; one line per kind, cut for the log.
        details = "\n".join(
            "  " + textwrap.shorten(line.strip(), 500, placeholder=" ...") for line in str(err).splitlines()
        )
        raise WeightsMismatchError(
            f"weights from {source} do not fit the timm backbone {timm_name} "
            f"(timm's strict load after its checkpoint filter):\n{details}\n"
            f"  the file holds   {file_layout}\n"
            f"  the backbone is  {_timm_layout(timm_name, kwargs)}\n"
            + mismatch_fix(timm_name, state, weights_cfg, library="timm")
        ) from err
    if state is not None:
        # timm deep-copies the state dict into the model's pretrained_cfg (dataclasses.asdict):
        # one extra copy of the weights while loading (ViT-L/16: +1.2 GB peak host memory),
        # kept for the model's lifetime unless dropped here.
        backbone.pretrained_cfg.pop("state_dict", None)
    return backbone


def _timm_layout(timm_name: str, kwargs: dict[str, Any]) -> str:
    """layout_summary of a timm model's own state dict, built on the meta device (no memory)."""
    import timm

    try:
        with torch.device("meta"):
            return layout_summary(timm.create_model(timm_name, **kwargs).state_dict())
    except Exception as err:  # only for a message; never hide the real error
        return f"(not described: {type(err).__name__}: {err})"


def _timm_from_hub(arch: str, timm_name: str, cfg, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model with the hub weights of `cfg` (the tag's PretrainedCfg); weights this
    machine cannot download are a WeightsNotFoundError that says how to provide them."""
    import timm

    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(
            f"timm has no downloadable weights for {timm_name!r}; known tags: "
            f"{timm.list_pretrained(arch + '.*')}"
        )
    tagged = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if hub_offline() and not cfg.hf_hub_id and not _torch_hub_cached(cfg.url):
        # torch.hub would try the URL regardless of HF_HUB_OFFLINE; fail fast instead of hanging.
        raise WeightsNotFoundError(offline_message_timm(tagged, cfg, "HF_HUB_OFFLINE is set"))
    try:
        return timm.create_model(tagged, pretrained=True, **kwargs)
    except Exception as err:
        if is_unavailable_error(err):
            raise WeightsNotFoundError(offline_message_timm(tagged, cfg, f"{type(err).__name__}: {err}")) from err
        raise


def _torch_hub_cached(url: str | None) -> bool:
    if not url:
        return False
    import torch.hub

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


