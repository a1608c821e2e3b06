#!/usr/bin/env python
"""The proxy-loss study: rskdist's proxy losses across ranks against a plain loop of the same PML loss.

    python tools/proxy_study.py --out runs/proxy_study [--losses proxy_anchor norm_softmax arcface cosface]
        [--datasets demo digits] [--seeds 0 1 2] [--config configs/proxy_study.yaml] [--set key=value ...]

Every (dataset, loss, seed) is trained three ways from one config:
- `rskdist`: rskdist/train.py through `deepspeed --num_gpus NPROC` on CPU ranks (the
  engine, the two-pass step, the loss's proxies inside the engine; ZeRO stage and
  everything else from the config);
- `plain`: one process, no DeepSpeed, no two-pass step: the same model (`build_model`,
  same seed), the same batches (the TrainLoader with world_size=1, same seed and sampler:
  the same images as the ranks', the crops of rank 0's share alike), the same optimizer,
  parameter groups and LR schedule (`build_optimizer` on a `TrainModule`, `lr_factor`;
  the loss's frozen-backbone warm-up, loss.backbone_warmup_epochs, as the trainer's
  backbone groups at LR 0), pytorch-metric-learning's loss built by `build_pml_loss` (not rskdist's wrapper),
  `loss.backward(); optimizer.step()`;
- `plain_ranks`: the same plain loop fed the NPROC ranks' own batches concatenated (every
  crop the same as the rskdist run's), so the two can be compared step by step.
All are evaluated by `rskdist.eval.evaluate_model` on the held-out split(s) with the
config's ks, once at the end.

Writes OUT/runs/<dataset>__<loss>__<impl>__seed<k>/ (a trainer run folder, or the same
files for the plain loop: config.yaml, metrics.jsonl, summary.json), OUT/results.csv
(one row per run), OUT/report.md (mean +- std over seeds per dataset, loss and
implementation; whether rskdist lies within the plain loop's seed spread; the largest
step-by-step loss difference between rskdist and plain_ranks) and
OUT/proxy_study.png. A finished run (its summary.json) is never trained again, so
rerunning the command continues the study; one JSON line per finished run goes to
stdout. docs/studies.md has the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

import rskdist
from rskdist.comm import free_port
from rskdist.config import Config, load_config, save_config, to_dict, validate
from rskdist.runlog import METRICS_FILE, SUMMARY_FILE, read_records
from rskdist.utils import deepspeed_bin, run_logged

LOSSES = ("proxy_anchor", "norm_softmax", "arcface", "cosface")
# rskdist: the trainer on NPROC ranks; plain: the plain loop on the world_size=1 batches;
# plain_ranks: the plain loop on the very batches of the NPROC ranks (crops included).
IMPLS = ("rskdist", "plain", "plain_ranks")
# Overrides of the base config per dataset (tools/make_shards.py builds both folders).
DATASETS: dict[str, list[str]] = {
    # 100 train / 100 test classes of 24 images; 16 classes x 4 per step.
    "demo": ["data.root=data/demo", "data.dataset=demo"],
    # Digits 0-5 train, 6-9 test (~180 images a class): every step holds all 6 training
    # classes, 8 images each. No flip (a mirrored digit is another glyph), mild crops.
    "digits": ["data.root=data/digits", "data.dataset=digits", "data.m=8", "data.global_batch=48",
               "data.chunk_size=24", "data.hflip=false", "data.crop_scale=[0.5, 1.0]"],
}
SUMMARY = SUMMARY_FILE  # the trainer writes it last; the plain loop too
TIMING = "study_seconds.json"  # the wall time of a run as the study measured it (launcher included)
LAST_STEPS = 10  # the training loss is reported as the mean over this many last steps


# ----------------------------------------------------------------------------- the plain loop
def _endless(stream):
    while True:
        yield from stream


def train_plain(cfg: Config, run_dir: Path | None = None, *, batch_ranks: int = 1,
                device: torch.device = torch.device("cpu")) -> dict:
    """Train cfg's proxy loss in one process without rskdist's engine, step or loss wrapper;
    evaluate as the trainer does. Returns {"losses": per-step loss, "final_eval": metrics,
    "proxy_change": |proxies_end - proxies_start| / |proxies_start|}; with `run_dir`, also
    writes config.yaml, metrics.jsonl and summary.json there, as a trainer run does.

    The batches are the TrainLoader's with world_size=1: the same images as a run on any
    number of ranks, augmented alike on rank 0's share only (a crop is drawn per rank and
    position). `batch_ranks=W` concatenates the W rank streams of a W-rank run instead,
    the very images (crops included) its ranks see: for step-by-step comparisons."""
    from rskdist.build import build_model, build_optimizer, lr_factor
    from rskdist.eval import default_ks, evaluate_model, split_metric
    from rskdist.parallel.step_parts import TrainModule
    from rskdist.startup import batch_layout, run_data
    from rskdist.loss.baselines import BASELINES, build_pml_loss

    name = cfg.loss.name
    if name not in BASELINES or not BASELINES[name].proxies:
        proxy_losses = [n for n, b in BASELINES.items() if b.proxies]
        raise ValueError(f"loss.name={name}: the plain loop trains proxy losses only ({', '.join(proxy_losses)})")
    if cfg.loss.mix != "none":
        raise ValueError(f"loss.mix={cfg.loss.mix}: the plain loop has no mixup; set loss.mix=none")
    # The trainer's order of construction, so the same seed gives the same weights and proxies.
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    data, layout = run_data(cfg), batch_layout(cfg, batch_ranks)
    streams = [data.train_stream(layout, rank=r, mean=model.mean, std=model.std, device=device)
               for r in range(batch_ranks)]
    criterion, _ = build_pml_loss(name, num_classes=data.num_classes, embed_dim=cfg.model.embed_dim,
                                  **cfg.loss.options)  # proxy losses take no miner
    criterion.to(device)
    module = TrainModule(model, criterion, lr_multiplier=cfg.loss.proxy_lr_multiplier or BASELINES[name].lr_multiplier)
    o = cfg.optim
    steps_per_epoch = streams[0].steps_per_epoch
    # The paper's frozen-backbone warm-up (Proxy-Anchor: one epoch), as rskdist documents it
    # (docs/loss.md): the backbone's groups at LR 0 for those steps, its gradients and AdamW
    # moments still computed, then the schedule.
    warmup_epochs = cfg.loss.backbone_warmup_epochs
    if warmup_epochs < 0:
        warmup_epochs = BASELINES[name].backbone_warmup_epochs
    frozen_steps = int(round(warmup_epochs * steps_per_epoch))
    optimizer = build_optimizer(module, cfg.optim, backbone_apart=frozen_steps > 0)

    def factor(step: int) -> float:
        return lr_factor(step, steps_per_epoch=steps_per_epoch, warmup_steps=o.warmup_steps,
                         decay_epochs=o.decay_epochs, decay_factor=o.decay_factor)

    def backbone_factor(step: int) -> float:
        return 0.0 if step < frozen_steps else factor(step)

    roles = [g["role"] for g in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [backbone_factor if role == "backbone" else factor for role in roles])
    total_steps = cfg.run.max_steps or max(1, round(cfg.run.epochs * steps_per_epoch))
    proxies_start = [p.detach().clone() for p in criterion.parameters()]
    backbone_start = [p.detach().clone() for p in model.backbone.parameters()]

    records = []
    module.train()
    endless = [_endless(s) for s in streams]
    for step in range(1, total_steps + 1):
        images, labels = (torch.cat(parts) for parts in zip(*(next(e) for e in endless)))
        loss = criterion(model(images.to(device)).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:  # what DeepSpeed's gradient_clipping does (off at 0)
            torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
        optimizer.step()
        records.append({"step": step, "kind": "train", "loss": float(loss.detach()),
                        "lr": optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1]["lr_scale"]})
        schedule.step()
    # Stop the loaders' workers now: left to the garbage collector, their handles would be
    # inherited by the evaluation's workers, which then fail to shut them down.
    for e in endless:
        e.close()
    for s in streams:
        if hasattr(s, "close"):  # shard loaders own workers; the synthetic stream has none
            s.close()

    metrics = {}
    ks = tuple(cfg.eval.ks) or default_ks(cfg.data.dataset)
    for split in data.eval_splits:
        eval_stream = data.eval_stream(split, batch_size=cfg.eval.batch_size, synthetic_size=cfg.eval.synthetic_size,
                                       rank=0, world_size=1, mean=model.mean, std=model.std)
        try:
            result = evaluate_model(model, eval_stream, device=device, ks=ks)
        finally:
            eval_stream.close()
        metrics.update({split_metric(split, key): value for key, value in result.items()})
    out = {"losses": [r["loss"] for r in records], "final_eval": metrics,
           "proxy_change": _change(criterion.parameters(), proxies_start),
           "backbone_change": _change(model.backbone.parameters(), backbone_start), "frozen_steps": frozen_steps}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        evaluation = {"step": total_steps, "kind": "eval",
                      **{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in [*records, evaluation]))
        (run_dir / SUMMARY).write_text(json.dumps({"step": total_steps, "final_eval": metrics,
                                                   **{k: out[k] for k in ("proxy_change", "backbone_change",
                                                                          "frozen_steps")}}, indent=2))
    return out


def _change(params, start: list[torch.Tensor]) -> float:
    """|params - start| / |start|, summed over the tensors: how far training moved them."""
    moved = sum(float((p.detach() - p0).norm()) for p, p0 in zip(params, start))
    return moved / max(sum(float(p0.norm()) for p0 in start), 1e-12)


# ----------------------------------------------------------------------------- the rskdist run
def rskdist_command(config: str, overrides: list[str], *, nproc: int, port: int) -> list[str]:
    # Its own rendezvous port, so the study can share the machine with other runs.
    train_py = Path(rskdist.__file__).parent / "train.py"
    return [deepspeed_bin(), "--num_gpus", str(nproc), "--master_port", str(port), str(train_py),
            "--config", config, *overrides]


# ----------------------------------------------------------------------------- runs and rows
def run_name(dataset: str, loss: str, impl: str, seed: int) -> str:
    return f"{dataset}__{loss}__{impl}__seed{seed}"


def run_overrides(sets: list[str], dataset: str, loss: str, seed: int, runs_dir: Path, name: str) -> list[str]:
    return [*DATASETS[dataset], *sets, f"loss.name={loss}", f"run.seed={seed}", f"run.output_dir={runs_dir}",
            f"run.name={name}"]


def read_row(run_dir: Path) -> dict:
    """Final metrics and training loss of a finished run folder (either implementation)."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    losses = [r["loss"] for r in read_records(run_dir)[0]]
    row = {"steps": summary.get("step")}
    for key, value in (summary.get("final_eval") or {}).items():
        if key.rsplit("/", 1)[-1].startswith("recall@") or key.rsplit("/", 1)[-1] in ("map@r", "r_precision"):
            row[key] = value
    if losses:
        row["loss_first"] = losses[0]
        row[f"loss_last{LAST_STEPS}"] = statistics.fmean(losses[-LAST_STEPS:])
    if (run_dir / TIMING).is_file():
        row["seconds"] = json.loads((run_dir / TIMING).read_text())["seconds"]
    return row


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """A finished run counts only if it was trained with this very config."""
    old = to_dict(load_config(run_dir / "config.yaml", recorded=True))
    new = to_dict(cfg)
    where = {"run.output_dir", "run.name"}  # a study folder may move
    diff = sorted(f"{s}.{k}" for s in new for k in new[s]
                  if old.get(s, {}).get(k) != new[s][k] and f"{s}.{k}" not in where)
    if diff:
        raise ValueError(f"proxy_study: {run_dir} was trained with another config ({', '.join(diff)} differ); "
                         f"use another --out or remove that folder")


