"""Unit tests for rskdist.models (tiny backbones, small images, random init, no network)."""

import json
import socket

import pytest
import torch
import torch.nn as nn

from rskdist.models import (
    GeM,
    RetrievalModel,
    WeightsMismatchError,
    WeightsNotFoundError,
    count_params,
    create_model,
    describe,
    param_groups,
    read_state_dict,
)

VIT = dict(backbone="test_vit", image_size=32, embed_dim=16)  # timm's 300K-param test ViT
OC_TINY = dict(backbone="open_clip:ViT-S-32", image_size=64, embed_dim=16, backbone_kwargs={"layers": 2})


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- shapes, pooling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, size",
    [
        (VIT, 32),
        (dict(backbone="vit_tiny_patch16_224", image_size=32, embed_dim=16, backbone_kwargs={"depth": 2}), 32),
        (dict(backbone="resnet18", embed_dim=16), 64),
        (OC_TINY, 64),
    ],
    ids=["test_vit", "vit_tiny", "resnet18", "open_clip"],
)
def test_output_shape_and_unit_norm(kwargs, size):
    model = create_model(**kwargs).eval()
    with torch.no_grad():
        emb = model(_images(size=size))
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert len(model.mean) == 3 and len(model.std) == 3
    assert model.image_size == kwargs.get("image_size", 224)


def test_vit_uses_cls_token_and_resnet_uses_gem():
    vit = create_model(**VIT)
    assert isinstance(vit.pool, nn.Identity) and vit.backbone.global_pool == "token"
    assert "CLS" in vit.info["pool"]
    assert create_model(**VIT, pool="cls").backbone.global_pool == "token"
    assert create_model(**VIT, pool="avg").backbone.global_pool == "avg"
    cnn = create_model("resnet18", embed_dim=16, gem_p=3.0)
    assert isinstance(cnn.pool, GeM) and cnn.pool.p == 3.0
    assert cnn.feat_dim == 512
    assert cnn.mean == (0.485, 0.456, 0.406)


def test_gem_matches_formula():
    fmap = torch.rand(2, 5, 4, 3) + 0.01
    expected = (fmap ** 3).mean(dim=(2, 3)) ** (1 / 3)
    torch.testing.assert_close(GeM(3.0)(fmap), expected)
    torch.testing.assert_close(GeM(1.0)(fmap), fmap.mean(dim=(2, 3)))

    model = create_model("resnet18", embed_dim=16).eval()
    x = _images(2, 64)
    with torch.no_grad():
        fmap = model.backbone(x)  # [b, 512, 2, 2]: the classifier and global pool are removed
        assert fmap.shape == (2, 512, 2, 2)
        feat = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        expected = nn.functional.normalize(model.head(feat), dim=-1)
        torch.testing.assert_close(model(x), expected)


def test_learnable_gem_exponent_gets_its_gradient_and_moves():
    fmap = torch.rand(2, 5, 4, 3) + 0.05
    gem = GeM(3.0, learnable=True)
    assert isinstance(gem.p, nn.Parameter) and gem.p.shape == (1,) and [n for n, _ in gem.named_parameters()] == ["p"]
    out = gem(fmap)
    torch.testing.assert_close(out, (fmap ** 3).mean(dim=(2, 3)) ** (1 / 3))
    out.sum().backward()
    # d/dp (m_p)^(1/p), m_p = mean x^p:  f * (mean(x^p ln x) / (p m_p) - ln(m_p) / p^2)
    m_p = (fmap ** 3).mean(dim=(2, 3))
    dfdp = out.detach() * ((fmap ** 3 * fmap.log()).mean(dim=(2, 3)) / (3 * m_p) - m_p.log() / 9)
    torch.testing.assert_close(gem.p.grad, dfdp.sum().reshape(1))
    torch.optim.SGD(gem.parameters(), lr=0.1).step()
    assert gem.p.detach().item() == pytest.approx(3.0 - 0.1 * float(dfdp.sum()))

    assert "(learned)" in repr(gem)
    with torch.device("meta"):
        assert "p=? (learned)" in repr(GeM(3.0, learnable=True))

    fixed = GeM(3.0)
    assert isinstance(fixed.p, float) and not list(fixed.parameters()) and not fixed.state_dict()


