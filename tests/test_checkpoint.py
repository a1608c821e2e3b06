"""Checkpoint bookkeeping: `latest` moves only after a complete save, old tags are pruned
only after a good one (never the best), and weights come back out of a run folder."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.checkpoint import CheckpointManager, load_model_state, resolve_checkpoint


class FakeEngine:
    """Writes a tag folder as DeepSpeed would; fails on request (a full disk)."""

    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.loaded = []

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False  # the manager writes `latest` itself, after every rank is done
        out = Path(folder) / tag
        out.mkdir(parents=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"partial" if tag == self.fail_on else b"ok")
        if tag == self.fail_on:
            raise OSError("disk full")
        return True

    def load_checkpoint(self, folder, tag=None):
        tag = tag or (Path(folder) / "latest").read_text()
        self.loaded.append(tag)
        return str(Path(folder) / tag), {"trainer": {"step": int(tag[4:])}}


def _manager(tmp_path, engine, keep=2):
    return CheckpointManager(tmp_path / "checkpoints", engine, rank=0, keep=keep)


def _tags(tmp_path):
    return sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = _manager(tmp_path, FakeEngine(fail_on="step00000003"))
    for step in (1, 2):
        ckpt.save(step, {})
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    with pytest.raises(ValueError, match=r"cannot write .*step00000003 \(OSError: disk full\); the previous checkpoint "
                                         r"step00000002 and latest are intact; free space"):
        ckpt.save(3, {})
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    assert (tmp_path / "checkpoints" / "step00000001").is_dir()  # nothing pruned after a failed save
    assert resolve_checkpoint(tmp_path) == (tmp_path / "checkpoints", "step00000002")


def test_good_saves_prune_to_keep_checkpoints(tmp_path):
    ckpt = _manager(tmp_path, FakeEngine(), keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {})
    assert _tags(tmp_path) == ["step00000003", "step00000004"]


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    ckpt = _manager(tmp_path, FakeEngine(), keep=2)
    ckpt.save(1, {})
    ckpt.mark_best("step00000001")
    for step in (2, 3, 4, 5):
        ckpt.save(step, {})
    assert _tags(tmp_path) == ["step00000001", "step00000004", "step00000005"]
    assert resolve_checkpoint(tmp_path, "best") == (tmp_path / "checkpoints", "step00000001")
    ckpt.mark_best("step00000005")
    assert _tags(tmp_path) == ["step00000004", "step00000005"]  # the old best went with the move
    ckpt.save(6, {})
    assert _tags(tmp_path) == ["step00000005", "step00000006"]


def test_resolve_tags_and_pointers(tmp_path):
    ckpt = _manager(tmp_path, FakeEngine(), keep=5)
    for step in (1, 2):
        ckpt.save(step, {})
    folder = tmp_path / "checkpoints"
    assert resolve_checkpoint(tmp_path, "latest") == (folder, "step00000002")
    assert resolve_checkpoint(folder, "step00000001") == (folder, "step00000001")
    assert resolve_checkpoint(folder / "step00000001") == (folder, "step00000001")
    with pytest.raises(ValueError, match="no best checkpoint"):
        resolve_checkpoint(tmp_path, "best")
    with pytest.raises(ValueError, match="no checkpoint 'step00000009'"):
        resolve_checkpoint(tmp_path, "step00000009")


def test_resume_modes(tmp_path):
    engine = FakeEngine()
    ckpt = _manager(tmp_path, engine)
    assert ckpt.resume("auto") is None  # a fresh run folder
    ckpt.save(3, {})
    ckpt.save(4, {})
    assert ckpt.resume("never") is None
    assert ckpt.resume("auto")[1] == {"trainer": {"step": 4}}
    assert ckpt.resume(str(tmp_path / "checkpoints" / "step00000003"))[1] == {"trainer": {"step": 3}}


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


def test_a_run_with_loss_proxies_evaluates_its_model_part(tmp_path):
    """A proxy loss trains model + loss (rskdist.build.TrainModule): evaluation takes the model."""
    tag = tmp_path / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    module = {"model.head.weight": torch.ones(2), "model.model.0.bias": torch.zeros(1),
              "criterion.proxies": torch.full((3, 2), 5.0)}
    torch.save({"module": module}, tag / "mp_rank_00_model_states.pt")
    state = load_model_state(tmp_path)
    assert sorted(state) == ["head.weight", "model.0.bias"]
    assert state["head.weight"].tolist() == [1.0, 1.0]


def _resume_worker(rank, init_method, root, out):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        folder = Path(root) / f"node{rank}"  # each "node" has its own disk
        ckpt = CheckpointManager(folder, FakeEngine(), rank=rank, keep=5, group=dist.group.WORLD)
        try:
            result = ckpt.resume("auto")[1]["trainer"]["step"]
        except ValueError as exc:
            result = str(exc)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _node_folders(root, tags_per_node, latest_per_node):
    for node, (tags, latest) in enumerate(zip(tags_per_node, latest_per_node)):
        folder = root / f"node{node}"
        for tag in tags:
            (folder / tag).mkdir(parents=True)
        (folder / "latest").write_text(latest)


@pytest.mark.distributed
def test_rank0_decides_what_every_rank_resumes(tmp_path, rendezvous_file):
    # Node 1's own pointer is older: it still loads rank 0's choice.
    _node_folders(tmp_path / "a", [["step00000002", "step00000004"]] * 2, ["step00000004", "step00000002"])
    mp.spawn(_resume_worker, args=(rendezvous_file, str(tmp_path / "a"), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)] == [4, 4]
    # Node 1 lacks the checkpoint rank 0 picked: every rank stops with the same message.
    _node_folders(tmp_path / "b", [["step00000004"], ["step00000002"]], ["step00000004", "step00000002"])
    mp.spawn(_resume_worker, args=(rendezvous_file + "b", str(tmp_path / "b"), str(tmp_path)), nprocs=2)
    messages = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert messages[0] == messages[1] and "rank(s) 1 cannot read" in messages[0] and "step00000004" in messages[0]
