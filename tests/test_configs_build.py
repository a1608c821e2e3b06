"""Every shipped config builds: load + validate at its intended world size, then the
model (on the meta device: shapes only, no memory, no weights), the optimizer, the
DeepSpeed config (parsed by DeepSpeed itself) and the LR schedule. No data loaders
(no shards here) and no downloads; the pretrained source is checked to exist in
timm's / open_clip's registries instead.

The paper configs (configs/<dataset>_<backbone>.yaml) are also compared with the
training settings of docs/method.md section 5, so a typo in an LR or a drop epoch fails here;
they use the published code's epoch (data.sampler=reference), and on a label set with the
split's class-size histogram (tests/label_sets.py) the Trainer's schedule is checked
against that epoch's lengths, so the LR drops land where the published code's do. The
4-node config keeps the balanced sampler with epochs of the dataset, as its header says.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from label_sets import paper_labels
from rskdist.config import load_config, validate
from rskdist.data.sampler import ReferencePlan, make_plan
from rskdist.eval import default_ks
from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD
from rskdist.models import GeM
from rskdist.build import build_model, build_optimizer, deepspeed_config, lr_factor
from rskdist.startup import batch_layout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

DATASETS = ("inat", "sop", "cars196", "cub")
BACKBONES = {  # config suffix -> backbone
    "r50": "resnet50.tv_in1k",
    "vit_b32": "vit_base_patch32_224.augreg_in21k",
    "vit_b16": "vit_base_patch16_224.augreg_in21k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k",
    "clip_vit_l14": "open_clip:ViT-L-14",
}
FEAT_DIM = {"r50": 2048, "vit_b32": 768, "vit_b16": 768, "vit_l16": 1024, "clip_vit_l14": 768,
            # the other foundation models of docs/models.md (configs/sop_*.yaml, outside the paper table)
            "clip_vit_b16": 512, "dinov2_vit_b14": 768, "dinov2_vit_l14": 1024, "openclip_vit_l14": 768,
            "swag_regnety_160": 3024}

# docs/method.md section 5: batch, (R50, ViT) epochs, (R50, ViT) LR drops, LR for R50 / ViT-B/32 / ViT-B/16.
PAPER = {
    "inat": dict(batch=4000, epochs=(90, 90), drops=([40, 70], [10, 40, 70]), lr=(1e-4, 5e-5, 5e-5)),
    "sop": dict(batch=4000, epochs=(55, 55), drops=([25, 50], [25, 50]), lr=(2e-4, 5e-5, 5e-5)),
    "cars196": dict(batch=392, epochs=(170, 50), drops=([80, 140], [20, 30, 40]), lr=(1e-4, 3e-5, 1e-5)),
    "cub": dict(batch=400, epochs=(40, 40), drops=([10, 20, 30], [10, 20, 30]), lr=(1e-4, 3e-5, 1e-5)),
}
# ViT-L/16 and CLIP ViT-L/14 are not in the table: they take the ViT-B/16 settings.
LR_INDEX = {"r50": 0, "vit_b32": 1, "vit_b16": 2, "vit_l16": 2, "clip_vit_l14": 2}
PAPER_CONFIGS = [f"{d}_{b}.yaml" for d in DATASETS for b in BACKBONES]
# Every config that mirrors a paper setting, including the 4-node one at another batch.
PAPER_MIRRORS = [*PAPER_CONFIGS, "inat_vit_l16_4node.yaml"]


def intended_world_size(path: Path) -> int:
    """The `# world_size: N` header line; configs without one (debug, demo) are for 1 rank."""
    match = re.search(r"^# world_size: (\d+)\s*$", path.read_text(), re.M)
    return int(match.group(1)) if match else 1


def test_all_paper_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    missing = [n for n in [*PAPER_CONFIGS, "inat_vit_l16_4node.yaml"] if n not in names]
    assert not missing, f"missing configs: {missing}"


@pytest.mark.parametrize("name", [*PAPER_CONFIGS, "inat_vit_l16_4node.yaml"])
def test_paper_config_header_names_its_world_size_and_launch(name):
    text = (ROOT / "configs" / name).read_text()
    assert re.search(r"^# world_size: \d+\s*$", text, re.M), f"{name}: no '# world_size: N' line"
    assert f"configs/{name}" in text.split("\nrun:")[0], f"{name}: no launch command in the header"
    assert "docs/method.md section 5" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_everything_but_weights(path):
    world_size = intended_world_size(path)
    cfg = load_config(path)
    validate(cfg, world_size=world_size, check_paths=False)  # no shards or weights on this machine
    validate(cfg, world_size=1, check_paths=False)  # a one-process run must stay possible (tests/test_config.py)
    d = cfg.data

    if d.source == "shards":
        assert d.root, "shards configs must name data.root (overridden on the command line)"
    ks = cfg.eval.ks or default_ks(d.dataset)  # raises for an unknown dataset
    assert all(k >= 1 for k in ks)

    # Model: architecture only, on the meta device (ViT-L would take ~1.2 GB and seconds on CPU).
    with torch.device("meta"):
        model = build_model(cfg.model, pretrained=False)
    assert model.embed_dim == cfg.model.embed_dim and model.image_size == cfg.model.image_size
    assert all(p.is_meta for p in model.parameters())
    if cfg.model.normalization == "imagenet":  # what the data pipeline will normalise with
        assert model.mean == IMAGENET_MEAN and model.std == IMAGENET_STD
    if cfg.model.gem_learnable:
        assert isinstance(model.pool, GeM) and model.pool.learnable
    paper = re.fullmatch(r"(?:inat|sop|cars196|cub|vehicleid)_(\w+?)(?:_4node)?", path.stem)
    if paper:  # the pooled feature the paper's head sees (GeM for R50, CLS token / projection for ViTs)
        assert model.feat_dim == FEAT_DIM[paper.group(1)]
    _check_pretrained_source(cfg.model.backbone, cfg.model.pretrained)

    # Optimizer: built on the meta parameters exactly as the Trainer builds it.
    opt = build_optimizer(model, cfg.optim)
    assert type(opt).__name__.lower() == cfg.optim.name
    assert opt.param_groups[0]["lr"] == cfg.optim.lr
    assert opt.param_groups[0]["weight_decay"] == cfg.optim.weight_decay

    # DeepSpeed config: the Trainer's arithmetic, then DeepSpeed's own parser.
    layout = batch_layout(cfg, world_size)
    local_batch, num_chunks = layout.local_batch, layout.num_chunks
    assert local_batch == d.global_batch // world_size and num_chunks == math.ceil(local_batch / d.chunk_size)
    assert local_batch % d.chunk_size == 0 or path.name in ("debug.yaml", "demo.yaml"), (
        f"chunk_size {d.chunk_size} does not divide the local batch {local_batch}: a ragged last chunk"
    )
    ds = deepspeed_config(cfg.deepspeed, layout, grad_clip=cfg.optim.grad_clip)
    assert ds["train_batch_size"] == d.chunk_size * num_chunks * world_size
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    _deepspeed_parses(ds, world_size, cfg.deepspeed.precision)

    # LR schedule, with an arbitrary steps-per-epoch (the real one depends on the shards):
    # warm-up, then 1 until the first drop, decay_factor more per drop, every drop before the end.
    o, spe = cfg.optim, 7
    total = cfg.run.max_steps or round(cfg.run.epochs * spe)
    factor = [lr_factor(s, steps_per_epoch=spe, warmup_steps=o.warmup_steps, decay_epochs=o.decay_epochs,
                        decay_factor=o.decay_factor) for s in range(total)]
    assert all(0 < f <= 1 for f in factor)
    assert all(b <= a + 1e-12 for a, b in zip(factor[o.warmup_steps:], factor[o.warmup_steps + 1:]))
    if o.warmup_steps == 0:
        drops = [round(e * spe) for e in o.decay_epochs]
        assert all(step < total for step in drops), f"LR drop at epochs {o.decay_epochs} after the end"
        for i, step in enumerate(drops):
            assert factor[step - 1] == pytest.approx(o.decay_factor**i)
            assert factor[step] == pytest.approx(o.decay_factor ** (i + 1))
        assert factor[0] == 1.0 and factor[-1] == pytest.approx(o.decay_factor ** len(drops))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_matches_method_section_5(name):
    dataset, backbone = name[: -len(".yaml")].split("_", 1)
    paper, vit = PAPER[dataset], backbone != "r50"
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.data.dataset == dataset and cfg.data.source == "shards"
    assert cfg.model.backbone == BACKBONES[backbone]
    assert cfg.data.global_batch == paper["batch"] and cfg.data.m == 4
    assert cfg.run.epochs == paper["epochs"][vit] and cfg.run.max_steps == 0
    assert cfg.optim.decay_epochs == paper["drops"][vit]
    assert cfg.optim.lr == pytest.approx(paper["lr"][LR_INDEX[backbone]])
    assert cfg.optim.name == ("adamw" if vit else "adam")
    assert cfg.optim.weight_decay == pytest.approx(4e-4) and cfg.optim.decay_factor == pytest.approx(0.3)
    assert cfg.optim.warmup_steps == 0
    assert cfg.model.embed_dim == 512 and cfg.model.image_size == 224
    assert cfg.model.pool == "auto" and cfg.model.gem_p == 3.0  # ViT: CLS token, R50: GeM p=3
    # The published code: R50's GeM exponent is learned; ImageNet mean/std for every backbone.
    assert cfg.model.gem_learnable == (not vit) and cfg.model.normalization == "imagenet"
    assert cfg.model.pretrained in ("hub", "openai")  # the paper fine-tunes pretrained weights
    # tau1 = k: the published code's default for the RS@k paper's numbers (docs/reproducing.md).
    assert cfg.loss.ks == [1, 2, 4, 8, 16] and cfg.loss.tau1 == "k" and cfg.loss.tau2 == 0.01
    # The Cars196 ResNet-50 number (80.7) was obtained without SiMix; every other row uses it.
    assert cfg.loss.mix == ("none" if name == "cars196_r50.yaml" else "simix") and not cfg.loss.count_self
    assert cfg.eval.ks == []  # the dataset's usual k list (rskdist.eval.DEFAULT_KS)


def test_vehicleid_config_matches_method_section_5():
    """VehicleID (docs/method.md section 5; no label set here, so no epoch check): the
    ResNet-50 settings, the k of its tables and its three test lists, each its own split."""
    cfg = load_config(ROOT / "configs" / "vehicleid_r50.yaml")
    assert cfg.data.dataset == "vehicleid" and default_ks("vehicleid") == (1, 5) and cfg.eval.ks == []
    assert cfg.data.test_splits == ["test_800", "test_1600", "test_2400"]
    assert cfg.data.global_batch == 4000 and cfg.data.m == 4 and cfg.run.epochs == 90
    assert cfg.optim.name == "adam" and cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.decay_epochs == [40, 70]
    assert cfg.optim.weight_decay == pytest.approx(4e-4) and cfg.optim.decay_factor == pytest.approx(0.3)
    assert cfg.model.backbone == BACKBONES["r50"] and cfg.model.gem_learnable
    assert cfg.model.normalization == "imagenet" and cfg.loss.tau1 == "k" and cfg.loss.mix == "simix"


@functools.lru_cache(maxsize=None)
def _paper_plan(dataset: str, global_batch: int, world_size: int, m: int, sampler: str, remainder: str,
                epoch_length: str):
    """The training stream's plan for a config, as the Trainer builds it (epoch_length -> steps_per_epoch)."""
    return make_plan(sampler, paper_labels(dataset), m=m, classes_per_rank=global_batch // world_size // m,
                     world_size=world_size, remainder=remainder,
                     steps_per_epoch=None if epoch_length == "auto" else epoch_length)


