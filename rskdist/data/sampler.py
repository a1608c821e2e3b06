"""Class-balanced global batch plan: m images per class, each class on one rank per step.

The plan for (seed, epoch) is a pure function of the labels, so every rank (and every
DataLoader worker) computes the same plan and takes its own slice; no communication,
and every rank runs exactly `steps_per_epoch` steps whatever the shard layout.

Construction, per epoch:
1. each class's images are shuffled and cut into groups of m ("remainder=topup": a last
   partial group is filled with other images of the class, chosen at random;
   "remainder=drop": partial groups dropped, except that a class always keeps one
   group; "remainder=stochastic": a class of n images gets floor(n/m) groups plus one
   more (topped up) with probability (n mod m)/m, drawn each epoch, so every image is
   shown once per epoch in expectation, with neither systematic repeats nor
   systematically dropped images). A class with n < m images gets one group in every
   mode: its n images and m - n holes;
2. a step holds K = classes_per_rank * world_size groups of K distinct classes.
   steps_per_epoch S is the largest S with sum_c min(groups_c, S) >= S * K: a class
   cannot fill more than one slot per step, so classes with more than S groups
   contribute S of them this epoch (a random S; others wait for later epochs), and
   a few random groups are dropped so the total is exactly S * K;
3. the class-contiguous sequence of groups (classes in random order) is laid out
   column-major into an S x K grid: position p goes to step p % S, slot p // S. A class
   has at most S contiguous groups, so its groups land on distinct steps. Steps are
   then shuffled, and slots within each step (slot -> rank assignment);
4. holes are filled with one image each of classes absent from the step, preferring
   images the epoch does not show otherwise (`_fill_holes`).

So an epoch shows S * K * m images; with class sizes <= m * S every image appears
at least once and the only repeats are top-ups of partial groups and fillers. No image
appears twice in a step: a query never has a copy of itself as a positive, and SiMix
never pairs an image with itself.

`steps_per_epoch` may also be fixed (an int, or "dataset" = round(num_images / (K * m)),
the usual "dataset size / batch size" epoch). Fewer steps than the automatic S: classes
are capped at S groups and random groups dropped, as above. More steps: the missing
groups are extra groups of classes with spare steps (chosen at random, in proportion to
their spare steps), drawn from a fresh shuffle of the class. This is the regime of
Cars196/CUB in the paper, where a batch holds every training class (K = all classes):
every step then shows every class, and the epoch length matches the paper's.
"""

from __future__ import annotations

import numpy as np


