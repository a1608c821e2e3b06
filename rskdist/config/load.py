"""Load, override, validate and save experiment configs.

    cfg = load_config("configs/debug.yaml", ["loss.mix=none", "data.global_batch=128"])
    validate(cfg, world_size=2)

Unknown keys, wrong types and values outside a field's choices raise ValueError naming
the dotted key and what is valid. Cross-field checks run once, before any process
group or allocation.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from rskdist.config import schema
from rskdist.config.schema import CHOICES, Config
from rskdist.parallel.layout import BatchLayout  # the one rule for how a batch splits over ranks
from rskdist.store.fs import Store, is_url, local_path

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _number(value: Any) -> Any:
    """A number written as text (`1e-4`: YAML 1.1 reads exponents without a dot as strings)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def _coerce(dotted: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's annotation (int, float, str, bool, list[T], dict,
    Literal[...], or a union of these: the first that fits); numbers written as text and
    exact whole floats for ints are accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alternative in args:
            try:
                return _coerce(dotted, value, alternative)
            except ValueError as exc:
                errors.append(str(exc).removeprefix("config: "))
        raise ValueError(f"config: {dotted}={value!r} fits none of: {'; '.join(errors)}")
    if origin is typing.Literal:
        if all(isinstance(a, int) for a in args):
            value = _coerce(dotted, value, int)
        if value not in args or isinstance(value, bool):
            raise ValueError(f"config: {dotted}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: {dotted} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{dotted}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        hint = dict
    if hint is float:
        value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if hint is int:
        value = _number(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config: {dotted} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"config: {dotted} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


# Keys that existed once, with what replaced them (an old config gets this, not "unknown key").
_RENAMED = {
    "loss.simix": "use loss.mix=simix (was loss.simix: true) or loss.mix=none (was false); "
                  "loss.mix=embedding mixes embeddings instead (docs/loss.md)",
    "run.tensorboard": "use run.loggers=[tensorboard] (was run.tensorboard: true) or run.loggers=[] (was false); "
                       "run.loggers also takes mlflow and wandb (docs/tracking.md)",
}

# How a run folder's config.yaml written before the change reads today: old key -> (the key
# of the same section that replaced it, its value from the old one). Experiment configs and
# overrides get the message above instead; a recorded config is rskdist's own record.
_RECORDED = {
    "loss.simix": ("mix", lambda old: "simix" if old else "none"),
    "run.tensorboard": ("loggers", lambda old: ["tensorboard"] if old else []),
}


def _apply(obj: Any, data: dict, prefix: str = "", recorded: bool = False) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"config: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = _hints(obj)
    if recorded:
        data = dict(data)
        for dotted, (new, convert) in _RECORDED.items():
            section, _, old = dotted.rpartition(".")
            if f"{section}." == prefix and old in data and new not in data:
                data[new] = convert(data.pop(old))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in _RENAMED:
            raise ValueError(f"config: '{dotted}' was replaced: {_RENAMED[dotted]}")
        if key not in fields:
            raise ValueError(f"config: unknown key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, f"{dotted}.", recorded)
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"config: override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"config: cannot parse the value of override '{text}': {exc}") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), *, recorded: bool = False) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (applied in order).

    `recorded`: the file is a run folder's config.yaml, written by rskdist; keys that an
    older version wrote and a newer one replaced are read as their replacement (an old
    run can still be evaluated, embedded or exported from its own record)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file not found: {path}; see configs/ for examples")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config: {path} is not valid YAML: {exc}") from None
        _apply(cfg, data, recorded=recorded)
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested)
    _check_choices(cfg)
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_choices(cfg: Config) -> None:
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ValueError(f"config: {dotted}={value!r} is not one of {', '.join(map(repr, choices))}")


def validate(cfg: Config, world_size: int, check_paths: bool = True) -> None:
    """Cross-field checks that need the world size; call once at start-up on every rank.

    With `check_paths`, files the run will read (shards, weights, resume checkpoint) must
    exist; config-only checks (tests of the shipped configs) turn it off.
    """
    d, loss, optim = cfg.data, cfg.loss, cfg.optim
    _check_choices(cfg)
    positive = {
        "data.global_batch": d.global_batch, "data.m": d.m, "data.chunk_size": d.chunk_size,
        "model.embed_dim": cfg.model.embed_dim, "model.image_size": cfg.model.image_size,
        "eval.batch_size": cfg.eval.batch_size, "run.log_every": cfg.run.log_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"config: {key} must be >= 1, got {value}")
    if cfg.eval.shard_above < -1 or cfg.eval.examples < 0:
        raise ValueError(f"config: eval.shard_above must be >= -1 (-1: never shard) and eval.examples >= 0; got "
                         f"{cfg.eval.shard_above} and {cfg.eval.examples}")
    if d.m < 2:
        raise ValueError(f"config: data.m={d.m}: RS@k needs at least 2 images per class in a batch")
    BatchLayout(global_batch=d.global_batch, world_size=world_size, m=d.m, chunk_size=d.chunk_size)
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ValueError(f"config: data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {d.crop_scale}")
    if len(d.crop_ratio) != 2 or not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ValueError(f"config: data.crop_ratio must be [low, high] with 0 < low <= high, got {d.crop_ratio}")
    shaping = [f"data.{k}={getattr(d, k)}" for k, default in (("remainder", "topup"), ("epoch_length", "auto"))
               if getattr(d, k) != default]
    if d.sampler == "reference" and shaping:
        raise ValueError(
            f"config: data.sampler=reference cannot honour {' and '.join(shaping)}: it fixes its own epoch (the "
            f"published code's, docs/data.md); remove {' and '.join(s.split('=')[0] for s in shaping)} "
            f"or use data.sampler=balanced"
        )
    if d.source == "shards" and not d.root:
        raise ValueError("config: data.source=shards needs data.root (a folder written by tools/make_shards.py)")
    if d.cache_gb <= 0 or d.request_kb < 1:
        raise ValueError(f"config: data.cache_gb must be > 0 and data.request_kb >= 1, got {d.cache_gb:g} and "
                         f"{d.request_kb}")
    if cfg.run.store_retries < 1 or cfg.run.upload_wait_minutes < 0:
        raise ValueError(f"config: run.store_retries must be >= 1 and run.upload_wait_minutes >= 0, got "
                         f"{cfg.run.store_retries} and {cfg.run.upload_wait_minutes:g}")
    if check_paths and is_url(cfg.run.output_dir):  # the bucket of the run folder, before any rank starts
        Store(cfg.run.output_dir, retries=cfg.run.store_retries).check_bucket("run.output_dir")
    local_root = not is_url(d.root)  # a store URL is checked with its splits, below
    if check_paths and d.source == "shards" and local_root and not (Path(local_path(d.root)) / "index.json").is_file():
        raise ValueError(
            f"config: data.root={d.root!r} holds no index.json; write the shards first "
            f"(python tools/make_shards.py {d.dataset} --root SRC --out {d.root}) or point data.root at them"
        )
    _check_splits(d, check_paths, retries=cfg.run.store_retries)
    if not cfg.run.timeout_minutes > 0:
        raise ValueError(f"config: run.timeout_minutes must be > 0, got {cfg.run.timeout_minutes}")
    if cfg.run.epochs <= 0 and cfg.run.max_steps <= 0:
        raise ValueError("config: set run.epochs > 0 or run.max_steps > 0")
    if not loss.ks or any(not isinstance(k, int) or k < 1 for k in loss.ks):
        raise ValueError(f"config: loss.ks must be a non-empty list of positive integers, got {loss.ks}")
    if (loss.tau1 != "k" and loss.tau1 <= 0) or loss.tau2 <= 0:
        raise ValueError(f"config: loss.tau1 and loss.tau2 must be > 0 (loss.tau1 may also be k: tau1 = k for each k), "
                         f"got loss.tau1={loss.tau1!r}, loss.tau2={loss.tau2!r}")
    if optim.lr <= 0:
        raise ValueError(f"config: optim.lr must be > 0, got {optim.lr}")
    if len(optim.betas) != 2:
        raise ValueError(f"config: optim.betas must have two values, got {optim.betas}")
    if sorted(optim.decay_epochs) != list(optim.decay_epochs):
        raise ValueError(f"config: optim.decay_epochs must be increasing, got {optim.decay_epochs}")
    from rskdist.loss.mixup import check_mix_mode  # the loss's own rule: SiMix is RS@k's

    try:
        check_mix_mode(loss.mix, loss_name=loss.name)
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None
    o, mc = cfg.optim, cfg.model
    if not 0 <= o.ema_decay < 1:
        raise ValueError(f"config: optim.ema_decay must be in [0, 1) (0: off; typical 0.999-0.9999), got {o.ema_decay}")
    if not 0 < o.layer_decay <= 1:
        raise ValueError(f"config: optim.layer_decay must be in (0, 1] (1: off; BEiT/DINOv2 use 0.65-0.9), got {o.layer_decay}")
    if o.head_lr_multiplier <= 0:
        raise ValueError(f"config: optim.head_lr_multiplier must be > 0, got {o.head_lr_multiplier}")
    if mc.freeze_blocks < 0:
        raise ValueError(f"config: model.freeze_blocks must be >= 0, got {mc.freeze_blocks}")
    if mc.freeze_blocks and mc.freeze_backbone:
        raise ValueError("config: model.freeze_blocks and model.freeze_backbone=true both set; freeze_backbone "
                         "freezes every block already: set one")
    if loss.backbone_warmup_epochs < 0 and loss.backbone_warmup_epochs != -1:
        raise ValueError(f"config: loss.backbone_warmup_epochs must be >= 0 (epochs with the backbone frozen) or -1 "
                         f"(the loss's paper default), got {loss.backbone_warmup_epochs}")
    if loss.proxy_lr_multiplier < 0:
        raise ValueError(f"config: loss.proxy_lr_multiplier must be >= 0 (0: the loss's default), got {loss.proxy_lr_multiplier}")
    if loss.saturation_steps < 1:
        raise ValueError(f"config: loss.saturation_steps must be >= 1, got {loss.saturation_steps}")
    from rskdist.loggers import check_loggers

    check_loggers(cfg.run.loggers)
    _check_deepspeed_extra(cfg.deepspeed.extra)
    _check_precision(cfg.deepspeed)
    _check_best_metric(cfg)
    from rskdist.models.weights import looks_like_path  # the factory's own rule for "a file, not a hub tag"

    weights = cfg.model.pretrained
    if check_paths and weights and weights != "hub" and looks_like_path(weights):
        if not Path(weights).is_file():
            raise ValueError(
                f"config: model.pretrained={weights!r}: no such file; pass a local weights file "
                f"(see docs/models.md: python -m rskdist.models.fetch_weights) or leave it empty for random init"
            )
    if check_paths and cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        raise ValueError(f"config: run.resume={cfg.run.resume!r} does not exist; use 'auto', 'never' or a checkpoint folder")


# DeepSpeed keys the two-pass step and the config own: where each is set instead.
_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.global_batch",
    "train_micro_batch_size_per_gpu": "data.chunk_size",
    "gradient_accumulation_steps": "data.chunk_size (one accumulation step per forward chunk)",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.* (warmup_steps, decay_epochs, decay_factor)",
}


