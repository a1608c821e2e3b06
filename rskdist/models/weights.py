"""Reading weight files safely and reporting what did not fit.

Files are safetensors or torch checkpoints loaded with `weights_only=True` (no pickled
code runs). A checkpoint may nest its state dict under "state_dict" / "model" /
"module" / "model_state_dict" (Lightning, DeepSpeed, plain torch.save of a dict) and
carry wrapper prefixes ("module." from DDP/DeepSpeed, "_orig_mod." from torch.compile);
both are undone here. A model-states file of an rskdist run
(RUN/checkpoints/<tag>/mp_rank_00_model_states.pt, ZeRO 0-2) holds the RetrievalModel
under "module", as model.* beside criterion.* when the loss had class proxies: the
model's part is taken (`model_part`). ZeRO-3 files hold partitions only and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".npz")
_NEST_KEYS = ("state_dict", "model", "module", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
METADATA_KEY = "rskdist"  # safetensors metadata written by rskdist.models.fetch_weights
# The config file each library's Hugging Face Hub layout keeps beside its weights (one model per folder):
# timm: model.safetensors / pytorch_model.bin + config.json ({"architecture", "pretrained_cfg": {...}});
# open_clip: open_clip_model.safetensors / open_clip_pytorch_model.bin + open_clip_config.json
# ({"model_cfg": {...}, "preprocess_cfg": {...}}).
SIDECAR_CONFIGS = {"timm": "config.json", "open_clip": "open_clip_config.json"}


class WeightsNotFoundError(ValueError):
    """Requested pretrained weights are neither on disk nor downloadable (offline)."""


class WeightsMismatchError(ValueError):
    """A weight file does not fit the model (missing / unexpected / mis-shaped keys)."""


def looks_like_path(pretrained: str) -> bool:
    """A path (rather than a hub tag): has a separator, a weights suffix, or exists."""
    if pretrained == "hub":
        return False
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.startswith("~")
        or pretrained.lower().endswith(WEIGHT_SUFFIXES)
        or os.path.exists(pretrained)
    )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a weight file -> (flat state dict with wrapper prefixes removed, metadata).

    metadata is the JSON dict fetch_weights stored in a safetensors header ({} otherwise).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file not found: {str(path)!r}. Pass model.pretrained=/path/to/file"
            " (.safetensors or a torch checkpoint), a hub tag such as 'hub', or nothing"
            " for random init."
        )
    metadata: dict = {}
    if path.suffix == ".npz":
        raise ValueError(
            f"{str(path)!r}: .npz (JAX/big_vision) checkpoints are not supported; fetch the timm or "
            "open_clip conversion instead (python -m rskdist.models.fetch_weights, see docs/models.md)"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw:
            metadata = json.loads(raw)
    else:
        if _is_torchscript(path):
            raise ValueError(
                f"{str(path)!r} is a TorchScript archive (e.g. OpenAI's original CLIP .pt files); "
                "loading it would run its code. Re-save its state dict once, on a machine where you "
                "trust the file: python -c \"import torch, safetensors.torch as st; "
                "sd = torch.jit.load('IN.pt', map_location='cpu').state_dict(); "
                "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\" "
                "(for CLIP its visual.* part is used), or fetch the open_clip file instead: "
                "python -m rskdist.models.fetch_weights open_clip:ViT-B-16 --pretrained openai --out OUT.safetensors"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, ...
            raise ValueError(
                f"cannot load {str(path)!r} safely with torch.load(weights_only=True): {err}\n"
                "It holds more than tensors (pickled objects or TorchScript). Re-save only the "
                "state dict, e.g. python -c \"import torch, safetensors.torch as st; "
                "sd = torch.load('IN', weights_only=False)['state_dict']; "
                "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\" "
                "on a machine where you trust the file."
            ) from err
        _check_not_zero3(state, path)
    return _flatten(state, str(path)), metadata


def _check_not_zero3(state, path: Path) -> None:
    """A DeepSpeed ZeRO-3 model-states file keeps empty placeholders where the weights were
    (each rank's partition lives in its optimizer-state file): say how to consolidate it."""
    module = state.get("module") if isinstance(state, Mapping) and "ds_version" in state else None
    if isinstance(module, Mapping) and any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in module.values()):
        raise ValueError(
            f"{str(path)!r} is a ZeRO-3 DeepSpeed checkpoint: its weights are partitioned over the ranks' files and "
            f"this one holds empty placeholders. Consolidate them into one file first: python -c \"import "
            f"safetensors.torch as st; from rskdist.checkpoint import load_model_state; st.save_file({{k: "
            f"v.contiguous() for k, v in load_model_state('{path.parent}').items()}}, 'model.safetensors')\" "
            f"and pass model.pretrained=model.safetensors"
        )


