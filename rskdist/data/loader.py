"""Training and evaluation streams over rskdist shards.

Both loaders are thin iterators around a torch DataLoader whose "indices" are read
requests (sample indices + augmentation key). The main process decides which sample
goes where (the batch plan of rskdist/data/sampler.py, or the evaluation order);
DataLoader workers only read bytes (one seek + read per image in the tar shards) and
decode; the main process concatenates the reads of a step, in order, into the rank's
batch. Consequences:
- batches do not depend on num_workers; only the rank's own images are read;
- memory is bounded by num_workers * prefetch_factor reads, never the dataset;
- the position is just (epoch, step): `state_dict()` / `load_state_dict()` restore it
  and the next batch is bit-identical (augmentation is seeded by position);
- a training image's augmentation is keyed by its place in the global batch, not by
  rank: a run resumed on another world size sees the uninterrupted run's pixels;
- an unreadable image never stops the stream: a training image is replaced by another
  image of its class, chosen by position, an evaluation image is dropped like padding;
  both are counted (`bad_samples`) and reported (`pop_bad_events()`, one warning each).
Rank and world size are arguments (never read from torch.distributed here).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .reads import READ_ERRORS, BadSampleWarning, _ChunkDataset, read_error_reason
from .remote import StoreReading
from .sampler import make_plan
from .shards import load_split
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = ["READ_ERRORS", "BadSampleWarning", "read_error_reason", "StoreReading", "TrainLoader", "EvalLoader",
           "build_train_loader", "build_eval_loader"]


class _RequestSampler(Sampler):
    """Yields the read requests of steps [start, end of the epoch) of the owner's current pass."""

    def __init__(self, owner: "_ChunkedLoader"):
        self.owner = owner
        self.epoch, self.start = 0, 0

    def __iter__(self):
        o = self.owner
        for step in range(self.start, o._epoch_steps(self.epoch)):
            indices, aug_key = o._step_request(self.epoch, step)
            batch = indices if aug_key is not None else None  # substitutes avoid the step's images (of the class: all here)
            for c in range(0, len(indices), o.read_size):
                yield indices[c : c + o.read_size], aug_key, o.batch_offset + c, batch

    def __len__(self) -> int:
        o = self.owner
        return (o._epoch_steps(self.epoch) - self.start) * math.ceil(o.batch_size / o.read_size)


