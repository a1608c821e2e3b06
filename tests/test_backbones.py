"""The foundation-model backbone families (docs/models.md, "Foundation-model backbones"):
ImageNet-21k ViTs (timm), DINOv2 ViTs (timm), CLIP ViTs (open_clip).

For each family a tiny random model (depth 1-2, width 32-64) is saved in that family's own
file format, written by the library's own exporter where it has one (timm's and open_clip's
Hugging Face Hub layouts: weights + config file), or in the original release layout (Meta's
DINOv2 .pth, OpenAI's CLIP state dict). It is then loaded through the path a user's
`model.pretrained: <file>` takes (create_model), and every loaded tensor is compared with
the saved one, so a load that silently fell back to random init fails. Preprocessing (mean,
std, native size) is checked to come from the weights' config, not from defaults.
No network: HF_HUB_OFFLINE and refused sockets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rskdist.config import load_config
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.models import WeightsMismatchError, WeightsNotFoundError, create_model, describe, read_state_dict

ROOT = Path(__file__).resolve().parents[1]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny members of each family: the real names (so the registry entries of the real weights
# apply: tag, mean/std, LayerScale, ...) with small widths and depths.
TINY_TIMM = dict(depth=2, embed_dim=32, num_heads=2)
IN21K = "vit_base_patch16_224.augreg_in21k"
DINOV2 = "vit_base_patch14_dinov2.lvd142m"
DINOV2_REG = "vit_base_patch14_reg4_dinov2.lvd142m"
TINY_TOWER = dict(layers=2, width=64, patch_size=16)


@pytest.fixture(autouse=True)
def offline(no_network):
    """Every test here runs offline (tests/conftest.py)."""


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every tensor with distinct random values (LayerScale gammas and zero-initialised
    tokens included, so no tensor equals its init) and return a copy of the state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], skip=()) -> None:
    assert sorted(loaded) == sorted(expected)
    for key in expected:
        if key not in skip:
            torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=key)


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(cfg))


def _timm_hub_folder(arch_tag: str, folder: Path, *, img_size: int, num_classes: int, seed: int):
    """A tiny timm model saved by timm's own exporter: model.safetensors + config.json."""
    import timm
    from timm.models import save_for_hf

    src = timm.create_model(arch_tag, img_size=img_size, num_classes=num_classes, **TINY_TIMM)
    state = _randomize(src, seed)
    save_for_hf(src, str(folder), safe_serialization=True)
    return folder / "model.safetensors", state


def _resampled(pos: torch.Tensor, grid: int, num_prefix: int) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=num_prefix)


# --- ImageNet-21k ViT (timm) ----------------------------------------------------------------


def test_in21k_vit_from_timm_hub_folder(tmp_path):
    """model.safetensors + config.json as on the hub (classifier of 21k classes there, 5 here):
    every backbone tensor loads; mean/std/native size are config.json's."""
    path, saved = _timm_hub_folder(IN21K, tmp_path, img_size=48, num_classes=5, seed=0)
    backbone_saved = {k: v for k, v in saved.items() if not k.startswith("head.")}

    model = create_model(IN21K, pretrained=str(path), embed_dim=16, backbone_kwargs=TINY_TIMM)
    assert model.image_size == 48 and model.info["native_image_size"] == 48  # config.json's, not 224
    _assert_same(model.backbone.state_dict(), backbone_saved)
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    assert model.info["preprocessing"] == str(tmp_path / "config.json")
    assert model.info["pool"] == "token (CLS)" and model.feat_dim == 32

    # At another size: the position grid (3x3 + CLS) is resampled to 2x2, the rest is exact.
    at32 = create_model(IN21K, pretrained=str(path), image_size=32, embed_dim=16, backbone_kwargs=TINY_TIMM)
    _assert_same(at32.backbone.state_dict(), backbone_saved, skip={"pos_embed"})
    torch.testing.assert_close(at32.backbone.pos_embed, _resampled(saved["pos_embed"], 2, 1), rtol=0, atol=0)
    assert "position grid resampled" in describe(at32)

    # The preprocessing follows the file's config, whatever it says ...
    _edit_json(tmp_path / "config.json", pretrained_cfg__mean=[0.25, 0.3, 0.35], pretrained_cfg__std=[0.2, 0.2, 0.2])
    edited = create_model(IN21K, pretrained=str(path), embed_dim=16, backbone_kwargs=TINY_TIMM)
    assert edited.mean == (0.25, 0.3, 0.35) and edited.std == (0.2, 0.2, 0.2)
    # ... and without one, the timm registry entry of the tag in the name (the real in21k weights').
    (tmp_path / "config.json").unlink()
    bare = create_model(IN21K, pretrained=str(path), image_size=48, embed_dim=16, backbone_kwargs=TINY_TIMM)
    assert bare.mean == (0.5, 0.5, 0.5) and bare.info["native_image_size"] == 224
    assert "vit_base_patch16_224.augreg_in21k" in bare.info["preprocessing"]
    _assert_same(bare.backbone.state_dict(), backbone_saved)


