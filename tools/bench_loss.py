#!/usr/bin/env python
"""Forward+backward time and peak memory of the RS@k loss; one JSON line per measurement.

    python tools/bench_loss.py                       # B = 1024 4096 16384 65536, m=4, d=512
    python tools/bench_loss.py --sizes 4096 --simix
    python tools/bench_loss.py --sizes 32768 --dim 128 --impls blockwise
    python tools/bench_loss.py --sizes 4096 --mix simix embedding none      # make_loss("rsk", mix=...)
    python tools/bench_loss.py --sizes 1024 --loss contrastive               # a baseline, mix none

Implementations measured in the same run:
  blockwise  rskdist.loss.rsk_loss with impl="auto" (what training runs)
  eager, native, triton
             rsk_loss with that block backend (rskdist/loss/backends.py, docs/loss.md,
             "Fused kernel"); "native" and "triton" build first on a 256-sample batch and
             report it as "compile_seconds" (not in "first_seconds" nor in the peak)
  dense      the plain vectorised autograd form (one B x P x B tensor), skipped where its
             estimated memory exceeds --dense-max-gb
  floor      the arithmetic any exact method must do: three B x B x d products
             (similarities and the gradient's two) plus one sigmoid over B x P x B
             elements; "ratio_to_floor" = blockwise seconds / floor seconds.
With --loss NAME (other than rsk) or --mix, the one implementation measured is
  make_loss  rskdist.loss.make_loss(NAME, mix=MIX) called on the batch; it draws its own
             plan of all same-class pairs (mix simix/embedding), once per --mix value
Each measurement runs in its own process so that peak memory (ru_maxrss on CPU,
max_memory_allocated on CUDA) is that measurement's alone; "peak_added_mb" is the peak
above what the process held once the inputs existed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KERNEL_IMPLS = ("blockwise", "eager", "native", "triton")  # rsk_loss itself, by impl=
PUBLISHED_PER_QUERY_SECONDS = 195.0  # docs/method.md: published code, B=4000, m=4, d=512, 2 CPU cores


def _rss_peak_mb() -> float:
    """Peak resident memory: VmHWM (resettable, see _reset_rss_peak) where Linux has it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_rss_peak() -> None:
    """Forget the peak so far (Linux: "5" to clear_refs), e.g. the compiler's, once per process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(batch: int, m: int, dim: int, device: str, dtype, seed: int, order: str = "random"):
    """Random unit embeddings and m images per class: in random batch order, or in groups
    of m images of a class ("sampler", the order rskdist/data/sampler.py gives a batch)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype)
    labels = torch.arange(batch) // m
    if order == "random":
        labels = labels[torch.randperm(batch, generator=gen)]
    return emb, labels.to(device)


