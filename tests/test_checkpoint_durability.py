"""Checkpoints that survive a crash of the machine: each save's files are fsynced and listed
in a manifest (complete.json) before `latest` moves; a checkpoint whose file is later missing
or short is skipped on resume, which takes the one before and continues with the
uninterrupted run's losses."""

import json
import shutil
import sys

import pytest
from launching import run_cmd, train_losses

from rskdist.checkpoint import MANIFEST, _disagreement, verify_checkpoint


def test_verify_names_a_missing_or_short_file(tmp_path):
    tag = tmp_path / "step00000002"
    tag.mkdir()
    (tag / "a.pt").write_bytes(b"x" * 10)
    (tag / "b.pt").write_bytes(b"y" * 4)
    assert verify_checkpoint(tag, 0) is None  # no manifest: an older rskdist's save, trusted
    files = {"a.pt": {"size": 10, "ranks": [0, 1]}, "b.pt": {"size": 4, "ranks": [1]}}
    (tag / MANIFEST).write_text(json.dumps({"tag": tag.name, "world_size": 2, "files": files}))
    assert verify_checkpoint(tag, 0) is None and verify_checkpoint(tag, 1) is None
    (tag / "b.pt").write_bytes(b"y")
    assert verify_checkpoint(tag, 1) == "b.pt is 1 bytes, 4 when saved"
    assert verify_checkpoint(tag, 0) is None  # rank 0 never saw b.pt (another node's own file)
    (tag / "a.pt").unlink()
    assert verify_checkpoint(tag, 0) == "a.pt is missing"


def test_ranks_that_disagree_never_make_a_complete_save():
    good = ("step00000004", True, {"m.pt": 5})
    assert _disagreement([good, good]) is None
    assert "different tags" in _disagreement([good, ("step00000006", True, {"m.pt": 5})])
    assert "failed save" in _disagreement([good, ("step00000004", False, {"m.pt": 5})])
    assert "different sizes" in _disagreement([good, ("step00000004", True, {"m.pt": 3})])


def _train(out, name, *overrides):
    return run_cmd([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={out}",
                    f"run.name={name}", "run.save_every=2", "run.keep_checkpoints=5", "run.loggers=[]",
                    "eval.every_epochs=-1", *overrides], timeout=600)


@pytest.mark.integration
def test_resume_skips_a_checkpoint_with_a_short_or_missing_file(tmp_path):
    _train(tmp_path, "full", "run.max_steps=6")
    full = train_losses(tmp_path / "full")
    _train(tmp_path, "cut", "run.max_steps=4")
    cut = tmp_path / "cut"
    manifest = json.loads((cut / "checkpoints/step00000004" / MANIFEST).read_text())
    assert "mp_rank_00_model_states.pt" in manifest["files"] and "model.json" in manifest["files"]
    shutil.copytree(cut, tmp_path / "gone")
    states = cut / "checkpoints/step00000004/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # a save cut short by a crash of the machine
    optim = next((tmp_path / "gone/checkpoints/step00000004").glob("*optim_states.pt"))
    optim.unlink()
    for name in ("cut", "gone"):
        proc = _train(tmp_path, name, "run.max_steps=6")
        assert "skipping step00000004" in proc.stderr and "resumed from" in proc.stdout, proc.stderr[-2000:]
        resumed = train_losses(tmp_path / name)
        for step in (3, 4, 5, 6):
            assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (name, step)