# ----------------------------------------------------------------------------- the report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {std:.4f}"


def compare(rows: list[dict], metric: str, ours: str = "rskdist", base: str = "plain") -> list[dict]:
    """Per (dataset, loss): the values over seeds of two implementations, the paired
    difference (ours - base, same seed) and whether ours' mean lies within base's seed
    spread, taken as its mean ± 2 sample standard deviations (None below 2 seeds)."""
    done = [r for r in rows if r.get("status") == "done" and r.get(metric) not in (None, "")]
    out = []
    for dataset, loss in dict.fromkeys((r["dataset"], r["loss"]) for r in done):
        by_impl = {impl: {int(r["seed"]): float(r[metric]) for r in done
                          if (r["dataset"], r["loss"], r["impl"]) == (dataset, loss, impl)} for impl in (ours, base)}
        paired = [by_impl[ours][s] - by_impl[base][s] for s in sorted(set(by_impl[ours]) & set(by_impl[base]))]
        within = None
        if len(by_impl[base]) > 1 and by_impl[ours]:
            b_mean, b_std = _mean_std(list(by_impl[base].values()))
            within = abs(statistics.fmean(by_impl[ours].values()) - b_mean) <= 2 * b_std
        out.append({"dataset": dataset, "loss": loss, ours: list(by_impl[ours].values()),
                    base: list(by_impl[base].values()), "paired": paired, "within": within})
    return out


