#!/usr/bin/env python
"""Sweep the global batch (and SiMix, world size): memory per rank, throughput, Recall@k.

    python tools/scaling_study.py                                  # G = 1024 4096 16384, 4 ranks, SiMix on
    python tools/scaling_study.py --global-batches 4096 65536 --simix on off --mode both

Each point is a short training run through the real launcher
(`deepspeed --num_gpus W rskdist/train.py --config BASE ...`, a tiny backbone by
default) and/or the loss micro-benchmark (tools/bench_loss.py). Results go to
OUT/results.csv (one row per point; points already there are skipped, so an
interrupted study resumes), the plot to OUT/study.png, and the memory estimator's
prediction (tools/estimate_memory.py) is stored beside each measured peak.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rskdist.runlog import METRICS_FILE, read_records
from rskdist.utils import deepspeed_bin

ROOT = Path(__file__).resolve().parent.parent

FIELDS = ["mode", "global_batch", "world_size", "simix", "local_batch", "steps", "images_per_s", "step_seconds",
          "loss_seconds", "rss_peak_mb_max", "estimate_mb", "estimate_error", "recall@1", "loss", "status",
          "wall_seconds"]
TINY = ["model.image_size=16", "model.embed_dim=64",
        "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}"]


def _key(row: dict) -> tuple:
    return (row["mode"], int(row["global_batch"]), int(row["world_size"]), str(row["simix"]))


def load_done(path: Path) -> dict:
    if not path.exists():
        return {}
    with path.open() as f:
        return {_key(r): r for r in csv.DictReader(f) if r.get("status") == "ok"}


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})


def run_train_point(args, global_batch: int, world: int, simix: bool, out: Path) -> dict:
    name = f"g{global_batch}_w{world}_{'simix' if simix else 'plain'}"
    overrides = [f"run.output_dir={out / 'points'}", f"run.name={name}", "run.resume=never",
                 f"run.max_steps={args.steps}", "run.save_every=0", "run.log_every=1", "run.loggers=[]",
                 f"data.global_batch={global_batch}", f"data.chunk_size={args.chunk_size}",
                 f"data.synthetic_classes={max(global_batch // 4, 64)}", f"loss.mix={'simix' if simix else 'none'}",
                 "eval.every_epochs=0", "eval.synthetic_size=512", "eval.ks=[1, 4]",
                 *(TINY if args.tiny else []), *args.overrides]
    cmd = [deepspeed_bin(), "--num_gpus", str(world), "rskdist/train.py",
           "--config", args.config, *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, env=env)
    run_dir = out / "points" / name
    if proc.returncode != 0 or not (run_dir / METRICS_FILE).exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": f"failed: {' | '.join(tail)[:300]}"}
    train, evals = read_records(run_dir)
    steady = train[1:] or train  # the first step carries start-up costs
    row = {
        "local_batch": global_batch // world, "steps": len(train),
        "images_per_s": round(sum(r["images_per_s"] for r in steady) / len(steady), 1),
        "step_seconds": round(sum(r["step_seconds"] for r in steady) / len(steady), 2),
        "loss_seconds": round(sum(r["loss_seconds"] for r in steady) / len(steady), 2),
        "rss_peak_mb_max": max(r["rss_peak_mb_max"] for r in train), "loss": round(train[-1]["loss"], 4),
        "recall@1": round(evals[-1].get("eval/recall@1", float("nan")), 4) if evals else "",
        "status": "ok",
    }
    if args.estimate:
        est = estimate_point(args, global_batch, world, overrides)
        row["estimate_mb"] = round(est, 1)
        row["estimate_error"] = round((est - row["rss_peak_mb_max"]) / row["rss_peak_mb_max"], 3)
    return row


def estimate_point(args, global_batch: int, world: int, overrides: list[str]) -> float:
    cmd = [sys.executable, "tools/estimate_memory.py", "--config", args.config, *overrides,
           "--world-size", str(world), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, check=True)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["total_mb"])


def run_loss_point(args, global_batch: int, simix: bool) -> dict:
    cmd = [sys.executable, "tools/bench_loss.py", "--sizes", str(global_batch), "--impls", "blockwise",
           "--dim", str(args.loss_dim), "--repeats", "1"] + (["--simix"] if simix else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    if "seconds" not in rec:
        return {"status": f"failed: {rec.get('error', proc.stderr[-300:])}"}
    return {"local_batch": global_batch, "loss_seconds": rec["seconds"], "rss_peak_mb_max": rec["peak_added_mb"],
            "status": "ok"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["mode"] == "train" and r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = sorted({(int(r["world_size"]), r["simix"]) for r in train})
    for world, simix in series:
        pts = sorted((int(r["global_batch"]), r) for r in train if int(r["world_size"]) == world and r["simix"] == simix)
        xs = [g for g, _ in pts]
        label = f"{world} ranks, SiMix {simix}"
        axes[0].plot(xs, [float(r["rss_peak_mb_max"]) for _, r in pts], marker="o", label=f"{label}: measured")
        if all(r.get("estimate_mb") not in ("", None) for _, r in pts):
            axes[0].plot(xs, [float(r["estimate_mb"]) for _, r in pts], ls="--", marker="x",
                         label=f"{label}: estimate")
        axes[1].plot(xs, [float(r["images_per_s"]) for _, r in pts], marker="o", label=label)
        recall = [(g, float(r["recall@1"])) for g, r in pts if r.get("recall@1") not in ("", None)]
        if recall:
            axes[2].plot(*zip(*recall), marker="o", label=label)
    titles = ["Peak memory per rank (MB)", "Throughput (images/s)", "Recall@1 after the short run"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    p.add_argument("--global-batches", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--simix", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--mode", choices=["train", "loss", "both"], default="train")
    p.add_argument("--config", default="configs/debug.yaml", help="base config of the training runs")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--no-tiny", dest="tiny", action="store_false", help="keep the base config's backbone")
    p.add_argument("--no-estimate", dest="estimate", action="store_false")
    p.add_argument("--loss-dim", type=int, default=512)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("overrides", nargs="*", help="extra config overrides for the training runs")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "results.csv"
    done = load_done(csv_path)
    modes = ["train", "loss"] if args.mode == "both" else [args.mode]
    points = [(mode, g, w, s == "on") for mode in modes for s in args.simix for g in args.global_batches
              for w in (args.world_sizes if mode == "train" else [1])]
    for i, (mode, g, w, simix) in enumerate(points, 1):
        base = {"mode": mode, "global_batch": g, "world_size": w, "simix": str(simix)}
        if _key(base) in done:
            print(f"[{i}/{len(points)}] {mode} G={g} W={w} SiMix={simix}: done already, skipped", flush=True)
            continue
        if g % (4 * w):
            print(f"[{i}/{len(points)}] {mode} G={g} W={w}: global batch not a multiple of 4 x world, skipped")
            continue
        print(f"[{i}/{len(points)}] {mode} G={g} W={w} SiMix={simix} ...", flush=True)
        t0 = time.perf_counter()
        row = run_train_point(args, g, w, simix, args.out) if mode == "train" else run_loss_point(args, g, simix)
        row = {**base, **row, "wall_seconds": round(time.perf_counter() - t0, 1)}
        append_row(csv_path, row)
        print("   " + json.dumps(row), flush=True)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    plot(rows, args.out / "study.png")
    print(f"wrote {csv_path} and {args.out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