def _run_floor(emb, batch: int, m: int, mix_factor: float, device: str) -> None:
    """Three B x B x d products and one sigmoid over B x P x B, in row blocks."""
    import torch

    num = int(batch * mix_factor)
    pos = int(m * mix_factor) - 1
    rows = max(1, min(batch, (1 << 24) // batch))
    buf = torch.empty(rows, batch, device=device, dtype=torch.float32)
    emb32 = emb.float()
    for r0 in range(0, batch, rows):
        q = emb32[r0 : r0 + rows]
        sim = torch.mm(q, emb32.T, out=buf[: q.shape[0]])
        torch.mm(sim, emb32)  # d emb_q
        torch.mm(sim.T, q)  # d emb_keys
    # Sigmoid over B x P x N elements (N = B + V with SiMix), in chunks of <= 16M.
    total = num * pos * num
    chunk = torch.empty(min(total, 1 << 24), device=device)
    done = 0
    while done < total:
        n = min(chunk.numel(), total - done)
        torch.sigmoid(chunk[:n], out=chunk[:n])
        done += n


def measure(args) -> dict:
    """Run in a child process: one implementation at one size."""
    import torch

    from rskdist.loss import BACKENDS, rsk_loss, simix_plan
    from rskdist.loss.reference import rsk_loss_dense
    from rskdist.loss.simix import materialise_mix

    torch.manual_seed(0)
    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    emb, labels = _inputs(args.batch, args.m, args.dim, device, dtype, args.seed, args.order)
    mix = simix_plan(labels, generator=torch.Generator().manual_seed(args.seed)) if args.simix else None
    mix_factor = (args.batch + (0 if mix is None else mix[0].shape[0])) / args.batch

    if args.impl == "make_loss":
        from rskdist.loss import make_loss

        classes = args.num_classes or args.batch // args.m
        module = make_loss(args.loss, mix=args.mix_mode, num_classes=classes, embed_dim=args.dim).to(device)
        # The loss draws its plan from a generator seeded like this one: the same plan.
        mix = None if args.mix_mode == "none" else simix_plan(labels,
                                                              generator=torch.Generator().manual_seed(args.seed))

    def run_once():
        if args.impl == "make_loss":
            x = emb.detach().requires_grad_(True)
            loss = module(x, labels, generator=torch.Generator().manual_seed(args.seed))
            loss.backward()
            return float(loss)
        if args.impl == "floor":
            _run_floor(emb, args.batch, args.m, mix_factor, device)
            return None
        x = emb.detach().requires_grad_(True)
        if args.impl in KERNEL_IMPLS:
            impl = "auto" if args.impl == "blockwise" else args.impl
            loss = rsk_loss(x, labels, mix=mix, block_size=args.block_size, impl=impl)
        else:
            feats, labs = x.float(), labels
            if mix is not None:
                feats = torch.cat([feats, materialise_mix(feats, *mix)])
                labs = torch.cat([labels, labels[mix[0][:, 0]]])
            loss = rsk_loss_dense(feats, labs)
        loss.backward()
        return float(loss)

    compile_seconds = None
    if args.impl in ("native", "triton"):
        # Compile once on a small batch (dynamic shapes: the same code serves every size), so
        # times and peak memory are the kernel's; the one-off cost is reported on its own.
        t0 = time.perf_counter()
        small = emb[:256].detach().requires_grad_(True)
        # block_size 96 != 256 items: equal sizes would share one symbol and recompile later.
        rsk_loss(small, labels[:256], impl=args.impl, block_size=96).backward()
        _sync(device)
        compile_seconds = round(time.perf_counter() - t0, 2)
        _reset_rss_peak()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now_mb()
    times, value = [], None
    for i in range(args.repeats + 1):  # first call is the cold one
        _sync(device)
        t0 = time.perf_counter()
        value = run_once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak_added = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_added = _rss_peak_mb() - base
    warm = times[1:] or times
    return {
        "impl": args.impl, "batch": args.batch, "m": args.m, "dim": args.dim, "simix": bool(args.simix),
        "order": args.order,
        "virtual": 0 if mix is None else int(mix[0].shape[0]), "device": device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "seconds": round(statistics.median(warm), 4),
        "first_seconds": round(times[0], 4), "peak_added_mb": round(peak_added, 1),
        "loss": value, **({"loss_name": args.loss, "mix": args.mix_mode} if args.impl == "make_loss" else {}),
        **({"compile_seconds": compile_seconds} if compile_seconds is not None else {}),
        **({"runs": BACKENDS.resolve("auto" if args.impl == "blockwise" else args.impl, torch.device(device))}
           if args.impl in KERNEL_IMPLS else {}),
    }


def _dense_estimate_gb(batch: int, m: int, mix_factor: float) -> float:
    num = batch * mix_factor
    pos = m * mix_factor - 1
    # About five float32 tensors of B x P x N live between forward and backward.
    return 5 * 4 * num * pos * num / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--m", type=int, default=4, help="images per class")
    parser.add_argument("--order", choices=["random", "sampler"], default="random",
                        help="labels in random batch order, or in groups of m (as the class-balanced sampler gives)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--simix", action="store_true", help="mix all same-class pairs (SiMix)")
    parser.add_argument("--loss", default="rsk", help="loss name for make_loss (rsk or a baseline)")
    parser.add_argument("--mix", nargs="+", default=None, choices=["none", "simix", "embedding"],
                        help="measure make_loss(--loss, mix=...) once per value")
    parser.add_argument("--num-classes", type=int, default=0, help="proxy losses: classes (0 = batch / m)")
    parser.add_argument("--impls", nargs="+", default=["floor", "blockwise", "dense"],
                        choices=["floor", "blockwise", "eager", "native", "triton", "dense"])
    parser.add_argument("--repeats", type=int, default=2, help="warm repeats after one cold call")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--dense-max-gb", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mix-mode", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return 0

    for batch in args.sizes:
        if batch % args.m:
            parser.error(f"batch {batch} is not a multiple of m={args.m}")
        if args.loss != "rsk" or args.mix:
            for mix_mode in args.mix or ["none"]:
                _emit(args, _child(args, "make_loss", batch, mix_mode))
            continue
        mix_factor = 1.0 + ((args.m - 1) / 2 if args.simix else 0.0)
        results = {}
        for impl in args.impls:
            if impl == "dense" and _dense_estimate_gb(batch, args.m, mix_factor) > args.dense_max_gb:
                rec = {"impl": impl, "batch": batch, "skipped": f"needs ~{_dense_estimate_gb(batch, args.m, mix_factor):.0f} GB"
                       f" > --dense-max-gb {args.dense_max_gb}"}
            else:
                rec = _child(args, impl, batch)
            results[impl] = rec
            if impl in KERNEL_IMPLS and "seconds" in rec:
                if "floor" in results and "seconds" in results["floor"]:
                    rec["floor_seconds"] = results["floor"]["seconds"]
                    rec["ratio_to_floor"] = round(rec["seconds"] / results["floor"]["seconds"], 3)
                rec["speedup_vs_published_per_query"] = round(PUBLISHED_PER_QUERY_SECONDS / rec["seconds"], 1)
            if impl == "dense" and "seconds" in rec and "seconds" in results.get("blockwise", {}):
                rec["blockwise_speedup"] = round(rec["seconds"] / results["blockwise"]["seconds"], 3)
            _emit(args, rec)
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _emit(args, rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def _child(args, impl: str, batch: int, mix_mode: str = "none") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--batch", str(batch),
           "--m", str(args.m), "--dim", str(args.dim), "--device", args.device, "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--loss", args.loss, "--mix-mode", mix_mode,
           "--num-classes", str(args.num_classes), "--order", args.order]
    if args.simix:
        cmd.append("--simix")
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "batch": batch, "error": f"timed out after {args.timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"impl": impl, "batch": batch, "error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    sys.exit(main())
