"""The inference API: a trained model that embeds images, and its exported forms.

`load(path)` rebuilds the model of a run (or checkpoint, or weights file with its
architecture beside it) and returns an `InferenceModel`: uint8 images in, L2-normalised
embeddings out, with the normalisation inside. `embed` takes PIL images (the evaluation
transform of the loaders is applied, rskdist/data/transforms.py) or a uint8 tensor
already at `image_size`. `export` writes the same module as ONNX, TorchScript or
safetensors weights, each with a model card beside it (FILE.json) that says what goes in
and out and where the model came from; `load` reads a safetensors export back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rskdist.data.transforms import decode_eval, eval_transform, normalize

EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
CARD_SUFFIX = ".json"  # the model card of FILE is FILE.json
CARD_VERSION = 1
ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB per file
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class InferenceModel(torch.nn.Module):
    """A RetrievalModel for inference: forward(uint8 [b, 3, S, S]) -> float32 [b, d], L2-normalised.

    The normalisation (x / 255 - mean) / std is part of the module, so what `export` writes
    takes the same uint8 input. `embed` batches, runs without gradients on the model's
    device and returns the embeddings on the CPU.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.source: str | None = None  # the checkpoint or file it was loaded from (`load`)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.model.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.model.std

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(images_u8, self.mean, self.std)).float()

    def preprocess(self, images) -> torch.Tensor:
        """uint8 [n, 3, S, S] of a list of PIL images, image files (paths) or encoded bytes
        (the evaluation transform), or of a uint8 tensor, checked and passed as is."""
        size = self.image_size
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise ValueError(f"embed: a tensor must be uint8 [n, 3, {size}, {size}] (the model's image_size, "
                                 f"NCHW, RGB); got {images.dtype} {list(images.shape)}. Pass PIL images to have "
                                 f"the evaluation transform applied")
            return images
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise ValueError(f"embed: pass a list of PIL images (or paths, or encoded bytes) or a uint8 tensor; "
                             f"got {type(images).__name__}")
        arrays = [to_eval_array(image, size) for image in images]
        return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)

    @torch.no_grad()
    def embed(self, images, *, batch_size: int | None = None) -> torch.Tensor:
        """(n, d) float32 L2-normalised embeddings on the CPU of `images` (see `preprocess`)."""
        batch = self.preprocess(images)
        step, device = batch_size or self.batch_size, self.device
        out = [self(batch[i : i + step].to(device)).cpu() for i in range(0, len(batch), step)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)


def to_eval_array(image, size: int) -> np.ndarray:
    """uint8 [3, size, size]: the evaluation transform of a PIL image, an image file or encoded bytes."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return eval_transform(image, size)
    if isinstance(image, (bytes, bytearray)):
        return decode_eval(bytes(image), size)
    if isinstance(image, (str, os.PathLike)):
        return decode_eval(Path(image).read_bytes(), size)
    raise ValueError(f"embed: cannot read an image from {type(image).__name__}; pass PIL images, paths or bytes")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str | os.PathLike, tag: str | None = None, *, device: str | torch.device | None = None,
         batch_size: int = 64) -> InferenceModel:
    """The trained model of `path`, ready to embed images (on `device`: default CUDA if present).

    `path` is a run folder, its checkpoints/ folder or one checkpoint folder (`tag`: latest,
    the default; best; or a step tag), rebuilt from the architecture the run recorded
    (model.json); or a RetrievalModel weights file (.safetensors, .pt) with its architecture
    beside it: the model card FILE.json that `export` writes, else a model.json.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith("model_states.pt"):  # a DeepSpeed file: its checkpoint folder
        path = path.parent
    card = read_card(path) if path.is_file() else None
    if path.is_dir():
        from rskdist.build import load_trained_model
        from rskdist.checkpoint import resolve_checkpoint

        folder, tag = resolve_checkpoint(path, tag)
        model, source = load_trained_model(folder, tag), folder / tag
    elif path.suffix == ".onnx" or (card and card.get("format") != "safetensors"):
        raise ValueError(f"load: {path} is an exported model: run it with onnxruntime or torch.jit.load (its input "
                         f"and output are in {card_path(path)}); rskdist.load takes a run folder, a checkpoint or a "
                         f"weights file (tools/export.py --format safetensors)")
    elif path.suffix in WEIGHTS_SUFFIXES and path.is_file():
        if tag is not None:
            raise ValueError(f"load: tag={tag!r} names a checkpoint of a run; {path} is a weights file")
        model, source = _load_weights_file(path, card), path
    else:
        raise ValueError(f"load: {path} is neither a run or checkpoint folder nor a weights file "
                         f"({', '.join(WEIGHTS_SUFFIXES)})")
    loaded = InferenceModel(model, batch_size=batch_size).to(device or default_device())
    loaded.source = str(Path(source).resolve())
    return loaded


