"""examples.html: the evaluation's retrievals as pictures, opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data_stream import make_shards
from test_eval_splits import eval_stream, make_validator
from rskdist.build import build_model
from rskdist.config import load_config
from rskdist.eval import find_examples, write_examples
from rskdist.eval.examples import FOLDER, PAGE

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
COUNTS = [4] * 6
TEST_COUNTS = (6, 5, 7, 6, 8, 5, 6, 7)  # 50 test images in 8 classes


def chromium(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: the sandbox refuses to run as root (CI containers).
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def image_state(page: Path) -> tuple[str, int]:
    """What the page's own check says once loaded: ("loaded" | "missing N", image count)."""
    dom = chromium("--dump-dom", page.resolve().as_uri()).stdout
    state = re.search(r'data-images="([^"]*)"', dom)
    count = re.search(r'data-image-count="(\d+)"', dom)
    assert state and count, dom[:500]
    return state.group(1), int(count.group(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One evaluation of an untrained model by the trainer's Validator, on shards."""
    tmp = tmp_path_factory.mktemp("examples")
    shards = make_shards(tmp / "shards", COUNTS, image_size=32, test_counts=TEST_COUNTS)
    cfg = load_config(ROOT / "configs/debug.yaml", [
        "data.source=shards", f"data.root={shards}", "data.num_workers=0", "model.image_size=32",
        "data.global_batch=8", "data.m=2", "eval.batch_size=16",
        "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    run = tmp / "run"
    run.mkdir()
    metrics = make_validator(cfg, model.mean, model.std, run_dir=run).evaluate(model, torch.float32)
    return run, metrics


def test_the_validator_writes_the_page_and_its_thumbnails(run_dir):
    run, metrics = run_dir
    page = (run / PAGE).read_text()
    assert page.count("<tr>") == 24  # eval.examples
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 24 * 9 and all((run / s).is_file() for s in srcs)
    assert all(s.startswith(FOLDER + "/") for s in srcs)  # beside the page: the folder can be copied
    assert f"{100 * metrics['recall@1']:.2f}" in page
    assert page.count('class="ok"') + page.count('class="bad"') == 24 * 8
    assert page.count("first correct:") == 24


def test_examples_are_fixed_and_exact():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((120, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 120)
    a = find_examples(emb, labels, np.arange(120), count=6, backend="torch")
    assert a == find_examples(emb, labels, np.arange(120), count=6, backend="torch")  # seeded
    for e in a:
        s = emb.astype(np.float64) @ emb[e["query"]].astype(np.float64)
        order = [j for j in sorted(range(120), key=lambda j: (-s[j], j)) if j != e["query"]]
        assert e["neighbours"] == order[:8]
        assert e["correct"] == [bool(labels[j] == labels[e["query"]]) for j in order[:8]]
        assert e["first_correct"] == next(i + 1 for i, j in enumerate(order) if labels[j] == labels[e["query"]])


@needs_chromium
def test_chromium_loads_every_image_and_shows_green_and_red(run_dir, tmp_path):
    run, _ = run_dir
    copy = tmp_path / "copied"  # the page and its folder work anywhere
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shards"))
    assert image_state(copy / PAGE) == ("loaded", 24 * 9)
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", (copy / PAGE).resolve().as_uri())
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.shape[:2] == (900, 1200) and rgb.std() > 20  # not blank
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green = ((g > 130) & (r < 60) & (b < 90)).sum()
    red = ((r > 180) & (g < 80) & (b < 80)).sum()
    assert green > 500 and red > 500, (green, red)  # frames of correct and wrong neighbours

    # The check can fail: a missing thumbnail is reported by the page.
    victim = sorted((copy / FOLDER).iterdir())[0]
    uses = (copy / PAGE).read_text().count(f'src="{FOLDER}/{victim.name}"')
    victim.unlink()
    assert image_state(copy / PAGE) == (f"missing {uses}", 24 * 9)


def test_write_examples_refuses_wrong_images(tmp_path):
    ex = [{"query": 0, "label": 0, "neighbours": [1], "neighbour_labels": [0], "correct": [True],
           "first_correct": 1}]
    with pytest.raises(ValueError, match="uint8"):
        write_examples(tmp_path, ex, {}, lambda ids: torch.zeros(len(ids), 3, 4, 4))


def test_report_links_the_page(run_dir, tmp_path):
    import subprocess as sp
    import sys

    run, _ = run_dir
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "metrics.jsonl").write_text("")
    out = sp.run([sys.executable, str(ROOT / "tools/report.py"), str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"[{PAGE}]({PAGE})" in (folder / "report.md").read_text()


def test_synthetic_runs_get_pictures_too(tmp_path):
    """configs/debug.yaml (synthetic images): the Validator writes the page from
    SyntheticEvalStream.read_images, the pictures of the images it evaluated."""
    cfg = load_config(ROOT / "configs/debug.yaml", [
        "model.image_size=16", "eval.synthetic_size=64", "eval.examples=5",
        "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}"])
    stream = eval_stream(cfg, "test")
    images, _, index = next(iter(stream))
    shown = stream.read_images(index[:3].tolist())
    assert shown.dtype == torch.uint8 and shown.shape == (3, 3, 16, 16)
    want = (images[:3] * 0.25 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(shown, want)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    make_validator(cfg, model.mean, model.std, run_dir=tmp_path).evaluate(model, torch.float32)
    assert (tmp_path / PAGE).read_text().count("<tr>") == 5
