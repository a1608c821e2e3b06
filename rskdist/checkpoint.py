"""Checkpoints of a run: save, `latest`, `best`, pruning, resume, and weights for evaluation.

A run writes DeepSpeed checkpoints under RUN/checkpoints/<tag>/ (tags `stepNNNNNNNN`),
each with the model's resolved architecture beside it (`model.json`, rskdist/models/spec.py).
Two pointer files name tags: `latest`, the newest complete checkpoint (what a resumed
run loads), and `best`, the checkpoint of the best evaluation by `eval.best_metric`.
Each pointer is replaced atomically and only after every rank finished writing, so a
crash during a save leaves both pointing at complete checkpoints. Pruning keeps the
newest `keep` tags plus the one `best` names, and runs only after a good save.
ZeRO-3 partitions the weights over the ranks' files; DeepSpeed's consolidation rebuilds
them for evaluation. A checkpoint resumes on another world size too: ZeRO 1-3 optimizer
state is then re-sharded (rskdist/parallel/reshard.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from rskdist.comm import broadcast_object, gather_objects, group_rank_and_size
from rskdist.models.spec import write_spec

POINTERS = ("latest", "best")
MANIFEST = "complete.json"  # in a checkpoint folder: every file of the save, its size and the ranks that saw it


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def read_pointer(folder: Path, name: str) -> str | None:
    path = Path(folder) / name
    return path.read_text().strip() if path.is_file() else None


def write_pointer(folder: Path, name: str, tag: str) -> None:
    """Point `name` (latest, best) at `tag`, atomically and durably: readers see the old or
    the new tag, and after a crash of the machine too (the file and the folder are fsynced)."""
    _write_durably(Path(folder) / name, tag)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _synced_listing(folder: Path) -> dict[str, int]:
    """{file: size} of a checkpoint folder as this rank sees it, each file and the folder
    fsynced (on a shared filesystem every rank flushes every file: redundant, harmless)."""
    listing = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
            _fsync(path)
            listing[path.name] = path.stat().st_size
    _fsync(folder)
    return listing


def verify_checkpoint(tag_dir: Path, rank: int) -> str | None:
    """Why this rank cannot trust the checkpoint in `tag_dir` (a file it saw at save time is
    missing or of another size), or None when it can. A folder without a manifest (written
    before rskdist wrote manifests) is trusted unverified; a missing folder is the caller's
    to report (`resume` names the ranks that lack it)."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{manifest_path} is unreadable ({err})"
    for name, entry in manifest["files"].items():
        if rank not in entry["ranks"] and len(entry["ranks"]) < manifest["world_size"]:
            continue  # another node's own file (nodes without a shared filesystem)
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} is {path.stat().st_size} bytes, {entry['size']} when saved"
    return None


