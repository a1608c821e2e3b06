"""A trained run folder for tests: two steps of configs/debug.yaml on a shard folder, in one
process through rskdist/train.py (~30 s here), with a final evaluation."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_two_steps(output_dir, name: str, shards: str, *overrides: str) -> Path:
    """Train run `output_dir/name` on `shards` for 2 steps (`overrides` last); returns its folder."""
    args = [
        f"run.output_dir={output_dir}", f"run.name={name}", "run.max_steps=2", "run.log_every=1",
        "run.loggers=[]", "data.source=shards", f"data.root={shards}", "data.global_batch=16",
        "data.num_workers=0", "deepspeed.zero_stage=0", "eval.every_epochs=0", "eval.ks=[1, 2]", *overrides,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(output_dir) / name