def test_config_json_of_another_library_is_ignored(tmp_path):
    """A transformers-style config.json (no "architecture") beside a timm file is not timm's."""
    path, saved = _timm_hub_folder(IN21K, tmp_path, img_size=32, num_classes=0, seed=1)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "image_mean": [0, 0, 0]}))
    model = create_model(IN21K, pretrained=str(path), image_size=32, embed_dim=16, backbone_kwargs=TINY_TIMM)
    assert model.mean == (0.5, 0.5, 0.5)
    _assert_same(model.backbone.state_dict(), saved)


# --- DINOv2 (timm) ----------------------------------------------------------------------------


def test_dinov2_from_timm_hub_folder_with_layerscale(tmp_path):
    """Native 42 px (3x3 grid of 14 px patches, like 518 px = 37x37), run at 28 px (2x2)."""
    path, saved = _timm_hub_folder(DINOV2, tmp_path, img_size=42, num_classes=0, seed=2)
    assert "blocks.1.ls2.gamma" in saved

    native = create_model(DINOV2, pretrained=str(path), embed_dim=16, backbone_kwargs=TINY_TIMM)
    assert native.image_size == 42  # config.json's size, not the registry's 518
    _assert_same(native.backbone.state_dict(), saved)

    model = create_model(DINOV2, pretrained=str(path), image_size=28, embed_dim=16, backbone_kwargs=TINY_TIMM)
    _assert_same(model.backbone.state_dict(), saved, skip={"pos_embed"})
    torch.testing.assert_close(model.backbone.pos_embed, _resampled(saved["pos_embed"], 2, 1), rtol=0, atol=0)
    assert model.mean == IMAGENET_MEAN and model.std == IMAGENET_STD  # DINOv2 trains on ImageNet's
    assert model.info["native_image_size"] == 42 and model.info["pool"] == "token (CLS)"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 28, 28)).shape == (2, 16)


@pytest.mark.parametrize("arch", [DINOV2, DINOV2_REG], ids=["dinov2", "dinov2_reg4"])
def test_dinov2_meta_release_layout(tmp_path, arch):
    """Meta's dinov2_vit*14_pretrain.pth layout: mask_token; with registers, register_tokens and a
    position embedding that includes the CLS position. timm's filter converts it; the result must
    be the timm model it was made from."""
    import timm

    src = timm.create_model(arch, img_size=42, num_classes=0, **TINY_TIMM)
    saved = _randomize(src, 3)
    meta_state = dict(saved, mask_token=torch.randn(1, 32))
    if "reg_token" in saved:  # timm: no pos for CLS/registers; Meta: CLS has a position, folded into cls_token
        pos_cls = torch.randn(1, 1, 32)
        meta_state["register_tokens"] = meta_state.pop("reg_token")
        meta_state["cls_token"] = saved["cls_token"] - pos_cls
        meta_state["pos_embed"] = torch.cat([pos_cls, saved["pos_embed"]], dim=1)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(meta_state, path)

    model = create_model(arch, pretrained=str(path), image_size=42, embed_dim=16, backbone_kwargs=TINY_TIMM)
    _assert_same(model.backbone.state_dict(), saved, skip={"cls_token"})
    torch.testing.assert_close(model.backbone.cls_token, saved["cls_token"], rtol=0, atol=1e-6)  # (a - b) + b
    # No config beside the file: the registry entry of the DINOv2 tag (ImageNet mean/std, 518 px).
    assert model.mean == IMAGENET_MEAN and model.info["native_image_size"] == 518


