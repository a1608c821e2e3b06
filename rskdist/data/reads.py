"""Reading one request of images: bytes from the shards (local or on a store), decoding,
augmentation, and what happens to an image that cannot be read (the loaders' workers run this)."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from rskdist.store.fs import is_url

from .remote import StoreReading, open_reader
from .shards import SplitTable
from .transforms import decode_eval, decode_train


# What damaged bytes raise (a shard changed after indexing, a truncated copy, an NFS
# hiccup, bit rot): OSError for I/O, short reads, PIL's UnidentifiedImageError and
# truncated data; PIL's decoders also raise ValueError, SyntaxError, EOFError, IndexError,
# struct.error or zlib.error on corrupt streams. Anything else is a bug and propagates.
READ_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error, Image.DecompressionBombError,
)
MAX_SUBSTITUTES = 4  # other images of the class tried before a black image takes the place
_SUBSTITUTE_STREAM = 0x5B  # seeds the substitute draw apart from the augmentation of the position


def read_error_reason(error: Exception) -> str:
    """One line saying why an image could not be read (one of READ_ERRORS)."""
    # PIL's message names a BytesIO object: say what it means instead.
    reason = "not a recognised image format" if isinstance(error, UnidentifiedImageError) else str(error)
    return f"{type(error).__name__}: {reason}".replace("\n", " ")


class BadSampleWarning(UserWarning):
    """An image could not be read or decoded (issued once per sample and loader)."""


class _ChunkDataset(Dataset):
    """dataset[request] -> (uint8 images [n, 3, size, size], bad events) for one read request.

    request = (indices int64 [n] (-1 = padding), aug_key or None for eval, position of
    indices[0] in the batch, the step's whole batch of indices or None). Image i is
    augmented with rng([*aug_key, position + i]): independent of read_size and num_workers
    (training positions count in the global batch: independent of the world size too).

    A read or decode that fails is tried once more (reopening the shard). If it fails
    again, a training image is replaced by another image of its class not in the step,
    drawn from rng([*aug_key, position + i, _SUBSTITUTE_STREAM]) and augmented with the
    position's own key, so every run (and a resumed one) makes the same replacement; an
    evaluation image stays black and is reported, for the loader to mark it as padding.
    Each such image gives one event dict: index (row of the split's sample table), shard
    (path relative to the shard root), offset, position (in the batch), reason, substitute (-1: none).
    """

    def __init__(self, table: SplitTable, image_size: int, augment: dict, substitutes: bool,
                 store: StoreReading | None = None):
        self.table = table
        self.samples = table.samples
        self.reader = open_reader(table, store)
        # Shard paths relative to the root, as messages name them (URLs are not filesystem paths).
        self.shard_names = [p[len(table.root):].lstrip("/") if is_url(table.root) else os.path.relpath(p, table.root)
                            for p in table.shard_paths]
        self._fetched: dict[int, bytes] = {}  # a ranged reader's bytes of the current request
        self.image_size, self.augment = image_size, augment  # decode_train's scale, ratio, hflip
        if substitutes:  # class c's images: by_class[class_start[c]:class_start[c + 1]], ascending
            labels = table.labels
            self.by_class = np.argsort(labels, kind="stable")
            self.class_start = np.searchsorted(labels[self.by_class], np.arange(int(labels.max(initial=-1)) + 2))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, request) -> tuple[torch.Tensor, list[dict]]:
        indices, aug_key, position, batch = request
        size = self.image_size
        out = np.zeros((len(indices), 3, size, size), np.uint8)
        bad = []
        self._fetch_all(indices)
        for i, idx in enumerate(indices):
            if idx < 0:
                continue  # padding stays black
            idx, pos = int(idx), position + i
            image, reason = self._decode_with_retry(idx, aug_key, pos)
            if image is not None:
                out[i] = image
                continue
            row = self.samples[idx]
            event = {"index": self.table.split_row(idx), "shard": self.shard_names[int(row["shard"])],
                     "offset": int(row["offset"]), "position": pos, "reason": reason, "substitute": -1}
            if aug_key is not None:
                image, sub = self._substitute(idx, aug_key, pos, batch)
                if image is not None:
                    out[i] = image  # else black, with the class's label
                    event["substitute"] = self.table.split_row(sub)
            bad.append(event)
        self._fetched = {}
        return torch.from_numpy(out), bad

    def _fetch_all(self, indices) -> None:
        """A reader that can (a store's ranged reads) fetches the request's images together;
        a failure here leaves each image to its own read and retry below."""
        read_many = getattr(self.reader, "read_many", None)
        wanted = sorted({int(i) for i in indices if i >= 0})
        if read_many is None or not wanted:
            return
        rows = self.samples[wanted]
        try:
            blobs = read_many([(int(r["shard"]), int(r["offset"]), int(r["size"])) for r in rows])
        except READ_ERRORS:
            return
        self._fetched = dict(zip(wanted, blobs))

    def _decode(self, idx: int, aug_key: tuple | None, pos: int) -> np.ndarray:
        row = self.samples[idx]
        data = self._fetched.pop(idx, None)
        if data is None:
            data = self.reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
        if aug_key is None:
            return decode_eval(data, self.image_size)
        return decode_train(data, self.image_size, np.random.default_rng([*aug_key, pos]), **self.augment)

    def _decode_with_retry(self, idx: int, aug_key: tuple | None, pos: int) -> tuple[np.ndarray | None, str]:
        """(image, "") or, when two reads + decodes both fail, (None, the last reason)."""
        for _ in range(2):
            try:
                return self._decode(idx, aug_key, pos), ""
            except READ_ERRORS as e:
                reason = read_error_reason(e)
                self.reader.forget(int(self.samples[idx]["shard"]))
        return None, reason

    def _substitute(self, idx: int, aug_key: tuple, pos: int, batch: np.ndarray) -> tuple[np.ndarray | None, int]:
        """A readable image of idx's class, decoded with the position's augmentation, and its index.

        Candidates are the class's images outside the step's batch (so the batch keeps
        distinct images), else its other images; up to MAX_SUBSTITUTES of them are tried.
        """
        label = int(self.samples[idx]["label"])
        same = self.by_class[self.class_start[label] : self.class_start[label + 1]]
        others = same[~np.isin(same, batch)]
        if len(others) == 0:
            others = same[same != idx]
        if len(others) == 0:
            return None, -1
        rng = np.random.default_rng([*aug_key, pos, _SUBSTITUTE_STREAM])
        for sub in rng.choice(others, size=min(MAX_SUBSTITUTES, len(others)), replace=False):
            image, _ = self._decode_with_retry(int(sub), aug_key, pos)
            if image is not None:
                return image, int(sub)
        return None, -1
