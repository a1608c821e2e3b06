#!/usr/bin/env python
"""Plot and summarise a run folder: RUN/recall.png and RUN/report.md.

    python tools/report.py runs/demo

Reads RUN/metrics.jsonl (train and eval records), RUN/config.yaml and RUN/env.json.
Every evaluated split is plotted and tabulated (the test split's metrics as eval/recall@1,
others as eval/<split>/recall@1); the best line names the metric that picked checkpoints/best.
The report links RUN/examples.html (the last evaluation's retrievals as pictures) when the run has one.
Both files are added to the run's tracked runs (run.loggers, RUN/trackers.json; docs/tracking.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from rskdist.eval.examples import FOLDER, PAGE
from rskdist.eval.tracking import evaluated_splits, split_metric
from rskdist.runlog import read_records


def split_keys(evals: list[dict]) -> dict[str, list[str]]:
    """{split: its eval/ record keys}, splits in the order they were recorded (the "test"
    split's metrics are unprefixed, eval/recall@1; others are eval/<split>/recall@1)."""
    out: dict[str, list[str]] = {}
    for rec in evals:
        for key in rec:
            if key.startswith("eval/") and key != "eval/eval_seconds":
                split, _, _ = key[len("eval/"):].rpartition("/")
                keys = out.setdefault(split or "test", [])
                if key not in keys:
                    keys.append(key)
    return out


def selection_key(cfg: dict) -> str:
    """The record key that picked the run's best checkpoint (rskdist/validator.py)."""
    data, ev = cfg.get("data", {}), cfg.get("eval", {})
    split = evaluated_splits(data.get("val_classes", 0), data.get("test_splits", ["test"]))[0]
    return "eval/" + split_metric(split, ev.get("best_metric", "recall@1"))


def plot(train: list[dict], evals: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    splits = split_keys(evals)
    for style, (split, keys) in zip(("-", "--", ":", "-."), splits.items()):
        recalls = sorted((k for k in keys if k.rpartition("/")[2].startswith("recall@")),
                         key=lambda k: int(k.split("@")[-1]))
        for color, key in enumerate(recalls + [k for k in keys if k.endswith("map@r")]):
            name = key.rpartition("/")[2]
            rows = [r for r in evals if key in r]
            ax_r.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", linestyle=style,
                      color=f"C{color}", label=name if len(splits) == 1 else f"{split} {name}")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("held-out classes")
    ax_r.set_ylim(0, 1)
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.set_title("Retrieval on " + ("test classes" if list(splits) in ([], ["test"]) else ", ".join(splits)))
    ax_l.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:red")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("RS@k loss")
    ax_l.grid(alpha=0.3)
    ax_l.set_title("Training loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(run_dir: Path) -> str:
    train, evals = read_records(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
    title = f"{run_dir.name}: {cfg.get('model', {}).get('backbone', '?')}, global batch {cfg.get('data', {}).get('global_batch', '?')}"
    if train or evals:
        plot(train, evals, run_dir / "recall.png", title)
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += [f"- model: {env.get('model', cfg.get('model', {}).get('backbone', '?'))}",
              f"- world size: {env.get('world_size', '?')}; global batch {cfg.get('data', {}).get('global_batch')}"
              f" ({cfg.get('data', {}).get('m')} per class); ZeRO-{cfg.get('deepspeed', {}).get('zero_stage')}"
              f" {cfg.get('deepspeed', {}).get('precision')}; loss {cfg.get('loss', {}).get('name', 'rsk')}, "
              f"mix {cfg.get('loss', {}).get('mix', 'simix')}",
              f"- git {env.get('git_sha', '?')}, torch {env.get('versions', {}).get('torch', '?')}, "
              f"deepspeed {env.get('versions', {}).get('deepspeed', '?')}", ""]
    if train:
        secs = sum(r["step_seconds"] for r in train) * max(1, cfg.get("run", {}).get("log_every", 1))
        last = train[-1]
        lines += [f"Trained {last['step']} steps ({last['epoch']:.2f} epochs); final loss {last['loss']:.4f}; "
                  f"about {secs / 60:.1f} min of steps; {last['images_per_s']:.0f} images/s at the end; "
                  f"peak memory {max(r['rss_peak_mb_max'] for r in train):.0f} MB per rank.", ""]
    if evals:
        first, final = evals[0], evals[-1]
        splits = split_keys(evals)
        for split in splits:
            key = "eval/" + split_metric(split, "recall@1")
            where = "held-out classes" if list(splits) == ["test"] else f"split {split}"
            lines.append(f"Recall@1 on {where}: {first.get(key, float('nan')):.4f} at step {first['step']}"
                         f" -> {final.get(key, float('nan')):.4f} at step {final['step']}.")
        chosen = selection_key(cfg)
        if any(chosen in r for r in evals):
            best = max(evals, key=lambda r: r.get(chosen, -1))  # the first of equal values, as the trainer's tracker
            lines.append(f"Best {chosen[len('eval/'):]} (it picks checkpoints/best): {best[chosen]:.4f} "
                         f"at step {best['step']}.")
        lines.append("")
        cols = [k for k in final if k.startswith("eval/") and k not in ("eval/eval_seconds",)]
        lines += ["| step | " + " | ".join(c[len("eval/"):] for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for r in evals:
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines += ["", "![Recall@k and loss](recall.png)", ""]
    if (run_dir / PAGE).is_file():  # written by the last evaluation (rskdist/eval/examples.py)
        lines += [f"Retrievals of the last evaluation as pictures: [{PAGE}]({PAGE}) "
                  f"(thumbnails in {FOLDER}/; copy both together).", ""]
    text = "\n".join(lines)
    (run_dir / "report.md").write_text(text)
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        text = report(args.run_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {args.run_dir / 'report.md'} and {args.run_dir / 'recall.png'}")
    add_to_tracked_runs(args.run_dir)
    return 0


def add_to_tracked_runs(run_dir: Path) -> None:
    """The report and its plot to the trackers the run logged to (rskdist/loggers.py)."""
    from rskdist.loggers import add_files, read_trackers

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    names = [n for n in cfg.get("run", {}).get("loggers", []) if n in read_trackers(run_dir)]
    if not names:
        return
    train, evals = read_records(run_dir)
    step = max([r["step"] for r in train + evals], default=0)
    files = [p for p in (run_dir / "report.md", run_dir / "recall.png") if p.is_file()]
    where, failures = add_files(run_dir, names, files, step)
    for line in where:
        print(f"added report.md and recall.png to {line}")
    for line in failures:
        print(f"warning: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
