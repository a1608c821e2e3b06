#!/usr/bin/env python
"""What the durable save costs: a checkpoint of a config's model and AdamW state, written
through rskdist's CheckpointManager with its fsyncs and without them; one JSON line each.

    python tools/bench_checkpoint.py --config configs/sop_vit_b16.yaml --repeats 2

One process (ZeRO-0 on gloo), random weights (no weights file needed), one optimizer step
on two images so that the optimizer state exists, then `repeats` saves of each kind into
a temporary folder (or --dir, to measure another disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/sop_vit_b16.yaml")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = p.parse_args(argv)

    import deepspeed
    import torch
    import torch.distributed as dist

    import rskdist.checkpoint as ckpt
    from rskdist.build import build_model, build_optimizer, deepspeed_config
    from rskdist.parallel.layout import BatchLayout
    from rskdist.comm import free_port
    from rskdist.config import load_config

    cfg = load_config(args.config, ["model.pretrained=", "deepspeed.zero_stage=0", "deepspeed.precision=fp32"])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = build_model(cfg.model, pretrained=False)
    layout = BatchLayout(global_batch=2, world_size=1, m=1, chunk_size=2)  # one step of two images
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                      config=deepspeed_config(cfg.deepspeed, layout, grad_clip=cfg.optim.grad_clip))
    out = engine(torch.randn(2, 3, model.image_size, model.image_size))
    engine.backward(out.sum())
    engine.step()
    params = sum(q.numel() for q in model.parameters())
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    real_fsync = ckpt._fsync
    for fsync in [True, False] * args.repeats:
        ckpt._fsync = real_fsync if fsync else (lambda path: None)
        folder = root / f"run{time.monotonic_ns()}"
        manager = ckpt.CheckpointManager(folder, engine, rank=0, keep=1)
        t0 = time.perf_counter()
        manager.save(1, {"trainer": {}})
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (folder / "step00000001").iterdir())
        print(json.dumps({"config": args.config, "backbone": cfg.model.backbone, "params": params, "fsync": fsync,
                          "bytes": size, "seconds": round(seconds, 3), "dir": str(root)}), flush=True)
        shutil.rmtree(folder)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
