"""What create_model says about weights files and hub weights that cannot be used.

The checks and messages both backbone builders share (timm_backbone.py,
open_clip_backbone.py): a file made for the other library is refused before anything is
built, a file made for another architecture of the same layout loads with a warning, a
layout mismatch ends with the lines that name the fix, and hub weights this machine cannot
download come with the commands that provide them offline. Like weights.py, this module
imports a model library only inside the one function that needs it (open_clip, to name the
configs a CLIP file fits).
"""

from __future__ import annotations

import shlex
import warnings
from typing import TYPE_CHECKING

from .weights import OPEN_CLIP_PREFIX, WeightsConfig, WeightsMismatchError, count_blocks

if TYPE_CHECKING:
    from timm.models import PretrainedCfg


def check_recorded_backbone(weights_cfg: WeightsConfig | None, name: str, path: str, *, library: str) -> None:
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


def warn_other_architecture(weights_cfg: WeightsConfig | None, shown: str, path: str) -> None:
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
            stacklevel=5,  # counted through the backbone builder and create_model: keep this call depth
        )


def mismatch_fix(target: str, state: dict, weights_cfg: WeightsConfig | None, *, library: str) -> str:
    """The last lines of a layout-mismatch error: what to change, given what the file is."""
    lines = []
    if weights_cfg is not None and weights_cfg.backbone:
        lines.append(f"  The file's config ({weights_cfg.source}) says it was made for {weights_cfg.backbone}: "
                     f"set model.backbone={weights_cfg.backbone} (and the backbone_kwargs it was saved with).")
    clip_like = {k.removeprefix("visual."): v for k, v in state.items()} if library == "timm" else state
    if library == "timm" and "class_embedding" in clip_like and "conv1.weight" in clip_like:
        names = open_clip_configs_like(clip_like)
        lines.append("  This is an open_clip / OpenAI CLIP layout: use model.backbone=open_clip:<config>"
                     + (f" ({', '.join(names)} match its tower)" if names else ""))
    lines.append("  Check that the file was made for this backbone (same model name and backbone_kwargs), "
                 f"or fetch weights for it: python -m rskdist.models.fetch_weights "
                 f"{target if library == 'timm' else OPEN_CLIP_PREFIX + target} --out FILE.safetensors")
    return "\n".join(lines)


def open_clip_configs_like(tower_state: dict) -> list[str]:
    """open_clip config names whose native ViT tower has this state's width, depth and patch size."""
    import open_clip

    width = tower_state["class_embedding"].shape[-1]
    layers = count_blocks(tower_state, "transformer.resblocks.")
    patch = tower_state["conv1.weight"].shape[-1]
    out = []
    for model_name in open_clip.list_models():
        vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
        if (vision.get("width"), vision.get("layers"), vision.get("patch_size")) == (width, layers, patch):
            out.append(f"open_clip:{model_name}")
    return out[:6]


def offline_message_timm(tagged: str, cfg: PretrainedCfg, cause: str) -> str:
    """The WeightsNotFoundError text for timm hub weights (`tagged`: "arch.tag", `cfg` its timm
    PretrainedCfg) that cannot be downloaded here: how to fetch the file elsewhere and pass it."""
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


def offline_message_open_clip(name: str, tag: str, tag_cfg: dict, cause: str) -> str:
    """The WeightsNotFoundError text for an open_clip tag (`tag_cfg` its registry entry) whose
    weights cannot be downloaded here: how to fetch the file elsewhere and pass it."""
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

