#!/usr/bin/env python
"""A study: one base config, axes of config values, seeds; every cell a real training run.

    python tools/study.py --config configs/demo.yaml --axis loss.tau2=0.01,0.1 \\
        --axis data.global_batch=64,256 --seeds 0 1 2 --out runs/study_tau2 [--set key=value ...]

Each (value combination, seed) is one run folder, OUT/cells/<cell>__seed<k>/, trained
through the real launcher: `deepspeed --num_gpus NPROC` one cell after another
(--launcher local), or one `sbatch launchers/slurm.sbatch` job per cell (--launcher slurm;
the tool submits and exits, `--collect --out OUT` builds the report once they finish).
Every axis and --set value is checked by loading the config before anything runs.

A run folder holding summary.json is done and never rerun; an interrupted one resumes
through the trainer's own resume (run.resume=auto); a failed one is recorded with its
log and the study goes on. OUT/results.csv has one row per run, OUT/report.md the mean
+- std over seeds per cell with the best cell marked, OUT/study.png the metric against
every numeric axis. docs/studies.md explains it all.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rskdist.config import load_config, to_dict, validate
from rskdist.runlog import METRICS_FILE, SUMMARY_FILE, read_records
from rskdist.utils import deepspeed_bin, run_logged

ROOT = Path(__file__).resolve().parent.parent

# The study owns these: each run's folder, its seed and how it resumes.
OWNED_KEYS = {"run.output_dir": "--out", "run.name": "--out", "run.seed": "--seeds", "run.resume": "the study (auto)"}
SUMMARY = SUMMARY_FILE  # written by the trainer as the very last thing of a finished run


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One run of the study: a value for every axis, and a seed."""

    values: tuple[tuple[str, str], ...]  # (dotted key, value as written on the command line), in axis order
    seed: int
    cell_id: str  # the value combination, shared by its seeds

    @property
    def name(self) -> str:
        return f"{self.cell_id}__seed{self.seed}"

    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values]


