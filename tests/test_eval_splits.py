"""Held-out splits: validation classes taken out of the training split (data.val_classes) and
several named test splits (data.test_splits): which images each stream shows, how each
split's metrics are named in results, records and the progress line, which split picks
`best`, and tools/evaluate.py on such a run. tests/test_integration.py trains one."""

from __future__ import annotations

import json
from pathlib import Path

import evaluate
import numpy as np
import pytest
import report
import torch

from test_data_stream import SIZE, make_shards
from rskdist.build import build_model
from rskdist.config import load_config, save_config
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.data.holdout import num_validation_classes, validation_classes
from rskdist.data.shards import load_split
from rskdist.eval import evaluate_model
from rskdist.startup import batch_layout, run_data
from rskdist.validator import Validator

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")
COUNTS = [4, 5, 4, 6, 4, 4, 5, 4, 4, 4, 5, 4]  # images per training class (12 classes, 53 images)
TEST_COUNTS = (3, 4, 5)  # each test split: 3 classes of its own, 12 images
TEST_SPLITS = ["test_800", "test_1600"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One shard folder with a training split and two test splits, as VehicleID's."""
    return make_shards(tmp_path_factory.mktemp("splits"), COUNTS, test_counts=TEST_COUNTS,
                       test_splits=TEST_SPLITS)


def _config(root, *overrides):
    """Shards of `root`; global batch 16 = 8 classes x m=2 (12 classes, 3 held out, leaves 9)."""
    return load_config(ROOT / "configs/debug.yaml", [
        "data.source=shards", f"data.root={root}", "data.num_workers=0", f"model.image_size={SIZE}",
        "data.global_batch=16", "data.m=2", "eval.batch_size=5", f"data.test_splits=[{', '.join(TEST_SPLITS)}]",
        "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}", *overrides])


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, pretrained=False)


def _train_stream(cfg, rank: int, world_size: int):
    return run_data(cfg).train_stream(batch_layout(cfg, world_size), rank=rank, mean=IMAGENET_MEAN,
                                      std=IMAGENET_STD, device=CPU)


