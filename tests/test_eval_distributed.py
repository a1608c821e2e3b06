"""retrieval_metrics with the queries split over gloo ranks equals the single-process dict."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.eval import retrieval_metrics, retrieval_metrics_qg


def datasets():
    """Non-degenerate floats, exact ties (quantised) with singletons, and a query/gallery pair."""
    rng = np.random.default_rng(21)
    emb = rng.standard_normal((301, 16)).astype(np.float32)  # odd size: uneven shares
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 40, 301)
    quant = (rng.integers(-2, 3, size=(157, 5)) / 4).astype(np.float32)
    quant_labels = rng.integers(0, 60, 157)
    q_emb, q_lab = emb[:90] + 0.01, labels[:90] + 30  # labels >= 40 are absent from the gallery
    return {
        "floats": ((emb, labels), dict(ks=(1, 4, 16, 1000))),
        "quantised": ((quant, quant_labels), dict(ks=(1, 2, 8), max_candidates=300)),
        "qg": ((q_emb, q_lab, emb[90:], labels[90:]), dict(ks=(1, 5))),
    }


def compute(group=None):
    out = {}
    for name, (args, kw) in datasets().items():
        fn = retrieval_metrics_qg if name == "qg" else retrieval_metrics
        out[name] = fn(*args, backend="torch", group=group, **kw)
    return out


def _worker(rank, world_size, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        torch.save(compute(dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_split_queries_equal_single_process(tmp_path, world_size):
    mp.spawn(_worker, args=(world_size, f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=world_size, join=True)
    want = compute()
    assert want["quantised"]["num_excluded_queries"] > 0 and want["qg"]["num_excluded_queries"] > 0
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == want, rank  # bit for bit: per-query values, exactly rounded sums


def test_metrics_do_not_depend_on_chunking():
    (emb, labels), _ = datasets()["floats"]
    big = retrieval_metrics(emb, labels, ks=(1, 4, 16), backend="torch")
    small = retrieval_metrics(emb, labels, ks=(1, 4, 16), backend="torch", max_candidates=97)
    assert big == small


def test_bad_arguments_are_checked():
    emb, labels = np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="max_tie_cluster"):
        retrieval_metrics(emb, labels, max_tie_cluster=0)
