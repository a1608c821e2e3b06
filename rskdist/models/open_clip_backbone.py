"""An open_clip image tower with its retrieval head: `build_open_clip`, called by create_model.

The tower is `open_clip.create_model(...).visual`; weights (a file, or a tag's file from
open_clip's download) are loaded strictly into it. The one open_clip function used that is
not exported at the package's top level (position-embedding resampling) sits in
`_resample_open_clip_pos_embed`, pinned by a test. Preprocessing and QuickGELU come from the
tag, else the file's own config (weights.py), else open_clip's defaults.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
import torch.nn as nn

from .messages import check_recorded_backbone, mismatch_fix, offline_message_open_clip, warn_other_architecture
from .model import RetrievalModel
from .weights import (
    OPEN_CLIP_PREFIX,
    WeightsConfig,
    WeightsNotFoundError,
    is_unavailable_error,
    layout_summary,
    load_retrieval_rest,
    load_strict,
    looks_like_path,
    read_state_dict,
    read_weights_config,
    split_retrieval_state,
)

def build_open_clip(
    name: str,
    *,
    embed_dim: int,
    pretrained: str | None,
    pool: str,
    image_size: int | None,
    freeze_bn: bool,
    drop_path_rate: float,
    backbone_kwargs: dict[str, Any],
) -> RetrievalModel:
    """The RetrievalModel of open_clip config `name`'s image tower (the name without
    "open_clip:"); the arguments are create_model's (`pretrained` normalised: None, a file
    path, or an open_clip tag). No GeM arguments: the tower's own output is the feature."""
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
        check_recorded_backbone(weights_cfg, name, path, library="open_clip")
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
            + mismatch_fix(name, state, weights_cfg, library="open_clip"),
        )
        warn_other_architecture(weights_cfg, f"{OPEN_CLIP_PREFIX}{name}", path)

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
                offline_message_open_clip(name, tag, tag_cfg, f"{type(err).__name__}: {err}")
            ) from err
        raise
    if not path:
        raise WeightsNotFoundError(offline_message_open_clip(name, tag, tag_cfg, "no download location"))
    return path
