"""The frozen-backbone warm-up (loss.backbone_warmup_epochs; Proxy-Anchor's one epoch of head
and proxies alone): the backbone's parameter groups get LR 0 for the first steps, then the
schedule; on 2 ranks under ZeRO 0, 2 and 3 the backbone does not move while the head and the
proxies do, and moves once the warm-up is over."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rskdist.build import (
    backbone_frozen_steps, build_optimizer, lr_lambdas, trained_module,
)
from rskdist.config import Config
from rskdist.parallel.step_parts import StepLoss
from rskdist.loss import make_loss
from rskdist.models import RetrievalModel
from test_engine_distributed import engine_config, join_gloo, leave_with

GLOBAL_BATCH, CHUNK, NUM_CLASSES, FROZEN = 24, 5, 6, 2


def _model() -> RetrievalModel:
    torch.manual_seed(0)
    return RetrievalModel(nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.GELU()), feat_dim=32, embed_dim=16)


def _criterion():
    torch.manual_seed(1)
    return make_loss("proxy_anchor", num_classes=NUM_CLASSES, embed_dim=16)


def _config(zero_stage: int = 0) -> Config:
    cfg = Config()
    cfg.loss.name, cfg.loss.mix = "proxy_anchor", "none"
    cfg.deepspeed.zero_stage = zero_stage
    cfg.optim.lr, cfg.optim.grad_clip = 1e-2, 0.0
    return cfg


def _batch(step):
    gen = torch.Generator().manual_seed(50 + step)
    return (torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=gen),
            (torch.arange(GLOBAL_BATCH) // 4)[torch.randperm(GLOBAL_BATCH, generator=gen)])


def test_frozen_steps_follow_the_loss_default_or_the_config():
    cfg = _config()
    assert backbone_frozen_steps(cfg.loss, _criterion(), steps_per_epoch=7) == 7  # Proxy-Anchor: one epoch
    assert backbone_frozen_steps(cfg.loss, make_loss("rsk"), steps_per_epoch=7) == 0
    assert backbone_frozen_steps(cfg.loss, make_loss("arcface", num_classes=3, embed_dim=4), steps_per_epoch=7) == 0
    cfg.loss.backbone_warmup_epochs = 0.5
    assert backbone_frozen_steps(cfg.loss, make_loss("rsk"), steps_per_epoch=7) == 4
    cfg.loss.backbone_warmup_epochs = 0.0
    assert backbone_frozen_steps(cfg.loss, _criterion(), steps_per_epoch=7) == 0


def test_groups_and_schedule_of_a_frozen_start():
    cfg = _config()
    cfg.optim.warmup_steps = 4
    module = trained_module(_model(), _criterion(), zero_stage=cfg.deepspeed.zero_stage)
    optimizer = build_optimizer(module, cfg.optim, backbone_apart=True)
    roles = [g["role"] for g in optimizer.param_groups]
    assert set(roles) == {"backbone", "head", "proxies"}
    backbone = {id(p) for g in optimizer.param_groups if g["role"] == "backbone" for p in g["params"]}
    assert backbone == {id(p) for p in module.model.backbone.parameters()}
    lambdas = lr_lambdas(optimizer, cfg.optim, steps_per_epoch=10, frozen_steps=3)
    for role, fn in zip(roles, lambdas):
        assert [fn(s) for s in range(5)] == ([0.0, 0.0, 0.0, 1.0, 1.0] if role == "backbone"
                                             else [0.25, 0.5, 0.75, 1.0, 1.0]), role
    with pytest.raises(ValueError, match="need a model with a .backbone"):
        build_optimizer(nn.Linear(2, 2), cfg.optim, backbone_apart=True)


def _worker(rank, world, init, out_dir, stages):
    import deepspeed

    from rskdist.parallel.step import two_pass_step

    join_gloo(rank, world, init)
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    results = {}
    for zero_stage in stages:
        cfg = _config(zero_stage)
        module = trained_module(_model(), _criterion(), zero_stage=cfg.deepspeed.zero_stage)
        optimizer = build_optimizer(module, cfg.optim, backbone_apart=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambdas(optimizer, cfg.optim, steps_per_epoch=10, frozen_steps=FROZEN))
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule,
            config=engine_config(cfg, world=world, local=local, chunk=CHUNK))
        shadow = _criterion()
        states = []
        for step in range(FROZEN + 1):
            images, labels = _batch(step)
            loss_fn = StepLoss(shadow, seed=0, step=step, group=dist.group.WORLD,
                               params_from=engine.module.criterion)
            two_pass_step(engine, images[rows], labels[rows], loss_fn=loss_fn, chunk_size=CHUNK, step=step, seed=0,
                          group=dist.group.WORLD, loss_params=loss_fn.param_leaves)
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
                states.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
        results[zero_stage] = states
    leave_with(results, out_dir, f"r{rank}.pt")


@pytest.mark.distributed
def test_backbone_stays_while_head_and_proxies_learn_under_zero(tmp_path):
    stages = (0, 2, 3)
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path), stages), nprocs=2, join=True)
    initial = trained_module(_model(), _criterion()).state_dict()
    for rank in range(2):
        results = torch.load(tmp_path / f"r{rank}.pt")
        for zero_stage in stages:
            states = results[zero_stage]
            where = f"ZeRO-{zero_stage} rank {rank}"

            def moved(state, prefix):
                return max(float((state[k] - initial[k]).abs().max()) for k in initial if k.startswith(prefix))

            for state in states[:FROZEN]:
                assert moved(state, "model.backbone.") == 0.0, where
            assert moved(states[0], "model.head.") > 1e-4 and moved(states[0], "criterion.") > 1e-4, where
            assert moved(states[FROZEN], "model.backbone.") > 1e-5, where
