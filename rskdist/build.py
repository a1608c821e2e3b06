"""Builders: everything a run is made of, from a Config.

Builders only: what they build is defined with its concern (the step's loss function and
the module DeepSpeed trains in rskdist/parallel/step_parts.py, the loss in rskdist/loss/).

The trainer composes these; tools (evaluation, the memory estimator) import them to
build the same model, streams and DeepSpeed config as a training run. The model is a
plain nn.Module (rskdist.models); DeepSpeed (ZeRO, precision, accumulation) is applied
to it by `build_engine`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from rskdist.config import Config, ModelConfig
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.parallel.step_parts import StepLoss, TrainModule

PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch splits over ranks and forward chunks."""

    global_batch: int
    local_batch: int  # images per rank per step
    classes_per_rank: int
    chunk_size: int  # images per forward chunk (the two-pass step's unit of activation memory)
    num_chunks: int  # chunks per rank per step = DeepSpeed's gradient accumulation steps


def batch_layout(cfg: Config, world_size: int) -> BatchLayout:
    d = cfg.data
    local = d.global_batch // world_size
    return BatchLayout(global_batch=d.global_batch, local_batch=local, classes_per_rank=local // d.m,
                       chunk_size=d.chunk_size, num_chunks=math.ceil(local / d.chunk_size))


def build_optimizer(model: torch.nn.Module, cfg, *, backbone_apart: bool = False) -> torch.optim.Optimizer:
    """A torch.optim optimizer (passing an object keeps DeepSpeed from compiling fused_adam).

    Weight decay applies to every parameter as in the published code, unless
    `optim.decay_norm_and_bias` is off (then biases, norms and token embeddings are exempt).
    Each group says what it holds under "role": "model", or "backbone" and "head" (the
    pooling and projection after it) when they are apart (a frozen-backbone warm-up,
    `optim.layer_decay`: one group per backbone layer, `optim.head_lr_multiplier`), and
    "proxies" (a loss's class proxies, at their own LR); "lr" is optim.lr times the group's
    "lr_scale"; `lr_lambdas` schedules each role. Frozen parameters have no group.
    """
    from rskdist.models.params import layered_param_groups, param_groups

    model_part = model.model if isinstance(model, TrainModule) else model
    apart = backbone_apart or cfg.layer_decay != 1.0 or cfg.head_lr_multiplier != 1.0
    if apart and not isinstance(getattr(model_part, "backbone", None), torch.nn.Module):
        raise ValueError(f"optim.layer_decay, optim.head_lr_multiplier and a frozen-backbone warm-up "
                         f"(loss.backbone_warmup_epochs) need a model with a .backbone (rskdist.models.RetrievalModel), "
                         f"got {type(model_part).__name__}")
    exclude = not cfg.decay_norm_and_bias
    if apart:
        groups = layered_param_groups(model_part, cfg.weight_decay, exclude_norm_bias=exclude,
                                      layer_decay=cfg.layer_decay, head_lr_scale=cfg.head_lr_multiplier)
    else:
        groups = [dict(g, role="model", layers="all", lr_scale=1.0)
                  for g in param_groups(model_part, cfg.weight_decay, exclude_norm_bias=exclude) if g["params"]]
    if isinstance(model, TrainModule):  # the loss's proxies: their own LR (a multiple of optim.lr)
        groups.append({"params": list(model.criterion.parameters()), "weight_decay": cfg.weight_decay,
                       "role": "proxies", "layers": "proxies", "lr_scale": float(model.lr_multiplier)})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, *, steps_per_epoch: int, warmup_steps: int, decay_epochs, decay_factor: float) -> float:
    """Linear warm-up, then step decay at the given epochs (the paper's schedule)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    drops = sum(1 for e in decay_epochs if step >= e * steps_per_epoch)
    return warm * decay_factor**drops


def backbone_frozen_steps(loss_cfg, criterion: torch.nn.Module, *, steps_per_epoch: float) -> int:
    """Steps at the start during which the backbone does not move (loss.backbone_warmup_epochs,
    -1 taking the loss's paper default: Proxy-Anchor's one epoch of head and proxies alone)."""
    epochs = loss_cfg.backbone_warmup_epochs
    if epochs < 0:
        epochs = float(getattr(criterion, "backbone_warmup_epochs", 0.0))
    return int(round(epochs * steps_per_epoch))


def describe_param_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    """One line per parameter group of `build_optimizer`: what it holds and its LR and decay."""
    lines = []
    for g in optimizer.param_groups:
        count = sum(p.numel() for p in g["params"])
        lines.append(f"  {g.get('role', 'model'):>8} layers {g.get('layers', 'all'):>7}: {count:>11,} params, "
                     f"lr {g['lr']:.3e} (x{g.get('lr_scale', 1.0):.4g}), weight decay {g['weight_decay']:g}")
    return lines


def lr_lambdas(optimizer: torch.optim.Optimizer, optim_cfg, *, steps_per_epoch: float, frozen_steps: int = 0):
    """One LR factor function per parameter group of `build_optimizer`: the schedule
    (`lr_factor`), and 0 for the backbone's groups during its first `frozen_steps` (an LR of
    0 moves nothing, AdamW's decoupled decay included; the gradients are still computed)."""
    def schedule(step: int) -> float:
        return lr_factor(step, steps_per_epoch=steps_per_epoch, warmup_steps=optim_cfg.warmup_steps,
                         decay_epochs=optim_cfg.decay_epochs, decay_factor=optim_cfg.decay_factor)

    def frozen_first(step: int) -> float:
        return 0.0 if step < frozen_steps else schedule(step)

    return [frozen_first if g.get("role") == "backbone" else schedule for g in optimizer.param_groups]


