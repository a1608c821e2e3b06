"""Sharded evaluation (each rank holds part of the gallery) equals one process bit for bit."""

import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.eval import (
    evaluate_model,
    find_examples,
    retrieval_metrics,
    retrieval_metrics_qg,
    sharded_retrieval_metrics,
    sharded_retrieval_metrics_qg,
)
from rskdist.eval.sharded import exact_partials


def datasets():
    """Floats, quantised embeddings with large exact-tie groups and singletons, and a
    query/gallery pair whose queries include labels absent from the gallery."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((301, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 40, 301)
    quant = (rng.integers(-1, 2, size=(203, 4)) / 4).astype(np.float32)  # 81 distinct vectors: big ties
    quant_labels = rng.integers(0, 100, 203)
    q_emb, q_lab = emb[:90] + 0.01, labels[:90] + 30  # labels >= 40 are absent from the gallery
    return {
        "floats": ((emb, labels), dict(ks=(1, 4, 16, 1000))),
        "quantised": ((quant, quant_labels), dict(ks=(1, 2, 8), max_candidates=300, max_tie_cluster=None)),
        "qg": ((q_emb, q_lab, emb[90:], labels[90:]), dict(ks=(1, 5))),
    }


def reference():
    return {name: (retrieval_metrics_qg if name == "qg" else retrieval_metrics)(*args, backend="torch", **kw)
            for name, (args, kw) in datasets().items()}


def assignment(n, world, seed):
    """Rows of each rank: a random, uneven split (a rank may get nothing), in shuffled order."""
    owner = np.random.default_rng(seed).integers(0, world, n)
    if world > 2:
        owner[owner == world - 1] = 0  # the last rank holds nothing
    perm = np.random.default_rng(seed + 1).permutation(n)
    return [perm[owner[perm] == r] for r in range(world)]


def compute_sharded(rank, world, group):
    out = {}
    for name, (args, kw) in datasets().items():
        if name == "qg":
            q, ql, g, gl = args
            qrows, grows = assignment(len(q), world, 3)[rank], assignment(len(g), world, 5)[rank]
            # Gallery ids = positions in the whole gallery: the reference's order.
            out[name] = sharded_retrieval_metrics_qg(q[qrows], ql[qrows], g[grows], gl[grows], gallery_ids=grows,
                                                     group=group, backend="torch", **kw)
        else:
            e, lab = args
            rows = assignment(len(e), world, 11)[rank]
            out[name] = sharded_retrieval_metrics(e[rows], lab[rows], ids=rows, group=group, backend="torch", **kw)
    # ids=None: rank order. Contiguous blocks in rank order are the whole set in order.
    e, lab = datasets()["floats"][0]
    block = np.array_split(np.arange(len(e)), world)[rank]
    out["rank_order"] = sharded_retrieval_metrics(e[block], lab[block], group=group, backend="torch", ks=(1, 2))
    return out


def test_exact_partials_sum_like_fsum():
    rng = np.random.default_rng(0)
    values = (rng.random(5000) / rng.integers(1, 97, 5000)).tolist() + [1e-300, 3.0e16, -3.0e16]
    parts = [exact_partials(values[i::3]) for i in range(3)]
    import math

    assert math.fsum(p for ps in parts for p in ps) == math.fsum(values)
    assert exact_partials([]) == [] and exact_partials([0.5, -0.5]) == []


def test_single_process_sharded_equals_replicated():
    want = reference()
    got = compute_sharded(0, 1, None)
    for name in want:
        assert got[name] == want[name], name
    assert got["rank_order"] == retrieval_metrics(*datasets()["floats"][0], backend="torch", ks=(1, 2))
    assert want["qg"]["num_excluded_queries"] > 0 and want["quantised"]["num_excluded_queries"] > 0


def test_bad_inputs_are_refused():
    e = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="ids must be unique"):
        sharded_retrieval_metrics(e, np.array([0, 0, 1, 1]), ids=[0, 1, 1, 2])
    with pytest.raises(ValueError, match="integer"):
        sharded_retrieval_metrics(e, np.array(["a", "a", "b", "b"]))
    with pytest.raises(ValueError, match="4 embeddings but 3 ids"):
        sharded_retrieval_metrics(e, np.array([0, 0, 1, 1]), ids=[0, 1, 2])


def _worker(rank, world, init, out_dir, task):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(task(rank, world, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world, task):
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rdzv'}", str(tmp_path), task), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_equals_single_process(tmp_path, world):
    want = reference()
    want["rank_order"] = retrieval_metrics(*datasets()["floats"][0], backend="torch", ks=(1, 2))
    for rank, got in enumerate(spawn(tmp_path, world, compute_sharded)):
        assert got == want, rank  # bit for bit, on every rank


# ------------------------------------------------------------- the trainer's entry point
class _Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.proj(x.flatten(1))


def _batches(rank, world, n=150, batch=16):
    """An evaluation stream: rank r gets a contiguous block, padded with index -1."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 2, 2, generator=g)
    labels = torch.arange(n) % 23
    lo, hi = rank * n // world, (rank + 1) * n // world
    out = []
    for s in range(lo, hi, batch):
        idx = torch.arange(s, s + batch)
        idx[idx >= hi] = -1
        safe = idx.clamp(min=0)
        out.append((images[safe], torch.where(idx >= 0, labels[safe], -1), idx))
    return out


