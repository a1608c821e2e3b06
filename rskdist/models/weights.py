"""Reading weight files safely and reporting what did not fit.

Files are safetensors or torch checkpoints loaded with `weights_only=True` (no pickled
code runs). A checkpoint may nest its state dict under "state_dict" / "model" /
"module" / "model_state_dict" (Lightning, DeepSpeed, plain torch.save of a dict) and
carry wrapper prefixes ("module." from DDP/DeepSpeed, "_orig_mod." from torch.compile);
both are undone here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".npz")
_NEST_KEYS = ("state_dict", "model", "module", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
METADATA_KEY = "rskdist"  # safetensors metadata written by rskdist.models.fetch_weights


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
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError for TorchScript archives, ...
            raise ValueError(
                f"cannot load {str(path)!r} safely with torch.load(weights_only=True): {err}\n"
                "It holds more than tensors (pickled objects or TorchScript). Re-save only the "
                "state dict, e.g. python -c \"import torch, safetensors.torch as st; "
                "sd = torch.load('IN', weights_only=False)['state_dict']; "
                "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\" "
                "on a machine where you trust the file."
            ) from err
    return _flatten(state, str(path)), metadata


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
    # Strip a wrapper prefix only when every key has it ("model." could be a real submodule).
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def split_retrieval_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Split a state dict into (backbone part, head part or None).

    A RetrievalModel state dict has "backbone.*" and "head.*" keys; anything else is
    taken as the backbone's own state dict (timm model, open_clip tower or full CLIP).
    """
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        other = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
        if other:
            raise WeightsMismatchError(
                f"RetrievalModel checkpoint has {len(other)} keys outside backbone./head.: "
                f"{other[:8]}"
            )
        return backbone, (head or None)
    return state, None


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
