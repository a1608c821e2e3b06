"""The weight average (optim.ema_decay) on 2 ranks under ZeRO 0, 2 and 3: after a few steps
it equals its closed form sum_i (1 - d) d^(k - i) w_i + d^k w_0 of the weights each step
left, evaluation with it swapped in gives the average's outputs and puts the weights back
bit for bit, and a checkpoint round trip (each rank's file) restores it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.build import build_optimizer, make_loss_fn
from rskdist.checkpoint import CheckpointManager
from rskdist.config import Config
from rskdist.models import create_model
from rskdist.parallel.ema import WeightEMA
from test_engine_distributed import engine_config, join_gloo, leave_with

DECAY, STEPS = 0.6, 3
VIT = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", embed_dim=16, image_size=32, backbone_kwargs=VIT)


def _engine(cfg, world, local):
    import deepspeed

    model = _model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                      config=engine_config(cfg, world=world, local=local, chunk=4))
    return engine


def _full_state(engine, zero_stage):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
        return {k: v.detach().clone().float() for k, v in engine.module.named_parameters()}


def _worker(rank, world, init, out_dir, stages):
    import deepspeed

    from rskdist.parallel.step import two_pass_step

    join_gloo(rank, world, init)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(16) // 4
    local = 16 // world
    rows = slice(rank * local, (rank + 1) * local)
    out = {}
    for zero_stage in stages:
        cfg = Config()
        cfg.deepspeed.zero_stage, cfg.loss.mix, cfg.optim.lr, cfg.optim.grad_clip = zero_stage, "none", 1e-2, 0.0
        engine = _engine(cfg, world, local)
        ema = WeightEMA(engine.module, DECAY)
        weights = [_full_state(engine, zero_stage)]
        for step in range(STEPS):
            two_pass_step(engine, images[rows], labels[rows], chunk_size=4, step=step,
                          seed=0, loss_fn=make_loss_fn(cfg.loss, seed=0, step=step, group=dist.group.WORLD),
                          group=dist.group.WORLD)
            ema.update()
            weights.append(_full_state(engine, zero_stage))
        engine.eval()
        with torch.no_grad():
            raw_out = engine(images[:4])
            with ema.swapped():  # as evaluation uses it: forwards only
                ema_out = engine(images[:4])
            after_out = engine(images[:4])
        # Save, then resume into a fresh engine and average.
        file = f"ema_rank{rank}.pt" if zero_stage == 3 else "ema.pt"
        manager = CheckpointManager(os.path.join(out_dir, f"ckpt{zero_stage}"), engine, rank=rank, keep=2,
                                    barrier=dist.barrier, group=dist.group.WORLD)
        manager.save(STEPS, {}, rank_files={file: ema.state_dict()} if zero_stage == 3 or rank == 0 else {})
        fresh = _engine(cfg, world, local)
        restored = WeightEMA(fresh.module, DECAY)
        resumer = CheckpointManager(os.path.join(out_dir, f"ckpt{zero_stage}"), fresh, rank=rank, keep=2,
                                    barrier=dist.barrier, group=dist.group.WORLD)
        resumer.resume("auto")
        restored.load_state_dict(torch.load(resumer.resumed_from / file, weights_only=True))
        fresh.eval()
        with torch.no_grad(), restored.swapped():
            resumed_out = fresh(images[:4])
        out[zero_stage] = dict(weights=weights, after_out=after_out, raw_out=raw_out, ema_out=ema_out,
                               resumed_out=resumed_out, updates=restored.updates,
                               shadow_equal=all(torch.equal(a, b) for a, b in zip(ema.shadow, restored.shadow)))
    leave_with(out, out_dir, f"r{rank}.pt")


@pytest.mark.distributed
def test_weight_average_is_its_closed_form_swaps_back_and_resumes(tmp_path):
    stages = (0, 2, 3)
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path), stages), nprocs=2, join=True)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for rank in range(2):
        results = torch.load(tmp_path / f"r{rank}.pt")
        for zero_stage in stages:
            r, where = results[zero_stage], f"ZeRO-{zero_stage} rank {rank}"
            w = r["weights"]
            closed = {name: DECAY**STEPS * w[0][name] + sum((1 - DECAY) * DECAY ** (STEPS - i) * w[i][name]
                                                            for i in range(1, STEPS + 1)) for name in w[0]}
            reference = _model().eval()  # a plain model holding the closed form
            reference.load_state_dict(closed, strict=False)
            with torch.no_grad():
                expected = reference(images[:4])
            torch.testing.assert_close(r["ema_out"], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: {m}")
            assert float((r["ema_out"] - r["raw_out"]).abs().max()) > 1e-4, where  # the average differs
            assert torch.equal(r["after_out"], r["raw_out"]), where  # the weights came back
            assert r["shadow_equal"] and torch.equal(r["resumed_out"], r["ema_out"]), where
            assert float((w[-1]["head.1.weight"] - w[0]["head.1.weight"]).abs().max()) > 1e-3  # it trained
            assert r["updates"] == STEPS


def test_bad_decay_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        WeightEMA(_model(), 1.0)
    ema = WeightEMA(_model(), 0.9)
    other = WeightEMA(create_model("vit_tiny_patch16_224", embed_dim=8, image_size=32, backbone_kwargs=VIT), 0.9)
    with pytest.raises(ValueError, match="another model or another partitioning"):
        ema.load_state_dict(other.state_dict())
