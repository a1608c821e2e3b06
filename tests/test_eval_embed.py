"""embed_dataset: padding dropped, index order restored, whole set on every rank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.comm import gather_rows
from rskdist.eval import embed_dataset, evaluate_model, load_embeddings, save_embeddings

NUM_SAMPLES, DIM_IN, DIM_OUT = 23, 6, 4


def make_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_SAMPLES, DIM_IN, generator=g)
    labels = torch.arange(NUM_SAMPLES) % 5
    return images, labels


def make_model():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM_OUT)


def shard_batches(rank, world_size, batch_size=4):
    """A DistributedSampler-like strided shard, padded to equal length with index -1."""
    images, labels = make_data()
    per_rank = -(-NUM_SAMPLES // world_size)
    idx = list(range(rank, NUM_SAMPLES, world_size))
    idx = idx[::-1]  # arbitrary order inside the shard
    pad = per_rank - len(idx)
    batches = []
    full = idx + [-1] * pad
    for s in range(0, len(full), batch_size):
        part = torch.tensor(full[s : s + batch_size])
        src = part.clamp(min=0)  # padding repeats sample 0 but is marked -1
        batches.append((images[src], labels[src], part))
    return batches


def reference():
    images, labels = make_data()
    with torch.no_grad():
        return torch.nn.functional.normalize(make_model()(images), dim=1), labels


def test_single_process_drops_padding_and_sorts():
    model = make_model()
    batches = shard_batches(0, 1) + [(torch.zeros(2, DIM_IN), torch.zeros(2, dtype=torch.int64), torch.tensor([-1, -1]))]
    emb, lab = embed_dataset(model, batches, device="cpu")
    ref_emb, ref_lab = reference()
    assert torch.allclose(emb, ref_emb, atol=1e-6) and torch.equal(lab, ref_lab)
    assert model.training  # mode restored


def test_duplicate_indices_warn_and_are_dropped():
    batches = shard_batches(0, 1)
    batches.append(batches[0])
    with pytest.warns(UserWarning, match="twice"):
        emb, lab = embed_dataset(make_model(), batches, device="cpu")
    assert emb.shape == (NUM_SAMPLES, DIM_OUT)


def test_save_and_load_roundtrip(tmp_path):
    emb, lab = reference()
    for name in ("e.pt", "e.npz"):
        save_embeddings(tmp_path / name, emb, lab)
        e2, l2 = load_embeddings(tmp_path / name)
        assert torch.equal(e2, emb) and torch.equal(l2, lab)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="embeddings"):
        load_embeddings(tmp_path / "bad.pt")


def _worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        # Rank 0 of a 3-way split gets an extra empty piece; variable lengths per rank.
        rows, counts = gather_rows(torch.arange(rank + 1, dtype=torch.float32).unsqueeze(1), dist.group.WORLD)
        assert counts == list(range(1, world_size + 1)) and rows.shape[0] == sum(counts)
        batches = shard_batches(rank, world_size)
        if world_size == 3:  # the last rank has no batch at all; rank 0 takes its share
            batches = [] if rank == 2 else batches + (shard_batches(2, 3) if rank == 0 else [])
        emb, lab = embed_dataset(make_model(), batches, device="cpu", group=dist.group.WORLD)
        metrics = evaluate_model(make_model(), batches, device="cpu", group=dist.group.WORLD, backend="torch")
        torch.save({"emb": emb, "lab": lab, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_across_gloo_processes(tmp_path, world_size):
    init_method = f"file://{tmp_path / 'rdzv'}"
    mp.spawn(_worker, args=(world_size, init_method, str(tmp_path)), nprocs=world_size, join=True)
    ref_emb, ref_lab = reference()
    from rskdist.eval import retrieval_metrics

    ref_metrics = retrieval_metrics(ref_emb, ref_lab, backend="torch")
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["emb"], ref_emb, atol=1e-6) and torch.equal(got["lab"], ref_lab)
        assert got["metrics"] == ref_metrics  # queries split over ranks, same dict everywhere
