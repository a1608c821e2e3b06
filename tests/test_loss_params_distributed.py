"""Losses with class proxies and embedding mixup inside the real step: one DeepSpeed step
on N gloo ranks (ZeRO 0, 2, 3; chunked two-pass step) moves the model AND the proxies
exactly as one plain single-process SGD step on the concatenated global batch, the
proxies at their own learning rate (rskdist/parallel/gradients.py, 5)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.build import StepLoss, build_optimizer, deepspeed_config, trained_module
from rskdist.config import Config
from rskdist.loss import make_loss, simix_generator, simix_plan
from test_engine_distributed import CHUNK, LR, SEED, TinyEmbedder, _global_batch, start_rank

pytestmark = pytest.mark.distributed

NUM_CLASSES = 6  # the global batch of tests/test_engine_distributed.py: 6 classes x 4
# (loss, mix): a proxy loss (its proxies are engine parameters), a pair loss with mixed embeddings.
LOSSES = [("proxy_anchor", "none"), ("norm_softmax", "embedding"), ("multi_similarity", "embedding")]


def _parts(name, mix):
    torch.manual_seed(0)
    model = TinyEmbedder()
    torch.manual_seed(1)
    criterion = make_loss(name, num_classes=NUM_CLASSES, embed_dim=16, mix=mix)
    return model, criterion


def _config(name, mix, zero_stage):
    cfg = Config()
    cfg.loss.name, cfg.loss.mix = name, mix
    cfg.deepspeed.zero_stage = zero_stage
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip = "sgd", LR, 0.0, 0.0
    return cfg


def _reference(name, mix):
    """Plain torch: the whole global batch, one forward, the loss, one SGD step."""
    model, criterion = _parts(name, mix)
    images, labels = _global_batch()
    plan = None
    if mix != "none":
        plan = simix_plan(labels, generator=simix_generator(SEED, 0))
    loss = criterion(model(images), labels, plan=plan)
    loss.backward()
    multiplier = float(getattr(criterion, "lr_multiplier", 1.0))
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
        for p in criterion.parameters():
            p -= LR * multiplier * p.grad
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"criterion.{k}": v.clone() for k, v in criterion.state_dict().items()})
    return state, float(loss.detach())


def _worker(rank, world, init, out_dir, cases):
    import deepspeed

    from rskdist.parallel.step import two_pass_step

    images, labels, local = start_rank(rank, world, init)
    group = dist.group.WORLD if world > 1 else None
    results = {}
    for name, mix, zero_stage in cases:
        cfg = _config(name, mix, zero_stage)
        model, criterion = _parts(name, mix)
        module = trained_module(cfg, model, criterion)
        num_chunks = -(-local // CHUNK)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=build_optimizer(module, cfg.optim),
            config=deepspeed_config(cfg, chunk_size=CHUNK, num_chunks=num_chunks, world_size=world),
        )
        shadow = _parts(name, mix)[1]  # the fp32 copy the loss pass computes on (build.StepLoss)
        loss_fn = StepLoss(shadow, cfg.loss, seed=SEED, step=0, group=group,
                           params_from=None if module is model else engine.module.criterion)
        result = two_pass_step(
            engine, images, labels, chunk_size=CHUNK, world_size=world, rank=rank, step=0, seed=SEED,
            loss_fn=loss_fn, group=group, loss_params=loss_fn.param_leaves,
        )
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if module is model:  # no loss parameters: the engine trains the model itself
            state = {f"model.{k}": v for k, v in state.items()}
        results[(name, mix, zero_stage)] = (state, result.loss)
    torch.save(results, os.path.join(out_dir, f"results{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2])  # CI time: 1 rank in the slow tier
def test_loss_parameters_train_exactly_in_the_engine(tmp_path, world):
    cases = [(name, mix, z) for name, mix in LOSSES for z in (0, 2, 3)]
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rdzv'}", str(tmp_path), cases), nprocs=world, join=True)
    for rank in range(world):
        results = torch.load(tmp_path / f"results{rank}.pt")
        for name, mix in LOSSES:
            ref_state, ref_loss = _reference(name, mix)
            model, criterion = _parts(name, mix)
            for key, value in criterion.state_dict().items():  # the proxies moved: equality is informative
                assert float((ref_state[f"criterion.{key}"] - value).abs().max()) > 1e-4, (name, key)
            for zero_stage in (0, 2, 3):
                state, loss = results[(name, mix, zero_stage)]
                assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), (name, mix, zero_stage)
                assert state.keys() == ref_state.keys()
                for key, ref in ref_state.items():
                    torch.testing.assert_close(state[key], ref, atol=1e-5, rtol=1e-4,
                                               msg=lambda m: f"{name}/{mix} ZeRO-{zero_stage} rank {rank} {key}: {m}")
