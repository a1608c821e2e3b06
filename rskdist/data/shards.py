"""On-disk shard format: WebDataset tar files, a JSON index and a per-split sample table.

Layout written by `tools/make_shards.py`::

    DST/index.json                 classes, counts per shard, splits, image sizes, options
    DST/skipped.txt                unreadable/corrupt inputs (one per line, with the reason)
    DST/<split>/shard-000000.tar   WebDataset shards (key = 8-digit sample index in the split)
    DST/<split>/samples.npy        one row per sample: shard, byte offset/size of the image, label, w, h

Each tar sample `<key>` holds `<key>.jpg` (or `.png`: the image bytes as stored),
`<key>.cls` (the integer label, ASCII) and `<key>.json` (label, class name, image id).
Labels are contiguous per split: label i is `index["splits"][split]["classes"][i]`.

The sample table lets the loaders read one image with one seek + read (random access
into the tars, no full scan, nothing but labels and offsets in RAM). Shards written by
other tools can be used too: `scan_shards` rebuilds the table from tar headers.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from rskdist.store.fs import DEFAULT_RETRIES, Store, StoreError, is_url, join, local_path

INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"
SKIPPED_FILE = "skipped.txt"
FORMAT_NAME = "rskdist-shards"
FORMAT_VERSION = 1
IMAGE_EXTS = ("jpg", "png")

# One row per sample. int64 offsets: shards may exceed 2 GiB.
SAMPLE_DTYPE = np.dtype(
    [
        ("shard", "<i4"),  # position of the shard in index["splits"][split]["shards"]
        ("offset", "<i8"),  # byte offset of the image data inside the tar
        ("size", "<i8"),  # image size in bytes
        ("label", "<i4"),  # contiguous class label within the split
        ("width", "<i4"),  # original image width (0 if unknown)
        ("height", "<i4"),  # original image height (0 if unknown)
    ]
)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def sample_key(i: int) -> str:
    """WebDataset key of the i-th sample of a split (also its stable global index)."""
    return f"{i:08d}"


class DeterministicTarWriter:
    """Writes a tar whose bytes depend only on the content: fixed mtime, uid, gid, mode.

    Records where each member's data starts so readers can seek straight to it.
    """

    def __init__(self, path: str):
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append one member; returns (data offset, data size) in bytes."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        header_len = self._tar.offset - start - padded
        return start + header_len, len(data)

    def close(self) -> int:
        """Finish the archive; returns its size in bytes."""
        self._tar.close()
        return os.path.getsize(self.path)


# ---------------------------------------------------------------------------- reading


def load_index(root: str, *, retries: int = DEFAULT_RETRIES) -> dict:
    """Read DST/index.json (DST a folder or a store URL), with a clear error when `root` is
    not a shard folder or the store refuses it (a StoreError, naming the URL)."""
    if is_url(root):
        path = join(root, INDEX_FILE)
        index = json.loads(Store(root, retries=retries).cat(path))
    else:
        root = local_path(root)
        path = os.path.join(root, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: `root` must be a folder written by tools/make_shards.py "
                f"(e.g. `python tools/make_shards.py demo --out {root}`)"
            )
        with open(path) as f:
            index = json.load(f)
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an rskdist shard index (format={index.get('format')!r})")
    return index


@dataclass
class SplitTable:
    """Everything a loader needs about one split: shard paths and the sample table."""

    root: str
    split: str
    shard_paths: list[str]  # local paths, or URLs when `root` is a store URL
    samples: np.ndarray  # SAMPLE_DTYPE, row i = global sample index i
    classes: list[str]
    rows: np.ndarray | None = None  # a subset's rows in the split's sample table (None: the whole split)
    shards: list[dict] | None = None  # index.json's entries of the shards (file, num_bytes, sha256)

    @property
    def labels(self) -> np.ndarray:
        return self.samples["label"]

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, labels) -> SplitTable:
        """The samples of these labels only, in the split's order (labels keep their values,
        `classes` stays the split's list; `rows` maps the subset's rows back to the split's)."""
        keep = np.flatnonzero(np.isin(self.labels, np.asarray(labels, dtype=np.int64)))
        rows = keep if self.rows is None else self.rows[keep]
        return SplitTable(self.root, self.split, self.shard_paths, self.samples[keep], self.classes, rows, self.shards)

    def split_row(self, i: int) -> int:
        """Row of this table's sample i in the split's whole sample table (what messages name)."""
        return i if self.rows is None else int(self.rows[i])


def load_split(root: str, split: str, *, retries: int = DEFAULT_RETRIES) -> SplitTable:
    """Load the shard list and sample table of `split` (memory: ~32 bytes per sample); `root`
    may be a store URL (then `retries` bounds each request)."""
    index = load_index(root, retries=retries)
    if split not in index["splits"]:
        raise ValueError(f"split {split!r} not in {root}; available: {sorted(index['splits'])}")
    info = index["splits"][split]
    root = root if is_url(root) else local_path(root)
    shard_paths = [join(root, split, s["file"]) for s in info["shards"]]
    table_path = join(root, split, SAMPLES_FILE)
    if is_url(root):  # the writer always writes the table; scanning tars over the network is no option
        samples = np.load(io.BytesIO(Store(root, retries=retries).cat(table_path)))
    elif os.path.isfile(table_path):
        samples = np.load(table_path)
    else:  # shards from elsewhere: rebuild offsets from the tar headers
        samples = scan_shards(shard_paths)
    if len(samples) != info["num_samples"]:
        raise ValueError(
            f"{table_path}: {len(samples)} samples but index.json says {info['num_samples']}; "
            "rewrite the shards with tools/make_shards.py"
        )
    return SplitTable(root, split, shard_paths, samples, list(info["classes"]), shards=list(info["shards"]))


