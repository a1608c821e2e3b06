"""How a rank starts and ends under a launcher: its place in the world, its device and
process group, the launchers it watches, and the one message it leaves when it fails.

rskdist/train.py is the entry point and calls these in order: `world_from_env` (what the
launcher set), `resume_after_restart` (a group restarted by torchrun's elastic agent
continues from its latest checkpoint), `single_process_env` (a plain `python` run is a world of one),
`init_process_group` (device, process group with run.timeout_minutes, DeepSpeed's shared
memory released), `watch_launchers`, and `report_failure` when training raises.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by the deepspeed launcher or torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this node, as the launcher set it (torchrun: LOCAL_WORLD_SIZE; DeepSpeed's
    launcher: LOCAL_SIZE); 1 when started without one."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))


def elastic_restart() -> int:
    """How many times torchrun's elastic agent has restarted this rank's group (0: the
    first attempt, or not under the agent)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def resume_after_restart(resume: str, rank: int) -> str:
    """`run.resume` for a group the elastic agent restarted: the run folder's newest
    complete checkpoint, whatever the first attempt was told. A restarted group continues the
    job it belongs to; `never` would start it over and a named checkpoint would go back to
    where the job began."""
    count = elastic_restart()
    if count == 0:
        return resume
    if rank == 0:
        told = "" if resume == "auto" else f" (run.resume={resume} was for the first attempt)"
        print(f"rskdist: restart {count} by torchrun's elastic agent: resuming from the run folder's latest "
              f"checkpoint{told}", flush=True)
    return "auto"


def single_process_env() -> None:
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


def init_process_group(local_rank: int, timeout_minutes: float) -> "torch.device":
    """This rank's device, and the process group through DeepSpeed (NCCL on GPUs, gloo on
    CPU) whose timeout bounds every collective: a rank left waiting fails with a message
    naming run.timeout_minutes instead of hanging (or gloo's 10-minute default)."""
    import deepspeed
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Several CPU ranks on one machine: split the cores instead of letting every rank's
        # thread pool spin on all of them (oversubscription slows every rank down).
        local_procs = local_world_size()
        if "OMP_NUM_THREADS" not in os.environ and local_procs > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                               timeout=timedelta(minutes=timeout_minutes))
    if device.type == "cpu":  # DeepSpeed's CPU backend; its buffers would stay in /dev/shm after the run
        release_shm_buffer(torch.distributed.get_rank())
    return device


# DeepSpeed's CPU backend (its shm allreduce) creates one shared-memory file per rank at
# init_distributed, named by this prefix, the user id, MASTER_ADDR, MASTER_PORT and the rank.
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, shm_dir: str = "/dev/shm") -> str:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(shm_dir, f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(rank: int, shm_dir: str = "/dev/shm") -> bool:
    """Remove the name of this rank's DeepSpeed shared-memory buffer; True if there was one.

    DeepSpeed never removes these files (66 MB a rank), so every CPU run left its buffers
    in /dev/shm until it filled. Each rank maps every peer's buffer inside
    init_distributed; after a barrier nobody opens them by name again, and a mapping
    outlives its name: the memory stays in use until the processes end, however they end,
    and is freed then. Call it on every rank right after init_distributed.
    """
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(shm_buffer_path(rank, shm_dir))
    except FileNotFoundError:
        return False
    return True

