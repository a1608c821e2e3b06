"""Config: strict loading, overrides, cross-field checks, and the entry point's messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rskdist.config import Config, load_config, markdown_reference, save_config, validate

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {global_batch: 128, m: 4}\nloss: {mix: none}\n")
    cfg = load_config(path, ["loss.tau2=0.05", "optim.decay_epochs=[10, 20]", "run.name=x"])
    assert cfg.data.global_batch == 128 and cfg.loss.mix == "none"
    assert cfg.loss.tau2 == 0.05 and cfg.optim.decay_epochs == [10, 20] and cfg.run.name == "x"
    assert cfg.optim.lr == Config().optim.lr  # untouched default


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_tau1_is_a_temperature_or_k():
    assert load_config(None, ["loss.tau1=k"]).loss.tau1 == "k"
    assert load_config(None, ["loss.tau1=2"]).loss.tau1 == 2.0 and load_config(None, []).loss.tau1 == 1.0
    validate(load_config(None, ["loss.tau1=k"]), world_size=1)
    with pytest.raises(ValueError, match="loss.tau1 and loss.tau2 must be > 0 .*got loss.tau1=-1.0"):
        validate(load_config(None, ["loss.tau1=-1"]), world_size=1)


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.tua2=0.1", r"unknown key 'loss.tua2'; valid keys here: .*tau2"),
        ("losss.tau2=0.1", r"unknown key 'losss'; valid keys here: .*loss"),
        ("data.global_batch=big", r"data.global_batch must be an integer"),
        ("loss.count_self=3", r"loss.count_self must be bool"),
        ("loss.simix=true", r"'loss.simix' was replaced: use loss.mix=simix"),
        ("loss.mix=cutmix", r"loss.mix='cutmix' is not one of 'simix', 'embedding', 'none'"),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage=4 is not one of 0, 1, 2, 3"),
        ("optim.name=lamb", r"optim.name='lamb' is not one of"),
        ("nokey", r"must look like section.key=value"),
        ("loss.tau1=K", r"loss.tau1='K' fits none of: loss.tau1 must be float.*is not one of 'k'"),
        ("loss.tau1=[1, 2]", r"loss.tau1=\[1, 2\] fits none of"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("optim.lr=1e-4", "lr", 1e-4),  # YAML 1.1 reads this as a string
        ("optim.lr=3E-5", "lr", 3e-5),
        ("optim.weight_decay=4e-4", "weight_decay", 4e-4),
        ("optim.warmup_steps=5e2", "warmup_steps", 500),  # an int written as an exact float
        ("optim.betas=[0.9, 9.99e-1]", "betas", [0.9, 0.999]),
        ("optim.decay_epochs=[1e1, 2e1]", "decay_epochs", [10.0, 20.0]),
    ],
)
def test_numbers_written_as_people_write_them(override, key, value):
    assert getattr(load_config(None, [override]).optim, key) == pytest.approx(value)


def test_numbers_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-4, warmup_steps: 1e3}\ndata: {global_batch: 4e3}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 1000 and cfg.data.global_batch == 4000
    assert isinstance(cfg.data.global_batch, int)


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.warmup_steps=2.5", r"optim.warmup_steps must be an integer, got float 2.5"),
        ("optim.warmup_steps=1e-1", r"optim.warmup_steps must be an integer"),
        ("optim.betas=[a, b]", r"optim.betas\[0\] must be float, got str 'a'"),
        ("eval.ks=[1, x]", r"eval.ks\[1\] must be an integer"),
        ("loss.ks=3", r"loss.ks must be a list"),
        ("data.crop_ratio=[1, no]", r"data.crop_ratio\[1\] must be float"),
        ("deepspeed.zero_stage=2.5", r"deepspeed.zero_stage must be an integer"),
    ],
)
def test_typed_fields_name_the_element(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    "extra,match",
    [
        ("{gradient_accumulation_steps: 4}", r"may not set gradient_accumulation_steps.*data.chunk_size"),
        ("{train_micro_batch_size_per_gpu: 8}", r"may not set train_micro_batch_size_per_gpu.*data.chunk_size"),
        ("{train_batch_size: 64}", r"may not set train_batch_size.*data.global_batch"),
        ("{fp16: {enabled: true}}", r"may not set fp16.enabled.*deepspeed.precision"),
        ("{zero_optimization: {stage: 3}}", r"deepspeed.zero_stage"),
    ],
)
def test_deepspeed_extra_cannot_override_what_the_step_owns(extra, match):
    with pytest.raises(ValueError, match=match):
        validate(load_config(None, [f"deepspeed.extra={extra}"]), world_size=1)
    validate(load_config(None, ["deepspeed.extra={zero_optimization: {overlap_comm: true}}"]), world_size=1)


def test_best_metric_must_be_evaluated():
    validate(load_config(None, ["eval.best_metric=map@r"]), world_size=1)
    validate(load_config(None, ["eval.ks=[1, 3]", "eval.best_metric=recall@3"]), world_size=1)
    with pytest.raises(ValueError, match=r"eval.best_metric='recall@3' is not evaluated; choose one of recall@1, "
                                         r"recall@2, recall@4, recall@8, map@r, r_precision"):
        validate(load_config(None, ["eval.best_metric=recall@3"]), world_size=1)
    with pytest.raises(ValueError, match="is not evaluated"):
        validate(load_config(None, ["eval.best_metric=recall"]), world_size=1)


def test_augmentation_settings_checked():
    validate(load_config(None, ["data.crop_ratio=[1, 1]", "data.hflip=false"]), world_size=1)
    with pytest.raises(ValueError, match="data.crop_ratio must be"):
        validate(load_config(None, ["data.crop_ratio=[1.5, 1]"]), world_size=1)


def test_settings_the_synthetic_source_ignores_are_named():
    from rskdist.config import ignored_settings

    assert ignored_settings(load_config(None)) == []
    cfg = load_config(None, ["data.num_workers=8", "data.hflip=false", "data.epoch_length=dataset"])
    assert ignored_settings(cfg) == ["data.num_workers", "data.hflip", "data.epoch_length"]
    assert ignored_settings(load_config(None, ["data.source=shards", "data.num_workers=8"])) == []
    proc = _train("--config", "configs/debug.yaml", "data.num_workers=7", "run.max_steps=0", "run.epochs=0")
    assert proc.returncode == 2  # stopped by the bad run length, after the warning
    assert "warning: data.num_workers is set, but data.source=synthetic does not use it" in proc.stderr


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: 3\n")
    with pytest.raises(ValueError, match="data must be a mapping"):
        load_config(nested)


def test_batch_split_checked_against_world_size():
    cfg = load_config(None, ["data.global_batch=96", "data.m=4"])
    validate(cfg, world_size=4)  # 24 per rank = 6 classes x 4
    with pytest.raises(ValueError, match="cannot be split over 5 ranks.*multiple of 20"):
        validate(cfg, world_size=5)
    with pytest.raises(ValueError, match="at least 2 images per class"):
        validate(load_config(None, ["data.m=1", "data.global_batch=8"]), world_size=1)
    with pytest.raises(ValueError, match="needs data.root"):
        validate(load_config(None, ["data.source=shards"]), world_size=1)


def test_missing_files_are_reported_before_start(tmp_path):
    cfg = load_config(None, ["data.source=shards", f"data.root={tmp_path}", "data.dataset=cub"])
    with pytest.raises(ValueError, match=r"holds no index.json.*make_shards.py cub"):
        validate(cfg, world_size=1)
    validate(cfg, world_size=1, check_paths=False)
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="not an rskdist shard index"):  # read at start-up: it counts classes
        validate(cfg, world_size=1)
    _write_index(tmp_path, train_classes=16)  # one global batch of the default config: 64 / m=4
    validate(cfg, world_size=1)
    with pytest.raises(ValueError, match="no such file"):
        validate(load_config(None, [f"model.pretrained={tmp_path}/w.safetensors"]), world_size=1)
    with pytest.raises(ValueError, match="no such file"):  # the factory's suffix list, not a second copy
        validate(load_config(None, ["model.pretrained=w.ckpt"]), world_size=1)
    validate(load_config(None, ["model.pretrained=augreg_in21k"]), world_size=1)  # a hub tag is no path


def test_fp16_without_zero_is_rejected_with_the_reason():
    """DeepSpeed's non-ZeRO fp16 optimizer makes updates 2^16 too small (see
    tests/test_precision_distributed.py); every other (precision, stage) pair is accepted."""
    for precision in ("fp32", "bf16", "fp16"):
        for stage in (0, 1, 2, 3):
            cfg = load_config(None, [f"deepspeed.precision={precision}", f"deepspeed.zero_stage={stage}"])
            if (precision, stage) == ("fp16", 0):
                with pytest.raises(ValueError, match=r"fp16 with deepspeed.zero_stage=0 .*loss scale.*zero_stage=1"):
                    validate(cfg, world_size=1)
            else:
                validate(cfg, world_size=1)
    # deepspeed.extra, merged into the DeepSpeed config, cannot reach the pair either.
    for overrides in (["deepspeed.extra={fp16: {enabled: true}}"],
                      ["deepspeed.precision=fp16", "deepspeed.zero_stage=2", "deepspeed.extra={zero_optimization: {stage: 0}}"]):
        with pytest.raises(ValueError, match=r"deepspeed.extra.*(fp16.enabled|deepspeed.zero_stage)"):
            validate(load_config(None, overrides), world_size=1)
    # Loss-scale tuning is the expert's: allowed.
    validate(load_config(None, ["deepspeed.precision=fp16", "deepspeed.zero_stage=1",
                                "deepspeed.extra={fp16: {initial_scale_power: 8}}"]), world_size=1)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["loss.ks=[1, 4]", "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_a_run_folder_written_before_a_key_was_replaced_still_loads(tmp_path):
    """A run's own config.yaml (recorded=True: tools/evaluate.py, the proxy study) reads the
    replaced keys as their replacement; an experiment config still gets the message."""
    old = tmp_path / "config.yaml"
    old.write_text("run:\n  tensorboard: false\n  name: old\nloss:\n  simix: true\n")
    cfg = load_config(old, recorded=True)
    assert cfg.run.loggers == [] and cfg.loss.mix == "simix" and cfg.run.name == "old"
    old.write_text("run:\n  tensorboard: true\nloss:\n  simix: false\n")
    cfg = load_config(old, recorded=True)
    assert cfg.run.loggers == ["tensorboard"] and cfg.loss.mix == "none"
    with pytest.raises(ValueError, match=r"'run.tensorboard' was replaced: use run.loggers"):
        load_config(old)
    with pytest.raises(ValueError, match=r"'loss.simix' was replaced"):  # overrides are today's keys
        load_config(None, ["loss.simix=true"], recorded=True)


def test_markdown_reference_lists_every_field():
    text = markdown_reference()
    for section, value in vars(Config()).items():
        for key in vars(value):
            assert f"`{section}.{key}`" in text


def test_every_shipped_config_loads_and_validates():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        validate(load_config(path), world_size=1, check_paths=False)  # no shards or weights here


def _train(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "rskdist" / "train.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def test_entry_point_reports_a_typo_in_one_line():
    proc = _train("--config", "configs/debug.yaml", "loss.tua2=0.1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config: unknown key 'loss.tua2'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_entry_point_reports_an_impossible_batch_split():
    import os

    env = dict(os.environ, WORLD_SIZE="3", RANK="0", LOCAL_RANK="0")
    proc = _train("--config", "configs/debug.yaml", env=env)
    assert proc.returncode == 2
    assert "cannot be split over 3 ranks" in proc.stderr and "Traceback" not in proc.stderr


def test_configuration_doc_is_current():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc.strip() == markdown_reference().strip(), "regenerate: python -m rskdist.config --markdown > docs/configuration.md"


def test_simix_is_refused_for_baselines_with_the_reason():
    validate(load_config(None, ["loss.name=contrastive", "loss.mix=embedding"]), world_size=1)
    validate(load_config(None, ["loss.name=rsk", "loss.mix=simix"]), world_size=1)
    with pytest.raises(ValueError, match=r"loss.mix=simix does not apply to loss.name=contrastive: SiMix mixes "
                                         r"scalar similarities.*use loss.mix=embedding"):
        validate(load_config(None, ["loss.name=contrastive"]), world_size=1)


def _write_index(root: Path, *, train_classes: int, splits=("test",)) -> None:
    """A shard index with class lists only: what start-up validation reads of a shard folder."""
    from rskdist.data import shards as S

    classes = {"train": train_classes, **{name: 3 for name in splits}}
    index = {"format": S.FORMAT_NAME, "splits": {name: {"classes": [f"c{i}" for i in range(n)]}
                                                  for name, n in classes.items()}}
    (Path(root) / S.INDEX_FILE).write_text(json.dumps(index))


def test_readme_training_example_is_valid_and_its_old_batch_is_refused():
    """The README's `deepspeed --num_gpus N ... configs/debug.yaml` line passes validation; the
    line it replaced (4096 images = 1024 classes x 4 from 64 synthetic classes) is refused
    before any process starts, naming the settings to change."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines()
                if x.startswith("deepspeed --num_gpus") and "configs/debug.yaml" in x)
    words = line.split("#")[0].split()
    world = int(words[words.index("--num_gpus") + 1])
    overrides = [w for w in words if "=" in w]
    validate(load_config(ROOT / "configs/debug.yaml", overrides), world_size=world)
    with pytest.raises(ValueError, match=r"data.global_batch=4096 with data.m=4 needs 1024 distinct training "
                                         r"classes per step, but there are 64 \(data.synthetic_classes=64\); "
                                         r"lower data.global_batch, or raise data.synthetic_classes"):
        validate(load_config(ROOT / "configs/debug.yaml", ["data.global_batch=4096"]), world_size=8)


