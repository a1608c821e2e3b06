"""Checkpoint bookkeeping: `latest` moves only after a complete save, old tags are pruned
only after a good one, and weights come back out of a run folder."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rskdist.checkpoint import load_model_state, resolve_checkpoint
from rskdist.config import Config
from rskdist.trainer import Trainer


class FakeEngine:
    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False  # the trainer writes `latest` itself, after every rank is done
        out = Path(folder) / tag
        out.mkdir(parents=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"partial" if tag == self.fail_on else b"ok")
        if tag == self.fail_on:
            raise OSError("disk full")
        return True


def _trainer(tmp_path, engine, keep=2):
    trainer = object.__new__(Trainer)
    cfg = Config()
    cfg.run.keep_checkpoints = keep
    trainer.cfg = cfg
    trainer.ctx = SimpleNamespace(rank=0, world_size=1, run_dir=tmp_path)
    trainer.engine = engine
    trainer.train_stream = SimpleNamespace(state_dict=lambda: {"step": 0})
    trainer.best = None
    return trainer


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, FakeEngine(fail_on="step00000003"))
    for step in (1, 2):
        trainer.step = step
        trainer.save()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    trainer.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    assert (tmp_path / "checkpoints" / "step00000001").is_dir()  # nothing pruned after a failed save
    assert resolve_checkpoint(tmp_path) == (tmp_path / "checkpoints", "step00000002")


def test_good_saves_prune_to_keep_checkpoints(tmp_path):
    trainer = _trainer(tmp_path, FakeEngine(), keep=2)
    for step in (1, 2, 3, 4):
        trainer.step = step
        trainer.save()
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert tags == ["step00000003", "step00000004"]


def test_resolve_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)
    tag = tmp_path / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000001")
    with pytest.raises(ValueError, match="holds no model states"):
        load_model_state(tmp_path)
    torch.save({"module": {"w": torch.ones(2, dtype=torch.bfloat16)}}, tag / "mp_rank_00_model_states.pt")
    state = load_model_state(tmp_path)
    assert state["w"].dtype == torch.float32 and state["w"].tolist() == [1.0, 1.0]
