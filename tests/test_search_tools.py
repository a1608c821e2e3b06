"""From a trained run to search, through the tools: tools/embed.py (folder, list, shards; resume;
two ranks; unreadable images), tools/export.py (ONNX from a run) and tools/index.py (build,
query), against rskdist.load(RUN).embed of the same images. One tiny training run (2 steps,
one process) serves the module."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import rskdist
from rskdist.runlog import read_summary
from rskdist.search import layout

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on shards of demo images, a folder of images (nested, JPEG and PNG, one
    broken, one not an image), and that folder embedded in one process with parts of 4."""
    from test_data_stream import make_shards
    from tiny_runs import train_two_steps

    from rskdist.data.demo_images import render_jpeg

    base = tmp_path_factory.mktemp("search")
    shards = make_shards(base / "shards", [4] * 8, samples_per_shard=10, image_size=48, test_counts=(4, 3, 5, 4))
    run = train_two_steps(base, "tiny", shards)

    images = base / "images"
    for i in range(13):
        path = images / ("", "nested", "nested/deeper")[i % 3] / f"img{i:02d}.{'png' if i % 4 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(io.BytesIO(render_jpeg(1, i % 5, i, 40 + 8 * i)))
        im.resize((im.width, im.height * 3 // 4)).save(path)  # not square: the centre crop matters
    whole = (images / "img03.jpg").read_bytes()
    (images / "nested" / "broken.jpg").write_bytes(whole[: len(whole) // 3])  # a truncated JPEG
    (images / "notes.txt").write_text("not an image, and not listed")

    import embed

    out = base / "emb"
    stats = embed.main(["--checkpoint", str(run), "--images", str(images), "--out", str(out),
                        "--part-size", "4", "--num-workers", "0", "--batch-size", "3"])
    return SimpleNamespace(run=run, shards=shards, images=images, emb=out, stats=stats)


def embeddings_of(out: Path) -> tuple[np.ndarray, list[str], object]:
    parts, meta = layout.read_embeddings(out)
    return np.concatenate(parts), meta.column("image_path").to_pylist(), meta


def test_embed_folder_rows_equal_load_embed(trained):
    emb, paths, meta = embeddings_of(trained.emb)
    assert len(paths) == 13 and "nested/deeper/img02.jpg" in paths and "nested/img04.png" in paths and "notes.txt" not in paths
    assert meta.column_names == ["image_path"]  # no labels in a folder
    assert trained.stats["parts"] == ["0", "1", "2", "3"] and trained.stats["embedded"] == 13
    assert sorted(p.name for p in (trained.emb / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(4)]
    assert emb.dtype == np.float32
    model = rskdist.load(trained.run, device="cpu")
    want = model.embed([Image.open(trained.images / p) for p in paths]).numpy()
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-6)
    failed = layout.read_failed(trained.emb)
    assert [path for path, _ in failed] == ["nested/broken.jpg"] and "truncated" in failed[0][1].lower()
    plan = layout.read_plan(trained.emb)
    assert plan["num_images"] == 14 and plan["checkpoint"] == str((trained.run / "checkpoints/step00000002").resolve())


def test_embed_a_list_in_fp16_and_resume_only_missing_parts(trained, tmp_path):
    import embed

    names = ["img03.jpg", "nested/img01.jpg", "missing.jpg", "img06.jpg", "nested/deeper/img05.jpg"]
    (trained.images / "list.txt").write_text("# queries\n" + "\n".join(names) + "\n\n")
    out = tmp_path / "emb"
    args = ["--checkpoint", str(trained.run), "--list", str(trained.images / "list.txt"), "--out", str(out),
            "--num-workers", "0", "--fp16", "--part-size", "2"]
    assert embed.main(args)["parts_written"] == ["0", "1", "2"]
    emb, paths, _ = embeddings_of(out)
    assert emb.dtype == np.float16 and paths == [n for n in names if n != "missing.jpg"]
    ref, ref_paths, _ = embeddings_of(trained.emb)
    np.testing.assert_allclose(emb, ref[[ref_paths.index(p) for p in paths]], rtol=0, atol=1e-3)
    assert [p for p, _ in layout.read_failed(out)] == ["missing.jpg"]

    # A run killed while writing part 1 (embeddings renamed, metadata not) and before part 2.
    plan = layout.PartPlan(5, 2)
    layout.meta_path(out, plan, 1).unlink()
    layout.emb_path(out, plan, 2).unlink()
    layout.meta_path(out, plan, 2).unlink()
    kept = layout.emb_path(out, plan, 0).stat().st_mtime_ns
    assert embed.main(args)["parts_written"] == ["1", "2"]
    assert layout.emb_path(out, plan, 0).stat().st_mtime_ns == kept
    again, again_paths, _ = embeddings_of(out)
    np.testing.assert_array_equal(again, emb)
    assert again_paths == paths and [p for p, _ in layout.read_failed(out)] == ["missing.jpg"]
    assert embed.main(args)["parts_written"] == []  # all done: nothing to do
    with pytest.raises(SystemExit, match="part_size: 2 there, 3 now"):
        embed.main([*args[:-1], "3"])


def test_two_ranks_write_disjoint_parts_covering_everything(trained, tmp_path):
    out = tmp_path / "emb"
    cmd = [sys.executable, "tools/embed.py", "--checkpoint", str(trained.run), "--images", str(trained.images),
           "--out", str(out), "--part-size", "4", "--num-workers", "0", "--batch-size", "3"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)))
             for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    stats = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    written = [s["parts_written"] for s in stats]
    assert written == [["0", "2"], ["1", "3"]]
    assert "img/s" in results[0][1] and "eta" in results[0][1]  # the progress line
    emb, paths, _ = embeddings_of(out)
    ref, ref_paths, _ = embeddings_of(trained.emb)
    assert paths == ref_paths
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-6)
    assert layout.read_failed(out) == layout.read_failed(trained.emb)


def test_embed_shards_equals_the_evaluation_and_keeps_labels(trained, tmp_path):
    import embed

    from rskdist.data import build_eval_loader
    from rskdist.data.shards import load_split
    from rskdist.eval import embed_dataset

    out = tmp_path / "emb"
    embed.main(["--checkpoint", str(trained.run), "--shards", trained.shards, "--split", "test", "--out", str(out),
                "--part-size", "5", "--num-workers", "0"])
    emb, paths, meta = embeddings_of(out)
    labels = load_split(trained.shards, "test").labels
    assert paths[:2] == ["test/00000000", "test/00000001"] and len(paths) == 16
    np.testing.assert_array_equal(meta.column("label").to_numpy(), labels)
    model = rskdist.load(trained.run, device="cpu")
    loader = build_eval_loader(trained.shards, split="test", rank=0, world_size=1, batch_size=8,
                               image_size=model.image_size, num_workers=0, mean=model.mean, std=model.std)
    want, want_labels = embed_dataset(model.model, loader, device="cpu")
    np.testing.assert_allclose(emb, want.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(want_labels.numpy(), labels)
    with pytest.raises(SystemExit, match="--shards needs --split"):
        embed.main(["--checkpoint", str(trained.run), "--shards", trained.shards, "--out", str(out)])


@pytest.mark.parametrize("mode", ["stage", "ranged"])
def test_embed_shards_on_a_store_equals_the_local_folder(trained, s3_server, tmp_path, mode):
    """--shards s3://...: the same rows as the local shard folder, read as training reads a
    store (a real S3 server on loopback); a store that stops answering ends with one line."""
    import embed

    from rskdist.data.shards import upload_shards

    url = f"{s3_server.make_bucket(f'embed-{mode}')}/shards"
    upload_shards(trained.shards, url)
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--checkpoint", str(trained.run), "--split", "test", "--num-workers", "0"]
    embed.main([*common, "--shards", trained.shards, "--out", str(local)])
    embed.main([*common, "--shards", url, "--out", str(remote), "--read-mode", mode,
                "--cache-dir", str(tmp_path / "cache")])
    assert json.loads((remote / "embed.json").read_text())["source"] == {"shards": url, "split": "test"}
    emb, paths, meta = embeddings_of(remote)
    want, want_paths, want_meta = embeddings_of(local)
    assert paths == want_paths and meta.column("label").to_pylist() == want_meta.column("label").to_pylist()
    np.testing.assert_array_equal(emb, want)
    with pytest.raises(SystemExit, match="no-such-bucket"):
        embed.main([*common, "--shards", url.replace(f"embed-{mode}", "no-such-bucket"), "--out",
                    str(tmp_path / "none")])


def test_export_onnx_from_a_run_with_its_card(trained, tmp_path):
    import export
    import onnxruntime as ort

    from rskdist.data.transforms import eval_transform

    card = export.main(["--checkpoint", str(trained.run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    summary = read_summary(trained.run)
    assert card["config_sha256"] == hashlib.sha256((trained.run / "config.yaml").read_bytes()).hexdigest()
    assert card["final_eval"] == summary["final_eval"] and "recall@1" in card["final_eval"]
    assert card["checkpoint"] == "step00000002" and card["backbone"] == "vit_tiny_patch16_224"
    assert card["embedding_size"] == 64 and card["image_size"] == 32 and card["mean"] == [0.5, 0.5, 0.5]
    model = rskdist.load(trained.run, device="cpu")
    names = ["img03.jpg", "nested/img04.png", "nested/deeper/img02.jpg"]
    images = np.stack([eval_transform(Image.open(trained.images / n), model.image_size) for n in names])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images})[0]
    want = model.embed([Image.open(trained.images / n) for n in names]).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_index_build_and_query(trained, tmp_path, capsys):
    import index

    info = index.main(["build", "--embeddings", str(trained.emb), "--out", str(tmp_path / "idx")])
    assert info["kind"] == "flat" and info["num_vectors"] == 13
    assert pq.read_table(tmp_path / "idx" / "ids.parquet").column("image_path").to_pylist() == \
        embeddings_of(trained.emb)[1]
    capsys.readouterr()
    queries = [str(trained.images / "nested/img01.jpg"), str(trained.images / "nested/broken.jpg"),
               str(trained.images / "nested/img04.png")]
    results = index.main(["query", "--index", str(tmp_path / "idx"), "--checkpoint", str(trained.run),
                          "--images", *queries, "--k", "5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == results and [r["query"] for r in lines] == queries
    assert lines[0]["ids"][0] == "nested/img01.jpg" and lines[2]["ids"][0] == "nested/img04.png"  # itself, first
    assert "truncated" in lines[1]["error"].lower()
    for r in (lines[0], lines[2]):
        assert len(r["ids"]) == 5 and r["scores"] == sorted(r["scores"], reverse=True)
        assert r["scores"][0] == pytest.approx(1.0, abs=1e-5)
    emb, paths, _ = embeddings_of(trained.emb)
    assert lines[0]["scores"][1] == pytest.approx(float(emb[paths.index(lines[0]["ids"][1])] @ emb[paths.index(
        "nested/img01.jpg")]), abs=1e-5)
    with pytest.raises(SystemExit, match="use --kind flat"):
        index.main(["build", "--embeddings", str(trained.emb), "--out", str(tmp_path / "ivf"), "--kind", "ivfpq"])


def test_load_picks_the_checkpoint_of_a_run(trained):
    images = [Image.open(trained.images / "img03.jpg")]
    latest = rskdist.load(trained.run, device="cpu")
    best = rskdist.load(trained.run, "best", device="cpu")
    tag_folder = rskdist.load(trained.run / "checkpoints" / "step00000002", device="cpu")
    assert latest.source == best.source == tag_folder.source
    assert latest.image_size == 32 and not latest.model.training
    torch.testing.assert_close(tag_folder.embed(images), latest.embed(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no checkpoint 'step00000009'"):
        rskdist.load(trained.run, "step00000009")
