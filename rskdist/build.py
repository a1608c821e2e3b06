"""Builders: everything a run is made of, each from its section of the config.

Builders only, and each takes what it uses: its own section of the config (`cfg.optim`,
`cfg.loss`, ...) or plain keywords, never the whole config; rskdist/startup.py is the one
place that reads across sections. What they build is defined with its concern (the step's
loss function and the module DeepSpeed trains in rskdist/parallel/step_parts.py, the loss
in rskdist/loss/, the batch layout in rskdist/parallel/layout.py).

The trainer composes these; tools (evaluation, the memory estimator) import them to
build the same model, streams and DeepSpeed config as a training run. The model is a
plain nn.Module (rskdist.models); DeepSpeed (ZeRO, precision, accumulation) is applied
to it by `build_engine`.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import torch

from rskdist.config import ModelConfig
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.parallel.layout import BatchLayout
from rskdist.parallel.step_parts import StepLoss, TrainModule

PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class RunData:
    """The data a run reads, worked out once from the config's data section: the training
    classes, the ones data.val_classes holds out for validation, how shards on a store are
    read (`data.read_mode`, ...); it opens the training and held-out streams.

    `image_size` is the model's, `seed` the run's (the validation classes, the plans and the
    synthetic pixels follow it), `retries` run.store_retries; rskdist/startup.py makes one
    from a whole config (`run_data`).
    """

    def __init__(self, data_cfg, *, image_size: int, seed: int, retries: int):
        self.cfg, self.image_size, self.seed, self.retries = data_cfg, image_size, seed, retries

    @cached_property
    def num_classes(self) -> int:
        """Classes of the training split (labels are 0..C-1): the size of a proxy loss's table
        (validation classes included: their labels are simply never drawn)."""
        if self.cfg.source == "synthetic":
            return self.cfg.synthetic_classes
        from rskdist.data.shards import load_index

        return len(load_index(self.cfg.root, retries=self.retries)["splits"]["train"]["classes"])

    @cached_property
    def held_out(self) -> np.ndarray | None:
        """The training labels data.val_classes holds out for validation (fixed by the seed),
        or None when it is 0. Every rank and tool draws the same ones (rskdist/data/holdout.py)."""
        if not self.cfg.val_classes:
            return None
        from rskdist.data.holdout import validation_classes

        return validation_classes(self.num_classes, self.cfg.val_classes, self.seed)

    @property
    def train_labels(self) -> np.ndarray | None:
        """The labels the training stream draws: all but the validation ones (None: all)."""
        held = self.held_out
        return None if held is None else np.setdiff1d(np.arange(self.num_classes), held)

    @property
    def eval_splits(self) -> list[str]:
        """The held-out splits an evaluation reports, in order (the first picks `best`)."""
        from rskdist.eval.tracking import evaluated_splits

        return evaluated_splits(self.cfg.val_classes, self.cfg.test_splits)

    @cached_property
    def store(self):
        """How shards on a store are read (data.read_mode, data.cache_*, data.request_kb)."""
        from rskdist.data.remote import StoreReading

        d = self.cfg
        return StoreReading(mode=d.read_mode, cache_dir=d.cache_dir, cache_bytes=int(d.cache_gb * 2**30),
                            request_bytes=d.request_kb * 1024, retries=self.retries)

    def train_stream(self, layout: BatchLayout, *, rank: int, mean, std, device: torch.device):
        """This rank's class-balanced training stream (equal steps on every rank)."""
        d, keep = self.cfg, self.train_labels  # without the validation classes, if any
        common = dict(rank=rank, world_size=layout.world_size, classes_per_rank=layout.classes_per_rank, m=layout.m,
                      image_size=self.image_size, seed=self.seed)
        if d.source == "synthetic":
            from rskdist.data.synthetic_stream import SyntheticTrainStream

            return SyntheticTrainStream(num_classes=d.synthetic_classes, noise=d.synthetic_noise, classes=keep,
                                        **common)
        from rskdist.data import build_train_loader

        return build_train_loader(
            d.root, **common, num_workers=d.num_workers, mean=mean, std=std, keep_labels=keep,
            scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip, remainder=d.remainder,
            steps_per_epoch=None if d.epoch_length == "auto" else d.epoch_length, sampler=d.sampler,
            store=self.store,
            # On GPUs images travel as uint8 and are normalised on the device.
            **({"device": device, "pin_memory": True} if device.type == "cuda" else {}),
        )

    def eval_stream(self, split: str, *, batch_size: int, synthetic_size: int, rank: int, world_size: int,
                    mean, std):
        """One held-out split, every image once over the ranks: a split of the shard folder
        (data.test_splits), or "val", the validation classes held out of the training split.
        `synthetic_size` is the synthetic test split's size (eval.synthetic_size)."""
        from rskdist.eval.tracking import VALIDATION_SPLIT

        d = self.cfg
        held = self.held_out if split == VALIDATION_SPLIT else None
        if d.source == "synthetic":
            from rskdist.data.synthetic_stream import SyntheticEvalStream

            if split != "test" and held is None:
                raise ValueError(f"data.source=synthetic has no split {split!r}: it has 'test', and 'val' when "
                                 f"data.val_classes is set")
            return SyntheticEvalStream(
                num_train_classes=d.synthetic_classes, size=synthetic_size, rank=rank, world_size=world_size,
                batch_size=batch_size, image_size=self.image_size, seed=self.seed, noise=d.synthetic_noise,
                classes=held,
            )
        from rskdist.data import build_eval_loader

        return build_eval_loader(
            d.root, split="train" if held is not None else split, rank=rank, world_size=world_size,
            batch_size=batch_size, image_size=self.image_size, num_workers=d.num_workers, mean=mean, std=std,
            keep_labels=held, store=self.store,
        )


