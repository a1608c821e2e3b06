"""The experiment configuration: typed dataclasses, one per concern.

Every field has a type and a comment; `rskdist.config.load` fills them from YAML plus
dotted `key=value` overrides and rejects unknown keys and wrong types. The
documentation page docs/configuration.md is generated from this file
(`python -m rskdist.config --markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    name: str = "run"  # run folder name under output_dir
    output_dir: str = "runs"  # parent of run folders
    seed: int = 0  # seeds model init, data order, SiMix plans and dropout
    epochs: float = 1.0  # training length in epochs of the training stream (fractions allowed)
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs decide)
    log_every: int = 1  # steps between progress lines and metric records
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones removed after a good save
    resume: str = "auto"  # "auto": continue from the run folder's latest checkpoint; "never"; or a checkpoint folder
    tensorboard: bool = True  # also write TensorBoard event files
    timeout_minutes: float = 30.0  # process-group timeout: a collective some rank never joins fails after this long (raise it if evaluation or checkpointing takes longer)


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny_patch16_224"  # timm model name or "open_clip:<name>"
    embed_dim: int = 512  # size of the L2-normalised embedding
    pretrained: str = ""  # "" random init; a local .safetensors/.pt file; or "hub" (needs internet)
    pool: str = "auto"  # "auto" (ViT: CLS token, CNN: GeM), "cls", "gem", "avg"
    gem_p: float = 3.0  # GeM pooling exponent
    image_size: int = 224  # input resolution
    grad_checkpointing: bool = False  # activation checkpointing of the backbone's blocks
    freeze_bn: bool = True  # BatchNorm in eval mode, so both passes of a step agree
    drop_path_rate: float = 0.0  # stochastic depth (replayed identically in pass 3)
    backbone_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the backbone factory


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" (in-memory, for tests) or "shards" (WebDataset folder from tools/make_shards.py)
    root: str = ""  # shard folder (with train/, test/, index.json) for source=shards
    dataset: str = "demo"  # dataset name: picks default eval ks (inat, sop, cars196, cub, demo)
    global_batch: int = 64  # images per optimizer step over all ranks (classes x m)
    m: int = 4  # images per class in a batch
    chunk_size: int = 32  # images per forward chunk on one rank (two-pass step)
    num_workers: int = 2  # DataLoader workers per rank
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range (train)
    remainder: str = "topup"  # class images beyond a multiple of m: "topup" (repeat), "drop", "stochastic"
    epoch_length: str = "auto"  # "auto": most steps without repeating an image; "dataset": images / global batch
    synthetic_classes: int = 64  # source=synthetic: number of classes
    synthetic_noise: float = 0.5  # source=synthetic: instance noise around the class pattern


@dataclass
class LossConfig:
    ks: list = field(default_factory=lambda: [1, 2, 4, 8, 16])  # k values of the recall@k surrogate
    tau1: float = 1.0  # temperature of the recall sigmoid
    tau2: float = 0.01  # temperature of the rank sigmoid
    count_self: bool = False  # count the query in its positives' ranks (published-code behaviour)
    block_size: int = 0  # queries per block in the kernel (0: automatic)
    simix: bool = True  # similarity mixup
    simix_per_class: int = 0  # virtual samples per class (0: every same-class pair)
    simix_queries: bool = True  # virtual samples also act as queries


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw", "adam" or "sgd"
    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 4e-4  # decoupled (AdamW) or L2 (Adam, SGD) weight decay
    decay_norm_and_bias: bool = True  # decay biases and norm weights too (as the published code); false exempts them
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) betas
    momentum: float = 0.0  # SGD momentum
    decay_epochs: list = field(default_factory=list)  # epochs at which the LR is multiplied by decay_factor
    decay_factor: float = 0.3  # LR step-decay factor
    warmup_steps: int = 0  # linear warm-up steps
    grad_clip: float = 0.0  # gradient-norm clipping (0: off); set explicitly for DeepSpeed


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0, 1, 2 or 3
    precision: str = "fp32"  # "fp32", "bf16" or "fp16"
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config (expert use)


@dataclass
class EvalConfig:
    every_epochs: float = 1.0  # evaluate every this many epochs (0: only at the end; -1: never)
    at_start: bool = False  # also evaluate the untrained model before the first step
    ks: list = field(default_factory=list)  # Recall@k values (empty: the dataset's default)
    batch_size: int = 64  # images per evaluation forward on one rank
    best_metric: str = "recall@1"  # metric that picks the best checkpoint
    synthetic_size: int = 256  # source=synthetic: test images


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.source": ("synthetic", "shards"),
    "data.remainder": ("topup", "drop", "stochastic"),
    "data.epoch_length": ("auto", "dataset"),
    "optim.name": ("adamw", "adam", "sgd"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "model.pool": ("auto", "cls", "gem", "avg"),
}
