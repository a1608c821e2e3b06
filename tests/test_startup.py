"""rskdist/startup.py: what a run works out once before the trainer exists (the batch
layout, the run's data) and the start-up check that needs the device (the loss fits this
rank's memory), agreed by every rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launching import run_cmd
from rskdist.config import load_config
from rskdist.startup import prepare, resolve

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
CPU = torch.device("cpu")
# Contrastive loss on 8192 images: every rank computes its B x B matrices whole, ~2.7 GB.
TOO_BIG = ["loss.name=contrastive", "loss.mix=none", "data.global_batch=8192", "data.synthetic_classes=2048"]


def _node_memory(monkeypatch, gigabytes: float) -> None:
    """What psutil says this node has available (the CPU ranks' share of it is checked)."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(gigabytes * 2**30)))


def test_resolve_lays_out_the_batch_and_reads_the_data_once():
    cfg = load_config(DEBUG, ["data.val_classes=8", "data.chunk_size=5"])
    setup = resolve(cfg, world_size=2)
    lay = setup.layout
    assert (lay.global_batch, lay.world_size, lay.m, lay.chunk_size) == (64, 2, 4, 5)
    assert (lay.local_batch, lay.classes_per_rank, lay.num_chunks) == (32, 8, 7)
    data = setup.data
    assert data.num_classes == cfg.data.synthetic_classes and len(data.held_out) == 8
    assert len(data.train_labels) == cfg.data.synthetic_classes - 8 and data.eval_splits == ["val", "test"]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        resolve(cfg, world_size=3)


def test_a_loss_that_cannot_fit_is_refused_before_the_trainer(monkeypatch):
    cfg = load_config(DEBUG, TOO_BIG)
    _node_memory(monkeypatch, 64)
    prepare(cfg, world_size=1, device=CPU)
    _node_memory(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"loss.name=contrastive on a global batch of 8192 needs about .* B x B "
                                         r"matrices, more than the 2.1 GB available"):
        prepare(cfg, world_size=1, device=CPU)
    with pytest.raises(ValueError, match="more than the 1.1 GB available"):  # two ranks share the node
        prepare(cfg, world_size=1, device=CPU, local_world_size=2)


def _prepare_worker(rank, world, init, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import psutil

    # Rank 1 alone sees too little memory (another job on its node, a smaller GPU).
    gigabytes = 64 if rank == 0 else 1
    psutil.virtual_memory = lambda: SimpleNamespace(available=gigabytes * 2**30)
    try:
        prepare(load_config(DEBUG, TOO_BIG), world_size=world, device=CPU, group=dist.group.WORLD)
        verdict = "started"
    except ValueError as exc:
        verdict = str(exc)
    torch.save(verdict, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()  # both ranks got here: nobody went on alone into a collective
    dist.destroy_process_group()


@pytest.mark.distributed
def test_one_rank_refused_stops_every_rank_with_its_reason(tmp_path):
    mp.spawn(_prepare_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    assert second.startswith("loss.name=contrastive on a global batch of 8192") and "1.1 GB available" in second
    assert first == f"rank 1 cannot run this setup (every rank stops): {second}"


@pytest.mark.integration
def test_train_py_refuses_the_loss_before_building_anything(tmp_path):
    """Through the entry point: one line, exit 2, no run folder written."""
    code = ("import sys, types, psutil; psutil.virtual_memory = lambda: types.SimpleNamespace(available=2**30); "
            "sys.argv[0] = 'rskdist/train.py'; from rskdist.train import main; sys.exit(main(sys.argv[1:]))")
    proc = run_cmd([sys.executable, "-c", code, "--config", DEBUG, f"run.output_dir={tmp_path}", *TOO_BIG],
                   check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: loss.name=contrastive on a global batch of 8192" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # no run folder, no checkpoint
