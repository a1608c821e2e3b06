"""The reference sampler (data.sampler=reference): the published RS@k code's epoch.

The law's properties on label sets with the paper splits' class-size histograms
(tests/label_sets.py); its batches and steps per epoch against `published_loop`, a
port of the published loop written independently of rskdist/data/sampler.py (plain
lists, one walk over the classes per batch); the loader's rank split, epoch lengths and
mid-epoch resume on a small shard folder; tools/plan.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from label_sets import paper_labels
from rskdist.config import ignored_settings, load_config, validate
from rskdist.data.loader import build_train_loader
from rskdist.data.sampler import REFERENCE_NOMINAL_EPOCHS, ClassBalancedPlan, ReferencePlan, make_plan
from test_data_stream import SIZE, make_shards

ROOT = Path(__file__).resolve().parents[1]


def published_loop(labels: np.ndarray, class_order, m: int, batch: int) -> list[list[int]]:
    """The published code's epoch with a given class order, as lists of classes per batch.

    Shaped like `TrainDatasetrsk.reshuffle`: a dict of per-class image lists, one pass
    over the class list per batch that takes m images from every class still holding m
    while the batch has room, and a stop at the first pass that cannot fill a batch.
    (Image order within a class does not change which classes a batch takes.)
    """
    images = {}
    for index, label in enumerate(labels.tolist()):
        images.setdefault(label, []).append(index)
    batches = []
    while True:
        taken = []
        for c in class_order:
            if len(images[c]) >= m and len(taken) < batch // m:
                taken.append(c)
                images[c] = images[c][m:]
        if len(taken) < batch // m:
            return batches
        batches.append(taken)


def _classes_of_steps(plan: ReferencePlan, labels: np.ndarray, epoch: int) -> list[tuple[int, ...]]:
    grid = plan.epoch_plan(epoch)
    return [tuple(sorted(labels[step.reshape(-1, plan.m)[:, 0]].tolist())) for step in grid.reshape(len(grid), -1)]


def _plan(labels, batch, m=4, world_size=1, seed=0) -> ReferencePlan:
    return ReferencePlan(labels, m=m, classes_per_rank=batch // m // world_size, world_size=world_size, seed=seed)


# ---------------------------------------------------------------- the law on real-shaped labels


@pytest.mark.parametrize("name,batch,world_size", [("inat", 4000, 8), ("sop", 4000, 8), ("cars196", 392, 2),
                                                   ("cub", 400, 4)])
def test_law_properties_on_paper_label_sets(name, batch, world_size):
    labels = paper_labels(name)
    counts = np.bincount(labels)
    m, num_classes = 4, batch // 4
    plan = _plan(labels, batch, world_size=world_size, seed=1)
    for epoch in (0, 1):
        grid = plan.epoch_plan(epoch)
        assert grid.shape == (plan.epoch_steps(epoch), world_size, num_classes // world_size, m)
        assert (counts[labels[grid]] >= m).all(), "a class smaller than m was drawn"
        flat = grid.reshape(-1)
        assert len(np.unique(flat)) == len(flat), "an image twice in one epoch"
        for step in grid.reshape(len(grid), num_classes, m):
            block_labels = labels[step]
            assert (block_labels == block_labels[:, :1]).all()  # m images of one class per block
            assert len(np.unique(block_labels[:, 0])) == num_classes  # B / m distinct classes
        # The epoch ends where the law says: fewer than B / m classes hold m unused images.
        unused = counts - np.bincount(labels[flat], minlength=len(counts))
        assert (unused >= m).sum() < num_classes
        # ... and no earlier: a class left m unused images while it was not among the step's
        # classes only if the walk had filled the batch before reaching it (checked by
        # test_batches_match_the_published_loop); here, every step was full.


@pytest.mark.parametrize("name,batch", [("cars196", 392), ("cub", 400)])
def test_every_class_in_every_batch_gives_a_constant_epoch(name, batch):
    """A batch of every class: the epoch stops when the smallest class runs out of groups of m."""
    labels = paper_labels(name)
    plan = _plan(labels, batch)
    expected = np.bincount(labels).min() // 4
    assert {plan.epoch_steps(e) for e in range(20)} == {expected}
    assert plan.steps_per_epoch == expected and isinstance(plan.steps_per_epoch, int)


def test_epoch_length_varies_and_the_nominal_is_its_mean():
    """iNaturalist-like labels at B = 4000: the length depends on the class order; the
    trainer's steps_per_epoch is the mean of the first REFERENCE_NOMINAL_EPOCHS."""
    plan = _plan(paper_labels("inat"), 4000)
    lengths = [plan.epoch_steps(e) for e in range(REFERENCE_NOMINAL_EPOCHS)]
    assert len(set(lengths)) > 1
    assert plan.steps_per_epoch == pytest.approx(np.mean(lengths))
    assert max(lengths) * 4000 < len(paper_labels("inat"))  # shorter than images / batch