def build_model(model_cfg: ModelConfig, *, pretrained: bool = True) -> torch.nn.Module:
    """The retrieval model of a config's `model` section (random init when `pretrained` is False).

    `model.normalization=imagenet` replaces the mean/std the weights expect with ImageNet's
    (the published code's choice for every backbone); the data pipeline reads model.mean/std.
    """
    from rskdist.models import GeM, create_model
    from rskdist.models.spec import set_preprocessing

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"build_model takes the config's model section (cfg.model), got {type(model_cfg).__name__}")
    m = model_cfg
    model = create_model(
        m.backbone, embed_dim=m.embed_dim, pretrained=(m.pretrained or None) if pretrained else None, pool=m.pool,
        gem_p=m.gem_p, gem_learnable=m.gem_learnable, image_size=m.image_size,
        grad_checkpointing=m.grad_checkpointing, freeze_bn=m.freeze_bn, drop_path_rate=m.drop_path_rate,
        backbone_kwargs=m.backbone_kwargs,
    )
    if m.gem_learnable and not isinstance(model.pool, GeM):
        warnings.warn(f"model.gem_learnable=true has no effect: {m.backbone} is not pooled with GeM "
                      f"({model.info.get('pool')})", stacklevel=2)
    if m.normalization == "imagenet":
        weights_own = f"mean={model.mean}, std={model.std} from {model.info.get('preprocessing', 'the weights')}"
        set_preprocessing(model, IMAGENET_MEAN, IMAGENET_STD)
        model.info["preprocessing"] = f"ImageNet (model.normalization=imagenet; the weights' own: {weights_own})"
    if m.freeze_blocks or m.freeze_backbone:
        from rskdist.models.params import freeze_parameters

        freeze_parameters(model, blocks=m.freeze_blocks, backbone=m.freeze_backbone)
    return model


