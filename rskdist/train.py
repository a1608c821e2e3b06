"""rskdist training entry point.

    deepspeed [--num_nodes N] [--num_gpus G] rskdist/train.py --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node G rskdist/train.py --config configs/X.yaml [key=value ...]
    python rskdist/train.py --config configs/X.yaml [key=value ...]      # one process

Parses, validates (before any process group exists), builds, trains, tears down.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(description="Train an RS@k retrieval model.", allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.global_batch=4096 loss.simix=false")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by the deepspeed launcher or torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _single_process_env() -> None:
    """A plain `python rskdist/train.py` still runs through DeepSpeed: world of one."""
    if "WORLD_SIZE" in os.environ:
        return
    from rskdist.comm import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def collective_timeout_message(exc: BaseException, timeout_minutes: float, rank: int) -> str | None:
    """The user-facing line for a collective that timed out (gloo: "Timed out waiting
    ...ms", NCCL/c10d: "timeout"/"timed out"), else None."""
    text = str(exc).lower()
    if "timed out" not in text and "timeout" not in text:
        return None
    return (f"error: rank {rank}: a collective timed out after run.timeout_minutes={timeout_minutes:g}: another "
            f"rank did not join it (crashed, stuck, or still busy); if a phase legitimately takes longer "
            f"(evaluation, checkpointing), raise run.timeout_minutes")


def main(argv=None) -> int:
    args = _parse(argv)
    # Everything a user can get wrong in the config is checked here, before any
    # process group, model or allocation exists: every rank fails the same way.
    from rskdist.config import ignored_settings, load_config, validate

    rank, world_size, local_rank = _world_from_env()
    try:
        cfg = load_config(args.config, args.overrides)
        if rank == 0:
            for key in ignored_settings(cfg):
                print(f"warning: {key} is set, but data.source=synthetic does not use it", file=sys.stderr,
                      flush=True)
        validate(cfg, world_size=world_size)
    except ValueError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2

    _single_process_env()
    import deepspeed
    import torch
    import torch.distributed as dist

    from rskdist.trainer import Context, Trainer

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Several CPU ranks on one machine: split the cores instead of letting every rank's
        # thread pool spin on all of them (oversubscription slows every rank down).
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        if "OMP_NUM_THREADS" not in os.environ and local_procs > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    # The process-group timeout bounds every collective: a rank left waiting fails with
    # a message naming run.timeout_minutes instead of hanging (or gloo's 10-minute default).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                               timeout=timedelta(minutes=cfg.run.timeout_minutes))
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                  run_dir=Path(cfg.run.output_dir) / cfg.run.name)
    code = 0
    try:
        Trainer(cfg, ctx).train()
    except ValueError as exc:  # user-facing problems (weights offline, bad data folder, ...)
        # Every rank meets the same problem; one message is enough.
        if ctx.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except RuntimeError as exc:
        message = collective_timeout_message(exc, cfg.run.timeout_minutes, ctx.rank)
        if message:
            print(message, file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    # Run as a script, Python puts rskdist/ itself first on the path, where names like
    # `data` or `utils` would shadow other packages; put the checkout root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
