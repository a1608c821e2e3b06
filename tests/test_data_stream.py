"""Training/evaluation streams: class balance over ranks, equal step counts, coverage, resume."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from rskdist.data import shards as S
from rskdist.data.loader import build_eval_loader, build_train_loader
from rskdist.data.sampler import ClassBalancedPlan
from rskdist.data.sources import Item, Listing
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.data.transforms import decode_eval, decode_train, normalize, random_resized_crop_params
from rskdist.data.writer import write_shards
from rskdist.loss import simix_plan

SIZE = 16  # tiny images keep decoding cheap


def make_shards(root, counts, samples_per_shard=10, image_size=20, test_counts=(3, 2, 4),
                test_splits=("test",)) -> str:
    """Shards of generated JPEGs with the given images per class (train) and test_counts in each
    split of test_splits (every split with classes of its own)."""
    listing = Listing("demo")
    offset = 0
    for split, cnts in (("train", counts), *((name, test_counts) for name in test_splits)):
        names = [f"c{offset + c}" for c in range(len(cnts))]
        items = [
            Item(c, names[c], f"{offset + c:03d}_{k:03d}", None, (0, (offset + c) % 700, k, image_size))
            for c, n in enumerate(cnts)
            for k in range(n)
        ]
        listing.classes[split], listing.items[split] = names, items
        offset += len(cnts)
    write_shards(listing, str(root), samples_per_shard=samples_per_shard, num_workers=1, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """47 training samples in 5 shards (10+10+10+10+7), 10 classes of 3..7 images."""
    counts = [3, 4, 5, 6, 4, 5, 7, 4, 5, 4]
    assert sum(counts) == 47
    return make_shards(tmp_path_factory.mktemp("uneven"), counts), counts


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """16 classes x 4 images: with m=2 or 4 and 8 classes per step, each image exactly once."""
    return make_shards(tmp_path_factory.mktemp("even"), [4] * 16, samples_per_shard=7, test_counts=(5,) * 5)


def _epoch(root, world_size, num_workers, classes_per_rank=2, m=2, seed=0, **kw):
    """All ranks' batches of one epoch: list over ranks of [(images, labels)]."""
    out = []
    for rank in range(world_size):
        loader = build_train_loader(
            root, rank=rank, world_size=world_size, classes_per_rank=classes_per_rank, m=m,
            image_size=SIZE, num_workers=num_workers, seed=seed, **kw,
        )
        batches = [(x, y, loader.plan.rank_batch(0, s, rank)) for s, (x, y) in enumerate(loader)]
        assert len(batches) == loader.steps_per_epoch == len(loader)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0
        loader.close()
        out.append(batches)
    return out


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_plan_m_per_class_and_disjoint_ranks(world_size, m):
    rng = np.random.default_rng(world_size * 10 + m)
    labels = rng.integers(0, 40, 600)
    for remainder in ("topup", "drop", "stochastic"):
        plan = ClassBalancedPlan(labels, m=m, classes_per_rank=3, world_size=world_size, seed=1, remainder=remainder)
        for epoch in (0, 1):
            grid = plan.epoch_plan(epoch)  # [S, W, cpr, m]
            assert grid.shape == (plan.steps_per_epoch, world_size, 3, m)
            lab = labels[grid]
            assert (lab == lab[..., :1]).all()  # m images of one class per block
            for step_labels in lab[..., 0]:
                assert len(np.unique(step_labels)) == world_size * 3  # a class on one rank, once
            for step in grid.reshape(len(grid), -1):
                assert len(np.unique(step)) == step.size  # no image twice in a global batch


SMALL_COUNTS = [1, 2, 3, 1, 2, 3, 1, 2, 3, 5, 6, 7, 9, 4, 8, 1, 2, 3]  # m=4: classes of 1, 2, 3 images