def test_learnable_gem_in_a_model_trains_and_round_trips():
    x = _images(2, 64)
    torch.manual_seed(0)
    model = create_model("resnet18", embed_dim=16, gem_learnable=True)
    assert "pool.p" in dict(model.named_parameters()) and "(p learned)" in describe(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x)[:, 0].sum().backward()
    assert model.pool.p.grad is not None and float(model.pool.p.grad.abs()) > 0
    opt.step()
    assert model.pool.p.detach().item() != 3.0

    clone = create_model("resnet18", embed_dim=16, gem_learnable=True)
    clone.load_state_dict(model.state_dict())
    assert clone.pool.p.detach().item() == model.pool.p.detach().item()
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))

    torch.manual_seed(0)
    fixed = create_model("resnet18", embed_dim=16)
    assert fixed.pool.p == 3.0 and not any(k.startswith("pool.") for k in fixed.state_dict())
    opt = torch.optim.Adam(fixed.parameters(), lr=1e-2)
    fixed(x)[:, 0].sum().backward()
    opt.step()
    assert fixed.pool.p == 3.0


def test_config_plumbs_gem_and_normalization_into_the_model():
    from rskdist.build import build_model
    from rskdist.config import load_config
    from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD

    vit = ["model.backbone=vit_tiny_patch16_224", "model.image_size=32", "model.embed_dim=16",
           "model.backbone_kwargs={depth: 1}"]
    own = build_model(load_config(None, vit).model, pretrained=False)
    assert own.mean == (0.5, 0.5, 0.5) and own.std == (0.5, 0.5, 0.5)  # the augreg weights' own
    forced = build_model(load_config(None, [*vit, "model.normalization=imagenet"]).model, pretrained=False)
    assert forced.mean == IMAGENET_MEAN and forced.std == IMAGENET_STD
    assert "model.normalization=imagenet" in describe(forced)
    with pytest.warns(UserWarning, match="gem_learnable=true has no effect"):
        build_model(load_config(None, [*vit, "model.gem_learnable=true"]).model, pretrained=False)

    r18 = ["model.backbone=resnet18", "model.embed_dim=16"]
    assert isinstance(build_model(load_config(None, [*r18, "model.gem_learnable=true"]).model).pool.p, nn.Parameter)
    assert build_model(load_config(None, r18).model).pool.p == 3.0
    with pytest.raises(TypeError, match=r"model section \(cfg.model\), got Config"):
        build_model(load_config(None, r18))  # the builder takes its own section, not the root config


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="close matches"):
        create_model("vit_base_patch16_2244")
    with pytest.raises(ValueError, match="gem"):
        create_model("test_vit", pool="gem")
    with pytest.raises(ValueError, match="close matches"):
        create_model("open_clip:ViT-B-322")
    with pytest.raises(ValueError, match="stochastic depth"):
        create_model("open_clip:ViT-S-32", drop_path_rate=0.1, backbone_kwargs={"layers": 1}, image_size=64)
    with pytest.raises(ValueError, match="openai"):
        create_model("open_clip:ViT-B-32", pretrained="not_a_tag")


# --- weights from files ------------------------------------------------------------------


def _save(state, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_whole_model_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    src = create_model(**VIT).eval()
    path = tmp_path / f"model{suffix}"
    _save(src.state_dict(), path)
    torch.manual_seed(2)  # a different random init underneath
    dst = create_model(**VIT, pretrained=str(path)).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert str(path) in dst.info["weights"]


def test_backbone_only_round_trip_keeps_random_head(tmp_path):
    torch.manual_seed(1)
    src = create_model("test_resnet", embed_dim=16).eval()
    path = tmp_path / "backbone.safetensors"
    _save(src.backbone.state_dict(), path)
    torch.manual_seed(2)
    dst = create_model("test_resnet", embed_dim=16, pretrained=str(path)).eval()
    x = _images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.backbone(x), src.backbone(x), rtol=0, atol=0)
    assert not torch.equal(dst.head[1].weight, src.head[1].weight)


