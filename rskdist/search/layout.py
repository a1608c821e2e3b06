"""Embeddings on disk in the clip-retrieval layout, which autofaiss and clip-retrieval read.

    OUT/img_emb/img_emb_{part}.npy          (n, d) float32 or float16, L2-normalised rows
    OUT/metadata/metadata_{part}.parquet    image_path (+ label), row i describes embedding row i
    OUT/failed.txt                          image_path <TAB> reason, one unreadable image a line
    OUT/embed.json                          the plan: what was embedded, with which model, in how many parts

Part p holds the readable images among rows [p * part_size, (p + 1) * part_size) of the
source's fixed order; `part` is zero-padded to the width of the last part's number, so
names sort in part order. A part is the unit of work and of resumption: its files are
written under temporary names and renamed (the parquet last), so a part whose parquet
exists is complete, and ranks that own disjoint parts never write the same file. Each
part's unreadable images go to OUT/failed/failed_{part}.txt, merged into failed.txt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EMB_DIR, META_DIR, FAILED_DIR = "img_emb", "metadata", "failed"
FAILED_FILE = "failed.txt"
PLAN_FILE = "embed.json"
FORMAT = "rskdist-embeddings"


@dataclass(frozen=True)
class PartPlan:
    """Which source rows each part holds, and which parts each rank writes."""

    num_images: int
    part_size: int

    def __post_init__(self):
        if self.part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {self.part_size}")

    @property
    def num_parts(self) -> int:
        return max(1, -(-self.num_images // self.part_size))

    def rows(self, part: int) -> range:
        return range(part * self.part_size, min(self.num_images, (part + 1) * self.part_size))

    def parts_of_rank(self, rank: int, world_size: int) -> list[int]:
        """Round-robin: rank r writes parts r, r + W, r + 2W, ... (balanced, and disjoint by construction)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return list(range(rank, self.num_parts, world_size))

    def name(self, part: int) -> str:
        return f"{part:0{len(str(self.num_parts - 1))}d}"


def emb_path(out: Path, plan: PartPlan, part: int) -> Path:
    return Path(out) / EMB_DIR / f"img_emb_{plan.name(part)}.npy"


def meta_path(out: Path, plan: PartPlan, part: int) -> Path:
    return Path(out) / META_DIR / f"metadata_{plan.name(part)}.parquet"


def failed_path(out: Path, plan: PartPlan, part: int) -> Path:
    return Path(out) / FAILED_DIR / f"failed_{plan.name(part)}.txt"


def part_done(out: Path, plan: PartPlan, part: int) -> bool:
    return meta_path(out, plan, part).is_file() and emb_path(out, plan, part).is_file()


def start(out: Path, plan_record: dict[str, Any]) -> None:
    """Create OUT's folders and write its plan, or check that OUT holds the same plan (a resume)."""
    out = Path(out)
    for sub in (EMB_DIR, META_DIR, FAILED_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "version": 1, **plan_record}
    path = out / PLAN_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
        if changed:
            detail = "; ".join(f"{k}: {before.get(k)!r} there, {record.get(k)!r} now" for k in changed)
            raise ValueError(f"{out} holds embeddings of another plan ({detail}); pass a new --out, or remove {out} "
                             f"to start over")
        return
    _replace(path, json.dumps(record, indent=2) + "\n")  # every rank writes the same bytes


def read_plan(out: Path) -> dict[str, Any]:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{out}: no {PLAN_FILE}; embeddings folders are written by tools/embed.py")
    return json.loads(path.read_text())


def write_part(out: Path, plan: PartPlan, part: int, emb_nd: np.ndarray, columns: dict[str, Any],
               failed: list[tuple[str, str]]) -> None:
    """Write one part: embeddings, their metadata rows (same order) and its unreadable images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    assert table.num_rows == len(emb_nd), (table.num_rows, emb_nd.shape)
    suffix = f".tmp-{os.getpid()}"
    fail = failed_path(out, plan, part)
    if failed:
        _replace(fail, "".join(f"{path}\t{reason}\n" for path, reason in failed))
    else:
        fail.unlink(missing_ok=True)  # a failure of an earlier attempt that reads now
    emb = emb_path(out, plan, part)
    with open(f"{emb}{suffix}", "wb") as f:
        np.save(f, emb_nd)
    meta = meta_path(out, plan, part)
    pq.write_table(table, f"{meta}{suffix}")
    os.replace(f"{emb}{suffix}", emb)
    os.replace(f"{meta}{suffix}", meta)  # last: the part is complete once its parquet exists


def merge_failed(out: Path, plan: PartPlan) -> int:
    """Rewrite OUT/failed.txt from the finished parts' lists (whichever rank finishes last
    sees them all); returns the number of unreadable images listed."""
    lines = []
    for part in range(plan.num_parts):
        path = failed_path(out, plan, part)
        if part_done(out, plan, part) and path.is_file():
            lines += path.read_text().splitlines(keepends=True)
    _replace(Path(out) / FAILED_FILE, "".join(lines))
    return len(lines)


def read_failed(out: Path) -> list[tuple[str, str]]:
    path = Path(out) / FAILED_FILE
    if not path.is_file():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines()]


def part_files(out: Path) -> list[tuple[Path, Path]]:
    """(embeddings, metadata) of every part of OUT in part order; an unfinished part is an error."""
    out = Path(out)
    record = read_plan(out)
    plan = PartPlan(record["num_images"], record["part_size"])
    missing = [plan.name(p) for p in range(plan.num_parts) if not part_done(out, plan, p)]
    if missing:
        raise ValueError(f"{out}: part(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} of "
                         f"{plan.num_parts} not written yet; rerun tools/embed.py with the same arguments to finish")
    return [(emb_path(out, plan, p), meta_path(out, plan, p)) for p in range(plan.num_parts)]


def read_embeddings(out: Path, *, mmap: bool = False) -> tuple[list[np.ndarray], Any]:
    """Every part's embeddings (a list of (n_p, d) arrays, memory-mapped with `mmap`) and the
    metadata of all rows as one pyarrow table, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = part_files(out)
    embs = [np.load(e, mmap_mode="r" if mmap else None) for e, _ in files]
    meta = pa.concat_tables([pq.read_table(m) for _, m in files])
    return embs, meta


def _replace(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
