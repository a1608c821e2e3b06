"""rsk_loss(group=...) on N gloo processes equals the single-process loss on the
concatenated batch; each rank's gradient is its slice of the single-process gradient.
group=None inside a process group is the one-process loss of the local rows."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.loss import rsk_loss, simix_plan

pytestmark = pytest.mark.distributed


def _global_batch(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num = sum(sizes)
    emb = torch.nn.functional.normalize(torch.randn(num, 8, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, max(2, num // 4), (num,), generator=gen)
    return emb, labels


def _worker(rank, world, init, sizes, use_mix, result_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        emb, labels = _global_batch(sizes)
        mix = None
        if use_mix:
            pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(3))
            mix = (pairs, alphas.double())
        start = sum(sizes[:rank])
        local = emb[start : start + sizes[rank]].clone().requires_grad_(True)
        loss = rsk_loss(local, labels[start : start + sizes[rank]], mix=mix, block_size=3, group=dist.group.WORLD)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes,use_mix",
    [([24], False), ([12, 12], False), ([12, 12], True), ([6, 6, 6, 6], True), ([7, 5, 9, 3], False), ([9, 4], True)],
    ids=["1rank", "2ranks", "2ranks-simix", "4ranks-simix", "4ranks-uneven", "2ranks-uneven-simix"],
)
def test_matches_single_process(tmp_path, sizes, use_mix):
    world = len(sizes)
    init = f"file://{tmp_path / 'rdzv'}"
    mp.spawn(_worker, args=(world, init, sizes, use_mix, str(tmp_path)), nprocs=world, join=True)

    emb, labels = _global_batch(sizes)
    mix = None
    if use_mix:
        pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(3))
        mix = (pairs, alphas.double())
    x = emb.clone().requires_grad_(True)
    ref = rsk_loss(x, labels, mix=mix)
    ref.backward()
    grads = []
    for rank in range(world):
        out = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(out["loss"], ref.detach(), atol=1e-10, rtol=0)
        grads.append(out["grad"])
    torch.testing.assert_close(torch.cat(grads), x.grad, atol=1e-10, rtol=0)
    assert x.grad.abs().max() > 1e-4


def _local_worker(rank, world, init, result_dir):
    """Inside an initialised group: group=None (rsk_loss, RSkLoss, the trainer's loss_fn)
    is the loss of this rank's rows alone; an explicit group gathers."""
    from rskdist.config.schema import LossConfig
    from rskdist.loss import RSkLoss
    from rskdist.build import make_loss_fn

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        emb, labels = _global_batch([12] * world, seed=5)
        rows = slice(12 * rank, 12 * (rank + 1))
        out = {}
        cases = {
            "none": lambda x, y: rsk_loss(x, y),
            "module": lambda x, y: RSkLoss()(x, y),
            "loss_fn": make_loss_fn(LossConfig(mix="simix"), seed=2, step=7, group=None),
            "world": lambda x, y: rsk_loss(x, y, group=dist.group.WORLD),
        }
        for name, fn in cases.items():
            x = emb[rows].clone().requires_grad_(True)
            loss = fn(x, labels[rows])
            loss.backward()
            out[name] = (loss.detach(), x.grad)
        torch.save(out, os.path.join(result_dir, f"local{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_group_none_is_local_inside_a_process_group(tmp_path):
    from rskdist.config.schema import LossConfig
    from rskdist.build import make_loss_fn

    world = 2
    init = f"file://{tmp_path / 'rdzv'}"
    mp.spawn(_local_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    emb, labels = _global_batch([12] * world, seed=5)
    x = emb.clone().requires_grad_(True)
    ref_global = rsk_loss(x, labels)
    ref_global.backward()
    # One process, no group: the trainer's loss_fn draws its SiMix plan from these labels alone.
    local_fn = make_loss_fn(LossConfig(mix="simix"), seed=2, step=7, group=None)
    for rank in range(world):
        out = torch.load(tmp_path / f"local{rank}.pt")
        rows = slice(12 * rank, 12 * (rank + 1))
        for name, fn in [("none", rsk_loss), ("module", rsk_loss), ("loss_fn", local_fn)]:
            xr = emb[rows].clone().requires_grad_(True)
            ref = fn(xr, labels[rows])
            ref.backward()
            assert abs(float(ref.detach()) - float(ref_global.detach())) > 1e-3, "local and global losses must differ to tell them apart"
            torch.testing.assert_close(out[name][0], ref.detach(), atol=1e-10, rtol=0, msg=f"{name} rank {rank}")
            torch.testing.assert_close(out[name][1], xr.grad, atol=1e-10, rtol=0, msg=f"{name} rank {rank}")
        torch.testing.assert_close(out["world"][0], ref_global.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(out["world"][1], x.grad[rows], atol=1e-10, rtol=0)


def _step_loss_worker(rank, world, init, result_dir):
    """The step's loss function (StepLoss over make_loss, which draws its own plan) with the
    world group, counting the all-gathers it makes with SiMix and without."""
    from rskdist.build import make_loss_fn
    from rskdist.config.schema import LossConfig

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    all_gather = dist.all_gather

    def counted(*args, **kwargs):  # instrumentation only: the real collective runs
        calls.append(1)
        return all_gather(*args, **kwargs)

    try:
        emb, labels = _global_batch([10] * world, seed=6)
        rows = slice(10 * rank, 10 * (rank + 1))
        out = {}
        dist.all_gather = counted
        for mix in ("simix", "none", "embedding"):
            fn = make_loss_fn(LossConfig(mix=mix), seed=2, step=7, group=dist.group.WORLD)
            x = emb[rows].clone().requires_grad_(True)
            calls.clear()
            loss = fn(x, labels[rows])
            loss.backward()
            out[mix] = (loss.detach(), x.grad, len(calls))
        torch.save(out, os.path.join(result_dir, f"step{rank}.pt"))
    finally:
        dist.all_gather = all_gather
        dist.destroy_process_group()


def test_step_loss_draws_its_plan_from_labels_gathered_once(tmp_path):
    """Across 2 ranks the step's loss equals the one-process loss of the concatenated batch
    with the plan drawn from the global labels (the same seed, step and plan), and a SiMix
    step makes no more all-gathers than a step without a mix: the labels are gathered once."""
    from rskdist.build import make_loss_fn
    from rskdist.config.schema import LossConfig

    world = 2
    mp.spawn(_step_loss_worker, args=(world, f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=world, join=True)
    emb, labels = _global_batch([10] * world, seed=6)
    outs = [torch.load(tmp_path / f"step{rank}.pt") for rank in range(world)]
    for mix in ("simix", "none", "embedding"):
        x = emb.clone().requires_grad_(True)
        ref = make_loss_fn(LossConfig(mix=mix), seed=2, step=7, group=None)(x, labels)
        ref.backward()
        for rank, out in enumerate(outs):
            torch.testing.assert_close(out[mix][0], ref.detach(), atol=1e-10, rtol=0, msg=f"{mix} rank {rank}")
        torch.testing.assert_close(torch.cat([out[mix][1] for out in outs]), x.grad, atol=1e-10, rtol=0, msg=mix)
    # Labels (2 all-gathers: counts, rows) and embeddings (2) in every mode; SiMix adds none.
    assert all(out["simix"][2] == out["none"][2] == 4 for out in outs), [
        {mix: out[mix][2] for mix in out} for out in outs]
    assert all(out["embedding"][2] == 4 for out in outs)
    # The plan changes the loss: the SiMix comparison is not that of the unmixed batch.
    assert abs(float(outs[0]["simix"][0]) - float(outs[0]["none"][0])) > 1e-3
