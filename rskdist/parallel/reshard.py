"""Loading a checkpoint on another world size: optimizer state and weight averages re-sharded.

ZeRO 1-3 split the fp32 master weights and the optimizer's moments over the ranks that
saved them (ZeRO-3 the weights too), one file per rank. A checkpoint saved on W ranks is
loaded on W' != W through DeepSpeed's universal checkpoint: rank 0 converts the folder
once (`deepspeed.checkpoint.ds_to_universal`: per parameter, the whole fp32 weight and
each optimizer moment, plus the optimizer's step) into <tag>/universal/, and every rank
then takes its new partition from it (`checkpoint.load_universal`; two defects of
DeepSpeed 0.19's ZeRO-3 load are mended after it: each parameter group gets its own saved
settings back, and its own Adam step counter). The conversion is a cache: written under a
temporary name and renamed when whole, reused by a later resume, pruned with its
checkpoint. ZeRO-0 keeps the whole optimizer state on every rank (fp32 and bf16 alike):
its files load on any world size as they are.

The ZeRO-3 weight average (rskdist/parallel/ema.py) holds each rank's partitions, one
file per rank: `reshard_partitions` joins the saved ranks' partitions of each parameter
and cuts this rank's out of it, as ZeRO-3 partitions (ceil(numel / W) elements per rank,
the last one padded).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from rskdist.parallel.layout import BatchLayout

UNIVERSAL = "universal"  # the converted copy, a sub-folder of the checkpoint's tag folder
_OPTIM_FILES = "*zero_pp_rank_*_optim_states.pt"  # ZeRO 1-3 (and bf16_ ones): one per rank that saved


def saved_world_size(tag_dir: Path) -> int | None:
    """The number of ranks that saved the checkpoint in `tag_dir`: its manifest's count
    (rskdist/checkpoint.py), else the count of ZeRO optimizer files; None when neither says."""
    manifest = tag_dir / "complete.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["world_size"])
        except (OSError, ValueError, KeyError):
            pass
    files = list(tag_dir.glob(_OPTIM_FILES))
    return len(files) or None


def partitioned(engine) -> bool:
    """Does the engine's optimizer state live in per-rank partitions (ZeRO 1-3)?"""
    return engine.zero_optimization_stage() > 0


def load_on_new_world(engine, folder: Path, tag: str, *, saved_world: int, rank: int, world_size: int,
                      broadcast, barrier) -> tuple[str, dict]:
    """Load checkpoint `folder/tag`, saved on `saved_world` ranks, into `engine` on this
    world size, through the universal copy (made by rank 0 when missing). `broadcast`
    (an object from rank 0 to all) and `barrier` are the group's. Returns what
    `engine.load_checkpoint` does: (load path, client state)."""
    tag_dir = folder / tag
    problem = None
    if rank == 0:
        problem = _missing_files(tag_dir, saved_world)
        if problem is None and not (tag_dir / UNIVERSAL).is_dir():
            problem = _convert(tag_dir, world_size)
    problem = broadcast(problem)
    if problem:
        raise ValueError(problem)
    barrier()
    if not (tag_dir / UNIVERSAL).is_dir():  # this rank's node holds another copy of the folder
        raise ValueError(f"resume: rank {rank} cannot see {tag_dir / UNIVERSAL}, written by rank 0 to resume on "
                         f"{world_size} ranks a checkpoint of {saved_world}: give every node the same checkpoints "
                         f"folder (a shared filesystem), or resume on {saved_world} ranks")
    config = engine._config  # DeepSpeed reads the switch at load time; off again after, for later loads
    config.load_universal_checkpoint = True
    try:
        loaded = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
    finally:
        config.load_universal_checkpoint = False
    if engine.zero_optimization_stage() == 3:
        _restore_group_settings(engine.optimizer.param_groups, tag_dir / UNIVERSAL)
    # DeepSpeed's ZeRO-3 universal load hands every group's state the same `step` tensor,
    # which torch's Adam then advances in place once per group: each its own copy.
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return loaded


