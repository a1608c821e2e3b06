"""A trained run folder for tests: two steps of configs/debug.yaml on a shard folder, in one
process through rskdist/train.py (~30 s here), with a final evaluation."""

import sys
from pathlib import Path

from launching import run_cmd


def train_two_steps(output_dir, name: str, shards: str, *overrides: str) -> Path:
    """Train run `output_dir/name` on `shards` for 2 steps (`overrides` last); returns its folder."""
    args = [
        f"run.output_dir={output_dir}", f"run.name={name}", "run.max_steps=2", "run.log_every=1",
        "run.loggers=[]", "data.source=shards", f"data.root={shards}", "data.global_batch=16",
        "data.num_workers=0", "deepspeed.zero_stage=0", "eval.every_epochs=0", "eval.ks=[1, 2]", *overrides,
    ]
    run_cmd([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", *args], timeout=600)
    return Path(output_dir) / name
