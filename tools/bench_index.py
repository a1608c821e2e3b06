#!/usr/bin/env python
"""Benchmark the index tools/index.py builds: IVF-PQ against exact search on synthetic data.

N clustered unit vectors (rskdist.search.index.clustered_vectors: N / 100 clusters, two
points of a cluster at cosine ~0.5) and Q held-out queries of the same clusters. Exact top-k
comes from a flat inner-product index. The IVF-PQ index is built as `tools/index.py build
--kind ivfpq` builds it (parameters from N and d, trained on a seeded sample); for each
nprobe it reports recall@k against exact and the batch and single-query latency, as ranked
by the quantised scores and re-ranked (tools/index.py query's default: k x 10 candidates
by exact score). Prints one JSON object: data, exact (build, memory, latency), ivfpq
(parameters, train/add seconds, memory, per-nprobe recall and latency), peak RSS.

    python tools/bench_index.py                            # 1M x 128
    python tools/bench_index.py --n 200000 --dim 256 --nprobe 8 32 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (default 1M)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--cluster-size", type=int, default=100, help="mean vectors per cluster")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a unit cluster centre")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", help="cells searched (default: the index's, /4 and x4)")
    p.add_argument("--rerank", type=int, default=10, help="re-ranked: k x R candidates by exact score (default 10)")
    p.add_argument("--single", type=int, default=50, help="queries timed one at a time (latency)")
    p.add_argument("--threads", type=int, help="faiss threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def latency_ms(search, queries: np.ndarray, single: int):
    """`search(queries)`'s result, its mean time per query, and the median time of `single`
    one-query searches."""
    result, batch_s = timed(lambda: search(queries))
    times = [timed(lambda q=q: search(q[None]))[1] for q in queries[:single]]
    return result, {"batch_ms_per_query": round(1e3 * batch_s / len(queries), 4),
                    "single_query_ms_median": round(1e3 * statistics.median(times), 3)}


def recall(exact_ids: np.ndarray, ids: np.ndarray) -> float:
    k = exact_ids.shape[1]
    return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact_ids, ids)])), 4)


def main(argv=None) -> dict:
    import faiss

    from rskdist.search.index import PartRows, build_index, clustered_vectors, ivfpq_params, rerank

    args = parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    data = clustered_vectors(args.n + args.queries, args.dim, clusters=max(1, args.n // args.cluster_size),
                             spread=args.spread, seed=args.seed)
    gallery, queries = data[: args.n], np.ascontiguousarray(data[args.n :])
    out = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "spread": args.spread,
           "clusters": max(1, args.n // args.cluster_size), "threads": faiss.omp_get_max_threads()}

    k = args.k
    (flat, _), flat_s = timed(lambda: build_index([gallery], kind="flat"))
    (_, exact_ids), latency = latency_ms(lambda q: flat.search(q, k), queries, args.single)
    out["exact"] = {"build_seconds": round(flat_s, 2), "memory_mb": round(args.n * args.dim * 4 / 2**20, 1),
                    **latency}
    del flat

    params = ivfpq_params(args.n, args.dim)
    ivf, info = build_index([gallery], kind="ivfpq", seed=args.seed)
    out["ivfpq"] = {**info, "add_seconds": round(info["build_seconds"] - info["train_seconds"], 2),
                    "memory_mb": round(len(faiss.serialize_index(ivf)) / 2**20, 1), "rerank": args.rerank,
                    "by_nprobe": []}
    rows = PartRows([gallery])  # tools/index.py query reads these from the embeddings folder

    def reranked(q):
        return rerank(q, ivf.search(q, k * args.rerank)[1], rows, k)

    default = params.nprobe
    for nprobe in args.nprobe or sorted({max(1, default // 4), default, min(params.nlist, default * 4)}):
        ivf.nprobe = nprobe
        (_, ids), latency = latency_ms(lambda q: ivf.search(q, k), queries, args.single)
        (_, reranked_ids), reranked_latency = latency_ms(reranked, queries, args.single)
        out["ivfpq"]["by_nprobe"].append({
            "nprobe": nprobe, f"recall@{k}": recall(exact_ids, ids), **latency,
            "reranked": {f"recall@{k}": recall(exact_ids, reranked_ids), **reranked_latency},
        })
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
