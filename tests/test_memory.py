"""The memory estimator's parts (its accuracy against real runs is checked in
tests/test_integration.py and reported by tools/scaling_study.py)."""

from pathlib import Path

import pytest

from rskdist.loss.memory import rsk_memory_bytes
from rskdist.parallel.layout import BatchLayout
from rskdist.planning.memory import (DS_BUCKET_ELEMS, MB, PHASES, ZeroSettings, estimate_memory, host_heap_bytes,
                                     model_state_bytes)

ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}


def test_zero_stages_partition_states():
    n, w = 1_000_000, 8
    s0, s1, s2, s3 = (model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=z, world_size=w)
                      for z in range(4))
    # The ZeRO paper's 2 + 2 + 12 bytes per weight: lp weights, lp grads, fp32 master + two moments.
    assert (s0["params"], s0["grads"], s0["master"] + s0["optimizer"]) == (2 * n, 2 * n, 12 * n)
    assert s1["master"] == 4 * n / w and s1["optimizer"] == 8 * n / w and s1["grads"] == 2 * n
    assert s2["grads"] == 2 * n / w and s2["params"] == 2 * n
    assert s3["params"] == 2 * n / w
    fp32 = model_state_bytes(n, precision="fp32", optimizer="sgd", zero_stage=0, world_size=1)
    assert (fp32["params"], fp32["grads"], fp32["optimizer"], fp32["master"]) == (4 * n, 4 * n, 4 * n, 0)


def test_zero2_bf16_parts_follow_deepspeeds_allocations():
    """What DeepSpeed's stage_1_and_2.py allocates beyond the 2 + 2 + 12 bytes: the flat
    copy at init, a zeroed fp32 gradient partition, the reduction bucket, the fp32 copy
    of the gradient partition at the step, and Adam's temporaries."""
    n, w = 300_000_000, 2
    gpu = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=2, world_size=w, device="cuda")
    cpu = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=2, world_size=w, device="cpu")
    for parts in (gpu, cpu):
        assert parts["flatten_copy"] == 2 * n and parts["init_grads"] == 4 * n / w
        assert parts["step_grads"] == 4 * n / w and parts["master"] == 4 * n / w
    # A GPU allocates the whole default bucket (5e8 bf16 elements, ~954 MB); a CPU's RSS
    # counts the pages the gradients were written to.
    assert gpu["grad_bucket"] == 2 * DS_BUCKET_ELEMS and cpu["grad_bucket"] == 2 * n
    assert gpu["optimizer_temp"] == 4 * n / w and cpu["optimizer_temp"] == 2 * 4 * n / w
    assert cpu["fp32_model"] == 4 * n and gpu["fp32_model"] == 0  # built in host memory
    assert cpu["host_heap"] == 2 * n and gpu["host_heap"] == 0


def test_bucket_settings_come_from_the_generated_deepspeed_config():
    from rskdist.config import load_config
    from rskdist.build import deepspeed_config

    cfg = load_config(ROOT / "configs/debug.yaml",
                      ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 10000000, overlap_comm: true}}"])
    layout = BatchLayout(global_batch=64, world_size=2, m=4, chunk_size=8)
    zero = ZeroSettings.from_deepspeed_config(deepspeed_config(cfg.deepspeed, layout, grad_clip=0.0))
    assert zero == ZeroSettings(stage=2, reduce_bucket_size=10_000_000, overlap_comm=True)
    parts = model_state_bytes(1000, precision="bf16", optimizer="adamw", zero_stage=2, world_size=2, zero=zero)
    assert parts["grad_bucket"] == 2 * 2 * 10_000_000  # two buffers with overlap_comm
    default = ZeroSettings.from_deepspeed_config(deepspeed_config(load_config(ROOT / "configs/debug.yaml").deepspeed,
                                                                  layout, grad_clip=0.0))
    assert default == ZeroSettings(stage=2)  # DeepSpeed's defaults: 5e8 elements, no overlap below ZeRO-3
    with pytest.raises(ValueError, match="zero_stage=1"):
        model_state_bytes(1000, precision="bf16", optimizer="adamw", zero_stage=1, world_size=2, zero=zero)


def test_host_heap_replays_glibcs_mmap_threshold():
    kib = 1024
    # 4 KiB fp32 (heap), 12 MiB fp32 (its 6 MiB bf16 copy is above the 128 KiB threshold:
    # mmapped, then freeing the fp32 block lifts the threshold to 12 MiB), 4 MiB fp32 (2 MiB
    # bf16 copy: heap).
    numels = [kib, 3 * MB, MB]
    assert host_heap_bytes(numels, lp_bytes=2) == 2 * kib + 2 * MB
    # Without a cast only the tensors below the first threshold live in the heap.
    assert host_heap_bytes(numels, lp_bytes=4) == 4 * kib


