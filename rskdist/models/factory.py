"""create_model: timm or open_clip backbone + retrieval head, with weights from hub or file.

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

Library routes (public entry points only, but one): a timm backbone is
`timm.create_model(...)`, and file weights go through timm's own pretrained loader
(`pretrained_cfg_overlay=dict(state_dict=...)`: the model's checkpoint filter, then a strict
load). An open_clip tower is `open_clip.create_model(...).visual`, file weights loaded
strictly into it; the one open_clip function that is not exported (position-embedding
resampling) sits in `_resample_open_clip_pos_embed`, pinned by a test.
"""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import textwrap
import warnings
from typing import Any

import torch
import torch.nn as nn

from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD

from .model import GeM, RetrievalModel
from .spec import make_spec
from .weights import (
    WeightsConfig,
    WeightsMismatchError,
    WeightsNotFoundError,
    hub_offline,
    is_unavailable_error,
    layout_summary,
    load_retrieval_rest,
    load_strict,
    looks_like_path,
    read_state_dict,
    read_weights_config,
    split_retrieval_state,
)

OPEN_CLIP_PREFIX = "open_clip:"


def create_model(
    backbone: str,
    *,
    embed_dim: int = 512,
    pretrained: str | None = None,
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
    if pretrained is not None and not isinstance(pretrained, str):
        pretrained = os.fspath(pretrained)
    if pretrained == "":
        pretrained = None
    kwargs = dict(backbone_kwargs or {})
    if backbone.startswith(OPEN_CLIP_PREFIX):
        build = _build_open_clip
        name = backbone[len(OPEN_CLIP_PREFIX):]
    else:
        build = _build_timm
        name = backbone
    model = build(
        name,
        embed_dim=embed_dim,
        pretrained=pretrained,
        pool=pool,
        gem_p=gem_p,
        gem_learnable=gem_learnable,
        image_size=image_size,
        freeze_bn=freeze_bn,
        drop_path_rate=drop_path_rate,
        backbone_kwargs=kwargs,
    )
    model.spec = make_spec(model, dict(
        backbone=backbone, embed_dim=embed_dim, pool=pool, gem_p=gem_p, gem_learnable=gem_learnable,
        image_size=image_size, freeze_bn=freeze_bn, drop_path_rate=drop_path_rate, backbone_kwargs=kwargs,
    ))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


# ---------------------------------------------------------------------------------------
# timm


def _build_timm(
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
            _check_recorded_backbone(weights_cfg, name, pretrained, library="timm")
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
            _warn_other_architecture(weights_cfg, name, pretrained)

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
            + _mismatch_fix(timm_name, state, weights_cfg, library="timm")
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


def _check_recorded_backbone(weights_cfg: WeightsConfig | None, name: str, path: str, *, library: str) -> None:
    """The file's own config names the backbone it was made for: refuse another library's file."""
    recorded = weights_cfg.backbone if weights_cfg else None
    if not recorded:
        return
    recorded_library = "open_clip" if recorded.startswith(OPEN_CLIP_PREFIX) else "timm"
    shown = name if library == "timm" else f"{OPEN_CLIP_PREFIX}{name}"
    if recorded_library != library:
        raise WeightsMismatchError(
            f"weights file {path} was made for the {recorded_library} backbone {recorded} "
            f"({weights_cfg.source}), but model.backbone is the {library} backbone {shown}.\n"
            f"  Set model.backbone={recorded}, or fetch weights for {shown}: "
            f"python -m rskdist.models.fetch_weights {shown} --out FILE.safetensors"
        )


def _warn_other_architecture(weights_cfg: WeightsConfig | None, shown: str, path: str) -> None:
    """Called once the file has loaded: its config names another architecture whose layout fits
    this one (e.g. a 224 px ViT-B/16 file into a 384 px ViT-B/16); say so, it may be a slip."""
    recorded = weights_cfg.backbone if weights_cfg else None
    if not recorded:
        return

    def arch(backbone: str) -> str:  # timm name without tag; open_clip config without -quickgelu
        return backbone.removeprefix(OPEN_CLIP_PREFIX).partition(".")[0].removesuffix("-quickgelu")

    if arch(recorded) != arch(shown):
        warnings.warn(
            f"weights file {path} was made for {recorded} ({weights_cfg.source}), model.backbone is {shown}; "
            "it loaded since the layouts agree. Set model.backbone to the file's architecture if "
            "that was not intended.",
            stacklevel=5,
        )


def _mismatch_fix(target: str, state: dict, weights_cfg: WeightsConfig | None, *, library: str) -> str:
    """The last lines of a layout-mismatch error: what to change, given what the file is."""
    lines = []
    if weights_cfg is not None and weights_cfg.backbone:
        lines.append(f"  The file's config ({weights_cfg.source}) says it was made for {weights_cfg.backbone}: "
                     f"set model.backbone={weights_cfg.backbone} (and the backbone_kwargs it was saved with).")
    clip_like = {k.removeprefix("visual."): v for k, v in state.items()} if library == "timm" else state
    if library == "timm" and "class_embedding" in clip_like and "conv1.weight" in clip_like:
        names = _open_clip_configs_like(clip_like)
        lines.append("  This is an open_clip / OpenAI CLIP layout: use model.backbone=open_clip:<config>"
                     + (f" ({', '.join(names)} match its tower)" if names else ""))
    lines.append("  Check that the file was made for this backbone (same model name and backbone_kwargs), "
                 f"or fetch weights for it: python -m rskdist.models.fetch_weights "
                 f"{target if library == 'timm' else OPEN_CLIP_PREFIX + target} --out FILE.safetensors")
    return "\n".join(lines)


def _open_clip_configs_like(tower_state: dict) -> list[str]:
    """open_clip config names whose native ViT tower has this state's width, depth and patch size."""
    import open_clip

    from .weights import count_blocks

    width = tower_state["class_embedding"].shape[-1]
    layers = count_blocks(tower_state, "transformer.resblocks.")
    patch = tower_state["conv1.weight"].shape[-1]
    out = []
    for model_name in open_clip.list_models():
        vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
        if (vision.get("width"), vision.get("layers"), vision.get("patch_size")) == (width, layers, patch):
            out.append(f"open_clip:{model_name}")
    return out[:6]


def _timm_from_hub(arch: str, timm_name: str, cfg, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(
            f"timm has no downloadable weights for {timm_name!r}; known tags: "
            f"{timm.list_pretrained(arch + '.*')}"
        )
    tagged = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if hub_offline() and not cfg.hf_hub_id and not _torch_hub_cached(cfg.url):
        # torch.hub would try the URL regardless of HF_HUB_OFFLINE; fail fast instead of hanging.
        raise WeightsNotFoundError(_offline_message_timm(tagged, cfg, "HF_HUB_OFFLINE is set"))
    try:
        return timm.create_model(tagged, pretrained=True, **kwargs)
    except Exception as err:
        if is_unavailable_error(err):
            raise WeightsNotFoundError(_offline_message_timm(tagged, cfg, f"{type(err).__name__}: {err}")) from err
        raise


def _torch_hub_cached(url: str | None) -> bool:
    if not url:
        return False
    import torch.hub

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


def _offline_message_timm(tagged: str, cfg, cause: str) -> str:
    arch, _, tag = tagged.partition(".")
    out = f"{tagged}.safetensors"
    where = f"Hugging Face repo {cfg.hf_hub_id}" if cfg.hf_hub_id else f"URL {cfg.url}"
    lines = [
        f"pretrained weights for timm backbone {tagged!r} ({where}) are not available here: "
        "this machine cannot download them (offline or no connection) and they are not in the local cache.",
        "To provide them:",
        "  1. on a machine with internet, run",
        f"       python -m rskdist.models.fetch_weights {shlex.quote(tagged)} --out {shlex.quote(out)}",
        "     or, without rskdist installed,",
        "       python -c \"import timm, safetensors.torch as st; "
        f"m = timm.create_model('{tagged}', pretrained=True, num_classes=0); "
        "st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "
        f"'{out}')\"",
    ]
    if cfg.hf_hub_id:
        lines.append(f"     or: hf download {cfg.hf_hub_id} model.safetensors --local-dir .")
    lines += [
        "  2. copy the file to this machine and pass it as a path:",
        f"       model.backbone={tagged} model.pretrained=/path/to/{out}",
        "     (keeping the tag in the backbone name selects the matching mean/std).",
        f"Cause: {cause}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# open_clip


def _build_open_clip(
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
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet

    if pool != "auto":
        raise ValueError(
            f"open_clip backbones use the tower's own output (projected image embedding); "
            f"pool={pool!r} is not supported, use pool='auto'"
        )
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model {name!r}; close matches: {close}")
    vision_cfg = dict(model_cfg["vision_cfg"])
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    tag_cfg: dict[str, Any] = {}
    weights_cfg: WeightsConfig | None = None

    state = head_state = None
    source = "random init"
    if pretrained is not None:
        if looks_like_path(pretrained):
            path = pretrained
            source = f"file {pretrained}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained != "hub" else {}
            if not tag_cfg:
                raise ValueError(
                    f"open_clip model {name!r} has no pretrained tag {pretrained!r}; "
                    f"choose one of {tags} (e.g. pretrained={tags[0] if tags else 'openai'!r})"
                )
            path = _open_clip_download(name, pretrained, tag_cfg)
            source = f"hub {name}/{pretrained}"
        state, meta = read_state_dict(path)
        weights_cfg = read_weights_config(path, meta, "open_clip")
        _check_recorded_backbone(weights_cfg, name, path, library="open_clip")
        if weights_cfg is not None and weights_cfg.tag:
            tag_cfg = open_clip.get_pretrained_cfg(name, weights_cfg.tag)
        quick_gelu = (quick_gelu or bool(tag_cfg.get("quick_gelu", False))
                      or bool(weights_cfg is not None and weights_cfg.quick_gelu))
        state, head_state = split_retrieval_state(state)
        if head_state is None and any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}

    overrides = dict(backbone_kwargs)
    quick_gelu = bool(overrides.pop("quick_gelu", quick_gelu))
    vision_cfg.update(overrides)
    # Native size: the one the file records (its position grid), else the config's.
    native_size = (weights_cfg.image_size if weights_cfg else None) or vision_cfg.get("image_size")
    if native_size is not None:
        native_size = int(native_size[-1] if isinstance(native_size, (tuple, list)) else native_size)
    if image_size is not None or native_size is not None:
        vision_cfg["image_size"] = image_size or native_size
    if drop_path_rate:
        if not vision_cfg.get("timm_model_name"):
            raise ValueError(
                f"open_clip model {name!r} (native open_clip ViT/ResNet) has no stochastic depth; "
                "set drop_path_rate=0 (it is honoured for timm-based open_clip towers only)"
            )
        vision_cfg["timm_drop_path"] = drop_path_rate
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # weights come only from `pretrained`
    # Preprocessing the weights expect: the tag's (hub tag, or the tag the file records), then what
    # the file's own config records; open_clip merges them over its defaults (OpenAI mean/std).
    recorded = weights_cfg or WeightsConfig(source="")
    preprocess = {**tag_cfg, **{k: v for k, v in (("mean", recorded.mean), ("std", recorded.std),
                                                  ("interpolation", recorded.interpolation)) if v}}
    if recorded.mean or recorded.std:
        preprocessing = recorded.source
    elif tag_cfg:
        preprocessing = f"open_clip tag {weights_cfg.tag if weights_cfg and weights_cfg.tag else pretrained}"
    else:
        preprocessing = "open_clip defaults (OpenAI mean/std)"
    root_logger = logging.getLogger()
    root_logger.addFilter(_hide_random_init_notice)
    try:
        # open_clip's public builder makes the whole CLIP model; only the image tower is kept.
        # The text tower costs build time and memory once (ViT-L-14: 123M of 428M parameters,
        # ~0.5 GB while building) and is freed on return. The vision_cfg keyword replaces the
        # config's whole vision_cfg (so image_size is set there, not via force_image_size);
        # pretrained_text=False keeps Hugging Face text towers from downloading weights.
        # create_model ends with model.to(device): pass torch's current default device so the
        # tower stays where it was built (meta under `with torch.device("meta")`, CPU otherwise).
        clip = open_clip.create_model(
            name,
            pretrained=None,
            device=torch.get_default_device(),
            pretrained_text=False,
            force_preprocess_cfg=preprocess,
            vision_cfg=vision_cfg,
            quick_gelu=quick_gelu,
        )
    except TypeError as err:
        raise ValueError(f"cannot build open_clip tower {name!r} with {overrides}: {err}") from err
    except (RuntimeError, OSError) as err:
        raise ValueError(
            f"cannot build open_clip model {name!r}: {err}. The whole CLIP model is built to get its "
            "image tower, so a config with a Hugging Face text tower (roberta, xlm-roberta, mt5, nllb) "
            "needs `transformers` and, offline, that text model's config in the Hugging Face cache."
        ) from err
    finally:
        root_logger.removeFilter(_hide_random_init_notice)

    if state is not None:
        file_layout = layout_summary(state)
        _resample_open_clip_pos_embed(state, clip)
        load_strict(
            clip.visual, state, f"open_clip visual tower {name}", source,
            hint=f"the file holds   {file_layout}\n  the backbone is  {layout_summary(clip.visual.state_dict())}\n"
            + _mismatch_fix(name, state, weights_cfg, library="open_clip"),
        )
        _warn_other_architecture(weights_cfg, f"{OPEN_CLIP_PREFIX}{name}", path)

    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess["size"]  # the tower's image size, int or (h, w)
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    visual = clip.visual
    model = RetrievalModel(
        visual,
        feat_dim=int(model_cfg["embed_dim"]),
        embed_dim=embed_dim,
        pool=nn.Identity(),
        freeze_bn=freeze_bn,
        mean=preprocess["mean"],
        std=preprocess["std"],
        image_size=size,
        interpolation=preprocess["interpolation"],
        info=dict(
            backbone=f"{OPEN_CLIP_PREFIX}{name}",
            library="open_clip",
            weights=source,
            pool="open_clip tower output (projected)",
            quick_gelu=quick_gelu,
            native_image_size=native_size or size,
            preprocessing=preprocessing,
            # ModifiedResNet.set_grad_checkpointing exists but does nothing.
            supports_grad_checkpointing=not isinstance(visual, ModifiedResNet),
        ),
    )
    if head_state is not None:
        load_retrieval_rest(model, head_state, source)
    return model


def _hide_random_init_notice(record: logging.LogRecord) -> bool:
    """Root-logger filter for open_clip.create_model(pretrained=None)'s warning "Model
    initialized randomly": the weights are loaded into the tower right after, and
    describe() reports where they came from."""
    return "initialized randomly" not in record.getMessage()


def _resample_open_clip_pos_embed(state: dict, clip: nn.Module) -> None:
    """Resample a native open_clip ViT's position embeddings (in `state`, the visual tower's
    keys) to the grid of `clip.visual`, for weights saved at another image size.

    This is the one call into open_clip without a public route: `open_clip.model.resize_pos_embed`
    is what open_clip's own load_checkpoint uses, but it is not exported at the package top
    level, and load_checkpoint itself loads a whole CLIP state dict from a file. Pinned by
    tests/test_models.py::test_open_clip_weights_at_other_image_size.
    """
    from open_clip.model import resize_pos_embed

    if "positional_embedding" not in state:
        return
    clip_state = {"visual.positional_embedding": state["positional_embedding"]}
    resize_pos_embed(clip_state, clip)  # in place; no-op for timm towers and ResNets (no grid_size)
    state["positional_embedding"] = clip_state["visual.positional_embedding"]


def _open_clip_download(name: str, tag: str, tag_cfg: dict) -> str:
    """Path of a tag's weights file, downloaded into open_clip's cache if not there yet.

    open_clip fetches every tag it knows from the Hugging Face Hub (when huggingface_hub is
    installed, which it requires), so HF_HUB_OFFLINE applies and the cache location is
    huggingface_hub's; test_open_clip_tags_download_from_hf_hub pins that for the installed
    open_clip.
    """
    import open_clip

    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as err:
        if is_unavailable_error(err):
            raise WeightsNotFoundError(
                _offline_message_open_clip(name, tag, tag_cfg, f"{type(err).__name__}: {err}")
            ) from err
        raise
    if not path:
        raise WeightsNotFoundError(_offline_message_open_clip(name, tag, tag_cfg, "no download location"))
    return path


def _offline_message_open_clip(name: str, tag: str, tag_cfg: dict, cause: str) -> str:
    out = f"{name}.{tag}.safetensors"
    repo = tag_cfg.get("hf_hub", "").rstrip("/")
    lines = [
        f"pretrained weights for open_clip backbone {name!r} tag {tag!r} "
        f"({'Hugging Face repo ' + repo if repo else tag_cfg.get('url', '')}) are not available here: "
        "this machine cannot download them (offline or no connection) and they are not in the local cache.",
        "To provide them:",
        "  1. on a machine with internet, run",
        f"       python -m rskdist.models.fetch_weights open_clip:{name} --pretrained {tag} --out {out}",
        "     or, without rskdist installed,",
        "       python -c \"import open_clip, safetensors.torch as st; "
        f"m = open_clip.create_model('{name}', pretrained='{tag}'); "
        "st.save_file({k: v.contiguous() for k, v in m.visual.state_dict().items()}, "
        f"'{out}')\"",
    ]
    if repo:
        lines.append(f"     or (the whole CLIP model; its visual.* part is used): "
                     f"hf download {repo} open_clip_model.safetensors --local-dir .")
    lines += [
        "  2. copy the file to this machine and pass it as a path:",
        f"       model.backbone=open_clip:{name} model.pretrained=/path/to/{out}",
    ]
    if tag_cfg.get("quick_gelu"):
        lines.append(
            f"     (tag {tag!r} was trained with QuickGELU: files made by fetch_weights record this; for "
            f"other files use model.backbone=open_clip:{name}-quickgelu)"
        )
    lines.append(f"Cause: {cause}")
    return "\n".join(lines)


__all__ = ["OPEN_CLIP_PREFIX", "create_model"]
