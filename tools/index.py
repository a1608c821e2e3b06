#!/usr/bin/env python
"""Build a faiss index over tools/embed.py's output, and query it with images.

    python tools/index.py build --embeddings emb/ --out emb.index            # --kind auto|flat|ivfpq
    python tools/index.py query --index emb.index --checkpoint runs/demo --images q1.jpg q2.jpg --k 10

`build` picks exact search (flat inner product) up to 262,144 vectors and IVF-PQ above,
with its parameters chosen from the size (rskdist/search/index.py; docs/search.md).
`query` embeds each image with the run's model (rskdist.load) and prints one JSON line per
query: {"query", "ids" (image_path of the embeddings' metadata), "scores"}, best first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from rskdist.search.index import KINDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index an embeddings folder")
    b.add_argument("--embeddings", required=True, help="folder written by tools/embed.py")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--kind", default="auto", choices=KINDS)
    b.add_argument("--seed", type=int, default=0, help="seed of the IVF-PQ training sample")
    q = sub.add_parser("query", help="search an index with images")
    q.add_argument("--index", required=True, help="folder written by `build`")
    q.add_argument("--checkpoint", required=True, help="the run whose model embedded the index (rskdist.load)")
    q.add_argument("--tag", help="which checkpoint of the run: latest (default), best or a step tag")
    q.add_argument("--images", required=True, nargs="+", help="query image files")
    q.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    q.add_argument("--nprobe", type=int, help="IVF-PQ: cells searched per query (default: the index's)")
    q.add_argument("--rerank", type=int, help="IVF-PQ: rank k x R candidates by their exact scores, read from the "
                                              "embeddings folder (default 10 when it is there; 0: off)")
    return p


def build(args) -> dict:
    from rskdist.search.index import build_index, write_index
    from rskdist.search.layout import read_embeddings, read_plan

    plan = read_plan(args.embeddings)
    parts, meta = read_embeddings(args.embeddings, mmap=True)
    index, info = build_index(parts, kind=args.kind, seed=args.seed)
    info.update(embeddings=str(Path(args.embeddings).resolve()), checkpoint=plan.get("checkpoint"))
    write_index(args.out, index, meta, info)
    print(json.dumps(info), flush=True)
    return info


def query(args) -> list[dict]:
    import numpy as np
    import torch

    import rskdist
    from rskdist.data.loader import READ_ERRORS, read_error_reason
    from rskdist.inference import to_eval_array
    from rskdist.search.index import SearchIndex

    index = SearchIndex(args.index, rerank=args.rerank)
    model = rskdist.load(args.checkpoint, args.tag)
    if index.info.get("checkpoint") not in (None, model.source):
        print(f"warning: the index holds embeddings of {index.info['checkpoint']}; the queries are embedded with "
              f"{model.source}", file=sys.stderr)
    arrays, errors = [], {}
    for i, path in enumerate(args.images):
        try:
            arrays.append(to_eval_array(path, model.image_size))
        except READ_ERRORS as exc:  # an unreadable query: said on its line, the others go on
            errors[i] = read_error_reason(exc)
    hits = iter(index.search(model.embed(torch.from_numpy(np.stack(arrays))).numpy(), args.k, nprobe=args.nprobe)
                if arrays else [])
    results = []
    for i, path in enumerate(args.images):
        if i in errors:
            results.append({"query": path, "error": errors[i]})
        else:
            found = next(hits)
            results.append({"query": path, "ids": [id_ for id_, _ in found], "scores": [s for _, s in found]})
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    try:
        return build(args) if args.command == "build" else query(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
