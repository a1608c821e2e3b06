"""Decoding + the paper's transforms on PIL, with explicit random state.

Train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip
       (the paper's; scale, ratio and the flip are settings: data.crop_scale,
       data.crop_ratio, data.hflip).
Test:  Resize(round(size * 256 / 224)) (shorter side) + CenterCrop(size).

Randomness comes from a numpy Generator passed in, so an image's augmentation is a
function of (seed, epoch, step, rank, position): a resumed run reproduces its batches
exactly, whatever the number of DataLoader workers. JPEG decoding uses PIL's draft mode
(DCT scaling by 1/2, 1/4, 1/8) whenever the output still has at least the target
resolution, which makes large photos several times cheaper to decode.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from rskdist.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported for the loaders


def random_resized_crop_params(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """(left, top, crop_w, crop_h) of a crop covering a random area fraction and aspect ratio.

    Ten tries at a random (area, log-aspect) pair; if none fits, a centre crop with the
    aspect ratio clamped to `ratio` (the usual RandomResizedCrop recipe).
    """
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1)), float(w), float(h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, float(w), float(h)


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def decode_train(
    data: bytes, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True
) -> np.ndarray:
    """Random resized crop (+ flip when `hflip`) of an encoded image -> uint8 [3, size, size]."""
    im = _open(data)
    width, height = im.size
    left, top, cw, ch = random_resized_crop_params(width, height, rng, scale, ratio)
    # Drawn even when the flip is off, so turning it off leaves every crop unchanged.
    flip = rng.random() < 0.5 and hflip
    if im.format == "JPEG":
        # Decode at the smallest DCT scale that keeps the crop at >= size pixels.
        im.draft("RGB", (math.ceil(width * size / cw), math.ceil(height * size / ch)))
    sx, sy = im.size[0] / width, im.size[1] / height
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    out = im.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out).transpose(2, 0, 1)


def eval_resize_size(size: int) -> int:
    return int(round(size * 256 / 224))


def decode_eval(data: bytes, size: int) -> np.ndarray:
    """Resize (shorter side to size*256/224) + centre crop of an encoded image -> uint8 [3, size, size]."""
    return eval_transform(_open(data), size)


def eval_transform(im: Image.Image, size: int) -> np.ndarray:
    """The evaluation transform of a PIL image -> uint8 [3, size, size] (`decode_eval`'s).

    A JPEG not decoded yet (as `Image.open` returns it) is decoded in draft mode, as the
    loaders decode it; that decodes the caller's image object at the reduced scale. An
    image already in memory is resized from its full resolution.
    """
    width, height = im.size
    short = eval_resize_size(size)
    if im.format == "JPEG":
        r = short / min(width, height)
        im.draft("RGB", (math.ceil(width * r), math.ceil(height * r)))
    w, h = im.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    im = im.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    out = im.crop((left, top, left + size, top + size))
    return np.asarray(out).transpose(2, 0, 1)


def normalize(images_u8: torch.Tensor, mean, std, device=None) -> torch.Tensor:
    """uint8 [b, 3, H, W] -> float32 (x / 255 - mean) / std, on `device` if given.

    Moving uint8 before converting cuts the host-to-device copy by 4x.
    """
    if device is not None:
        images_u8 = images_u8.to(device, non_blocking=True)
    x = images_u8.float()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0)
    return x.sub_(mean_t).mul_(inv_std)