def loss_gaps(rows: list[dict]) -> list[dict]:
    """Per (dataset, loss): rskdist against the plain loop on the same ranks' batches, the
    largest |loss difference| over every step and seed, and the largest |R@1| and |MAP@R|
    differences over seeds."""
    done = {(r["dataset"], r["loss"], r["impl"], int(r["seed"])): r for r in rows if r.get("status") == "done"}
    out = []
    for dataset, loss in dict.fromkeys((d, lo) for d, lo, _, _ in done):
        pairs = [(done[(dataset, loss, "rskdist", s)], done[(dataset, loss, "plain_ranks", s)])
                 for d, lo, impl, s in done if (d, lo, impl) == (dataset, loss, "rskdist")
                 and (dataset, loss, "plain_ranks", s) in done]
        if not pairs:
            continue
        steps = 0
        gap = {"max_loss_gap": 0.0, "max_recall@1_gap": 0.0, "max_map@r_gap": 0.0}
        for a, b in pairs:
            la = [r["loss"] for r in read_records(Path(a["run_dir"]))[0]]
            lb = [r["loss"] for r in read_records(Path(b["run_dir"]))[0]]
            steps += min(len(la), len(lb))
            gap["max_loss_gap"] = max(gap["max_loss_gap"], *(abs(x - y) for x, y in zip(la, lb)))
            for key in ("recall@1", "map@r"):
                gap[f"max_{key}_gap"] = max(gap[f"max_{key}_gap"], abs(float(a[key]) - float(b[key])))
        out.append({"dataset": dataset, "loss": loss, "seeds": len(pairs), "steps": steps, **gap})
    return out