class ClassBalancedPlan:
    """Deterministic per-epoch plan of sample indices, shape [steps, world_size, classes_per_rank, m]."""

    def __init__(
        self,
        labels: np.ndarray,
        *,
        m: int,
        classes_per_rank: int,
        world_size: int,
        seed: int = 0,
        remainder: str = "topup",
        steps_per_epoch: int | str | None = None,
    ):
        if m < 1 or classes_per_rank < 1 or world_size < 1:
            raise ValueError(f"m, classes_per_rank, world_size must be >= 1 (got {m}, {classes_per_rank}, {world_size})")
        if remainder not in ("topup", "drop", "stochastic"):
            raise ValueError(f"remainder must be 'topup', 'drop' or 'stochastic', got {remainder!r}")
        labels = np.asarray(labels, dtype=np.int64)
        self.m, self.classes_per_rank, self.world_size = m, classes_per_rank, world_size
        self.seed, self.remainder = seed, remainder
        self.slots = classes_per_rank * world_size  # K: distinct classes per global batch
        # Class members as CSR: members[starts[c]:starts[c+1]] are the sample indices of class c.
        self.members = np.argsort(labels, kind="stable")
        self.class_ids, counts = np.unique(labels, return_counts=True)
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.sample_class = np.searchsorted(self.class_ids, labels)  # dense class index per sample
        if len(self.class_ids) < self.slots:
            raise ValueError(
                f"a global batch needs {self.slots} distinct classes (classes_per_rank={classes_per_rank} x "
                f"world_size={world_size}) but the split has only {len(self.class_ids)}; lower classes_per_rank"
            )
        if len(labels) < self.slots * m:
            raise ValueError(
                f"a global batch of {self.slots * m} images (classes_per_rank={classes_per_rank} x "
                f"world_size={world_size} x m={m}) needs at least that many distinct images, but the split "
                f"has {len(labels)}; lower classes_per_rank or m"
            )
        if remainder == "topup":
            self.groups = -(-counts // m)
        elif remainder == "drop":
            self.groups = np.maximum(counts // m, 1)
        else:  # stochastic: expected groups per epoch (S is solved on expectations)
            # A class smaller than m always gets its one group: its images are then shown
            # once per epoch, as with the other classes (on average).
            self.groups = np.where(counts < m, 1.0, counts / m)
        self.auto_steps = self._solve_steps()  # most steps without repeating a class's images
        if steps_per_epoch is None:
            self.steps_per_epoch = self.auto_steps
        elif steps_per_epoch == "dataset":
            self.steps_per_epoch = max(1, round(len(labels) / (self.slots * m)))
        elif isinstance(steps_per_epoch, (int, np.integer)) and steps_per_epoch >= 1:
            self.steps_per_epoch = int(steps_per_epoch)
        else:
            raise ValueError(f"steps_per_epoch must be None, 'dataset' or an int >= 1, got {steps_per_epoch!r}")
        self._cache: tuple[int, np.ndarray] | None = None

    def _solve_steps(self) -> int:
        """Largest S with sum_c min(groups_c, S) >= S * K (the feasible S form an interval [0, S*])."""
        lo, hi = 0, int(self.groups.sum()) // self.slots
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if np.minimum(self.groups, mid).sum() >= mid * self.slots:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def batch_size(self) -> int:
        """Images per rank per step."""
        return self.classes_per_rank * self.m

    @property
    def images_per_epoch(self) -> int:
        """Images in one epoch, all ranks together."""
        return self.steps_per_epoch * self.slots * self.m

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """Sample indices of the whole epoch, [steps, world_size, classes_per_rank, m] (cached)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        plan = self._build(epoch)
        self._cache = (epoch, plan)
        return plan

    def rank_batch(self, epoch: int, step: int, rank: int) -> np.ndarray:
        """Sample indices of `rank`'s batch at `step`: classes_per_rank blocks of m, [batch_size]."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        return self.epoch_plan(epoch)[step, rank].reshape(-1)

    def _build(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        m, num_steps, slots = self.m, self.steps_per_epoch, self.slots
        num_classes = len(self.class_ids)
        groups = self.groups
        if self.remainder == "stochastic":
            frac = self.groups - np.floor(self.groups)
            groups = np.floor(self.groups).astype(np.int64) + (rng.random(len(frac)) < frac)
        capped = np.minimum(groups, num_steps)
        extra = np.zeros(num_classes, np.int64)  # repeat groups, when more steps than auto_steps
        deficit = num_steps * slots - int(capped.sum())
        if deficit > 0:  # spare capacity sum(S - capped) >= deficit because num_classes >= slots
            spare_slots = np.repeat(np.arange(num_classes), num_steps - capped)
            extra = np.bincount(rng.choice(spare_slots, size=deficit, replace=False), minlength=num_classes)
        blocks = []  # per class (in random order): [groups, m] sample indices, -1 = hole
        for c in rng.permutation(num_classes):
            idx = self.members[self.starts[c] : self.starts[c + 1]]
            idx = idx[rng.permutation(len(idx))]
            n, g = len(idx), int(groups[c])
            if n < m:  # fewer images than m: its g <= 1 group is its n images, then m - n holes
                idx = np.concatenate([idx, np.full(m - n, -1, np.int64)]) if g else idx[:0]
            elif g * m > n:  # partial last group: top up with other images of the class
                r = n % m
                fill = rng.choice(idx[: n - r], size=m - r, replace=False)
                idx = np.concatenate([idx, fill])
            else:
                idx = idx[: g * m]  # drop mode: leftover images wait for another epoch
            blocks.append(idx.reshape(g, m)[: capped[c]])
            if extra[c]:  # a fresh shuffle, cycled: groups of distinct images when n >= m
                members = self.members[self.starts[c] : self.starts[c + 1]]
                fresh = members[rng.permutation(n)]
                if n < m:  # each extra group (on its own step) is the class once, plus holes
                    fresh = np.concatenate([fresh, np.full(m - n, -1, np.int64)])
                blocks.append(np.resize(fresh, extra[c] * m).reshape(-1, m))
        groups_seq = np.concatenate(blocks)  # class-contiguous, [total_groups, m]
        excess = len(groups_seq) - num_steps * slots
        assert excess >= 0, "steps_per_epoch solved wrongly"
        if excess:
            keep = np.ones(len(groups_seq), bool)
            keep[rng.choice(len(groups_seq), size=excess, replace=False)] = False
            groups_seq = groups_seq[keep]
        # Position p -> (step p % S, slot p // S): contiguous runs of <= S groups hit distinct steps.
        grid = groups_seq.reshape(slots, num_steps, m).transpose(1, 0, 2)  # [S, K, m]
        grid = grid[rng.permutation(num_steps)]
        grid = np.take_along_axis(grid, rng.permuted(np.tile(np.arange(slots), (num_steps, 1)), axis=1)[..., None], 1)
        grid = np.ascontiguousarray(grid)
        if (grid < 0).any():
            self._fill_holes(grid, rng)
        return grid.reshape(num_steps, self.world_size, self.classes_per_rank, m)

    def _fill_holes(self, grid: np.ndarray, rng: np.random.Generator) -> None:
        """Fill the holes (-1) of small classes' groups in place, grid [S, K, m].

        A hole takes one image of a class absent from its step, one image per such class,
        preferring images the epoch does not show otherwise: the filler has no positive in
        the step (it is a negative only) and no image appears twice in a step. Should a step
        have more holes than such candidates (a split with about as many classes as a step
        holds), images of absent classes not shown yet give way to any image of an absent
        class, then to any image not in the step.
        Cost: per step with holes, a scan of about (fillers used so far + holes) candidates.
        """
        num_samples, num_classes = len(self.sample_class), len(self.class_ids)
        avail = np.ones(num_samples, bool)  # not shown this epoch and not used as a filler yet
        avail[grid[grid >= 0]] = False
        order = rng.permutation(num_samples)
        order = order[avail[order]]  # candidate fillers, in a random order fixed for the epoch
        for step in np.nonzero((grid < 0).any(axis=(1, 2)))[0]:
            cells = grid[step]  # [K, m] view: writes go to the grid
            holes = np.nonzero(cells.reshape(-1) < 0)[0]
            need = len(holes)
            present = np.zeros(num_classes, bool)
            present[self.sample_class[cells[:, 0]]] = True  # position 0 of a group is never a hole
            width, chosen = 4 * need + 64, order[:0]
            while True:  # the consumed prefix of `order` is rescanned: it grows by the holes filled
                window = order[:width]
                ok = window[avail[window] & ~present[self.sample_class[window]]]
                _, first = np.unique(self.sample_class[ok], return_index=True)  # one per class
                chosen = ok[np.sort(first)[:need]]
                if len(chosen) == need or width >= len(order):
                    break
                width *= 4
            avail[chosen] = False
            if len(chosen) < need:  # rare fallbacks, see the docstring
                present[self.sample_class[chosen]] = True
                absent = rng.permutation(np.nonzero(~present)[0])[: need - len(chosen)]
                picks = self.starts[absent] + rng.integers(0, self.counts[absent])
                chosen = np.concatenate([chosen, self.members[picks]])
            if len(chosen) < need:
                in_step = np.zeros(num_samples, bool)
                in_step[cells[cells >= 0]] = True
                in_step[chosen] = True
                rest = rng.permutation(np.nonzero(~in_step)[0])[: need - len(chosen)]
                chosen = np.concatenate([chosen, rest])
            cells.reshape(-1)[holes] = chosen
