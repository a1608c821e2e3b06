"""The experiment configuration: typed dataclasses, one per concern.

Every field has a type and a comment; `rskdist.config.load` fills them from YAML plus
dotted `key=value` overrides and rejects unknown keys and wrong types. The
documentation page docs/configuration.md is generated from this file
(`python -m rskdist.config --markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class RunConfig:
    name: str = "run"  # run folder name under output_dir
    output_dir: str = "runs"  # parent of run folders: a path, or a store URL (s3://bucket/prefix, gs://...; the run is written to run.stage_dir and mirrored there, docs/distributed.md)
    stage_dir: str = ""  # run.output_dir a store URL: node-local folder the ranks write the run to before it is uploaded ("": a folder in the system temp dir)
    store_retries: int = 5  # attempts of each request to an object store (data and run folder), with exponential backoff from 0.5 s, before the run stops with an error
    upload_wait_minutes: float = 10.0  # run.output_dir a store URL: how long the end of the job waits for pending uploads before it lists what is missing
    seed: int = 0  # seeds model init, data order, SiMix plans and dropout
    epochs: float = 1.0  # training length in epochs of the training stream (fractions allowed)
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs decide)
    log_every: int = 1  # steps between progress lines and metric records
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones removed after a good save
    resume: str = "auto"  # "auto": continue from the run folder's latest checkpoint; "never"; or a checkpoint folder
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])  # experiment trackers fed besides metrics.jsonl, from rank 0: tensorboard (RUN/tb), mlflow, wandb (optional extras; docs/tracking.md); [] for none
    nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/Inf in embeddings or loss gradient on any rank: skip that update on every rank, or stop without saving
    nonfinite_max_skips: int = 10  # consecutive skipped steps after which run.nonfinite=skip stops the run too
    timeout_minutes: float = 30.0  # process-group timeout: a collective some rank never joins fails after this long (raise it if evaluation or checkpointing takes longer)


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny_patch16_224"  # timm model name or "open_clip:<name>"
    embed_dim: int = 512  # size of the L2-normalised embedding
    pretrained: str = ""  # "" random init; a local .safetensors/.pt file; or "hub" (needs internet)
    pool: Literal["auto", "cls", "gem", "avg"] = "auto"  # "auto": ViT CLS token, CNN GeM
    gem_p: float = 3.0  # GeM pooling exponent (its initial value when gem_learnable)
    gem_learnable: bool = False  # train the GeM exponent with the model (the published code's GeM); false keeps gem_p fixed
    image_size: int = 224  # input resolution
    normalization: Literal["weights", "imagenet"] = "weights"  # input mean/std: the weights' own, or ImageNet's for every backbone (the published code)
    grad_checkpointing: bool = False  # activation checkpointing of the backbone's blocks
    freeze_blocks: int = 0  # freeze the stem (patch embedding) and the first N blocks of the backbone: no gradient, no optimizer state
    freeze_backbone: bool = False  # freeze the whole backbone (linear probe: only the head learns)
    freeze_bn: bool = True  # BatchNorm in eval mode, so both passes of a step agree
    drop_path_rate: float = 0.0  # stochastic depth (replayed identically in the backprop pass)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the backbone factory


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"  # "synthetic" (in-memory, for tests) or "shards" (WebDataset folder from tools/make_shards.py)
    root: str = ""  # shard folder (with train/, test/, index.json) for source=shards: a path or a store URL (s3://bucket/prefix, gs://, https://; docs/data.md)
    read_mode: Literal["stage", "ranged"] = "stage"  # data.root a store URL: "stage" fetches each shard whole into data.cache_dir and reads it there; "ranged" reads images straight from the store, neighbours merged into requests of up to data.request_kb
    cache_dir: str = ""  # read_mode=stage: node-local folder of staged shards, shared by the node's ranks ("": a folder in the system temp dir)
    cache_gb: float = 50.0  # read_mode=stage: bound of data.cache_dir (least recently used shards go first)
    request_kb: int = 1024  # read_mode=ranged: largest merged ranged request, in KiB
    dataset: str = "demo"  # dataset name: picks default eval ks (inat, sop, cars196, cub, vehicleid, demo)
    global_batch: int = 64  # images per optimizer step over all ranks (classes x m)
    m: int = 4  # images per class in a batch
    chunk_size: int = 32  # images per forward chunk on one rank (two-pass step)
    num_workers: int = 2  # DataLoader workers per rank
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range (train)
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])  # RandomResizedCrop aspect-ratio range (train); [1, 1] keeps the aspect
    hflip: bool = True  # random horizontal flip (train); turn off for text, logos, glyphs, printed products
    sampler: Literal["balanced", "reference"] = "balanced"  # the epoch's batches: "balanced" (most steps without repeating a class's images, shaped by remainder and epoch_length) or "reference" (the published RS@k code's epoch: classes smaller than m never drawn, the epoch ends when fewer than global_batch / m classes hold m unused images; docs/data.md)
    remainder: Literal["topup", "drop", "stochastic"] = "topup"  # sampler=balanced: class images beyond a multiple of m: "topup" (repeat), "drop", "stochastic"
    epoch_length: Literal["auto", "dataset"] = "auto"  # sampler=balanced: "auto": most steps without repeating an image; "dataset": images / global batch
    val_classes: float = 0.0  # training classes held out as a validation set (class-disjoint from training, drawn with run.seed): a count (>= 1) or a fraction (0 < x < 1); `best` is then picked on it. 0: none
    test_splits: list[str] = field(default_factory=lambda: ["test"])  # splits of the shard folder evaluated, each reported under its own name; the first picks `best` when data.val_classes is 0
    synthetic_classes: int = 64  # source=synthetic: number of classes
    synthetic_noise: float = 0.5  # source=synthetic: instance noise around the class pattern


@dataclass
class LossConfig:
    name: Literal["rsk", "contrastive", "multi_similarity", "triplet", "smooth_ap", "proxy_anchor", "norm_softmax", "arcface", "cosface"] = "rsk"  # the loss of the global batch: RS@k or a baseline (docs/loss.md, "Baseline losses")
    mix: Literal["simix", "embedding", "none"] = "simix"  # mixup: SiMix on scalar similarities (RS@k only), mixed and re-normalised embeddings (any loss), or none
    options: dict[str, Any] = field(default_factory=dict)  # a baseline's own options (e.g. {margin: 0.2}); unset ones take the loss's paper defaults (docs/loss.md)
    backbone_warmup_epochs: float = -1.0  # epochs at the start with the backbone frozen (LR 0): only the head and a loss's proxies learn (-1: the loss's paper default, 1 for proxy_anchor, else 0)
    proxy_lr_multiplier: float = 0.0  # proxy losses: LR of the class proxies over optim.lr (0: the loss's paper default, e.g. 100 for proxy_anchor)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # k values of the recall@k surrogate
    tau1: float | Literal["k"] = 1.0  # temperature of the recall sigmoid; "k": tau1 = k for each k (the published code's default from 2022 to late 2024, docs/reproducing.md)
    tau2: float = 0.01  # temperature of the rank sigmoid
    count_self: bool = False  # count the query in its positives' ranks (published-code behaviour)
    block_size: int = 0  # queries per block in the kernel (0: automatic)
    simix_per_class: int = 0  # mixed (virtual) samples per class, for either mix (0: every same-class pair)
    simix_queries: bool = True  # loss.mix=simix: virtual samples also act as queries
    saturation: Literal["warn", "stop", "off"] = "warn"  # RS@k: a loss stuck near 1 with a vanishing gradient over the first steps: warn, stop the run, or do not check (baselines are not checked)
    saturation_steps: int = 20  # steps the saturation check watches from the start of training


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"  # optimizer
    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 4e-4  # decoupled (AdamW) or L2 (Adam, SGD) weight decay
    layer_decay: float = 1.0  # layer-wise LR decay (BEiT/DINOv2 fine-tuning): backbone layer i of L gets lr x layer_decay^(L+1-i), the stem least (1: off)
    head_lr_multiplier: float = 1.0  # LR of the head (pooling and projection after the backbone) over optim.lr
    decay_norm_and_bias: bool = True  # decay biases and norm weights too (as the published code); false exempts them
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) betas
    momentum: float = 0.0  # SGD momentum
    decay_epochs: list[float] = field(default_factory=list)  # epochs at which the LR is multiplied by decay_factor
    decay_factor: float = 0.3  # LR step-decay factor
    warmup_steps: int = 0  # linear warm-up steps
    ema_decay: float = 0.0  # exponential moving average of the weights, updated each step and evaluated beside them ("ema/" metrics; eval.best_metric may pick one); 0: off, e.g. 0.999
    grad_clip: float = 0.0  # gradient-norm clipping (0: off); set explicitly for DeepSpeed


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0  # ZeRO stage
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # training precision (fp16 needs zero_stage >= 1: docs/distributed.md)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config (expert use; keys the two-pass step owns are refused)


@dataclass
class EvalConfig:
    every_epochs: float = 1.0  # evaluate every this many epochs (0: only at the end; -1: never)
    at_start: bool = False  # also evaluate the untrained model before the first step
    ks: list[int] = field(default_factory=list)  # Recall@k values (empty: the dataset's default)
    batch_size: int = 64  # images per evaluation forward on one rank
    best_metric: str = "recall@1"  # metric that picks the best checkpoint: recall@<k> for an evaluated k, map@r or r_precision
    save_best: bool = True  # save a checkpoint at each new best evaluation (kept out of pruning; checkpoints/best names it)
    synthetic_size: int = 256  # source=synthetic: test images
    shard_above: int = 1_000_000  # above this many images a split's embeddings stay sharded over the ranks (each holds 1/W; exact, same metrics; docs/evaluation.md); 0: always, -1: never (every rank holds all)
    examples: int = 24  # queries shown with their 8 nearest neighbours in RUN/examples.html at each evaluation (0: no page)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _literal_choices() -> dict[str, tuple]:
    """{"section.key": allowed values} of every Literal-typed field (messages and docs)."""
    import dataclasses
    import typing

    out = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for name, hint in hints.items():
            if typing.get_origin(hint) is Literal:
                out[f"{section.name}.{name}"] = typing.get_args(hint)
    return out


CHOICES = _literal_choices()
