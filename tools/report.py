#!/usr/bin/env python
"""Plot and summarise a run folder: RUN/recall.png and RUN/report.md.

    python tools/report.py runs/demo

Reads RUN/metrics.jsonl (train and eval records), RUN/config.yaml and RUN/env.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
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


def plot(train: list[dict], evals: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({k for r in evals for k in r if k.startswith("eval/recall@")}, key=lambda k: int(k.split("@")[1]))
    for key in keys + [k for k in ("eval/map@r",) if any(k in r for r in evals)]:
        ax_r.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key[len("eval/"):])
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("held-out classes")
    ax_r.set_ylim(0, 1)
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.set_title("Retrieval on test classes")
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
        best = max(evals, key=lambda r: r.get("eval/recall@1", -1))
        lines += [f"Recall@1 on held-out classes: {first.get('eval/recall@1', float('nan')):.4f} at step {first['step']}"
                  f" -> {final.get('eval/recall@1', float('nan')):.4f} at step {final['step']}"
                  f" (best {best.get('eval/recall@1', float('nan')):.4f} at step {best['step']}).", ""]
        cols = [k for k in final if k.startswith("eval/") and k not in ("eval/eval_seconds",)]
        lines += ["| step | " + " | ".join(c[len("eval/"):] for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for r in evals:
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines += ["", "![Recall@k and loss](recall.png)", ""]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