def _evaluate_both(rank, world, group):
    model = _Embedder()
    stream = _batches(rank, world)
    kw = dict(device="cpu", group=group, backend="torch", ks=(1, 2, 4))
    sharded, ex_s = evaluate_model(model, stream, shard_above=0, examples=5, **kw)
    replicated, ex_r = evaluate_model(model, stream, shard_above=-1, examples=5, **kw)
    return {"sharded": sharded, "replicated": replicated, "ex_s": ex_s, "ex_r": ex_r}


@pytest.mark.distributed
def test_evaluate_model_sharded_equals_replicated(tmp_path):
    alone, ex_alone = evaluate_model(_Embedder(), _batches(0, 1), device="cpu", backend="torch", ks=(1, 2, 4),
                                     examples=5)
    assert len(ex_alone) == 5 and all(len(e["neighbours"]) == 8 for e in ex_alone)
    for rank, got in enumerate(spawn(tmp_path, 2, _evaluate_both)):
        assert got["sharded"] == alone and got["replicated"] == alone, rank
        assert (got["ex_s"], got["ex_r"]) == ((ex_alone, ex_alone) if rank == 0 else ([], []))


def _collapsed(rank, world, group):
    """Collapsed embeddings (an untrained model): every vector within ~1e-4 of one direction."""
    g = torch.Generator().manual_seed(1)
    n, d = 3000, 128
    emb = torch.nn.functional.normalize(torch.randn(1, d, generator=g) + 1e-4 * torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, 60, (n,), generator=g)
    rows = torch.arange(rank, n, world)
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sharded_retrieval_metrics(emb[rows], labels[rows], ids=rows, group=group, backend="torch",
                                      ks=(1, 4, 16, 32))
    return m, time.process_time() - t0


@pytest.mark.distributed
def test_collapsed_embeddings_stay_fast(tmp_path):
    """All 3000 queries sit in one near-tie cluster: the tie cap keeps it to one search
    per query block (uncapped, this took minutes)."""
    for m, cpu_seconds in spawn(tmp_path, 2, _collapsed):
        assert m["num_tie_capped_queries"] == m["num_queries"] == 3000
        assert cpu_seconds < 20, cpu_seconds


def _examples(rank, world, group):
    e, lab = datasets()["floats"][0]
    rows = assignment(len(e), world, 11)[rank]
    return find_examples(e[rows], lab[rows], rows, group=group, count=7, backend="torch")


@pytest.mark.distributed
def test_examples_do_not_depend_on_the_sharding(tmp_path):
    e, lab = datasets()["floats"][0]
    want = find_examples(e, lab, np.arange(len(e)), count=7, backend="torch")
    assert len(want) == 7 and all(len(x["neighbours"]) == 8 for x in want)
    # Against a brute-force ranking of the first example.
    x = want[0]
    scores = e.astype(np.float64) @ e[x["query"]].astype(np.float64)
    order = [j for j in sorted(range(len(e)), key=lambda j: (-scores[j], j)) if j != x["query"]]
    assert x["neighbours"] == order[:8]
    first = next(i for i, j in enumerate(order) if lab[j] == lab[x["query"]]) + 1
    assert x["first_correct"] == first
    got = spawn(tmp_path, 3, _examples)
    assert got[0] == want and got[1] == [] and got[2] == []
