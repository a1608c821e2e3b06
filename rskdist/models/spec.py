"""The architecture a model was built with, recorded so it can be rebuilt without its weights.

`create_model` resolves part of the architecture from the weights it loads: an open_clip
file or tag decides QuickGELU against GELU, a weights file decides its native image size
and the mean/std the data pipeline normalises with. A model rebuilt later from the config
alone (`pretrained` left out: the weights file may be gone, or on another machine) would
silently differ: CLIP weights trained with QuickGELU, evaluated with GELU. So every model
carries `model.spec`, the keyword arguments of `create_model` with every such value
resolved, plus its preprocessing; a training run writes it into the run folder and each
checkpoint (`model.json`), and `rebuild_model(spec)` builds exactly that architecture with
random weights, ready for a checkpoint's state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPEC_FILE = "model.json"
SPEC_VERSION = 1

# create_model's architecture arguments (everything but `pretrained` and grad_checkpointing,
# which is how the model trains, not what it is).
BUILD_KEYS = ("backbone", "embed_dim", "pool", "gem_p", "gem_learnable", "image_size", "freeze_bn",
              "drop_path_rate", "backbone_kwargs")
PREPROCESS_KEYS = ("mean", "std", "interpolation")


def make_spec(model, build_args: dict[str, Any]) -> dict[str, Any]:
    """The spec of a model `create_model` just built from `build_args`: the arguments with
    what the weights decided filled in (image size, open_clip's activation), and the
    preprocessing the weights expect."""
    args = {k: build_args[k] for k in BUILD_KEYS}
    args["backbone_kwargs"] = dict(args["backbone_kwargs"] or {})
    args["image_size"] = int(model.image_size)
    if model.info.get("library") == "open_clip":
        args["backbone_kwargs"]["quick_gelu"] = bool(model.info["quick_gelu"])
    return {"version": SPEC_VERSION, **args, "mean": list(model.mean), "std": list(model.std),
            "interpolation": model.interpolation}


def rebuild_model(spec: dict[str, Any]):
    """A RetrievalModel of exactly the recorded architecture and preprocessing, random weights."""
    from .factory import create_model

    missing = [k for k in (*BUILD_KEYS, *PREPROCESS_KEYS) if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}; it was not written by rskdist "
                         f"(expected the {SPEC_FILE} of a run folder or checkpoint)")
    model = create_model(pretrained=None, **{k: spec[k] for k in BUILD_KEYS})
    set_preprocessing(model, spec["mean"], spec["std"], spec["interpolation"])
    return model


def set_preprocessing(model, mean, std, interpolation: str | None = None) -> None:
    """Replace the normalisation a model's data pipeline uses (and its spec with it)."""
    model.mean = tuple(float(v) for v in mean)
    model.std = tuple(float(v) for v in std)
    if interpolation is not None:
        model.interpolation = str(interpolation)
    if model.spec is not None:
        model.spec = {**model.spec, "mean": list(model.mean), "std": list(model.std),
                      "interpolation": model.interpolation}


def write_spec(spec: dict[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / SPEC_FILE
    tmp = path.with_name(SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_spec(folder: str | Path) -> dict[str, Any] | None:
    """The spec in `folder` (a run folder or a checkpoint folder), None if it has none."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it from another checkpoint of the run "
                         "(every checkpoint folder holds a copy)") from err