def eval_stream(cfg, split: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """One process's stream of a held-out split, as the validator and tools/evaluate.py open it."""
    return run_data(cfg).eval_stream(split, batch_size=cfg.eval.batch_size, synthetic_size=cfg.eval.synthetic_size,
                                     rank=0, world_size=1, mean=mean, std=std)


def make_validator(cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    """The trainer's validator of `cfg` on one process."""
    return Validator(cfg.eval, run_data(cfg), rank=0, world_size=1, group=None, device=CPU, mean=mean, std=std,
                     steps_per_epoch=1, **kwargs)


def test_validation_classes_are_a_seeded_class_disjoint_draw():
    held = validation_classes(100, 10, seed=0)
    assert len(set(held.tolist())) == 10 and 0 <= held.min() and held.max() < 100 and (np.diff(held) > 0).all()
    assert np.array_equal(held, validation_classes(100, 10, seed=0))  # every rank and tool draws the same
    assert not np.array_equal(held, validation_classes(100, 10, seed=1))
    assert len(validation_classes(100, 0.25, seed=0)) == 25
    assert num_validation_classes(10, 0.01) == 1 and num_validation_classes(10, 0) == 0
    with pytest.raises(ValueError, match="at most 9 can be held out"):
        validation_classes(10, 10, seed=0)


def _labels_shown(cfg, world_size: int, epochs: int = 2) -> np.ndarray:
    """Every label the training streams of all ranks yield over `epochs` epochs."""
    shown = []
    for rank in range(world_size):
        stream = _train_stream(cfg, rank, world_size)
        batches = iter(stream)
        for _ in range(epochs * stream.steps_per_epoch):
            try:
                shown.append(next(batches)[1])
            except StopIteration:  # a shard loader's epoch ended: the next pass starts the next epoch
                batches = iter(stream)
                shown.append(next(batches)[1])
        if hasattr(stream, "close"):
            stream.close()
    return torch.cat(shown).numpy()


def test_training_never_shows_a_validation_image_and_validation_shows_only_those(shards):
    cfg = _config(shards, "data.val_classes=3")
    held = run_data(cfg).held_out
    assert len(held) == 3 and np.array_equal(held, run_data(_config(shards, "data.val_classes=3")).held_out)
    rest = np.setdiff1d(np.arange(len(COUNTS)), held)
    stream = _train_stream(cfg, 0, 2)
    # The plan draws from a table without the held-out images: map its entries back to the split's rows.
    table, whole = stream.table, load_split(shards, "train")
    assert len(table) == sum(COUNTS[c] for c in rest)
    planned = stream.plan.epoch_plan(0)
    assert not np.isin(whole.labels[table.rows[planned[planned >= 0]]], held).any()
    shown = _labels_shown(cfg, world_size=2)
    assert not np.isin(shown, held).any()
    assert set(shown.tolist()) == set(rest.tolist())  # every other class is trained on

    val = eval_stream(cfg, "val")
    labels = torch.cat([lab[index >= 0] for _, lab, index in val]).numpy()
    val.close()
    assert sorted(labels.tolist()) == sorted(c for c in held.tolist() for _ in range(COUNTS[c]))


def test_synthetic_validation_classes_leave_the_training_batches():
    cfg = load_config(ROOT / "configs/debug.yaml", ["data.val_classes=16", "model.image_size=8"])
    held = run_data(cfg).held_out
    assert len(held) == 16
    shown = _labels_shown(cfg, world_size=2, epochs=1)
    assert set(shown.tolist()) <= set(range(64)) - set(held.tolist())  # random classes per step, never held out
    val = eval_stream(cfg, "val")
    assert sorted(set(val.labels.tolist())) == held.tolist() and len(val.labels) == 16 * 8
    with pytest.raises(ValueError, match="no split 'val'"):  # off: no validation set to build
        eval_stream(load_config(ROOT / "configs/debug.yaml"), "val")


@pytest.fixture(scope="module")
def evaluated(shards):
    """One evaluation of a run with validation classes and two test splits."""
    cfg = _config(shards, "data.val_classes=3")
    model = _model(cfg)  # normalised with its own mean and std, as in the trainer and tools/evaluate.py
    it = make_validator(cfg, model.mean, model.std)
    return cfg, it, model, it.evaluate(model, torch.float32)


def test_every_split_is_evaluated_under_its_own_name(evaluated):
    cfg, validator, model, metrics = evaluated
    assert validator.splits == ["val", *TEST_SPLITS]
    held = run_data(cfg).held_out
    assert metrics["val/num_queries"] == sum(COUNTS[c] for c in held)
    assert metrics["test_800/num_queries"] == metrics["test_1600/num_queries"] == sum(TEST_COUNTS)
    assert "recall@1" not in metrics  # no split is called "test" here
    for split in validator.splits:  # each split's numbers are those of that split evaluated alone
        stream = eval_stream(cfg, split, model.mean, model.std)
        alone = evaluate_model(model, stream, device=CPU, ks=validator.ks)
        stream.close()
        assert {k[len(split) + 1:]: v for k, v in metrics.items() if k.startswith(f"{split}/")} == alone


def test_best_is_picked_on_the_first_split(evaluated, shards):
    validator = evaluated[1]
    assert validator.best.metric == "val/recall@1"

    def result(val: float, test: float) -> dict:
        return {"val/recall@1": val, "test_800/recall@1": test, "test_1600/recall@1": test}

    assert validator.is_new_best(1, result(0.5, 0.2))
    assert not validator.is_new_best(2, result(0.4, 0.9))  # better on test, worse on validation: not a best
    assert validator.is_new_best(3, result(0.6, 0.1))
    assert validator.best.best_step == 3 and validator.best.best_value == 0.6
    no_val = make_validator(_config(shards))
    assert no_val.splits == TEST_SPLITS and no_val.best.metric == "test_800/recall@1"
    default = make_validator(load_config(ROOT / "configs/debug.yaml"))
    assert default.splits == ["test"] and default.best.metric == "recall@1"  # the names runs always had


def test_every_split_reaches_the_records_the_progress_line_and_the_report(evaluated, tmp_path, capsys):
    from rskdist.runlog import RunLogger

    cfg, _, _, metrics = evaluated
    log = RunLogger(tmp_path, rank=0, device=CPU, group=None, loggers=())
    log.open(cfg, {}, fresh=True)
    log.evaluation(2, 1.0, metrics, is_best=True)
    log.evaluation(4, 2.0, {**metrics, "val/recall@1": metrics["val/recall@1"] / 2}, is_best=False)
    log.close({"final_eval": metrics})
    line = capsys.readouterr().out
    for split in ("val", *TEST_SPLITS):
        assert f"{split}/recall@1 " in line and f"{split}/map@r " in line
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert all(record[f"eval/{k}"] == v for k, v in metrics.items())
    text = report.report(tmp_path)
    assert "Recall@1 on split val:" in text and "Recall@1 on split test_1600:" in text
    assert f"Best val/recall@1 (it picks checkpoints/best): {metrics['val/recall@1']:.4f} at step 2." in text
    assert " test_800/recall@1 | " in text  # the table's header


def _run_folder(tmp_path, cfg) -> Path:
    """A run folder as rskdist/train.py leaves it, as far as tools/evaluate.py reads it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000002")
    save_config(cfg, run / "config.yaml")
    return run


def test_evaluate_cli_evaluates_every_split_of_the_run(evaluated, tmp_path, monkeypatch):
    import rskdist.checkpoint

    cfg, _, model, metrics = evaluated
    run = _run_folder(tmp_path, cfg)
    monkeypatch.setattr(rskdist.checkpoint, "load_model_state", lambda path, tag=None: model.state_dict())
    emb = tmp_path / "emb.pt"
    rec = evaluate.main(["--checkpoint", str(run), "--backend", "torch", "--save-embeddings", str(emb)])
    assert rec["splits"] == ["val", *TEST_SPLITS]
    assert rec["results"] == {k: v for k, v in metrics.items() if k != "eval_seconds"}  # the trainer's numbers
    assert all((tmp_path / f"emb.{split}.pt").is_file() for split in rec["splits"])

    one = evaluate.main(["--checkpoint", str(run), "--backend", "torch", "--split", "test_1600"])
    assert one["splits"] == ["test_1600"]
    assert one["results"] == {k: v for k, v in metrics.items() if k.startswith("test_1600/")}
    with pytest.raises(SystemExit, match=r"split 'test_2400' not in .*available: \['test_1600', 'test_800', "
                                         r"'train'\]"):
        evaluate.main(["--checkpoint", str(run), "--split", "test_2400"])
