"""What a run works out from its whole config, once, before the trainer exists.

This is the one place that reads across the config's sections; the builders below it
(rskdist/build.py) and the Validator take their own section or plain keywords. train.py
calls `prepare` on every rank once the process group and device exist, right after the
config checks of `rskdist.config.validate`, and hands the result to the Trainer; tools
that build a run's parts (tools/evaluate.py, tools/estimate_memory.py, tools/proxy_study.py)
resolve them here too, so they see the run's own data, layout and classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rskdist.build import RunData
from rskdist.comm import gather_objects, group_rank_and_size
from rskdist.config import Config
from rskdist.parallel.layout import BatchLayout


@dataclass(frozen=True)
class RunSetup:
    """The parts of a run that follow from the config and the world size."""

    layout: BatchLayout  # how the global batch splits over the ranks and their forward chunks
    data: RunData  # classes, held-out classes, store reading; opens the streams


def run_data(cfg: Config) -> RunData:
    """The data of a config (its data section, the model's image size, the run's seed and store retries)."""
    return RunData(cfg.data, image_size=cfg.model.image_size, seed=cfg.run.seed, retries=cfg.run.store_retries)


def batch_layout(cfg: Config, world_size: int) -> BatchLayout:
    """The config's global batch laid out over `world_size` ranks (raises ValueError with the
    fix when it cannot be split)."""
    d = cfg.data
    return BatchLayout(global_batch=d.global_batch, world_size=world_size, m=d.m, chunk_size=d.chunk_size)


def resolve(cfg: Config, *, world_size: int) -> RunSetup:
    return RunSetup(layout=batch_layout(cfg, world_size), data=run_data(cfg))


def prepare(cfg: Config, *, world_size: int, device: torch.device, local_world_size: int = 1,
            group=None) -> RunSetup:
    """`resolve`, then the start-up checks that need the device: the loss must fit in the
    memory this rank has (`check_loss_memory`). The ranks of `group` agree on the verdict
    (one all-gather): each rank measures its own device or share of the node, so one rank
    may be refused while the others are not; then every rank stops here with that rank's
    reason, instead of the others going on into the engine's collectives to wait for it."""
    setup = resolve(cfg, world_size=world_size)
    try:
        check_loss_memory(cfg, setup, device=device, local_world_size=local_world_size)
        problem = ""
    except ValueError as exc:
        problem = str(exc)
    refused = [(rank, text) for rank, text in enumerate(gather_objects(problem, group)) if text]
    if refused:
        rank, text = refused[0]
        me = group_rank_and_size(group)[0]
        raise ValueError(text if rank == me else f"rank {rank} cannot run this setup (every rank stops): {text}")
    return setup


def check_loss_memory(cfg: Config, setup: RunSetup, *, device: torch.device, local_world_size: int = 1) -> None:
    """Refuse, before the first step, a loss call that cannot fit: a baseline's B x B
    matrices (every rank computes it whole), RS@k's bounded buffers with the backend that
    will run on this device (rskdist/loss/memory.py)."""
    from rskdist.loss import BACKENDS, check_loss_fits

    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:  # the ranks of a node share its memory
        import psutil

        available = psutil.virtual_memory().available // max(1, local_world_size)
    loss, layout = cfg.loss, setup.layout
    impl = BACKENDS.resolve(loss.options.get("impl", "auto"), device) if loss.name == "rsk" else "auto"
    check_loss_fits(loss.name, layout.global_batch, embed_dim=cfg.model.embed_dim,
                    num_classes=setup.data.num_classes, mix=loss.mix, available_bytes=available, per_class=layout.m,
                    mix_pairs_per_class=loss.simix_per_class or None, world_size=layout.world_size, impl=impl,
                    device_type=device.type, block_size=loss.block_size or None)
