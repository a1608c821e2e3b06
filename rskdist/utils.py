"""Small shared helpers: memory readings and run metadata."""

from __future__ import annotations

import platform
import resource
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