def test_activation_checkpointing_and_chunks():
    common = dict(backbone="vit_tiny_patch16_224", image_size=32, precision="fp32", embed_dim=32, device="cuda",
                  backbone_kwargs=TINY_VIT)

    def layout(chunk_size):
        return BatchLayout(global_batch=64, world_size=2, m=4, chunk_size=chunk_size)

    full = estimate_memory(layout(8), **common)
    ckpt = estimate_memory(layout(8), grad_checkpointing=True, **common)
    double = estimate_memory(layout(16), **common)
    assert ckpt.parts_mb["activations"] < full.parts_mb["activations"]
    assert double.parts_mb["activations"] == pytest.approx(2 * full.parts_mb["activations"])
    assert full.facts["chunks"] == 4 and double.facts["chunks"] == 2
    assert full.parts_mb["runtime"] > 0
    assert full.parts_mb["images"] == pytest.approx(8 * 3 * 32 * 32 * 4 / MB)


def test_peak_is_the_largest_phase():
    layout = BatchLayout(global_batch=64, world_size=2, m=4, chunk_size=8)
    common = dict(backbone="vit_tiny_patch16_224", image_size=32, embed_dim=32, backbone_kwargs=TINY_VIT,
                  runtime_mb=500.0)
    gpu = estimate_memory(layout, device="cuda", **common)
    assert gpu.total_mb == max(gpu.phase_mb(p) for p in PHASES) == gpu.phase_mb(gpu.peak_phase)
    # The default bucket (5e8 bf16 elements) dwarfs a tiny model on a GPU, so backward is the peak there.
    assert gpu.peak_phase == "backward" and gpu.parts_mb["grad_bucket"] == pytest.approx(2 * DS_BUCKET_ELEMS / MB)
    cpu = estimate_memory(layout, device="cpu", **common)
    assert cpu.parts_mb["grad_bucket"] == pytest.approx(2 * cpu.facts["num_params"] / MB)
    out = cpu.as_dict()
    assert out["total_mb"] == round(cpu.total_mb, 1) and out["peak_phase"] == cpu.peak_phase
    assert {f"phase_{p}_mb" for p in PHASES} <= out.keys() and "master_mb" in out


def test_loss_memory_is_linear_in_the_global_batch_across_ranks():
    def loss_bytes(global_batch, world_size, **kw):
        return rsk_memory_bytes(global_batch, embed_dim=512, world_size=world_size, **kw)

    small = loss_bytes(16_384, 8)
    large = loss_bytes(65_536, 8)
    # Keys grow linearly; the kernel's block and panel buffers are capped.
    assert large - small == pytest.approx(2 * (65_536 - 16_384) * 512 * 4)
    assert loss_bytes(1024, 8) < small
    # One process at a small batch keeps S and dS whole (faster, bounded by sim_cache_mb).
    assert loss_bytes(4096, 1) > 2 * 4096**2 * 4
    # The backend that runs decides the block buffers: none for the native kernel (it reads
    # the rows in place), eager's (block x P x N) tensor, Triton's larger (block x N) rows on CUDA.
    native = loss_bytes(65_536, 8, impl="native", device_type="cpu")
    eager = loss_bytes(65_536, 8, impl="eager", device_type="cpu")
    triton = loss_bytes(65_536, 8, impl="auto", device_type="cuda")
    assert 0.5 * 3 * (1 << 21) * 4 < eager - native <= 3 * (1 << 21) * 4  # at most three 8 MB buffers
    assert triton - native == pytest.approx(5 * (1 << 24) * 4, rel=0.01)  # five 64 MB buffers
    assert loss_bytes(65_536, 8, impl="auto", device_type="cpu") == native  # auto on CPU: native




def test_the_tool_reads_the_setup_from_the_config_and_its_overrides(capsys):
    """tools/estimate_memory.py: the layout is the run's own (rskdist/startup.py); a flag that
    shadowed a config key is refused with the override to give instead."""
    import json

    import estimate_memory as tool

    assert tool.main(["--config", str(ROOT / "configs/debug.yaml"), "--world-size", "2", "--device", "cuda",
                      "data.chunk_size=3", "model.embed_dim=24"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["global_batch"], row["world_size"], row["chunk_size"], row["embed_dim"]) == (64, 2, 3, 24)
    assert (row["local_batch"], row["chunk"], row["chunks"]) == (32, 3, 11)
    assert tool.main(["--config", str(ROOT / "configs/debug.yaml"), "--global-batch", "64", "--zero-stage=3"]) == 2
    err = capsys.readouterr().err
    assert "--global-batch -> data.global_batch=VALUE; --zero-stage -> deepspeed.zero_stage=VALUE" in err
    assert tool.main(["--config", str(ROOT / "configs/debug.yaml"), "--world-size", "3"]) == 2
    assert "cannot be split over 3 ranks" in capsys.readouterr().err
