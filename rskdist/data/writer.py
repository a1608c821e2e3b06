"""Listing -> WebDataset shards + index.json (the engine behind tools/make_shards.py).

Images are read (or generated) and checked in a process pool; the main process writes
the tars in listing order, so the output is byte-identical for the same input whatever
the number of workers. Unreadable or corrupt images are skipped, counted and listed in
DST/skipped.txt.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image

from rskdist.store.cache import file_sha256

from . import shards as S
from .sources import Item, Listing


class Progress:
    """A plain progress bar on stderr with images/s and the time left: one updating line on a
    terminal, otherwise a line each `log_percent` percent (logs of batch jobs)."""

    def __init__(self, total: int, label: str, stream=sys.stderr, enabled: bool = True, log_percent: int = 50):
        self.total, self.label, self.stream, self.enabled = total, label, stream, enabled
        self.log_percent = max(1, log_percent)
        self.done, self.t0, self._last, self._last_step = 0, time.time(), 0.0, None
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.time()
        if self.tty and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()
        elif not self.tty:
            step = (100 * self.done // max(self.total, 1) // self.log_percent, self.done >= self.total)
            if step != self._last_step:
                self._last_step = step
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")

    def _line(self, now: float) -> str:
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        rate = self.done / max(now - self.t0, 1e-6)
        left = int((self.total - self.done) / rate) if rate > 0 else 0
        return (f"{self.label:>6} [{bar}] {self.done}/{self.total} {rate:.0f} img/s "
                f"eta {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}")


def encode_item(item: Item, max_size: int | None = None) -> tuple:
    """Read (or generate, or take from `item.data`) one image and check that it decodes.

    Returns ("ok", ext, data, width, height) or ("skip", reason). JPEG and PNG bytes are
    kept as stored; other formats are re-encoded as PNG; images larger than `max_size`
    on their long side are downscaled (JPEG quality 95 / PNG).
    """
    if item.synth is not None:
        from .demo_images import render_jpeg

        seed, class_id, instance, size = item.synth
        return ("ok", "jpg", render_jpeg(seed, class_id, instance, size), size, size)
    if item.data is not None:
        data = item.data
    else:
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except OSError as e:
            return ("skip", f"unreadable: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated and corrupt files, not just bad headers
            fmt, (w, h) = im.format, im.size
            if max_size and max(w, h) > max_size:
                scale = max_size / max(w, h)
                small = im.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
                buf = io.BytesIO()
                if fmt == "JPEG":
                    small.save(buf, format="JPEG", quality=95)
                    return ("ok", "jpg", buf.getvalue(), small.width, small.height)
                small.save(buf, format="PNG")
                return ("ok", "png", buf.getvalue(), small.width, small.height)
            if fmt == "JPEG":
                return ("ok", "jpg", data, w, h)
            if fmt == "PNG":
                return ("ok", "png", data, w, h)
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
            return ("ok", "png", buf.getvalue(), w, h)
    except Exception as e:  # PIL raises many types for bad files; any of them means "skip"
        return ("skip", f"corrupt: {type(e).__name__}: {e}")


def _encode_star(args):
    return encode_item(*args)


def write_shards(
    listing: Listing,
    out: str,
    *,
    samples_per_shard: int = 1000,
    num_workers: int | None = None,
    max_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    options: dict | None = None,
) -> dict:
    """Write `listing` as DST/<split>/shard-*.tar + samples.npy, DST/index.json, DST/skipped.txt.

    Returns the index (also written to DST/index.json, last, so a half-written folder is
    never mistaken for a complete one).
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    index_path = os.path.join(out, S.INDEX_FILE)
    if os.path.exists(index_path) or any(os.path.isdir(os.path.join(out, s)) for s in listing.items):
        if not overwrite:
            raise FileExistsError(f"{out} already holds shards; pass --overwrite to replace them")
        _remove_old(out, listing)
    os.makedirs(out, exist_ok=True)
    num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)

    index = {
        "format": S.FORMAT_NAME,
        "version": S.FORMAT_VERSION,
        "source": listing.source,
        "options": {**(options or {}), **listing.options},
        "samples_per_shard": samples_per_shard,
        "splits": {},
    }
    skipped: list[tuple[str, str, str]] = []
    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 1 else None
    try:
        for split, items in listing.items.items():
            info, split_skipped = _write_split(listing, split, items, out, samples_per_shard, max_size, pool, progress)
            index["splits"][split] = info
            skipped += split_skipped
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    with open(os.path.join(out, S.SKIPPED_FILE), "w") as f:
        for split, path, reason in skipped:
            f.write(f"{split}\t{path}\t{reason}\n")
    index["skipped"] = {"count": len(skipped), "report": S.SKIPPED_FILE}
    tmp = index_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    os.replace(tmp, index_path)
    return index


