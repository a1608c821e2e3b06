"""The two-pass (gradient-cache) training step over a gathered global batch.

1. forward the local batch in chunks without keeping activations -> local embeddings;
2. loss of the global batch (rsk_loss with the process group gathers the embeddings);
   keep d loss / d local embedding;
3. recompute each chunk with grad, under the same RNG state as in the embed pass, and
   backpropagate the cached embedding gradient; one optimizer step for all chunks.
Gradient flow and scaling are explained in rskdist/parallel/gradients.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from rskdist.comm import group_rank_and_size
from rskdist.parallel.gradients import loss_scale_for_averaging


class Engine(Protocol):
    """What the step needs from a training engine (DeepSpeed's engine satisfies it)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = ...) -> None: ...

    def step(self) -> None: ...


def chunk_seed(base_seed: int, step: int, first: int) -> int:
    """Seed of a chunk's stochastic layers (dropout, drop path): same in both passes,
    different across steps and chunks, reproducible after a resume. `first` is the place
    of the chunk's first image in the global batch, so a chunk of the same images draws
    the same masks on any world size (a resume on other ranks; chunk boundaries must fall
    at the same places, docs/distributed.md)."""
    return ((base_seed * 1_000_003 + step) * 1_000_033 + first) % (2**63 - 1)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under a fixed RNG state without disturbing the caller's RNG."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class StepResult:
    loss: float
    embed_seconds: float
    loss_seconds: float
    backprop_seconds: float
    # L2 norm of d loss / d E over all embeddings of the global batch; the same on every rank.
    emb_grad_norm: float = 0.0
    # False when the engine skipped the optimizer update (fp16 overflow); the trainer's
    # step count and LR schedule still advance (docs/distributed.md, "Mixed precision").
    step_applied: bool = True
    # Ranks whose embeddings, or whose share of the loss gradient, were not finite; when
    # any rank sees one, every rank skips the backprop pass and the update alike.
    nonfinite_ranks: tuple[int, ...] = ()
    nonfinite_stage: str = ""  # "embeddings" or "loss"


def two_pass_step(
    engine: Engine,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    step: int,
    seed: int,
    input_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    group=None,
    loss_params: Sequence[torch.Tensor] = (),
) -> StepResult:
    """One optimizer step on the local batch (images, labels) of every rank.

    `loss_fn(local_embeddings, local_labels)` must return the loss of the *global*
    batch with exact gradients for the local rows (rsk_loss with group=...).
    The engine must be configured with gradient_accumulation_steps equal to the number
    of chunks; `engine.step()` after the last chunk applies the optimizer. `images` may
    stay in host memory: each chunk is moved to `device` when it is forwarded, so the
    device holds one chunk of images, not the local batch. `group` is the process group
    `loss_fn` gathers over; this rank's place and the world size are read from it
    (None: this process alone, rskdist.comm).

    `loss_params` are leaf tensors `loss_fn` uses besides the embeddings (fp32 copies of
    a loss's class proxies, `StepLoss` in step_parts.py): their gradient is taken in the
    loss pass and handed to the engine with the first chunk, `engine(x, grads)`, which
    then returns (embeddings, sum <p, g>) (`TrainModule` in step_parts.py). Every rank
    computes the same, whole proxy gradient, so DeepSpeed's average over ranks keeps it
    unscaled (rskdist/parallel/gradients.py, 5).
    """
    rank, world_size = group_rank_and_size(group)
    device = images.device if device is None else device
    labels = labels.to(device)
    chunks = images.split(chunk_size)
    offset = rank * len(images)  # every rank holds the same number of images: its place in the global batch
    t0 = time.perf_counter()
    with torch.no_grad():
        pieces = []
        for c, x in enumerate(chunks):
            with seeded_rng(chunk_seed(seed, step, offset + c * chunk_size), device):
                pieces.append(engine(x.to(device, input_dtype, non_blocking=True)))
    emb = torch.cat(pieces)
    t1 = time.perf_counter()
    # Checked on every rank together (one W-long all-reduce): a NaN on one rank must not
    # raise there while the others wait in the loss's gather.
    bad, _ = _check_over_ranks(emb, rank, world_size, group)
    if bad:
        return StepResult(math.nan, t1 - t0, 0.0, 0.0, emb_grad_norm=math.nan, step_applied=False,
                          nonfinite_ranks=bad, nonfinite_stage="embeddings")

    # An fp32 leaf (same values; the loss computes in fp32 anyway), so that d loss / d emb
    # stays fp32 into the backprop pass: rounded to fp16 before DeepSpeed's loss scale applies, most of
    # its entries at large B would be subnormal and some flush to zero.
    emb = emb.detach().to(torch.promote_types(emb.dtype, torch.float32)).requires_grad_(True)
    loss = loss_fn(emb, labels)
    grad_emb, *param_grads = torch.autograd.grad(loss, [emb, *loss_params], allow_unused=True)
    grad_emb = grad_emb.float()
    param_grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(loss_params, param_grads)]
    # The gradient is split over ranks by rows: the squares of the global norm add up.
    bad, sq_norm = _check_over_ranks(grad_emb, rank, world_size, group)
    if bad or not math.isfinite(float(loss.detach())):
        return StepResult(float(loss.detach()), t1 - t0, time.perf_counter() - t1, 0.0,
                          emb_grad_norm=float(sq_norm.sqrt()), step_applied=False,
                          nonfinite_ranks=bad or tuple(range(world_size)), nonfinite_stage="loss")
    # DeepSpeed averages parameter gradients over ranks; we need their sum (gradients.py, 3).
    grad_emb = grad_emb * loss_scale_for_averaging(world_size)
    t2 = time.perf_counter()

    row = 0
    for c, x in enumerate(chunks):
        extra = 0.0
        with seeded_rng(chunk_seed(seed, step, offset + c * chunk_size), device):
            if c == 0 and param_grads:
                out, extra = engine(x.to(device, input_dtype, non_blocking=True), param_grads)
            else:
                out = engine(x.to(device, input_dtype, non_blocking=True))
        target = grad_emb[row : row + out.shape[0]]
        row += out.shape[0]
        # d surrogate / d out = target, so backward pushes exactly the cached gradient.
        surrogate = (out.float() * target).sum() + extra
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    t3 = time.perf_counter()
    # DeepSpeed reports an fp16 overflow skip here; engines without the query always apply.
    applied = getattr(engine, "was_step_applied", lambda: True)()
    return StepResult(float(loss.detach()), t1 - t0, t2 - t1, t3 - t2, emb_grad_norm=float(sq_norm.sqrt()),
                      step_applied=bool(applied))


def _check_over_ranks(x: torch.Tensor, rank: int, world_size: int, group) -> tuple[tuple[int, ...], torch.Tensor]:
    """(the ranks whose `x` holds a NaN or an infinity, the sum of x^2 over all ranks' `x`),
    the same on every rank, from one (W + 1)-long all-reduce."""
    stats = torch.zeros(world_size + 1, dtype=torch.float64, device=x.device)
    stats[rank] = float(not bool(torch.isfinite(x).all()))
    stats[-1] = x.double().square().sum()
    if world_size > 1:
        dist.all_reduce(stats, group=group)
    return tuple(int(r) for r in torch.nonzero(stats[:-1]).flatten()), stats[-1]
