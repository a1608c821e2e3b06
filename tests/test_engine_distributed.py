"""One DeepSpeed training step on N gloo ranks (ZeRO 0-3, chunked two-pass step, with and
without SiMix) gives the same parameters as one plain single-process SGD step on the
concatenated global batch, and every rank reports the norm of d loss / d (all embeddings)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rskdist.config import Config
from rskdist.loss import rsk_loss, simix_generator, simix_plan
from rskdist.build import deepspeed_config, make_loss_fn
from rskdist.parallel.layout import BatchLayout

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 24  # 6 classes x 4
CHUNK = 5  # does not divide the local batch: ragged last chunk
LR = 0.5
SEED = 3


class TinyEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 16))

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


def _global_batch():
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=gen)
    labels = (torch.arange(GLOBAL_BATCH) // 4)[torch.randperm(GLOBAL_BATCH, generator=gen)]
    return images, labels


def _config(zero_stage, simix):
    cfg = Config()
    cfg.deepspeed.zero_stage = zero_stage
    cfg.loss.mix = "simix" if simix else "none"
    cfg.optim.grad_clip = 0.0
    return cfg


def _reference_params(simix):
    """Plain torch: whole global batch, one forward, rsk_loss, SGD step."""
    torch.manual_seed(0)
    model = TinyEmbedder()
    images, labels = _global_batch()
    mix = None
    if simix:
        pairs, alphas = simix_plan(labels, generator=simix_generator(SEED, 0))
        mix = (pairs, alphas)
    emb = model(images)
    loss = rsk_loss(emb, labels, mix=mix)
    (grad_emb,) = torch.autograd.grad(loss, emb, retain_graph=True)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return {k: v.clone() for k, v in model.state_dict().items()}, float(loss.detach()), float(grad_emb.norm())


def engine_config(cfg, *, world, local, chunk):
    """The DeepSpeed config a run of `cfg` generates for `world` ranks of `local` images
    forwarded `chunk` at a time (m=1: the tests' batches need not be class-balanced)."""
    layout = BatchLayout(global_batch=local * world, world_size=world, m=1, chunk_size=chunk)
    return deepspeed_config(cfg.deepspeed, layout, grad_clip=cfg.optim.grad_clip)


def join_gloo(rank, world, init):
    """Join the gloo group (file rendezvous `init`) and DeepSpeed, as a launcher's rank would."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def leave_with(results, out_dir, name):
    """Save this rank's results as OUT/<name>, then leave the group together."""
    torch.save(results, os.path.join(out_dir, name))
    dist.barrier()
    dist.destroy_process_group()


def start_rank(rank, world, init):
    """Join the gloo group and DeepSpeed; this rank's rows of the global batch and its size."""
    join_gloo(rank, world, init)
    images, labels = _global_batch()
    local = GLOBAL_BATCH // world
    sl = slice(rank * local, (rank + 1) * local)
    return images[sl], labels[sl], local


def _worker(rank, world, init, out_dir, cases):
    import deepspeed

    from rskdist.parallel.step import two_pass_step

    images, labels, local = start_rank(rank, world, init)
    results = {}
    for zero_stage, simix in cases:
        torch.manual_seed(0)
        model = TinyEmbedder()
        cfg = _config(zero_stage, simix)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            config=engine_config(cfg, world=world, local=local, chunk=CHUNK),
        )
        group = dist.group.WORLD if world > 1 else None
        result = two_pass_step(
            engine, images, labels, chunk_size=CHUNK, step=0, seed=SEED,
            loss_fn=make_loss_fn(cfg.loss, seed=SEED, step=0, group=group), group=group,
        )
        assert engine.global_steps == 1, "the optimizer must step once per global batch"
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        results[(zero_stage, simix)] = (state, result.loss, result.emb_grad_norm)
    # Every rank's results: the embedding-gradient norm must be the same on all of them.
    torch.save(results, os.path.join(out_dir, f"results{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


CASES = [(z, s) for z in (0, 1, 2, 3) for s in (False, True)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_step_equals_single_process(tmp_path, world):
    init = f"file://{tmp_path / 'rdzv'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path), CASES), nprocs=world, join=True)
    results = torch.load(tmp_path / "results0.pt")
    for simix in (False, True):
        ref_state, ref_loss, ref_norm = _reference_params(simix)
        torch.manual_seed(0)
        initial = TinyEmbedder().state_dict()
        moved = max(float((ref_state[k] - initial[k]).abs().max()) for k in ref_state)
        assert moved > 1e-3  # the step changed the weights, so equality below is informative
        for zero_stage in (0, 1, 2, 3):
            state, loss, _ = results[(zero_stage, simix)]
            assert loss == pytest.approx(ref_loss, abs=1e-6), (zero_stage, simix)
            for rank in range(world):
                norm = torch.load(tmp_path / f"results{rank}.pt")[(zero_stage, simix)][2]
                assert norm == pytest.approx(ref_norm, rel=1e-5), (zero_stage, simix, rank)
            for key, ref in ref_state.items():
                torch.testing.assert_close(state[key], ref, atol=2e-6, rtol=1e-5,
                                           msg=lambda m: f"ZeRO-{zero_stage} simix={simix} {key}: {m}")
