"""Retrieval metrics and exact kNN against a brute-force numpy reference."""

import numpy as np
import pytest
import torch

import rskdist.eval.neighbors as knn_mod
from rskdist.eval import (
    DEFAULT_KS,
    BestTracker,
    default_ks,
    format_metrics_table,
    knn,
    resolve_backend,
    retrieval_metrics,
    retrieval_metrics_qg,
)
from rskdist.eval.neighbors import ExactSearch, fixed_order_dot

BACKENDS = ["torch"] + (["faiss_cpu"] if knn_mod.faiss is not None else [])


# --------------------------------------------------------------------- reference (clarity)
def brute_force_ranking(query, gallery, exclude=None):
    """Gallery indices sorted by (-score, index); float64 scores."""
    scores = gallery.astype(np.float64) @ query.astype(np.float64)
    candidates = [j for j in range(len(gallery)) if j != exclude]
    return sorted(candidates, key=lambda j: (-scores[j], j))


def brute_force_metrics(q_emb, q_lab, g_emb, g_lab, ks, loo):
    recall = {k: [] for k in ks}
    map_r, r_prec, excluded = [], [], 0
    for i in range(len(q_emb)):
        order = brute_force_ranking(q_emb[i], g_emb, exclude=i if loo else None)
        rel = [g_lab[j] == q_lab[i] for j in order]
        R = sum(rel)
        if R == 0:
            excluded += 1
            continue
        for k in ks:
            recall[k].append(float(any(rel[:k])))
        r_prec.append(sum(rel[:R]) / R)
        ap = 0.0
        for pos in range(R):
            if rel[pos]:
                ap += sum(rel[: pos + 1]) / (pos + 1)
        map_r.append(ap / R)
    out = {f"recall@{k}": np.mean(recall[k]) for k in ks}
    out.update({"map@r": np.mean(map_r), "r_precision": np.mean(r_prec)})
    out.update({"num_queries": len(map_r), "num_excluded_queries": excluded, "num_tie_capped_queries": 0})
    return out


def quantised_data(n, d, num_classes, seed, levels=2):
    """Embeddings in {-levels..levels}/4: many exact score ties, exact in float64."""
    rng = np.random.default_rng(seed)
    emb = (rng.integers(-levels, levels + 1, size=(n, d)) / 4).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    return emb, labels


