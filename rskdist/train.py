"""rskdist training entry point.

    deepspeed [--num_nodes N] [--num_gpus G] rskdist/train.py --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node G rskdist/train.py --config configs/X.yaml [key=value ...]
    python rskdist/train.py --config configs/X.yaml [key=value ...]      # one process

Parses, validates (before any process group exists), works out the run's layout and data and
checks its loss fits the device (rskdist/startup.py), builds, trains, tears down; how a rank
starts, watches its launchers and reports a failure is in rskdist/launch.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(description="Train an RS@k retrieval model.", allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.global_batch=4096 loss.mix=none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    # Everything a user can get wrong in the config is checked here, before any
    # process group, model or allocation exists: every rank fails the same way.
    from rskdist.config import ignored_settings, load_config, validate
    from rskdist.launch import (init_process_group, local_world_size, report_failure, resume_after_restart,
                                single_process_env, watch_launchers, world_from_env)

    rank, world_size, local_rank = world_from_env()
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.run.resume = resume_after_restart(cfg.run.resume, rank)
        if rank == 0:
            for key in ignored_settings(cfg):
                print(f"warning: {key} is set, but data.source=synthetic does not use it", file=sys.stderr,
                      flush=True)
        validate(cfg, world_size=world_size)
    except ValueError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2

    single_process_env()
    import torch.distributed as dist

    from rskdist.startup import prepare
    from rskdist.store import is_url, join
    from rskdist.store.mirror import default_stage_dir
    from rskdist.trainer import Context, Preempted, Trainer

    device = init_process_group(local_rank, cfg.run.timeout_minutes)
    watch_launchers(dist.get_rank())
    run_dir, run_url = Path(cfg.run.output_dir) / cfg.run.name, None
    if is_url(cfg.run.output_dir):  # written to node-local staging, mirrored to the store (rskdist/store/mirror.py)
        run_dir, run_url = Path(cfg.run.stage_dir or default_stage_dir()) / cfg.run.name, join(cfg.run.output_dir,
                                                                                                cfg.run.name)
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                  run_dir=run_dir, run_url=run_url,
                  local_world_size=local_world_size())
    try:
        # The start-up checks that need the device (the loss's memory), then the run.
        setup = prepare(cfg, world_size=ctx.world_size, device=device, local_world_size=ctx.local_world_size,
                        group=dist.group.WORLD if ctx.world_size > 1 else None)
        Trainer(cfg, ctx, setup).train()
    except Preempted as exc:
        if ctx.rank == 0:
            print(f"rskdist: {exc}", file=sys.stderr, flush=True)
        code = Preempted.exit_code
    except BaseException as exc:  # noqa: BLE001 - any failure ends the whole job, loudly, on this rank
        code = report_failure(exc, rank=ctx.rank, world_size=ctx.world_size, timeout_minutes=cfg.run.timeout_minutes)
        # Leave at once, without destroy_process_group or exit handlers that could wait for the
        # other ranks: they see this process's connections close (gloo) or its launcher end
        # them, fail their next collective, and report it in turn.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    else:
        code = 0
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    # Run as a script, Python puts rskdist/ itself first on the path, where names like
    # `data` or `utils` would shadow other packages; put the checkout root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
