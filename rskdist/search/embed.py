"""Embed every image of a source into the clip-retrieval layout (rskdist/search/layout.py).

Ranks need no process group: each writes the parts `PartPlan.parts_of_rank` gives it and
skips those already complete, so a rerun resumes and any number of ranks (torchrun,
deepspeed, a scheduler's array job) can share the work. Images are read and decoded in
DataLoader workers with the evaluation transform; one that cannot be read or decoded is
listed in failed.txt and left out, never fatal.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from rskdist.data.loader import READ_ERRORS, read_error_reason
from rskdist.data.writer import Progress
from rskdist.inference import InferenceModel, to_eval_array
from rskdist.search import layout


class _Decoded(Dataset):
    """dataset[i] -> (i, uint8 [3, S, S] or None, reason): row i of the source, decoded."""

    def __init__(self, source, image_size: int):
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return i, to_eval_array(self.source.read(i), self.image_size), ""
        except READ_ERRORS as err:
            return i, None, read_error_reason(err)


def _as_list(items: list) -> list:
    return items


def embed_to_parts(model: InferenceModel, source, out: str | Path, *, part_size: int, batch_size: int,
                   fp16: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                   progress: bool = True) -> dict:
    """Write this rank's unfinished parts of `source`'s embeddings under `out`; returns counts
    (this rank's parts, those written now, the others being done already; images embedded,
    unreadable) and seconds."""
    out = Path(out)
    if len(source) == 0:
        raise ValueError(f"no images to embed in {source.describe()}")
    plan = layout.PartPlan(len(source), part_size)
    layout.start(out, {
        "source": source.describe(), "num_images": len(source), "part_size": part_size, "num_parts": plan.num_parts,
        "dtype": "float16" if fp16 else "float32", "embedding_size": model.embed_dim, "image_size": model.image_size,
        "checkpoint": model.source, "labels": source.labels is not None,
    })
    mine = plan.parts_of_rank(rank, world_size)
    todo = [p for p in mine if not layout.part_done(out, plan, p)]
    batches = [list(plan.rows(p)[i : i + batch_size]) for p in todo for i in range(0, len(plan.rows(p)), batch_size)]
    loader = DataLoader(_Decoded(source, model.image_size), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_as_list)
    bar = Progress(sum(len(plan.rows(p)) for p in todo), f"rank {rank}", enabled=progress, log_percent=10)
    t0, embedded, failed_total = time.perf_counter(), 0, 0
    parts = iter(todo)
    part, embs, paths, failed = next(parts, None), [], [], []
    for items in loader:
        good = [(i, image) for i, image, _ in items if image is not None]
        failed += [(source.image_path(i), reason) for i, image, reason in items if image is None]
        if good:
            embs.append(model.embed(torch.from_numpy(np.stack([image for _, image in good])), batch_size=batch_size))
            paths += [i for i, _ in good]
        bar.update(len(items))
        if items[-1][0] == plan.rows(part)[-1]:  # the part's last batch
            emb_nd = torch.cat(embs).numpy() if embs else np.zeros((0, model.embed_dim), np.float32)
            columns = {"image_path": pa.array([source.image_path(i) for i in paths], pa.string())}
            if source.labels is not None:
                columns["label"] = pa.array(source.labels[paths], pa.int64())
            layout.write_part(out, plan, part, emb_nd.astype(np.float16 if fp16 else np.float32), columns, failed)
            embedded, failed_total = embedded + len(paths), failed_total + len(failed)
            part, embs, paths, failed = next(parts, None), [], [], []
    bar.close()
    layout.merge_failed(out, plan)
    return {"rank": rank, "parts": [plan.name(p) for p in mine], "parts_written": [plan.name(p) for p in todo],
            "embedded": embedded,
            "unreadable": failed_total, "seconds": round(time.perf_counter() - t0, 2)}
