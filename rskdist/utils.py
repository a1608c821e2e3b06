"""Small shared helpers: memory readings, run metadata, and running the launcher for the tools."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil
import torch


def memory_stats(device: torch.device) -> dict:
    """This process's peak host memory (and CUDA peak on GPUs), in MB."""
    stats = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    if device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats


def git_sha(path: Path | None = None) -> str:
    root = path or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(**extra) -> dict:
    """Versions, git SHA, host and time, written next to every run."""
    versions = {}
    for pkg in ("torch", "torchvision", "deepspeed", "timm", "open_clip_torch", "webdataset", "faiss-cpu",
                "faiss-gpu", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from rskdist import __version__

    return {
        "rskdist": __version__, "git_sha": git_sha(), "python": sys.version.split()[0],
        "platform": platform.platform(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None, **extra,
    }


def deepspeed_bin() -> str:
    """The `deepspeed` launcher of this Python's environment, else the one on PATH."""
    here = Path(sys.executable).parent / "deepspeed"
    return str(here) if here.exists() else "deepspeed"


def run_logged(cmd: list[str], log_path: Path, *, timeout: float, who: str, cwd: Path | None = None) -> int:
    """Run a launcher command (tools/study.py, tools/proxy_study.py) in its own session, its
    output appended to `log_path` under a header line. Returns its exit code, or 124 once it
    ran `timeout` seconds. On a timeout or Ctrl-C its whole process group is stopped (its
    launcher and ranks, nothing else): SIGTERM, on which the ranks save their step and exit,
    then SIGKILL after 120 s; Ctrl-C is raised again."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("WORLD_SIZE", None)  # set by an outer launcher, it would make train.py think it is a rank
    with log_path.open("a") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_session(proc)
            log.write(f"== {who}: stopped after --timeout {timeout:g} s\n")
            return 124
        except KeyboardInterrupt:
            _stop_session(proc)
            raise


def _stop_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
