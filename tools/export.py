#!/usr/bin/env python
"""Export a trained run's model: uint8 images in, L2-normalised embeddings out.

    python tools/export.py --checkpoint runs/demo --format onnx --out demo.onnx
    python tools/export.py --checkpoint runs/demo --tag best --format torchscript --out demo.ts
    python tools/export.py --checkpoint runs/demo --format safetensors --out demo.safetensors

The exported model takes uint8 [batch, 3, S, S] (RGB, NCHW, any batch size) at the run's
image size, already resized and centre-cropped (the card says how); the mean/std
normalisation is inside. A model card, FILE.json, goes beside it: backbone, image size,
mean/std, embedding size, the run's config hash and final metrics, and the architecture
(a safetensors export loads back with rskdist.load(FILE)). docs/search.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from rskdist.inference import EXPORT_FORMATS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder or one checkpoint folder")
    p.add_argument("--tag", help="which checkpoint of the run: latest (default), best or a step tag")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output file; the model card is written to OUT.json")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    import rskdist
    from rskdist.inference import card_path, export, run_provenance

    args = build_parser().parse_args(argv)
    try:
        model = rskdist.load(args.checkpoint, args.tag, device="cpu")
        out = export(model, args.out, fmt=args.format, provenance=run_provenance(args.checkpoint, args.tag))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    card = json.loads(card_path(out).read_text())
    print(f"wrote {out} and {card_path(out)}: {card['backbone']}, uint8 [batch, 3, {card['image_size']}, "
          f"{card['image_size']}] -> float32 [batch, {card['embedding_size']}]")
    return card


if __name__ == "__main__":
    main()