# ---------------------------------------------------------------- against the published loop


LABEL_SETS = {
    "sop": lambda: paper_labels("sop"),
    "cub": lambda: paper_labels("cub"),
    "long_tail": lambda: np.repeat(np.arange(300), np.random.default_rng(5).zipf(1.6, 300).clip(1, 200)),
    "uniform": lambda: np.random.default_rng(6).integers(0, 120, 3000),
}


@pytest.mark.parametrize("name,batch,m", [("sop", 4000, 4), ("sop", 1000, 4), ("cub", 400, 4), ("cub", 120, 4),
                                          ("long_tail", 64, 4), ("long_tail", 160, 2), ("uniform", 96, 4),
                                          ("uniform", 240, 3)])
@pytest.mark.parametrize("seed", [0, 3])
def test_batches_match_the_published_loop(name, batch, m, seed):
    """Same class order -> the same number of batches, holding the same classes (up to the
    final shuffle of the batches)."""
    labels = LABEL_SETS[name]()
    plan = ReferencePlan(labels, m=m, classes_per_rank=batch // m, world_size=1, seed=seed)
    for epoch in (0, 1):
        expected = published_loop(labels, np.unique(labels)[plan.class_order(epoch)].tolist(), m, batch)
        assert plan.epoch_steps(epoch) == len(expected) > 0
        assert Counter(_classes_of_steps(plan, labels, epoch)) == Counter(tuple(sorted(b)) for b in expected)


def test_steps_match_the_published_loop_on_inaturalist():
    labels = paper_labels("inat")
    for batch in (4000, 16384):
        plan = _plan(labels, batch, seed=2)
        assert plan.epoch_steps(0) == len(published_loop(labels, plan.class_order(0).tolist(), 4, batch))


def test_refusals():
    labels = np.repeat(np.arange(6), [8, 8, 8, 3, 3, 3])
    with pytest.raises(ValueError, match="needs 4 classes of at least m=4 images .* has 3"):
        ReferencePlan(labels, m=4, classes_per_rank=4, world_size=1)  # 4 classes per batch, 3 big enough
    with pytest.raises(ValueError, match="remainder='drop'"):
        make_plan("reference", labels, m=4, classes_per_rank=2, world_size=1, remainder="drop")
    with pytest.raises(ValueError, match="steps_per_epoch='dataset'"):
        make_plan("reference", labels, m=4, classes_per_rank=2, world_size=1, steps_per_epoch="dataset")
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_plan("published", labels, m=4, classes_per_rank=2, world_size=1)
    assert isinstance(make_plan("balanced", labels, m=4, classes_per_rank=2, world_size=1), ClassBalancedPlan)


def test_config_key_and_its_refusals():
    validate(load_config(None, ["data.sampler=reference"]), world_size=1)
    assert load_config(None).data.sampler == "balanced"
    for override, key in (("data.remainder=stochastic", "data.remainder"), ("data.epoch_length=dataset",
                                                                             "data.epoch_length")):
        with pytest.raises(ValueError, match=f"cannot honour {key}=.*remove {key} or use data.sampler=balanced"):
            validate(load_config(None, ["data.sampler=reference", override]), world_size=1)
    with pytest.raises(ValueError, match="data.sampler='fixed' is not one of 'balanced', 'reference'"):
        load_config(None, ["data.sampler=fixed"])
    # The synthetic stream draws its own classes: the sampler is named among the settings it ignores.
    assert ignored_settings(load_config(None, ["data.sampler=reference"])) == ["data.sampler"]


# ---------------------------------------------------------------- through the loader

COUNTS = [2, 3, 5, 7, 9, 4, 11, 6, 3, 8, 1, 5]  # m = 2, 4 classes per step: epochs of 5-7 steps
SEED = 1  # epochs 0 and 1 have different lengths with this seed (asserted below)


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("varied"), COUNTS, samples_per_shard=9)


def _loader(root, rank, world_size=2, **kw):
    return build_train_loader(root, rank=rank, world_size=world_size, classes_per_rank=4 // world_size, m=2,
                              image_size=SIZE, num_workers=0, seed=SEED, sampler="reference", **kw)


