"""What a resume on another world size rests on, one process each: the global batches of
both plans, the loader's pixels (augmentation keyed by the place in the global batch), the
synthetic stream, the forward chunks' seeds, the ZeRO-3 partitions of a weight average, and
the line that says what changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rskdist.data.loader import build_train_loader
from rskdist.data.sampler import make_plan
from rskdist.data.synthetic_stream import SyntheticTrainStream
from rskdist.parallel.layout import BatchLayout
from rskdist.parallel.reshard import reshard_partitions, world_change
from test_data_stream import SIZE, make_shards

K = 8  # classes per global batch


def _labels():
    rng = np.random.default_rng(3)
    return rng.integers(0, 30, size=400)


@pytest.mark.parametrize("sampler", ["balanced", "reference"])
def test_global_plan_is_the_same_on_every_world_size(sampler):
    labels = _labels()
    plans = {w: make_plan(sampler, labels, m=4, classes_per_rank=K // w, world_size=w, seed=5) for w in (1, 2, 4, 8)}
    for epoch in (0, 3):
        ref = plans[1].global_plan(epoch)
        assert (ref >= 0).all() and ref.shape[1:] == (K, 4)
        for w, plan in plans.items():
            assert plan.epoch_steps(epoch) == plans[1].epoch_steps(epoch)
            np.testing.assert_array_equal(plan.global_plan(epoch), ref)
            for step in (0, plan.epoch_steps(epoch) - 1):  # rank r: the contiguous r-th slice, in rank order
                joined = np.concatenate([plan.rank_batch(epoch, step, r) for r in range(w)])
                np.testing.assert_array_equal(joined, ref[step].reshape(-1))
    assert not np.array_equal(plans[1].global_plan(0), plans[1].global_plan(3))  # epochs do differ


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("elastic"), [6, 5, 7, 4, 6, 5, 8, 4], samples_per_shard=9)


def _global_batches(root, world, steps, state=None, **kw):
    """The first `steps` global batches (ranks concatenated in order) from `state` on."""
    loaders = [build_train_loader(root, rank=r, world_size=world, classes_per_rank=4 // world, m=2,
                                  image_size=SIZE, num_workers=0, seed=9, read_size=3, **kw) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return out, states


def test_loader_gives_the_same_pixels_on_every_world_size_and_resumes_across(shards):
    ref, _ = _global_batches(shards, 1, 4)
    for world in (2, 4):
        got, _ = _global_batches(shards, world, 4)
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(y, ry) and torch.equal(x, rx)  # same images, same crops and flips
    # Saved on 4 ranks after 2 steps, resumed on 2 and on 1: the next global batches follow.
    _, states = _global_batches(shards, 4, 2)
    assert states[0]["world_size"] == 4 and states[0]["global_classes"] == 4
    for world in (2, 1):
        got, _ = _global_batches(shards, world, 2, state=states[0])
        for (x, y), (rx, ry) in zip(got, ref[2:]):
            assert torch.equal(y, ry) and torch.equal(x, rx)
    with pytest.raises(ValueError, match="global_classes=4 in the checkpoint but 2 now"):
        build_train_loader(shards, rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE,
                           num_workers=0, seed=9).load_state_dict(states[0])


def test_synthetic_stream_global_batch_is_the_same_on_every_world_size():
    def global_batch(world, step):
        parts = [SyntheticTrainStream(num_classes=24, rank=r, world_size=world, classes_per_rank=8 // world, m=4,
                                      image_size=8, seed=1).batch(step) for r in range(world)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    for step in (0, 5):
        x1, y1 = global_batch(1, step)
        for world in (2, 4):
            x, y = global_batch(world, step)
            assert torch.equal(x, x1) and torch.equal(y, y1)
    assert not torch.equal(global_batch(1, 0)[0], global_batch(1, 5)[0])


def test_partitions_recut_for_another_world_size():
    """ZeRO-3 cuts a parameter of n elements into ceil(n / W) per rank, the last padded."""
    numels = [10, 3, 7]
    wholes = [torch.arange(n, dtype=torch.float32) + 100 * i for i, n in enumerate(numels)]

    def cut(world):
        out = []
        for r in range(world):
            parts = []
            for whole in wholes:
                size = -(-len(whole) // world)
                padded = torch.cat([whole, torch.full((size * world - len(whole),), -1.0)])
                parts.append(padded[r * size : (r + 1) * size])
            out.append(parts)
        return out

    for old, new in [(4, 2), (2, 4), (1, 3), (3, 1)]:
        saved = cut(old)
        for rank in range(new):
            got = reshard_partitions(saved, numels, rank=rank, world_size=new)
            for g, want in zip(got, cut(new)[rank]):
                assert torch.equal(g, torch.where(want < 0, torch.zeros_like(want), want))


def test_the_line_that_says_what_changed():
    saved = BatchLayout(global_batch=64, world_size=4, m=4, chunk_size=8)
    assert world_change(saved, saved, zero_stage=2) is None
    now = BatchLayout(global_batch=64, world_size=2, m=4, chunk_size=8)
    line = world_change(saved, now, zero_stage=3)
    assert line.startswith("resume on another world size: world size 4 -> 2; local batch 16 -> 32; chunks per "
                           "rank 2 -> 4 (of 8)")
    assert "ZeRO-3 optimizer state re-sharded from 4 to 2 ranks" in line and "masks differ" not in line
    ragged = BatchLayout(global_batch=64, world_size=8, m=4, chunk_size=5)
    assert "dropout and drop-path masks differ" in world_change(saved, ragged, zero_stage=0)
    assert "re-sharded" not in world_change(saved, ragged, zero_stage=0)
    assert (BatchLayout(global_batch=16, world_size=2, m=2, chunk_size=4).chunk_starts()
            == BatchLayout(global_batch=16, world_size=4, m=2, chunk_size=4).chunk_starts() == {0, 4, 8, 12})


def test_the_layout_is_worked_out_once_and_read_back_from_its_record():
    lay = BatchLayout(global_batch=96, world_size=4, m=4, chunk_size=10)
    assert (lay.local_batch, lay.classes_per_rank, lay.num_chunks) == (24, 6, 3)
    assert BatchLayout.from_record(lay.record(), m=99) == lay
    old = {"world_size": 4, "global_batch": 96, "local_batch": 24, "chunk_size": 10, "num_chunks": 3}  # no m
    assert BatchLayout.from_record(old, m=4) == lay
    with pytest.raises(ValueError, match="multiple of 12"):
        BatchLayout(global_batch=100, world_size=3, m=4, chunk_size=8)


def test_saved_world_size_from_the_manifest_else_the_optimizer_files(tmp_path):
    from rskdist.parallel.reshard import saved_world_size

    assert saved_world_size(tmp_path) is None  # ZeRO-0 without a manifest: nothing says
    for r in range(3):
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert saved_world_size(tmp_path) == 3
    (tmp_path / "complete.json").write_text('{"tag": "step00000002", "world_size": 4, "files": {}}')
    assert saved_world_size(tmp_path) == 4
    # Resumed on another world size, the conversion needs every saving rank's file in the folder.
    from rskdist.parallel.reshard import _missing_files

    assert _missing_files(tmp_path, 3) is None
    assert "saved on 4 ranks but holds the ZeRO optimizer files of 3" in _missing_files(tmp_path, 4)