def upload_shards(folder: str, url: str, *, retries: int = DEFAULT_RETRIES) -> None:
    """Copy a shard folder written by tools/make_shards.py to a store URL; index.json goes
    last, so a reader never takes a half-uploaded folder for a complete one."""
    store = Store(url, retries=retries)
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{index} not found: upload a folder written by tools/make_shards.py")
    for name in sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs):
        if name != INDEX_FILE:
            store.put(os.path.join(folder, name), join(url, *name.split(os.sep)))
    store.put(index, join(url, INDEX_FILE))


def check_store_shards(root: str, splits, *, retries: int = DEFAULT_RETRIES, ranged: bool = False,
                       index: dict | None = None) -> None:
    """Before training: every shard of `splits` is on the store at `root` with the size its
    index gives (one listing per split; a HEAD per shard where the listing gives no sizes,
    as an HTTP server's folder page); else a StoreError naming the first missing object.
    `ranged` (data.read_mode=ranged): the store must also answer ranged reads. `index`:
    the folder's index.json when the caller has read it already."""
    store = Store(root, retries=retries)
    index = index or load_index(root, retries=retries)
    probe = None  # the first shard and its size: a ranged read of it is tried last
    for split in splits:
        listing = store.listing(join(root, split))
        if SAMPLES_FILE not in listing:
            raise StoreError(f"{join(root, split, SAMPLES_FILE)}: not found; upload the whole shard folder "
                             f"written by tools/make_shards.py (index.json, every split's shards and samples.npy)")
        for shard in index["splits"][split]["shards"]:
            url, expected = join(root, split, shard["file"]), shard.get("num_bytes")
            if shard["file"] not in listing:
                size = None
            else:
                size = listing[shard["file"]]
                size = store.size(url) if size is None else size
            if size is None or (expected is not None and size != expected):
                what = "not found" if size is None else f"{size} bytes, the index says {expected}"
                raise StoreError(f"{url}: {what}; upload the whole shard folder again (e.g. `aws s3 sync DST {root}`)")
            probe = probe or (url, size)
    if ranged and probe is not None:
        store.check_ranges(*probe)


def scan_shards(shard_paths: list[str]) -> np.ndarray:
    """Rebuild a sample table by reading tar headers (labels from `.cls` members).

    Samples are numbered in shard order, members of a sample must be adjacent (the
    WebDataset convention).
    """
    rows = []
    for shard_id, path in enumerate(shard_paths):
        current: dict = {}
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                if current and current["key"] != key:
                    rows.append(_row(shard_id, current, path))
                    current = {}
                current["key"] = key
                if ext in IMAGE_EXTS:
                    current["offset"], current["size"] = member.offset_data, member.size
                elif ext == "cls":
                    current["label"] = int(tar.extractfile(member).read())
            if current:
                rows.append(_row(shard_id, current, path))
    out = np.zeros(len(rows), SAMPLE_DTYPE)
    for i, r in enumerate(rows):
        out[i] = r
    return out


def _row(shard_id: int, sample: dict, path: str) -> tuple:
    if "offset" not in sample or "label" not in sample:
        raise ValueError(f"{path}: sample {sample['key']!r} lacks an image (jpg/png) or a .cls label")
    return (shard_id, sample["offset"], sample["size"], sample["label"], 0, 0)


class ShardReader:
    """Random access to image bytes inside tar shards, with a small cache of open files.

    One reader per process (DataLoader workers each build their own after fork: file
    handles are opened lazily, never shared).
    """

    def __init__(self, shard_paths: list[str], max_open: int = 32):
        self.shard_paths = shard_paths
        self.max_open = max_open
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._file(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shard_paths[shard]}: short read at {offset} ({len(data)}/{size} bytes)")
        return data

    def _file(self, shard: int) -> BinaryIO:
        if self._pid != os.getpid():  # forked: never reuse the parent's descriptors
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.max_open:
                _, old = self._files.popitem(last=False)
                old.close()
            f = open(self.local_file(shard), "rb", buffering=0)
            self._files[shard] = f
        else:
            self._files.move_to_end(shard)
        return f

    def local_file(self, shard: int) -> str:
        """The file to open for `shard` (a staging reader fetches it first)."""
        return self.shard_paths[shard]

    def forget(self, shard: int) -> None:
        """Close the cached handle of `shard`: the next read reopens the file (after an
        NFS hiccup a stale handle keeps failing where a fresh open may succeed)."""
        if self._pid == os.getpid():
            f = self._files.pop(shard, None)
            if f is not None:
                f.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self):  # picklable for spawn-started workers: drop open files
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state
