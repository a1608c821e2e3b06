"""run.timeout_minutes reaches the process group, and a timed-out collective names it."""

import os
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rskdist import launch, train
from rskdist.config import load_config, validate


class _Stop(Exception):
    pass


def test_timeout_minutes_is_the_process_group_timeout(monkeypatch):
    import deepspeed

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(_Stop):
        train.main(["--config", "configs/debug.yaml", "run.timeout_minutes=2.5"])
    assert seen["timeout"] == timedelta(minutes=2.5)


def test_timeout_minutes_must_be_positive():
    cfg = load_config("configs/debug.yaml", ["run.timeout_minutes=0"])
    with pytest.raises(ValueError, match="run.timeout_minutes must be > 0"):
        validate(cfg, world_size=1, check_paths=False)


def _worker(rank, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=2))
    try:
        if rank == 0:
            try:
                dist.barrier()  # rank 1 never joins
            except RuntimeError as exc:
                message = launch.collective_timeout_message(exc, 0.05, rank) or f"not recognised: {exc}"
                with open(os.path.join(out_dir, "message"), "w") as f:
                    f.write(message)
        else:
            time.sleep(8)  # stays alive past rank 0's timeout
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gloo_timeout_message_names_the_setting(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=2, join=True)
    message = (tmp_path / "message").read_text()
    assert message.startswith("error: rank 0: a collective timed out after run.timeout_minutes=0.05"), message
    assert launch.collective_timeout_message(RuntimeError("shape mismatch"), 30, 0) is None
