"""The in-memory synthetic streams keep the shard loaders' contract."""

import torch

from rskdist.data.synthetic_stream import SyntheticEvalStream, SyntheticTrainStream


def test_train_batches_are_class_balanced_and_disjoint_across_ranks():
    streams = [SyntheticTrainStream(num_classes=40, rank=r, world_size=2, classes_per_rank=5, m=4, image_size=8,
                                    seed=1) for r in range(2)]
    batches = [s.batch(3) for s in streams]
    for images, labels in batches:
        assert images.shape == (20, 3, 8, 8)
        assert sorted(torch.bincount(labels)[torch.bincount(labels) > 0].tolist()) == [4] * 5
    assert not set(batches[0][1].tolist()) & set(batches[1][1].tolist())
    # Resume: the position alone decides the next batch.
    fresh = SyntheticTrainStream(num_classes=40, rank=0, world_size=2, classes_per_rank=5, m=4, image_size=8, seed=1)
    fresh.load_state_dict({"step": 3})
    images, labels = next(iter(fresh))
    assert torch.equal(images, batches[0][0]) and torch.equal(labels, batches[0][1])


def test_train_global_batch_holds_no_copies():
    """Like the shard sampler (docs/data.md): no image twice in a global batch, so no query
    has a copy of itself as a positive. Here every position is rendered with its own noise."""
    images = torch.cat([SyntheticTrainStream(num_classes=12, rank=r, world_size=2, classes_per_rank=3, m=4,
                                             image_size=8, seed=2).batch(0)[0] for r in range(2)])
    flat = images.reshape(len(images), -1)
    same = (flat[:, None] == flat[None, :]).all(-1)
    assert same.sum() == len(images)  # each image equals only itself


def test_eval_set_is_the_same_for_any_world_size():
    def gather(world):
        out = {}
        for rank in range(world):
            stream = SyntheticEvalStream(num_train_classes=10, size=24, rank=rank, world_size=world, batch_size=5,
                                         image_size=8, seed=0)
            for images, labels, index in stream:
                for img, lab, i in zip(images, labels, index.tolist()):
                    if i >= 0:
                        assert i not in out
                        out[i] = (img, int(lab))
        return out

    one, three = gather(1), gather(3)
    assert sorted(one) == sorted(three) == list(range(24))
    for i in range(24):
        assert torch.equal(one[i][0], three[i][0]) and one[i][1] == three[i][1]