def build_criterion(loss_cfg, *, embed_dim: int | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """The loss of a config's loss section (`rskdist.loss.make_loss`): RS@k from the loss.*
    fields, a baseline from `loss.options` over its paper defaults. Proxy losses own
    parameters: a table of `num_classes` x `embed_dim` (model.embed_dim)."""
    from rskdist.loss import make_loss

    loss = loss_cfg
    options = dict(loss.options)
    if loss.name == "rsk":
        options = dict(ks=tuple(loss.ks), tau1=loss.tau1, tau2=loss.tau2, count_self=loss.count_self,
                       block_size=loss.block_size or None, virtual_queries=loss.simix_queries, **options)
    return make_loss(loss.name, num_classes=num_classes, embed_dim=embed_dim, mix=loss.mix,
                     mix_per_class=loss.simix_per_class or None, **options)


def make_loss_fn(loss_cfg, *, seed: int, step: int, group) -> StepLoss:
    """The step's loss function (rskdist/parallel/step_parts.py) of a loss config without
    proxies (those need the trainer's loss, whose parameters live in the engine)."""
    return StepLoss(build_criterion(loss_cfg), seed=seed, step=step, group=group)


def trained_module(model: torch.nn.Module, criterion: torch.nn.Module, *, proxy_lr_multiplier: float = 0.0,
                   zero_stage: int = 0) -> torch.nn.Module:
    """The model, or model + loss parameters (TrainModule) when the loss has any; their LR
    multiplier is loss.proxy_lr_multiplier, or the loss's paper default when that is 0."""
    if not any(True for _ in criterion.parameters()):
        return model
    multiplier = proxy_lr_multiplier or float(criterion.lr_multiplier)
    return TrainModule(model, criterion, lr_multiplier=multiplier, zero_stage=zero_stage)


def deepspeed_config(ds_cfg, layout: BatchLayout, *, grad_clip: float) -> dict:
    """The DeepSpeed config generated from the config's deepspeed section, the batch layout
    and optim.grad_clip; `deepspeed.extra` is merged last."""
    ds = {
        "train_micro_batch_size_per_gpu": layout.chunk_size,
        # One accumulation step per chunk: the optimizer runs after the last chunk.
        "gradient_accumulation_steps": layout.num_chunks,
        "train_batch_size": layout.chunk_size * layout.num_chunks * layout.world_size,
        "gradient_clipping": grad_clip,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": ds_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif ds_cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    _merge(ds, ds_cfg.extra)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_engine(module: torch.nn.Module, optim_cfg, ds_config: dict, *, steps_per_epoch: int,
                 frozen_steps: int = 0):
    """(DeepSpeed engine, LR scheduler, description of the parameter groups) around `module`:
    the optimizer and schedule of the config's optim section, DeepSpeed set by `ds_config`
    (`deepspeed_config`); the backbone keeps still for the first `frozen_steps`
    (`backbone_frozen_steps`)."""
    import deepspeed

    optimizer = build_optimizer(module, optim_cfg, backbone_apart=frozen_steps > 0)
    groups = describe_param_groups(optimizer)  # before ZeRO replaces the groups' tensors by flat partitions
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(optimizer, optim_cfg, steps_per_epoch=steps_per_epoch, frozen_steps=frozen_steps))
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                                   config=ds_config)
    return engine, scheduler, groups
