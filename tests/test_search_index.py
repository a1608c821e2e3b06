"""The embeddings layout (rskdist/search/layout.py) and the faiss index over it
(rskdist/search/index.py), on synthetic vectors."""

import json

import numpy as np
import pyarrow as pa
import pytest

from rskdist.search import layout
from rskdist.search.index import (
    FLAT_MAX_VECTORS,
    PartRows,
    SearchIndex,
    build_index,
    choose_kind,
    clustered_vectors,
    ivfpq_params,
    rerank,
    write_index,
)


def test_parts_split_rows_and_ranks():
    plan = layout.PartPlan(num_images=23, part_size=5)
    assert plan.num_parts == 5 and [len(plan.rows(p)) for p in range(5)] == [5, 5, 5, 5, 3]
    assert [plan.name(p) for p in (0, 4)] == ["0", "4"]
    assert layout.PartPlan(1000, 10).name(7) == "07"  # zero-padded: names sort in part order
    for world_size in (1, 2, 3, 7):
        owned = [plan.parts_of_rank(r, world_size) for r in range(world_size)]
        assert sorted(p for parts in owned for p in parts) == list(range(5))  # disjoint, covering
    with pytest.raises(ValueError, match="part_size must be >= 1"):
        layout.PartPlan(3, 0)


def test_parts_are_complete_or_absent_and_the_plan_is_checked(tmp_path):
    plan = layout.PartPlan(num_images=5, part_size=3)
    layout.start(tmp_path, {"num_images": 5, "part_size": 3, "dtype": "float32"})
    assert not layout.part_done(tmp_path, plan, 0)
    emb = np.eye(3, 4, dtype=np.float32)[:2]
    layout.write_part(tmp_path, plan, 0, emb, {"image_path": ["a.jpg", "c.jpg"]}, [("b.jpg", "OSError: x")])
    layout.write_part(tmp_path, plan, 1, emb, {"image_path": ["d.jpg", "e.jpg"]}, [])
    assert layout.part_done(tmp_path, plan, 0) and layout.part_done(tmp_path, plan, 1)
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert layout.merge_failed(tmp_path, plan) == 1
    assert layout.read_failed(tmp_path) == [("b.jpg", "OSError: x")]
    parts, meta = layout.read_embeddings(tmp_path)
    assert meta.column("image_path").to_pylist() == ["a.jpg", "c.jpg", "d.jpg", "e.jpg"]
    np.testing.assert_array_equal(np.concatenate(parts), np.concatenate([emb, emb]))
    # The same folder with another plan is refused, naming what differs.
    with pytest.raises(ValueError, match="part_size: 3 there, 4 now"):
        layout.start(tmp_path, {"num_images": 5, "part_size": 4, "dtype": "float32"})
    layout.start(tmp_path, {"num_images": 5, "part_size": 3, "dtype": "float32"})  # a resume


def test_reading_an_unfinished_folder_says_what_is_missing(tmp_path):
    layout.start(tmp_path, {"num_images": 5, "part_size": 3})
    plan = layout.PartPlan(5, 3)
    layout.write_part(tmp_path, plan, 1, np.zeros((2, 4), np.float32), {"image_path": ["d", "e"]}, [])
    with pytest.raises(ValueError, match="part.s. 0 of 2 not written yet"):
        layout.read_embeddings(tmp_path)


def test_ivfpq_parameters_follow_the_size():
    p = ivfpq_params(1_000_000, 128)
    assert (p.nlist, p.m, p.nbits, p.nprobe, p.train_size) == (2048, 16, 8, 256, 81_920)
    p = ivfpq_params(10_000_000, 512)
    assert (p.nlist, p.m, p.nbits) == (8192, 64, 8)
    small = ivfpq_params(4000, 16)  # few vectors: fewer cells and shorter codes, trainable
    assert small.nlist * 39 <= 4000 and 2**small.nbits * 39 <= 4000 and 16 % small.m == 0
    assert choose_kind("auto", FLAT_MAX_VECTORS) == "flat" and choose_kind("auto", FLAT_MAX_VECTORS + 1) == "ivfpq"
    with pytest.raises(ValueError, match="valid choices: auto, flat, ivfpq"):
        choose_kind("hnsw", 10)
    with pytest.raises(ValueError, match="use --kind flat"):
        ivfpq_params(50, 16)


