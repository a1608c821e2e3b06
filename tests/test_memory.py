"""The memory estimator's parts (its accuracy against real runs is checked in
tests/test_integration.py and reported by tools/scaling_study.py)."""

import pytest

from rskdist.parallel.memory import MB, estimate_memory, loss_bytes, model_state_bytes

TINY_VIT = {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}


def test_zero_stages_partition_states():
    n, w = 1_000_000, 8
    s0 = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=0, world_size=w)
    s1 = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=1, world_size=w)
    s2 = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=2, world_size=w)
    s3 = model_state_bytes(n, precision="bf16", optimizer="adamw", zero_stage=3, world_size=w)
    assert s0 == {"params": 2 * n, "grads": 2 * n, "optimizer": 12 * n}  # the ZeRO paper's 2 + 2 + 12
    assert s1["optimizer"] == 12 * n / w and s1["grads"] == 2 * n
    assert s2["grads"] == 2 * n / w and s2["params"] == 2 * n
    assert s3["params"] == 2 * n / w
    fp32 = model_state_bytes(n, precision="fp32", optimizer="sgd", zero_stage=0, world_size=1)
    assert fp32 == {"params": 4 * n, "grads": 4 * n, "optimizer": 4 * n}


def test_loss_memory_is_linear_in_the_global_batch_across_ranks():
    small = loss_bytes(global_batch=16_384, embed_dim=512, world_size=8)
    large = loss_bytes(global_batch=65_536, embed_dim=512, world_size=8)
    # Keys grow linearly; the kernel's block and panel temporaries are capped.
    assert large - small == pytest.approx(2 * (65_536 - 16_384) * 512 * 4)
    assert loss_bytes(global_batch=1024, embed_dim=512, world_size=8) < small
    # One process at a small batch keeps S and dS whole (faster, bounded by sim_cache_mb).
    assert loss_bytes(global_batch=4096, embed_dim=512, world_size=1) > 2 * 4096**2 * 4


def test_activation_checkpointing_and_chunks():
    common = dict(backbone="vit_tiny_patch16_224", image_size=32, global_batch=64, world_size=2, precision="fp32",
                  embed_dim=32, device="cuda", backbone_kwargs=TINY_VIT)
    full = estimate_memory(chunk_size=8, **common)
    ckpt = estimate_memory(chunk_size=8, grad_checkpointing=True, **common)
    double = estimate_memory(chunk_size=16, **common)
    assert ckpt.parts_mb["activations"] < full.parts_mb["activations"]
    assert double.parts_mb["activations"] == pytest.approx(2 * full.parts_mb["activations"])
    assert full.facts["chunks"] == 4 and double.facts["chunks"] == 2
    assert full.parts_mb["runtime"] > 0 and full.total_mb == pytest.approx(sum(full.parts_mb.values()))
    assert full.parts_mb["images"] == pytest.approx(8 * 3 * 32 * 32 * 4 / MB)
