#!/usr/bin/env python
"""Embed images with a trained run's model, in the clip-retrieval layout autofaiss reads.

    python tools/embed.py --checkpoint runs/demo --images photos/ --out emb/
    python tools/embed.py --checkpoint runs/demo --tag best --list files.txt --out emb/ --fp16
    python tools/embed.py --checkpoint runs/demo --shards data/demo --split test --out emb/
    python tools/embed.py --checkpoint runs/demo --shards s3://bucket/demo --split test --out emb/
    torchrun --nproc_per_node 8 tools/embed.py --checkpoint runs/demo --images photos/ --out emb/

Writes OUT/img_emb/img_emb_{part}.npy (float32, float16 with --fp16) and
OUT/metadata/metadata_{part}.parquet (image_path relative to --images, label for shards)
in the same row order, OUT/failed.txt (unreadable images: listed, never fatal) and
OUT/embed.json (the plan). Under a launcher (RANK, WORLD_SIZE, LOCAL_RANK) each rank
writes its own parts; rerunning the same command skips the parts already written.
Rows equal `rskdist.load(RUN).embed` of the same images (rskdist/search/layout.py).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder, checkpoints/ folder, one checkpoint folder, or an exported .safetensors file")
    p.add_argument("--tag", help="which checkpoint of the run: latest (default), best or a step tag")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder: every image under it, recursively")
    src.add_argument("--list", help="a file naming one image path a line (relative to the file's folder)")
    src.add_argument("--shards", help="an rskdist shard folder (tools/make_shards.py), or its URL on an object "
                                      "store (s3://, gs://, https://); with --split")
    p.add_argument("--split", help="with --shards: the split to embed (e.g. test)")
    p.add_argument("--read-mode", choices=["stage", "ranged"], default="stage",
                   help="--shards on a store: fetch each shard whole into --cache-dir (default), or ranged "
                        "requests (as data.read_mode)")
    p.add_argument("--cache-dir", default="", help="--shards on a store, stage mode: the node-local cache "
                                                   "(default: a folder in the system temp dir)")
    p.add_argument("--out", required=True, help="output folder (img_emb/, metadata/, failed.txt, embed.json)")
    p.add_argument("--fp16", action="store_true", help="store the embeddings as float16 (half the disk)")
    p.add_argument("--part-size", type=int, default=100_000, help="images per part (the unit of resume and of "
                                                                   "work between ranks; default 100000)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding processes per rank (default 4)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    return p


def source_of(args):
    from rskdist.data.remote import StoreReading
    from rskdist.search.images import ShardImages, folder_images, listed_images

    if args.shards:
        if not args.split:
            raise ValueError("--shards needs --split (e.g. --split test)")
        return ShardImages(args.shards, args.split, reading=StoreReading(mode=args.read_mode, cache_dir=args.cache_dir))
    if args.split:
        raise ValueError("--split applies to --shards only")
    return folder_images(args.images) if args.images else listed_images(args.list)


def main(argv: Sequence[str] | None = None) -> dict:
    import rskdist
    from rskdist.search.embed import embed_to_parts
    from rskdist.store.fs import StoreUnavailable

    args = build_parser().parse_args(argv)
    # Set by torchrun and deepspeed; a plain run is rank 0 of 1. No process group: parts split the work.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        source = source_of(args)
        model = rskdist.load(args.checkpoint, args.tag, device=device, batch_size=args.batch_size)
        stats = embed_to_parts(model, source, args.out, part_size=args.part_size, batch_size=args.batch_size,
                               fp16=args.fp16, rank=rank, world_size=world_size, num_workers=args.num_workers)
    except (ValueError, FileNotFoundError, StoreUnavailable) as exc:
        # A bad argument, a missing run or shard index, a store that stopped answering (the
        # parts already written stay: rerunning the command resumes).
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(stats), flush=True)
    return stats


if __name__ == "__main__":
    main()
