"""Retrievals as pictures: ``examples.html`` beside a run's metrics.

A fixed set of queries (drawn with a seed from the queries that have a relevant item,
so every evaluation of a run shows the same ones), each with its first neighbours in
the exact order the metrics use (rskdist.eval.sharded.ShardedRanker, so it works the
same whether every rank holds the embeddings or each holds a shard), the correct ones
framed green and the wrong ones red, and the rank of the first correct neighbour
(searched down to ``FIRST_CORRECT_DEPTH``). The thumbnails are files in ``examples/``
beside the page, so the run folder can be copied and opened anywhere.

Finding the neighbours is collective (every rank of ``group`` calls
:func:`find_examples`: a search of ``count`` queries, short); writing the page is rank
0's alone and reads ``count * (neighbours + 1)`` images (about 0.1-0.3 s on the demo).
"""

from __future__ import annotations

import html
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.distributed import ProcessGroup

from rskdist.comm import gather_objects
from rskdist.eval.metrics import _encode_labels
from rskdist.eval.neighbors import MAX_TIE_CLUSTER, as_float32_matrix, resolve_backend, work_device
from rskdist.eval.sharded import ShardedRanker, _gather_cpu, _int_labels, _Shards, _sort_by_id

NUM_QUERIES = 24
NUM_NEIGHBOURS = 8
FIRST_CORRECT_DEPTH = 1000  # ranks searched for the first correct neighbour ("> 1000" beyond)
PAGE = "examples.html"
FOLDER = "examples"
# The page marks <html data-images="loaded"> once every thumbnail has decoded, or
# "missing N" with the count of those that did not: a browser test reads it.
_CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); }).length;
  document.documentElement.setAttribute("data-images", bad ? "missing " + bad : "loaded");
  document.documentElement.setAttribute("data-image-count", String(imgs.length));
});
</script>"""


def find_examples(embeddings, labels, ids, *, group: ProcessGroup | None = None, count: int = NUM_QUERIES,
                  neighbours: int = NUM_NEIGHBOURS, depth: int = FIRST_CORRECT_DEPTH, seed: int = 0,
                  backend: str = "auto", device: str | torch.device | None = None) -> list[dict]:
    """The example queries of a leave-one-out set spread over ``group`` (each rank passes
    its rows and their unique ids, as to sharded_retrieval_metrics; ``group=None``: this
    process holds them all). Returns on rank 0, in query order, dicts with ``query`` (id),
    ``label``, ``neighbours`` (ids), ``neighbour_labels``, ``correct`` (bools) and
    ``first_correct`` (1-based rank, or None when beyond ``depth``); [] on other ranks."""
    requested, backend = backend, resolve_backend(backend)
    dev = work_device(requested, backend, device, embeddings)
    emb = as_float32_matrix(embeddings, "embeddings").to(dev)
    emb, lab, ids = _sort_by_id(emb, _int_labels(labels, "labels"), ids, "embeddings", group)
    shards = _Shards(ids, group, "ids", dev)
    all_lab, _ = _gather_cpu(lab, group, dev)
    (codes,) = _encode_labels(all_lab)
    n = shards.total
    has_relevant = (torch.bincount(codes)[codes] > 1) if n else torch.zeros(0, dtype=torch.bool)
    # Drawn over rows in id order, so the choice does not depend on how rows are spread.
    by_pos = torch.empty(n, dtype=torch.int64)
    by_pos[shards.pos] = torch.arange(n)
    candidates = by_pos[has_relevant[by_pos]].numpy()  # rank-order rows, in id order
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))
    k = min(max(neighbours, depth), n - 1) if n > 1 else 0
    k_need = torch.zeros(n, dtype=torch.int64)
    k_need[torch.from_numpy(chosen)] = k
    ranker = ShardedRanker(emb, shards.of(shards.rank, shards.pos), n, backend=backend, group=group,
                           max_candidates=1 << 22, max_tie_cluster=MAX_TIE_CLUSTER)
    g_ids = torch.empty(n, dtype=torch.int64)
    g_ids[shards.pos] = shards.ids
    g_lab = torch.empty(n, dtype=torch.int64)
    g_lab[shards.pos] = all_lab
    offset = shards.offsets[shards.rank]
    found = []
    for rows, ranked, _ in ranker.rank_queries(emb, [shards.of(r, k_need) for r in range(shards.world)], loo=True):
        ranked = ranked.cpu()[:, :k]
        for row, pos_list in zip(rows.tolist(), ranked):
            q_label = int(all_lab[offset + row])
            nb_labels = g_lab[pos_list]
            correct = (nb_labels == q_label).tolist()
            first = correct.index(True) + 1 if True in correct else None
            found.append({"query": int(shards.ids[offset + row]), "label": q_label,
                          "neighbours": g_ids[pos_list[:neighbours]].tolist(),
                          "neighbour_labels": nb_labels[:neighbours].tolist(),
                          "correct": correct[:neighbours], "first_correct": first})
    everyone = gather_objects(found, group)
    if shards.rank != 0:
        return []
    return sorted((e for part in everyone for e in part), key=lambda e: e["query"])


def _thumbnail(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, quality=90)


def _headline(metrics: dict) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, float) and not k.startswith("num_")]
    return " &middot; ".join(f"{html.escape(k)} <b>{100 * v:.2f}</b>" if not math.isnan(v) else f"{html.escape(k)} -"
                             for k, v in shown)


def write_examples(run_dir: str | Path, examples: Sequence[dict], metrics: dict,
                   read_images: Callable[[list[int]], torch.Tensor], *, title: str = "") -> Path:
    """``RUN/examples.html`` and its thumbnails ``RUN/examples/*.jpg`` (replacing earlier
    ones). ``read_images(ids)`` returns uint8 (n, 3, H, W) images of those sample ids;
    ``metrics`` are the evaluation's (fractions shown as percentages)."""
    run_dir = Path(run_dir)
    folder = run_dir / FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    wanted = sorted({i for e in examples for i in [e["query"], *e["neighbours"]]})
    images = read_images(wanted) if wanted else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != len(wanted):
        raise ValueError(f"read_images must return uint8 (n, 3, H, W) for n={len(wanted)} ids; "
                         f"got {images.dtype} {tuple(images.shape)}")
    for i, image in zip(wanted, images):
        _thumbnail(image, folder / f"{i}.jpg")
    rows = []
    for e in examples:
        cells = [f'<td class="q"><img src="{FOLDER}/{e["query"]}.jpg" alt="query {e["query"]}">'
                 f'<div>#{e["query"]} class {e["label"]}</div></td>']
        for nb, lab, ok in zip(e["neighbours"], e["neighbour_labels"], e["correct"]):
            cells.append(f'<td class="{"ok" if ok else "bad"}"><img src="{FOLDER}/{nb}.jpg" alt="{nb}">'
                         f'<div>class {lab}</div></td>')
        first = e["first_correct"]
        first_text = f"first correct: <b>{first}</b>" if first else f"first correct: &gt; {FIRST_CORRECT_DEPTH}"
        rows.append(f'<tr><td class="rank">{first_text}</td>{"".join(cells)}</tr>')
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title or run_dir.name)}: retrievals</title>
<style>
body {{ font: 13px sans-serif; margin: 12px; background: #fafafa; }}
table {{ border-collapse: separate; border-spacing: 4px; }}
td {{ text-align: center; vertical-align: top; font-size: 11px; color: #444; }}
img {{ width: 72px; height: 72px; object-fit: cover; display: block; border: 4px solid transparent; }}
td.q img {{ border-color: #3366cc; }}
td.ok img {{ border-color: #1a9c3a; }}
td.bad img {{ border-color: #d0312d; }}
td.rank {{ width: 90px; vertical-align: middle; }}
</style>
{_CHECK_IMAGES}
</head><body>
<h2>{html.escape(title or run_dir.name)}</h2>
<p>{_headline(metrics)}</p>
<p>{len(examples)} fixed queries (blue), each with its {NUM_NEIGHBOURS} nearest neighbours in the gallery
(leave-one-out, exact order): <span style="color:#1a9c3a">green</span> = same class,
<span style="color:#d0312d">red</span> = another class.</p>
<table>
{chr(10).join(rows)}
</table>
</body></html>
"""
    path = run_dir / PAGE
    path.write_text(page)
    return path
