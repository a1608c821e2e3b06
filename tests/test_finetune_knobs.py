"""Fine-tuning knobs: layer-wise LR decay, the head's LR, frozen blocks and a frozen backbone.
The groups get the right LRs, frozen parameters get no gradient and no optimizer state, and on
2 ranks under ZeRO 0, 2 and 3 they do not move while the rest trains."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist.build import build_optimizer, lr_lambdas, make_loss_fn
from rskdist.config import Config
from rskdist.models import create_model
from rskdist.models.params import backbone_layer_ids, freeze_parameters
from test_engine_distributed import engine_config, join_gloo, leave_with

VIT = dict(patch_size=8, depth=3, embed_dim=32, num_heads=2)


def _vit():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", embed_dim=16, image_size=32, backbone_kwargs=VIT)


def test_layer_ids_of_each_family():
    ids, top = backbone_layer_ids(_vit().backbone)
    assert ids["patch_embed.proj.weight"] == ids["cls_token"] == ids["pos_embed"] == 0
    assert [ids[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [1, 2, 3] and top >= 3
    cnn = create_model("resnet18", embed_dim=16, image_size=32).backbone
    ids, top = backbone_layer_ids(cnn)
    assert ids["conv1.weight"] == 0 and ids["layer1.0.conv1.weight"] < ids["layer4.1.conv2.weight"] == top
    clip = create_model("open_clip:ViT-B-16", embed_dim=16, image_size=32,
                        backbone_kwargs=dict(layers=2, width=64, patch_size=16)).backbone
    ids, top = backbone_layer_ids(clip)
    assert ids["conv1.weight"] == ids["positional_embedding"] == 0 and top == 3
    assert ids["transformer.resblocks.1.mlp.c_fc.weight"] == 2 and ids["proj"] == ids["ln_post.weight"] == 3
    with pytest.raises(ValueError, match="no layer structure"):
        backbone_layer_ids(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _optim_cfg(**changes):
    cfg = Config().optim
    cfg.lr, cfg.weight_decay = 1e-3, 0.05
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_group_lrs_follow_layer_decay_and_head_multiplier():
    model = _vit()
    ids, top = backbone_layer_ids(model.backbone)
    optimizer = build_optimizer(model, _optim_cfg(layer_decay=0.5, head_lr_multiplier=10.0, decay_norm_and_bias=False))
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.backbone.named_parameters():
        assert by_param[id(p)]["lr"] == pytest.approx(1e-3 * 0.5 ** (top + 1 - ids[name])), name
        assert by_param[id(p)]["weight_decay"] == (0.0 if p.ndim <= 1 or name in ("cls_token", "pos_embed") else 0.05)
    for p in model.head.parameters():
        assert by_param[id(p)]["lr"] == pytest.approx(1e-2) and by_param[id(p)]["role"] == "head"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # The schedule multiplies each group's own LR: at a given step every group keeps its ratio.
    cfg = _optim_cfg(layer_decay=0.5, head_lr_multiplier=10.0, warmup_steps=4, decay_epochs=[1.0])
    optimizer = build_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer, cfg, steps_per_epoch=5))
    for _ in range(6):
        optimizer.step()
        schedule.step()
    for g, lr in zip(optimizer.param_groups, schedule.get_last_lr()):
        assert lr == pytest.approx(1e-3 * g["lr_scale"] * 0.3)  # step 6: past the warm-up and the drop at 5


def test_freezing_leaves_frozen_parameters_out_of_the_optimizer():
    model = _vit()
    frozen = freeze_parameters(model, blocks=1)
    ids, _ = backbone_layer_ids(model.backbone)
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == (ids[name] > 1), name
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(model, _optim_cfg(layer_decay=0.8))
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    probe = _vit()
    freeze_parameters(probe, backbone=True)
    assert not any(p.requires_grad for p in probe.backbone.parameters()) and all(
        p.requires_grad for p in probe.head.parameters())
    with pytest.raises(ValueError, match="freezes every layer.*freeze_backbone"):
        freeze_parameters(_vit(), blocks=10)


def test_config_refuses_bad_knobs():
    from rskdist.config import load_config, validate

    for override, match in (("optim.layer_decay=1.5", "layer_decay must be in"),
                            ("optim.head_lr_multiplier=0", "head_lr_multiplier must be > 0"),
                            ("model.freeze_blocks=-1", "freeze_blocks must be >= 0")):
        with pytest.raises(ValueError, match=match):
            validate(load_config("configs/debug.yaml", [override]), world_size=1)
    with pytest.raises(ValueError, match="both set"):
        validate(load_config("configs/debug.yaml", ["model.freeze_blocks=1", "model.freeze_backbone=true"]), 1)


def _worker(rank, world, init, out_dir, stages):
    import deepspeed

    from rskdist.parallel.step import two_pass_step

    join_gloo(rank, world, init)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.arange(16) // 4
    local = 16 // world
    rows = slice(rank * local, (rank + 1) * local)
    out = {}
    for zero_stage in stages:
        cfg = Config()
        cfg.deepspeed.zero_stage, cfg.loss.mix = zero_stage, "none"
        cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.head_lr_multiplier, cfg.optim.grad_clip = 1e-3, 0.5, 4.0, 0.0
        model = _vit()
        freeze_parameters(model, blocks=1)
        optimizer = build_optimizer(model, cfg.optim)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer, cfg.optim, steps_per_epoch=10))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                          config=engine_config(cfg, world=world, local=local, chunk=4))
        for step in range(2):
            two_pass_step(engine, images[rows], labels[rows], chunk_size=4, step=step,
                          seed=0, loss_fn=make_loss_fn(cfg.loss, seed=0, step=step, group=dist.group.WORLD),
                          group=dist.group.WORLD)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        # Elements the optimizer keeps fp32 state for on this rank.
        if zero_stage == 0:
            kept = sum(p.numel() for p in engine.optimizer.state)
        elif zero_stage == 3:
            kept = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
        else:
            kept = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
        out[zero_stage] = (state, kept, schedule.get_last_lr())
    leave_with(out, out_dir, f"r{rank}.pt")


@pytest.mark.distributed
def test_frozen_blocks_stay_and_hold_no_state_under_zero(tmp_path):
    stages = (0, 2, 3)
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path), stages), nprocs=2, join=True)
    initial = _vit().state_dict()
    model = _vit()
    ids, _ = backbone_layer_ids(model.backbone)
    frozen = {f"backbone.{n}" for n in ids if ids[n] <= 1}
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    per_rank = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for zero_stage in stages:
        kept = [per_rank[r][zero_stage][1] for r in range(2)]
        total = kept[0] if zero_stage == 0 else sum(kept)
        assert trainable <= total < trainable + 64 * len(ids), (zero_stage, total, trainable)  # ZeRO pads partitions
        for r in range(2):
            state, _, lrs = per_rank[r][zero_stage]
            for key in initial:
                moved = float((state[key] - initial[key]).abs().max())
                if key in frozen:
                    assert moved == 0.0, (zero_stage, key)
            assert max(float((state[k] - initial[k]).abs().max()) for k in initial if k.startswith("head.")) > 1e-5
            assert max(lrs) == pytest.approx(4e-3) and min(lrs) == pytest.approx(1e-3 * 0.5 ** 2)  # block 1 (layer 2 of 3): the stem and block 0 are frozen