def _remove_old(out: str, listing: Listing) -> None:
    for split in listing.items:
        d = os.path.join(out, split)
        if os.path.isdir(d):
            for fn in os.listdir(d):
                if (fn.startswith("shard-") and fn.endswith(".tar")) or fn == S.SAMPLES_FILE:
                    os.remove(os.path.join(d, fn))
    for fn in (S.INDEX_FILE, S.SKIPPED_FILE):
        if os.path.exists(os.path.join(out, fn)):
            os.remove(os.path.join(out, fn))


def _write_split(listing, split, items, out, samples_per_shard, max_size, pool, progress):
    split_dir = os.path.join(out, split)
    os.makedirs(split_dir, exist_ok=True)
    classes = listing.classes[split]
    rows: list[tuple] = []
    shards: list[dict] = []
    skipped: list[tuple[str, str, str]] = []
    formats: Counter = Counter()
    class_counts = np.zeros(len(classes), np.int64)
    writer, shard_labels = None, set()
    bar = Progress(len(items), split, enabled=progress)

    def close_shard():
        nbytes = writer.close()
        # The checksum lets a copy fetched from a store be verified (rskdist/store/cache.py).
        shards[-1].update(num_bytes=nbytes, num_classes=len(shard_labels), sha256=file_sha256(writer.path))

    args = [(it, max_size) for it in items]
    results = pool.imap(_encode_star, args, chunksize=16) if pool is not None else map(_encode_star, args)
    for item, res in zip(items, results):
        bar.update()
        if res[0] == "skip":
            skipped.append((split, item.path or item.image_id, res[1]))
            continue
        _, ext, data, w, h = res
        n = len(rows)
        if n % samples_per_shard == 0:
            if writer is not None:
                close_shard()
            shards.append({"file": S.shard_name(len(shards)), "num_samples": 0})
            writer, shard_labels = S.DeterministicTarWriter(os.path.join(split_dir, shards[-1]["file"])), set()
        key = S.sample_key(n)
        offset, size = writer.add(f"{key}.{ext}", data)
        writer.add(f"{key}.cls", str(item.label).encode())
        meta = {"label": item.label, "class_name": item.class_name, "image_id": item.image_id}
        writer.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        shards[-1]["num_samples"] += 1
        shard_labels.add(item.label)
        rows.append((len(shards) - 1, offset, size, item.label, w, h))
        class_counts[item.label] += 1
        formats[ext] += 1
    if writer is not None:
        close_shard()
    bar.close()

    table = np.array(rows, dtype=S.SAMPLE_DTYPE) if rows else np.zeros(0, S.SAMPLE_DTYPE)
    np.save(os.path.join(split_dir, S.SAMPLES_FILE), table)
    sizes = {}
    if len(table):
        for name in ("width", "height"):
            col = table[name]
            sizes[name] = {"min": int(col.min()), "median": int(np.median(col)), "max": int(col.max())}
    info = {
        "num_samples": len(rows),
        "num_classes": len(classes),
        "num_classes_nonempty": int((class_counts > 0).sum()),
        "classes": classes,
        "class_counts": class_counts.tolist(),
        "shards": shards,
        "samples_file": S.SAMPLES_FILE,
        "formats": dict(sorted(formats.items())),
        "image_size": sizes,
        "num_skipped": len(skipped),
    }
    return info, skipped
