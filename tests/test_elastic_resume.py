"""A run checkpointed on W ranks resumes on W' ranks with the uninterrupted run's losses,
through the real entry point under torchrun (gloo, CPU): same global batches, pixels,
SiMix plans, LR schedule and step count, ZeRO optimizer state re-sharded (DeepSpeed's
universal checkpoint), loss proxies and the ZeRO-3 weight average included.

Tolerance: the resumed run reduces the same numbers over other ranks (the loss's
all-reduce, DeepSpeed's gradient average), so it matches within reduction order: fp32
losses within 2e-6 relative (seen here: at most 5.3e-7, the first resumed step mostly
bit-identical), bf16 within 2e-2 relative (seen: 6.2e-3; its gradients are reduced in bf16,
whose rounding depends on the order: uninterrupted bf16 runs on 4 and on 2 ranks differ by
up to 1.4e-2 over the same 5 steps).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import TORCHRUN, run_cmd, train_losses

from rskdist.comm import free_port

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

STEPS, SAVED = 5, 2  # the resumed runs start from the uninterrupted run's step-2 checkpoint
# configs/debug.yaml shrunk further: a 1-block ViT on 16 px images, 8 classes x 4 per step,
# chunks of 4 (2 per rank on 4 ranks, 8 on 1).
TINY = ["run.log_every=1", "run.loggers=[]", "eval.every_epochs=-1", f"run.max_steps={STEPS}",
        f"run.save_every={SAVED}", "run.keep_checkpoints=5", "model.image_size=16", "model.embed_dim=16",
        "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}", "data.global_batch=32",
        "data.chunk_size=4"]
SIMIX = ["loss.name=rsk", "loss.mix=simix"]
PROXY = ["loss.name=proxy_anchor", "loss.mix=none"]
FP32_REL, BF16_REL = 2e-6, 2e-2


def _train(nproc: int, out: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_cmd([TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                    str(free_port()), "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={out}",
                    f"run.name={name}", *TINY, *overrides], timeout=900)


def _resume(out: Path, first: int, then: int, *overrides: str, reference: Path | None = None,
            rel: float = FP32_REL) -> Path:
    """Train on `first` ranks to the end, resume its step-SAVED checkpoint on `then` ranks;
    the resumed steps' losses must equal `reference`'s (default: the first run's)."""
    full = out / f"w{first}"
    if not full.is_dir():
        _train(first, out, full.name, *overrides)
    name = f"w{first}to{then}"
    proc = _train(then, out, name, f"run.resume={full}/checkpoints/step{SAVED:08d}", *overrides)
    assert (f"resume on another world size: world size {first} -> {then}; local batch {32 // first} -> "
            f"{32 // then}") in proc.stdout, proc.stdout[-2000:]
    want, got = train_losses(reference or full), train_losses(out / name)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=rel), (name, step, got[step], want[step])
    assert want[STEPS] != pytest.approx(want[SAVED + 1], rel=1e-3)  # the model moved: equality says something
    return out / name


def _whole_average(run: Path, world: int) -> list[torch.Tensor]:
    """The ZeRO-3 weight average of a run's last checkpoint, joined over its ranks' partitions."""
    tag = run / "checkpoints" / f"step{STEPS:08d}"
    parts = [torch.load(tag / f"ema_rank{r}.pt", weights_only=True)["shadow"] for r in range(world)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def test_zero2_simix_resumes_on_half_the_ranks(tmp_path):
    resumed = _resume(tmp_path, 4, 2, "deepspeed.zero_stage=2", *SIMIX)
    assert (tmp_path / "w4/checkpoints" / f"step{SAVED:08d}" / "universal").is_dir()
    assert (resumed / "checkpoints" / f"step{STEPS:08d}").is_dir()


ZERO3_PROXY = ["deepspeed.zero_stage=3", "optim.ema_decay=0.5", *PROXY]


@pytest.fixture(scope="module")
def one_rank_zero3(tmp_path_factory):
    """An uninterrupted 1-rank ZeRO-3 Proxy-Anchor run with a weight average; its folder's parent."""
    out = tmp_path_factory.mktemp("zero3")
    _train(1, out, "w1", *ZERO3_PROXY)
    return out


def test_zero3_proxy_anchor_resumes_on_twice_the_ranks_with_its_average(one_rank_zero3):
    out = one_rank_zero3
    resumed = _resume(out, 1, 2, *ZERO3_PROXY)
    full, got = _whole_average(out / "w1", 1), _whole_average(resumed, 2)
    for a, b in zip(full, got):  # ceil(n / 2) * 2 >= n: compare the parameter's own elements
        n = min(len(a), len(b))
        torch.testing.assert_close(b[:n], a[:n], rtol=1e-5, atol=1e-6)


def test_another_global_batch_is_refused_with_the_reason(one_rank_zero3):
    """What cannot be honoured: the batches of a run are those of its global batch."""
    out = one_rank_zero3
    proc = run_cmd([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={out}",
                    "run.name=other", *TINY, *ZERO3_PROXY, "data.global_batch=16",
                    f"run.resume={out}/w1/checkpoints/step{SAVED:08d}"], timeout=600, check=False)
    assert proc.returncode != 0
    assert ("was trained with data.global_batch=32, the config says 16: the run would not see its batches; "
            "resume with data.global_batch=32") in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("loss", ["simix", "proxy_anchor"])
def test_resume_matrix_against_the_uninterrupted_four_rank_run(tmp_path, zero, loss):
    """4 then 2, 2 then 4, 1 then 2: every resumed run has the uninterrupted 4-rank run's losses."""
    overrides = [f"deepspeed.zero_stage={zero}", *(SIMIX if loss == "simix" else PROXY)]
    _train(4, tmp_path, "w4", *overrides)
    for first, then in [(4, 2), (2, 4), (1, 2)]:
        _resume(tmp_path, first, then, *overrides, reference=tmp_path / "w4")


@pytest.mark.slow
def test_bf16_zero2_resumes_on_half_the_ranks(tmp_path):
    _resume(tmp_path, 4, 2, "deepspeed.zero_stage=2", "deepspeed.precision=bf16", *SIMIX, rel=BF16_REL)