def test_loader_epochs_follow_the_plan_on_every_rank(varied):
    loaders = [_loader(varied, rank) for rank in range(2)]
    plan = loaders[0].plan
    assert plan.epoch_steps(0) != plan.epoch_steps(1)
    labels_all = np.repeat(np.arange(len(COUNTS)), COUNTS)
    for epoch in (0, 1):
        per_rank = [[y for _, y in loader] for loader in loaders]  # one epoch each
        assert [len(batches) for batches in per_rank] == [plan.epoch_steps(epoch)] * 2
        assert all(loader.state_dict()["epoch"] == epoch + 1 for loader in loaders)
        for step in range(plan.epoch_steps(epoch)):
            gathered = torch.cat([per_rank[rank][step] for rank in range(2)]).view(-1, 2)
            assert (gathered == gathered[:, :1]).all() and len(set(gathered[:, 0].tolist())) == 4
            expected = labels_all[plan.epoch_plan(epoch)[step]].reshape(-1)
            np.testing.assert_array_equal(gathered.reshape(-1).numpy(), expected)
    assert loaders[0].steps_per_epoch == plan.steps_per_epoch  # the nominal, for the trainer's schedule
    for loader in loaders:
        loader.close()


def _take(loader, n: int) -> list:
    """The next n batches of `loader`, across epochs (each iteration runs to its epoch's end)."""
    got = []
    while len(got) < n:
        before = len(got)
        for batch in loader:
            got.append(batch)
            if len(got) == n:
                break
        assert len(got) > before, "an epoch without batches"
    return got


@pytest.mark.parametrize("stop", [(0, 3), (1, 2)])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(varied, stop):
    uninterrupted = _loader(varied, 1)
    expected = [(x, y) for epoch in range(3) for x, y in uninterrupted]  # three epochs end to end
    uninterrupted.close()

    first = _loader(varied, 1, read_size=3)
    got = _take(first, sum(first.plan.epoch_steps(e) for e in range(stop[0])) + stop[1])
    state = first.state_dict()
    assert (state["epoch"], state["step"], state["sampler"]) == (*stop, "reference")
    first.close()

    resumed = _loader(varied, 1)
    resumed.load_state_dict(state)
    got += _take(resumed, len(expected) - len(got))
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["step"] == 0
    for (x, y), (xe, ye) in zip(got, expected, strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    resumed.close()


def test_resume_refuses_another_sampler(varied):
    reference = _loader(varied, 0)
    balanced = build_train_loader(varied, rank=0, world_size=2, classes_per_rank=2, m=2, image_size=SIZE,
                                  num_workers=0, seed=SEED)
    with pytest.raises(ValueError, match="sampler=balanced in the checkpoint but reference now"):
        reference.load_state_dict(balanced.state_dict())
    old = {k: v for k, v in balanced.state_dict().items() if k != "sampler"}  # written before the key existed
    with pytest.raises(ValueError, match="sampler"):
        reference.load_state_dict(old)
    balanced.load_state_dict(old)


# ---------------------------------------------------------------- tools/plan.py


def _plan_tool(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_plan_tool_on_a_label_file(tmp_path):
    labels = LABEL_SETS["long_tail"]()
    np.save(tmp_path / "labels.npy", labels)
    lines = _plan_tool("--labels", str(tmp_path / "labels.npy"), "--global-batch", "64", "--m", "4", "--sampler",
                       "reference", "--seed", "3", "--epochs", "3")
    plan = ReferencePlan(labels, m=4, classes_per_rank=16, world_size=1, seed=3)
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    for r in lines:
        shown = plan.epoch_plan(r["epoch"]).reshape(-1)
        assert r["steps"] == plan.epoch_steps(r["epoch"]) and r["shown"] == r["steps"] * 64
        assert r["images"] == len(np.unique(shown)) == r["shown"] and r["repeats"] == 0
        assert r["classes"] == len(np.unique(labels[shown]))
        assert (r["sampler"], r["global_batch"], r["m"], r["seed"]) == ("reference", 64, 4, 3)
        assert r["steps_per_epoch"] == plan.steps_per_epoch
    balanced = _plan_tool("--labels", str(tmp_path / "labels.npy"), "--global-batch", "64", "--epochs", "2",
                          "--summary")
    assert len(balanced) == 1 and balanced[0]["epochs"] == 2 and balanced[0]["sampler"] == "balanced"
    assert balanced[0]["steps_min"] == ClassBalancedPlan(labels, m=4, classes_per_rank=16, world_size=1).steps_per_epoch


def test_plan_tool_reads_a_configs_shards(varied, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{seed: {SEED}}}\ndata: {{source: shards, root: {varied}, global_batch: 8, m: 2, "
                      f"sampler: reference}}\n")
    lines = _plan_tool("--config", str(config), "--epochs", "2")
    plan = _loader(varied, 0, world_size=1).plan
    assert [r["steps"] for r in lines] == [plan.epoch_steps(0), plan.epoch_steps(1)]
    assert lines[0]["images"] == plan.epoch_steps(0) * 8 and lines[0]["seed"] == SEED
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(config),
                           "data.remainder=drop", "--sampler", "reference", "--remainder", "drop"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "remainder='drop'" in proc.stderr
