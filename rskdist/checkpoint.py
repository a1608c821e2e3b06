"""Model weights out of a training checkpoint, for evaluation and export.

A run writes DeepSpeed checkpoints under RUN/checkpoints/<tag>/ and the name of the
newest complete one in RUN/checkpoints/latest (rskdist/trainer.py). ZeRO-3 partitions
the weights over the ranks' files; DeepSpeed's consolidation rebuilds them.
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run folder, a checkpoints folder or a tag folder."""
    path = Path(path)
    for folder in (path / "checkpoints", path):
        latest = folder / "latest"
        if latest.is_file():
            return folder, latest.read_text().strip()
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise ValueError(
        f"checkpoint: no checkpoint at {path}; pass a run folder (runs/NAME), its checkpoints/ "
        f"folder or one checkpoints/<tag> folder written by rskdist/train.py"
    )


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict (fp32 where the run kept fp32 master weights)."""
    folder, tag = resolve_checkpoint(path)
    tag_dir = folder / tag
    single = tag_dir / "mp_rank_00_model_states.pt"
    if single.is_file():
        # Written by our own training run (DeepSpeed pickles its config next to the
        # weights, so weights_only loading cannot read it); never load files of unknown origin.
        state = torch.load(single, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    if any(tag_dir.glob("zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))
    raise ValueError(f"checkpoint: {tag_dir} holds no model states (an interrupted save?); use an earlier tag")
