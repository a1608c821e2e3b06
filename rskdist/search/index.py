"""A faiss index over an embeddings folder (rskdist/search/layout.py), and queries against it.

    INDEX/index.faiss    the faiss index; faiss id i = row i of the embeddings, parts in order
    INDEX/ids.parquet    image_path (+ label) of each id
    INDEX/index.json     kind, parameters, size, the embeddings and checkpoint it came from

Kinds: "flat", exact inner product (cosine on the L2-normalised embeddings), N x d x 4
bytes; "ivfpq", an inverted file of `nlist` k-means cells whose residual vectors are
product-quantised to `m` bytes, searched in `nprobe` cells, and re-ranked at query time by
exact scores read from the embeddings folder (`SearchIndex`). "auto" is flat up to
FLAT_MAX_VECTORS and IVF-PQ above, with its parameters from `ivfpq_params` (docs/search.md
has the rule and what it measures on a million vectors). Vectors are added part by part,
so building needs the index and one part in memory, plus the training sample.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("auto", "flat", "ivfpq")
# auto: exact search up to here. A flat index of 2^18 x 512 float32 is 512 MB and a query
# reads all of it; above, IVF-PQ reads ~nprobe/nlist of the codes, at m bytes per vector.
FLAT_MAX_VECTORS = 1 << 18
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.parquet", "index.json"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid
DEFAULT_RERANK = 10  # IVF-PQ queries: k x 10 candidates re-ranked by exact score (docs/search.md)


@dataclass(frozen=True)
class IvfPqParams:
    nlist: int  # inverted lists (k-means cells)
    m: int  # sub-quantizers = bytes per vector with nbits = 8
    nbits: int  # bits per sub-quantizer code
    nprobe: int  # cells searched per query (the default; a query may ask for more)
    train_size: int  # vectors the quantizers are trained on (a seeded sample)


def ivfpq_params(n: int, d: int) -> IvfPqParams:
    """The IVF-PQ parameters of N vectors of dimension d:

    - nlist: the power of two nearest 2 sqrt(N), at most N / 39 (enough training points per
      cell) and 65536: 2,048 cells at 1M. faiss's guideline is 4..16 sqrt(N); half its lower
      end trains 4x and adds 2x faster (the k-means costs 40 nlist^2 d per iteration, adding
      N nlist d), and the re-ranking makes up for the coarser residual codes (docs/search.md);
    - m: the largest divisor of d that is at most d / 8 and 64: 8+ dimensions per sub-quantizer,
      m bytes per vector (16 at d = 128, 32x smaller than float32; 64 at d = 512). faiss's
      k-means ran 7x slower per point on 4-dimensional sub-vectors than on 8 here, and the
      re-ranking of `SearchIndex` recovers what the coarser codes lose;
    - nbits: 8 (256 centroids per sub-quantizer), fewer when N < 256 x 39;
    - nprobe: nlist / 8, at least 16 (12% of the cells: on 1M clustered vectors re-ranked
      recall@10 went 0.83 -> 0.93 from nlist / 32 to nlist / 8, at ~2 ms a query; docs/search.md);
    - train_size: 40 x nlist vectors (faiss wants at least 39 per cell), at least 256 x 39
      (PQ's codebooks), at most N: the k-means costs train_size x nlist x d per iteration.
    """
    if n < MIN_POINTS_PER_CENTROID * 2:
        raise ValueError(f"IVF-PQ needs at least {MIN_POINTS_PER_CENTROID * 2} vectors, got {n}; use --kind flat")
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    nlist = max(1, min(nlist, 1 << 16, 2 ** int(math.log2(n // MIN_POINTS_PER_CENTROID))))
    m = max(k for k in range(1, min(64, max(1, d // 8)) + 1) if d % k == 0)
    nbits = min(8, int(math.log2(n // MIN_POINTS_PER_CENTROID)))
    nprobe = min(nlist, max(16, nlist // 8))
    train_size = min(n, max(40 * nlist, 256 * MIN_POINTS_PER_CENTROID))
    return IvfPqParams(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size)


def choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}; valid choices: {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if n <= FLAT_MAX_VECTORS else "ivfpq"
    return kind


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ValueError("building or querying an index needs faiss: pip install faiss-cpu (or faiss-gpu)") from err
    return faiss


def build_index(parts: list[np.ndarray], *, kind: str = "auto", seed: int = 0) -> tuple[Any, dict]:
    """A faiss index of the rows of `parts` (in order: id i = row i), and what it is (kind,
    parameters, seconds); `seed` draws the IVF-PQ training sample."""
    faiss = _faiss()
    n, d = sum(len(p) for p in parts), int(parts[0].shape[1])
    kind = choose_kind(kind, n)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"kind": kind, "num_vectors": n, "dim": d}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        params = ivfpq_params(n, d)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, params.nlist, params.m, params.nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(_sample_rows(parts, params.train_size, seed))
        index.nprobe = params.nprobe
        info.update(asdict(params), train_seconds=round(time.perf_counter() - t0, 2))
    for part in parts:
        for i in range(0, len(part), 65536):  # bounded float32 copies of memory-mapped fp16 parts
            index.add(np.ascontiguousarray(part[i : i + 65536], dtype=np.float32))
    info["build_seconds"] = round(time.perf_counter() - t0, 2)
    return index, info


class PartRows:
    """Rows of a list of (memory-mapped) parts by global row number, as float32: the vectors
    behind the ids of an index, read from the embeddings folder instead of held in memory."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dim = int(parts[0].shape[1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        part_of = np.searchsorted(self.starts, ids, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            out[sel] = self.parts[p][ids[sel] - self.starts[p]]
        return out


def _sample_rows(parts: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement (seeded), in row order, as one float32 array."""
    rows = PartRows(parts)
    return rows(np.sort(np.random.default_rng(seed).choice(len(rows), size=min(size, len(rows)), replace=False)))


def rerank(queries_qd: np.ndarray, cand_qc: np.ndarray, rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidate ids (-1: none) by exact inner product with their
    stored vectors (`rows(ids)` -> float32), ties to the lower id: (scores [q, k], ids [q, k]),
    -inf / -1 where a query has fewer than k candidates."""
    q, c = cand_qc.shape
    cand_qc = np.sort(cand_qc, axis=1)  # by id: the stable sort below then breaks ties to the lower id
    valid = cand_qc >= 0
    vectors = np.zeros((q, c, queries_qd.shape[1]), np.float32)
    vectors[valid] = rows(cand_qc[valid])
    scores_qc = np.einsum("qcd,qd->qc", vectors, queries_qd.astype(np.float32))
    scores_qc[~valid] = -np.inf
    order = np.argsort(-scores_qc, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(np.where(valid, cand_qc, -1), order, axis=1)
    return np.take_along_axis(scores_qc, order, axis=1), ids


def write_index(folder: str | Path, index, ids, info: dict) -> Path:
    """Save `index`, the metadata table `ids` (pyarrow, row = faiss id) and `info` under `folder`."""
    import pyarrow.parquet as pq

    faiss = _faiss()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ids.num_rows != index.ntotal:
        raise ValueError(f"{ids.num_rows} metadata rows for {index.ntotal} vectors")
    faiss.write_index(index, str(folder / INDEX_FILE))
    pq.write_table(ids, folder / IDS_FILE)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: the index is complete
    return folder


def clustered_vectors(n: int, d: int, *, clusters: int, spread: float = 1.0, seed: int = 0,
                      chunk: int = 1 << 17) -> np.ndarray:
    """Synthetic L2-normalised float32 [n, d] data with cluster structure, for tests and
    tools/bench_index.py: a random unit centre per cluster plus Gaussian noise of norm ~`spread`
    (1.0: two points of a cluster have cosine ~0.5), each point's cluster drawn uniformly."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, chunk):  # bounded temporaries at millions of rows
        m = min(chunk, n - i)
        x = centres[rng.integers(clusters, size=m)] + rng.standard_normal((m, d), dtype=np.float32) * (spread / d**0.5)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class SearchIndex:
    """A saved index: `search(queries, k)` -> per query [(image_path, score), ...], best first.

    An IVF-PQ index ranks by approximate (quantised) scores; with `rerank` = R > 0 it fetches
    k x R candidates and ranks them by their exact scores, reading those rows from the
    embeddings folder the index was built from (memory-mapped: ~k x R x d x 4 bytes read per
    query). Default: R = 10 when that folder is still there, else no re-ranking (a warning).
    """

    def __init__(self, folder: str | Path, *, rerank: int | None = None):
        import pyarrow.parquet as pq

        faiss = _faiss()
        folder = Path(folder)
        if not (folder / INFO_FILE).is_file():
            raise ValueError(f"--index {folder}: no {INFO_FILE}; build it with tools/index.py build")
        self.info = json.loads((folder / INFO_FILE).read_text())
        self.index = faiss.read_index(str(folder / INDEX_FILE))
        self.ids = pq.read_table(folder / IDS_FILE, columns=["image_path"]).column(0)  # Arrow: no N Python strings
        self.rerank, self.rows = 0, None
        if self.info["kind"] == "ivfpq" and rerank != 0:
            self.rerank, self.rows = self._stored_rows(rerank)

    def _stored_rows(self, rerank: int | None) -> tuple[int, PartRows | None]:
        import warnings

        from rskdist.search.layout import read_embeddings

        source = self.info.get("embeddings")
        try:
            if not source:
                raise ValueError("the index does not name them")
            parts, _ = read_embeddings(source, mmap=True)
        except ValueError as err:
            if rerank is not None:
                raise ValueError(f"re-ranking reads the embeddings the index was built from ({source}): {err}; "
                                 f"pass --rerank 0 to rank by the quantised scores") from err
            warnings.warn(f"no re-ranking: the embeddings the index was built from are not readable ({err})",
                          stacklevel=3)
            return 0, None
        rows = PartRows(parts)
        if len(rows) != self.index.ntotal:
            raise ValueError(f"{source} holds {len(rows)} embeddings, the index {self.index.ntotal}: not the "
                             f"embeddings it was built from; pass --rerank 0")
        return rerank or DEFAULT_RERANK, rows

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries_qd: np.ndarray, k: int, *, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        if queries_qd.ndim != 2 or queries_qd.shape[1] != self.dim:
            raise ValueError(f"queries of shape {tuple(queries_qd.shape)} for an index of dimension {self.dim} "
                             f"(embedded with another model?)")
        if nprobe is not None:
            if self.info["kind"] != "ivfpq":
                raise ValueError(f"--nprobe applies to an ivfpq index; this one is {self.info['kind']}")
            self.index.nprobe = nprobe
        queries_qd = np.ascontiguousarray(queries_qd, dtype=np.float32)
        scores_qk, ids_qk = self.index.search(queries_qd, k * max(1, self.rerank))
        if self.rerank:
            scores_qk, ids_qk = rerank(queries_qd, ids_qk, self.rows, k)
        found = ids_qk >= 0
        names = iter(self.ids.take(ids_qk[found]).to_pylist())
        return [[(next(names), float(s)) for s in row_scores[row_found]]
                for row_found, row_scores in zip(found, scores_qk)]