def _load_weights_file(path: Path, card: dict | None) -> torch.nn.Module:
    from rskdist.models import read_spec, read_state_dict, rebuild_model

    spec = card.get("spec") if card else read_spec(path.parent)
    if spec is None:
        raise ValueError(f"load: {path} holds weights but not the architecture; put its model card "
                         f"({path.name}{CARD_SUFFIX}, written by tools/export.py) or the run's model.json beside it")
    model = rebuild_model(spec)
    state, _ = read_state_dict(path)
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- model card


def card_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}{CARD_SUFFIX}")


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model card beside an exported FILE (FILE.json), None if there is none."""
    card = card_path(path)
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{card} is not valid JSON ({err}); export the model again") from err


def run_provenance(path: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """Where a run's model came from: the run folder, the checkpoint tag, the sha256 of the
    run's resolved config (config.yaml) and its final metrics (summary.json); None where the
    run folder has no such file."""
    from rskdist.checkpoint import resolve_checkpoint
    from rskdist.runlog import read_summary

    folder, tag = resolve_checkpoint(path, tag)
    run = folder.parent
    config = run / "config.yaml"
    summary = read_summary(run) or {}
    return {"run": str(run), "checkpoint": tag,
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "final_eval": summary.get("final_eval")}


def model_card(model: InferenceModel, *, fmt: str, file: str, provenance: dict | None = None) -> dict[str, Any]:
    """What an exported file takes and gives, and the architecture that rebuilds it."""
    from rskdist import __version__
    from rskdist.data.transforms import eval_resize_size

    inner, size = model.model, model.image_size
    spec = inner.spec
    return {
        "version": CARD_VERSION, "format": fmt, "file": file,
        "backbone": (spec or {}).get("backbone") or inner.info.get("backbone"),
        "image_size": size, "mean": list(model.mean), "std": list(model.std), "embedding_size": model.embed_dim,
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, size, size], "layout": "NCHW, RGB",
                  "preprocessing": f"shorter side resized to {eval_resize_size(size)} (bilinear), centre crop "
                                   f"{size}x{size}; the normalisation with mean/std is inside the model"},
        "output": {"name": "embeddings", "dtype": "float32", "shape": ["batch", model.embed_dim],
                   "l2_normalized": True},
        **(provenance or {}),
        "spec": spec,
        "rskdist": __version__, "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- export


def export(model: InferenceModel, out: str | os.PathLike, *, fmt: str, provenance: dict | None = None) -> Path:
    """Write `model` as `fmt` (onnx, torchscript, safetensors) to `out`, with its model card
    beside it (out + .json). ONNX and TorchScript take uint8 [batch, 3, S, S] of any batch size."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export: format {fmt!r}; valid choices: {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size, device = model.image_size, model.device
    # Batch 2 when tracing: a size-1 dimension would be specialised as a constant.
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    facts = {}
    model.cpu().eval()  # traced on the CPU: no device is baked into the graph
    try:
        if fmt == "onnx":
            facts["onnx_opset"] = _export_onnx(model, example, out)
        elif fmt == "torchscript":
            _export_torchscript(model, example, out)
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().clone().contiguous() for k, v in model.model.state_dict().items()}, str(out))
    finally:
        model.to(device)
    card = {**model_card(model, fmt=fmt, file=out.name, provenance=provenance), **facts}
    tmp = card_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path(out))
    return out


def _export_torchscript(model: InferenceModel, example: torch.Tensor, out: Path) -> None:
    """A traced TorchScript module (torch marks tracing deprecated but still runs it; the
    format is what C++ and older serving stacks load)."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # Expected: mean/std become constants; the backbones' checks of the image size are
        # constant for a model traced at its own size (the batch dimension stays free).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
        torch.jit.trace(model, example, check_trace=False).save(str(out))


def _export_onnx(model: InferenceModel, example: torch.Tensor, out: Path) -> int:
    """torch.export-based ONNX export (torch's default exporter since 2.9; it needs onnxscript):
    the TorchScript-based one (dynamo=False) warns that it will be removed. One file unless
    the weights pass protobuf's 2 GB limit (then they go to FILE.data beside it). Returns the
    opset written."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - what torch.onnx.export(dynamo=True) translates with
    except ImportError as err:
        raise ValueError(f"export to ONNX needs {err.name}: pip install 'rskdist[export]' (onnx, onnxscript, "
                         f"onnxruntime)") from err
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(out), dynamo=True, verbose=False, input_names=["images"],
                          output_names=["embeddings"], dynamic_shapes={"images_u8": {0: batch}},
                          external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES)
    header = onnx.load(str(out), load_external_data=False)
    return next(o.version for o in header.opset_import if o.domain in ("", "ai.onnx"))