@pytest.mark.parametrize("wrap", ["lightning", "deepspeed", "compiled"])
def test_nested_and_prefixed_checkpoint(tmp_path, wrap):
    torch.manual_seed(1)
    src = create_model(**VIT).eval()
    state = src.state_dict()
    if wrap == "lightning":
        ckpt = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif wrap == "deepspeed":
        ckpt = {"module": state, "global_steps": 10, "ds_version": "0.19.8"}
    else:
        ckpt = {"model": {f"module._orig_mod.{k}": v for k, v in state.items()}}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    dst = create_model(**VIT, pretrained=str(path)).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_run_model_states_with_loss_proxies_and_zero3_placeholders(tmp_path):
    """A run's RUN/checkpoints/<tag>/mp_rank_00_model_states.pt as model.pretrained: with a proxy
    loss DeepSpeed trained model + loss (model.*, criterion.*), and the model's part loads; a
    ZeRO-3 file (empty placeholders) is refused with the command that consolidates it.
    tests/test_integration.py loads a file written by a real run."""
    torch.manual_seed(1)
    src = create_model(**VIT).eval()
    module = {**{f"model.{k}": v for k, v in src.state_dict().items()}, "criterion.proxies": torch.randn(64, 16)}
    path = tmp_path / "step00000004" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save({"module": module, "global_steps": 4, "ds_version": "0.19.8", "param_shapes": []}, path)
    dst = create_model(**VIT, pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(_images()), src(_images()), rtol=0, atol=0)

    zero3 = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {k: torch.empty(0) for k in src.state_dict()}, "ds_version": "0.19.8"}, zero3)
    with pytest.raises(ValueError, match=r"ZeRO-3 DeepSpeed checkpoint.*load_model_state\('" + str(tmp_path)):
        read_state_dict(zero3)


def test_timm_checkpoint_with_classifier_and_other_size(tmp_path):
    """A plain timm checkpoint (classifier included, native 160 px) loads into a 32 px backbone."""
    import timm

    torch.manual_seed(3)
    timm_model = timm.create_model("test_vit", num_classes=1000)
    path = tmp_path / "test_vit.safetensors"
    _save(timm_model.state_dict(), path)
    model = create_model(**VIT, pretrained=str(path))
    torch.testing.assert_close(model.backbone.cls_token, timm_model.cls_token)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, timm_model.blocks[0].attn.qkv.weight)
    assert model.backbone.pos_embed.shape[1] == 1 + 2 * 2  # resampled to the 32 px grid
    assert "state_dict" not in model.backbone.pretrained_cfg  # timm's copy of the weights is freed