def _check_deepspeed_extra(extra: dict) -> None:
    owned = [k for k in extra if k in _OWNED_DEEPSPEED_KEYS]
    stage = extra.get("zero_optimization", {})
    if isinstance(stage, dict) and "stage" in stage:
        raise ValueError("config: deepspeed.extra.zero_optimization.stage is set by deepspeed.zero_stage; use that")
    for section in ("fp16", "bf16"):
        if isinstance(extra.get(section), dict) and "enabled" in extra[section]:
            owned.append(f"{section}.enabled")
    if owned:
        where = "; ".join(f"{k} -> {_OWNED_DEEPSPEED_KEYS.get(k, 'deepspeed.precision')}" for k in owned)
        raise ValueError(f"config: deepspeed.extra may not set {', '.join(owned)}: the two-pass step derives them "
                         f"from the config ({where})")


def evaluated_metrics(cfg: Config) -> list[str]:
    """Names of the metrics every evaluation of this config reports."""
    from rskdist.eval.metrics import default_ks  # a leaf module: no cycle back into the config

    ks = list(cfg.eval.ks) or list(default_ks(cfg.data.dataset))
    return [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]


def _check_best_metric(cfg: Config) -> None:
    if cfg.eval.every_epochs < 0:
        return  # never evaluated: nothing to pick
    names = evaluated_metrics(cfg)
    if cfg.optim.ema_decay > 0:  # the averaged weights are evaluated too
        names = names + [f"ema/{n}" for n in names]
    if cfg.eval.best_metric not in names:
        raise ValueError(f"config: eval.best_metric={cfg.eval.best_metric!r} is not evaluated; choose one of "
                         f"{', '.join(names)} (or add its k to eval.ks)")