class CheckpointManager:
    """Saves and resumes one run's checkpoints through a DeepSpeed-like engine.

    `engine` needs `save_checkpoint(folder, tag=, client_state=, save_latest=)` and
    `load_checkpoint(folder, tag=)`. Every rank calls `save`; rank 0 alone moves the
    pointers and prunes, between two barriers.
    """

    def __init__(self, folder: Path, engine, *, rank: int, keep: int, barrier: Callable[[], None] = lambda: None,
                 group=None, model_spec: dict | None = None):
        self.folder, self.engine, self.rank, self.keep = Path(folder), engine, rank, keep
        self.model_spec = model_spec  # written into each checkpoint folder: it rebuilds the model alone
        self.barrier, self.group = barrier, group
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None  # the checkpoint folder `resume` loaded
        self.saved_world_size: int | None = None  # how many ranks saved it (None: unknown)

    def save(self, step: int, client_state: dict[str, Any], *, prune: bool = True,
             rank_files: dict[str, Any] | None = None) -> str:
        """Every rank saves `step`; `rank_files` ({file name: object}) are this rank's own
        files in the checkpoint folder (torch.save), written before `latest` may move."""
        tag = step_tag(step)
        try:
            ok = self.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state,
                                             save_latest=False)
            for name, obj in (rank_files or {}).items():
                tmp = self.folder / tag / f"{name}.tmp"
                torch.save(obj, tmp)
                os.replace(tmp, self.folder / tag / name)
            if self.rank == 0 and self.model_spec is not None:
                write_spec(self.model_spec, self.folder / tag)
            self.barrier()  # every rank's files are written: each now flushes what it sees
            listing = _synced_listing(self.folder / tag)
        except (OSError, RuntimeError) as exc:  # a full disk (torch.save reports it as a RuntimeError), a read-only folder
            kept = read_pointer(self.folder, "latest")
            raise ValueError(
                f"checkpoint: cannot write {self.folder / tag} ({type(exc).__name__}: {exc}); "
                f"{'the previous checkpoint ' + kept + ' and latest are intact' if kept else 'no earlier checkpoint'}"
                f"; free space or point run.output_dir at a writable folder, then rerun to resume"
            ) from exc
        # Every rank reports the tag it wrote and what it sees; only a save all of them agree on
        # is marked complete (its manifest, then `latest`, each durable before the next).
        reports = gather_objects((tag, ok is not False, listing), self.group)
        if self.rank == 0:
            problem = _disagreement(reports)
            if problem:
                print(f"warning: checkpoint {tag} is not marked complete ({problem}); latest stays "
                      f"{read_pointer(self.folder, 'latest')}", file=sys.stderr, flush=True)
            else:
                files: dict[str, dict] = {}
                for r, (_, _, seen) in enumerate(reports):
                    for name, size in seen.items():
                        files.setdefault(name, {"size": size, "ranks": []})["ranks"].append(r)
                _write_durably(self.folder / tag / MANIFEST,
                               json.dumps({"tag": tag, "world_size": len(reports), "files": files}, indent=1))
                write_pointer(self.folder, "latest", tag)  # last: a crash before this keeps the previous one
                if prune:
                    self.prune()
        self.barrier()
        self.last_saved_step = step
        return tag

    def mark_best(self, tag: str) -> None:
        """`best` names `tag` (an already saved checkpoint); pruning keeps it from now on."""
        if self.rank == 0:
            write_pointer(self.folder, "best", tag)
            self.prune()  # the previous best may now be beyond `keep`
        self.barrier()

    def prune(self) -> None:
        keep = {read_pointer(self.folder, name) for name in POINTERS}
        tags = sorted(p for p in self.folder.glob("step*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _trusted_tag(self) -> str | None:
        """`latest`, or when some rank cannot trust it (a file missing or short: a crash of the
        machine, a copy cut off), the newest older checkpoint every rank can; every rank
        checks its own view and they all take the same answer."""
        latest = broadcast_object(read_pointer(self.folder, "latest"), self.group)
        if latest is None:
            return None
        older = sorted((p.name for p in self.folder.glob("step*") if p.is_dir() and p.name < latest), reverse=True)
        for tag in broadcast_object([latest, *older], self.group):
            problems = gather_objects(verify_checkpoint(self.folder / tag, self.rank), self.group)
            bad = [(r, p) for r, p in enumerate(problems) if p]
            if not bad:
                return tag
            if self.rank == 0:
                print(f"resume: skipping {tag}: rank {bad[0][0]} finds {bad[0][1]}", file=sys.stderr, flush=True)
        raise ValueError(f"resume: no complete checkpoint in {self.folder} (each has a missing or short file, see "
                         "above); restore the files, or start fresh with run.resume=never")

    def resume(self, resume: str) -> tuple[str, dict] | None:
        """Load per `run.resume` ("auto", "never" or a checkpoint path); returns
        (loaded path, client state) or None when there is nothing to resume."""
        if resume == "never":
            return None
        if resume == "auto":
            # Rank 0 decides and every rank loads that tag: nodes with their own copies of the
            # folder never resume from different steps (no split-brain).
            tag = broadcast_object(self._trusted_tag(), self.group)
            if tag is None:
                return None
            folder = self.folder
        else:
            folder, tag = resolve_checkpoint(resume)
            problems = gather_objects(verify_checkpoint(folder / tag, self.rank), self.group)
            bad = [(r, p) for r, p in enumerate(problems) if p]
            if bad:
                raise ValueError(f"resume: run.resume={resume}: rank {bad[0][0]} finds {bad[0][1]}; pick another "
                                 "checkpoint, or run.resume=auto to take the newest complete one")
        missing = gather_objects(not (folder / tag).is_dir(), self.group)
        if any(missing):
            ranks = ", ".join(str(r) for r, m in enumerate(missing) if m)
            raise ValueError(f"resume: rank 0 resumes from {tag}, which rank(s) {ranks} cannot read in their "
                             f"checkpoints folder; "
                             f"give every node the same checkpoints folder (a shared filesystem, or copy it) "
                             f"or start fresh with run.resume=never")
        load_path, client = self._load(folder, tag)
        if load_path is None:
            raise ValueError(f"resume: no loadable checkpoint in {folder}; use run.resume=never to start fresh")
        self.resumed_from = folder / tag
        return load_path, client

    def _load(self, folder: Path, tag: str) -> tuple[str | None, dict]:
        """engine.load_checkpoint, re-sharding the optimizer state when the checkpoint was
        saved on another world size (rskdist/parallel/reshard.py)."""
        from rskdist.parallel.reshard import load_on_new_world, partitioned, saved_world_size

        world_size = group_rank_and_size(self.group)[1]
        self.saved_world_size = broadcast_object(saved_world_size(folder / tag), self.group)
        if self.saved_world_size in (None, world_size) or not partitioned(self.engine):
            return self.engine.load_checkpoint(str(folder), tag=tag)
        return load_on_new_world(self.engine, folder, tag, saved_world=self.saved_world_size, rank=self.rank,
                                 world_size=world_size, broadcast=lambda obj: broadcast_object(obj, self.group),
                                 barrier=self.barrier)


def _disagreement(reports: list) -> str | None:
    """Why the ranks' reports of one save do not make a complete checkpoint, or None."""
    tags = {tag for tag, _, _ in reports}
    if len(tags) != 1:
        return f"ranks wrote different tags: {sorted(tags)}"
    failed = [r for r, (_, ok, _) in enumerate(reports) if not ok]
    if failed:
        return f"rank(s) {failed} reported a failed save"
    sizes: dict[str, int] = {}
    for r, (_, _, seen) in enumerate(reports):
        for name, size in seen.items():
            if sizes.setdefault(name, size) != size:
                return f"ranks see {name} with different sizes"
    return None


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run folder, a checkpoints folder or a tag folder.

    `tag` picks one checkpoint of a run or checkpoints folder: a tag name, or a pointer
    (`latest`, the default; `best`, the best evaluation).
    """
    path = Path(path)
    pointer = tag if tag in POINTERS else None
    for folder in (path / "checkpoints", path):
        if tag is not None and pointer is None:
            if (folder / tag).is_dir():
                return folder, tag
            continue
        named = read_pointer(folder, pointer or "latest")
        if named is not None:
            return folder, named
        if pointer == "best" and read_pointer(folder, "latest") is not None:
            raise ValueError(f"checkpoint: {folder} has no best checkpoint (no evaluation, or eval.save_best=false); "
                             f"use --tag latest or a step tag")
    if tag is None and path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise ValueError(
        f"checkpoint: no checkpoint{'' if tag is None else f' {tag!r}'} at {path}; pass a run folder (runs/NAME), "
        f"its checkpoints/ folder or one checkpoints/<tag> folder written by rskdist/train.py"
    )


def load_model_state(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (fp32 where the run kept fp32 master weights); a run whose
    loss had class proxies trained model + loss (rskdist.parallel.step_parts.TrainModule): the model's part."""
    from rskdist.models.weights import model_part

    return model_part(_load_module_state(path, tag))


def _load_module_state(path: str | Path, tag: str | None) -> dict[str, torch.Tensor]:
    folder, tag = resolve_checkpoint(path, tag)
    tag_dir = folder / tag
    single = tag_dir / "mp_rank_00_model_states.pt"
    if single.is_file():
        # Written by our own training run (DeepSpeed pickles its config next to the
        # weights, so weights_only loading cannot read it); never load files of unknown origin.
        state = torch.load(single, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    if any(tag_dir.glob("zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))
    raise ValueError(f"checkpoint: {tag_dir} holds no model states (an interrupted save?); use an earlier tag")