@pytest.mark.parametrize("value, message", [
    (-1, "must be 0 \\(off\\), a whole count >= 1 or a fraction in \\(0, 1\\)"),
    (1.5, "must be 0 \\(off\\), a whole count >= 1 or a fraction in \\(0, 1\\)"),
    (64, "holds out 64 classes but there are only 64 training classes .*hold out at most 63"),
    (49, "needs 16 distinct training classes per step, but there are 64 .*, 49 of them held out by "
         "data.val_classes=49; lower data.global_batch or data.val_classes"),
    (0.8, "51 of them held out by data.val_classes=0.8"),  # round(0.8 x 64)
])
def test_bad_validation_class_counts_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, [f"data.val_classes={value}"]), world_size=1)


def test_validation_classes_and_test_splits_checked_against_the_data(tmp_path):
    validate(load_config(None, ["data.val_classes=48"]), world_size=1)  # 16 left: one batch of 16 classes
    validate(load_config(None, ["data.val_classes=0.25"]), world_size=1)
    with pytest.raises(ValueError, match="holds 'val', the name data.val_classes reports"):
        validate(load_config(None, ["data.val_classes=4", "data.test_splits=[test, val]"]), world_size=1)
    with pytest.raises(ValueError, match="source=synthetic has one test split, 'test'"):
        validate(load_config(None, ["data.test_splits=[test_800]"]), world_size=1)
    for bad in ("[]", "[test, test]"):
        with pytest.raises(ValueError, match="data.test_splits must be a non-empty list of distinct split names"):
            validate(load_config(None, [f"data.test_splits={bad}"]), world_size=1)

    _write_index(tmp_path, train_classes=20, splits=("test_800", "test_1600"))
    shards = ["data.source=shards", f"data.root={tmp_path}"]
    validate(load_config(None, shards + ["data.test_splits=[test_800, test_1600]", "data.val_classes=4"]),
             world_size=1)
    with pytest.raises(ValueError, match=r"has no split 'test' \(data.test_splits=\['test'\]\); its splits: "
                                         r"test_1600, test_800, train"):
        validate(load_config(None, shards), world_size=1)
    with pytest.raises(ValueError, match=r"there are 20 \(the training split of data.root=.*\), 5 of them "
                                         r"held out by data.val_classes=5"):
        validate(load_config(None, shards + ["data.test_splits=[test_800]", "data.val_classes=5"]), world_size=1)
    validate(load_config(None, shards + ["data.val_classes=5"]), world_size=1, check_paths=False)  # not read