def _assert_no_copies_in_a_step(grid, labels, m):
    """Every global batch holds distinct images; no query can meet a copy of itself."""
    for step in grid.reshape(len(grid), -1, m):  # [K, m] blocks of the gathered batch
        idx = step.reshape(-1)
        assert (idx >= 0).all()
        assert len(np.unique(idx)) == idx.size, "an image twice in one global batch"
        lab = labels[idx]
        # As the loss sees it: the positives of query q are the other positions with q's label.
        same = (lab[:, None] == lab[None, :]) & ~np.eye(idx.size, dtype=bool)
        assert not (same & (idx[:, None] == idx[None, :])).any()
        # SiMix mixes two positions of one class: never an image with itself.
        pairs, _ = simix_plan(torch.from_numpy(lab), generator=torch.Generator().manual_seed(0))
        assert (idx[pairs[:, 0].numpy()] != idx[pairs[:, 1].numpy()]).all()
        # Block = one class's min(n, m) images first, then singles of classes absent from the step.
        counts = np.bincount(labels)
        block_class = lab.reshape(-1, m)[:, 0]
        assert len(np.unique(block_class)) == len(block_class)  # a class in one block, on one rank
        fillers = np.concatenate([lab.reshape(-1, m)[j, min(counts[c], m):] for j, c in enumerate(block_class)])
        for j, c in enumerate(block_class):
            assert (lab.reshape(-1, m)[j, : min(counts[c], m)] == c).all()
        # Fillers: one image per class absent from the step, so a filler has no positive.
        assert not np.isin(fillers, block_class).any() and len(np.unique(fillers)) == len(fillers)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("steps", [None, "dataset", 9])
@pytest.mark.parametrize("remainder", ["topup", "drop", "stochastic"])
def test_plan_small_classes_never_repeat_an_image(world_size, steps, remainder):
    """Classes of 1, 2, 3 images with m=4: no [i, i, i, i] groups, no image twice in a step."""
    labels = np.repeat(np.arange(len(SMALL_COUNTS)), SMALL_COUNTS)
    cpr = {1: 4, 2: 2, 4: 1}[world_size]  # 4 classes per global batch, 18 classes in the split
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=cpr, world_size=world_size, seed=3,
                             remainder=remainder, steps_per_epoch=steps)
    again = ClassBalancedPlan(labels, m=4, classes_per_rank=cpr, world_size=world_size, seed=3,
                              remainder=remainder, steps_per_epoch=steps)
    shown = np.zeros(len(labels), int)
    for epoch in range(4):
        grid = plan.epoch_plan(epoch)
        assert grid.shape == (plan.steps_per_epoch, world_size, cpr, 4)  # equal steps on every rank
        np.testing.assert_array_equal(grid, again.epoch_plan(epoch))  # deterministic
        _assert_no_copies_in_a_step(grid, labels, 4)
        shown += np.bincount(grid.reshape(-1), minlength=len(labels))
    small = np.isin(labels, np.nonzero(np.array(SMALL_COUNTS) < 4)[0])
    assert shown[small].min() > 0  # the small classes' images are still shown


def test_plan_small_classes_fill_when_no_class_is_absent():
    """A step holding every class (Cars196/CUB regime) fills holes with other images, still distinct."""
    counts = [1, 2, 3, 8, 8, 9]
    labels = np.repeat(np.arange(6), counts)
    for world_size, cpr in ((1, 6), (2, 3)):
        plan = ClassBalancedPlan(labels, m=4, classes_per_rank=cpr, world_size=world_size, steps_per_epoch=5)
        for epoch in range(3):
            grid = plan.epoch_plan(epoch).reshape(5, -1)
            assert all(len(np.unique(step)) == step.size and step.min() >= 0 for step in grid)


def test_plan_rejects_batch_larger_than_split():
    with pytest.raises(ValueError, match="distinct images"):
        ClassBalancedPlan(np.repeat(np.arange(4), [1, 2, 3, 5]), m=4, classes_per_rank=2, world_size=2)


def test_stream_small_classes_distinct_images(tmp_path):
    """The real loader on shards with classes of 1-3 images: every global batch has distinct images."""
    root = make_shards(tmp_path / "small", SMALL_COUNTS, samples_per_shard=16)
    table = S.load_split(root, "train")
    for world_size, cpr in ((1, 4), (2, 2), (4, 1)):
        ranks = _epoch(root, world_size, 0, classes_per_rank=cpr, m=4, remainder="stochastic",
                       steps_per_epoch="dataset")
        for step in range(len(ranks[0])):
            idx = np.concatenate([ranks[r][step][2] for r in range(world_size)])
            labels = torch.cat([ranks[r][step][1] for r in range(world_size)])
            np.testing.assert_array_equal(labels.numpy(), table.labels[idx])
            _assert_no_copies_in_a_step(idx[None], table.labels, 4)


