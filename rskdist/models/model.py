"""RetrievalModel: backbone -> pooled feature -> LayerNorm -> Linear -> L2 normalisation.

The model is a plain nn.Module; activation checkpointing, sharding and precision are
applied from outside: `create_model(grad_checkpointing=True)` (`model.grad_checkpointing`
in a config) calls `set_grad_checkpointing` on the built model, and DeepSpeed wraps it for
sharding and precision.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD

# The layers `freeze_bn` keeps in eval mode: torch's BatchNorms (their common base class is
# private to torch) and what subclasses them (timm's BatchNormAct2d, SyncBatchNormAct, ...).
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)


class GeM(nn.Module):
    """Generalised-mean pooling over the spatial grid: (mean_hw x^p)^(1/p).

    p = 1 is average pooling, p -> inf tends to max pooling; the RS@k paper uses p = 3
    on ResNet-50. With `learnable`, p is a parameter (shape (1,), trained with the rest of
    the model, as in the published RS@k code); otherwise it is a fixed float and not in
    the state dict.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.learnable = bool(learnable)
        self.p: float | nn.Parameter = nn.Parameter(torch.full((1,), float(p))) if learnable else float(p)
        self.eps = eps

    def forward(self, fmap_bchw: torch.Tensor) -> torch.Tensor:
        # fp32 for the power/root: x^3 of bf16 activations loses most of its mantissa.
        p = self.p.float() if self.learnable else self.p
        x = fmap_bchw.float().clamp(min=self.eps).pow(p)
        feat_bc = x.mean(dim=(-2, -1)).pow(1.0 / p)
        return feat_bc.to(fmap_bchw.dtype)

    def extra_repr(self) -> str:
        if not self.learnable:
            return f"p={self.p}, eps={self.eps}"
        p = "?" if self.p.is_meta else f"{self.p.detach().item():.4f}"  # a meta tensor has no value
        return f"p={p} (learned), eps={self.eps}"


class RetrievalModel(nn.Module):
    """Image -> unit-norm embedding [b, embed_dim].

    Args:
        backbone: module mapping images [b, 3, h, w] to either pooled features [b, feat_dim]
            (ViT CLS token, open_clip tower output) or a feature map [b, feat_dim, h', w'].
        feat_dim: channels of the backbone's output.
        embed_dim: output embedding size (d = 512 in the paper).
        pool: module turning the backbone output into [b, feat_dim] (GeM or Identity).
        freeze_bn: keep every BatchNorm layer in eval mode, even after `model.train()`,
            so running statistics never change and the two-pass step (forward without
            grad, then recompute with grad) sees identical normalisation. The BN affine
            weights stay trainable (frozen parameters have crashed ZeRO-3 with
            non-reentrant activation checkpointing upstream: "saved [1024] vs recomputed [0]").
        mean, std, image_size, interpolation: preprocessing the weights expect, for the
            data pipeline.
        info: facts for `describe()` (backbone name, weight source, pooling, preprocessing
            source) and the spec (library, quick_gelu); `supports_grad_checkpointing=False`
            makes `set_grad_checkpointing` warn and leave the backbone as it is.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        feat_dim: int,
        embed_dim: int = 512,
        pool: nn.Module | None = None,
        freeze_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_size: int = 224,
        interpolation: str = "bicubic",
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be > 0, got {embed_dim}")
        self.backbone = backbone
        self.pool = pool if pool is not None else nn.Identity()
        self.head = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, embed_dim))
        self.feat_dim = int(feat_dim)
        self.embed_dim = int(embed_dim)
        self.freeze_bn = bool(freeze_bn)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        self.interpolation = str(interpolation)
        self.info = dict(info or {})
        # create_model's resolved arguments (rskdist/models/spec.py): what rebuilds this model
        # without its weights file; None for a model built by hand.
        self.spec: dict[str, Any] | None = None
        self.grad_checkpointing = False
        if not self.freeze_bn and any(isinstance(m, BATCH_NORM_TYPES) for m in self.modules()):
            warnings.warn(
                "freeze_bn=False on a backbone with BatchNorm: the recompute pass of the "
                "two-pass step will not reproduce the first pass's embeddings exactly "
                "(batch statistics differ per chunk and running stats move).",
                stacklevel=2,
            )
        self.train(self.training)  # apply the BN freeze now, not only at the first .train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [b, 3, h, w] -> emb_bd [b, embed_dim], L2-normalised along d."""
        feat_bc = self.pool(self.backbone(images))
        emb_bd = self.head(feat_bc)
        return F.normalize(emb_bd, dim=-1)

    def train(self, mode: bool = True) -> "RetrievalModel":
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, BATCH_NORM_TYPES):
                    module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in backward instead of storing activations.

        timm and open_clip checkpoint with torch.utils.checkpoint (non-reentrant,
        RNG state preserved), so dropout/drop-path masks match between the passes.
        """
        fn = getattr(self.backbone, "set_grad_checkpointing", None)
        if fn is None or not self.info.get("supports_grad_checkpointing", True):
            if enable:
                warnings.warn(
                    f"backbone {self.info.get('backbone', type(self.backbone).__name__)} does not "
                    "support activation checkpointing; continuing without it",
                    stacklevel=2,
                )
            self.grad_checkpointing = False
            return
        fn(enable)
        self.grad_checkpointing = bool(enable)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def describe(model: nn.Module) -> str:
    """One line for logs: backbone, weights, pooling, dims, preprocessing, parameter counts."""
    total = count_params(model)
    trainable = count_params(model, trainable_only=True)
    if not isinstance(model, RetrievalModel):
        return f"{type(model).__name__}: params={_human(total)} (trainable {_human(trainable)})"
    info = model.info
    parts = [
        f"backbone={info.get('backbone', type(model.backbone).__name__)}",
        f"weights={info.get('weights', 'random init')}",
        f"pool={info.get('pool', type(model.pool).__name__)}"
        + (" (p learned)" if isinstance(model.pool, GeM) and model.pool.learnable else ""),
        f"head=LayerNorm({model.feat_dim})->Linear({model.feat_dim},{model.embed_dim})->L2",
        f"image_size={model.image_size}"
        + (f" (weights trained at {info['native_image_size']}: position grid resampled)"
           if info.get("native_image_size", model.image_size) != model.image_size else ""),
        f"mean={tuple(round(m, 4) for m in model.mean)}",
        f"std={tuple(round(s, 4) for s in model.std)}",
        *([f"preprocessing from {info['preprocessing']}"] if info.get("preprocessing") else []),
        f"params={_human(total)} (trainable {_human(trainable)}, backbone {_human(count_params(model.backbone))})",
        f"grad_checkpointing={model.grad_checkpointing}",
        f"freeze_bn={model.freeze_bn}",
    ]
    return "RetrievalModel(" + ", ".join(parts) + ")"