# --- CLIP (open_clip) -------------------------------------------------------------------------


def _tiny_clip(name: str, *, image_size: int, quick_gelu: bool, seed: int):
    """A whole tiny CLIP model (image and text towers) and its model config, as open_clip saves it."""
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    model_cfg["vision_cfg"] = dict(TINY_TOWER, image_size=image_size)
    model_cfg["text_cfg"] = dict(model_cfg["text_cfg"], layers=1, width=64, heads=1)
    model_cfg["quick_gelu"] = quick_gelu
    clip = open_clip.create_model(name, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"],
                                  quick_gelu=quick_gelu, force_preprocess_cfg=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
    return clip, model_cfg, _randomize(clip, seed)


def _visual(state: dict) -> dict:
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


def test_clip_from_open_clip_hub_folder(tmp_path):
    """open_clip_model.safetensors (whole CLIP) + open_clip_config.json, written by open_clip's
    exporter; mean/std 0.5 as for the LAION ViT-L-14 weights (not open_clip's OpenAI default);
    QuickGELU taken from the config's model_cfg."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    clip, model_cfg, saved = _tiny_clip("ViT-B-16", image_size=32, quick_gelu=True, seed=4)
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "open_clip_model.safetensors"))
    save_config_for_hf(clip, tmp_path / "open_clip_config.json", model_cfg)
    path = tmp_path / "open_clip_model.safetensors"

    model = create_model("open_clip:ViT-B-16", pretrained=str(path), image_size=None, embed_dim=16,
                         backbone_kwargs=dict(TINY_TOWER))
    _assert_same(model.backbone.state_dict(), _visual(saved))
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    assert model.image_size == 32 and model.info["quick_gelu"]
    assert any(isinstance(m, QuickGELU) for m in model.modules())
    assert model.info["pool"].startswith("open_clip tower output") and model.feat_dim == 512  # CLIP projection

    at48 = create_model("open_clip:ViT-B-16", pretrained=str(path), image_size=48, embed_dim=16,
                        backbone_kwargs=dict(TINY_TOWER))
    _assert_same(at48.backbone.state_dict(), _visual(saved), skip={"positional_embedding"})
    assert at48.backbone.positional_embedding.shape[0] == 1 + 3 * 3 and at48.info["native_image_size"] == 32


def test_clip_openai_release_layout(tmp_path):
    """OpenAI's CLIP state dict (torch.jit.load(...).state_dict()): the whole model plus
    input_resolution / context_length / vocab_size entries; OpenAI trained with QuickGELU."""
    from open_clip.transformer import QuickGELU

    _, _, saved = _tiny_clip("ViT-B-16-quickgelu", image_size=32, quick_gelu=True, seed=5)
    openai_state = dict(saved, input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                        vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-B-16.state_dict.pt"
    torch.save(openai_state, path)

    model = create_model("open_clip:ViT-B-16-quickgelu", pretrained=str(path), image_size=32, embed_dim=16,
                         backbone_kwargs=dict(TINY_TOWER))
    _assert_same(model.backbone.state_dict(), _visual(saved))
    assert model.mean == OPENAI_MEAN and model.std == OPENAI_STD
    assert any(isinstance(m, QuickGELU) for m in model.modules())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_release_file_is_refused_with_the_conversion(tmp_path):
    """OpenAI's original .pt files are TorchScript archives: refused, with the one-line re-save."""
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match=r"TorchScript archive.*torch\.jit\.load\('IN\.pt'"):
        read_state_dict(path)


