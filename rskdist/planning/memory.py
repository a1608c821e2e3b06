"""Predict the peak memory of one rank for a training setup, before renting the GPUs.

The peak is the largest of the phases a step goes through; each phase sums the parts
alive in it (`PHASES`). N = parameters, W = world size, lp = bytes of a weight in
the run's precision (2 for bf16/fp16, 4 for fp32). Parts, following DeepSpeed 0.19's
allocations (runtime/engine.py, runtime/zero/stage_1_and_2.py) and torch's optimizers:

- runtime: CUDA context and allocator slack on GPUs; on CPUs the resident size of a
  process that has imported torch, DeepSpeed and the backbone library (measured in a
  subprocess, `cpu_runtime_mb`).
- fp32_model: the model is built in fp32 (4N) in host memory before DeepSpeed casts it
  to lp; on a CPU rank this is the first high-water mark, on a GPU it never reaches
  the device.
- flatten_copy: ZeRO-1/2 copy the per-parameter lp weights into one flat buffer while
  they still exist (lp N more, at initialisation).
- host_heap (CPU only): the per-parameter lp tensors freed after that copy stay
  resident. glibc serves a block from its heap when it is smaller than the mmap
  threshold, which starts at 128 KiB and rises to the size of each mmapped block freed
  (at most 32 MiB); casting frees the big fp32 tensors first, so nearly every lp copy
  lands in the heap, and a freed heap block in the middle of the heap is not given
  back to the system.
- params: the lp weights (a flat copy on every rank for ZeRO 0-2, 1/W for ZeRO-3).
- master: the fp32 master weights, 4N/W under ZeRO (DeepSpeed clones the partition even
  when training in fp32), 4N for bf16/fp16 without ZeRO.
- init_grads: ZeRO-1/2 allocate and free a zeroed fp32 gradient partition (4N/W)
  while initialising the optimizer states.
- grad_bucket: the gradient reduction bucket of every backward, reduce_bucket_size
  elements of lp (twice with overlap_comm). DeepSpeed's default is 5e8 elements (1 GB
  in bf16): a GPU allocates all of it; on a CPU only the pages written count, the
  gradients of min(N, bucket) parameters.
- grads: the accumulated lp gradients, lp N/W under ZeRO-2/3, lp N otherwise.
- step_grads: the fp32 copy of this rank's gradient partition made for the optimizer
  (4N/W), fp32 gradients of every weight for bf16/fp16 without ZeRO (4N).
- optimizer: Adam's two moments (8 bytes per weight) or SGD's momentum (4), allocated at
  the first step, partitioned by ZeRO.
- optimizer_temp: Adam's temporaries in its step: torch's foreach path (GPU) holds one
  fp32 tensor of the flat partition (sqrt of the second moment), the single-tensor path
  (CPU) two at once (`(exp_avg_sq.sqrt() / c).add_(eps)`).
- activations: what autograd saves for one chunk in the backprop pass, measured by running the
  backbone on one image with saved-tensor hooks (with activation checkpointing: the
  block inputs plus one block's activations during its recompute).
- images: one chunk on the device (on CPU the whole local batch lives in host memory).
- loss: one loss call, from the loss's own model (`rskdist.loss.loss_memory_bytes`,
  rskdist/loss/memory.py): for RS@k the gathered fp32 embeddings and their gradients, the
  block buffers of the backend that runs on the device (`impl`), and the whole
  similarity matrix when the single-process dense path applies, else a panel of rows.

Measured against real runs in docs/scaling.md. ZeRO-1/2 follow DeepSpeed's code path
part by part; ZeRO-0 and ZeRO-3 use the same parts but have not been checked against a
measured run (ZeRO-3's gathered live parameters and prefetch buckets are not counted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from rskdist.loss.memory import loss_memory_bytes
from rskdist.parallel.layout import BatchLayout

MB = 2**20
CUDA_RUNTIME_MB = 700.0  # CUDA context + cuBLAS/cuDNN workspaces + allocator slack, typical on H100
DS_BUCKET_ELEMS = 500_000_000  # DeepSpeed's default reduce_bucket_size (runtime/zero/config.py)
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD
GLIBC_MMAP_THRESHOLD_MAX = 32 * MB  # the most its dynamic threshold rises to on 64-bit

# Parts alive in each phase of a run, in the order they happen.
PHASES = {
    "build": ("runtime", "fp32_model"),
    "flatten": ("runtime", "params", "flatten_copy"),
    "partition": ("runtime", "params", "host_heap", "master", "init_grads"),
    "backward": ("runtime", "params", "host_heap", "master", "grad_bucket", "grads", "activations", "images",
                 "loss"),
    "step": ("runtime", "params", "host_heap", "master", "step_grads", "optimizer", "optimizer_temp", "images"),
}


@dataclass
class MemoryEstimate:
    """Named parts (MB) and the phases they are alive in; the peak is the largest phase."""

    parts_mb: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    phases: dict = field(default_factory=lambda: dict(PHASES))

    def phase_mb(self, phase: str) -> float:
        return sum(self.parts_mb.get(part, 0.0) for part in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_mb)

    @property
    def total_mb(self) -> float:
        return self.phase_mb(self.peak_phase)

    def as_dict(self) -> dict:
        return {"total_mb": round(self.total_mb, 1), "peak_phase": self.peak_phase,
                **{f"{k}_mb": round(v, 1) for k, v in self.parts_mb.items()},
                **{f"phase_{p}_mb": round(self.phase_mb(p), 1) for p in self.phases}, **self.facts}


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that size buffers, as DeepSpeed resolves them."""

    stage: int = 0
    reduce_bucket_size: int = DS_BUCKET_ELEMS
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    offload: bool = False

    @classmethod
    def from_deepspeed_config(cls, ds_config: dict) -> "ZeroSettings":
        zero = ds_config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        overlap = zero.get("overlap_comm")
        offload = any((zero.get(k) or {}).get("device", "none") not in ("none", None)
                      for k in ("offload_optimizer", "offload_param"))
        return cls(stage=stage, reduce_bucket_size=int(float(zero.get("reduce_bucket_size", DS_BUCKET_ELEMS))),
                   overlap_comm=stage == 3 if overlap is None else bool(overlap),  # DeepSpeed: on for ZeRO-3 only
                   contiguous_gradients=bool(zero.get("contiguous_gradients", True)), offload=offload)


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


