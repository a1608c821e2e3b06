#!/usr/bin/env python
"""What a batch plan's epochs hold, from the labels alone (no image is read).

    python tools/plan.py --labels labels.npy --global-batch 4000 --m 4 --sampler reference --epochs 3
    python tools/plan.py --config configs/inat_r50.yaml data.root=/data/shards/inat --epochs 3

One JSON line per epoch: epoch, steps, images (distinct images shown), classes
(distinct classes among them), shown (images shown, repeats included: top-ups and
fillers of the balanced sampler), repeats (shown - images), images_fraction (images /
the split's images), and the settings: sampler, global_batch, m, seed, and
steps_per_epoch, the epoch length the trainer's schedule counts (the reference
sampler's varies per epoch: rskdist/data/sampler.py). With --summary, one line instead:
the range and mean of steps and images over the epochs.

--labels reads an integer label array (.npy, one label per training image); --config
reads the training labels of the config's shard folder (`data.root`) and takes the
global batch, m, sampler, seed, remainder and epoch length from the config, each
overridable by its flag. The plan is built for one rank: the global batches are the same
on every world size (each rank takes a contiguous slice of a step).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from rskdist.data.sampler import SAMPLERS, make_plan


def epoch_record(plan, labels: np.ndarray, epoch: int) -> dict:
    shown = plan.epoch_plan(epoch).reshape(-1)
    images = np.unique(shown)
    return {
        "epoch": epoch,
        "steps": plan.epoch_steps(epoch),
        "images": len(images),
        "classes": len(np.unique(labels[images])),
        "shown": len(shown),
        "repeats": len(shown) - len(images),
        "images_fraction": round(len(images) / len(labels), 4),
    }


def summary(records: list[dict]) -> dict:
    out = {"epochs": len(records)}
    for key in ("steps", "images", "classes", "images_fraction"):
        values = [r[key] for r in records]
        out.update({f"{key}_min": min(values), f"{key}_mean": round(float(np.mean(values)), 4),
                    f"{key}_max": max(values)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="integer label array, .npy")
    source.add_argument("--config", help="experiment YAML whose data.root holds the shards")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (with --config)")
    p.add_argument("--global-batch", type=int, help="images per step (config: data.global_batch)")
    p.add_argument("--m", type=int, help="images per class in a step (config: data.m; default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, help="config: data.sampler; default balanced")
    p.add_argument("--seed", type=int, help="config: run.seed; default 0")
    p.add_argument("--remainder", choices=["topup", "drop", "stochastic"], help="balanced only (data.remainder)")
    p.add_argument("--epoch-length", choices=["auto", "dataset"], help="balanced only (data.epoch_length)")
    p.add_argument("--epochs", type=int, default=1, help="epochs 0 .. E-1 (default 1)")
    p.add_argument("--summary", action="store_true", help="one line over all epochs instead of one per epoch")
    args = p.parse_args(argv)

    from rskdist.config import Config, load_config

    try:
        cfg = load_config(args.config, args.overrides) if args.config else Config()
        if args.config:
            if cfg.data.source != "shards":
                raise ValueError(f"{args.config}: data.source={cfg.data.source} has no label file; use --labels")
            from rskdist.data import load_split

            labels = load_split(cfg.data.root, "train").labels
        else:
            if args.overrides:
                raise ValueError("key=value overrides need --config")
            labels = np.load(args.labels)
        d = cfg.data
        setting = {
            "sampler": args.sampler or (d.sampler if args.config else "balanced"),
            "global_batch": args.global_batch or (d.global_batch if args.config else None),
            "m": args.m or d.m,
            "seed": cfg.run.seed if args.seed is None else args.seed,
        }
        if setting["global_batch"] is None:
            raise ValueError("--global-batch is needed with --labels")
        if setting["global_batch"] % setting["m"]:
            raise ValueError(f"--global-batch {setting['global_batch']} is not a multiple of --m {setting['m']}")
        # The config's remainder and epoch length shape its balanced sampler only.
        shaping = d if setting["sampler"] == "balanced" else Config().data
        epoch_length = args.epoch_length or shaping.epoch_length
        labels = np.asarray(labels, np.int64)
        plan = make_plan(
            setting["sampler"], labels, m=setting["m"], classes_per_rank=setting["global_batch"] // setting["m"],
            world_size=1, seed=setting["seed"], remainder=args.remainder or shaping.remainder,
            steps_per_epoch=None if epoch_length == "auto" else epoch_length,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setting["steps_per_epoch"] = plan.steps_per_epoch
    records = [epoch_record(plan, labels, e) for e in range(args.epochs)]
    for record in [summary(records)] if args.summary else records:
        print(json.dumps({**record, **setting}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
