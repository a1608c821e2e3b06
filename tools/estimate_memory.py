#!/usr/bin/env python
"""Predict one rank's peak memory for a training setup; prints one JSON line.

    python tools/estimate_memory.py --config configs/inat_vit_l16_4node.yaml --world-size 32 --device cuda
    python tools/estimate_memory.py --config configs/inat_vit_l16.yaml --world-size 32 \\
        data.global_batch=16384 data.chunk_size=256 deepspeed.zero_stage=2 model.grad_checkpointing=true

The setup is the experiment config with its overrides, exactly as a training run reads
them (without --config, the defaults); the flags are only what a config does not hold:
the world size and the device. The batch layout is the run's own (rskdist/startup.py).
`total_mb` is the largest phase (`peak_phase`: build, flatten, partition, backward, step);
every part (`*_mb`) and phase total (`phase_*_mb`) is printed and explained in
rskdist/planning/memory.py. The loss part is the loss's own model (rskdist/loss/memory.py),
with RS@k's backend (`loss.options.impl`, default auto) as it runs on --device.
"""

from __future__ import annotations

import argparse
import json
import sys

# Flags of earlier versions that set config keys; the override is the one way now.
REPLACED_FLAGS = {
    "--backbone": "model.backbone", "--image-size": "model.image_size", "--global-batch": "data.global_batch",
    "--chunk-size": "data.chunk_size", "--zero-stage": "deepspeed.zero_stage", "--precision": "deepspeed.precision",
    "--optimizer": "optim.name", "--grad-checkpointing": "model.grad_checkpointing", "--embed-dim": "model.embed_dim",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, as for training")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args, unknown = p.parse_known_args(argv)
    names = [flag.split("=")[0] for flag in unknown]
    replaced = [f"{name} -> {REPLACED_FLAGS[name]}=VALUE" for name in names if name in REPLACED_FLAGS]
    if replaced:
        print(f"error: the setup comes from the config and its overrides; give {'; '.join(replaced)} "
              f"(an override, as for training)", file=sys.stderr)
        return 2
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")

    from rskdist.build import deepspeed_config
    from rskdist.config import load_config
    from rskdist.planning.memory import estimate_memory
    from rskdist.startup import resolve

    try:
        cfg = load_config(args.config, args.overrides)
        setup = resolve(cfg, world_size=args.world_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        num_classes = setup.data.num_classes  # a proxy loss's table, when the shard index is at hand
    except (OSError, ValueError, KeyError):
        num_classes = 0
    m, loss = cfg.model, cfg.loss
    estimate = estimate_memory(
        setup.layout, backbone=m.backbone, image_size=m.image_size, zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision, optimizer=cfg.optim.name, grad_checkpointing=m.grad_checkpointing,
        embed_dim=m.embed_dim, device=args.device, backbone_kwargs=m.backbone_kwargs, loss_name=loss.name,
        mix=loss.mix, num_classes=num_classes, mix_pairs_per_class=loss.simix_per_class or None,
        impl=loss.options.get("impl", "auto") if loss.name == "rsk" else "auto", block_size=loss.block_size or None,
        # The bucket sizes come from the DeepSpeed config the trainer generates (deepspeed.extra included).
        deepspeed_config=deepspeed_config(cfg.deepspeed, setup.layout, grad_clip=cfg.optim.grad_clip),
    )
    lay = setup.layout
    row = {"backbone": m.backbone, "image_size": m.image_size, "global_batch": lay.global_batch,
           "world_size": lay.world_size, "chunk_size": lay.chunk_size, "m": lay.m,
           "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision, "optimizer": cfg.optim.name,
           "grad_checkpointing": m.grad_checkpointing, "embed_dim": m.embed_dim, "loss_name": loss.name,
           "mix": loss.mix, "num_classes": num_classes, "device": args.device}
    print(json.dumps({**row, **estimate.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