def test_missing_file_and_mismatched_weights(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors") as info:
        create_model(**VIT, pretrained=str(missing))
    assert isinstance(info.value, ValueError)

    path = tmp_path / "resnet.pt"  # a CNN's weights offered to a ViT
    _save(create_model("test_resnet", embed_dim=16).backbone.state_dict(), path)
    # timm's strict load reports it (torch's wording: "Missing key(s)", "Unexpected key(s)").
    with pytest.raises(WeightsMismatchError, match=r"(?i)missing key.*\n.*unexpected key") as info:
        create_model(**VIT, pretrained=str(path))
    assert "resnet.pt" in str(info.value)

    path = tmp_path / "other_dim.pt"
    _save(create_model(**{**VIT, "embed_dim": 8}).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="shape mismatch.*head"):
        create_model(**VIT, pretrained=str(path))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": socket.AddressFamily}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)


def test_safetensors_metadata_sets_preprocessing(tmp_path):
    from safetensors.torch import save_file

    src = create_model(**VIT)
    meta = {"backbone": "test_vit", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    path = tmp_path / "fetched.safetensors"
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(path),
              metadata={"rskdist": json.dumps(meta)})
    model = create_model(**VIT, pretrained=str(path))
    assert model.mean == (0.1, 0.2, 0.3) and model.std == (0.4, 0.5, 0.6)


def test_open_clip_full_clip_checkpoint_and_round_trip(tmp_path):
    torch.manual_seed(1)
    src = create_model(**OC_TINY).eval()
    # A full CLIP checkpoint: visual.* plus text-tower keys that must be ignored.
    clip_state = {f"visual.{k}": v for k, v in src.backbone.state_dict().items()}
    clip_state.update({"logit_scale": torch.ones([]), "token_embedding.weight": torch.zeros(10, 4)})
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip_state}, path)
    dst = create_model(**OC_TINY, pretrained=str(path)).eval()
    x = _images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.backbone(x), src.backbone(x), rtol=0, atol=0)
    whole = tmp_path / "whole.safetensors"
    _save(src.state_dict(), whole)
    again = create_model(**OC_TINY, pretrained=str(whole)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), src(x), rtol=0, atol=0)


def test_timm_file_with_classifier_still_loads_strictly(tmp_path):
    """Dropping the classifier must not relax the load: a file lacking a backbone key is refused."""
    import timm

    state = timm.create_model("test_vit", num_classes=1000).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    path = tmp_path / "partial.safetensors"
    _save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"(?i)missing key.*blocks\.0\.attn\.qkv\.weight") as info:
        create_model(**VIT, pretrained=str(path))
    assert "partial.safetensors" in str(info.value)


def test_open_clip_weights_at_other_image_size(tmp_path):
    """Pins _resample_open_clip_pos_embed (open_clip.model.resize_pos_embed, open_clip 3.3.0):
    a tower saved at 64 px (2x2 grid + class token) loads into a 96 px tower (3x3 grid)."""
    torch.manual_seed(1)
    src = create_model(**OC_TINY)
    path = tmp_path / "tower64.safetensors"
    _save(src.backbone.state_dict(), path)
    dst = create_model(**{**OC_TINY, "image_size": 96}, pretrained=str(path))
    assert dst.image_size == 96
    pos_src, pos_dst = src.backbone.positional_embedding, dst.backbone.positional_embedding
    assert pos_src.shape[0] == 1 + 2 * 2 and pos_dst.shape[0] == 1 + 3 * 3
    torch.testing.assert_close(pos_dst[0], pos_src[0], rtol=0, atol=0)  # class token kept as is
    torch.testing.assert_close(dst.backbone.conv1.weight, src.backbone.conv1.weight, rtol=0, atol=0)
    with torch.no_grad():
        assert dst(_images(1, 96)).shape == (1, 16)


def test_open_clip_file_metadata_sets_quick_gelu_and_preprocessing(tmp_path):
    """fetch_weights' metadata (open_clip tag, mean/std) selects QuickGELU and the preprocessing."""
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    tiny_b32 = dict(backbone="open_clip:ViT-B-32", image_size=64, embed_dim=16,
                    backbone_kwargs={"layers": 1, "width": 64})
    src = create_model(**tiny_b32)
    assert not src.info["quick_gelu"] and not any(isinstance(m, QuickGELU) for m in src.modules())
    meta = {"open_clip_tag": "openai", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    path = tmp_path / "b32.safetensors"
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(path),
              metadata={"rskdist": json.dumps(meta)})
    model = create_model(**tiny_b32, pretrained=str(path))
    assert model.info["quick_gelu"] and any(isinstance(m, QuickGELU) for m in model.modules())
    assert model.mean == (0.1, 0.2, 0.3) and model.std == (0.4, 0.5, 0.6)
    assert model.interpolation == "bicubic" and model.image_size == 64
    forced = create_model(**{**tiny_b32, "backbone_kwargs": {**tiny_b32["backbone_kwargs"], "quick_gelu": False}},
                          pretrained=str(path))
    assert not any(isinstance(m, QuickGELU) for m in forced.modules())