def test_plan_every_image_once_when_counts_fit():
    labels = np.repeat(np.arange(12), 8)  # 12 classes x 8, m=4 -> 24 groups, 6 per step
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=3, world_size=2, seed=3)
    assert plan.steps_per_epoch == 4
    for epoch in range(3):
        assert sorted(plan.epoch_plan(epoch).reshape(-1).tolist()) == list(range(96))


def test_plan_duplicates_only_from_topups():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 25, 300)
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=2, world_size=2, seed=0)
    counts = np.bincount(labels)
    topup_slots = int(((4 - counts % 4) % 4).sum())
    seen = Counter(plan.epoch_plan(0).reshape(-1).tolist())
    assert sum(c - 1 for c in seen.values()) <= topup_slots
    # Nearly every image is seen (only the few groups beyond S*K are held over).
    assert len(seen) >= len(labels) - plan.slots * 4


def test_plan_stochastic_remainder_unbiased():
    """remainder='stochastic': each image shown once per epoch on average, no class favoured."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(30), rng.integers(1, 12, 30))  # sizes 1..11, m=4: most not multiples
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=5, world_size=2, seed=0, remainder="stochastic")
    shown = np.zeros(len(labels))
    epochs = 300
    for epoch in range(epochs):
        grid = plan.epoch_plan(epoch)
        assert grid.shape[0] == plan.steps_per_epoch
        shown += np.bincount(grid.reshape(-1), minlength=len(labels))
    per_image = shown / epochs
    assert abs(per_image.mean() - plan.images_per_epoch / len(labels)) < 1e-9
    assert abs(per_image.mean() - 1.0) < 0.15  # the epoch is about the dataset
    per_class = np.bincount(labels, weights=per_image) / np.bincount(labels)
    assert per_class.min() > 0.6 and per_class.max() < 1.4, per_class


def test_plan_large_classes_capped_at_one_slot_per_step():
    counts = np.array([400] + [4] * 30)  # one class far larger than an epoch can show
    labels = np.repeat(np.arange(len(counts)), counts)
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=4, world_size=2, seed=0)
    grid = plan.epoch_plan(0)
    lab = labels[grid][..., 0].reshape(plan.steps_per_epoch, -1)
    assert all(len(set(row)) == row.size for row in lab)
    assert (lab == 0).sum() == plan.steps_per_epoch  # class 0 in every step, once


@pytest.mark.parametrize("steps", [1, 5, 40, "dataset"])
def test_plan_fixed_steps_per_epoch(steps):
    """Cars196/CUB regime: every class in every step (K = all classes), epoch = N / batch."""
    rng = np.random.default_rng(1)
    counts = rng.integers(6, 30, 12)  # 12 classes of 6..29 images
    labels = np.repeat(np.arange(12), counts)
    for world_size, cpr in ((2, 6), (4, 2)):
        plan = ClassBalancedPlan(labels, m=4, classes_per_rank=cpr, world_size=world_size, seed=2,
                                 steps_per_epoch=steps)
        expected = round(len(labels) / (world_size * cpr * 4)) if steps == "dataset" else steps
        assert plan.steps_per_epoch == expected
        grid = plan.epoch_plan(0)
        assert grid.shape == (expected, world_size, cpr, 4)
        lab = labels[grid]
        assert (lab == lab[..., :1]).all()
        for step_labels in lab[..., 0]:
            assert len(np.unique(step_labels)) == world_size * cpr
        for block in grid.reshape(-1, 4):
            assert len(set(block)) == 4  # every class has >= m images: no repeat inside a group
        if world_size * cpr == 12:
            assert all(set(row.reshape(-1)) == set(range(12)) for row in lab[..., 0])
        if plan.groups.max() <= expected and plan.groups.sum() <= expected * plan.slots:
            assert len(np.unique(grid)) == len(labels)  # room for every group: every image seen


def test_plan_deterministic_and_epoch_dependent():
    labels = np.repeat(np.arange(20), 6)
    a = ClassBalancedPlan(labels, m=2, classes_per_rank=2, world_size=2, seed=5)
    b = ClassBalancedPlan(labels, m=2, classes_per_rank=2, world_size=2, seed=5)
    c = ClassBalancedPlan(labels, m=2, classes_per_rank=2, world_size=2, seed=6)
    np.testing.assert_array_equal(a.epoch_plan(3), b.epoch_plan(3))
    assert not np.array_equal(a.epoch_plan(3), a.epoch_plan(4))
    assert not np.array_equal(a.epoch_plan(3), c.epoch_plan(3))


def test_plan_rejects_too_many_classes_per_step():
    with pytest.raises(ValueError, match="distinct classes"):
        ClassBalancedPlan(np.arange(10) % 5, m=2, classes_per_rank=3, world_size=2)


def test_plan_scales_to_inaturalist_size():
    rng = np.random.default_rng(0)
    counts = np.clip(rng.lognormal(3.5, 1.0, 5690).astype(int), 2, 1000)
    labels = np.repeat(np.arange(5690), counts)
    plan = ClassBalancedPlan(labels, m=4, classes_per_rank=125, world_size=8)  # global batch 4000
    grid = plan.epoch_plan(0)
    assert grid.shape[1:] == (8, 125, 4)
    assert len(np.unique(grid)) > 0.9 * len(labels)


# ---------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_stream_m_per_class_and_disjoint(uneven, world_size, num_workers):
    root, counts = uneven
    ranks = _epoch(root, world_size, num_workers, classes_per_rank=1 if world_size == 4 else 2)
    num_steps = len(ranks[0])
    table = S.load_split(root, "train")
    for step in range(num_steps):
        step_classes = []
        for batches in ranks:
            x, y, idx = batches[step]
            assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE)
            assert y.dtype == torch.int64 and len(y) == len(x)
            assert (y.view(-1, 2) == y.view(-1, 2)[:, :1]).all()  # blocks of m=2
            np.testing.assert_array_equal(y.numpy(), table.labels[idx])
            step_classes += y.view(-1, 2)[:, 0].tolist()
        assert len(step_classes) == len(set(step_classes))  # each class on one rank only


def test_equal_steps_with_uneven_shards(uneven):
    """47 samples in 5 shards on 2 ranks: both ranks run the same number of steps."""
    root, _ = uneven
    index = S.load_index(root)
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [10, 10, 10, 10, 7]
    ranks = _epoch(root, 2, 2, classes_per_rank=2, m=2)
    assert len(ranks[0]) == len(ranks[1]) > 0
    for cpr, m in [(1, 2), (3, 2), (2, 4), (1, 3)]:
        steps = {
            build_train_loader(root, rank=r, world_size=2, classes_per_rank=cpr, m=m, image_size=SIZE,
                               num_workers=0).steps_per_epoch
            for r in range(2)
        }
        assert len(steps) == 1


def test_every_image_once_per_epoch(even):
    ranks = _epoch(even, 2, 2, classes_per_rank=4, m=4)
    seen = [i for batches in ranks for _, _, idx in batches for i in idx.tolist()]
    assert sorted(seen) == list(range(64))


def test_batches_independent_of_workers_and_match_direct_decode(uneven):
    root, _ = uneven
    a = _epoch(root, 2, 0)
    b = _epoch(root, 2, 2)
    for ra, rb in zip(a, b):
        for (xa, ya, _), (xb, yb, _) in zip(ra, rb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The first image of rank 1, step 0 is the documented function of its position.
    table = S.load_split(root, "train")
    idx = a[1][0][2][0]
    row = table.samples[idx]
    data = S.ShardReader(table.shard_paths).read(int(row["shard"]), int(row["offset"]), int(row["size"]))
    # (seed, epoch, step, place in the global batch): rank 1's first image is the 5th (4 images a rank).
    ref = decode_train(data, SIZE, np.random.default_rng([0, 0, 0, 4]))
    expected = normalize(torch.from_numpy(ref[None].copy()), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(a[1][0][0][:1], expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_same_next_batch(uneven, num_workers):
    root, _ = uneven
    kw = dict(rank=1, world_size=2, classes_per_rank=2, m=2, image_size=SIZE, seed=7, read_size=3)
    loader = build_train_loader(root, num_workers=num_workers, **kw)
    loader.load_state_dict({**loader.state_dict(), "epoch": 2, "step": 0})
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (2, 2)
    x_next, y_next = next(it)
    del it
    loader.close()

    resumed = build_train_loader(root, num_workers=2 - num_workers, **{**kw, "read_size": 2})
    resumed.load_state_dict(state)
    x, y = next(iter(resumed))
    assert torch.equal(x, x_next) and torch.equal(y, y_next)
    resumed.close()


def test_epoch_rollover_and_rewind(uneven):
    root, _ = uneven
    loader = build_train_loader(root, rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0)
    first = [y for _, y in loader]
    assert loader.state_dict()["epoch"] == 1
    second = [y for _, y in loader]
    assert len(first) == len(second) and any(not torch.equal(a, b) for a, b in zip(first, second))
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
    again = [y for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_resume_rejects_changed_plan(uneven):
    root, _ = uneven
    a = build_train_loader(root, rank=0, world_size=2, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0)
    b = build_train_loader(root, rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0)
    with pytest.raises(ValueError, match="global_classes=4 in the checkpoint but 2 now"):  # another global batch
        b.load_state_dict(a.state_dict())


def test_bad_arguments(uneven, tmp_path):
    root, _ = uneven
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(root, rank=2, world_size=2, classes_per_rank=1, image_size=SIZE, num_workers=0)
    with pytest.raises(ValueError, match="distinct classes"):
        build_train_loader(root, rank=0, world_size=4, classes_per_rank=3, image_size=SIZE, num_workers=0)
    with pytest.raises(FileNotFoundError, match="make_shards"):
        build_train_loader(str(tmp_path), rank=0, world_size=1, classes_per_rank=1, num_workers=0)


def test_shards_without_sample_table(uneven, tmp_path):
    """Shards from elsewhere (no samples.npy): offsets are rebuilt from the tar headers."""
    root, _ = uneven
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(os.path.join(copy, "train", S.SAMPLES_FILE))
    a = build_train_loader(root, rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0)
    b = build_train_loader(copy, rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0)
    (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 0), (4, 1)])
def test_eval_every_image_once_stable_order(even, world_size, num_workers):
    table = S.load_split(even, "test")
    n = len(table)  # 25
    steps, all_index, images = set(), [], {}
    for rank in range(world_size):
        loader = build_eval_loader(even, rank=rank, world_size=world_size, batch_size=4, image_size=SIZE,
                                   num_workers=num_workers)
        count = 0
        for x, y, idx in loader:
            assert x.shape == (4, 3, SIZE, SIZE) and y.shape == idx.shape == (4,)
            keep = idx >= 0
            assert (y[~keep] == -1).all()
            np.testing.assert_array_equal(y[keep].numpy(), table.labels[idx[keep].numpy()])
            all_index += idx[keep].tolist()
            for i, img in zip(idx[keep].tolist(), x[keep]):
                images[i] = img
            count += 1
        steps.add(count)
        loader.close()
    assert len(steps) == 1  # equal step counts on every rank
    assert sorted(all_index) == list(range(n))  # every image exactly once
    # Deterministic: same image tensor whatever the rank layout.
    single = build_eval_loader(even, rank=0, world_size=1, batch_size=25, image_size=SIZE, num_workers=0)
    x, _, idx = next(iter(single))
    for i in range(n):
        assert torch.equal(images[i], x[i])


def test_eval_more_ranks_than_images(even):
    loaders = [build_eval_loader(even, rank=r, world_size=30, batch_size=2, image_size=SIZE, num_workers=0)
               for r in range(30)]
    assert {len(loader) for loader in loaders} == {1}
    got = sorted(i for loader in loaders for _, _, idx in loader for i in idx.tolist() if i >= 0)
    assert got == list(range(25))


# ---------------------------------------------------------------------------- transforms


def test_random_resized_crop_params_in_bounds():
    rng = np.random.default_rng(0)
    for w, h in [(100, 60), (20, 200), (7, 7), (500, 375)]:
        for _ in range(50):
            left, top, cw, ch = random_resized_crop_params(w, h, rng)
            assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h and cw > 0 and ch > 0


def test_decode_eval_resize_center_crop():
    import io

    from PIL import Image

    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, 50:70] = 255  # a white vertical band in the centre
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_eval(buf.getvalue(), 32)  # resize short side to 37, crop 32 from the middle
    assert out.shape == (3, 32, 32)
    assert out[:, :, 16].min() > 200 and out[:, :, 0].max() < 50


def test_decode_train_large_jpeg_uses_draft():
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (800, 600, 3), dtype=np.uint8)).save(buf, format="JPEG")
    out = decode_train(buf.getvalue(), 32, np.random.default_rng(1), scale=(1.0, 1.0))
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8


def test_break_and_continue_with_persistent_workers(uneven):
    """Leaving the loop early (prefetched chunks in flight) and iterating again continues in place."""
    root, _ = uneven
    kw = dict(rank=0, world_size=2, classes_per_rank=2, m=2, image_size=SIZE, read_size=1)
    ref = list(build_train_loader(root, num_workers=0, **kw))
    loader = build_train_loader(root, num_workers=2, **kw)
    got = []
    for batch in loader:
        got.append(batch)
        break
    got += list(loader)
    assert len(got) == len(ref)
    for (xa, ya), (xb, yb) in zip(got, ref):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.close()


def test_device_option_matches_host_normalisation(uneven):
    root, _ = uneven
    kw = dict(rank=0, world_size=1, classes_per_rank=2, m=2, image_size=SIZE, num_workers=0, read_size=3)
    (xa, ya), (xb, yb) = next(iter(build_train_loader(root, **kw))), next(iter(build_train_loader(root, device="cpu", **kw)))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y, i = next(iter(build_eval_loader(root, rank=0, world_size=1, batch_size=5, image_size=SIZE, num_workers=0,
                                          device="cpu")))
    assert x.shape == (5, 3, SIZE, SIZE) and i.tolist() == [0, 1, 2, 3, 4]


def test_flip_and_aspect_settings_reach_the_decoder(uneven):
    root, _ = uneven
    on = _epoch(root, 1, 0)[0]
    off = _epoch(root, 1, 0, hflip=False)[0]
    flipped = 0
    for (x_on, _, _), (x_off, _, _) in zip(on, off):
        for a, b in zip(x_on, x_off):
            if torch.equal(a, b):
                continue
            assert torch.equal(a, b.flip(-1))  # the same crop; only the flip was left out
            flipped += 1
    assert flipped > 0  # with the flip on, some images were mirrored
    rng = np.random.default_rng(3)
    for _ in range(20):
        _, _, w, h = random_resized_crop_params(300, 200, rng, scale=(0.1, 1.0), ratio=(1.0, 1.0))
        assert w == h  # crop_ratio [1, 1] keeps the aspect
    jpeg = S.ShardReader(S.load_split(root, "train").shard_paths)
    row = S.load_split(root, "train").samples[0]
    data = jpeg.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
    wide = [decode_train(data, SIZE, np.random.default_rng(s), ratio=(2.0, 2.0), hflip=False) for s in range(3)]
    narrow = [decode_train(data, SIZE, np.random.default_rng(s), ratio=(0.5, 0.5), hflip=False) for s in range(3)]
    assert not all(np.array_equal(a, b) for a, b in zip(wide, narrow))


def _worker_processes():
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


def test_closing_an_eval_loader_stops_its_workers_at_once(even):
    import psutil

    before = {p.pid for p in _worker_processes()}
    loader = build_eval_loader(even, rank=0, world_size=1, batch_size=5, image_size=SIZE, num_workers=2)
    assert sum(int((index >= 0).sum()) for _, _, index in loader) == 25
    workers = [p for p in _worker_processes() if p.pid not in before]
    assert len(workers) == 2  # persistent: alive after the pass
    loader.close()
    _, alive = psutil.wait_procs(workers, timeout=2)
    assert not alive  # stopped by close() itself (left alone they linger for seconds)


def test_evaluation_during_training_leaves_no_workers(even):
    """The trainer's Validator closes each evaluation's stream: workers it left alive would be
    inherited by the next ones forked, which fail to stop them ("can only test a child process")."""
    import psutil

    from rskdist.config import load_config
    from test_eval_splits import make_validator

    cfg = load_config("configs/debug.yaml", ["data.source=shards", f"data.root={even}", "data.num_workers=2",
                                             f"model.image_size={SIZE}", "eval.batch_size=5"])
    validator = make_validator(cfg)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 8))
    before = {p.pid for p in _worker_processes()}
    metrics = validator.evaluate(model, torch.float32)
    assert metrics["num_queries"] == 25
    _, alive = psutil.wait_procs([p for p in _worker_processes() if p.pid not in before], timeout=2)
    assert not alive