def _restore_group_settings(groups: list[dict], universal: Path) -> None:
    """Give each optimizer parameter group its own saved settings (lr, weight decay, role,
    ...): DeepSpeed's ZeRO-3 universal load (0.19) gives every group the first group's,
    which would move a frozen backbone's LR of 0, or 100x proxy LR, onto the other groups.
    ZeRO 1-2 restore each group's own."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",  # DeepSpeed's own file
                       weights_only=False)[OPTIMIZER_STATE_DICT]["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"resume: the universal checkpoint {universal} has {len(saved)} optimizer parameter groups, "
                         f"this run {len(groups)} (ZeRO-3 sub-groups split differently on this world size?); resume "
                         f"on the world size that saved it, or raise deepspeed.extra.zero_optimization.sub_group_size")
    for group, settings in zip(groups, saved):
        group.update({key: value for key, value in settings.items() if key != "params"})


def _missing_files(tag_dir: Path, saved_world: int) -> str | None:
    """Why the conversion cannot run here (some saving rank's optimizer file is not in the folder)."""
    found = len(list(tag_dir.glob(_OPTIM_FILES)))
    if found == saved_world:
        return None
    return (f"resume: {tag_dir} was saved on {saved_world} ranks but holds the ZeRO optimizer files of {found} "
            f"(each node wrote its own folder?); a resume on another world size needs them all in one folder: "
            f"copy them together (or use a shared filesystem), or resume on {saved_world} ranks")


def _convert(tag_dir: Path, world_size: int) -> str | None:
    """Write tag_dir/universal (rank 0); the reason on failure, else None."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out, tmp = tag_dir / UNIVERSAL, tag_dir / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion cut short earlier
    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           # Our checkpoints carry no universal_checkpoint_info (no tensor or
                           # pipeline parallelism): the conversion takes the default one.
                           inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars
            ds_to_universal(args)
    except Exception as exc:  # noqa: BLE001 - reported to every rank, with DeepSpeed's own output
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"resume: DeepSpeed's universal conversion of {tag_dir} failed ({type(exc).__name__}: {exc}); "
                f"its output:\n{log.getvalue()[-2000:]}\nresume on the world size that saved it")
    tmp.rename(out)
    print(f"resume: converted {tag_dir.name} to DeepSpeed's universal form ({out}) to load it on {world_size} "
          f"ranks", file=sys.stderr, flush=True)
    return None


def reshard_partitions(saved: list[list[torch.Tensor]], numels: list[int], *, rank: int,
                       world_size: int) -> list[torch.Tensor]:
    """This rank's ZeRO-3 partitions of each parameter, from every saved rank's partitions.

    saved[r][i] is saved rank r's partition of parameter i (ceil(numel_i / W) elements,
    padding at the end of the last); numels[i] the parameter's size. Returns, per
    parameter, this rank's ceil(numel_i / world_size) elements, zero-padded."""
    out = []
    for i, numel in enumerate(numels):
        whole = torch.cat([parts[i].reshape(-1) for parts in saved])[:numel]
        size = math.ceil(numel / world_size)
        piece = whole[rank * size : (rank + 1) * size]
        out.append(torch.cat([piece, piece.new_zeros(size - len(piece))]))
    return out


def world_change(saved: BatchLayout, now: BatchLayout, *, zero_stage: int) -> str | None:
    """One line saying what changed between the layout a checkpoint was saved with and
    this run's (rskdist/parallel/layout.py), or None when the world size is the same."""
    if saved.world_size == now.world_size:
        return None
    parts = [f"world size {saved.world_size} -> {now.world_size}",
             f"local batch {saved.local_batch} -> {now.local_batch}",
             f"chunks per rank {saved.num_chunks} -> {now.num_chunks} (of {now.chunk_size})",
             "same global batches, augmentation, mixing plans, LR schedule and step count"]
    if zero_stage > 0:
        parts.append(f"ZeRO-{zero_stage} optimizer state re-sharded from {saved.world_size} to "
                     f"{now.world_size} ranks (DeepSpeed universal checkpoint)")
    if saved.chunk_starts() != now.chunk_starts():
        parts.append("chunks now start at other places of the global batch (data.chunk_size does not divide "
                     "both local batches): dropout and drop-path masks differ from the uninterrupted run's")
    if now.local_batch > saved.local_batch:
        parts.append("each rank now holds more images in host memory and more embeddings; "
                     "activation memory per chunk is unchanged")
    return "resume on another world size: " + "; ".join(parts)
