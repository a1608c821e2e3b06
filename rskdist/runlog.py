"""What a run writes besides checkpoints: the run folder's records and the progress line.

RUN/config.yaml (the resolved config), RUN/env.json (versions, git SHA, host, model),
RUN/model.json (the resolved architecture that rebuilds the model, rskdist/models/spec.py),
RUN/metrics.jsonl (one JSON record per logged step, evaluation and warning), the same
numbers to the experiment trackers `run.loggers` names (TensorBoard in RUN/tb/, MLflow,
W&B: rskdist/loggers.py), and the progress line on stdout. Rank 0 writes; every rank
calls `train_step`, which gathers each rank's peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from rskdist.comm import gather_rows
from rskdist.config import Config, save_config
from rskdist.loggers import Trackers, flatten_params
from rskdist.models.spec import write_spec
from rskdist.utils import memory_stats, run_metadata

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


class RunLogger:
    def __init__(self, run_dir: Path, *, rank: int, device: torch.device, group, loggers=("tensorboard",)):
        self.run_dir, self.rank, self.device, self.group = Path(run_dir), rank, device, group
        self.loggers = list(loggers)
        self._file = None
        self._trackers = None
        self._step = 0  # the last record's step: where the end-of-run files go

    def open(self, cfg: Config, info: dict, *, fresh: bool, model_spec: dict | None = None) -> None:
        """Write config.yaml, env.json and model.json; a fresh run in a used folder moves the
        old metrics.jsonl aside and starts new tracked runs, a resumed one appends to both."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        (self.run_dir / "env.json").write_text(json.dumps(run_metadata(**info), indent=2))
        if model_spec is not None:
            write_spec(model_spec, self.run_dir)
        metrics = self.run_dir / METRICS_FILE
        if fresh and metrics.exists():
            metrics.rename(self.run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        self._file = open(metrics, "a")
        if self.loggers:
            params = flatten_params(dataclasses.asdict(cfg))
            self._trackers = Trackers(self.loggers, self.run_dir, run_name=cfg.run.name, params=params, fresh=fresh)
            for line in self._trackers.started:
                self.say(f"rskdist: {line}")
            self._tracker_warnings()

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
        self._step = record["step"]
        if self._trackers is not None:
            self._trackers.log({k: v for k, v in record.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}, self._step)
            self._tracker_warnings()

    def _tracker_warnings(self) -> None:
        for name, error in self._trackers.failures():  # once per tracker: it is dropped
            self.warn(self._step, f"{name} logger dropped for the rest of the run, training goes on: {error}",
                      tracker=name)

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

    def close(self, summary: dict | None) -> None:
        """Write summary.json and end the tracked runs with it and config.yaml; `summary`
        None: stopped early (SIGTERM), the tracked runs end as killed, to be resumed."""
        if self.rank != 0:
            return
        if summary is not None:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if self._trackers is not None:
            files = [p for p in (self.run_dir / "config.yaml", self.run_dir / SUMMARY_FILE) if p.is_file()]
            self._trackers.close(files, self._step, "FINISHED" if summary is not None else "KILLED")
            self._tracker_warnings()
            self._trackers = None
        if self._file is not None:
            self._file.close()


def read_summary(run_dir: Path) -> dict | None:
    """A finished run's summary.json (final step, last record, final evaluation), None if absent."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def iter_records(run_dir: Path):
    """Every record of RUN/metrics.jsonl in the order written (train, eval and warning
    records; a resumed run's records follow the ones it repeats)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: is {run_dir} a run folder written by rskdist/train.py?")
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of RUN/metrics.jsonl, one per step, sorted by step."""
    train, evals = [], []
    for rec in iter_records(run_dir):
        if rec.get("kind") == "eval":
            evals.append(rec)
        elif rec.get("kind") == "train":
            train.append(rec)  # warnings (saturation, non-finite steps) are neither
    # A resumed run appends: keep the last record of each step.
    train = list({r["step"]: r for r in train}.values())
    evals = list({r["step"]: r for r in evals}.values())
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} of a run folder (the last record of each step)."""
    return {r["step"]: r["loss"] for r in read_records(run_dir)[0]}


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