def assert_metrics_equal(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("backend", BACKENDS)
def test_loo_metrics_match_brute_force_with_ties_and_singletons(backend):
    emb, labels = quantised_data(240, 5, 70, seed=0)  # ~3.4 per class: singletons occur
    labels[:5] = 1000 + np.arange(5)  # guaranteed singleton classes
    ks = (1, 3, 8, 50, 1000)  # k beyond class sizes and beyond N - 1
    got = retrieval_metrics(emb, labels, ks=ks, backend=backend)
    want = brute_force_metrics(emb, labels, emb, labels, ks, loo=True)
    assert want["num_excluded_queries"] >= 5
    assert_metrics_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loo_metrics_random_floats_and_a_huge_class(backend):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((300, 12)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.where(rng.random(300) < 0.6, 0, rng.integers(1, 40, 300))  # one class of ~180
    ks = (1, 2, 4, 8)
    got = retrieval_metrics(emb, labels, ks=ks, backend=backend, max_candidates=2000)
    assert_metrics_equal(got, brute_force_metrics(emb, labels, emb, labels, ks, loo=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_metrics_match_brute_force(backend):
    q_emb, q_lab = quantised_data(90, 4, 25, seed=2)
    g_emb, g_lab = quantised_data(150, 4, 20, seed=3)  # query classes 20..24 are absent
    ks = (1, 5, 200)
    got = retrieval_metrics_qg(q_emb, q_lab, g_emb, g_lab, ks=ks, backend=backend)
    assert_metrics_equal(got, brute_force_metrics(q_emb, q_lab, g_emb, g_lab, ks, loo=False))


def test_input_types_and_metric_subsets():
    emb, labels = quantised_data(100, 4, 10, seed=4)
    # Exact tie groups here exceed the default tie cap, whose capped queries depend on
    # how many neighbours a metric needs: compare in the unbounded exact mode.
    kw = dict(backend="torch", max_tie_cluster=None)
    a = retrieval_metrics(emb, labels, **kw)
    b = retrieval_metrics(torch.from_numpy(emb).double(), torch.from_numpy(labels), **kw)
    c = retrieval_metrics(emb, [f"class-{v}" for v in labels], **kw)
    assert a == b == c
    only = retrieval_metrics(emb, labels, ks=(4, 1), metrics=("map_at_r",), **kw)
    assert set(only) == {"map@r", "num_queries", "num_excluded_queries", "num_tie_capped_queries"}
    assert only["map@r"] == a["map@r"]
    rec = retrieval_metrics(emb, labels, ks=(4, 1), metrics=("recall",), **kw)
    assert list(rec)[:2] == ["recall@1", "recall@4"] and rec["recall@4"] == a["recall@4"]


def test_all_singletons_gives_nan_and_counts():
    emb, _ = quantised_data(10, 3, 1, seed=5)
    with pytest.warns(UserWarning, match="singletons"):
        out = retrieval_metrics(emb, np.arange(10), backend="torch")
    assert out["num_queries"] == 0 and out["num_excluded_queries"] == 10
    assert np.isnan(out["recall@1"])


def test_bad_arguments():
    emb, labels = quantised_data(20, 3, 4, seed=6)
    with pytest.raises(ValueError, match="valid choices"):
        retrieval_metrics(emb, labels, metrics=("ndcg",))
    with pytest.raises(ValueError, match="valid choices"):
        retrieval_metrics(emb, labels, backend="annoy")
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics(emb, labels, ks=(0,))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, labels[:-1])
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, labels)


def test_default_ks():
    assert DEFAULT_KS["inat"] == (1, 4, 16, 32) and default_ks("sop") == (1, 10, 100, 1000)
    assert default_ks("cars196") == default_ks("cub") == (1, 2, 4, 8, 16) and default_ks("vehicleid") == (1, 5)
    with pytest.raises(ValueError, match="known"):
        default_ks("imagenet")


def test_format_table():
    text = format_metrics_table({"recall@1": 0.5, "num_queries": 3}, title="test")
    assert "recall@1" in text and "50.00" in text and text.splitlines()[0] == "test"


# ---------------------------------------------------------------------------- exact kNN
def reference_knn(queries, gallery, k, loo):
    return np.array([brute_force_ranking(queries[i], gallery, i if loo else None)[:k] for i in range(len(queries))])


@pytest.mark.parametrize("levels", [1, 3])  # 1: huge tie groups; 3: fewer ties
def test_backends_agree_with_reference_neighbours(levels):
    emb, _ = quantised_data(200, 6, 1, seed=7, levels=levels)
    emb[10] = emb[20] = emb[30]  # exact duplicates
    want = reference_knn(emb, emb, 25, loo=True)
    for backend in BACKENDS:  # tie groups beyond any cap: the unbounded exact mode
        ids, scores = knn(emb, None, 25, backend=backend, max_tie_cluster=None)
        assert (ids.numpy() == want).all(), backend
        assert scores.shape == (200, 25)
    q = emb[:50] * 0.5
    want_qg = reference_knn(q, emb, 7, loo=False)
    for backend in BACKENDS:
        assert (knn(q, emb, 7, backend=backend, max_tie_cluster=None)[0].numpy() == want_qg).all(), backend


def test_random_float_neighbours_agree_across_backends():
    rng = np.random.default_rng(8)
    emb = rng.standard_normal((400, 32)).astype(np.float32)
    results = [knn(emb, None, 40, backend=b)[0] for b in BACKENDS]
    for other in results[1:]:
        assert torch.equal(results[0], other)
    assert (results[0].numpy() == reference_knn(emb, emb, 40, loo=True)).all()


def test_small_budgets_force_chunking_and_retries():
    # One value repeated: every query's k-th neighbour sits inside a tie group larger
    # than the first fetch, so completeness fails and the search retries.
    emb = np.ones((120, 4), dtype=np.float32)
    emb[::7] = 0.5
    q = torch.from_numpy(emb)
    search = ExactSearch(q, q, backend="torch", self_index=torch.arange(120), max_candidates=100, max_tie_cluster=None)
    parts = list(search.ranked(torch.full((120,), 3)))
    assert len(parts) > 2 and search.num_retries > 0
    got = torch.empty(120, 3, dtype=torch.int64)
    for p in parts:
        got[p.query_idx] = p.ids[:, :3]
    assert (got.numpy() == reference_knn(emb, emb, 3, loo=True)).all()


def test_fixed_order_dot_exact_and_order_independent():
    rng = np.random.default_rng(9)
    a = torch.from_numpy(rng.standard_normal((64, 37)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((64, 37)).astype(np.float32))
    d = fixed_order_dot(a, b)
    assert d.dtype == torch.float64
    assert torch.allclose(d, (a.double() * b.double()).sum(1), rtol=0, atol=1e-12)
    # Row position must not change the value (blocks of any size give the same bits).
    perm = torch.randperm(64)
    assert torch.equal(fixed_order_dot(a[perm], b[perm]), d[perm])


def test_backend_resolution_without_faiss(monkeypatch):
    monkeypatch.setattr(knn_mod, "faiss", None)
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="needs faiss"):
        resolve_backend("faiss")
    emb, labels = quantised_data(50, 3, 5, seed=10)
    assert retrieval_metrics(emb, labels)["num_queries"] >= 0


@pytest.mark.gpu
def test_gpu_backends_agree_with_cpu():
    emb, labels = quantised_data(3000, 16, 60, seed=11, levels=3)
    exact = dict(max_tie_cluster=None)  # capped queries may differ by backend; exact ones may not
    want = knn(emb, None, 64, backend="torch", device="cpu", **exact)[0]
    assert torch.equal(knn(emb, None, 64, backend="torch", device="cuda", **exact)[0], want)
    ref = retrieval_metrics(emb, labels, backend="torch", device="cpu", **exact)
    assert retrieval_metrics(torch.from_numpy(emb).cuda(), labels, backend="torch", **exact) == ref
    if knn_mod.faiss_gpu_available():
        assert torch.equal(knn(emb, None, 64, backend="faiss_gpu", **exact)[0], want)
        assert torch.equal(knn(emb, None, 2100, backend="faiss_gpu", **exact)[0],
                           knn(emb, None, 2100, backend="torch", **exact)[0])
        assert retrieval_metrics(emb, labels, backend="faiss_gpu", **exact) == ref


# ------------------------------------------------------------------------- best tracker
def test_best_tracker(tmp_path):
    t = BestTracker(metric="recall@1")
    assert t.update(1, {"recall@1": 0.2}) and not t.update(2, {"recall@1": 0.2})
    assert t.update(3, {"recall@1": 0.3}) and not t.update(4, {"recall@1": float("nan")})
    assert (t.best_step, t.best_value) == (3, 0.3)
    t2 = BestTracker(metric="recall@1")
    t2.load_state_dict(t.state_dict())
    assert t2.best_step == 3 and len(t2.history) == 4
    with pytest.raises(ValueError, match="available"):
        t.update(5, {"map@r": 0.1})
    lo = BestTracker(metric="loss", mode="min")
    assert lo.update(0, {"loss": 2.0}) and lo.update(1, {"loss": 1.0}) and not lo.update(2, {"loss": 1.5})
    path = tmp_path / "hist.jsonl"
    h = BestTracker.from_history(path, metric="map@r")
    assert h.append_to_history(path, 10, {"map@r": 0.1}) and not h.append_to_history(path, 20, {"map@r": 0.05})
    replay = BestTracker.from_history(path, metric="map@r")
    assert replay.best_step == 10 and len(replay.history) == 2



@pytest.mark.slow
def test_larger_random_data_all_backends_match_reference():
    rng = np.random.default_rng(13)
    labels = rng.integers(0, 150, 3000)
    centres = rng.standard_normal((150, 48))
    emb = (centres[labels] + 1.5 * rng.standard_normal((3000, 48))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ks = (1, 4, 16, 32)
    want = brute_force_metrics(emb, labels, emb, labels, ks, loo=True)
    for backend in BACKENDS:
        assert_metrics_equal(retrieval_metrics(emb, labels, ks=ks, backend=backend, max_candidates=50_000), want)


# ------------------------------------------------------------- collapsed embeddings (tie cap)
def collapsed_data(n, d=128, num_classes=20, seed=14):
    """An untrained model's output: every embedding within ~1e-4 of one direction."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(1, d, generator=g) + 1e-4 * torch.randn(n, d, generator=g), dim=1)
    return emb, torch.randint(0, num_classes, (n,), generator=g)


@pytest.mark.parametrize("k", [4, 40])  # 4: the first fetch is below the cap, one retry; 40: capped at once
def test_collapsed_embeddings_cost_bounded_work(k):
    # The unbounded search re-fetched and re-scored up to the whole gallery for every
    # query (about n^2 = 1.4M pairs and log2(n / fetch) retries each here).
    n = 1200
    emb, labels = collapsed_data(n)
    search = ExactSearch(emb, emb, backend="torch", self_index=torch.arange(n), query_labels=labels,
                         gallery_labels=labels)
    fetch = k + max(8, k // 8) + 1
    got = {int(i) for part in search.ranked(torch.full((n,), k)) for i in part.query_idx}
    assert got == set(range(n))  # every query answered once
    assert search.num_retries <= n  # at most one retry per query
    assert search.num_rescored <= n * (2 * fetch + max(fetch, 32))  # candidates of both searches
    assert search.num_capped == n
    assert search.num_retries == (n if fetch - 1 < 32 else 0)


def test_collapsed_metrics_report_capped_queries():
    emb, labels = collapsed_data(600)
    with pytest.warns(UserWarning, match="max_tie_cluster=32"):
        out = retrieval_metrics(emb, labels, ks=(1, 4), backend="torch")
    assert out["num_tie_capped_queries"] == 600 and 0 <= out["map@r"] <= 1
    exact = retrieval_metrics(emb[:150], labels[:150], ks=(1, 4), backend="torch", max_tie_cluster=None)
    want = brute_force_metrics(emb[:150].numpy(), labels[:150].numpy(), emb[:150].numpy(), labels[:150].numpy(),
                               (1, 4), loo=True)
    assert_metrics_equal(exact, want)  # the cap can be lifted: full exactness at full cost


def test_capped_query_is_exact_down_to_the_tie_cluster():
    # Query 0; gallery rows 1-3 clearly nearest (in that order); rows 4..203 a collapsed
    # cluster further away; k = 10 ends inside the cluster, which exceeds the cap.
    g = torch.Generator().manual_seed(15)
    d = 64
    q = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
    other = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
    near = torch.nn.functional.normalize(q + torch.tensor([[0.1], [0.2], [0.3]]) * other, dim=1)
    blob = torch.nn.functional.normalize(other + 1e-5 * torch.randn(200, d, generator=g), dim=1)
    emb = torch.cat([q, near, blob])
    with pytest.warns(UserWarning, match="1 of 1 queries"):
        ids, _ = knn(emb[:1], emb, 11, backend="torch", max_tie_cluster=32)
    ids = ids[0].tolist()
    assert ids[:4] == [0, 1, 2, 3]  # before the cluster: exact
    exact = fixed_order_dot(emb[:1].expand(7, -1), emb[ids[4:]])
    assert all(j >= 4 for j in ids[4:])
    assert all((-exact[i], ids[4 + i]) < (-exact[i + 1], ids[5 + i]) for i in range(6))  # exact score, then index
    assert knn(emb[:1], emb, 11, backend="torch", max_tie_cluster=None)[0][0].tolist() == \
        reference_knn(emb[:1].numpy(), emb.numpy(), 11, loo=False)[0].tolist()
