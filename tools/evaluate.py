#!/usr/bin/env python
"""Evaluate retrieval: Recall@k, MAP@R, R-precision.

From a trained run (the model of a checkpoint embeds every held-out split the config
lists: the validation classes with data.val_classes, then data.test_splits), or from
a saved embeddings file (``.pt`` or ``.npz`` with ``embeddings`` and ``labels``;
optionally a separate ``--gallery`` file for query-vs-gallery).

    python tools/evaluate.py --checkpoint runs/demo                      # config from the run folder
    python tools/evaluate.py --checkpoint runs/demo --tag best           # the best evaluation's checkpoint
    python tools/evaluate.py --checkpoint runs/vehicleid --split test_800  # one split of the run's data
    python tools/evaluate.py --config configs/demo.yaml --checkpoint runs/demo/checkpoints/step00000050
    python tools/evaluate.py --embeddings test_emb.npz --dataset inat --out results.json
    python tools/evaluate.py --embeddings q.pt --gallery g.pt --ks 1 10 100
    python tools/evaluate.py --embeddings e.pt --history runs/x/eval.jsonl --step 1200
    python tools/evaluate.py --checkpoint runs/demo --tag best --examples runs/demo/best_examples   # + pictures

Prints a table, writes JSON (``--out``), and with ``--history`` appends the result to a
JSON-lines history and reports whether it is the best so far by ``--best-metric``.
Model inputs (``--config`` + ``--checkpoint``) plug in through ``embed_fn`` in
:func:`main`: any callable returning ``(embeddings, labels)`` (e.g. one that builds the
model and loader and calls :func:`rskdist.eval.embed_dataset`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import torch

from rskdist.eval import (
    BACKENDS,
    DEFAULT_KS,
    METRICS,
    BestTracker,
    default_ks,
    format_metrics_table,
    load_embeddings,
    retrieval_metrics,
    retrieval_metrics_qg,
    split_metric,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_argument_group("inputs")
    src.add_argument("--embeddings", help="embeddings file (.pt or .npz with 'embeddings' and 'labels')")
    src.add_argument("--gallery", help="separate gallery file: query-vs-gallery instead of leave-one-out")
    src.add_argument("--checkpoint", help="run folder, its checkpoints/ folder or one checkpoints/<tag> folder")
    src.add_argument("--tag", help="with --checkpoint: which checkpoint of the run: latest (default), best (the best "
                                   "evaluation by eval.best_metric) or a step tag such as step00000500")
    src.add_argument("--config", help="experiment YAML (default: the run folder's config.yaml)")
    src.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, e.g. --override data.root=/data/shards/cub (repeatable)")
    src.add_argument("--split", help="with --checkpoint: evaluate this split only (default: every split of the "
                                     "config: 'val' with data.val_classes, then data.test_splits)")
    src.add_argument("--examples", metavar="DIR",
                     help="with --checkpoint: also write DIR/examples.html, the first split's retrievals as pictures "
                          "(24 queries, thumbnails in DIR/examples/)")
    src.add_argument("--save-embeddings", help="with --checkpoint: also write the embeddings here (.pt/.npz); with "
                                               "several splits, one file per split, named NAME.<split>.pt")
    m = p.add_argument_group("metrics")
    m.add_argument("--dataset", choices=sorted(DEFAULT_KS), help="use this dataset's default k list")
    m.add_argument("--ks", type=int, nargs="+", help="Recall@k values (default: --dataset's list, else 1 2 4 8)")
    m.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    m.add_argument("--backend", default="auto", choices=BACKENDS)
    m.add_argument("--device", help="work device for the torch backend (default: auto)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", help="write the results as JSON here")
    o.add_argument("--history", help="JSON-lines results history to append to (tracks the best)")
    o.add_argument("--best-metric", default="recall@1", help="metric that decides the best result")
    o.add_argument("--mode", default="max", choices=("max", "min"))
    o.add_argument("--step", type=int, help="step/epoch recorded in the history (default: next index)")
    return p


def resolve_ks(args, cfg=None) -> tuple[int, ...]:
    if args.ks:
        return tuple(args.ks)
    if args.dataset:
        return default_ks(args.dataset)
    if cfg is not None:
        return tuple(cfg.eval.ks) or default_ks(cfg.data.dataset)
    return (1, 2, 4, 8)


def checkpoint_config(args):
    """The experiment config of --checkpoint: --config, else the run folder's config.yaml."""
    from pathlib import Path

    from rskdist.checkpoint import resolve_checkpoint
    from rskdist.config import load_config

    if args.config is not None:
        return load_config(args.config, args.override)
    folder, _ = resolve_checkpoint(args.checkpoint, args.tag)
    path = folder.parent / "config.yaml"
    if not Path(path).is_file():
        raise ValueError(f"no config.yaml beside {folder}; pass --config configs/<experiment>.yaml")
    return load_config(path, args.override, recorded=True)  # the run's own record, however old


