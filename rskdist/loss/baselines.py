"""Baseline losses (pytorch-metric-learning) on the global batch, with exact gradients.

The losses themselves are pytorch-metric-learning's (PML 2.9); this module fixes their
paper defaults, runs them on the gathered global batch and owns their class proxies.

| name | PML class (+ miner) | defaults | source |
|---|---|---|---|
| contrastive | ContrastiveLoss, CosineSimilarity | pos_margin=1.0, neg_margin=0.5 | Hadsell et al. 2006 (hinge form); cosine margins: PML docs (pos 1), neg 0.5 chosen here |
| multi_similarity | MultiSimilarityLoss + MultiSimilarityMiner | alpha=2, beta=50, base=0.5, miner_epsilon=0.1 | Wang et al. 2019 (MS loss, CVPR) |
| triplet | TripletMarginLoss + TripletMarginMiner("semihard"), squared L2 on unit vectors | margin=0.2 | Schroff et al. 2015 (FaceNet) |
| smooth_ap | SmoothAPLoss | temperature=0.01 | Brown et al. 2020 (Smooth-AP, ECCV) |
| proxy_anchor | ProxyAnchorLoss | margin=0.1, alpha=32, lr_multiplier=100, backbone_warmup_epochs=1 | Kim et al. 2020 (Proxy Anchor, CVPR) |
| norm_softmax | NormalizedSoftmaxLoss | temperature=0.05, lr_multiplier=1 | Zhai & Wu 2019 (Classification is a strong baseline, BMVC) |
| arcface | ArcFaceLoss | margin=28.6 (degrees, = 0.5 rad), scale=64, lr_multiplier=1 | Deng et al. 2019 (ArcFace, CVPR) |
| cosface | CosFaceLoss | margin=0.35 (on the cosine), scale=64, lr_multiplier=1 | Wang et al. 2018 (CosFace, CVPR) |

Every loss normalises the embeddings itself (cosine similarity, or Euclidean distance
between unit vectors for the triplet loss). `lr_multiplier` is not a loss option: it is
the factor on the learning rate of the class proxies, read by whoever builds the
optimizer (`module.lr_multiplier`); so is `backbone_warmup_epochs`, the epochs at the start
in which the backbone is frozen and only the head and proxies learn (Proxy-Anchor's
warm-up; `module.backbone_warmup_epochs`, config `loss.backbone_warmup_epochs`).

Across ranks each rank gathers the global batch (`replicated_embeddings`, rskdist/loss/mixup.py)
and computes the whole loss: PML's losses mine pairs and triplets over the whole batch,
which does not split into per-rank terms the way RS@k's queries do. The value is the
single-process loss of the concatenated batch on every rank; the embedding gradient is
this rank's rows of the single-process gradient; the proxy gradient is the full
single-process proxy gradient, identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rskdist.loss.mixup import check_group, draw_plan, global_labels, mix_embeddings, replicated_embeddings


@dataclass(frozen=True)
class Baseline:
    """One row of the table above."""

    pml_class: str  # name in pytorch_metric_learning.losses
    defaults: dict  # loss options and their paper values
    proxies: bool = False  # has class proxies (needs num_classes and embed_dim)
    lr_multiplier: float = 1.0  # learning-rate factor of the proxies (paper value)
    backbone_warmup_epochs: float = 0.0  # epochs with the backbone frozen at the start (paper value)
    miner: str | None = None  # name in pytorch_metric_learning.miners
    paper: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


BASELINES: dict[str, Baseline] = {
    "contrastive": Baseline("ContrastiveLoss", {"pos_margin": 1.0, "neg_margin": 0.5},
                            paper="Hadsell, Chopra, LeCun 2006"),
    "multi_similarity": Baseline("MultiSimilarityLoss", {"alpha": 2.0, "beta": 50.0, "base": 0.5, "miner_epsilon": 0.1},
                                 miner="MultiSimilarityMiner", paper="Wang et al. 2019"),
    "triplet": Baseline("TripletMarginLoss", {"margin": 0.2}, miner="TripletMarginMiner",
                        paper="Schroff, Kalenichenko, Philbin 2015"),
    "smooth_ap": Baseline("SmoothAPLoss", {"temperature": 0.01}, paper="Brown et al. 2020"),
    "proxy_anchor": Baseline("ProxyAnchorLoss", {"margin": 0.1, "alpha": 32.0}, proxies=True, lr_multiplier=100.0,
                             backbone_warmup_epochs=1.0, paper="Kim et al. 2020"),
    "norm_softmax": Baseline("NormalizedSoftmaxLoss", {"temperature": 0.05}, proxies=True,
                             paper="Zhai and Wu 2019"),
    "arcface": Baseline("ArcFaceLoss", {"margin": 28.6, "scale": 64.0}, proxies=True, paper="Deng et al. 2019"),
    "cosface": Baseline("CosFaceLoss", {"margin": 0.35, "scale": 64.0}, proxies=True, paper="Wang et al. 2018"),
}

# The attribute under which each PML proxy loss keeps its proxies, and its layout.
_PML_PROXY_ATTR = {"ProxyAnchorLoss": "proxies", "NormalizedSoftmaxLoss": "W", "ArcFaceLoss": "W", "CosFaceLoss": "W"}


def build_pml_loss(name: str, *, num_classes: int | None = None, embed_dim: int | None = None, **options):
    """(PML loss module, PML miner or None) with the paper defaults overridden by `options`.

    This is also what the tests compare against, built without rskdist's wrapper.
    """
    from pytorch_metric_learning import distances, losses, miners

    spec = BASELINES[name]
    opts = {**spec.defaults, **options}
    cls = getattr(losses, spec.pml_class)
    miner = None
    if name == "contrastive":
        loss = cls(pos_margin=opts["pos_margin"], neg_margin=opts["neg_margin"], distance=distances.CosineSimilarity())
    elif name == "multi_similarity":
        loss = cls(alpha=opts["alpha"], beta=opts["beta"], base=opts["base"])
        if opts["miner_epsilon"] is not None:
            miner = miners.MultiSimilarityMiner(epsilon=opts["miner_epsilon"])
    elif name == "triplet":
        # FaceNet: squared Euclidean distance between unit vectors, margin 0.2, semi-hard negatives.
        dist = distances.LpDistance(normalize_embeddings=True, p=2, power=2)
        loss = cls(margin=opts["margin"], distance=dist)
        miner = miners.TripletMarginMiner(margin=opts["margin"], type_of_triplets="semihard", distance=dist)
    elif name == "smooth_ap":
        loss = cls(temperature=opts["temperature"])
    else:
        loss = cls(num_classes=num_classes, embedding_size=embed_dim, **opts)
    return loss, miner


class BaselineLoss(nn.Module):
    """A baseline loss over the global batch; `forward(embeddings, labels, group=None, generator=None)`.

    group=None: the loss of the rows given (local). With a group: `embeddings`/`labels`
    are this rank's rows; the value is the loss of the global batch (ranks concatenated in
    order), the same on every rank, and the gradient flows to this rank's rows only.
    With mix="embedding" (checked by `make_loss`) the loss draws a plan from the global
    labels and `generator` (`mix_per_class` pairs per class, None: all) and adds the mixed
    embeddings.
    Class proxies, if any, are the parameter `proxies` (PML's layout: (num_classes, d) for
    proxy_anchor, (d, num_classes) for norm_softmax, arcface and cosface).
    """

    def __init__(self, name: str, *, num_classes: int | None = None, embed_dim: int | None = None,
                 mix: str = "none", mix_per_class: int | None = None, **options):
        super().__init__()
        spec = BASELINES[name]
        self.name, self.mix, self.mix_per_class = name, mix, mix_per_class
        valid = sorted(spec.defaults)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"loss.name={name}: unknown option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(valid)}")
        self.num_classes = None
        if spec.proxies:
            for key, value in (("num_classes", num_classes), ("embed_dim", embed_dim)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"loss.name={name} has class proxies and needs {key} (a positive integer), "
                                     f"got {value!r}; pass the training classes' count and the embedding size")
            self.num_classes = num_classes
        self.options = {**spec.defaults, **options}
        self.lr_multiplier = spec.lr_multiplier
        self.backbone_warmup_epochs = spec.backbone_warmup_epochs
        pml, self.miner = build_pml_loss(name, num_classes=num_classes, embed_dim=embed_dim, **options)
        if spec.proxies:
            # The proxies live here, so they are this module's parameter (optimizer groups,
            # state dicts, ZeRO partitioning see one tensor); PML reads a view of them per call.
            attr = _PML_PROXY_ATTR[spec.pml_class]
            self.proxies = nn.Parameter(getattr(pml, attr).detach().clone())
            del pml._parameters[attr]
            self._proxy_attr = attr
        self.pml = pml

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, group=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        check_group(group, "BaselineLoss")
        _check_batch(self.name, embeddings, labels)
        # fp32 at least (bf16 similarities are too coarse for margins of 0.1); float64 stays.
        if embeddings.dtype != torch.float64:
            embeddings = embeddings.float()
        labs = global_labels(labels.long(), group)  # the one gather of the labels
        plan = draw_plan(self.mix, labs, per_class=self.mix_per_class, generator=generator)
        emb = replicated_embeddings(embeddings, group)
        if plan is not None:
            emb, labs = mix_embeddings(emb, labs, plan)
        return self.batch_loss(emb, labs)

    def batch_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PML's loss on the rows given (already gathered and mixed)."""
        if self.num_classes is not None:
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"loss.name={self.name}: labels must lie in [0, {self.num_classes}) "
                                 f"(num_classes), got [{int(labels.min())}, {int(labels.max())}]; "
                                 "map the training classes to 0..num_classes-1")
            # PML casts its proxies to the embeddings' dtype in place; hand it a view in that
            # dtype so the parameter itself (maybe bf16 under DeepSpeed) is left as it is.
            setattr(self.pml, self._proxy_attr, self.proxies.to(device=emb.device, dtype=emb.dtype))
        if self.name == "smooth_ap":
            emb, labels = _grouped_by_class(emb, labels)
        try:
            indices = None if self.miner is None else self.miner(emb, labels)
            return self.pml(emb, labels, indices)
        finally:
            if self.num_classes is not None:
                delattr(self.pml, self._proxy_attr)  # drop the per-call view (and its graph)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"name={self.name}, mix={self.mix}, {opts}, lr_multiplier={self.lr_multiplier}"


def _grouped_by_class(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's SmoothAPLoss reads the batch as consecutive classes of equal size: sort by
    label (a permutation; the loss is a mean over queries, so the value is unchanged)."""
    _, counts = torch.unique(labels, return_counts=True)
    if bool((counts != counts[0]).any()):
        sizes = sorted(set(counts.tolist()))
        raise ValueError(
            f"loss.name=smooth_ap needs every class of the global batch to have the same number of samples "
            f"(PML's SmoothAPLoss), got class sizes {sizes}; use the class-balanced sampler (data.m images per "
            "class) and, with loss.mix=embedding, the same number of mixed pairs for every class"
        )
    order = torch.argsort(labels, stable=True)
    return emb[order], labels[order]


def _check_batch(name: str, embeddings, labels) -> None:
    if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f"loss.name={name}: embeddings and labels must be torch tensors")
    if embeddings.dim() != 2 or labels.dim() != 1 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"loss.name={name}: expected embeddings (B, d) and labels (B,), got "
                         f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"loss.name={name}: embeddings must be floating point, got {embeddings.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"loss.name={name}: labels must be integers, got {labels.dtype}")