# --- files that do not fit -------------------------------------------------------------------


def test_in21k_file_into_dinov2_names_both_layouts_and_the_fix(tmp_path):
    path, _ = _timm_hub_folder(IN21K, tmp_path, img_size=28, num_classes=0, seed=6)
    with pytest.raises(WeightsMismatchError) as info:
        create_model(DINOV2, pretrained=str(path), image_size=28, embed_dim=16, backbone_kwargs=TINY_TIMM)
    text = str(info.value)
    assert str(path) in text and DINOV2 in text
    assert "the file holds   a timm ViT (width 32, depth 2, patch 16, no LayerScale" in text
    assert "the backbone is  a timm ViT (width 32, depth 2, patch 14, LayerScale" in text
    assert f"set model.backbone={IN21K}" in text  # from the file's config.json
    assert f"fetch_weights {DINOV2} --out" in text


def test_file_of_another_architecture_with_the_same_layout_warns(tmp_path):
    path, saved = _timm_hub_folder(IN21K, tmp_path, img_size=32, num_classes=0, seed=9)
    with pytest.warns(UserWarning, match=rf"made for {IN21K} .*model.backbone is vit_base_patch16_384"):
        model = create_model("vit_base_patch16_384", pretrained=str(path), image_size=32, embed_dim=16,
                             backbone_kwargs=TINY_TIMM)
    _assert_same(model.backbone.state_dict(), saved)


def test_clip_file_into_timm_vit_points_to_open_clip(tmp_path):
    _, _, saved = _tiny_clip("ViT-B-16", image_size=32, quick_gelu=False, seed=7)
    path = tmp_path / "clip.pt"
    torch.save(saved, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_model(IN21K, pretrained=str(path), image_size=32, embed_dim=16, backbone_kwargs=TINY_TIMM)
    text = str(info.value)
    assert "the file holds   a whole CLIP model" in text and "open_clip / OpenAI CLIP ViT image tower" in text
    assert "use model.backbone=open_clip:<config>" in text


def test_open_clip_tower_of_another_size_names_both_layouts(tmp_path):
    _, _, saved = _tiny_clip("ViT-B-16", image_size=32, quick_gelu=False, seed=8)
    path = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    with pytest.raises(WeightsMismatchError) as info:
        create_model("open_clip:ViT-B-16", pretrained=str(path), image_size=32, embed_dim=16,
                     backbone_kwargs=dict(TINY_TOWER, layers=1))
    text = str(info.value)
    assert "width 64, 2 layers, patch 16" in text and "width 64, 1 layers, patch 16" in text
    assert "fetch_weights open_clip:ViT-B-16 --out" in text


def test_fetched_timm_file_offered_to_open_clip_names_both(tmp_path):
    from safetensors.torch import save_file

    import timm

    src = timm.create_model(DINOV2, img_size=28, num_classes=0, **TINY_TIMM)
    path = tmp_path / "dinov2.safetensors"
    meta = {"backbone": DINOV2, "pretrained": "hub", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "image_size": 518}
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={"rskdist": json.dumps(meta)})
    with pytest.raises(WeightsMismatchError, match=rf"made for the timm backbone {DINOV2} .*model.backbone is the open_clip backbone open_clip:ViT-B-16"):
        create_model("open_clip:ViT-B-16", pretrained=str(path), image_size=32, embed_dim=16,
                     backbone_kwargs=dict(TINY_TOWER))
    with pytest.raises(ValueError) as info:  # and the fix it names is right
        create_model("open_clip:ViT-B-16", pretrained=str(path))
    assert f"Set model.backbone={DINOV2}" in str(info.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "backbone, pretrained, kwargs",
    [
        ("vit_large_patch16_224.augreg_in21k", "hub", TINY_TIMM),
        ("vit_large_patch14_dinov2.lvd142m", "hub", TINY_TIMM),
        ("open_clip:ViT-L-14", "openai", dict(TINY_TOWER)),
    ],
    ids=["in21k", "dinov2", "clip"],
)
def test_offline_hub_names_the_fetch_command(backbone, pretrained, kwargs):
    with pytest.raises(WeightsNotFoundError) as info:
        create_model(backbone, pretrained=pretrained, image_size=32, embed_dim=16, backbone_kwargs=kwargs)
    text = str(info.value)
    if backbone.startswith("open_clip:"):
        assert f"python -m rskdist.models.fetch_weights {backbone} --pretrained {pretrained} --out" in text
    else:
        assert f"python -m rskdist.models.fetch_weights {backbone} --out" in text
    assert f"model.backbone={backbone} model.pretrained=/path/to/" in text