def _check_splits(d, check_paths: bool, retries: int) -> None:
    """data.test_splits and data.val_classes: names, and enough training classes left for one
    global batch (the batch plan would only fail once every rank has started)."""
    from rskdist.data.holdout import num_validation_classes
    from rskdist.eval.tracking import VALIDATION_SPLIT  # a leaf module, like eval.metrics

    if not d.test_splits or len(set(d.test_splits)) != len(d.test_splits) or not all(d.test_splits):
        raise ValueError(f"config: data.test_splits must be a non-empty list of distinct split names, "
                         f"got {d.test_splits}")
    try:
        num_validation_classes(1, d.val_classes)
    except ValueError:
        raise ValueError(f"config: data.val_classes={d.val_classes:g} must be 0 (off), a whole count >= 1 or a "
                         f"fraction in (0, 1) of the training classes") from None
    if d.val_classes and VALIDATION_SPLIT in d.test_splits:
        raise ValueError(f"config: data.test_splits holds {VALIDATION_SPLIT!r}, the name data.val_classes reports "
                         f"its held-out classes under; rename that split or set data.val_classes=0")
    if d.source == "synthetic":
        if d.test_splits != ["test"]:
            raise ValueError(f"config: data.test_splits={d.test_splits}: data.source=synthetic has one test split, "
                             f"'test'; use data.source=shards for other splits")
        num_classes, where = d.synthetic_classes, f"data.synthetic_classes={d.synthetic_classes}"
    elif check_paths:
        from rskdist.data.shards import load_index

        index = load_index(d.root, retries=retries)
        splits = index["splits"]
        missing = [s for s in ["train", *d.test_splits] if s not in splits]
        if missing:
            raise ValueError(f"config: data.root={d.root!r} has no split {', '.join(map(repr, missing))} "
                             f"(data.test_splits={d.test_splits}); its splits: {', '.join(sorted(splits))}")
        if is_url(d.root):  # every shard there, before any rank starts
            from rskdist.data.shards import check_store_shards

            check_store_shards(d.root, ["train", *d.test_splits], retries=retries, ranged=d.read_mode == "ranged",
                               index=index)
        num_classes = len(splits["train"]["classes"])
        where = f"the training split of data.root={d.root!r}"
    else:
        return  # shards not read (config-only checks)
    held = num_validation_classes(num_classes, d.val_classes)
    if held >= num_classes:
        raise ValueError(f"config: data.val_classes={d.val_classes:g} holds out {held} classes but there are only "
                         f"{num_classes} training classes ({where}); hold out at most {num_classes - 1}")
    batch_classes = d.global_batch // d.m
    if num_classes - held < batch_classes:
        left = f", {held} of them held out by data.val_classes={d.val_classes:g}" if held else ""
        raise ValueError(
            f"config: data.global_batch={d.global_batch} with data.m={d.m} needs {batch_classes} distinct training "
            f"classes per step, but there are {num_classes} ({where}){left}; lower data.global_batch"
            + (" or data.val_classes" if held else "")
            + (", or raise data.synthetic_classes" if d.source == "synthetic" else "")
        )


