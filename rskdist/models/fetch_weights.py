"""Download a backbone's pretrained weights and save them as one safetensors file.

Run on a machine with internet, copy the file to the offline machine, pass it as
`model.pretrained=/path/to/file.safetensors`:

    python -m rskdist.models.fetch_weights vit_base_patch16_224.augreg_in21k --out vitb16.safetensors
    python -m rskdist.models.fetch_weights open_clip:ViT-L-14 --pretrained openai --out vitl14.safetensors

The file holds the backbone's state dict (timm model without classifier, or the
open_clip visual tower) plus metadata (backbone, tag, mean, std, native image size and,
for open_clip, quick_gelu) that create_model uses to restore the matching preprocessing
and architecture.
"""

from __future__ import annotations

import argparse
import json
import os

from .factory import create_model
from .weights import METADATA_KEY, OPEN_CLIP_PREFIX


def fetch(backbone: str, out: str, pretrained: str = "hub") -> str:
    """Build `backbone` with hub weights and save its backbone state dict to `out`."""
    return save_weights(create_model(backbone, pretrained=pretrained), out, pretrained=pretrained)


def save_weights(model, out: str, *, pretrained: str = "") -> str:
    """Save a RetrievalModel's backbone as a weights file `model.pretrained` reads back: the
    state dict plus the metadata create_model restores (backbone, tag, mean, std, native
    image size and, for open_clip, the tag and the activation)."""
    from safetensors.torch import save_file

    backbone = model.info["backbone"]
    meta = {"backbone": backbone, "pretrained": pretrained, "mean": list(model.mean), "std": list(model.std),
            "image_size": model.image_size}
    if backbone.startswith(OPEN_CLIP_PREFIX):
        meta["open_clip_tag"] = pretrained
        meta["quick_gelu"] = bool(model.info.get("quick_gelu"))
    # clone: safetensors refuses tensors that share storage.
    state = {k: v.detach().clone().contiguous() for k, v in model.backbone.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={METADATA_KEY: json.dumps(meta)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="timm name (with optional .tag) or open_clip:<config>")
    parser.add_argument("--pretrained", default="hub", help="'hub' (timm default tag) or a tag, e.g. openai")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error("--out must end with .safetensors")
    path = fetch(args.backbone, args.out, args.pretrained)
    print(f"saved {path}; use: model.backbone={args.backbone} model.pretrained={os.path.abspath(path)}")


if __name__ == "__main__":
    main()
