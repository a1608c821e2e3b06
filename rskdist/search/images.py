"""Where images to embed come from: a folder (recursively), a list file, or a split of shards
(a local shard folder, or one on an object store, read as training reads it).

Each source has a fixed order (every rank lists the same), `len`, and per row the
`image_path` that names it in the output, its encoded bytes, and a label where one exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# What a folder source picks up (case-insensitive); anything else in the folder is ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class FileImages:
    """Image files under a base folder, in a fixed order; `image_path` is the path relative
    to the base, as given."""

    labels = None

    def __init__(self, base: Path, paths: list[str], description: dict):
        self.base, self.paths, self.description = base, paths, description

    def describe(self) -> dict:
        return self.description

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> bytes:
        return (self.base / self.paths[i]).read_bytes()


def folder_images(root: str | os.PathLike) -> FileImages:
    """Every image file under `root` (recursively, by suffix), sorted by path relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--images {root}: not a folder")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return FileImages(root, sorted(found), {"images": str(root.resolve())})


def listed_images(list_file: str | os.PathLike) -> FileImages:
    """The image files a list names, one path a line (blank lines and #-comments skipped);
    relative paths are taken from the list file's folder and kept as written as `image_path`."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ValueError(f"--list {list_file}: no such file")
    lines = (line.strip() for line in list_file.read_text().splitlines())
    paths = [line for line in lines if line and not line.startswith("#")]
    return FileImages(list_file.parent, paths, {"list": str(list_file.resolve())})


class ShardImages:
    """The images of one split of an rskdist shard folder (rskdist/data/shards.py), in the
    split's order; `image_path` is "<split>/<key>", the sample's WebDataset key in the split's
    tars (its .json member holds the original image id), and `labels` the split's labels.

    `root` may be a store URL (s3://, gs://, https://): its shards are then read as a
    training run reads them, per `reading` (rskdist/data/remote.py: staged into a
    node-local cache by default, or ranged requests)."""

    def __init__(self, root: str | os.PathLike, split: str, *, reading=None):
        from rskdist.data.remote import StoreReading, open_reader
        from rskdist.data.shards import load_split

        reading = reading or StoreReading()
        self.table = load_split(str(root), split, retries=reading.retries)
        self.reader = open_reader(self.table, reading)  # opens files lazily, per process
        self.labels = np.asarray(self.table.labels, dtype=np.int64)

    def describe(self) -> dict:
        from rskdist.store import is_url

        root = self.table.root if is_url(self.table.root) else str(Path(self.table.root).resolve())
        return {"shards": root, "split": self.table.split}

    def __len__(self) -> int:
        return len(self.table)

    def image_path(self, i: int) -> str:
        from rskdist.data.shards import sample_key

        return f"{self.table.split}/{sample_key(i)}"

    def read(self, i: int) -> bytes:
        row = self.table.samples[i]
        return self.reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