def ignored_settings(cfg: Config) -> list[str]:
    """Settings this config sets away from their defaults that the run will not use."""
    if cfg.data.source != "synthetic":
        return []
    default = Config().data
    names = ("num_workers", "crop_scale", "crop_ratio", "hflip", "sampler", "remainder", "epoch_length", "root")
    return [f"data.{n}" for n in names if getattr(cfg.data, n) != getattr(default, n)]


def _check_precision(ds) -> None:
    """Reject the (precision, ZeRO stage) pairs whose update DeepSpeed gets wrong.

    fp16 without ZeRO: DeepSpeed 0.19.8 wraps the optimizer in FP16_UnfusedOptimizer, whose
    step() divides the gradients by the loss scale (2^16) that engine.backward never
    multiplied in (it scales the loss for ZeRO optimizers only), so every update is 2^16
    times too small. (`deepspeed.extra` cannot change either setting: _check_deepspeed_extra.)
    """
    if ds.precision == "fp16" and ds.zero_stage == 0:
        raise ValueError(
            "config: deepspeed.precision=fp16 with deepspeed.zero_stage=0 is not supported: DeepSpeed's "
            "non-ZeRO fp16 optimizer divides the gradients by a loss scale that was never applied, so the "
            "weights barely move (2^16 times too small an update); use deepspeed.zero_stage=1 (same update, "
            "optimizer state sharded over ranks) or deepspeed.precision=bf16"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def markdown_reference() -> str:
    """docs/configuration.md: every section and field with type, default and comment."""
    source = inspect.getsource(schema)
    lines = ["# Configuration reference", "",
             "Generated by `python -m rskdist.config --markdown` from `rskdist/config/schema.py`.",
             "Set fields in YAML (`section: {key: value}`) or on the command line as `section.key=value`.", ""]
    sections = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
    for name, cls in sections.items():
        lines += [f"## `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        body = source[source.index(f"class {cls.__name__}"):]
        body = body[: body.find("\n\n\n")]
        for match in re.finditer(r"^    (\w+): (.+?) = (.+?)  # (.+)$", body, re.M):
            key, kind, _, comment = match.groups()
            default = getattr(getattr(Config(), name), key)
            choices = CHOICES.get(f"{name}.{key}")
            if choices:
                kind = type(choices[0]).__name__
                comment += f" (one of {', '.join(map(str, choices))})"
            kind = re.sub(r"Literal\[(.+?)\]", r"\1", kind).replace(" | ", " or ")  # a union: no | in the table
            lines.append(f"| `{name}.{key}` | {kind} | `{default!r}` | {comment} |")
        lines.append("")
    return "\n".join(lines)
