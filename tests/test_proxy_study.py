"""tools/proxy_study.py: the plain loop (it learns, it starts where the trainer starts), the
study's rows, report and resumability, and (slow) rskdist through the launcher against
the plain loop on the same batches, step by step."""

import csv
import importlib.util
import io
import json
import statistics
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from rskdist.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("proxy_study", ROOT / "tools" / "proxy_study.py")
proxy_study = importlib.util.module_from_spec(_spec)
sys.modules["proxy_study"] = proxy_study
_spec.loader.exec_module(proxy_study)

DEBUG = str(ROOT / "configs" / "debug.yaml")
STUDY = str(ROOT / "configs" / "proxy_study.yaml")


def _debug_cfg(loss: str, steps: int = 8):
    return load_config(DEBUG, [f"loss.name={loss}", "loss.mix=none", f"run.max_steps={steps}",
                               "eval.synthetic_size=64"])


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> str:
    from rskdist.data.sources import list_source
    from rskdist.data.writer import write_shards

    out = str(tmp_path_factory.mktemp("digits") / "digits")
    write_shards(list_source("digits", image_size=16), out, num_workers=1, progress=False)
    return out


# ----------------------------------------------------------------------------- the plain loop
@pytest.mark.parametrize("loss", ["proxy_anchor", "cosface"])
def test_plain_loop_moves_the_proxies_and_lowers_the_loss(tmp_path, loss):
    result = proxy_study.train_plain(_debug_cfg(loss), tmp_path / "run")
    losses = result["losses"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert statistics.fmean(losses[-3:]) < losses[0]
    assert result["proxy_change"] > 1e-3
    assert 0.0 <= result["final_eval"]["recall@1"] <= 1.0
    # The run folder reads like a trainer's.
    row = proxy_study.read_row(tmp_path / "run")
    assert row["steps"] == 8 and row["loss_first"] == losses[0] and row["recall@1"] == result["final_eval"]["recall@1"]


def test_plain_loop_starts_where_the_trainer_starts():
    """Same seed: the trainer's model and rskdist's loss (built in the trainer's order) give
    the plain loop's first loss on the first batch, so both runs start alike."""
    from rskdist.build import build_criterion, build_model
    from rskdist.startup import batch_layout, run_data

    cfg = _debug_cfg("arcface", steps=1)
    plain = proxy_study.train_plain(cfg)["losses"][0]
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)
    data = run_data(cfg)
    stream = data.train_stream(batch_layout(cfg, 1), rank=0, mean=model.mean, std=model.std, device=torch.device("cpu"))
    criterion = build_criterion(cfg.loss, embed_dim=cfg.model.embed_dim, num_classes=data.num_classes)
    images, labels = next(iter(stream))
    with torch.no_grad():
        assert float(criterion(model(images), labels)) == pytest.approx(plain, rel=1e-6)


def test_plain_loop_freezes_the_backbone_as_the_trainer_does():
    """Proxy-Anchor's frozen-backbone warm-up (loss.backbone_warmup_epochs; -1 = its paper's
    one epoch, the trainer's rule): the backbone keeps still while the proxies learn, and
    moves once the warm-up is over."""
    from rskdist.build import backbone_frozen_steps, build_criterion
    from rskdist.startup import run_data

    cfg = _debug_cfg("proxy_anchor", steps=3)
    frozen = proxy_study.train_plain(cfg)
    criterion = build_criterion(cfg.loss, embed_dim=cfg.model.embed_dim, num_classes=run_data(cfg).num_classes)
    rule = backbone_frozen_steps(cfg.loss, criterion, steps_per_epoch=16)  # debug.yaml's epoch
    assert frozen["frozen_steps"] == rule == 16
    assert frozen["backbone_change"] == 0.0 and frozen["proxy_change"] > 1e-3
    cfg.loss.backbone_warmup_epochs = 1 / 16  # one frozen step, then the schedule
    thawed = proxy_study.train_plain(cfg)
    assert thawed["frozen_steps"] == 1 and thawed["backbone_change"] > 1e-3
    # The first update moves the same parameters in both runs; the second, the backbone too.
    assert thawed["losses"][:2] == frozen["losses"][:2] and thawed["losses"][2] != frozen["losses"][2]


def test_plain_loop_refuses_what_it_does_not_train():
    with pytest.raises(ValueError, match="loss.name=multi_similarity: the plain loop trains proxy losses only"):
        proxy_study.train_plain(_debug_cfg("multi_similarity"))
    with pytest.raises(ValueError, match="loss.mix=embedding"):
        proxy_study.train_plain(load_config(DEBUG, ["loss.name=cosface", "loss.mix=embedding"]))


