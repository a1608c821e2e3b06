"""The embedded fine-grained synthetic dataset (`make_shards.py demo`).

A class is a composition of three factors: shape (8) x texture (6) x colour pair (16)
= 768 possible classes; `num_classes` of them are drawn by a seeded permutation, so the
test classes (second half) are new combinations of factor values seen in training and
an embedding that learned the factors transfers. Each image varies the instance:
position, scale, rotation, colour jitter, background colour/gradient, clutter strokes,
pixel noise and JPEG quality. Images are generated deterministically from
(seed, class, instance), so generation is parallel and the output reproducible.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
TEXTURES = ("solid", "stripes", "pinstripes", "checker", "dots", "rings")
HUES = (0.0, 0.08, 0.15, 0.3, 0.45, 0.58, 0.7, 0.85)
TONES = ("dark", "light")  # second colour of the texture: darker shade or near-white
NUM_COMBINATIONS = len(SHAPES) * len(TEXTURES) * len(HUES) * len(TONES)


def _combinations(num_classes: int, seed: int) -> list[tuple[int, int, int, int]]:
    if num_classes > NUM_COMBINATIONS:
        raise ValueError(f"the demo generator has {NUM_COMBINATIONS} distinct classes, asked for {num_classes}")
    return _all_combinations(seed)[:num_classes]


@functools.lru_cache(maxsize=8)
def _all_combinations(seed: int) -> list[tuple[int, int, int, int]]:
    grid = [
        (s, t, h, o)
        for s in range(len(SHAPES))
        for t in range(len(TEXTURES))
        for h in range(len(HUES))
        for o in range(len(TONES))
    ]
    order = np.random.default_rng([seed, 7919]).permutation(len(grid))
    return [grid[i] for i in order]


def class_names(num_classes: int, seed: int = 0) -> list[str]:
    """Readable class names, e.g. 'star-checker-hue3-light'."""
    return [
        f"{SHAPES[s]}-{TEXTURES[t]}-hue{h}-{TONES[o]}" for s, t, h, o in _combinations(num_classes, seed)
    ]


def _polygon(shape: str) -> np.ndarray:
    """Unit-radius outline of a shape, (n, 2) in the object frame."""
    if shape == "circle":
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    regular = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    if shape in regular:
        n = regular[shape]
        a = np.arange(n) * 2 * math.pi / n - math.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "diamond":
        return np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], float)
    if shape == "star":
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.33
        return np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
            float,
        )
    raise ValueError(shape)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32) * 255.0


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return yy, xx


def render(seed: int, class_id: int, instance: int, size: int = 64, num_classes: int | None = None) -> np.ndarray:
    """One image (size x size x 3, uint8) of `class_id`. Deterministic in its arguments."""
    shape_i, tex_i, hue_i, tone_i = _combinations(max(num_classes or 0, class_id + 1), seed)[class_id]
    rng = np.random.default_rng([seed, class_id, instance, 104729])
    ss = 2 * size  # render at 2x and downsample: cheap anti-aliasing

    # Background: low-saturation colour with a linear gradient, then clutter strokes.
    yy, xx = _grid(ss)
    bg0 = _rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.9))
    bg1 = _rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.9))
    g = np.float32(math.cos(a := rng.uniform(0, 2 * math.pi))) * xx + np.float32(math.sin(a)) * yy
    g = ((g - g.min()) / max(float(g.max() - g.min()), 1e-6))[..., None]
    img = bg0 + (bg1 - bg0) * g
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 8)):
        col = tuple(int(c) for c in _rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 1.0)))
        p = rng.uniform(0, ss, 4)
        if rng.random() < 0.5:
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=col, width=int(rng.integers(1, max(2, ss // 24))))
        else:
            r = rng.uniform(ss * 0.03, ss * 0.12)
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], outline=col, width=max(1, ss // 48))
    img = np.asarray(canvas, dtype=np.float32)

    # Object: pose and colour jitter per instance.
    radius = rng.uniform(0.24, 0.40) * ss
    cx, cy = rng.uniform(radius * 0.9, ss - radius * 0.9, 2)
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    outline = _polygon(SHAPES[shape_i]) @ np.array([[c, s], [-s, c]]) * radius + [cx, cy]
    mask_img = Image.new("L", (ss, ss), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in outline], fill=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0

    hue = HUES[hue_i] + rng.uniform(-0.025, 0.025)
    val = rng.uniform(0.75, 1.0)
    col_a = _rgb(hue, rng.uniform(0.75, 1.0), val)
    col_b = _rgb(hue, 0.9, val * 0.35) if TONES[tone_i] == "dark" else _rgb(hue, 0.12, 0.97)

    # Texture in the object frame (it rotates and scales with the object).
    dx, dy = (xx * np.float32(ss) - np.float32(cx)) / np.float32(radius), (yy * np.float32(ss) - np.float32(cy)) / np.float32(radius)
    u, v = np.float32(c) * dx + np.float32(s) * dy, np.float32(-s) * dx + np.float32(c) * dy
    f = np.float32(rng.uniform(2.2, 2.8))  # cycles per radius
    ph = np.float32(rng.uniform(0, 1))
    tex = TEXTURES[tex_i]
    if tex == "solid":
        t = np.zeros_like(u)
    elif tex == "stripes":
        t = (np.sin(2 * math.pi * (f * u + ph)) > 0).astype(np.float32)
    elif tex == "pinstripes":  # thin lines at twice the frequency: not a rotation of "stripes"
        t = (np.sin(2 * math.pi * (2 * f * u + ph)) > 0.6).astype(np.float32)
    elif tex == "checker":
        t = ((np.floor(f * u + ph) + np.floor(f * v + ph)) % 2).astype(np.float32)
    elif tex == "dots":
        fu, fv = (f * u + ph) % 1 - 0.5, (f * v + ph) % 1 - 0.5
        t = (fu * fu + fv * fv < 0.09).astype(np.float32)
    else:  # rings
        t = (np.sin(2 * math.pi * (f * np.sqrt(u * u + v * v) + ph)) > 0).astype(np.float32)
    obj = col_a + (col_b - col_a) * t[..., None]
    img += (obj - img) * mask

    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    arr = np.asarray(out, dtype=np.float32) + noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_jpeg(seed: int, class_id: int, instance: int, size: int = 64, num_classes: int | None = None) -> bytes:
    """`render` encoded as a JPEG (quality varies per instance)."""
    arr = render(seed, class_id, instance, size, num_classes)
    quality = int(np.random.default_rng([seed, class_id, instance, 15485863]).integers(80, 96))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
