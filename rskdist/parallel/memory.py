"""Predict the peak memory of one rank for a training setup, before renting the GPUs.

peak = runtime + model states + activations of one chunk + images + loss, where
- runtime: CUDA context and allocator slack on GPUs; on CPUs the resident size of a
  process that has imported torch, DeepSpeed and timm (measured in this process);
- model states: parameters, gradients and optimizer states, partitioned by ZeRO
  (stage 1: optimizer states, 2: + gradients, 3: + parameters, each / world size);
- activations: what autograd saves for one chunk in pass 3, measured by running the
  backbone on one image with saved-tensor hooks (with activation checkpointing: the
  block inputs plus one block's activations during its recompute);
- images: one chunk on the device (on CPU the whole local batch lives in host memory);
- loss: the gathered fp32 embeddings and their gradients, the kernel's block
  temporaries, and the whole similarity matrix when the single-process dense path
  applies (rskdist/loss/rsk.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rskdist.loss.rsk import DEFAULT_BLOCK_ELEMS, DEFAULT_PANEL_ELEMS, DEFAULT_SIM_CACHE_MB

MB = 2**20
CUDA_RUNTIME_MB = 700.0  # CUDA context + cuBLAS/cuDNN workspaces + allocator slack, typical on H100


@dataclass
class MemoryEstimate:
    parts_mb: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    @property
    def total_mb(self) -> float:
        return sum(self.parts_mb.values())

    def as_dict(self) -> dict:
        return {"total_mb": round(self.total_mb, 1), **{f"{k}_mb": round(v, 1) for k, v in self.parts_mb.items()},
                **self.facts}


def _saved_bytes_per_image(model: torch.nn.Module, image_size: int, dtype: torch.dtype) -> float:
    """Bytes autograd keeps for one image (distinct storages counted once; the
    parameters that layers save for their backward are model states, not activations)."""
    seen: dict[int, int] = {}
    model = model.to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return float(sum(seen.values()))


def _num_blocks(model: torch.nn.Module) -> int:
    """Transformer blocks of the backbone (timm `blocks`, open_clip `transformer.resblocks`...)."""
    holder = getattr(model, "backbone", model)
    for name in ("blocks", "layers"):
        blocks = getattr(holder, name, None)
        if isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList):
            return len(blocks)
    trunk = getattr(holder, "trunk", None) or getattr(holder, "transformer", None)
    return _num_blocks(trunk) if trunk is not None else 0


def model_state_bytes(num_params: int, *, precision: str, optimizer: str, zero_stage: int, world_size: int) -> dict:
    """Bytes of parameters, gradients and optimizer states on one rank."""
    opt_per_param = {"adamw": 8, "adam": 8, "sgd": 4}[optimizer]
    if precision == "fp32":
        params, grads, states = 4, 4, opt_per_param
    else:  # half-precision weights and grads, fp32 master copy + optimizer states
        params, grads, states = 2, 2, 4 + opt_per_param
    shard = max(1, world_size)
    return {
        "params": num_params * params / (shard if zero_stage >= 3 else 1),
        "grads": num_params * grads / (shard if zero_stage >= 2 else 1),
        "optimizer": num_params * states / (shard if zero_stage >= 1 else 1),
    }


def loss_bytes(*, global_batch: int, embed_dim: int, world_size: int, m: int = 4, simix: bool = True,
               block_elems: int = DEFAULT_BLOCK_ELEMS, panel_elems: int = DEFAULT_PANEL_ELEMS,
               sim_cache_mb: float = DEFAULT_SIM_CACHE_MB) -> float:
    """Gathered keys + key gradients + kernel temporaries: the (block x P x N) tensor, and
    either the whole S and dS (one process, small batch) or one panel of similarity rows
    and their gradient (rskdist/loss/rsk.py). Neither grows with the batch beyond its cap.
    """
    keys = 2 * global_batch * embed_dim * 4  # gathered fp32 embeddings and their gradient
    temps = 3 * block_elems * 4  # the (block x P x N) tensor and its row-sized companions
    dense = 2 * global_batch * global_batch * 4
    if world_size == 1 and dense <= sim_cache_mb * MB:
        return float(keys + temps + dense)
    rows = global_batch // world_size * (1 + ((m - 1) / 2 if simix else 0))  # this rank's queries
    panel = 2 * min(panel_elems, rows * global_batch) * 4
    return float(keys + temps + panel)


def estimate_memory(
    *,
    backbone: str,
    image_size: int,
    global_batch: int,
    world_size: int,
    chunk_size: int,
    zero_stage: int = 2,
    precision: str = "bf16",
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    embed_dim: int = 512,
    m: int = 4,
    simix: bool = True,
    device: str = "cuda",
    backbone_kwargs: dict | None = None,
    runtime_mb: float | None = None,
) -> MemoryEstimate:
    """Peak memory of one rank; see the module docstring for the parts."""
    from rskdist.models import create_model

    if runtime_mb is None:
        if device == "cpu":
            import os

            runtime_mb = cpu_runtime_mb(zero_stage, threads=max(1, (os.cpu_count() or 1) // world_size))
        else:
            runtime_mb = CUDA_RUNTIME_MB

    local_batch = global_batch // world_size
    chunk = min(chunk_size, local_batch)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = create_model(backbone, embed_dim=embed_dim, image_size=image_size,
                         backbone_kwargs=backbone_kwargs or {})
    num_params = sum(p.numel() for p in model.parameters())
    model.set_grad_checkpointing(False)
    full = _saved_bytes_per_image(model, image_size, dtype)
    blocks = _num_blocks(model)
    if grad_checkpointing and blocks:
        model.set_grad_checkpointing(True)
        kept = _saved_bytes_per_image(model, image_size, dtype)
        per_image = kept + full / blocks  # block inputs + one block recomputed at a time
    else:
        per_image = full
    del model

    states = model_state_bytes(num_params, precision=precision, optimizer=optimizer, zero_stage=zero_stage,
                               world_size=world_size)
    image_bytes = 3 * image_size * image_size * 4
    held_images = local_batch if device == "cpu" else chunk
    parts = {
        "runtime": runtime_mb,
        "params": states["params"] / MB,
        "grads": states["grads"] / MB,
        "optimizer": states["optimizer"] / MB,
        "activations": per_image * chunk / MB,
        "images": held_images * image_bytes / MB,
        "loss": loss_bytes(global_batch=global_batch, embed_dim=embed_dim, world_size=world_size, m=m,
                           simix=simix) / MB,
    }
    facts = {"num_params": num_params, "activation_mb_per_image": round(per_image / MB, 3),
             "local_batch": local_batch, "chunk": chunk, "chunks": math.ceil(local_batch / chunk)}
    return MemoryEstimate(parts, facts)


_RUNTIME_PROBE = """
import os, resource, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import torch, deepspeed
torch.set_num_threads(int(sys.argv[2]))
import rskdist.trainer, rskdist.eval, rskdist.data
from torch.utils.tensorboard import SummaryWriter
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
model = torch.nn.Linear(8, 8)
deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {"stage": int(sys.argv[1])}})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
"""


def cpu_runtime_mb(zero_stage: int = 2, threads: int = 1) -> float:
    """Peak resident size of a CPU training process before its model and data exist:
    the imports, a one-process group and a DeepSpeed engine around a tiny model, with
    the thread count a rank gets (rskdist/train.py splits the cores between local ranks)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, str(zero_stage), str(threads)],
                         capture_output=True, text=True, timeout=600, check=True)
    return float(out.stdout.strip().splitlines()[-1])
