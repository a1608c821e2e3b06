"""Unreadable images at read time: training images are replaced (deterministically, counted,
reported once), evaluation images are excluded and counted; nothing crashes, step counts hold."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data_stream import make_shards

from rskdist.data import shards as S
from rskdist.data.loader import BadSampleWarning, build_eval_loader, build_train_loader
from rskdist.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_train, normalize
from rskdist.eval import embed_dataset, evaluate_model

SIZE = 16
# 8 classes x 6 images, m=2: 24 groups, every image exactly once per epoch.
TRAIN = dict(classes_per_rank=2, m=2, image_size=SIZE, seed=3, read_size=3)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """48 training images (8 classes x 6) in 5 shards; 12 test images in 2 shards (10 + 2)."""
    return make_shards(tmp_path_factory.mktemp("clean"), [6] * 8, samples_per_shard=10, test_counts=(4, 3, 5))


def corrupt_copy(root: str, dst, split: str, indices) -> str:
    """A copy of `root` where the image bytes of `indices` (rows of `split`) are zeros."""
    shutil.copytree(root, dst)
    table = S.load_split(str(dst), split)
    for idx in indices:
        row = table.samples[idx]
        with open(table.shard_paths[row["shard"]], "r+b") as f:
            f.seek(int(row["offset"]))
            f.write(b"\0" * int(row["size"]))
    return str(dst)


def run_epoch(root, *, rank=0, world_size=1, num_workers=0, **kw):
    """(batches [(images, labels)], the loader after one epoch)."""
    loader = build_train_loader(root, rank=rank, world_size=world_size, num_workers=num_workers, **{**TRAIN, **kw})
    batches = list(loader)
    loader.close()
    return batches, loader


def expected_image(root, index, key) -> torch.Tensor:
    """Sample `index` of train decoded with the augmentation of position key = (seed, epoch, step, rank, pos)."""
    table = S.load_split(root, "train")
    row = table.samples[index]
    data = S.ShardReader(table.shard_paths).read(int(row["shard"]), int(row["offset"]), int(row["size"]))
    image = decode_train(data, SIZE, np.random.default_rng(list(key)))
    return normalize(torch.from_numpy(image[None].copy()), IMAGENET_MEAN, IMAGENET_STD)[0]


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_training_image_is_replaced_by_its_class(clean, tmp_path, num_workers):
    rank, step, pos = 1, 1, 3
    probe = build_train_loader(clean, rank=rank, world_size=2, num_workers=0, **TRAIN)
    batch = probe.plan.rank_batch(0, step, probe.rank)
    target = int(batch[pos])
    root = corrupt_copy(clean, tmp_path / "bad", "train", [target])
    ref, _ = run_epoch(clean, rank=rank, world_size=2)

    with pytest.warns(BadSampleWarning, match=rf"rank 1: cannot read train sample {target} \(train/shard-0000"):
        got, loader = run_epoch(root, rank=rank, world_size=2, num_workers=num_workers)
    assert len(got) == len(ref)  # the step count holds
    for s, ((x, y), (x_ref, y_ref)) in enumerate(zip(got, ref)):
        assert x.shape == x_ref.shape and torch.equal(y, y_ref)
        keep = torch.ones(len(x), dtype=torch.bool)
        if s == step:
            keep[pos] = False
        assert torch.equal(x[keep], x_ref[keep])  # every other image bit-identical
    assert loader.bad_samples == 1 and loader.state_dict()["bad_samples"] == 1
    (event,) = loader.pop_bad_events()
    assert loader.pop_bad_events() == []
    assert (event["index"], event["epoch"], event["step"], event["position"]) == (target, 0, step, pos)
    assert event["shard"].startswith("train/shard-") and event["reason"]
    labels = S.load_split(root, "train").labels
    sub = event["substitute"]
    assert sub != target and labels[sub] == labels[target] and sub not in batch  # same class, not in the step
    # Decoded with the position's own augmentation key (seed, epoch, step, place in the global batch).
    assert torch.equal(got[step][0][pos], expected_image(root, sub, (3, 0, step, rank * len(batch) + pos)))
    # The other rank reads none of it.
    other, other_loader = run_epoch(root, rank=0, world_size=2)
    assert other_loader.bad_samples == 0 and len(other) == len(ref)


def test_replacement_reproduced_on_resume_and_counted(clean, tmp_path):
    """Two epochs on one rank: the bad image is hit twice (counted twice, warned once); resuming
    before or after the hit reproduces the batches and continues the count."""
    kw = dict(rank=0, world_size=1, num_workers=0, **{**TRAIN, "classes_per_rank": 4})
    probe = build_train_loader(clean, **kw)
    target = int(probe.plan.rank_batch(0, 2, probe.rank)[5])
    root = corrupt_copy(clean, tmp_path / "bad", "train", [target])

    loader = build_train_loader(root, **kw)
    batches, states = [], [loader.state_dict()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # each pass is one epoch: the loader rolls over by itself
            for x, y in loader:
                batches.append((x, y))
                states.append(loader.state_dict())
    assert sum(issubclass(w.category, BadSampleWarning) for w in caught) == 1  # once per sample
    assert loader.bad_samples == 2
    events = loader.pop_bad_events()
    assert [e["index"] for e in events] == [target, target] and [e["epoch"] for e in events] == [0, 1]
    first_hit = 2  # global step index of the hit in epoch 0
    assert [s["bad_samples"] for s in states[: first_hit + 2]] == [0, 0, 0, 1]

    for resume_at in (first_hit, first_hit + 1):
        resumed = build_train_loader(root, **kw)
        resumed.load_state_dict(states[resume_at])
        x, y = next(iter(resumed))
        assert torch.equal(x, batches[resume_at][0]) and torch.equal(y, batches[resume_at][1])
        assert resumed.bad_samples == states[resume_at + 1]["bad_samples"]


def test_transient_failure_is_retried_not_counted(clean, monkeypatch):
    """The first read of one image fails (an NFS hiccup); the retry succeeds: same batches, nothing counted."""
    ref, _ = run_epoch(clean)
    table = S.load_split(clean, "train")
    row = table.samples[7]
    failed = []
    real_read = S.ShardReader.read

    def flaky_read(self, shard, offset, size):
        if (shard, offset) == (row["shard"], row["offset"]) and not failed:
            failed.append(offset)
            raise OSError("Stale file handle")
        return real_read(self, shard, offset, size)

    monkeypatch.setattr(S.ShardReader, "read", flaky_read)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadSampleWarning)
        got, loader = run_epoch(clean)
    assert failed  # the failure did happen
    assert loader.bad_samples == 0 and loader.pop_bad_events() == []
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(got, ref))


def test_class_without_a_readable_image_gives_black_images(clean, tmp_path):
    table = S.load_split(clean, "train")
    dead = np.nonzero(table.labels == 0)[0].tolist()  # all 6 images of class 0
    root = corrupt_copy(clean, tmp_path / "bad", "train", dead)
    with pytest.warns(BadSampleWarning, match="black image"):
        got, loader = run_epoch(root)
    ref, _ = run_epoch(clean)
    assert len(got) == len(ref) and loader.bad_samples == len(dead)
    black = normalize(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)[0]
    for e in loader.pop_bad_events():
        assert e["substitute"] == -1
        x, y = got[e["step"]]
        assert torch.equal(x[e["position"]], black) and y[e["position"]] == 0  # the label is kept


def test_truncated_shard_is_read_to_the_end(clean, tmp_path):
    """A shard cut in half after indexing: every image past the cut is replaced, the epoch completes."""
    root = str(tmp_path / "cut")
    shutil.copytree(clean, root)
    table = S.load_split(root, "train")
    path = table.shard_paths[1]
    cut = os.path.getsize(path) // 2
    os.truncate(path, cut)
    rows = table.samples
    lost = set(np.nonzero((rows["shard"] == 1) & (rows["offset"] + rows["size"] > cut))[0].tolist())
    assert 0 < len(lost) < 10
    with pytest.warns(BadSampleWarning, match="short read"):
        got, loader = run_epoch(root, num_workers=2)
    ref, _ = run_epoch(clean)
    assert [y.tolist() for _, y in got] == [y.tolist() for _, y in ref]
    events = loader.pop_bad_events()
    assert {e["index"] for e in events} == lost and loader.bad_samples == len(lost)
    assert all(e["substitute"] not in lost and table.labels[e["substitute"]] == table.labels[e["index"]]
               for e in events)


# ---------------------------------------------------------------------------- evaluation


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 8))


def test_unreadable_test_image_is_excluded_and_counted(clean, tmp_path):
    root = corrupt_copy(clean, tmp_path / "bad", "test", [3])
    labels = S.load_split(root, "test").labels
    kw = dict(rank=0, world_size=1, batch_size=5, image_size=SIZE, num_workers=0)
    ref_emb, ref_lab = embed_dataset(_model(), build_eval_loader(clean, **kw), device="cpu")
    loader = build_eval_loader(root, **kw)
    with pytest.warns(BadSampleWarning, match="cannot read test sample 3"):
        emb, lab, num_unreadable = embed_dataset(_model(), loader, device="cpu", return_num_unreadable=True)
    keep = torch.arange(len(labels)) != 3
    assert num_unreadable == 1 == loader.bad_samples
    assert torch.equal(lab, ref_lab[keep]) and torch.allclose(emb, ref_emb[keep])
    (event,) = loader.pop_bad_events()
    assert event["index"] == 3 and event["shard"] == "test/shard-000000.tar"
    with pytest.warns(BadSampleWarning):
        metrics = evaluate_model(_model(), build_eval_loader(root, **kw), device="cpu", backend="torch")
    assert metrics["num_unreadable_images"] == 1 and metrics["num_queries"] == len(labels) - 1
    assert "num_unreadable_images" not in evaluate_model(_model(), build_eval_loader(clean, **kw), device="cpu",
                                                         backend="torch")


def test_missing_test_shard_equal_steps_per_rank(clean, tmp_path):
    """The last test shard (samples 10, 11, on rank 1 of 2) is gone: both ranks run every step."""
    root = str(tmp_path / "gone")
    shutil.copytree(clean, root)
    os.remove(S.load_split(root, "test").shard_paths[1])
    seen, counts = [], []
    for rank in range(2):
        loader = build_eval_loader(root, rank=rank, world_size=2, batch_size=4, image_size=SIZE, num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadSampleWarning)
            batches = list(loader)
        assert len(batches) == len(loader) and all(x.shape == (4, 3, SIZE, SIZE) for x, _, _ in batches)
        seen += [i for _, y, idx in batches for i in idx[idx >= 0].tolist()]
        assert all((y[idx < 0] == -1).all() for _, y, idx in batches)
        counts.append(loader.bad_samples)
    assert sorted(seen) == list(range(10)) and counts == [0, 2]


def _eval_worker(rank, world_size, init_method, root, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        loader = build_eval_loader(root, rank=rank, world_size=world_size, batch_size=4, image_size=SIZE,
                                   num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadSampleWarning)
            emb, lab, n = embed_dataset(_model(), loader, device="cpu", group=dist.group.WORLD,
                                        return_num_unreadable=True)
        torch.save({"emb": emb, "lab": lab, "n": n}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_unreadable_count_gathered_over_ranks(clean, tmp_path):
    """2 gloo ranks, one bad image on each: every rank gets the 10 readable embeddings and the count 2."""
    root = corrupt_copy(clean, tmp_path / "bad", "test", [1, 8])
    ref_emb, ref_lab = embed_dataset(
        _model(), build_eval_loader(clean, rank=0, world_size=1, batch_size=4, image_size=SIZE, num_workers=0),
        device="cpu",
    )
    mp.spawn(_eval_worker, args=(2, f"file://{tmp_path / 'rdzv'}", root, str(tmp_path)), nprocs=2, join=True)
    keep = ~torch.isin(torch.arange(len(ref_lab)), torch.tensor([1, 8]))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == 2
        assert torch.equal(got["lab"], ref_lab[keep]) and torch.allclose(got["emb"], ref_emb[keep], atol=1e-6)
