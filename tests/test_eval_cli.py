"""tools/evaluate.py end to end on saved embeddings."""

import json
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest

from rskdist.eval import retrieval_metrics, retrieval_metrics_qg, save_embeddings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((120, 8)).astype(np.float32)
    return emb, rng.integers(0, 12, 120)


def test_evaluate_file_and_history(tmp_path, data, capsys):
    emb, lab = data
    save_embeddings(tmp_path / "e.npz", emb, lab)
    hist, out = tmp_path / "hist.jsonl", tmp_path / "r.json"
    argv = ["--embeddings", str(tmp_path / "e.npz"), "--dataset", "cub", "--backend", "torch",
            "--out", str(out), "--history", str(hist), "--best-metric", "map@r"]
    first = evaluate.main(argv + ["--step", "5"])
    assert first["is_best"] and first["ks"] == [1, 2, 4, 8, 16]
    assert first["results"] == retrieval_metrics(emb, lab, ks=(1, 2, 4, 8, 16), backend="torch")
    assert json.loads(out.read_text())["results"] == first["results"]
    assert "recall@16" in capsys.readouterr().out
    second = evaluate.main(argv + ["--step", "9"])  # same numbers: not strictly better
    assert not second["is_best"] and second["best"]["step"] == 5
    assert len(hist.read_text().splitlines()) == 2


def test_evaluate_query_gallery_and_embed_fn(tmp_path, data):
    emb, lab = data
    save_embeddings(tmp_path / "q.pt", emb[:40], lab[:40])
    save_embeddings(tmp_path / "g.pt", emb[40:], lab[40:])
    rec = evaluate.main(["--embeddings", str(tmp_path / "q.pt"), "--gallery", str(tmp_path / "g.pt"),
                         "--ks", "1", "5", "--metrics", "recall"])
    assert rec["results"] == retrieval_metrics_qg(emb[:40], lab[:40], emb[40:], lab[40:], ks=(1, 5),
                                                  metrics=("recall",))
    plugged = evaluate.main(["--ks", "1"], embed_fn=lambda args: (emb, lab))
    assert plugged["results"]["recall@1"] == retrieval_metrics(emb, lab, ks=(1,))["recall@1"]


def test_cli_subprocess(tmp_path, data):
    emb, lab = data
    save_embeddings(tmp_path / "e.pt", emb, lab)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), "--embeddings", str(tmp_path / "e.pt"),
                           "--ks", "1", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recall@2" in proc.stdout and "num_excluded_queries" in proc.stdout


def test_bench_eval_runs_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_eval.py"), "--sizes", "300", "--dim", "16",
                           "--class-size", "5", "--backend", "torch"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["n"] == 300 and rec["peak_rss_mb"] > 0 and 0 <= rec["metrics"]["recall@1"] <= 1


def test_checkpoint_evaluation_reports_unreadable_test_images(tmp_path, monkeypatch):
    """--checkpoint on shards with one corrupt test image: the image is left out, the count is
    in the results, and the metrics are those of the clean embeddings without that row."""
    import torch
    from test_data_stream import make_shards

    import rskdist.build
    from rskdist.build import build_model
    from rskdist.config import load_config
    from rskdist.data import shards as S
    from rskdist.eval import load_embeddings

    clean = make_shards(tmp_path / "clean", [4] * 4, samples_per_shard=10, image_size=32, test_counts=(4, 3, 5))
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(clean, bad)
    test = S.load_split(str(bad), "test")
    row = test.samples[2]
    with open(test.shard_paths[row["shard"]], "r+b") as f:  # zeros instead of the JPEG: undecodable
        f.seek(int(row["offset"]))
        f.write(b"\0" * int(row["size"]))

    common = ["model.pretrained=", "data.num_workers=0", "data.source=shards"]
    model = build_model(load_config(str(ROOT / "configs/debug.yaml"), common + [f"data.root={clean}"]).model,
                        pretrained=False)
    monkeypatch.setattr(rskdist.build, "load_trained_model", lambda path, tag=None, model_cfg=None: model)  # one fixed model

    def evaluate_shards(root, name):
        argv = ["--checkpoint", str(tmp_path / "run"), "--config", str(ROOT / "configs/debug.yaml"), "--ks", "1", "2",
                "--backend", "torch", "--save-embeddings", str(tmp_path / f"{name}.pt")]
        argv += [f"--override={o}" for o in common + [f"data.root={root}"]]
        argv += ["--examples", str(tmp_path / f"{name}_pictures")]
        return evaluate.main(argv), load_embeddings(str(tmp_path / f"{name}.pt"))

    with pytest.warns(UserWarning, match="1 unreadable evaluation image"):
        got, (emb_bad, lab_bad) = evaluate_shards(bad, "bad")
    want, (emb, lab) = evaluate_shards(clean, "clean")
    assert "num_unreadable_images" not in want["results"] and len(lab) == 12
    assert got["results"]["num_unreadable_images"] == 1
    page = (tmp_path / "clean_pictures" / "examples.html").read_text()
    assert page.count("<tr>") == 12 and len(list((tmp_path / "clean_pictures" / "examples").iterdir())) == 12
    keep = [i for i in range(len(lab)) if i != 2]  # the stream keeps the split's order
    torch.testing.assert_close(torch.as_tensor(emb_bad), torch.as_tensor(emb)[keep])
    expected = retrieval_metrics(torch.as_tensor(emb)[keep], torch.as_tensor(lab)[keep], ks=(1, 2), backend="torch")
    assert {k: v for k, v in got["results"].items() if k != "num_unreadable_images"} == expected