def host_heap_bytes(param_numels: list[int], *, lp_bytes: int) -> float:
    """Bytes of per-parameter lp tensors that glibc serves from its heap (and keeps after
    DeepSpeed frees them), replaying the model build and DeepSpeed's cast in parameter order.

    The build allocates fp32 tensors with nothing freed yet, so those of 128 KiB and more
    are mmapped. The cast (`p.data = p.data.to(lp)`) allocates each lp copy, then frees the
    fp32 tensor; freeing an mmapped block raises the threshold to its size (cap 32 MiB).
    Without a cast (fp32 runs) the heap holds only the tensors below the first threshold.
    """
    threshold, heap = GLIBC_MMAP_THRESHOLD, 0
    for n in param_numels:
        fp32 = 4 * n
        if lp_bytes == 4:
            heap += fp32 if fp32 < GLIBC_MMAP_THRESHOLD else 0
            continue
        if lp_bytes * n < threshold:
            heap += lp_bytes * n
        if fp32 >= GLIBC_MMAP_THRESHOLD and threshold < fp32 <= GLIBC_MMAP_THRESHOLD_MAX:
            threshold = fp32
    return float(heap)


def model_state_bytes(num_params: int, *, precision: str, optimizer: str, zero_stage: int, world_size: int,
                      device: str = "cuda", zero: ZeroSettings | None = None,
                      param_numels: list[int] | None = None) -> dict:
    """Bytes of every model-state part of the module docstring on one rank.

    `zero` carries the bucket settings of the generated DeepSpeed config (defaults: DeepSpeed's);
    `param_numels` (in `model.parameters()` order) sizes the CPU host heap; without it every
    lp copy counts as heap-allocated.
    """
    zero = zero or ZeroSettings(stage=zero_stage, overlap_comm=zero_stage == 3)
    if zero.stage != zero_stage:
        raise ValueError(f"zero_stage={zero_stage} but the DeepSpeed config says stage {zero.stage}; "
                         "pass the same stage to both")
    n, w, cpu = num_params, max(1, world_size), device == "cpu"
    mixed = precision != "fp32"
    lp = 2 if mixed else 4
    states = {"adamw": 8, "adam": 8, "sgd": 4}[optimizer]
    sharded = zero.stage >= 1
    flat = n / w if sharded else n  # elements of the tensor the optimizer steps
    if optimizer == "sgd":
        temp = 0.0
    elif cpu:
        temp = 2 * 4 * flat  # single-tensor Adam: sqrt and its quotient alive together
    else:
        temp = 4 * flat  # foreach Adam: one sqrt buffer
    if zero.contiguous_gradients and zero.stage in (1, 2):
        buckets = 2 if zero.overlap_comm else 1
        # A GPU holds the whole bucket; a CPU's RSS counts only the pages gradients were written to.
        bucket = lp * (min(n, buckets * zero.reduce_bucket_size) if cpu else buckets * zero.reduce_bucket_size)
    elif zero.stage == 3:
        bucket = lp * (2 if zero.overlap_comm else 1) * min(n, zero.reduce_bucket_size)
    else:  # without ZeRO the engine flattens at most a bucket of gradients to all-reduce them
        bucket = lp * min(n, zero.reduce_bucket_size)
    zero12 = zero.stage in (1, 2)
    heap = 0.0
    if cpu and zero12:
        heap = host_heap_bytes(param_numels, lp_bytes=lp) if param_numels is not None else float(lp * n if mixed else 0)
    return {
        "fp32_model": 4.0 * n if cpu else 0.0,
        "flatten_copy": float(lp * n) if zero12 else 0.0,
        "host_heap": heap,
        "params": lp * n / (w if zero.stage >= 3 else 1),
        "master": 4 * n / w if sharded else (4.0 * n if mixed else 0.0),
        "init_grads": 4 * n / w if zero12 else 0.0,
        "grad_bucket": float(bucket),
        "grads": lp * n / (w if zero.stage >= 2 else 1),
        "step_grads": 4 * n / w if sharded else (4.0 * n if mixed else 0.0),
        "optimizer": states * n / (w if sharded else 1),
        "optimizer_temp": float(temp),
    }