def load_trained_model(path, tag: str | None = None, *, model_cfg: ModelConfig | None = None) -> torch.nn.Module:
    """The trained model of a run or checkpoint folder (`tag`: latest, best or a step tag),
    rebuilt from the architecture the run recorded (model.json in the checkpoint folder,
    else in the run folder) and loaded with the checkpoint's weights; no weights file or hub
    is needed. Runs written before model.json existed are rebuilt from `model_cfg` (the
    model section of their config.yaml), with a warning: what the weights file decided (QuickGELU, mean/std)
    cannot be recovered from it."""
    import warnings

    from rskdist.checkpoint import load_model_state, resolve_checkpoint
    from rskdist.models import read_spec, rebuild_model

    folder, tag = resolve_checkpoint(path, tag)
    spec = read_spec(folder / tag) or read_spec(folder.parent)
    if spec is not None:
        model = rebuild_model(spec)
    elif model_cfg is None:
        raise ValueError(f"{folder / tag}: no model.json beside the checkpoint or in its run folder; pass the run's "
                         "config (--config) to rebuild the model from it")
    else:
        warnings.warn(
            f"{folder / tag}: no model.json (a run from before rskdist recorded the architecture); the model is "
            "rebuilt from the config alone, so what its weights file decided (open_clip QuickGELU, the weights' "
            "mean/std) is not known: set them with overrides (model.backbone_kwargs) if the run used such a file",
            stacklevel=2,
        )
        model = build_model(model_cfg, pretrained=False)
    model.load_state_dict(load_model_state(folder, tag))
    return model


def build_eval_stream(cfg: Config, *, split: str = "test", rank: int, world_size: int, mean, std):
    """One held-out split of the config's data, every image once over the ranks: a split of
    the shard folder (data.test_splits), or "val", the validation classes that
    data.val_classes holds out of the training split."""
    d, e = cfg.data, cfg.eval
    from rskdist.eval.tracking import VALIDATION_SPLIT

    held = validation_labels(cfg) if split == VALIDATION_SPLIT else None
    if d.source == "synthetic":
        from rskdist.data.synthetic_stream import SyntheticEvalStream

        if split != "test" and held is None:
            raise ValueError(f"data.source=synthetic has no split {split!r}: it has 'test', and 'val' when "
                             f"data.val_classes is set")
        return SyntheticEvalStream(
            num_train_classes=d.synthetic_classes, size=e.synthetic_size, rank=rank, world_size=world_size,
            batch_size=e.batch_size, image_size=cfg.model.image_size, seed=cfg.run.seed, noise=d.synthetic_noise,
            classes=held,
        )
    from rskdist.data import build_eval_loader

    return build_eval_loader(
        d.root, split="train" if held is not None else split, rank=rank, world_size=world_size,
        batch_size=e.batch_size, image_size=cfg.model.image_size, num_workers=d.num_workers, mean=mean, std=std,
        keep_labels=held, store=store_reading(cfg),
    )


def store_reading(cfg: Config):
    """How shards on a store are read (data.read_mode, data.cache_*, data.request_kb, run.store_retries)."""
    from rskdist.data.remote import StoreReading

    d = cfg.data
    return StoreReading(mode=d.read_mode, cache_dir=d.cache_dir, cache_bytes=int(d.cache_gb * 2**30),
                        request_bytes=d.request_kb * 1024, retries=cfg.run.store_retries)


def num_train_classes(cfg: Config) -> int:
    """Classes of the training split (labels are 0..C-1): the size of a proxy loss's table
    (validation classes held out included: their labels are simply never drawn)."""
    d = cfg.data
    if d.source == "synthetic":
        return d.synthetic_classes
    from rskdist.data.shards import load_index

    return len(load_index(d.root, retries=cfg.run.store_retries)["splits"]["train"]["classes"])


def validation_labels(cfg: Config) -> np.ndarray | None:
    """The training labels data.val_classes holds out for validation (fixed by run.seed), or
    None when it is 0. Every rank and tool draws the same ones (rskdist/data/holdout.py)."""
    if not cfg.data.val_classes:
        return None
    from rskdist.data.holdout import validation_classes

    return validation_classes(num_train_classes(cfg), cfg.data.val_classes, cfg.run.seed)


def training_labels(cfg: Config) -> np.ndarray | None:
    """The labels the training stream draws: all but the validation ones (None: all)."""
    held = validation_labels(cfg)
    return None if held is None else np.setdiff1d(np.arange(num_train_classes(cfg)), held)


