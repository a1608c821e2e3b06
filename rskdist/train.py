"""rskdist training entry point.

    deepspeed [--num_nodes N] [--num_gpus G] rskdist/train.py --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node G rskdist/train.py --config configs/X.yaml [key=value ...]
    python rskdist/train.py --config configs/X.yaml [key=value ...]      # one process

Parses, validates (before any process group exists), builds, trains, tears down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(description="Train an RS@k retrieval model.", allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.global_batch=4096 loss.mix=none")
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


def report_failure(exc: BaseException, *, rank: int, world_size: int, timeout_minutes: float) -> int:
    """Print this rank's failure (one line naming rank and host, a traceback for bugs) and
    return the exit code: 2 for user-facing problems (ValueError), 130 for Ctrl-C, else 1."""
    import socket
    import traceback

    where = f"rank {rank} ({socket.gethostname()}): " if world_size > 1 else ""
    if isinstance(exc, ValueError):  # user-facing problems: weights offline, bad data, a saturated loss, ...
        print(f"error: {where}{exc}", file=sys.stderr, flush=True)
        return 2
    if isinstance(exc, KeyboardInterrupt):
        print(f"error: {where}interrupted", file=sys.stderr, flush=True)
        return 130
    text = str(exc)
    timed_out = collective_timeout_message(exc, timeout_minutes, rank)
    if type(exc).__name__ == "StoreUnavailable":  # the store stopped answering (rskdist/store/fs.py); a
        # DataLoader worker's is re-raised with its traceback in the text: its last line is the message
        print(f"error: {where}{text.strip().splitlines()[-1].removeprefix('rskdist.store.fs.StoreUnavailable: ')}",
              file=sys.stderr, flush=True)
    elif timed_out:
        print(timed_out, file=sys.stderr, flush=True)
    elif "Connection closed by peer" in text or "Connection reset by peer" in text:
        print(f"error: {where}lost the connection to another rank, which failed or was killed first "
              f"(its own message is above, or in its node's log)", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc, file=sys.stderr)
        print(f"error: {where}{type(exc).__name__}: {text}", file=sys.stderr, flush=True)
    return 1


def collective_timeout_message(exc: BaseException, timeout_minutes: float, rank: int) -> str | None:
    """The user-facing line for a collective that timed out (gloo: "Timed out waiting
    ...ms", NCCL/c10d: "timeout"/"timed out"), else None."""
    text = str(exc).lower()
    if "timed out" not in text and "timeout" not in text:
        return None
    return (f"error: rank {rank}: a collective timed out after run.timeout_minutes={timeout_minutes:g}: another "
            f"rank did not join it (crashed, stuck, or still busy); if a phase legitimately takes longer "
            f"(evaluation, checkpointing), raise run.timeout_minutes")


# Command lines of the processes that launch ranks: DeepSpeed's runner (`deepspeed`) and its
# per-node `deepspeed.launcher.launch`, torchrun (`torch.distributed.run`), and the shell
# that pdsh runs them in on a remote node.
LAUNCHER_MARKS = ("deepspeed", "torchrun", "torch.distributed.run")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain(pid: int | None = None) -> list[tuple[int, int, str]]:
    """The launcher processes above process `pid` (default: this one), nearest first, as
    (pid, start time, command line): its parent, the parent's parent, ... while their command
    line names a launcher (LAUNCHER_MARKS). Empty off Linux or for a plain `python` run."""
    stat = _proc_stat(os.getpid() if pid is None else pid)
    chain = []
    while stat is not None and stat[1] > 1:
        parent = stat[1]
        stat, cmd = _proc_stat(parent), _cmdline(parent)
        if stat is None or not any(mark in cmd for mark in LAUNCHER_MARKS):
            break
        chain.append((parent, stat[2], cmd))
    return chain


def watch_launchers(rank: int, interval_s: float = 1.0) -> threading.Thread | None:
    """Turn the death of a launcher above this rank into SIGTERM to this rank.

    DeepSpeed's runner passes SIGTERM on to its ranks only in pdsh mode: a single-node (or
    `--no_ssh`) `deepspeed` command that is terminated dies alone, and its ranks train on as
    orphans. A daemon thread checks once per `interval_s` that every process of
    `launcher_chain()` is still the same living process (pid and start time, not a zombie); when
    one is gone it sends SIGTERM to this rank once, which the trainer turns into "finish the
    step, save it, exit 143" on every rank. Returns None (nothing to watch) for a rank not
    started by a launcher."""
    chain = launcher_chain()
    if not chain:
        return None

    def alive(pid: int, start: int) -> bool:
        stat = _proc_stat(pid)
        return stat is not None and stat[2] == start and stat[0] not in "ZX"

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            for pid, start, cmd in chain:
                if not alive(pid, start):
                    print(f"warning: rank {rank}: its launcher (pid {pid}: {cmd[:80]}) is gone; stopping as on "
                          f"SIGTERM (finish the step, save it, exit)", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    thread = threading.Thread(target=watch, name="rskdist-launcher-watch", daemon=True)
    thread.start()
    return thread


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

    from rskdist.comm import release_shm_buffer
    from rskdist.store import is_url, join
    from rskdist.store.mirror import default_stage_dir
    from rskdist.trainer import Context, Preempted, Trainer

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
    if device.type == "cpu":  # DeepSpeed's CPU backend; its buffers would stay in /dev/shm after the run
        release_shm_buffer(dist.get_rank())
    watch_launchers(dist.get_rank())
    run_dir, run_url = Path(cfg.run.output_dir) / cfg.run.name, None
    if is_url(cfg.run.output_dir):  # written to node-local staging, mirrored to the store (rskdist/store/mirror.py)
        run_dir, run_url = Path(cfg.run.stage_dir or default_stage_dir()) / cfg.run.name, join(cfg.run.output_dir,
                                                                                                cfg.run.name)
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                  run_dir=run_dir, run_url=run_url,
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1))))
    try:
        Trainer(cfg, ctx).train()
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
