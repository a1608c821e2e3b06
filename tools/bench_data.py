#!/usr/bin/env python
"""Throughput of the class-balanced training stream on CPU (images/s), one JSON line per setting.

    python tools/bench_data.py --workers 0,1,2 --image-size 224
    python tools/bench_data.py --root DST            # measure on existing shards
    python tools/bench_data.py --moto --request-kb 64,256,1024,4096   # local disk vs an S3 server on loopback
    python tools/bench_data.py --store s3://bucket/prefix              # vs a real store (AWS_* env for access)

With --moto (moto's S3 server on a free 127.0.0.1 port, started and stopped here) or --store,
the shards are uploaded there and each worker count is measured from local disk, from the
store with data.read_mode=stage (a fresh cache: `first_batch_s` includes fetching shards) and
with read_mode=ranged for each --request-kb.

Without --root it builds a temporary dataset of photo-sized JPEGs (default 500x375,
like CUB/iNaturalist; demo renders upscaled with pixel noise so they compress like
photos, ~60-100 KB each) through tools/make_shards' writer, then times
`steps` batches after `warmup` batches (worker start-up excluded) for each worker count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import torch
from PIL import Image

from rskdist.data.demo_images import render
from rskdist.data.loader import build_train_loader
from rskdist.data.remote import StoreReading
from rskdist.data.shards import upload_shards
from rskdist.data.sources import list_source
from rskdist.data.writer import write_shards
from rskdist.store.fs import Store


def make_photo_like_shards(out: str, num_classes: int, per_class: int, width: int, height: int) -> None:
    src = os.path.join(out, "src")
    for c in range(num_classes):
        os.makedirs(os.path.join(src, f"{c:03d}"), exist_ok=True)
        for k in range(per_class):
            rng = np.random.default_rng([c, k])
            small = Image.fromarray(render(0, c, k, 64))
            arr = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32)
            arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            with open(os.path.join(src, f"{c:03d}", f"{k:03d}.jpg"), "wb") as f:
                f.write(buf.getvalue())
    # All classes in train: the benchmark only reads the train split.
    listing = list_source("folder", src, train_fraction=0.99)
    write_shards(listing, os.path.join(out, "shards"), samples_per_shard=200, progress=False)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the loader's workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(root: str, workers: int, args, store: StoreReading | None = None) -> dict:
    t_open = time.perf_counter()
    loader = build_train_loader(
        root,
        rank=0,
        world_size=1,
        classes_per_rank=args.classes_per_rank,
        m=args.m,
        image_size=args.image_size,
        num_workers=workers,
        seed=0,
        read_size=args.read_size,
        store=store,
    )
    done, t0, cpu0, images, first = 0, None, None, 0, None
    while done < args.warmup + args.steps:
        for x, _ in loader:
            done += 1
            first = first or time.perf_counter() - t_open
            if done == args.warmup:
                t0, cpu0 = time.perf_counter(), _cpu_seconds()
            elif done > args.warmup:
                images += len(x)
            if done == args.warmup + args.steps:
                break
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0  # main process + its DataLoader workers, while measuring
    loader.close()
    source = "local" if store is None else f"store-{store.mode}"
    return {
        "bench": "train_stream",
        "source": source,
        **({"request_kb": store.request_bytes // 1024} if store is not None and store.mode == "ranged" else {}),
        "first_batch_s": round(first, 2),  # loader start, worker start-up and (stage) fetching included
        "workers": workers,
        "image_size": args.image_size,
        "batch_size": args.classes_per_rank * args.m,
        "steps": args.steps,
        "images_per_s": round(images / elapsed, 1),
        "seconds": round(elapsed, 2),
        # CPU time per image (all processes): independent of other jobs' load;
        # 1000 / cpu_ms_per_image ~ images/s per fully available core.
        "cpu_ms_per_image": round(1000 * cpu / images, 2),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine skew the number
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="existing shard folder (default: build a temporary photo-like dataset)")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes-per-rank", type=int, default=16)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--read-size", type=int, default=16)
    p.add_argument("--source-size", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--num-classes", type=int, default=40)
    p.add_argument("--per-class", type=int, default=12)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--moto", action="store_true", help="also measure from moto's S3 server on loopback")
    where.add_argument("--store", help="also measure from this store URL (the shards are uploaded under it)")
    p.add_argument("--request-kb", default="64,256,1024,4096", help="read_mode=ranged request sizes to measure")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            w, h = (int(v) for v in args.source_size.split("x"))
            t = time.perf_counter()
            make_photo_like_shards(tmp, args.num_classes, args.per_class, w, h)
            root = os.path.join(tmp, "shards")
            mean_kb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(tmp, "src"))
                          for f in fs) / (args.num_classes * args.per_class) / 1024
            print(f"built {args.num_classes * args.per_class} {w}x{h} JPEGs (mean {mean_kb:.0f} KB) "
                  f"in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        server = start_moto() if args.moto else None
        try:
            url = None
            if server is not None or args.store:
                url = (make_bucket("rskdist-bench") if server is not None else args.store.rstrip("/")) + "/shards"
                t = time.perf_counter()
                upload_shards(root, url)
                print(f"uploaded the shards to {url} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            for workers in (int(v) for v in args.workers.split(",")):
                print(json.dumps(measure(root, workers, args)), flush=True)
                if url is None:
                    continue
                stage = StoreReading(mode="stage", cache_dir=os.path.join(tmp, f"cache-{workers}"))
                print(json.dumps(measure(url, workers, args, stage)), flush=True)
                for kb in (int(v) for v in args.request_kb.split(",")):
                    ranged = StoreReading(mode="ranged", request_bytes=kb * 1024)
                    print(json.dumps(measure(url, workers, args, ranged)), flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    return 0


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free loopback port; this process's AWS_* variables point at it."""
    import urllib.request

    from rskdist.comm import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(600):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto server did not start within 60 s")


def make_bucket(name: str) -> str:
    store = Store(f"s3://{name}")
    store.fs.mkdir(name)
    return f"s3://{name}"


if __name__ == "__main__":
    sys.exit(main())
