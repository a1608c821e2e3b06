"""A node-local cache of whole files from a store (shards staged for reading by offset).

The ranks of a node and their DataLoader workers share one cache folder: a file is fetched
by whoever needs it first, under an exclusive lock on `<file>.lock`, into a temporary name,
verified (size, and SHA-256 when the index records one), then renamed into place, so a
reader sees a whole verified file or none. The folder is bounded: before a fetch, the least
recently used files are removed until the new one fits (a file still open elsewhere stays
readable until closed, POSIX unlink semantics).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from .fs import Store, StoreError

LOCK_SUFFIX, PART_SUFFIX = ".lock", ".part"


def default_cache_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"rskdist-cache-{os.getuid()}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock held across processes of the node while the block runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class FileCache:
    """Whole files of `store` under `folder`, at most `max_bytes` in all."""

    def __init__(self, store: Store, folder: str | Path, max_bytes: int):
        self.store, self.folder, self.max_bytes = store, Path(folder), int(max_bytes)
        # One sub-folder per store prefix: two datasets never collide, a name says where it came from.
        self.prefix = hashlib.sha256(store.url.encode()).hexdigest()[:12]

    def local(self, url: str) -> Path:
        rel = url[len(self.store.url):].lstrip("/") if url.startswith(self.store.url) else url.split("://", 1)[-1]
        return self.folder / self.prefix / rel

    def fetch(self, url: str, size: int, sha256: str | None = None) -> Path:
        """The local copy of `url` (`size` bytes), fetched and verified when absent."""
        dest = self.local(url)
        if _has_size(dest, size):
            os.utime(dest)  # recently used: evicted last
            return dest
        if size > self.max_bytes:
            raise StoreError(f"{url} is {size / 2**30:.2f} GiB, more than the whole shard cache "
                             f"({self.max_bytes / 2**30:.2f} GiB, data.cache_gb): raise data.cache_gb")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(dest.with_name(dest.name + LOCK_SUFFIX)):
            if _has_size(dest, size):  # another rank fetched it while this one waited
                return dest
            self._make_room(size, keep=dest)
            part = dest.with_name(f"{dest.name}{PART_SUFFIX}{os.getpid()}")
            try:
                self.store.get(url, str(part))
                problem = _mismatch(part, size, sha256)
                if problem:  # one fresh download before giving up: a cut-off transfer
                    self.store.get(url, str(part))
                    problem = _mismatch(part, size, sha256)
                if problem:
                    raise StoreError(f"{url}: {problem}; the shards changed after their index was written: "
                                     f"rewrite them with tools/make_shards.py")
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
        return dest

    def _make_room(self, size: int, keep: Path) -> None:
        files = []
        for path in self.folder.rglob("*"):
            name = path.name
            if path.is_file() and not name.endswith(LOCK_SUFFIX) and PART_SUFFIX not in name and path != keep:
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
        used = sum(f[1] for f in files)
        for _, nbytes, path in sorted(files):
            if used + size <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            used -= nbytes


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _mismatch(path: Path, size: int, sha256: str | None) -> str | None:
    got = path.stat().st_size
    if got != size:
        return f"{got} bytes fetched, the index says {size}"
    if sha256 and file_sha256(path) != sha256:
        return "its SHA-256 differs from the index's"
    return None
