#!/usr/bin/env python
"""Write WebDataset shards + index for a retrieval dataset (class-disjoint train/test).

    python tools/make_shards.py {inat,sop,cars196,cub,vehicleid,folder,csv,demo,digits} --root SRC --out DST

writes DST/<split>/*.tar for each split (train, test; VehicleID: train, test_800, test_1600,
test_2400), DST/index.json and DST/skipped.txt.
See docs/data.md for the layouts each source expects. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rskdist.data.sources import SOURCES, DataSourceError, list_source
from rskdist.data.writer import write_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=SOURCES)
    p.add_argument("--root", help="source dataset (folder; the .csv file for `csv`; unused for `demo`, `digits`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: min(8, cpus))")
    p.add_argument("--max-size", type=int, default=None, help="downscale images whose long side exceeds this")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--upload", metavar="URL", help="then copy the folder to this store URL (s3://bucket/prefix; "
                   "credentials from the environment), index.json last")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("inat")
    g.add_argument("--train-list", help="train split file (default Inaturalist_train_set1.txt in --root)")
    g.add_argument("--test-list", help="test split file (default Inaturalist_test_set1.txt in --root)")
    g = p.add_argument_group("folder / csv")
    g.add_argument("--train-fraction", type=float, help="fraction of the sorted classes used for train (0.5)")
    g.add_argument("--train-classes", dest="train_classes_file", help="file naming the train classes, one a line")
    g.add_argument("--image-root", help="csv: folder the paths are relative to (default: the csv's folder)")
    g = p.add_argument_group("demo / digits")
    g.add_argument("--num-classes", type=int, help="demo: number of classes, half train half test (200)")
    g.add_argument("--images-per-class", type=int, help="demo: images per class (24)")
    g.add_argument("--image-size", type=int, help="image side in pixels (demo 64, digits 32)")
    g.add_argument("--seed", type=int, help="demo: generator seed (0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = {
        "train_list": args.train_list,
        "test_list": args.test_list,
        "train_fraction": args.train_fraction,
        "train_classes_file": args.train_classes_file,
        "image_root": args.image_root,
        "num_classes": args.num_classes,
        "images_per_class": args.images_per_class,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    t0 = time.time()
    try:
        listing = list_source(args.source, args.root, **options)
        index = write_shards(
            listing,
            args.out,
            samples_per_shard=args.samples_per_shard,
            num_workers=args.workers,
            max_size=args.max_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
            options={k: v for k, v in options.items() if v is not None}
            | ({"root": os.path.abspath(args.root)} if args.root and args.source not in ("demo", "digits") else {}),
        )
    except (DataSourceError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in index["splits"].items():
        print(
            f"{split}: {info['num_samples']} images, {info['num_classes']} classes, "
            f"{len(info['shards'])} shards -> {os.path.join(args.out, split)}",
            file=sys.stderr,
        )
    num_skipped = index["skipped"]["count"]
    if num_skipped:
        report = os.path.join(args.out, index["skipped"]["report"])
        print(f"skipped {num_skipped} unreadable/corrupt images (listed in {report}):", file=sys.stderr)
        with open(report) as f:
            for line in list(f)[:5]:
                print("  " + line.rstrip("\n").replace("\t", "  "), file=sys.stderr)
    if args.upload:
        from rskdist.data.shards import upload_shards
        from rskdist.store import StoreError, StoreUnavailable

        try:
            upload_shards(args.out, args.upload)
        except (StoreError, StoreUnavailable) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"uploaded to {args.upload} (train with data.root={args.upload})", file=sys.stderr)
    print(f"done in {time.time() - t0:.1f}s: {os.path.join(args.out, 'index.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
