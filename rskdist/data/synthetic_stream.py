"""An in-memory synthetic stream for tests and debug runs: no files, no workers.

Each class is a random low-resolution colour pattern; an image is its class pattern,
upsampled, plus instance noise. Train and test classes are disjoint. Batches follow
the same contract as the shard loaders: each rank gets `classes_per_rank * m` images,
exactly m per class, classes disjoint across ranks, deterministic in (seed, step), and the
global batch (ranks in order) the same on every world size.
Validation classes held out of training (rskdist/data/holdout.py) are left out of the
training batches (`classes`) and rendered by the evaluation stream instead.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


def _patterns(first_class: int, num: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    table = torch.rand(first_class + num, 3, 4, 4, generator=gen)
    return table[first_class:]


def _render(patterns: torch.Tensor, size: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    base = F.interpolate(patterns, size=(size, size), mode="bilinear", align_corners=False)
    shift = torch.randn(base.shape[0], 3, 1, 1, generator=gen) * 0.1 * noise
    pixel = torch.randn(base.shape, generator=gen) * 0.3 * noise
    return (base + shift + pixel - 0.5) / 0.25


class SyntheticTrainStream:
    """Infinite class-balanced batches; `steps_per_epoch` counts 16 images per class.

    `classes`: the labels it draws (default all of 0..num_classes-1; the labels left when
    validation classes are held out)."""

    images_per_class = 16

    def __init__(self, *, num_classes: int, rank: int, world_size: int, classes_per_rank: int, m: int,
                 image_size: int, seed: int, noise: float = 0.5, classes: Sequence[int] | None = None):
        self.classes = torch.arange(num_classes) if classes is None else torch.as_tensor(classes, dtype=torch.int64)
        if classes_per_rank * world_size > len(self.classes):
            raise ValueError(
                f"data: a global batch of {classes_per_rank * world_size} classes needs at least that many training "
                f"classes, got {len(self.classes)} (data.synthetic_classes={num_classes}, less any held out by "
                f"data.val_classes)"
            )
        self.num_classes, self.rank, self.world_size = num_classes, rank, world_size
        self.classes_per_rank, self.m, self.image_size = classes_per_rank, m, image_size
        self.seed, self.noise = seed, noise
        self.patterns = _patterns(0, num_classes, seed)
        global_batch = classes_per_rank * world_size * m
        self.steps_per_epoch = max(1, len(self.classes) * self.images_per_class // global_batch)
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # Indexing arange(num_classes) by the permutation: all classes draw as they always did.
        order = torch.randperm(len(self.classes), generator=gen)[: self.classes_per_rank * self.world_size]
        classes = self.classes[order]
        first = self.rank * self.classes_per_rank
        labels = classes[first : first + self.classes_per_rank].repeat_interleave(self.m)
        # One generator per slot of the global batch (never per rank): the same pixels on any world size.
        images = [_render(self.patterns[labels[k * self.m : (k + 1) * self.m]], self.image_size, self.noise,
                          torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 131 + first + k))
                  for k in range(self.classes_per_rank)]
        return torch.cat(images), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            out = self.batch(self.step)
            self.step += 1
            yield out

    def state_dict(self) -> dict:
        return {"step": self.step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class SyntheticEvalStream:
    """Held-out classes; yields (images, labels, index) with every image once across ranks,
    padding marked index = -1.

    Without `classes`: the test split, max(2, size // images_per_class) classes after the
    training ones, labelled from 0. With `classes` (training labels held out for validation):
    images_per_class images of each, labelled by their training labels, with noise drawn
    apart from the test images'."""

    def __init__(self, *, num_train_classes: int, size: int, rank: int, world_size: int, batch_size: int,
                 image_size: int, seed: int, noise: float = 0.5, images_per_class: int = 8,
                 classes: Sequence[int] | None = None):
        if classes is None:
            num_classes = max(2, size // images_per_class)
            self.patterns = _patterns(num_train_classes, num_classes, seed)
            ids, self._noise_salt = torch.arange(num_classes), 0
        else:
            ids = torch.as_tensor(classes, dtype=torch.int64)
            self.patterns = _patterns(0, num_train_classes, seed)[ids]
            self._noise_salt = 3  # 7 i + 3 is never a test image's 7 i'
        self._pattern_of = torch.arange(len(ids)).repeat_interleave(images_per_class)  # image -> row of patterns
        self.labels = ids[self._pattern_of]
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.image_size, self.seed, self.noise = image_size, seed, noise

    def _image(self, i: int) -> torch.Tensor:
        # Each image is a function of its index alone: the set is the same for any world size.
        return _render(self.patterns[self._pattern_of[i : i + 1]], self.image_size, self.noise,
                       torch.Generator().manual_seed(self.seed * 1_000_003 + 7 * i + self._noise_salt))

    def read_images(self, indices) -> torch.Tensor:
        """uint8 (n, 3, S, S) pictures of these images (the rendered values shown as colours)."""
        images = torch.cat([self._image(int(i)) for i in indices]) if len(indices) else torch.zeros(0, 3, 1, 1)
        return (images * 0.25 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        total = self.labels.numel()
        per_rank = -(-total // self.world_size)
        steps = -(-per_rank // self.batch_size)
        for s in range(steps):
            index = torch.arange(self.batch_size) + self.rank * per_rank + s * self.batch_size
            index[(index >= total) | (index >= (self.rank + 1) * per_rank)] = -1
            valid = index.clamp(min=0)
            images = torch.cat([self._image(i) for i in valid.tolist()])
            yield images, self.labels[valid], index

    def close(self) -> None:
        """Nothing to stop (no worker processes); the shard EvalLoader's close() stops its workers."""