def test_flat_is_exact_and_ivfpq_approximates_it(tmp_path):
    data = clustered_vectors(4200, 16, clusters=40, seed=3)
    gallery, queries = data[:4000], data[4000:]
    parts = [gallery[:1500], gallery[1500:].astype(np.float16)]  # parts of either stored precision
    stored = np.concatenate([parts[0], parts[1].astype(np.float32)])
    exact = np.argsort(-(queries @ stored.T), axis=1, kind="stable")[:, :10]

    flat, info = build_index(parts, kind="auto")
    assert info["kind"] == "flat" and flat.ntotal == 4000
    _, ids = flat.search(queries, 10)
    np.testing.assert_array_equal(ids, exact)

    ivf, info = build_index(parts, kind="ivfpq", seed=0)
    assert info["kind"] == "ivfpq" and ivf.ntotal == 4000 and info["nlist"] == ivf.nlist
    _, ids = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids)])
    assert recall > 0.3, recall  # a random pick of 10 in 4000 would give 0.0025

    ids_table = pa.table({"image_path": [f"img{i}.jpg" for i in range(4000)]})
    write_index(tmp_path / "idx", flat, ids_table, info={**info, "kind": "flat"})
    index = SearchIndex(tmp_path / "idx")
    hits = index.search(queries[:2], 3)
    assert [h[0] for h in hits[0]] == [f"img{i}.jpg" for i in exact[0, :3]]
    assert hits[0][0][1] == pytest.approx(float(queries[0] @ stored[exact[0, 0]]), abs=1e-5)
    with pytest.raises(ValueError, match="embedded with another model"):
        index.search(queries[:, :8], 3)
    with pytest.raises(ValueError, match="--nprobe applies to an ivfpq index"):
        index.search(queries, 3, nprobe=4)
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["num_vectors"] == 4000


def test_rerank_orders_by_exact_score_ties_to_the_lower_id():
    rows = PartRows([np.array([[1, 0], [0, 1]], np.float32), np.array([[1, 0], [0.6, 0.8]], np.float16)])
    assert len(rows) == 4
    np.testing.assert_allclose(rows(np.array([3, 0])), np.array([[0.6, 0.8], [1, 0]], np.float32), rtol=1e-3)
    queries = np.array([[1, 0], [0, 1]], np.float32)
    cand = np.array([[2, 1, 0, 3], [-1, 3, -1, -1]])  # ids 0 and 2 tie for query 0; query 1 has one candidate
    scores, ids = rerank(queries, cand, rows, 3)
    np.testing.assert_array_equal(ids, [[0, 2, 3], [3, -1, -1]])
    np.testing.assert_allclose(scores[0], [1, 1, 0.6], rtol=1e-3)
    assert scores[1, 0] == pytest.approx(0.8, rel=1e-3) and np.isneginf(scores[1, 1:]).all()


def test_ivfpq_queries_are_reranked_from_the_embeddings_folder(tmp_path):
    data = clustered_vectors(4100, 16, clusters=40, seed=5)
    gallery, queries = data[:4000], data[4000:]
    emb = tmp_path / "emb"
    plan = layout.PartPlan(4000, 1500)
    layout.start(emb, {"num_images": 4000, "part_size": 1500})
    for p in range(plan.num_parts):
        rows = plan.rows(p)
        layout.write_part(emb, plan, p, gallery[rows.start : rows.stop],
                          {"image_path": [f"img{i}" for i in rows]}, [])
    parts, meta = layout.read_embeddings(emb, mmap=True)
    ivf, info = build_index(parts, kind="ivfpq")
    write_index(tmp_path / "idx", ivf, meta, {**info, "embeddings": str(emb)})

    exact = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    want = [[f"img{i}" for i in row] for row in exact]

    def recall(index):
        hits = index.search(queries, 10)
        return np.mean([len({h for h, _ in got} & set(w)) / 10 for got, w in zip(hits, want)]), hits

    plain, _ = recall(SearchIndex(tmp_path / "idx", rerank=0))
    reranked, hits = recall(SearchIndex(tmp_path / "idx"))
    assert reranked > max(0.85, plain + 0.3), (plain, reranked)  # 2-byte codes alone find ~0.4 here
    best = int(exact[0, 0])
    assert hits[0][0] == (f"img{best}", pytest.approx(float(queries[0] @ gallery[best]), abs=1e-6))  # exact score

    (emb / "embed.json").unlink()  # the embeddings are gone: ranked by the quantised scores, with a warning
    with pytest.warns(UserWarning, match="no re-ranking"):
        assert SearchIndex(tmp_path / "idx").rerank == 0
    with pytest.raises(ValueError, match="pass --rerank 0"):
        SearchIndex(tmp_path / "idx", rerank=5)
