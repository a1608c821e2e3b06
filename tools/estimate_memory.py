#!/usr/bin/env python
"""Predict one rank's peak memory for a training setup; prints one JSON line.

    python tools/estimate_memory.py --config configs/inat_vit_l16_4node.yaml --world-size 32 --device cuda
    python tools/estimate_memory.py --backbone vit_large_patch16_224 --image-size 224 --global-batch 16384 \\
        --world-size 32 --chunk-size 256 --zero-stage 2 --precision bf16 --grad-checkpointing

With --config, the setup comes from the experiment config (and its overrides); flags
given explicitly win. `total_mb` is the largest phase (`peak_phase`: build, flatten,
partition, backward, step); every part (`*_mb`) and phase total (`phase_*_mb`) is printed
and explained in rskdist/planning/memory.py. The loss part is the loss's own model
(rskdist/loss/memory.py), with RS@k's backend (`loss.options.impl`, default auto) as it
runs on --device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _num_classes(cfg) -> int:
    """Training classes (proxy losses' table), when the shard index is at hand."""
    from rskdist.build import num_train_classes

    try:
        return num_train_classes(cfg)
    except (OSError, ValueError, KeyError):
        return 0

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML; its settings are the defaults")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--backbone")
    p.add_argument("--image-size", type=int)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--optimizer", choices=["adamw", "adam", "sgd"])
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--embed-dim", type=int)
    args = p.parse_args(argv)

    from rskdist.config import load_config
    from rskdist.planning.memory import estimate_memory

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def pick(flag, value):
        return value if flag is None else flag

    setup = dict(
        backbone=pick(args.backbone, cfg.model.backbone),
        image_size=pick(args.image_size, cfg.model.image_size),
        global_batch=pick(args.global_batch, cfg.data.global_batch),
        world_size=args.world_size,
        chunk_size=pick(args.chunk_size, cfg.data.chunk_size),
        zero_stage=pick(args.zero_stage, cfg.deepspeed.zero_stage),
        precision=pick(args.precision, cfg.deepspeed.precision),
        optimizer=pick(args.optimizer, cfg.optim.name),
        grad_checkpointing=pick(args.grad_checkpointing, cfg.model.grad_checkpointing),
        embed_dim=pick(args.embed_dim, cfg.model.embed_dim),
        m=cfg.data.m,
        simix=cfg.loss.mix == "simix",
        loss_name=cfg.loss.name,
        mix=cfg.loss.mix,
        mix_pairs_per_class=cfg.loss.simix_per_class or None,
        impl=cfg.loss.options.get("impl", "auto") if cfg.loss.name == "rsk" else "auto",
        block_size=cfg.loss.block_size or None,
        num_classes=_num_classes(cfg),
        device=args.device,
        backbone_kwargs=cfg.model.backbone_kwargs if args.backbone is None else {},
    )
    if setup["global_batch"] % setup["world_size"]:
        print(f"error: global batch {setup['global_batch']} is not divisible by world size {setup['world_size']}",
              file=sys.stderr)
        return 2
    # The bucket sizes come from the DeepSpeed config the trainer would generate (deepspeed.extra included).
    from rskdist.build import deepspeed_config

    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = setup["zero_stage"], setup["precision"]
    local_batch = setup["global_batch"] // setup["world_size"]
    ds_config = deepspeed_config(cfg, chunk_size=setup["chunk_size"],
                                 num_chunks=math.ceil(local_batch / setup["chunk_size"]),
                                 world_size=setup["world_size"])
    est = estimate_memory(**setup, deepspeed_config=ds_config)
    print(json.dumps({**{k: v for k, v in setup.items() if k != "backbone_kwargs"}, **est.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