def test_open_clip_tower_builds_on_meta_device():
    """Config checks build architectures on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        model = create_model(**OC_TINY)
    assert all(p.is_meta for p in model.parameters())

def test_open_clip_timm_tower_drop_path_and_checkpointing():
    # convnext_base's config has a timm trunk; test_vit replaces it to keep the test small.
    model = create_model("open_clip:convnext_base", image_size=32, embed_dim=16, drop_path_rate=0.2,
                         grad_checkpointing=True,
                         backbone_kwargs={"timm_model_name": "test_vit", "timm_pool": "token"})
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert model.grad_checkpointing and model.backbone.trunk.grad_checkpointing
    assert model.image_size == 32
    assert model.train()(_images(2, 32)).shape == (2, 16)


def test_open_clip_tags_download_from_hf_hub():
    """_open_clip_download relies on open_clip fetching every tag through huggingface_hub, so
    HF_HUB_OFFLINE and its cache apply (a URL-only tag would go to urllib, which ignores both)."""
    import open_clip

    url_only = [(m, t) for m, t in open_clip.list_pretrained() if not open_clip.get_pretrained_cfg(m, t).get("hf_hub")]
    assert not url_only


def test_weights_module_does_not_import_model_libraries():
    """The config module imports looks_like_path at start-up: no timm/open_clip import there."""
    import subprocess
    import sys

    code = ("import sys; from rskdist.models.weights import looks_like_path; "
            "print(sorted(m for m in ('timm', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- hub weights while offline -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_offline_hub_weights_give_clear_error(no_network):
    with pytest.raises(WeightsNotFoundError) as info:
        create_model("test_vit", pretrained="hub")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "test_vit.r160_in1k" in msg and "timm/test_vit.r160_in1k" in msg
    assert "python -m rskdist.models.fetch_weights test_vit.r160_in1k" in msg
    assert "model.pretrained=/path/to/test_vit.r160_in1k.safetensors" in msg

    with pytest.raises(WeightsNotFoundError) as info:
        create_model("open_clip:ViT-B-32", pretrained="openai")
    msg = str(info.value)
    assert "'ViT-B-32' tag 'openai'" in msg and "--pretrained openai" in msg
    assert "model.pretrained=/path/to/ViT-B-32.openai.safetensors" in msg


# --- frozen BN, determinism, checkpointing -----------------------------------------------


def test_batchnorm_stays_frozen_in_train_mode():
    model = create_model("test_resnet", embed_dim=16).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns)
    assert model.training and model.head.training
    assert all(p.requires_grad for bn in bns for p in bn.parameters())  # affine still trained
    before = [bn.running_mean.clone() for bn in bns]
    x = _images(4, 64)
    out1 = model(x)
    out2 = model(x)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for bn, rm in zip(bns, before):
        assert torch.equal(bn.running_mean, rm)
    model.eval().train()  # toggling keeps them frozen
    assert all(not bn.training for bn in bns)


def test_batch_norm_types_cover_torch_and_timm():
    """freeze_bn's public list of BatchNorm classes holds every BatchNorm torch and timm define:
    each subclass of torch's private base class, quantized (inference-only) modules aside."""
    import timm.layers  # noqa: F401  (defines BatchNormAct2d, SyncBatchNormAct, SplitBatchNorm2d)

    from rskdist.models.model import BATCH_NORM_TYPES

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = {c for c in subclasses(nn.modules.batchnorm._BatchNorm) if not c.__module__.startswith("torch.ao.")}
    assert {nn.BatchNorm2d, nn.SyncBatchNorm, timm.layers.BatchNormAct2d} <= found
    assert [c.__name__ for c in found if not issubclass(c, BATCH_NORM_TYPES)] == []


