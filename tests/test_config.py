"""Config: strict loading, overrides, cross-field checks, and the entry point's messages."""

import subprocess
import sys
from pathlib import Path

import pytest

from rskdist.config import Config, load_config, markdown_reference, save_config, validate

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {global_batch: 128, m: 4}\nloss: {simix: false}\n")
    cfg = load_config(path, ["loss.tau2=0.05", "optim.decay_epochs=[10, 20]", "run.name=x"])
    assert cfg.data.global_batch == 128 and cfg.loss.simix is False
    assert cfg.loss.tau2 == 0.05 and cfg.optim.decay_epochs == [10, 20] and cfg.run.name == "x"
    assert cfg.optim.lr == Config().optim.lr  # untouched default


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.tua2=0.1", r"unknown key 'loss.tua2'; valid keys here: .*tau2"),
        ("losss.tau2=0.1", r"unknown key 'losss'; valid keys here: .*loss"),
        ("data.global_batch=big", r"data.global_batch must be int"),
        ("loss.simix=3", r"loss.simix must be bool"),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage=4 is not one of 0, 1, 2, 3"),
        ("optim.name=lamb", r"optim.name='lamb' is not one of"),
        ("nokey", r"must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


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
    validate(cfg, world_size=1)
    with pytest.raises(ValueError, match="no such file"):
        validate(load_config(None, [f"model.pretrained={tmp_path}/w.safetensors"]), world_size=1)


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
    # The same pair reached through deepspeed.extra, which is merged into the DeepSpeed config.
    for overrides in (["deepspeed.extra={fp16: {enabled: true}}"],
                      ["deepspeed.precision=fp16", "deepspeed.zero_stage=2", "deepspeed.extra={zero_optimization: {stage: 0}}"]):
        with pytest.raises(ValueError, match="fp16 with deepspeed.zero_stage=0"):
            validate(load_config(None, overrides), world_size=1)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["loss.ks=[1, 4]", "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


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
