"""An exponential moving average of the trained weights (optim.ema_decay).

After every applied optimizer step, ema = decay * ema + (1 - decay) * weights, for every
trainable parameter of the engine's module, in fp32. Each rank keeps the average of what it
holds: the whole parameter under ZeRO 0-2 (one fp32 copy of the trainable weights per rank),
its own partition under ZeRO-3 (`p.ds_tensor`, 1/W of it; the small parameters ZeRO-3
keeps whole on every rank, whole), so the extra memory follows the weights' own sharding. Frozen parameters never change, so they have no average.

Evaluation swaps the averages into the module's storage (`swapped()`), runs, and puts the
weights back bit for bit; under ZeRO-3 the swap writes the local partitions, which the
forward then gathers as usual. In bf16 runs the averaged values are rounded to bf16 while
swapped in (the average itself stays fp32). Checkpoints carry one file per rank that holds
a share (`state_dict()`), written beside the engine's files; a resume on another world size
under ZeRO-3 re-cuts the partitions from every saved rank's file (`load_resharded`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _local_data(p: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of `p`: its ZeRO-3 partition (always current: the optimizer
    writes it), else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _whole_copy(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole tensor ZeRO-3 keeps on every rank for its small parameters (`ds_persist`,
    below stage3_param_persistence_threshold) once a forward gathered it: the forward reads
    that copy, not the partition, so a swap must write it too. None elsewhere."""
    if getattr(p, "ds_persist", False) and p.data.numel() == getattr(p, "ds_numel", -1):
        return p.data
    return None


def _fill_whole(p: torch.nn.Parameter, whole: torch.Tensor) -> None:
    """Gather every rank's partition of `p` into its whole copy (a collective: every rank
    swaps the same parameters in the same order)."""
    import torch.distributed as dist

    part = p.ds_tensor
    pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, part.contiguous())
    whole.copy_(torch.cat(pieces)[: whole.numel()].view_as(whole))


class WeightEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1) (0: off), got {decay}")
        self.decay = float(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local_data(p).detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call after each applied optimizer step)."""
        for avg, p in zip(self.shadow, self.params):
            avg.mul_(self.decay).add_(_local_data(p).float(), alpha=1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The module computes with the averaged weights inside the block."""
        kept = [_local_data(p).detach().clone() for p in self.params]
        wholes = [_whole_copy(p) for p in self.params]
        kept_whole = [None if w is None else w.detach().clone() for w in wholes]
        try:
            with torch.no_grad():
                for avg, p, whole in zip(self.shadow, self.params, wholes):
                    _local_data(p).copy_(avg)
                    if whole is not None:  # the partition's average, gathered into the whole copy
                        _fill_whole(p, whole)
            yield
        finally:
            with torch.no_grad():
                for value, p, whole, old in zip(kept, self.params, wholes, kept_whole):
                    _local_data(p).copy_(value)
                    if whole is not None:
                        whole.copy_(old)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [t.clone() for t in self.shadow]}

    def load_resharded(self, states: list[dict], *, rank: int, world_size: int) -> None:
        """Under ZeRO-3, load the averages every rank of another world size saved
        (`states`, in rank order): this rank's partitions are cut from them."""
        from rskdist.parallel.reshard import reshard_partitions

        numels = [int(p.ds_numel) for p in self.params]
        shadow = reshard_partitions([s["shadow"] for s in states], numels, rank=rank, world_size=world_size)
        self.load_state_dict({**states[0], "shadow": shadow})

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["shadow"]]
        if shapes != [tuple(t.shape) for t in self.shadow]:
            raise ValueError(
                "resume: the checkpoint's weight average (optim.ema_decay) was kept for another model or another "
                "partitioning (other frozen layers, another ZeRO stage); resume with the same "
                "setup, or set optim.ema_decay=0 to train on without it")
        for dst, src in zip(self.shadow, state["shadow"]):
            dst.copy_(src)
        self.updates = int(state["updates"])