def write_report(out: Path, rows: list[dict], command: str, nproc: int) -> None:
    fields = ["dataset", "loss", "impl", "seed", "status"]
    fields += sorted({k for r in rows for k in r} - set(fields) - {"run_dir", "seconds"}, key=_column_order)
    fields += ["seconds", "run_dir"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    lines = ["# Proxy-loss study", "", "```bash", command, "```", "",
             f"`rskdist`: rskdist/train.py on {nproc} CPU ranks through `deepspeed`; `plain`: one process, PML's "
             "loss, `loss.backward(); optimizer.step()`, the world_size=1 batches; `plain_ranks`: the same loop on "
             f"the {nproc} ranks' own batches. Final evaluation, mean ± sample std over seeds; Δ = rskdist − plain "
             "of the same seed (same initial weights, same images; the crops of rank 0's share only), mean ± std. "
             "*Within* = rskdist's mean lies within the plain loop's mean ± 2 std.", ""]
    for metric, title in (("recall@1", "R@1"), ("map@r", "MAP@R")):
        lines += [f"| dataset | loss | plain {title} | rskdist {title} | Δ (paired) | within |",
                  "|---|---|---|---|---|---|"]
        for c in compare(rows, metric):
            verdict = "-" if c["within"] is None else ("yes" if c["within"] else "**no**")
            lines.append(f"| {c['dataset']} | {c['loss']} | {_fmt(c['plain'])} | {_fmt(c['rskdist'])} | "
                         f"{_fmt(c['paired'])} | {verdict} |")
        lines.append("")
    gaps = loss_gaps(rows)
    if gaps:
        lines += ["rskdist against `plain_ranks` (the same batches, crops included): largest differences over "
                  "every step and seed.", "",
                  "| dataset | loss | seeds | steps compared | max abs Δ loss | max abs Δ R@1 | max abs Δ MAP@R |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['dataset']} | {g['loss']} | {g['seeds']} | {g['steps']} | {g['max_loss_gap']:.2e} | "
                  f"{g['max_recall@1_gap']:.2e} | {g['max_map@r_gap']:.2e} |" for g in gaps]
        lines.append("")
    last = f"loss_last{LAST_STEPS}"
    firsts = {(c["dataset"], c["loss"]): c for c in compare(rows, "loss_first")}
    lines += [f"Training loss (first step; mean of the last {LAST_STEPS} steps):", "",
              "| dataset | loss | plain first | rskdist first | plain last | rskdist last |",
              "|---|---|---|---|---|---|"]
    for c in compare(rows, last):
        first = firsts[(c["dataset"], c["loss"])]
        lines.append(f"| {c['dataset']} | {c['loss']} | {_fmt(first['plain'])} | {_fmt(first['rskdist'])} | "
                     f"{_fmt(c['plain'])} | {_fmt(c['rskdist'])} |")
    unfinished = [r for r in rows if r.get("status") != "done"]
    if unfinished:
        lines += ["", "Runs not finished:", ""]
        lines += [f"- {run_name(r['dataset'], r['loss'], r['impl'], int(r['seed']))}: {r['status']}"
                  for r in unfinished]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out / "proxy_study.png", rows)


def _column_order(key: str) -> tuple:
    """recall@k by k, then MAP@R, R-precision, the other metrics, steps, the losses."""
    metric = key.rsplit("/", 1)[-1]  # splits other than "test" are prefixed
    if metric.startswith("recall@"):
        return (0, key.rsplit("/", 1)[0] if "/" in key else "", int(metric.split("@")[1]), key)
    order = {"map@r": 1, "r_precision": 2, "steps": 4}
    return (order.get(metric, 5 if metric.startswith("loss") else 3), "", 0, key)