def estimate_memory(
    layout: BatchLayout,
    *,
    backbone: str,
    image_size: int,
    zero_stage: int = 2,
    precision: str = "bf16",
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    embed_dim: int = 512,
    device: str = "cuda",
    backbone_kwargs: dict | None = None,
    runtime_mb: float | None = None,
    deepspeed_config: dict | None = None,
    loss_name: str = "rsk",
    mix: str = "simix",
    num_classes: int = 0,
    mix_pairs_per_class: int | None = None,
    impl: str = "auto",
    block_size: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one rank of a run whose batch is laid out as `layout` (global batch,
    ranks, m, chunk size: rskdist/parallel/layout.py); see the module docstring for the parts.

    The loss part is `rskdist.loss.loss_memory_bytes` (loss.mix `mix`; RS@k's backend
    `impl` as it resolves on `device`; `num_classes` for proxy losses).

    `deepspeed_config` is the config the trainer generates (rskdist.build.deepspeed_config);
    its zero_optimization bucket settings size the gradient bucket. Without it, DeepSpeed's
    defaults apply.
    """
    from rskdist.models import create_model

    world_size, local_batch = layout.world_size, layout.local_batch
    zero = ZeroSettings.from_deepspeed_config(deepspeed_config) if deepspeed_config is not None \
        else ZeroSettings(stage=zero_stage, overlap_comm=zero_stage == 3)
    if zero.offload:
        warnings.warn("estimate_memory: ZeRO offload is not modelled; the estimate counts optimizer states on "
                      "the device", stacklevel=2)
    if runtime_mb is None:
        if device == "cpu":
            import os

            runtime_mb = cpu_runtime_mb(zero_stage, threads=max(1, (os.cpu_count() or 1) // world_size),
                                        backbone=backbone)
        else:
            runtime_mb = CUDA_RUNTIME_MB

    chunk = min(layout.chunk_size, local_batch)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = create_model(backbone, embed_dim=embed_dim, image_size=image_size,
                         backbone_kwargs=backbone_kwargs or {})
    param_numels = [p.numel() for p in model.parameters()]  # DeepSpeed casts in this order
    num_params = sum(param_numels)
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
                               world_size=world_size, device=device, zero=zero, param_numels=param_numels)
    image_bytes = 3 * image_size * image_size * 4
    held_images = local_batch if device == "cpu" else chunk
    parts = {
        "runtime": runtime_mb,
        **{name: b / MB for name, b in states.items()},
        "activations": per_image * chunk / MB,
        "images": held_images * image_bytes / MB,
        "loss": loss_memory_bytes(loss_name, layout.global_batch, embed_dim=embed_dim, num_classes=num_classes,
                                  mix=mix, per_class=layout.m,
                                  mix_pairs_per_class=mix_pairs_per_class, world_size=world_size, impl=impl,
                                  device_type=device, block_size=block_size) / MB,
    }
    facts = {"num_params": num_params, "activation_mb_per_image": round(per_image / MB, 3),
             "local_batch": local_batch, "chunk": chunk, "chunks": layout.num_chunks,
             "reduce_bucket_size": zero.reduce_bucket_size, "overlap_comm": zero.overlap_comm}
    return MemoryEstimate(parts, facts)


_RUNTIME_PROBE = """
import importlib, os, resource, sys
from rskdist.comm import free_port
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
import torch, deepspeed
torch.set_num_threads(int(sys.argv[2]))
import rskdist.build, rskdist.eval, rskdist.data, rskdist.models
importlib.import_module(sys.argv[3])  # the backbone library, imported by the trainer when it builds the model
from torch.utils.tensorboard import SummaryWriter
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from rskdist.launch import release_shm_buffer
release_shm_buffer(0)
model = torch.nn.Linear(8, 8)
deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {"stage": int(sys.argv[1])}})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
"""


def cpu_runtime_mb(zero_stage: int = 2, threads: int = 1, backbone: str = "") -> float:
    """Peak resident size of a CPU training process before its model and data exist:
    the imports (the backbone's library too: timm, or open_clip for `open_clip:` names,
    ~190 MB), a one-process group and a DeepSpeed engine around a tiny model, with the
    thread count a rank gets (rskdist/train.py splits the cores between local ranks)."""
    import subprocess
    import sys

    from rskdist.models import OPEN_CLIP_PREFIX

    library = "open_clip" if backbone.startswith(OPEN_CLIP_PREFIX) else "timm"
    out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, str(zero_stage), str(threads), library],
                         capture_output=True, text=True, timeout=600, check=True)
    return float(out.stdout.strip().splitlines()[-1])
