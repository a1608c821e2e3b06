"""Load, override, validate and save experiment configs.

    cfg = load_config("configs/debug.yaml", ["loss.simix=false", "data.global_batch=128"])
    validate(cfg, world_size=2)

Unknown keys, wrong types and values outside a field's choices raise ValueError naming
the dotted key and what is valid. Cross-field checks run once, before any process
group or allocation.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from rskdist.config import schema
from rskdist.config.schema import CHOICES, Config

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _field_type(dc_field: dataclasses.Field) -> Any:
    hint = dc_field.type if isinstance(dc_field.type, str) else dc_field.type.__name__
    return _TYPES.get(hint, hint)


def _coerce(dotted: str, value: Any, kind: Any) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ValueError(f"config: {dotted} must be an integer, got {value!r}")
    if isinstance(kind, type) and not isinstance(value, kind):
        raise ValueError(f"config: {dotted} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ValueError(f"config: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"config: unknown key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(dotted, value, _field_type(fields[key])))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"config: override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"config: cannot parse the value of override '{text}': {exc}") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (applied in order)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file not found: {path}; see configs/ for examples")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config: {path} is not valid YAML: {exc}") from None
        _apply(cfg, data)
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
    if d.m < 2:
        raise ValueError(f"config: data.m={d.m}: RS@k needs at least 2 images per class in a batch")
    if d.global_batch % (world_size * d.m):
        local = d.global_batch / world_size
        raise ValueError(
            f"config: data.global_batch={d.global_batch} cannot be split over {world_size} ranks with "
            f"data.m={d.m} images per class (local batch {local:g} must be a whole multiple of m); "
            f"use a global batch that is a multiple of {world_size * d.m}"
        )
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ValueError(f"config: data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {d.crop_scale}")
    if d.source == "shards" and not d.root:
        raise ValueError("config: data.source=shards needs data.root (a folder written by tools/make_shards.py)")
    if check_paths and d.source == "shards" and not (Path(d.root) / "index.json").is_file():
        raise ValueError(
            f"config: data.root={d.root!r} holds no index.json; write the shards first "
            f"(python tools/make_shards.py {d.dataset} --root SRC --out {d.root}) or point data.root at them"
        )
    if not cfg.run.timeout_minutes > 0:
        raise ValueError(f"config: run.timeout_minutes must be > 0, got {cfg.run.timeout_minutes}")
    if cfg.run.epochs <= 0 and cfg.run.max_steps <= 0:
        raise ValueError("config: set run.epochs > 0 or run.max_steps > 0")
    if not loss.ks or any(not isinstance(k, int) or k < 1 for k in loss.ks):
        raise ValueError(f"config: loss.ks must be a non-empty list of positive integers, got {loss.ks}")
    if loss.tau1 <= 0 or loss.tau2 <= 0:
        raise ValueError("config: loss.tau1 and loss.tau2 must be > 0")
    if optim.lr <= 0:
        raise ValueError(f"config: optim.lr must be > 0, got {optim.lr}")
    if len(optim.betas) != 2:
        raise ValueError(f"config: optim.betas must have two values, got {optim.betas}")
    if sorted(optim.decay_epochs) != list(optim.decay_epochs):
        raise ValueError(f"config: optim.decay_epochs must be increasing, got {optim.decay_epochs}")
    weights = cfg.model.pretrained
    if check_paths and weights and weights != "hub" and ("/" in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")):
        if not Path(weights).is_file():
            raise ValueError(
                f"config: model.pretrained={weights!r}: no such file; pass a local weights file "
                f"(see docs/models.md: python -m rskdist.models.fetch_weights) or leave it empty for random init"
            )
    if check_paths and cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        raise ValueError(f"config: run.resume={cfg.run.resume!r} does not exist; use 'auto', 'never' or a checkpoint folder")


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
        for match in re.finditer(r"^    (\w+): (\w+) = (.+?)  # (.+)$", body, re.M):
            key, kind, _, comment = match.groups()
            default = getattr(getattr(Config(), name), key)
            choices = CHOICES.get(f"{name}.{key}")
            if choices:
                comment += f" (one of {', '.join(map(str, choices))})"
            lines.append(f"| `{name}.{key}` | {kind} | `{default!r}` | {comment} |")
        lines.append("")
    return "\n".join(lines)