# ----------------------------------------------------------------------------- the study
def _main(argv) -> tuple[int, list[dict]]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = proxy_study.main(argv)
    return code, [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


# Slow tier: three plain runs and their evaluations (~35 s on shared cores). The "3 of 4 runs"
# once seen here was the test's count, not the tool: plain_ranks trains the first seed only
# by default (--plain-ranks-seeds), and the test expected it on both seeds.
@pytest.mark.slow
def test_study_rows_report_and_resume(tmp_path, digits_root):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--config", STUDY, "--datasets", "digits", "--losses", "cosface", "--seeds", "0", "1",
            "--impls", "plain", "plain_ranks", "--set", f"data.root={digits_root}", "--set", "run.max_steps=3",
            "--set", "data.num_workers=0"]
    code, lines = _main(argv)
    assert code == 0 and len(lines) == 3  # one JSON line per finished run; plain_ranks on the first seed only
    for line in lines:
        assert line["status"] == "done" and line["steps"] == 3 and line["dataset"] == "digits"
        assert 0.0 <= line["recall@1"] <= 1.0 and 0.0 <= line["map@r"] <= 1.0 and line["seconds"] > 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["seed"]) for r in rows] == [("plain", "0"), ("plain_ranks", "0"), ("plain", "1")]
    assert {r["recall@1"] for r in rows} == {str(line["recall@1"]) for line in lines}
    report = (out / "report.md").read_text()
    assert "python tools/proxy_study.py --out" in report and "| digits | cosface |" in report
    # Finished runs are not trained again; a changed setting is refused before anything runs.
    code, lines = _main(argv)
    assert code == 0 and lines == []
    with (out / "results.csv").open() as f:
        assert list(csv.DictReader(f)) == rows
    assert _main([*argv, "--set", "optim.lr=0.5"])[0] == 2


def _row(dataset, loss, impl, seed, r1, **extra):
    return {"dataset": dataset, "loss": loss, "impl": impl, "seed": seed, "status": "done", "recall@1": r1,
            "map@r": r1 / 3, **extra}


def test_comparison_against_numpy():
    plain, ours = [0.40, 0.44, 0.42], [0.41, 0.43, 0.47]
    rows = [_row("demo", "arcface", "plain", s, v) for s, v in enumerate(plain)]
    rows += [_row("demo", "arcface", "rskdist", s, v) for s, v in enumerate(ours)]
    rows += [_row("demo", "cosface", "plain", s, v) for s, v in enumerate(plain)]
    rows += [_row("demo", "cosface", "rskdist", s, v - 0.2) for s, v in enumerate(ours)]
    rows.append({**_row("demo", "cosface", "rskdist", 3, 0.9), "status": "failed (exit 1)"})  # left out
    arc, cos = proxy_study.compare(rows, "recall@1")
    assert arc["plain"] == plain and arc["rskdist"] == ours
    assert arc["paired"] == pytest.approx(np.subtract(ours, plain).tolist())
    # Within: |mean difference| <= 2 sample stds of the plain loop's seeds.
    assert abs(np.mean(ours) - np.mean(plain)) <= 2 * np.std(plain, ddof=1) and arc["within"] is True
    assert cos["within"] is False and cos["rskdist"] == pytest.approx(np.subtract(ours, 0.2).tolist())
    mean, std = np.mean(plain), np.std(plain, ddof=1)
    assert proxy_study._fmt(plain) == f"{mean:.4f} ± {std:.4f}"


def test_loss_gaps_read_both_run_folders(tmp_path):
    rows = []
    for impl, losses, r1 in (("rskdist", [3.0, 2.0, 1.5], 0.5), ("plain_ranks", [3.0, 2.1, 1.5], 0.52)):
        run_dir = tmp_path / impl
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "kind": "train", "loss": v}) + "\n" for i, v in enumerate(losses)))
        rows.append(_row("digits", "norm_softmax", impl, 0, r1, run_dir=str(run_dir)))
    (gap,) = proxy_study.loss_gaps(rows)
    assert gap["steps"] == 3 and gap["seeds"] == 1
    assert gap["max_loss_gap"] == pytest.approx(0.1) and gap["max_recall@1_gap"] == pytest.approx(0.02)


@pytest.mark.slow
@pytest.mark.integration
def test_rskdist_on_two_ranks_follows_the_plain_loop_on_its_batches(tmp_path, digits_root):
    """rskdist/train.py on 2 CPU ranks (ZeRO-2) and the plain loop fed the same ranks'
    batches: the same loss at every step and the same final metrics (~60 s, two launcher
    start-ups of DeepSpeed on CPU). Proxy-Anchor's default warm-up keeps the backbone still
    for its first epoch (23 steps of digits); the 26 steps cross into the steps that move it."""
    out = tmp_path / "study"
    code, lines = _main(["--out", str(out), "--config", STUDY, "--datasets", "digits", "--losses", "proxy_anchor",
                         "--seeds", "1", "--impls", "rskdist", "plain_ranks", "--set", f"data.root={digits_root}",
                         "--set", "run.max_steps=26", "--set", "data.num_workers=0"])
    assert code == 0 and [line["impl"] for line in lines] == ["rskdist", "plain_ranks"]
    plain = json.loads((out / "runs" / "digits__proxy_anchor__plain_ranks__seed1" / "summary.json").read_text())
    assert plain["frozen_steps"] == 23 and plain["backbone_change"] > 0
    (gap,) = proxy_study.loss_gaps(lines)
    assert gap["steps"] == 26 and gap["max_loss_gap"] < 1e-4 and gap["max_map@r_gap"] < 1e-4
    # Float rounding may flip one near-tie among the 714 test queries, no more.
    assert gap["max_recall@1_gap"] <= 1 / 714 + 1e-9