def build_criterion(cfg: Config, *, num_classes: int | None = None) -> torch.nn.Module:
    """The loss of the config (`rskdist.loss.make_loss`): RS@k from the loss.* fields, a
    baseline from `loss.options` over its paper defaults. Proxy losses own parameters."""
    from rskdist.loss import make_loss

    loss = cfg.loss
    options = dict(loss.options)
    if loss.name == "rsk":
        options = dict(ks=tuple(loss.ks), tau1=loss.tau1, tau2=loss.tau2, count_self=loss.count_self,
                       block_size=loss.block_size or None, virtual_queries=loss.simix_queries, **options)
    return make_loss(loss.name, num_classes=num_classes, embed_dim=cfg.model.embed_dim, mix=loss.mix,
                     mix_per_class=loss.simix_per_class or None, **options)


def make_loss_fn(loss_cfg, *, seed: int, step: int, group) -> StepLoss:
    """The step's loss function (rskdist/parallel/step_parts.py) of a loss config without
    proxies (those need the trainer's loss, whose parameters live in the engine)."""
    return StepLoss(build_criterion(Config(loss=loss_cfg)), seed=seed, step=step, group=group)


def trained_module(cfg: Config, model: torch.nn.Module, criterion: torch.nn.Module) -> torch.nn.Module:
    """The model, or model + loss parameters (TrainModule) when the loss has any."""
    if not any(True for _ in criterion.parameters()):
        return model
    multiplier = cfg.loss.proxy_lr_multiplier or float(criterion.lr_multiplier)
    return TrainModule(model, criterion, lr_multiplier=multiplier, zero_stage=cfg.deepspeed.zero_stage)


def deepspeed_config(cfg: Config, *, chunk_size: int, num_chunks: int, world_size: int) -> dict:
    """The DeepSpeed config generated from ours; `deepspeed.extra` is merged last."""
    ds = {
        "train_micro_batch_size_per_gpu": chunk_size,
        # One accumulation step per chunk: the optimizer runs after the last chunk.
        "gradient_accumulation_steps": num_chunks,
        "train_batch_size": chunk_size * num_chunks * world_size,
        "gradient_clipping": cfg.optim.grad_clip,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    _merge(ds, cfg.deepspeed.extra)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_train_stream(cfg: Config, *, rank: int, world_size: int, mean, std, device: torch.device):
    """This rank's class-balanced training stream (equal steps on every rank)."""
    d = cfg.data
    classes_per_rank = batch_layout(cfg, world_size).classes_per_rank
    keep = training_labels(cfg)  # without the validation classes, if any
    if d.source == "synthetic":
        from rskdist.data.synthetic_stream import SyntheticTrainStream

        return SyntheticTrainStream(
            num_classes=d.synthetic_classes, rank=rank, world_size=world_size, classes_per_rank=classes_per_rank,
            m=d.m, image_size=cfg.model.image_size, seed=cfg.run.seed, noise=d.synthetic_noise, classes=keep,
        )
    from rskdist.data import build_train_loader

    return build_train_loader(
        d.root, rank=rank, world_size=world_size, classes_per_rank=classes_per_rank, m=d.m,
        image_size=cfg.model.image_size, num_workers=d.num_workers, seed=cfg.run.seed, mean=mean, std=std,
        keep_labels=keep, scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip, remainder=d.remainder,
        steps_per_epoch=None if d.epoch_length == "auto" else d.epoch_length, sampler=d.sampler,
        store=store_reading(cfg),
        # On GPUs images travel as uint8 and are normalised on the device.
        **({"device": device, "pin_memory": True} if device.type == "cuda" else {}),
    )


def build_engine(cfg: Config, model: torch.nn.Module, *, world_size: int, steps_per_epoch: int,
                 frozen_steps: int = 0):
    """(DeepSpeed engine, LR scheduler, description of the parameter groups) around `model`
    (optimizer and schedule from the config); the backbone keeps still for the first
    `frozen_steps` (`backbone_frozen_steps`)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg.optim, backbone_apart=frozen_steps > 0)
    groups = describe_param_groups(optimizer)  # before ZeRO replaces the groups' tensors by flat partitions
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(optimizer, cfg.optim, steps_per_epoch=steps_per_epoch, frozen_steps=frozen_steps))
    layout = batch_layout(cfg, world_size)
    ds_config = deepspeed_config(cfg, chunk_size=layout.chunk_size, num_chunks=layout.num_chunks,
                                 world_size=world_size)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                   config=ds_config)
    return engine, scheduler, groups