def split_values(text: str) -> list[str]:
    """`a,b,[1, 2],{x: 1}` -> ['a', 'b', '[1, 2]', '{x: 1}']: commas inside brackets stay."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`section.key=v1,v2,...` -> (key, values)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    values = split_values(raw) if sep else []
    if not sep or "." not in key or not all(values):
        raise ValueError(f"study: --axis {text!r} must look like section.key=value1,value2 (no empty values)")
    if len(set(values)) != len(values):
        raise ValueError(f"study: --axis {text!r} repeats a value")
    return key, values


def _id_part(key: str, value: str, short: bool) -> str:
    name = key.rsplit(".", 1)[-1] if short else key
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-")
    if safe != value or len(safe) > 24:  # two values that clean up (or shorten) alike must stay apart
        safe = f"{safe[:24].strip('-')}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"
    return f"{name}-{safe}"


def expand(axes: list[tuple[str, list[str]]], seeds: list[int]) -> list[Cell]:
    """Every value combination (first axis slowest) times every seed, seeds innermost."""
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study: an axis is given twice: {', '.join(sorted(k for k in keys if keys.count(k) > 1))}")
    last = [k.rsplit(".", 1)[-1] for k in keys]
    cells = []
    for combo in itertools.product(*(values for _, values in axes)):
        values = tuple(zip(keys, combo))
        cell_id = "__".join(_id_part(k, v, short=last.count(k.rsplit(".", 1)[-1]) == 1) for k, v in values) or "base"
        cells += [Cell(values, seed, cell_id) for seed in seeds]
    return cells


# ----------------------------------------------------------------------------- the study
@dataclass
class Study:
    """What a study is (saved as OUT/study.json, so --collect needs only --out)."""

    config: str  # absolute path of the base config
    out: str  # absolute path of the study folder
    axes: list[tuple[str, list[str]]]
    seeds: list[int]
    sets: list[str] = field(default_factory=list)
    nproc: int = 2
    nodes: int = 1
    launcher: str = "local"
    command: str = ""

    @property
    def cells(self) -> list[Cell]:
        return expand(self.axes, self.seeds)

    @property
    def cells_dir(self) -> Path:
        return Path(self.out) / "cells"

    def run_dir(self, cell: Cell) -> Path:
        return self.cells_dir / cell.name

    def log_path(self, cell: Cell) -> Path:
        return Path(self.out) / "logs" / f"{cell.name}.log"

    def overrides(self, cell: Cell) -> list[str]:
        """--set values, then the cell's axis values, then what the study owns."""
        return [*self.sets, *cell.overrides(), f"run.seed={cell.seed}", f"run.output_dir={self.cells_dir}",
                f"run.name={cell.name}", "run.resume=auto"]

    def save(self) -> None:
        data = {k: getattr(self, k) for k in ("config", "out", "axes", "seeds", "sets", "nproc", "nodes", "launcher",
                                              "command")}
        (Path(self.out) / "study.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, out: Path) -> "Study":
        path = out / "study.json"
        if not path.is_file():
            raise ValueError(f"study: {path} not found; --collect reads a folder made by tools/study.py --out {out}")
        data = json.loads(path.read_text())
        data["axes"] = [(k, list(v)) for k, v in data["axes"]]
        return cls(**data)


def check(study: Study) -> None:
    """Every --set, every axis value and every cell's full config must load and validate
    before anything runs; a cell's existing run folder must hold the same config."""
    for flag, texts in (("--set", study.sets), ("--axis", [f"{k}={v}" for k, vs in study.axes for v in vs])):
        for text in texts:
            key = text.partition("=")[0].strip()
            if key in OWNED_KEYS:
                raise ValueError(f"study: {flag} {text!r}: {key} is set by {OWNED_KEYS[key]}, not by {flag}")
            try:
                load_config(study.config, [text])
            except ValueError as exc:
                raise ValueError(f"study: {flag} {text!r}: {exc}") from None
    both = {k for k, _ in study.axes} & {s.partition("=")[0].strip() for s in study.sets}
    if both:
        raise ValueError(f"study: {', '.join(sorted(both))} is both an --axis and a --set; keep one")
    world = study.nproc * study.nodes
    for cell in study.cells:
        try:
            cfg = load_config(study.config, study.overrides(cell))
            validate(cfg, world_size=world)
        except ValueError as exc:
            raise ValueError(f"study: cell {cell.name} ({' '.join(cell.overrides()) or 'base config'}, "
                             f"{world} ranks): {exc}") from None
        saved = study.run_dir(cell) / "config.yaml"
        if saved.is_file():
            changed = config_differences(yaml.safe_load(saved.read_text()), to_dict(cfg))
            if changed:
                raise ValueError(f"study: {study.run_dir(cell)} was trained with a different config "
                                 f"({'; '.join(changed[:4])}); use another --out or delete that folder")


def config_differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Keys both configs have whose values differ (where the run folder lives is not one)."""
    wanted = yaml.safe_load(yaml.safe_dump(wanted))  # the same YAML round trip the saved one took
    out = []
    for key in saved.keys() & wanted.keys():
        dotted = f"{prefix}{key}"
        if dotted in ("run.output_dir", "run.resume"):
            continue
        a, b = saved[key], wanted[key]
        if isinstance(a, dict) and isinstance(b, dict) and dotted.count(".") == 0:
            out += config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append(f"{dotted}: {a!r} there, {b!r} now")
    return sorted(out)


def is_done(study: Study, cell: Cell) -> bool:
    return (study.run_dir(cell) / SUMMARY).is_file()


# ----------------------------------------------------------------------------- launching
def local_command(study: Study, cell: Cell, port: int | str) -> list[str]:
    # Every run gets its own rendezvous port: two deepspeed runs on one machine both default to 29500.
    return [deepspeed_bin(), "--num_gpus", str(study.nproc), "--master_port", str(port), "rskdist/train.py",
            "--config", study.config, *study.overrides(cell)]


def slurm_command(study: Study, cell: Cell) -> list[str]:
    """One sbatch job per cell. launchers/slurm.sbatch joins its arguments into one
    `bash -c` string, so each is shell-quoted here to come out of that re-parse intact."""
    log = Path(study.out) / "logs" / f"{cell.name}-%j.out"
    return ["sbatch", "--parsable", "--nodes", str(study.nodes), "--job-name", f"rskdist-{cell.name}"[:128],
            "--output", str(log), "launchers/slurm.sbatch", shlex.quote(study.config),
            *(shlex.quote(o) for o in study.overrides(cell))]


def launch_local(study: Study, cell: Cell, timeout: float) -> int:
    """Train one cell through `deepspeed`; its output goes to the cell's log. Returns the exit code."""
    from rskdist.comm import free_port

    return run_logged(local_command(study, cell, free_port()), study.log_path(cell), timeout=timeout, who="study",
                      cwd=ROOT)


# ----------------------------------------------------------------------------- reading runs
def read_run(run_dir: Path) -> dict:
    """What a run folder says: final metrics, best, throughput, peak memory per rank."""
    summary_path = run_dir / SUMMARY
    # One record per step (a resumed run appends; the last record of a step counted).
    train = read_records(run_dir)[0] if (run_dir / METRICS_FILE).is_file() else []
    row: dict = {}
    if train:
        steady = train[1:] or train  # the first step carries start-up costs
        row["images_per_s"] = round(statistics.fmean(r["images_per_s"] for r in steady), 1)
        per_rank = [r["rss_peak_mb_per_rank"] for r in train if r.get("rss_peak_mb_per_rank")]
        if per_rank:
            peaks = [max(col) for col in zip(*per_rank)]
            row["rss_peak_mb_max"] = max(peaks)
            row["rss_peak_mb_per_rank"] = " ".join(f"{v:.1f}" for v in peaks)
        cuda = [r["cuda_peak_mb_max"] for r in train if "cuda_peak_mb_max" in r]
        if cuda:
            row["cuda_peak_mb_max"] = max(cuda)
    if not summary_path.is_file():
        return row
    summary = json.loads(summary_path.read_text())
    row["steps"] = summary.get("step")
    for key, value in (summary.get("final_eval") or {}).items():
        if key.startswith("recall@") or key in ("map@r", "r_precision"):
            row[key] = value
    best = summary.get("best") or {}
    if best.get("best_step") is not None:
        row.update(best_metric=best["metric"], best_value=best["best_value"], best_step=best["best_step"])
    return row


def load_state(study: Study) -> dict:
    path = Path(study.out) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(study: Study, state: dict) -> None:
    (Path(study.out) / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def collect(study: Study, state: dict) -> list[dict]:
    """One row per run: axis values, seed, status, what its folder says."""
    rows = []
    for cell in study.cells:
        run_dir = study.run_dir(cell)
        record = state.get(cell.name, {})
        row = {"cell": cell.cell_id, "seed": cell.seed, **dict(cell.values), **read_run(run_dir)}
        if is_done(study, cell):
            status = "done"
        elif record.get("status") in ("failed", "interrupted", "submitted"):
            status = record["status"]
        else:
            status = "incomplete" if (run_dir / METRICS_FILE).is_file() else "not started"
        row.update(status=status, exit_code=record.get("exit_code", ""), wall_seconds=record.get("wall_seconds", ""),
                   run_dir=str(run_dir), log=record.get("log", ""))
        rows.append(row)
    return rows


def metric_columns(rows: list[dict]) -> list[str]:
    recalls = sorted({k for r in rows for k in r if k.startswith("recall@")}, key=lambda k: int(k.split("@")[1]))
    return recalls + [k for k in ("map@r", "r_precision") if any(k in r for r in rows)]


def write_csv(study: Study, rows: list[dict], path: Path) -> None:
    fields = (["cell", "seed", *(k for k, _ in study.axes), "status", "steps", *metric_columns(rows), "best_metric",
               "best_value", "best_step", "images_per_s", "rss_peak_mb_max", "rss_peak_mb_per_rank",
               "cuda_peak_mb_max", "wall_seconds", "exit_code", "run_dir", "log"])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


# ----------------------------------------------------------------------------- aggregation
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(study: Study, rows: list[dict]) -> list[dict]:
    """Per cell: its axis values, seeds done, and mean/std of every metric over those seeds."""
    cells = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    out = []
    for cell_id, runs in cells.items():
        done = [r for r in runs if r["status"] == "done"]
        entry = {"cell": cell_id, "values": {k: runs[0][k] for k, _ in study.axes}, "seeds": len(runs),
                 "done": len(done), "stats": {}}
        for key in (*metric_columns(rows), "best_value", "images_per_s", "rss_peak_mb_max"):
            values = [float(r[key]) for r in done if r.get(key) not in (None, "")]
            if values:
                entry["stats"][key] = mean_std(values)
        out.append(entry)
    return out


def best_metric(study: Study) -> str | None:
    """The metric that picks each run's best checkpoint (eval.best_metric on the validation
    classes or the first test split, as named in summary.json), None when the runs never evaluate."""
    from rskdist.eval import evaluated_splits, split_metric

    cfg = load_config(study.config, study.sets)
    split = evaluated_splits(cfg.data.val_classes, cfg.data.test_splits)[0]
    return None if cfg.eval.every_epochs < 0 else split_metric(split, cfg.eval.best_metric)


def best_cell(cells: list[dict], metric: str | None) -> str | None:
    """The cell with the highest mean over seeds of the runs' best value of `metric` (the
    value that picked each run's best checkpoint); None without any."""
    scored = [c for c in cells if metric and "best_value" in c["stats"]]
    return max(scored, key=lambda c: c["stats"]["best_value"][0])["cell"] if scored else None


def _fmt(stat: tuple[float, float] | None, n: int, digits: int = 4) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(study: Study, rows: list[dict], path: Path, plot_name: str | None) -> None:
    cells = summarise(study, rows)
    metric = best_metric(study)
    winner = best_cell(cells, metric)
    metrics = metric_columns(rows)
    keys = [k for k, _ in study.axes]
    lines = [f"# Study: {Path(study.out).name}", "",
             f"Produced by: `{study.command}`", "",
             f"Base config `{study.config}`" + (f" with {' '.join(f'`{s}`' for s in study.sets)}" if study.sets else "")
             + f"; {len(study.cells) // len(study.seeds)} cells x seeds {', '.join(map(str, study.seeds))}; "
             f"{study.nproc} ranks per node x {study.nodes} node(s); launcher {study.launcher}.", ""]
    if metric:
        lines += [f"Mean ± standard deviation over the finished seeds. `best {metric}` is each run's best "
                  f"evaluation (eval.best_metric); the cell with the highest mean is marked **best**.", ""]
    else:
        lines += ["The runs do not evaluate (eval.every_epochs=-1): no metric picks a best cell.", ""]
    header = [*keys, "seeds done", *metrics, f"best {metric}" if metric else "best", "images/s", "peak MB/rank", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        st, n = c["stats"], c["done"]
        cols = [*(str(c["values"][k]) for k in keys), f"{n}/{c['seeds']}", *(_fmt(st.get(m), n) for m in metrics),
                _fmt(st.get("best_value"), n), _fmt(st.get("images_per_s"), n, 1),
                _fmt(st.get("rss_peak_mb_max"), n, 0),
                "**best**" if c["cell"] == winner else ""]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    if plot_name:
        lines += [f"![{metric} against each numeric axis]({plot_name})", ""]
    unfinished = [r for r in rows if r["status"] != "done"]
    lines += ["## Failures and unfinished runs", ""]
    if not unfinished:
        lines += ["None: every run finished.", ""]
    for r in unfinished:
        where = f"log `{r['log']}`" if r.get("log") else f"run folder `{r['run_dir']}`"
        code = f" (exit {r['exit_code']})" if r.get("exit_code") not in ("", None) else ""
        lines.append(f"- {r['cell']} seed {r['seed']}: {r['status']}{code}, {where}")
    lines.append("")
    path.write_text("\n".join(lines))


def numeric_axes(study: Study) -> list[str]:
    def number(v: str) -> bool:
        parsed = yaml.safe_load(v)
        return isinstance(parsed, (int, float)) and not isinstance(parsed, bool)

    return [k for k, values in study.axes if len(values) > 1 and all(number(v) for v in values)]


def plot(study: Study, rows: list[dict], path: Path) -> bool:
    """One panel per numeric axis: the best metric against it, one line per value
    combination of the other axes, error bars = std over seeds. False when nothing to draw."""
    metric = best_metric(study)
    axes_numeric = numeric_axes(study)
    cells = [c for c in summarise(study, rows) if "best_value" in c["stats"]]
    if not metric or not axes_numeric or not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes_numeric), figsize=(5.2 * len(axes_numeric), 4.2), squeeze=False)
    for ax, key in zip(panels[0], axes_numeric):
        others = [k for k, _ in study.axes if k != key]
        lines: dict[tuple, list] = {}
        for c in cells:
            lines.setdefault(tuple(str(c["values"][k]) for k in others), []).append(c)
        for combo, members in sorted(lines.items()):
            members.sort(key=lambda c: float(yaml.safe_load(str(c["values"][key]))))
            xs = [float(yaml.safe_load(str(c["values"][key]))) for c in members]
            ys, errs = zip(*(c["stats"]["best_value"] for c in members))
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or metric
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        xs_all = [float(yaml.safe_load(v)) for v in dict(study.axes)[key]]
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:  # batch sizes, temperatures: spread over decades
            ax.set_xscale("log", base=2 if all(x.is_integer() for x in xs_all) else 10)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Study {Path(study.out).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(study: Study, state: dict) -> list[dict]:
    out = Path(study.out)
    rows = collect(study, state)
    write_csv(study, rows, out / "results.csv")
    drawn = plot(study, rows, out / "study.png")
    write_report(study, rows, out / "report.md", "study.png" if drawn else None)
    print(f"study: wrote {out / 'results.csv'}, {out / 'report.md'}" + (f", {out / 'study.png'}" if drawn else ""))
    return rows


# ----------------------------------------------------------------------------- running
def _outcome(row: dict) -> str:
    if "best_value" in row:
        return f"{row['best_metric']} {row['best_value']:.4f} (best, step {row['best_step']})"
    return f"{row['images_per_s']} img/s" if "images_per_s" in row else "no metrics"


def run_local(study: Study, state: dict, timeout: float, launch=launch_local) -> None:
    """Train every cell not done yet, one after another; a failure is recorded, not fatal."""
    cells = study.cells
    done = sum(is_done(study, c) for c in cells)
    print(f"study: {len(cells)} runs ({len(cells) // len(study.seeds)} cells x {len(study.seeds)} seeds), "
          f"{done} done already, {len(cells) - done} to run", flush=True)
    t_study = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.name}"
        if is_done(study, cell):
            print(f"{tag}: done already, skipped", flush=True)
            continue
        print(f"{tag}: start ({time.perf_counter() - t_study:.0f} s into the study)", flush=True)
        t0 = time.perf_counter()
        previous = state.get(cell.name, {}).get("wall_seconds", 0.0) or 0.0  # a resumed cell adds up its launches
        try:
            code = launch(study, cell, timeout)
        except KeyboardInterrupt:
            state[cell.name] = {"status": "interrupted", "exit_code": 130, "log": str(study.log_path(cell)),
                                "wall_seconds": round(previous + time.perf_counter() - t0, 1)}
            save_state(study, state)
            raise
        seconds = round(time.perf_counter() - t0, 1)
        record = {"exit_code": code, "wall_seconds": round(previous + seconds, 1), "log": str(study.log_path(cell))}
        if code == 0 and is_done(study, cell):
            record["status"] = "done"
            print(f"{tag}: done in {seconds:.1f} s | {_outcome(read_run(study.run_dir(cell)))}", flush=True)
        else:
            record["status"] = "interrupted" if code in (124, 143) else "failed"
            print(f"{tag}: {record['status'].upper()} (exit {code}) after {seconds:.1f} s | log {record['log']}",
                  flush=True)
        state[cell.name] = record
        save_state(study, state)


def submit_slurm(study: Study, state: dict) -> None:
    for cell in study.cells:
        if is_done(study, cell):
            print(f"{cell.name}: done already, skipped", flush=True)
            continue
        proc = subprocess.run(slurm_command(study, cell), cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, GPUS_PER_NODE=str(study.nproc)))
        if proc.returncode != 0:
            raise RuntimeError(f"study: sbatch failed for {cell.name}: {proc.stderr.strip()}")
        job = proc.stdout.strip().split(";")[0]
        state[cell.name] = {"status": "submitted", "job": job,
                            "log": str(Path(study.out) / "logs" / f"{cell.name}-{job}.out")}
        save_state(study, state)
        print(f"{cell.name}: submitted as job {job}", flush=True)
    print(f"study: when the jobs finish: python tools/study.py --collect --out {study.out}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", help="base config (YAML)")
    p.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeatable; commas inside [] or {} do not split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed of each repetition (default 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every cell (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="study folder (cells/, logs/, results.csv, report.md)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, default=2, help="ranks per node for each cell (default 2)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per cell (slurm only)")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds one local cell may run")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their commands, run nothing")
    p.add_argument("--collect", action="store_true", help="only build results.csv/report.md/study.png from OUT")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = args.out.resolve()
    try:
        if args.collect:
            study = Study.load(out)
            write_outputs(study, load_state(study))
            return 0
        if not args.config:
            raise ValueError("study: --config is required (or --collect --out OUT to report an existing study)")
        if args.nproc < 1 or args.nodes < 1:
            raise ValueError(f"study: --nproc and --nodes must be >= 1, got {args.nproc} and {args.nodes}")
        if args.nodes > 1 and args.launcher == "local":
            raise ValueError("study: --nodes > 1 needs --launcher slurm (the local launcher runs on this machine)")
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"study: --seeds repeats a seed: {args.seeds}")
        config = Path(args.config).resolve()
        if not config.is_file():
            raise ValueError(f"study: --config {args.config}: no such file; see configs/ for examples")
        study = Study(config=str(config), out=str(out), axes=[parse_axis(a) for a in args.axis], seeds=args.seeds,
                      sets=args.sets, nproc=args.nproc, nodes=args.nodes, launcher=args.launcher,
                      command=shlex.join(["python", "tools/study.py", *argv]))
        os.chdir(ROOT)  # the runs start here: relative paths in the config (data.root) resolve alike
        check(study)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in study.cells:
            cmd = slurm_command(study, cell) if study.launcher == "slurm" else local_command(study, cell, "FREE_PORT")
            done = " (done already)" if is_done(study, cell) else ""
            print(f"{cell.name}{done}\n  {shlex.join(cmd)}")
        print(f"study: {len(study.cells)} runs; --dry-run: nothing started (a local run gets a free port as FREE_PORT)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    study.save()
    state = load_state(study)
    if study.launcher == "slurm":
        submit_slurm(study, state)
        return 0
    # SIGTERM (a scheduler's time limit, `timeout`) ends the study like Ctrl-C: the running cell's
    # ranks live in their own session and would otherwise outlive it.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_local(study, state, args.timeout)
    except KeyboardInterrupt:
        print("study: interrupted; rerun the same command to continue (finished cells are kept)", file=sys.stderr)
        write_outputs(study, state)
        return 130
    rows = write_outputs(study, state)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        print(f"study: {len(failed)} of {len(rows)} runs did not finish; see report.md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