@functools.lru_cache(maxsize=None)
def _published_epoch_ends(dataset: str, epochs: int) -> list[int]:
    """The step at which each of the published code's epochs ends, at the paper's batch
    (rskdist's port of its law; tests/test_sampler_reference.py checks it against the loop)."""
    plan = ReferencePlan(paper_labels(dataset), m=4, classes_per_rank=PAPER[dataset]["batch"] // 4, world_size=1)
    return list(itertools.accumulate(plan.epoch_steps(e) for e in range(epochs)))


def _schedule(cfg, steps_per_epoch) -> tuple[list[int], int]:
    """The Trainer's schedule: the steps where the LR drops, and the number of steps."""
    o = cfg.optim
    total = cfg.run.max_steps or max(1, round(cfg.run.epochs * steps_per_epoch))
    factor = [lr_factor(s, steps_per_epoch=steps_per_epoch, warmup_steps=o.warmup_steps,
                        decay_epochs=o.decay_epochs, decay_factor=o.decay_factor) for s in range(total)]
    return [s for s in range(1, total) if factor[s] < factor[s - 1]], total


@pytest.mark.parametrize("name", PAPER_MIRRORS)
def test_paper_config_epoch_and_drops(name):
    """Paper configs: the published code's epoch, the LR drops and the end within 0.5% of the
    steps where its epochs end. The 4-node config: epochs of the dataset (images within 5%
    of the split), about 1.4x the images the published code shows (its header)."""
    path = ROOT / "configs" / name
    cfg = load_config(path)
    d = cfg.data
    world_size = intended_world_size(path)
    paper = PAPER[d.dataset]
    vit = not name.startswith(f"{d.dataset}_r50")
    plan = _paper_plan(d.dataset, d.global_batch, world_size, d.m, d.sampler, d.remainder, d.epoch_length)
    grid = plan.epoch_plan(0)  # the plan can be built at this size, every step full
    assert grid.shape == (plan.epoch_steps(0), world_size, d.global_batch // world_size // d.m, d.m)
    drops, total = _schedule(cfg, plan.steps_per_epoch)
    ends = _published_epoch_ends(d.dataset, paper["epochs"][vit])
    published = [ends[e - 1] for e in paper["drops"][vit]] + [ends[-1]]
    if name in PAPER_CONFIGS:
        assert d.sampler == "reference" and d.global_batch == paper["batch"]
        assert len(drops) == len(paper["drops"][vit])
        for ours, theirs in zip([*drops, total], published):
            assert abs(ours - theirs) <= max(1, 0.005 * theirs), (name, [*drops, total], published)
    else:
        num_images = len(paper_labels(d.dataset))
        assert d.sampler == "balanced" and d.epoch_length == "dataset"
        assert abs(plan.steps_per_epoch * d.global_batch / num_images - 1) <= 0.05
        assert [round(s / plan.steps_per_epoch) for s in drops] == paper["drops"][vit]
        seen = [s * d.global_batch / (p * paper["batch"]) for s, p in zip([*drops, total], published)]
        assert all(1.35 <= r <= 1.45 for r in seen), seen


@pytest.mark.parametrize("name", PAPER_MIRRORS)
def test_paper_config_lr_square_root_rule_for_other_batches(name):
    """docs/reproducing.md: LR = paper LR x sqrt(batch / paper batch) (Adam/AdamW), within rounding."""
    cfg = load_config(ROOT / "configs" / name)
    backbone = re.fullmatch(r"(?:inat|sop|cars196|cub)_(\w+?)(?:_4node)?", name[: -len(".yaml")]).group(1)
    paper = PAPER[cfg.data.dataset]
    expected = paper["lr"][LR_INDEX[backbone]] * math.sqrt(cfg.data.global_batch / paper["batch"])
    assert cfg.optim.lr == pytest.approx(expected, rel=0.02)


def test_headline_config_is_the_large_batch_multinode_one():
    path = ROOT / "configs" / "inat_vit_l16_4node.yaml"
    cfg = load_config(path)
    world_size = intended_world_size(path)
    assert world_size == 32 and cfg.data.global_batch >= 16384
    assert cfg.deepspeed.zero_stage in (2, 3) and cfg.deepspeed.precision == "bf16"
    assert cfg.model.grad_checkpointing and 256 <= cfg.data.chunk_size <= 512
    assert cfg.model.backbone.startswith("vit_large_patch16_224") and cfg.model.image_size == 224
    # fewer classes per step than iNaturalist has train classes (5,690), or batches cannot be built
    assert cfg.data.global_batch // cfg.data.m <= 5690


def _check_pretrained_source(backbone: str, pretrained: str) -> None:
    """The weights a config asks for exist in the registry (no download)."""
    from rskdist.models.weights import looks_like_path

    if not pretrained or looks_like_path(pretrained):
        return  # random init, or a local file (validate() checked it exists)
    if backbone.startswith("open_clip:"):
        import open_clip

        name = backbone[len("open_clip:"):]
        assert pretrained != "hub", "open_clip backbones need a tag (e.g. openai), not 'hub'"
        assert pretrained in open_clip.list_pretrained_tags_by_model(name)
    else:
        import timm

        assert pretrained == "hub", f"timm backbones take the tag in the name, got pretrained={pretrained!r}"
        pcfg = timm.models.get_pretrained_cfg(backbone)
        assert pcfg is not None and (pcfg.hf_hub_id or pcfg.url), f"timm has no weights for {backbone!r}"


def _deepspeed_parses(ds: dict, world_size: int, precision: str) -> None:
    """DeepSpeed's parser (pydantic ZeRO config, batch arithmetic) accepts the dict.

    Without a process group DeepSpeedConfig assumes one rank, so the batch is scaled to
    one rank's share; everything else is passed as generated.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = dict(ds, train_batch_size=ds["train_batch_size"] // world_size)
    parsed = DeepSpeedConfig(one_rank)
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
    assert parsed.gradient_accumulation_steps == ds["gradient_accumulation_steps"]
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
