"""Label arrays with the class-size histograms of the paper's training splits.

No dataset is present here, so the histograms are generated deterministically (no
random numbers) from published statistics: number of classes, number of images and
the range of images per class. Class sizes are the quantiles of a log-normal
distribution, clipped to the range, with the location solved by bisection so the
rounded sizes sum to the published total; the last few images are then added to (or
taken from) the largest classes that still have room, so the total is exact.

| split | classes | images | bounds | log-normal sigma | resulting sizes (median) |
|---|---|---|---|---|---|
| iNaturalist 2018 (Smooth-AP train) | 5,690 | 325,846 | 2-1000 | 1.1 (long tail) | 2-1000 (31), 131 classes < 4 |
| SOP train (Ebay_train.txt) | 11,318 | 59,551 | 2-12 | 0.45 | 2-12 (5), 2,742 classes < 4 |
| Cars196 train (classes 1-98) | 98 | 8,054 | 24-140 | 0.2 | 48-135 (80) |
| CUB-200-2011 train (classes 1-100) | 100 | 5,864 | 41-60 | 0.1 | 48-60 (60) |

iNaturalist 2018's train classes have 2 to 1000 images; the Smooth-AP split also holds
the validation images, so its smallest class may be larger than 2. 2 is the harder case
for the sampler (classes smaller than m = 4), hence the choice.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

# name -> (classes, images, smallest, largest class, sigma)
PAPER_SPLITS = {
    "inat": (5690, 325_846, 2, 1000, 1.1),
    "sop": (11_318, 59_551, 2, 12, 0.45),
    "cars196": (98, 8054, 24, 140, 0.2),
    "cub": (100, 5864, 41, 60, 0.1),
}


def class_sizes(num_classes: int, total: int, lo: int, hi: int, sigma: float) -> np.ndarray:
    """Images per class, descending, summing to `total`, each in [lo, hi]."""
    if not lo * num_classes <= total <= hi * num_classes:
        raise ValueError(f"{total} images do not fit {num_classes} classes of {lo}..{hi}")
    z = np.array([NormalDist().inv_cdf((i + 0.5) / num_classes) for i in range(num_classes)])[::-1]

    def sizes(mu: float) -> np.ndarray:
        return np.clip(np.rint(np.exp(mu + sigma * z)), lo, hi).astype(np.int64)

    a, b = np.log(lo) - 10 * sigma, np.log(hi) + 10 * sigma  # sum(sizes) is monotone in mu
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if sizes(mid).sum() < total else (a, mid)
    counts = sizes(b)
    diff = total - int(counts.sum())  # rounding leftovers, a handful of images
    step = 1 if diff > 0 else -1
    while diff:
        room = np.nonzero(counts < hi if step > 0 else counts > lo)[0]
        take = room[: abs(diff)]
        counts[take] += step
        diff -= step * len(take)
    return counts


def paper_labels(name: str) -> np.ndarray:
    """Label array (class-sorted) of a paper training split, e.g. paper_labels('sop')."""
    num_classes, total, lo, hi, sigma = PAPER_SPLITS[name]
    counts = class_sizes(num_classes, total, lo, hi, sigma)
    return np.repeat(np.arange(num_classes), counts)
