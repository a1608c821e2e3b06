"""Every loss through the real launcher (2 CPU ranks, configs/debug.yaml): a 2-step run of
each under ZeRO-2, and a proxy loss under ZeRO-3 that saves and resumes its proxies with
the model (the resumed losses equal an uninterrupted run's)."""

import sys

import pytest
import torch
from launching import deepspeed_cmd, run_cmd, train_losses

pytestmark = pytest.mark.integration

COMMON = ["run.log_every=1", "eval.every_epochs=-1", "data.global_batch=32", "run.save_every=2"]
BASELINES = ["contrastive", "multi_similarity", "triplet", "smooth_ap", "proxy_anchor", "norm_softmax", "arcface", "cosface"]


def _train(out_dir, *overrides):
    return run_cmd(deepspeed_cmd("--config", "configs/debug.yaml", f"run.output_dir={out_dir}", *COMMON, *overrides))


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["none", "embedding"])
@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_trains_two_steps_under_zero2(tmp_path, name, mix):
    _train(tmp_path, f"loss.name={name}", f"loss.mix={mix}", "run.max_steps=2", "deepspeed.zero_stage=2")
    losses = train_losses(tmp_path / "debug")
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values()))))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["proxy_anchor", "norm_softmax", "arcface"])
def test_every_proxy_loss_trains_two_steps_under_zero3(tmp_path, name):
    _train(tmp_path, f"loss.name={name}", "loss.mix=embedding", "run.max_steps=2", "deepspeed.zero_stage=3")
    losses = train_losses(tmp_path / "debug")
    assert sorted(losses) == [1, 2] and losses[1] != losses[2]


def test_proxies_under_zero3_resume_with_the_model(tmp_path):
    args = ["loss.name=proxy_anchor", "loss.mix=none", "deepspeed.zero_stage=3"]
    _train(tmp_path / "full", *args, "run.max_steps=4")  # saves step 2 and step 4
    step2 = tmp_path / "full" / "debug" / "checkpoints" / "step00000002"
    proc = _train(tmp_path / "cut", *args, "run.max_steps=4", f"run.resume={step2}")
    assert "resumed from" in proc.stdout
    full, resumed = train_losses(tmp_path / "full" / "debug"), train_losses(tmp_path / "cut" / "debug")
    assert sorted(resumed) == [3, 4]
    assert len(set(full.values())) == 4  # the loss moves, so equality below says the proxies resumed
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.slow  # the same path is checked for exactness in tests/test_loss_params_distributed.py
def test_embedding_mixup_with_a_pair_loss_under_zero2(tmp_path):
    _train(tmp_path, "loss.name=multi_similarity", "loss.mix=embedding", "run.max_steps=2")
    losses = train_losses(tmp_path / "debug")
    assert sorted(losses) == [1, 2] and losses[1] != losses[2]
    assert "multi_similarity" in (tmp_path / "debug" / "config.yaml").read_text()


def test_simix_with_a_baseline_is_refused_at_start_up(tmp_path):
    proc = run_cmd([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml",
                    f"run.output_dir={tmp_path}", "loss.name=contrastive"], timeout=120, check=False)
    assert proc.returncode == 2
    assert "loss.mix=simix does not apply to loss.name=contrastive" in proc.stderr
    assert not (tmp_path / "debug" / "checkpoints").exists()
