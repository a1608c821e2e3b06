"""What a run writes besides checkpoints: the run folder's records and the progress line.

RUN/config.yaml (the resolved config), RUN/env.json (versions, git SHA, host, model),
RUN/model.json (the resolved architecture that rebuilds the model, rskdist/models/spec.py),
RUN/metrics.jsonl (one JSON record per logged step, evaluation and warning),
TensorBoard events in RUN/tb/, and the progress line on stdout. Rank 0 writes; every
rank calls `train_step`, which gathers each rank's peak memory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from rskdist.comm import gather_rows
from rskdist.config import Config, save_config
from rskdist.models.spec import write_spec
from rskdist.utils import memory_stats, run_metadata


class RunLogger:
    def __init__(self, run_dir: Path, *, rank: int, device: torch.device, group, tensorboard: bool = True):
        self.run_dir, self.rank, self.device, self.group = Path(run_dir), rank, device, group
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None

    def open(self, cfg: Config, info: dict, *, fresh: bool, model_spec: dict | None = None) -> None:
        """Write config.yaml, env.json and model.json; a fresh run in a used folder moves the
        old metrics.jsonl aside, a resumed one appends to it."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        (self.run_dir / "env.json").write_text(json.dumps(run_metadata(**info), indent=2))
        if model_spec is not None:
            write_spec(model_spec, self.run_dir)
        metrics = self.run_dir / "metrics.jsonl"
        if fresh and metrics.exists():
            metrics.rename(self.run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        self._file = open(metrics, "a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def warn(self, step: int, message: str, **fields) -> None:
        self.record({"step": step, "kind": "warning", **fields, "message": message})
        if self.rank == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def record(self, record: dict) -> None:
        if self.rank != 0 or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def train_step(self, record: dict, *, total_steps: int, eta_seconds: float, bad_samples: int = 0) -> dict:
        """Add every rank's peak memory and the run's count of replaced training images
        (`bad_samples`: this rank's) to a step's record (a collective: all ranks call it),
        write it and print the progress line."""
        mem = memory_stats(self.device)
        row = [mem.get("rss_peak_mb", 0.0), mem.get("cuda_peak_mb", 0.0), float(bad_samples)]
        per_rank, _ = gather_rows(torch.tensor([row], device=self.device, dtype=torch.float64), self.group)  # (W, 3)
        per_rank = per_rank.cpu()
        record["rss_peak_mb_max"] = round(float(per_rank[:, 0].max()), 1)
        record["rss_peak_mb_per_rank"] = [round(float(v), 1) for v in per_rank[:, 0]]
        if self.device.type == "cuda":
            record["cuda_peak_mb_max"] = round(float(per_rank[:, 1].max()), 1)
        record["bad_samples"] = int(per_rank[:, 2].sum())  # training images replaced so far, all ranks
        self.record(record)
        width = len(str(total_steps))
        bad = f" | {record['bad_samples']} bad images replaced" if record["bad_samples"] else ""
        self.say(f"step {record['step']:>{width}}/{total_steps} | epoch {record['epoch']:.2f} | "
                 f"loss {record['loss']:.4f} | |dL/dE| {record['emb_grad_norm']:.2e} | "
                 f"{record['images_per_s']:.1f} img/s | lr {record['lr']:.2e} | "
                 f"mem {record['rss_peak_mb_max']:.0f} MB/rank{bad} | eta {format_seconds(eta_seconds)}")
        return record

    def evaluation(self, step: int, epoch: float, metrics: dict, *, is_best: bool) -> None:
        self.record({"step": step, "epoch": epoch, "kind": "eval",
                     **{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
        table = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "eval_seconds")
        self.say(f"eval step {step}: {table}{' (best)' if is_best else ''}")

    def close(self, summary: dict) -> None:
        if self.rank != 0:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of RUN/metrics.jsonl, one per step, sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: is {run_dir} a run folder written by rskdist/train.py?")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            evals.append(rec)
        elif rec.get("kind") == "train":
            train.append(rec)  # warnings (saturation, non-finite steps) are neither
    # A resumed run appends: keep the last record of each step.
    train = list({r["step"]: r for r in train}.values())
    evals = list({r["step"]: r for r in evals}.values())
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