# --- shipped configs -------------------------------------------------------------------------

# config -> (pooled feature width, native size, mean, std) of the real weights, for docs/models.md's table.
FAMILY_CONFIGS = {
    "sop_vit_b16.yaml": (768, 224, (0.5,) * 3, (0.5,) * 3),
    "sop_vit_l16.yaml": (1024, 224, (0.5,) * 3, (0.5,) * 3),
    "sop_clip_vit_b16.yaml": (512, 224, OPENAI_MEAN, OPENAI_STD),
    "sop_clip_vit_l14.yaml": (768, 224, OPENAI_MEAN, OPENAI_STD),
    "sop_dinov2_vit_b14.yaml": (768, 518, IMAGENET_MEAN, IMAGENET_STD),
    "sop_dinov2_vit_l14.yaml": (1024, 518, IMAGENET_MEAN, IMAGENET_STD),
    "sop_swag_regnety_160.yaml": (3024, 224, IMAGENET_MEAN, IMAGENET_STD),
}
# sop_openclip_vit_l14.yaml is not above: a LAION tag's mean/std reach an open_clip model only
# with its weights (built without, a tower takes open_clip's OpenAI defaults); see below.


def test_openclip_laion_config_names_weights_with_their_own_preprocessing():
    import open_clip

    m = load_config(ROOT / "configs" / "sop_openclip_vit_l14.yaml").model
    assert m.backbone == "open_clip:ViT-L-14" and m.pretrained == "laion2b_s32b_b82k"
    registry = open_clip.get_pretrained_cfg("ViT-L-14", m.pretrained)
    assert tuple(registry["mean"]) == tuple(registry["std"]) == (0.5,) * 3  # docs/models.md's table
    assert m.normalization == "imagenet"  # the configs' rule (docs/reproducing.md)


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_family_config_preprocessing_is_the_weights(name):
    """Each family's config, built on the meta device with the preprocessing of the weights it
    names (registry entry of the timm tag / open_clip tag), reports what the docs table says."""
    import open_clip
    import timm

    feat_dim, native, mean, std = FAMILY_CONFIGS[name]
    m = load_config(ROOT / "configs" / name).model
    with torch.device("meta"):
        model = create_model(m.backbone, embed_dim=m.embed_dim, image_size=m.image_size)
    if m.backbone.startswith("open_clip:"):
        registry = open_clip.get_pretrained_cfg(m.backbone.removeprefix("open_clip:"), m.pretrained)
    else:
        registry = timm.models.get_pretrained_cfg(m.backbone).to_dict()
        assert model.info["native_image_size"] == registry["input_size"][-1]
    assert tuple(registry["mean"]) == model.mean == pytest.approx(mean)
    assert tuple(registry["std"]) == model.std == pytest.approx(std)
    assert model.feat_dim == feat_dim and model.image_size == 224
    assert model.info["native_image_size"] == native