def model_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The retrieval model's weights of an rskdist checkpoint's state dict. A run whose loss
    had class proxies trained the model and the loss together (rskdist.parallel.step_parts.TrainModule:
    model.*, criterion.*): its model.* part, prefix removed; any other state dict as is."""
    if any(k.startswith("criterion.") for k in state) and any(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def _is_torchscript(path: Path) -> bool:
    """A torch.jit.save archive: a zip whose entries include the model's code/ folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.fullmatch(r"[^/]+/code/.*", name) for name in archive.namelist())


def _flatten(obj, where: str) -> dict[str, torch.Tensor]:
    # Descend through {"state_dict": {...}} style nesting; a real state dict maps str -> Tensor.
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        nested = next((k for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(
            f"{where}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})"
        )
    state = model_part(state)  # an rskdist run with a proxy loss: model.* beside criterion.*
    # Strip a wrapper prefix only when every key has it ("model." could be a real submodule).
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


@dataclass(frozen=True)
class WeightsConfig:
    """What a weights file records about itself; None where it records nothing.

    Read from fetch_weights' metadata inside the file, else from the config file that the
    library's hub layout keeps beside it (SIDECAR_CONFIGS). create_model takes the
    preprocessing (mean, std, native image size, interpolation) from here before the
    model library's registry, so the data pipeline normalises as the weights were trained.
    """

    source: str  # where it was read, for messages and describe()
    backbone: str | None = None  # timm name (with tag) or "open_clip:<config>"
    tag: str | None = None  # timm pretrained tag or open_clip pretrained tag
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int | None = None  # the resolution the weights were trained at (their position grid)
    interpolation: str | None = None
    quick_gelu: bool | None = None  # open_clip: the activation the weights were trained with
    vision_cfg: dict | None = None  # open_clip: the image tower's config


def read_weights_config(path: str | os.PathLike, metadata: dict, library: str) -> WeightsConfig | None:
    """The WeightsConfig of a weights file: its fetch_weights `metadata`, else the `library`'s
    config file in the same folder (config.json for timm, open_clip_config.json for open_clip),
    else None. A config.json of another kind (no "architecture" key) is ignored."""
    if metadata:
        backbone = metadata.get("backbone")
        tag = metadata.get("open_clip_tag") or (
            backbone.partition(".")[2] if backbone and not backbone.startswith("open_clip:") else None
        )
        return WeightsConfig(
            source=f"metadata in {os.fspath(path)}",
            backbone=backbone,
            tag=tag or None,
            mean=_floats(metadata.get("mean")),
            std=_floats(metadata.get("std")),
            image_size=_side(metadata.get("image_size")),
            quick_gelu=metadata.get("quick_gelu"),
        )
    sidecar = Path(os.path.expanduser(os.fspath(path))).parent / SIDECAR_CONFIGS[library]
    if not sidecar.is_file():
        return None
    try:
        cfg = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{sidecar}: cannot read the weights' config ({err}); fix or remove the file") from err
    if not isinstance(cfg, dict):
        return None
    if library == "timm":
        if not isinstance(cfg.get("architecture"), str):
            return None  # not timm's (e.g. a transformers config.json)
        pcfg = cfg.get("pretrained_cfg", cfg)  # timm's older exports keep a single flat dict
        tag = pcfg.get("tag") or None
        input_size = pcfg.get("input_size")
        return WeightsConfig(
            source=str(sidecar),
            backbone=f"{cfg['architecture']}.{tag}" if tag else cfg["architecture"],
            tag=tag,
            mean=_floats(pcfg.get("mean")),
            std=_floats(pcfg.get("std")),
            image_size=_side(input_size[-1] if input_size else None),
            interpolation=pcfg.get("interpolation"),
        )
    if "model_cfg" not in cfg:
        return None
    model_cfg, pre = cfg["model_cfg"] or {}, cfg.get("preprocess_cfg") or {}
    vision_cfg = dict(model_cfg.get("vision_cfg") or {})
    size = pre.get("size", vision_cfg.get("image_size"))
    return WeightsConfig(
        source=str(sidecar),
        mean=_floats(pre.get("mean")),
        std=_floats(pre.get("std")),
        image_size=_side(size[-1] if isinstance(size, (list, tuple)) else size),
        interpolation=pre.get("interpolation"),
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        vision_cfg=vision_cfg or None,
    )


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _side(size) -> int | None:
    return None if size is None else int(size)


def layout_summary(state: Mapping[str, torch.Tensor]) -> str:
    """One line saying what architecture a state dict holds, read from its key names and shapes.

    Used in WeightsMismatchError messages, where the file's layout and the backbone's are
    put side by side (this module imports no model library, so the backbone's state dict
    is passed in the same way).
    """
    if any(k.startswith("visual.") for k in state):
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        return "a whole CLIP model (image + text towers); image tower: " + layout_summary(visual)
    if "class_embedding" in state and "conv1.weight" in state:
        width, layers = state["class_embedding"].shape[-1], count_blocks(state, "transformer.resblocks.")
        patch = state["conv1.weight"].shape[-1]
        grid = _grid(state.get("positional_embedding"), 1)
        proj = f", projection to {state['proj'].shape[-1]}" if "proj" in state else ""
        return (f"an open_clip / OpenAI CLIP ViT image tower (width {width}, {layers} layers, "
                f"patch {patch}, {grid} grid{proj})")
    if "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state):
        width, patch = state["patch_embed.proj.weight"].shape[0], state["patch_embed.proj.weight"].shape[-1]
        facts = [f"width {width}", f"depth {count_blocks(state, 'blocks.')}", f"patch {patch}"]
        facts.append("LayerScale" if any(re.search(r"\.ls1\.(gamma|weight)$", k) for k in state) else "no LayerScale")
        registers = state.get("reg_token", state.get("register_tokens"))
        if registers is not None:
            facts.append(f"{registers.shape[1]} register tokens")
        if "pos_embed" in state:
            facts.append(f"{state['pos_embed'].shape[1]} position tokens")
        if "head.weight" in state:
            facts.append(f"classifier of {state['head.weight'].shape[0]} classes")
        kind = "DINOv2 ViT in Meta's original layout (mask_token)" if "mask_token" in state else "timm ViT"
        return f"a {kind} ({', '.join(facts)})"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return f"a ResNet-style CNN ({len(state)} tensors)"
    return f"a state dict of {len(state)} tensors (first keys: {sorted(state)[:4]})"


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(found)


def _grid(pos: torch.Tensor | None, num_prefix: int) -> str:
    if pos is None:
        return "no position"
    side = math.isqrt(pos.shape[-2] - num_prefix)
    return f"{side}x{side}" if side * side == pos.shape[-2] - num_prefix else f"{pos.shape[-2]}-token"


def split_retrieval_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Split a state dict into (backbone part, the rest of a RetrievalModel or None).

    A RetrievalModel state dict has "backbone.*" and "head.*" keys (and "pool.p" where its
    GeM exponent was learned); the rest keeps those prefixes. Anything else is taken as
    the backbone's own state dict (timm model, open_clip tower or full CLIP).
    """
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state.items() if k.startswith(("head.", "pool."))}
        other = sorted(k for k in state if not k.startswith(("backbone.", "head.", "pool.")))
        if other:
            raise WeightsMismatchError(
                f"RetrievalModel checkpoint has {len(other)} keys outside backbone./head./pool.: "
                f"{other[:8]}"
            )
        return backbone, (rest or None)
    return state, None


def load_retrieval_rest(model, rest: dict[str, torch.Tensor], source: str) -> None:
    """Load the head (and a learned GeM exponent) of a RetrievalModel file into `model`.

    A file whose GeM exponent was learned loads into a model that learns it too; a model
    that learns it from a file that kept it fixed starts at its own gem_p."""
    head = {k[len("head."):]: v for k, v in rest.items() if k.startswith("head.")}
    pool = {k[len("pool."):]: v for k, v in rest.items() if k.startswith("pool.")}
    load_strict(
        model.head, head, "retrieval head", source, prefix="head.",
        hint=f"The head maps feat_dim={model.feat_dim} to embed_dim={model.embed_dim}; use the embed_dim of the checkpoint.",
    )
    own_pool = model.pool.state_dict()
    if pool and not own_pool:
        raise WeightsMismatchError(
            f"weights from {source} hold a learned GeM exponent (pool.p = {float(pool['p'].reshape(-1)[0]):.4f}) but "
            "this model's pooling has no parameter; set model.gem_learnable=true (and model.pool=gem or auto on a CNN)")
    if own_pool and pool:
        load_strict(model.pool, pool, "GeM pooling", source, prefix="pool.")


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    source: str,
    *,
    prefix: str = "",
    hint: str = "Check that the file was made for this backbone (same model name, backbone_kwargs "
    "and, for open_clip, the matching -quickgelu config).",
) -> None:
    """load_state_dict with one readable error listing every mismatch.

    `prefix` is prepended to key names in the message (e.g. "head."). BatchNorm
    `num_batches_tracked` counters may be absent (torchvision-era files).
    """
    own = module.state_dict()
    missing = [prefix + k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [prefix + k for k in state if k not in own]
    mismatched = [
        f"{prefix}{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit the {what}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                lines.append(f"  {len(keys)} {title}: {keys[:8]}{more}")
        lines.append(f"  {hint}")
        raise WeightsMismatchError("\n".join(lines))
    module.load_state_dict(state, strict=False)


def hub_offline() -> bool:
    """True when Hugging Face Hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    # huggingface_hub (required by timm and open_clip) reads the variables once, at its import;
    # the environment is checked too for a variable set later in the process.
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return bool(constants.HF_HUB_OFFLINE)


def is_unavailable_error(err: BaseException) -> bool:
    """Whether an exception (or one it was raised from) means 'could not fetch the file'.

    OSError covers ConnectionError, socket/URL errors, FileNotFoundError and
    huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled / HTTP errors;
    httpx/requests transport errors are matched by their package.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (OSError, TimeoutError)):
            return True
        if type(err).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub"):
            return True
        err = err.__cause__ or err.__context__
    return False
