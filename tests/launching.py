"""How the tests start real runs: the launchers' paths, the environment every launched
process gets, one command runner that reports a failure with the run's output, and the
run folder's losses and records (read through rskdist/runlog.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rskdist.comm import free_port
from rskdist.runlog import iter_records, train_losses

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEEPSPEED, TORCHRUN = str(BIN / "deepspeed"), str(BIN / "torchrun")
TRAIN = "rskdist/train.py"

__all__ = ["DEEPSPEED", "ROOT", "TORCHRUN", "TRAIN", "deepspeed_cmd", "iter_records", "launch_env", "records", "run_cmd",
           "torchrun_node_env", "train_losses"]


def launch_env(**extra: str) -> dict:
    """This process's environment for a launched run: offline hub, unbuffered output, and no
    WORLD_SIZE of ours (a launched train.py must read its world from its launcher)."""
    out = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    out.pop("WORLD_SIZE", None)
    return out


def run_cmd(cmd: list, *, timeout: float = 300, check: bool = True, environ: dict | None = None):
    """Run `cmd` from the checkout root; with `check`, a non-zero exit fails the test with the
    command and the ends of its stdout and stderr."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=launch_env() if environ is None else environ)
    if check:
        assert proc.returncode == 0, (f"{' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                      f"--- stderr\n{proc.stderr[-3000:]}")
    return proc


def deepspeed_cmd(*args, ranks: int = 2, script: str = TRAIN) -> list[str]:
    """`deepspeed` on this machine with `ranks` ranks and a port of its own: `script` then `args`."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *map(str, args)]


def torchrun_node_env(*, nnodes: str, nproc: int, rdzv_id: str, config: str = "configs/debug.yaml") -> dict:
    """What launchers/torchrun.sh reads for a node on this machine: the nodes of one job (same
    `rdzv_id`, one fresh port) meet through the c10d rendezvous on 127.0.0.1."""
    return dict(CONFIG=config, TORCHRUN=TORCHRUN, NNODES=nnodes, NPROC=str(nproc), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), RDZV_ID=rdzv_id)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of RUN/metrics.jsonl in the order written, all or those of one kind."""
    return [r for r in iter_records(run_dir) if kind is None or r.get("kind") == kind]
