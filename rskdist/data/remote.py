"""Reading shards that live on an object store (`data.root` a URL: s3://, gs://, https://).

Two ways, chosen by `StoreReading.mode`:
- "stage": each shard is fetched whole into a node-local cache the first time an image of
  it is needed (rskdist/store/cache.py: bounded, verified by size and SHA-256, shared by the
  ranks of the node), then read by offset like a local shard;
- "ranged": images are read straight from the store; the images of one read request are
  grouped per shard and neighbouring members merged into one ranged GET of at most
  `request_bytes`, and those GETs run concurrently.
Both return the same bytes as a local read, so batches, augmentation and resume do not
change. A store that stops answering raises StoreUnavailable after the bounded retries: it
is no bad image to replace, and it ends the run (the last checkpoint is intact).
"""

from __future__ import annotations

from dataclasses import dataclass

from rskdist.store.cache import FileCache, default_cache_dir
from rskdist.store.fs import DEFAULT_RETRIES, Store, StoreError, StoreUnavailable, is_url

from .shards import ShardReader, SplitTable

READ_MODES = ("stage", "ranged")


@dataclass(frozen=True)
class StoreReading:
    """How shards on a store are read (ignored for local shard folders)."""

    mode: str = "stage"  # "stage" or "ranged"
    cache_dir: str = ""  # "stage": node-local folder ("" = a folder in the system temp dir)
    cache_bytes: int = 50 * 2**30  # "stage": bound of the cache folder
    request_bytes: int = 1 << 20  # "ranged": largest merged request
    retries: int = DEFAULT_RETRIES  # attempts of each request before StoreUnavailable


def open_reader(table: SplitTable, reading: StoreReading | None = None) -> ShardReader:
    """The reader of `table`'s shards: local files, or a store per `reading`."""
    if not is_url(table.root):
        return ShardReader(table.shard_paths)
    reading = reading or StoreReading()
    if reading.mode not in READ_MODES:
        raise ValueError(f"store reading mode must be one of {READ_MODES}, got {reading.mode!r}")
    store = Store(table.root, retries=reading.retries)
    if reading.mode == "stage":
        cache = FileCache(store, reading.cache_dir or default_cache_dir(), reading.cache_bytes)
        return StagedShardReader(table, cache)
    return RangedShardReader(table, store, reading.request_bytes)


class StagedShardReader(ShardReader):
    """Reads by offset from shards staged whole into a node-local cache."""

    def __init__(self, table: SplitTable, cache: FileCache):
        super().__init__(table.shard_paths)
        self.cache, self.shards = cache, table.shards

    def local_file(self, shard: int) -> str:
        entry = self.shards[shard]
        return str(self.cache.fetch(self.shard_paths[shard], int(entry["num_bytes"]), entry.get("sha256")))

    def _file(self, shard: int):
        try:
            return super()._file(shard)
        except StoreError as err:  # an object gone mid-run is no bad image to replace: stop
            raise StoreUnavailable(str(err)) from err


class RangedShardReader(ShardReader):
    """Reads image bytes from the store by ranged requests; `read_many` merges neighbours."""

    def __init__(self, table: SplitTable, store: Store, request_bytes: int):
        super().__init__(table.shard_paths)
        self.store, self.request_bytes = store, max(1, int(request_bytes))

    def read(self, shard: int, offset: int, size: int) -> bytes:
        return self.read_many([(shard, offset, size)])[0]

    def read_many(self, items: list[tuple[int, int, int]]) -> list[bytes]:
        """Bytes of each (shard, offset, size), in order, from as few concurrent requests as
        `request_bytes` allows."""
        if not items:
            return []
        groups = coalesce(items, self.request_bytes)
        urls = [self.shard_paths[shard] for shard, _, _, _ in groups]
        try:
            blobs = self.store.call("read", urls[0], self.store.fs.cat_ranges, [self.store.path(u) for u in urls],
                                    [start for _, start, _, _ in groups], [end for _, _, end, _ in groups],
                                    on_error="raise")
        except StoreError as err:
            raise StoreUnavailable(str(err)) from err
        out: list[bytes] = [b""] * len(items)
        for url, (_, start, end, members), blob in zip(urls, groups, blobs):
            if len(blob) > end - start:  # the whole object for a range: no image is broken, the server is
                raise StoreUnavailable(f"{url}: the server answered a request for bytes {start}-{end - 1} with "
                                       f"{len(blob)} bytes: it does not serve byte ranges; read these shards with "
                                       f"data.read_mode=stage")
            if len(blob) != end - start:
                raise OSError(f"{url}: short read at {start} ({len(blob)}/{end - start} bytes)")
            for i in members:
                _, offset, size = items[i]
                out[i] = bytes(blob[offset - start : offset - start + size])
        return out

    def _file(self, shard: int):
        raise AssertionError("a ranged reader opens no files")

    def forget(self, shard: int) -> None:
        pass


def coalesce(items: list[tuple[int, int, int]], request_bytes: int) -> list[tuple[int, int, int, list[int]]]:
    """Merge (shard, offset, size) reads into requests (shard, start, end, item positions):
    items of one shard sorted by offset join the current request while it stays within
    `request_bytes` from its start (the bytes between them are read and dropped)."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0], items[i][1]))
    groups: list[tuple[int, int, int, list[int]]] = []
    for i in order:
        shard, offset, size = items[i]
        if groups and groups[-1][0] == shard and offset + size - groups[-1][1] <= request_bytes:
            g_shard, g_start, g_end, members = groups[-1]
            groups[-1] = (g_shard, g_start, max(g_end, offset + size), members + [i])
        else:
            groups.append((shard, offset, offset + size, [i]))
    return groups
