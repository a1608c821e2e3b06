"""The training stream under real gloo processes: equal step counts (no hang on uneven
shards) and a gathered global batch with exactly m images per class, every step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.data.loader import build_eval_loader, build_train_loader
from test_data_stream import make_shards


def _worker(rank: int, world_size: int, init_method: str, root: str, out_dir: str, sampler: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        loader = build_train_loader(root, rank=rank, world_size=world_size, classes_per_rank=2, m=2,
                                    image_size=16, num_workers=1, seed=3, sampler=sampler)
        steps = 0
        for _ in range(2):  # one epoch a pass; with sampler=reference, epochs of 4 and 5 steps
            for _, labels in loader:
                gathered = [torch.empty_like(labels) for _ in range(world_size)]
                dist.all_gather(gathered, labels)  # would hang if a rank ran fewer steps
                counts = torch.bincount(torch.cat(gathered))
                assert set(counts[counts > 0].tolist()) == {2}, counts  # m=2 per class, globally
                steps += 1
        loader.close()
        # Evaluation: the gathered, de-padded indices are every test image once.
        ev = build_eval_loader(root, rank=rank, world_size=world_size, batch_size=3, image_size=16, num_workers=0)
        seen = []
        for _, _, index in ev:
            gathered = [torch.empty_like(index) for _ in range(world_size)]
            dist.all_gather(gathered, index)
            seen += [i for g in gathered for i in g.tolist() if i >= 0]
        planned = sum(loader.plan.epoch_steps(e) for e in range(2))
        torch.save({"steps": steps, "planned": planned, "eval": sorted(seen)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("sampler", ["balanced", "reference"])
def test_gloo_ranks_equal_steps_and_global_balance(tmp_path, rendezvous_file, sampler):
    counts = [3, 4, 5, 6, 4, 5, 7, 4, 5, 4]  # 47 samples, 5 shards of <= 10
    root = make_shards(tmp_path / "shards", counts, samples_per_shard=10, test_counts=(4, 3, 3, 1))
    world_size = 2
    mp.spawn(_worker, args=(world_size, rendezvous_file, root, str(tmp_path), sampler), nprocs=world_size,
             join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert results[0]["steps"] == results[1]["steps"] == results[0]["planned"] > 0
    assert results[0]["eval"] == list(range(11))


def _small_classes_worker(rank: int, world_size: int, init_method: str, root: str, out_dir: str) -> None:
    from rskdist.loss import simix_plan

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        loader = build_train_loader(root, rank=rank, world_size=world_size, classes_per_rank=2, m=4, image_size=16,
                                    num_workers=0, seed=1, steps_per_epoch="dataset")
        checked = 0
        for epoch in range(3):  # one epoch a pass
            for step, (_, labels) in enumerate(loader):
                index = torch.from_numpy(loader.plan.rank_batch(epoch, step, loader.rank))
                gathered = [torch.empty_like(index) for _ in range(world_size)]
                dist.all_gather(gathered, index)
                all_index = torch.cat(gathered)
                assert all_index.unique().numel() == all_index.numel(), all_index  # no image twice
                label_list = [torch.empty_like(labels) for _ in range(world_size)]
                dist.all_gather(label_list, labels)
                # The Trainer's SiMix plan on the gathered labels never pairs an image with itself.
                pairs, _ = simix_plan(torch.cat(label_list), generator=torch.Generator().manual_seed(step))
                assert (all_index[pairs[:, 0]] != all_index[pairs[:, 1]]).all()
                checked += 1
        loader.close()
        torch.save({"checked": checked}, os.path.join(out_dir, f"small{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gloo_small_classes_no_image_twice_in_global_batch(tmp_path, rendezvous_file):
    """Classes of 1, 2, 3 images with m=4 on 2 gloo ranks: the gathered batch holds distinct images."""
    counts = [1, 2, 3, 1, 2, 3, 5, 6, 4, 7, 1, 2]
    root = make_shards(tmp_path / "shards", counts, samples_per_shard=8)
    world_size = 2
    mp.spawn(_small_classes_worker, args=(world_size, rendezvous_file, root, str(tmp_path)), nprocs=world_size,
             join=True)
    results = [torch.load(tmp_path / f"small{r}.pt") for r in range(world_size)]
    assert results[0]["checked"] == results[1]["checked"] == 3 * round(sum(counts) / 16)
