"""Validation classes held out of the training split (`data.val_classes`).

The training split's labels are 0..C-1. A run that validates draws some of them, fixed
by its seed, and keeps their images out of the training stream; those images form the
validation set, class-disjoint from training like the test split. Every rank and every
tool draws the same classes from (C, val_classes, seed) alone.
"""

from __future__ import annotations

import numpy as np

_HOLDOUT_STREAM = 0x7A1  # seeds the draw apart from the batch plan's (seed, epoch) streams


def num_validation_classes(num_classes: int, val_classes: float) -> int:
    """How many of `num_classes` training classes `val_classes` holds out: a whole count
    >= 1, or a fraction 0 < x < 1 (rounded, at least one class); 0 holds out none."""
    if val_classes == 0:
        return 0
    if 0 < val_classes < 1:
        return max(1, round(val_classes * num_classes))
    if val_classes >= 1 and float(val_classes).is_integer():
        return int(val_classes)
    raise ValueError(f"val_classes must be 0, a whole count >= 1 or a fraction in (0, 1), got {val_classes}")


def validation_classes(num_classes: int, val_classes: float, seed: int) -> np.ndarray:
    """The held-out training labels, sorted (int64; empty when `val_classes` is 0)."""
    count = num_validation_classes(num_classes, val_classes)
    if count >= num_classes:
        raise ValueError(f"val_classes={val_classes} holds out {count} of the {num_classes} training classes; "
                         f"at most {num_classes - 1} can be held out")
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    return np.sort(rng.choice(num_classes, size=count, replace=False)).astype(np.int64)