def test_unfrozen_batchnorm_warns():
    with pytest.warns(UserWarning, match="freeze_bn=False"):
        model = create_model("test_resnet", embed_dim=16, freeze_bn=False).train()
    assert any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_stochastic_forward_is_reproducible_under_fixed_rng():
    model = create_model(**VIT, drop_path_rate=0.3, backbone_kwargs={"drop_rate": 0.2}).train()
    x = _images()

    def seeded_forward(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model(x)

    with torch.no_grad():
        first = seeded_forward(7)
    recomputed = seeded_forward(7)  # the second (with-grad) pass of the two-pass step
    torch.testing.assert_close(recomputed.detach(), first, rtol=0, atol=0)
    assert not torch.equal(seeded_forward(8).detach(), first)  # dropout is really active


@pytest.mark.parametrize("kwargs, size", [(VIT, 32), (OC_TINY, 64)], ids=["timm_vit", "open_clip"])
def test_grad_checkpointing_gives_same_gradients(kwargs, size):
    drop = {"drop_path_rate": 0.2} if kwargs is VIT else {}
    torch.manual_seed(0)
    plain = create_model(**kwargs, **drop).train()
    ckpt = create_model(**kwargs, **drop, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = _images(2, size)
    target = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (plain, ckpt):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            loss = (model(x) * target).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# --- optimizer groups and logging helpers ------------------------------------------------


def test_param_groups_exclude_norms_biases_and_embeddings():
    model = create_model(**VIT)
    decay, no_decay = param_groups(model, 4e-4)
    assert decay["weight_decay"] == 4e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("backbone.cls_token", "backbone.pos_embed", "head.0.weight", "head.1.bias",
                 "backbone.blocks.0.norm1.weight"):
        assert id(named[name]) in no_decay_ids, name
    assert id(named["head.1.weight"]) not in no_decay_ids
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == count_params(model)
    (single,) = param_groups(model, 4e-4, exclude_norm_bias=False)
    assert len(single["params"]) == len(named)


def test_count_params_and_describe():
    model = create_model(**VIT, grad_checkpointing=True)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.head[1].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - 64 * 16
    text = describe(model)
    assert text.startswith("RetrievalModel(backbone=test_vit")
    assert "grad_checkpointing=True" in text and "image_size=32" in text
    assert isinstance(model, RetrievalModel)


def test_fetch_weights_file_loads_back(tmp_path, monkeypatch):
    """fetch_weights' output (backbone state + metadata) restores weights and mean/std."""
    from rskdist.models import fetch_weights

    torch.manual_seed(4)
    src = create_model(**VIT)
    src.mean, src.std = (0.1, 0.1, 0.1), (0.2, 0.2, 0.2)
    monkeypatch.setattr(fetch_weights, "create_model", lambda backbone, pretrained: src)  # no download
    out = tmp_path / "w" / "test_vit.safetensors"
    fetch_weights.main(["test_vit", "--out", str(out)])
    model = create_model(**VIT, pretrained=str(out)).eval()
    torch.testing.assert_close(model.backbone.pos_embed, src.backbone.pos_embed, rtol=0, atol=0)
    assert model.mean == (0.1, 0.1, 0.1) and model.std == (0.2, 0.2, 0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, feat_dim, size",
    [
        ("vit_base_patch32_224", 768, 224),
        ("vit_base_patch16_224", 768, 224),
        ("vit_large_patch16_224", 1024, 224),
        ("resnet50", 2048, 224),
        ("open_clip:ViT-B-32", 512, 224),
        ("open_clip:ViT-L-14", 768, 224),
    ],
)
def test_paper_backbones_build_and_run(backbone, feat_dim, size, request):
    # Full-size models (up to 300M params): only when slow tests are asked for (`make test-slow`).
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size backbone; run with -m slow")
    model = create_model(backbone, grad_checkpointing=not backbone.startswith("resnet")).eval()
    assert model.feat_dim == feat_dim and model.image_size == size
    with torch.no_grad():
        emb = model(_images(1, size))
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))