def embed_checkpoint(args, cfg) -> dict[str, dict]:
    """Embed the run's held-out splits (``--split``, else every split the config lists) with
    the checkpoint's model, in this process: ``{split: {"embeddings", "labels", "num_unreadable"}}``;
    unreadable images are left out, as in the trainer's evaluation."""
    from pathlib import Path

    from rskdist.build import load_trained_model
    from rskdist.eval import embed_local, gather_embedded, save_embeddings
    from rskdist.startup import run_data

    # The architecture the run recorded (model.json), not the config's: a weights file may
    # have decided part of it (open_clip QuickGELU, mean/std), and it is not needed here.
    model = load_trained_model(args.checkpoint, args.tag, model_cfg=cfg.model)
    cfg.model.image_size = model.image_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    data = run_data(cfg)
    splits = [args.split] if args.split else data.eval_splits
    sets = {}
    for split in splits:
        stream = data.eval_stream(split, batch_size=cfg.eval.batch_size, synthetic_size=cfg.eval.synthetic_size,
                                  rank=0, world_size=1, mean=model.mean, std=model.std)
        try:
            emb, labels, ids, num_unreadable = gather_embedded(*embed_local(model, stream, device=device), group=None)
        finally:
            stream.close()
        # ids and read_images: for the pictures of --examples (reads by index work after close).
        sets[split] = {"embeddings": emb, "labels": labels, "num_unreadable": num_unreadable, "ids": ids,
                       "read_images": stream.read_images}
        if args.save_embeddings:
            path = Path(args.save_embeddings)
            save_embeddings(path if len(splits) == 1 else path.with_name(f"{path.stem}.{split}{path.suffix}"),
                            emb, labels)
    return sets


def load_inputs(args) -> dict:
    """Embeddings from files: ``{"embeddings", "labels"}`` plus gallery ones if given."""
    if not args.embeddings:
        raise SystemExit("error: give --checkpoint RUN (a trained run) or --embeddings FILE")
    emb, lab = load_embeddings(args.embeddings)
    inputs = {"embeddings": emb, "labels": lab}
    if args.gallery:
        inputs["gallery_embeddings"], inputs["gallery_labels"] = load_embeddings(args.gallery)
    return inputs


def compute(inputs: dict, *, ks, metrics, backend, device=None) -> dict:
    kw = dict(ks=ks, metrics=metrics, backend=backend, device=device)
    if "gallery_embeddings" in inputs:
        return retrieval_metrics_qg(
            inputs["embeddings"], inputs["labels"], inputs["gallery_embeddings"], inputs["gallery_labels"], **kw
        )
    return retrieval_metrics(inputs["embeddings"], inputs["labels"], **kw)


def write_pictures(args, split: str, inputs: dict, metrics: dict) -> None:
    from rskdist.eval import find_examples, write_examples

    t0 = time.perf_counter()
    examples = find_examples(inputs["embeddings"], inputs["labels"], inputs["ids"], backend=args.backend,
                             device=args.device)
    path = write_examples(args.examples, examples, metrics, inputs["read_images"], title=f"{args.checkpoint}: {split}")
    print(f"wrote {path} ({len(examples)} queries, {time.perf_counter() - t0:.2f} s)")


def main(argv: Sequence[str] | None = None, embed_fn: Callable[[argparse.Namespace], tuple] | None = None) -> dict:
    """CLI entry. ``embed_fn(args) -> (embeddings, labels[, num_unreadable])`` replaces file
    loading (one set, reported as the test split). Images that could not be read are reported
    as ``num_unreadable_images`` in the results, as the trainer does. Each split's metrics
    are named as in the trainer's records (rskdist.eval.split_metric: the "test" split's plain,
    others prefixed, e.g. val/recall@1)."""
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        if args.checkpoint and embed_fn is None:
            cfg = checkpoint_config(args)
            sets = embed_checkpoint(args, cfg)
        elif embed_fn is not None:
            emb, lab, *rest = embed_fn(args)
            sets = {"test": {"embeddings": emb, "labels": lab, "num_unreadable": int(rest[0]) if rest else 0}}
        else:
            sets = {"test": load_inputs(args)}
        ks = resolve_ks(args, cfg)
    except ValueError as exc:  # a missing checkpoint, config, data folder or split
        raise SystemExit(f"error: {exc}") from None

    results, seconds = {}, 0.0
    for split, inputs in sets.items():
        t0 = time.perf_counter()
        split_results = compute(inputs, ks=ks, metrics=args.metrics, backend=args.backend, device=args.device)
        took = time.perf_counter() - t0
        seconds += took
        if inputs.get("num_unreadable"):  # left out of the metrics: say so next to them (absent when none)
            split_results["num_unreadable_images"] = int(inputs["num_unreadable"])
        n, d = tuple(torch.as_tensor(inputs["embeddings"]).shape)
        named = f"{split}: " if len(sets) > 1 or split != "test" else ""
        print(format_metrics_table(split_results, title=f"{named}{n} x {d} embeddings, {took:.1f} s"))
        results.update({split_metric(split, name): value for name, value in split_results.items()})
        if args.examples and "ids" in inputs and split == next(iter(sets)):
            write_pictures(args, split, inputs, split_results)

    record = {"results": results, "splits": list(sets), "ks": list(ks), "backend": args.backend, "seconds": seconds,
              "embeddings": args.embeddings, "gallery": args.gallery, "checkpoint": args.checkpoint, "tag": args.tag}
    if args.history:
        tracker = BestTracker.from_history(args.history, metric=args.best_metric, mode=args.mode)
        step = args.step if args.step is not None else len(tracker.history)
        record["is_best"] = tracker.append_to_history(args.history, step, results)
        record["best"] = {"metric": tracker.metric, "value": tracker.best_value, "step": tracker.best_step}
        print(f"best {tracker.metric}: {tracker.best_value} at step {tracker.best_step}"
              + (" (this one)" if record["is_best"] else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