class _ChunkedLoader:
    """Shared machinery: DataLoader over read requests, reassembly into steps, position,
    and the record of unreadable images (`bad_samples`, `pop_bad_events()`)."""

    steps_per_epoch: int
    batch_size: int
    rank: int  # set by the subclass before __init__; used in messages only
    batch_offset = 0  # place of this rank's first image in the global batch (augmentation and substitute keys)

    def __init__(
        self, table, *, image_size, num_workers, mean, std, read_size, prefetch_factor, pin_memory, device, augment,
        substitutes, store=None,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.table = table
        self.image_size, self.num_workers = image_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.read_size = max(1, read_size)
        self.device = device
        self.epoch, self.step = 0, 0
        self.bad_samples = 0  # images that could not be read (see the subclasses for the scope)
        self._bad_events: list[dict] = []
        self._reported: set[int] = set()  # sample indices already warned about
        self._sampler = _RequestSampler(self)
        self._dataset = _ChunkDataset(table, image_size, augment, substitutes, store)
        self._loader_kwargs = dict(
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )
        self._loader: DataLoader | None = None

    def _step_request(self, epoch: int, step: int) -> tuple[np.ndarray, tuple | None]:
        raise NotImplementedError

    def _epoch_steps(self, epoch: int) -> int:
        return self.steps_per_epoch

    def __len__(self) -> int:
        """Steps of the current epoch."""
        return self._epoch_steps(self.epoch)

    def pop_bad_events(self) -> list[dict]:
        """The unreadable images met since the last call, oldest first, as dicts: index
        (row of the sample table), shard (path relative to the shard root), offset, epoch,
        step, position (in this rank's batch), reason, substitute (-1: none)."""
        events, self._bad_events = self._bad_events, []
        return events

    def _record_bad(self, events: list[dict], epoch: int, step: int, outcome) -> None:
        """Count the step's unreadable images; warn once per sample with `outcome(event)`."""
        for event in events:
            event.update(epoch=epoch, step=step)
            self.bad_samples += 1
            self._bad_events.append(event)
            if event["index"] not in self._reported:
                self._reported.add(event["index"])
                warnings.warn(
                    f"rank {self.rank}: cannot read {self.table.split} sample {event['index']} "
                    f"({event['shard']} at byte {event['offset']}): {event['reason']}; {outcome(event)}",
                    BadSampleWarning,
                    stacklevel=3,
                )

    def _iter_steps(self) -> Iterator[tuple[int, int, torch.Tensor, list[dict]]]:
        """Yields (epoch, step, uint8 images of the step, its bad events) from the current
        position to epoch end."""
        if self._loader is None:  # built lazily: workers start on first use, and persist
            self._loader = DataLoader(self._dataset, sampler=self._sampler, **self._loader_kwargs)
        epoch, start = self.epoch, self.step
        self._sampler.epoch, self._sampler.start = epoch, start
        num_reads = math.ceil(self.batch_size / self.read_size)
        reads: list[torch.Tensor] = []
        bad: list[dict] = []
        step = start
        for read, read_bad in self._loader:
            # With a device, copy each (pinned) read as it arrives and concatenate there.
            reads.append(read if self.device is None else read.to(self.device, non_blocking=True))
            for event in read_bad:  # read at places in the global batch; events say places in this rank's
                event["position"] -= self.batch_offset
            bad += read_bad
            if len(reads) == num_reads:
                images = reads[0] if num_reads == 1 else torch.cat(reads)
                yield epoch, step, images, bad
                reads, bad = [], []
                step += 1

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._loader = None


class TrainLoader(_ChunkedLoader):
    """Class-balanced training stream of one rank; iterate for the rest of the current epoch.

    Yields (images float32 [b, 3, S, S], labels int64 [b]) with b = classes_per_rank * m,
    the batch laid out as classes_per_rank blocks of m images of one class. Over ranks,
    the classes of a step are distinct, so the gathered global batch has exactly m images
    per class. After the last step of an epoch the position moves to (epoch + 1, 0).

    `sampler` picks the plan (rskdist/data/sampler.py): "balanced" (ClassBalancedPlan,
    shaped by `remainder` and `steps_per_epoch`) or "reference" (ReferencePlan, the
    published code's epoch; those two must stay at their defaults). An epoch has
    `plan.epoch_steps(epoch)` steps on every rank: `steps_per_epoch` for the balanced
    plan; for the reference plan it varies a little with the epoch, and `steps_per_epoch`
    is its mean (the trainer's schedule counts epochs of that many steps).

    An image that cannot be read or decoded (twice) is replaced by another image of its
    class (`_ChunkDataset`); the batch keeps its shape and labels and every rank its step
    count. `bad_samples` counts the replacements of this run on this rank (kept in
    `state_dict()`), `pop_bad_events()` lists them; each sample is warned about once
    (`BadSampleWarning`, with the rank, shard path and reason).

    `keep_labels` restricts the stream to the images of those labels (the training classes
    left when validation classes are held out, rskdist/data/holdout.py); labels keep their
    values, so a loss's class table still spans the whole split.
    """

    def __init__(
        self,
        root: str,
        *,
        rank: int,
        world_size: int,
        classes_per_rank: int,
        m: int = 4,
        image_size: int = 224,
        num_workers: int = 4,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        split: str = "train",
        keep_labels: Sequence[int] | None = None,
        remainder: str = "topup",
        steps_per_epoch: int | str | None = None,
        sampler: str = "balanced",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        read_size: int = 32,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
        store: StoreReading | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        table = load_split(root, split, **({"retries": store.retries} if store else {}))
        if keep_labels is not None:  # e.g. the training classes left when validation classes are held out
            table = table.select(keep_labels)
        self.plan = make_plan(
            sampler,
            table.labels,
            m=m,
            classes_per_rank=classes_per_rank,
            world_size=world_size,
            seed=seed,
            remainder=remainder,
            steps_per_epoch=steps_per_epoch,
        )
        if self.plan.steps_per_epoch == 0:
            raise ValueError(
                f"{root}/{split}: not enough images for one step of {classes_per_rank * world_size} classes x m={m}"
            )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.classes_per_rank, self.m, self.remainder, self.sampler = classes_per_rank, m, remainder, sampler
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.batch_size = classes_per_rank * m
        self.batch_offset = rank * self.batch_size
        super().__init__(
            table,
            image_size=image_size,
            num_workers=num_workers,
            mean=mean,
            std=std,
            read_size=read_size,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            device=device,
            augment={"scale": tuple(scale), "ratio": tuple(ratio), "hflip": bool(hflip)},
            substitutes=True,
            store=store,
        )

    def _step_request(self, epoch, step):
        return self.plan.rank_batch(epoch, step, self.rank), (self.seed, epoch, step)

    def _epoch_steps(self, epoch: int) -> int:
        return self.plan.epoch_steps(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels_all = self.table.labels
        for epoch, step, images, bad in self._iter_steps():
            labels = torch.from_numpy(labels_all[self.plan.rank_batch(epoch, step, self.rank)].astype(np.int64))
            # Advance (and count) before yielding: a checkpoint taken after this step resumes at the next one.
            self._record_bad(bad, epoch, step, _substitute_outcome)
            self.step = step + 1
            if self.step == self.plan.epoch_steps(epoch):
                self.epoch, self.step = epoch + 1, 0
            images = normalize(images, self.mean, self.std, self.device)
            if self.device is not None:
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels

    def state_dict(self) -> dict:
        """Stream position plus what must match on resume (the plan depends on it, bar world_size)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "classes_per_rank": self.classes_per_rank,
            "global_classes": self.classes_per_rank * self.world_size,
            "m": self.m,
            "remainder": self.remainder,
            "sampler": self.sampler,
            "num_samples": len(self.table),
            "steps_per_epoch": self.steps_per_epoch,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position (and the count of replaced images); the next global batch is
        the one that followed when `state` was saved, on this world size or another.

        The plan is a function of (labels, seed, m, global_classes, remainder, sampler,
        steps_per_epoch), not of the world size: resuming with any of those changed would
        silently give other batches, so that is an error (a checkpoint without `sampler`
        predates the reference sampler: its plan was the balanced one). After a change of
        world size, rank 0 goes on counting `bad_samples` from the count saved, others from 0.
        """
        state = {"sampler": "balanced", **state}
        if "global_classes" not in state and "world_size" in state:  # saved before the key
            state["global_classes"] = state["classes_per_rank"] * state["world_size"]
        for key in ("seed", "global_classes", "m", "remainder", "sampler", "num_samples", "steps_per_epoch"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume the data stream: {key}={state[key]} in the checkpoint but "
                    f"{self.state_dict()[key]} now (the batch plan depends on it)"
                )
        if not 0 <= state["step"] < self.plan.epoch_steps(int(state["epoch"])):
            raise ValueError(f"step {state['step']} outside [0, {self.plan.epoch_steps(int(state['epoch']))}) "
                             f"of epoch {state['epoch']}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        same_world = state.get("world_size", self.world_size) == self.world_size  # bad_samples: absent in old ones
        self.bad_samples = int(state.get("bad_samples", 0)) if same_world or self.rank == 0 else 0


class EvalLoader(_ChunkedLoader):
    """Every image of `split` exactly once over all ranks, in a stable order.

    Rank r reads the contiguous block [r*N//W, (r+1)*N//W) of the sample table (so whole
    shards, read sequentially). Every rank yields the same number of batches of exactly
    batch_size; padding entries have index -1 (label -1, black image). Yields
    (images float32 [batch_size, 3, S, S], labels int64, index int64); the caller drops
    index < 0 and sorts by index to get the split's order.

    An image that cannot be read or decoded (twice) is yielded like padding (index -1,
    label -1, black) and so left out of the metrics; `bad_samples` counts those of the
    current pass on this rank (reset when a pass starts), `pop_bad_events()` lists them,
    and each is warned about once (`BadSampleWarning`).

    `keep_labels` restricts it to the images of those labels (the validation classes held
    out of the training split); `index` then numbers the images of that subset.
    """

    def __init__(
        self,
        root: str,
        split: str = "test",
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        image_size: int = 224,
        num_workers: int = 4,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        keep_labels: Sequence[int] | None = None,
        read_size: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
        store: StoreReading | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        table = load_split(root, split, **({"retries": store.retries} if store else {}))
        if keep_labels is not None:  # e.g. the validation classes held out of the training split
            table = table.select(keep_labels)
        n = len(table)
        self.rank, self.world_size = rank, world_size
        self.num_samples = n
        self.begin, self.end = rank * n // world_size, (rank + 1) * n // world_size
        self.batch_size = batch_size
        self.steps_per_epoch = math.ceil(math.ceil(n / world_size) / batch_size) if n else 0
        super().__init__(
            table,
            image_size=image_size,
            num_workers=num_workers,
            mean=mean,
            std=std,
            read_size=read_size or min(batch_size, 64),
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            device=device,
            augment={},  # eval requests carry no augmentation key
            substitutes=False,
            store=store,
        )

    def _step_request(self, epoch, step):
        idx = np.arange(self.begin + step * self.batch_size, self.begin + (step + 1) * self.batch_size)
        idx[idx >= self.end] = -1
        return idx, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.epoch, self.step = 0, 0
        self.bad_samples = 0
        labels_all = self.table.labels
        for _, step, images, bad in self._iter_steps():
            index = torch.from_numpy(self._step_request(0, step)[0])
            self._record_bad(bad, 0, step, lambda event: "left out of the evaluation")
            index[[event["position"] for event in bad]] = -1  # dropped like padding
            labels = torch.full_like(index, -1)
            valid = index >= 0
            labels[valid] = torch.from_numpy(labels_all[index[valid].numpy()].astype(np.int64))
            images = normalize(images, self.mean, self.std, self.device)
            if self.device is not None:
                labels, index = labels.to(self.device), index.to(self.device)
            yield images, labels, index

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    def read_images(self, indices) -> torch.Tensor:
        """uint8 (n, 3, S, S) images of these sample indices (any rank's), as evaluated,
        before normalisation; an unreadable one stays black. For a few images (pictures
        of retrievals): read here, in this process."""
        images, _ = self._dataset[(np.asarray(indices, dtype=np.int64), None, 0, None)]
        return images


def _substitute_outcome(event: dict) -> str:
    if event["substitute"] < 0:
        return "no readable image of its class: a black image takes its place (label kept)"
    return f"replaced by sample {event['substitute']} of the same class"


def build_train_loader(
    root: str,
    *,
    rank: int,
    world_size: int,
    classes_per_rank: int,
    m: int = 4,
    image_size: int = 224,
    num_workers: int = 4,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **kwargs,
) -> TrainLoader:
    """The class-balanced training stream of `rank` (see TrainLoader for extra options: split,
    keep_labels, remainder, steps_per_epoch, sampler, scale, ratio, hflip, read_size, prefetch_factor, pin_memory,
    device, store: how shards on a store are read, rskdist/data/remote.py)."""
    return TrainLoader(
        root,
        rank=rank,
        world_size=world_size,
        classes_per_rank=classes_per_rank,
        m=m,
        image_size=image_size,
        num_workers=num_workers,
        seed=seed,
        mean=mean,
        std=std,
        **kwargs,
    )


def build_eval_loader(
    root: str,
    split: str = "test",
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: int = 224,
    num_workers: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **kwargs,
) -> EvalLoader:
    """The evaluation stream of `rank`: yields (images, labels, index); drop index < 0."""
    return EvalLoader(
        root,
        split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        image_size=image_size,
        num_workers=num_workers,
        mean=mean,
        std=std,
        **kwargs,
    )