def plot(path: Path, rows: list[dict]) -> None:
    """R@1 per seed (dots) and mean (bar) of both implementations, per loss, one panel per dataset."""
    comparisons = compare(rows, "recall@1")
    if not comparisons:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(c["dataset"] for c in comparisons))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        cells = [c for c in comparisons if c["dataset"] == dataset]
        for i, c in enumerate(cells):
            for dx, impl, color in ((-0.15, "plain", "tab:blue"), (0.15, "rskdist", "tab:orange")):
                values = c[impl]
                if values:
                    ax.scatter([i + dx] * len(values), values, color=color, s=18,
                               label=impl if i == 0 else None, zorder=3)
                    ax.hlines(statistics.fmean(values), i + dx - 0.1, i + dx + 0.1, color=color, lw=2)
        ax.set_xticks(range(len(cells)), [c["loss"] for c in cells])
        ax.set_title(dataset)
        ax.set_ylabel("recall@1 (final)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--config", default="configs/proxy_study.yaml", help="base config of every run")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to train")
    p.add_argument("--plain-ranks-seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="seeds that also train plain_ranks (default: the first of --seeds; it repeats the rskdist run "
                        "step by step, so one seed shows whether it does)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run of every implementation (repeatable)")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the rskdist runs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one rskdist run may take")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    runs_dir = out / "runs"
    # The command that trains the study (--report-only only rereads it).
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = shlex.join(["python", "tools/proxy_study.py", *given])
    ranks_seeds = args.seeds[:1] if args.plain_ranks_seeds is None else args.plain_ranks_seeds
    plan = []
    try:
        for dataset in args.datasets:
            for loss in args.losses:
                for seed in args.seeds:
                    for impl in args.impls:
                        if impl == "plain_ranks" and seed not in ranks_seeds:
                            continue
                        name = run_name(dataset, loss, impl, seed)
                        overrides = run_overrides(args.sets, dataset, loss, seed, runs_dir, name)
                        cfg = load_config(args.config, overrides)
                        validate(cfg, world_size=1 if impl == "plain" else args.nproc)
                        if (runs_dir / name / SUMMARY).is_file():
                            check_same_config(runs_dir / name, cfg)
                        plan.append((dataset, loss, seed, impl, name, overrides, cfg))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # SIGTERM stops the study as Ctrl-C does: the running rskdist run is stopped (it saves
    # its step and resumes next time), a plain run is dropped, the report is written.
    signal.signal(signal.SIGTERM, _interrupt)
    rows, failed, interrupted = [], 0, False
    t_study = time.perf_counter()
    try:
        for n, (dataset, loss, seed, impl, name, overrides, cfg) in enumerate(plan, 1):
            run_dir = runs_dir / name
            row = {"dataset": dataset, "loss": loss, "impl": impl, "seed": seed, "run_dir": str(run_dir)}
            if (run_dir / SUMMARY).is_file():
                rows.append({**row, "status": "done", **read_row(run_dir)})
                continue
            if args.report_only:
                rows.append({**row, "status": "not run"})
                continue
            print(f"[{n}/{len(plan)}] {name}: start ({time.perf_counter() - t_study:.0f} s into the study)",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            if impl != "rskdist":
                train_plain(cfg, run_dir, batch_ranks=args.nproc if impl == "plain_ranks" else 1)
                code = 0
            else:
                cmd = rskdist_command(args.config, overrides, nproc=args.nproc, port=free_port())
                code = run_logged(cmd, out / "logs" / f"{name}.log", timeout=args.timeout, who="proxy_study")
            seconds = round(time.perf_counter() - t0, 1)
            if code == 0 and (run_dir / SUMMARY).is_file():
                (run_dir / TIMING).write_text(json.dumps({"seconds": seconds}))
                row = {**row, "status": "done", **read_row(run_dir)}
                print(json.dumps(row), flush=True)
            else:
                failed += 1
                row = {**row, "status": f"failed (exit {code}, log {out / 'logs' / f'{name}.log'})",
                       "seconds": seconds}
                print(f"[{n}/{len(plan)}] {name}: {row['status']}", file=sys.stderr, flush=True)
            rows.append(row)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, rows, command, args.nproc)
    if interrupted:
        print(f"proxy_study: interrupted after {len(rows)} runs; rerun the same command to go on", file=sys.stderr)
        return 130
    print(f"proxy_study: {len(rows)} runs, {failed} failed; {out / 'report.md'}", file=sys.stderr)
    return 1 if failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
