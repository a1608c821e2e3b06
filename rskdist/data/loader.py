"""Training and evaluation streams over rskdist shards.

Both loaders are thin iterators around a torch DataLoader whose "indices" are read
requests (sample indices + augmentation key). The main process decides which sample
goes where (the class-balanced plan, or the evaluation order); DataLoader workers only
read bytes (one seek + read per image in the tar shards) and decode; the main process
concatenates the reads of a step, in order, into the rank's batch. Consequences:
- batches do not depend on num_workers; only the rank's own images are read;
- memory is bounded by num_workers * prefetch_factor reads, never the dataset;
- the position is just (epoch, step): `state_dict()` / `load_state_dict()` restore it
  and the next batch is bit-identical (augmentation is seeded by position).
Rank and world size are arguments (never read from torch.distributed here).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sampler import ClassBalancedPlan
from .shards import ShardReader, SplitTable, load_split
from .transforms import IMAGENET_MEAN, IMAGENET_STD, decode_eval, decode_train, normalize


class _ChunkDataset(Dataset):
    """dataset[request] -> uint8 images [n, 3, size, size] for one read request.

    request = (indices int64 [n] (-1 = padding), aug_key or None for eval, position of
    indices[0] in the batch). Image i is augmented with rng([*aug_key, position + i]):
    independent of read_size and num_workers.
    """

    def __init__(self, table: SplitTable, image_size: int, augment: dict):
        self.samples = table.samples
        self.reader = ShardReader(table.shard_paths)
        self.image_size, self.augment = image_size, augment  # decode_train's scale, ratio, hflip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, request) -> torch.Tensor:
        indices, aug_key, position = request
        size = self.image_size
        out = np.zeros((len(indices), 3, size, size), np.uint8)
        for i, idx in enumerate(indices):
            if idx < 0:
                continue  # padding stays black
            row = self.samples[idx]
            data = self.reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
            if aug_key is None:
                out[i] = decode_eval(data, size)
            else:
                rng = np.random.default_rng([*aug_key, position + i])
                out[i] = decode_train(data, size, rng, **self.augment)
        return torch.from_numpy(out)


class _RequestSampler(Sampler):
    """Yields the read requests of steps [start, stop) of the owner's current pass."""

    def __init__(self, owner: "_ChunkedLoader"):
        self.owner = owner
        self.epoch, self.start = 0, 0

    def __iter__(self):
        o = self.owner
        for step in range(self.start, o.steps_per_epoch):
            indices, aug_key = o._step_request(self.epoch, step)
            for c in range(0, len(indices), o.read_size):
                yield indices[c : c + o.read_size], aug_key, c

    def __len__(self) -> int:
        o = self.owner
        return (o.steps_per_epoch - self.start) * math.ceil(o.batch_size / o.read_size)


class _ChunkedLoader:
    """Shared machinery: DataLoader over read requests, reassembly into steps, position."""

    steps_per_epoch: int
    batch_size: int

    def __init__(self, table, *, image_size, num_workers, mean, std, read_size, prefetch_factor, pin_memory, device, augment):
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
        self._sampler = _RequestSampler(self)
        self._dataset = _ChunkDataset(table, image_size, augment)
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

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _iter_steps(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yields (epoch, step, uint8 images of the step) from the current position to epoch end."""
        if self._loader is None:  # built lazily: workers start on first use, and persist
            self._loader = DataLoader(self._dataset, sampler=self._sampler, **self._loader_kwargs)
        epoch, start = self.epoch, self.step
        self._sampler.epoch, self._sampler.start = epoch, start
        num_reads = math.ceil(self.batch_size / self.read_size)
        reads: list[torch.Tensor] = []
        step = start
        for read in self._loader:
            # With a device, copy each (pinned) read as it arrives and concatenate there.
            reads.append(read if self.device is None else read.to(self.device, non_blocking=True))
            if len(reads) == num_reads:
                images = reads[0] if num_reads == 1 else torch.cat(reads)
                reads = []
                yield epoch, step, images
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
        remainder: str = "topup",
        steps_per_epoch: int | str | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        read_size: int = 32,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        table = load_split(root, split)
        self.plan = ClassBalancedPlan(
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
        self.classes_per_rank, self.m, self.remainder = classes_per_rank, m, remainder
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.batch_size = classes_per_rank * m
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
        )

    def _step_request(self, epoch, step):
        return self.plan.rank_batch(epoch, step, self.rank), (self.seed, epoch, step, self.rank)

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices (rows of the split's sample table) of this rank's batch at (epoch, step)."""
        return self.plan.rank_batch(epoch, step, self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; no-op if already in it (keeps a resumed mid-epoch step)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels_all = self.table.labels
        for epoch, step, images in self._iter_steps():
            labels = torch.from_numpy(labels_all[self.plan.rank_batch(epoch, step, self.rank)].astype(np.int64))
            # Advance before yielding: a checkpoint taken after this step resumes at the next one.
            self.step = step + 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = epoch + 1, 0
            images = normalize(images, self.mean, self.std, self.device)
            if self.device is not None:
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels

    def state_dict(self) -> dict:
        """Stream position plus what must match on resume (the plan depends on all of it)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "classes_per_rank": self.classes_per_rank,
            "m": self.m,
            "remainder": self.remainder,
            "num_samples": len(self.table),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the next batch is the one that followed when `state` was saved.

        The plan is a function of (labels, seed, m, classes_per_rank, world_size,
        remainder, steps_per_epoch): resuming with any of them changed would silently give other
        batches, so that is an error.
        """
        for key in ("seed", "world_size", "classes_per_rank", "m", "remainder", "num_samples", "steps_per_epoch"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume the data stream: {key}={state[key]} in the checkpoint but "
                    f"{self.state_dict()[key]} now (the batch plan depends on it)"
                )
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"step {state['step']} outside [0, {self.steps_per_epoch})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class EvalLoader(_ChunkedLoader):
    """Every image of `split` exactly once over all ranks, in a stable order.

    Rank r reads the contiguous block [r*N//W, (r+1)*N//W) of the sample table (so whole
    shards, read sequentially). Every rank yields the same number of batches of exactly
    batch_size; padding entries have index -1 (label -1, black image). Yields
    (images float32 [batch_size, 3, S, S], labels int64, index int64); the caller drops
    index < 0 and sorts by index to get the split's order.
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
        read_size: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        table = load_split(root, split)
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
        )

    def _step_request(self, epoch, step):
        idx = np.arange(self.begin + step * self.batch_size, self.begin + (step + 1) * self.batch_size)
        idx[idx >= self.end] = -1
        return idx, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.epoch, self.step = 0, 0
        labels_all = self.table.labels
        for _, step, images in self._iter_steps():
            index = torch.from_numpy(self._step_request(0, step)[0])
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
    """The class-balanced training stream of `rank` (see TrainLoader for extra options:
    split, remainder, steps_per_epoch, scale, ratio, hflip, read_size, prefetch_factor, pin_memory, device)."""
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
