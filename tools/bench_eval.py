#!/usr/bin/env python
"""Benchmark all-vs-all retrieval evaluation (Recall@k + MAP@R + R-precision) on CPU.

Random N x 512 unit embeddings in classes of ~55 images (iNaturalist-like: class
centre + noise). Each size runs in a fresh subprocess so its peak RSS is its own.
One JSON line per size: seconds (search + metrics, data generation excluded), CPU
seconds, peak RSS, thread counts, backend, metric values.

    python tools/bench_eval.py                      # N = 10k, 50k, 136k
    python tools/bench_eval.py --sizes 20000 --backend torch --threads 2
    python tools/bench_eval.py --sizes 16384 --dim 128 --collapsed   # an untrained model's output
    python tools/bench_eval.py --sizes 262144 --dim 128 --ranks 2 --mode sharded   # 2 gloo ranks

``--ranks W`` runs W gloo processes on this machine: ``--mode replicated`` gives every
rank all N embeddings and splits the queries (evaluate_model below eval.shard_above),
``--mode sharded`` gives each rank only its N/W rows (rskdist.eval.sharded). The JSON then
holds each rank's seconds, CPU seconds, peak RSS and RSS after its data.

``--collapsed`` replaces the class structure by normalize(base + 1e-4 * randn): every
embedding within ~1e-4 of one direction (labels unchanged). The JSON then also holds
the search counters (retried queries, re-scored pairs, tie-capped queries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 136_093])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--class-size", type=int, default=55, help="mean images per class")
    p.add_argument("--noise", type=float, default=0.15, help="per-coordinate noise around class centres")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collapsed", action="store_true", help="near-identical embeddings: normalize(base + 1e-4 * randn)")
    p.add_argument("--ranks", type=int, default=1, help="gloo processes (each with --threads threads)")
    p.add_argument("--mode", default="sharded", choices=("replicated", "sharded"), help="with --ranks > 1")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_embeddings(n: int, dim: int, class_size: int, noise: float, seed: int, collapsed: bool = False,
                    rows: tuple[int, int] | None = None):
    """(emb, labels) of the N-row set, or of its rows [start, stop) only (the same values:
    every block is drawn, only the wanted rows are kept)."""
    import torch

    start, stop = rows or (0, n)
    g = torch.Generator().manual_seed(seed)
    num_classes = max(1, round(n / class_size))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    base = torch.randn(1, dim, generator=g)
    emb = torch.empty(stop - start, dim)
    for s in range(0, n, 16384):  # bounded temporaries
        if collapsed:
            e = base + 1e-4 * torch.randn(min(16384, n - s), dim, generator=g)
        else:
            e = centres[labels[s : s + 16384]] + noise * torch.randn(min(16384, n - s), dim, generator=g)
        lo, hi = max(s, start), min(s + 16384, stop)
        if lo < hi:
            emb[lo - start : hi - start] = torch.nn.functional.normalize(e[lo - s : hi - s], dim=1)
    return emb, labels[start:stop]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(args) -> dict:
    import torch

    from rskdist.eval import neighbors, retrieval_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
        if neighbors.faiss is not None:
            neighbors.faiss.omp_set_num_threads(args.threads)
    n = args.sizes[0]
    emb, labels = make_embeddings(n, args.dim, args.class_size, args.noise, args.seed, args.collapsed)
    rss_data = peak_rss_mb()
    searches = []
    init = neighbors.ExactSearch.__init__

    def keep(self, *a, **kw):  # record the search to report its work counters
        init(self, *a, **kw)
        searches.append(self)

    neighbors.ExactSearch.__init__ = keep
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tie-cap warning; the count is in the JSON
        metrics = retrieval_metrics(emb, labels, ks=args.ks, backend=args.backend)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    neighbors.ExactSearch.__init__ = init
    return {
        "n": n,
        "dim": args.dim,
        "collapsed": args.collapsed,
        "retried_queries": searches[0].num_retries,
        "rescored_pairs": searches[0].num_rescored,
        "seconds": round(seconds, 2),
        # CPU time of all threads: robust to other load on a shared machine.
        "cpu_seconds": round(cpu_seconds, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_data_mb": round(rss_data, 1),
        "backend": neighbors.resolve_backend(args.backend),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": neighbors.faiss.omp_get_max_threads() if neighbors.faiss is not None else None,
        "cpu_count": os.cpu_count(),
        "metrics": {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
    }


def _rank_worker(rank: int, args, init: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from rskdist.eval import retrieval_metrics, sharded_retrieval_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():  # one GPU a rank (the search runs there; gloo moves the rest)
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.ranks)
    n, w = args.sizes[0], args.ranks
    rows = (rank * n // w, (rank + 1) * n // w) if args.mode == "sharded" else None
    emb, labels = make_embeddings(n, args.dim, args.class_size, args.noise, args.seed, args.collapsed, rows)
    rss_data = peak_rss_mb()
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.mode == "sharded":
            metrics = sharded_retrieval_metrics(emb, labels, group=dist.group.WORLD, ks=args.ks, backend=args.backend)
        else:
            metrics = retrieval_metrics(emb, labels, group=dist.group.WORLD, ks=args.ks, backend=args.backend)
    out = {"rank": rank, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(time.process_time() - c0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
           "rss_after_data_mb": round(rss_data, 1), "torch_threads": torch.get_num_threads(),
           "metrics": {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(args) -> dict:
    """--ranks W: W gloo processes (fresh interpreters: each peak RSS is its own rank's)."""
    import tempfile

    import torch.multiprocessing as mp

    from rskdist.eval import neighbors

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_rank_worker, args=(args, f"file://{tmp}/rdzv", tmp), nprocs=args.ranks, join=True)
        wall = time.perf_counter() - t0
        per_rank = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.ranks)]
    return {"n": args.sizes[0], "dim": args.dim, "ranks": args.ranks, "mode": args.mode, "collapsed": args.collapsed,
            "seconds": max(r["seconds"] for r in per_rank), "wall_with_start_s": round(wall, 1),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in per_rank),
            "backend": neighbors.resolve_backend(args.backend), "load_avg_1m": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(), "per_rank": [{k: v for k, v in r.items() if k != "metrics"} for r in per_rank],
            "metrics": per_rank[0]["metrics"]}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_ranks(args) if args.ranks > 1 else run_one(args)), flush=True)
        return
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for n in args.sizes:
        # Drop the parent's --sizes list; the child runs exactly one size.
        child_argv, skip = [], False
        for a in base:
            if a == "--sizes":
                skip = True
                continue
            if skip and not a.startswith("--"):
                continue
            skip = False
            child_argv.append(a)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--sizes", str(n), *child_argv]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(json.dumps({"n": n, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
