"""A run folder on an object store, kept in step with the node-local staging copy the ranks write.

Layout on the store is the run folder's own (RUN/config.yaml, metrics.jsonl, ...,
RUN/checkpoints/<tag>/..., RUN/checkpoints/latest). One uploader per node (local rank 0)
works on a background thread, so a step never waits for the network:
- after each save it uploads the files of the checkpoint its node holds; rank 0's node then
  uploads the manifest (complete.json, every file of the save and its size), waits until the
  store lists every one of those files at that size (the other nodes' uploads included), and
  only then moves `checkpoints/latest` on the store, so the store's `latest` always names a
  whole checkpoint; older checkpoints pruned locally are then deleted on the store;
- rank 0's node also mirrors the run's records (everything outside checkpoints/ that changed).
A checkpoint whose upload fails (after the store's bounded retries) is tried again after the
next save (unless that newer one takes its place) and at the end; it is never named by
`latest` until whole. `finish` waits a bounded
time for what is pending and returns what is still missing.

`restore` is the other direction, for a resume on fresh nodes: each node's uploader reads
`latest` from the store and downloads that checkpoint's files its ranks need (and rank 0's
node the records), unless the node already holds it or a newer one.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

from .fs import Store, StoreError, StoreUnavailable, join

CHECKPOINTS, MANIFEST, POINTERS = "checkpoints", "complete.json", ("latest", "best")
_STOP = object()


def default_stage_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"rskdist-stage-{os.getuid()}")


class RunMirror:
    def __init__(self, local_dir: str | Path, url: str, *, rank: int, local_rank: int, world_size: int = 1,
                 local_world_size: int = 1, retries: int = 5, backoff_s: float = 0.5):
        self.local, self.url = Path(local_dir), url.rstrip("/")
        self.rank, self.local_rank, self.local_world_size = rank, local_rank, local_world_size
        self.world_size = world_size
        self.store = Store(self.url, retries=retries, backoff_s=backoff_s)
        self.uploader, self.lead = local_rank == 0, rank == 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) on the store
        self._unsent: dict[str, str] = {}  # checkpoint tag (or "records") -> why it is not on the store
        self._complete: set[str] = set()  # tags whole on the store
        self._warned = False
        self.await_s = 600.0  # how long rank 0's node waits for the other nodes' files of a save

    # ------------------------------------------------------------------ called by the trainer
    def saved(self, tag: str) -> None:
        """Checkpoint `tag` is written and (on rank 0) marked complete locally: upload it."""
        self._submit(("checkpoint", tag))

    def marked_best(self, tag: str) -> None:
        self._submit(("best", tag))

    @property
    def unsent(self) -> dict[str, str]:
        """What failed to upload so far ({checkpoint tag or "records": why}), to be tried again."""
        return dict(self._unsent)

    def finish(self, wait_s: float) -> list[str]:
        """Wait up to `wait_s` for the pending uploads (a last try of failed ones and of the
        records included); returns what is still not on the store, one line each."""
        if self._thread is None:
            return []
        self._submit(("checkpoint", None))  # retries whatever failed, then the records
        self._queue.put(_STOP)
        self._thread.join(wait_s)
        missing = self._describe_unsent()
        if self._thread.is_alive():
            missing.insert(0, f"uploads still running after {wait_s:.0f} s (run.upload_wait_minutes)")
        return missing

    def _describe_unsent(self) -> list[str]:
        """What is not on the store: the newest checkpoint (older failed ones it supersedes are
        counted), the records, the best pointer; the first with the store's error."""
        unsent = dict(self._unsent)
        tags = sorted(t for t in unsent if t.startswith("step"))
        items = []
        if tags:
            older = f" (and {len(tags) - 1} older save(s) it supersedes)" if len(tags) > 1 else ""
            items.append((f"checkpoint {tags[-1]}{older}", unsent[tags[-1]]))
        names = {"records": "the run's records (metrics.jsonl, config.yaml, ...)", "best": "the best pointer"}
        items += [(names[k], unsent[k]) for k in names if k in unsent]
        return [f"{what}: {why}" if i == 0 else f"{what} neither" for i, (what, why) in enumerate(items)]

    # ------------------------------------------------------------------ upload thread
    def _submit(self, job) -> None:
        if not self.uploader:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="rskdist-upload", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            kind, tag = job
            if kind == "checkpoint":
                # The newest save that is not on the store yet (a failed one is tried again; an older
                # failed one needs no upload once a newer one is there, and none while the store is down).
                newest = max([t for t in self._unsent if t.startswith("step")] + ([tag] if tag else []), default=None)
                if newest is not None:
                    self._attempt(newest, self._upload_checkpoint)
            elif kind == "best" and self.lead and tag in self._complete:
                self._attempt("best", lambda _: self.store.put_text(self._ckpt_url("best"), tag))
            if self.lead:
                self._attempt("records", lambda _: self._upload_records())

    def _attempt(self, what: str, fn) -> None:
        try:
            fn(what)
            self._unsent.pop(what, None)
            if what in self._complete:  # older saves that never made it are superseded by this one
                for older in [t for t in self._unsent if t.startswith("step") and t < what]:
                    self._unsent.pop(older)
        except (StoreError, StoreUnavailable, OSError) as err:
            self._unsent[what] = str(err)
            if not self._warned:  # once: the end of the job lists what is still missing
                self._warned = True
                print(f"warning: rank {self.rank}: upload of {what} to {self.url} failed ({err}); it is tried "
                      f"again after the next save and at the end, and the store's latest does not name it",
                      file=sys.stderr, flush=True)

    def _upload_checkpoint(self, tag: str) -> None:
        folder = self.local / CHECKPOINTS / tag
        if not folder.is_dir():
            return  # pruned before its turn: a newer checkpoint supersedes it
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
                self._put(path)
        if not self.lead:
            return
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise StoreError(f"{folder} has no {MANIFEST}: the save was not marked complete, so it is not uploaded")
        files = json.loads(manifest.read_text())["files"]
        self._put(manifest)
        self._await_files(tag, {name: entry["size"] for name, entry in files.items()}, self.await_s)
        self.store.put_text(self._ckpt_url("latest"), tag)  # last: the store's latest names whole checkpoints
        self._complete.add(tag)
        self._prune(tag)

    def _await_files(self, tag: str, sizes: dict[str, int], timeout_s: float) -> None:
        """Until the store lists every file of the save at its size (other nodes upload theirs)."""
        end = time.monotonic() + timeout_s
        while True:
            listed = self.store.listing(self._ckpt_url(tag))
            missing = [n for n, size in sizes.items() if listed.get(n) != size]
            if not missing:
                return
            if time.monotonic() > end:
                raise StoreError(f"{self._ckpt_url(tag)}: {', '.join(missing[:5])} not uploaded by its node after "
                                 f"{timeout_s:.0f} s")
            time.sleep(1.0)

    def _prune(self, latest: str) -> None:
        """Delete the store's checkpoints that the run pruned locally (older than `latest`,
        not named by a pointer)."""
        local = {p.name for p in (self.local / CHECKPOINTS).iterdir() if p.is_dir()}
        keep = local | {latest} | {self._read_local_pointer(n) for n in POINTERS}
        self.store.fs.invalidate_cache()
        listed = self.store.call("list", self._ckpt_url(""), self.store.fs.ls, self.store.path(self._ckpt_url("")),
                                 detail=False)
        for name in (os.path.basename(p.rstrip("/")) for p in listed):
            if name.startswith("step") and name < latest and name not in keep:
                self.store.remove(self._ckpt_url(name))

    def _upload_records(self) -> None:
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local)
            if path.is_file() and rel.parts[0] != CHECKPOINTS and not path.name.endswith(".tmp"):
                self._put(path)

    def _put(self, path: Path) -> None:
        rel = path.relative_to(self.local).as_posix()
        st = path.stat()
        if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
            return
        self.store.put(str(path), join(self.url, rel))
        self._sent[rel] = (st.st_size, st.st_mtime_ns)

    # ------------------------------------------------------------------ resume on fresh nodes
    def restore(self) -> str | None:
        """On each node's uploader: make the store's latest checkpoint (and, on rank 0's node,
        the run's records) present locally; returns the tag resumed from, or None."""
        if not self.uploader:
            return None
        tag = self._read_store_pointer("latest")
        here = self._read_local_pointer("latest")
        if tag is None or (here is not None and here >= tag and (self.local / CHECKPOINTS / here).is_dir()):
            return here
        if self.lead:
            self._download_records()
        folder = self.local / CHECKPOINTS / tag
        folder.mkdir(parents=True, exist_ok=True)
        manifest = json.loads(self.store.cat(join(self._ckpt_url(tag), MANIFEST)))
        node_ranks = set(range(self.rank - self.local_rank, self.rank - self.local_rank + self.local_world_size))
        whole = manifest["world_size"] != self.world_size  # saved by another world: every rank may need any file
        for name, entry in manifest["files"].items():
            ranks = set(entry["ranks"])
            # A file only other nodes' ranks saw is theirs (each node fetches what it needs).
            if whole or ranks & node_ranks or len(ranks) == manifest["world_size"] or not ranks:
                self._fetch(join(self._ckpt_url(tag), name), folder / name, entry["size"])
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self._write_local_pointer("latest", tag)
        best = self._read_store_pointer("best")
        if best is not None and (self.local / CHECKPOINTS / best).is_dir():
            self._write_local_pointer("best", best)
        self._complete.add(tag)
        return tag

    def _download_records(self) -> None:
        fs = self.store.fs
        root = self.store.path(self.url)
        found = self.store.call("list", self.url, fs.find, root, detail=True)
        for key, info in found.items():
            rel = key[len(root):].lstrip("/")
            if rel.split("/", 1)[0] == CHECKPOINTS or not rel:
                continue
            dest = self.local / rel
            if not dest.exists():
                self._fetch(join(self.url, rel), dest, int(info.get("size") or 0))

    def _fetch(self, url: str, dest: Path, size: int) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        self.store.get(url, str(part))
        if part.stat().st_size != size:
            raise StoreError(f"{url}: {part.stat().st_size} bytes downloaded, {size} expected")
        os.replace(part, dest)
        st = dest.stat()
        self._sent[dest.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns)

    # ------------------------------------------------------------------ pointers
    def _ckpt_url(self, name: str) -> str:
        return join(self.url, CHECKPOINTS, name) if name else join(self.url, CHECKPOINTS) + "/"

    def _read_store_pointer(self, name: str) -> str | None:
        url = self._ckpt_url(name)
        try:
            return self.store.cat(url).decode().strip() or None
        except StoreError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None
            raise

    def _read_local_pointer(self, name: str) -> str | None:
        path = self.local / CHECKPOINTS / name
        return path.read_text().strip() if path.is_file() else None

    def _write_local_pointer(self, name: str, tag: str) -> None:
        path = self.local / CHECKPOINTS / name
        path.write_text(tag)
