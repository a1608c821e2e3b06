"""Where images to embed come from: a folder (recursively), a list file, or a split of shards.

Each source has a fixed order (every rank lists the same), `len`, and per row the
`image_path` that names it in the output, its encoded bytes, and a label where one exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# What a folder source picks up (case-insensitive); anything else in the folder is ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class FolderImages:
    """Every image file under `root` (recursively, by suffix), sorted by path relative to it."""

    labels = None

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--images {root}: not a folder")
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            rel = Path(folder).relative_to(self.root)
            found += [(rel / f).as_posix() for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        self.paths = sorted(found)

    def describe(self) -> dict:
        return {"images": str(self.root.resolve())}

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> bytes:
        return (self.root / self.paths[i]).read_bytes()


class ListedImages:
    """The image files a list names, one path a line (blank lines and #-comments skipped);
    relative paths are taken from the list file's folder and kept as written as `image_path`."""

    labels = None

    def __init__(self, list_file: str | os.PathLike):
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise ValueError(f"--list {list_file}: no such file")
        lines = (line.strip() for line in self.list_file.read_text().splitlines())
        self.paths = [line for line in lines if line and not line.startswith("#")]
        self.base = self.list_file.parent

    def describe(self) -> dict:
        return {"list": str(self.list_file.resolve())}

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> bytes:
        return (self.base / self.paths[i]).read_bytes()


class ShardImages:
    """The images of one split of an rskdist shard folder (rskdist/data/shards.py), in the
    split's order; `image_path` is "<split>/<key>", the sample's WebDataset key in the split's
    tars (its .json member holds the original image id), and `labels` the split's labels."""

    def __init__(self, root: str | os.PathLike, split: str):
        from rskdist.data.shards import ShardReader, load_split

        self.table = load_split(str(root), split)
        self.reader = ShardReader(self.table.shard_paths)  # opens files lazily, per process
        self.labels = np.asarray(self.table.labels, dtype=np.int64)

    def describe(self) -> dict:
        return {"shards": str(Path(self.table.root).resolve()), "split": self.table.split}

    def __len__(self) -> int:
        return len(self.table)

    def image_path(self, i: int) -> str:
        from rskdist.data.shards import sample_key

        return f"{self.table.split}/{sample_key(i)}"

    def read(self, i: int) -> bytes:
        row = self.table.samples[i]
        return self.reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
