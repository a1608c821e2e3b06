"""A run on an object store end to end, against a real S3 server (moto on loopback): shards
from s3://, the run folder on s3://, the staging folder deleted, a resume on 2 ranks from the
store alone with the losses of a local-disk run; and a store that dies mid-run."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from launching import ROOT, deepspeed_cmd, launch_env, run_cmd

from rskdist.checkpoint import read_pointer, verify_checkpoint
from rskdist.data.shards import upload_shards
from rskdist.store.fs import Store
from s3server import S3Server, s3_environment
from test_data_stream import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

COMMON = ["--config", "configs/debug.yaml", "run.log_every=1", "run.save_every=2", "run.loggers=[]",
          "run.name=store", "data.source=shards", "data.global_batch=16", "eval.every_epochs=-1",
          "deepspeed.zero_stage=2", "run.store_retries=3"]


def _train_2proc(*overrides):
    return run_cmd(deepspeed_cmd(*COMMON, *overrides), timeout=600)


def _losses(metrics_text: str) -> dict[int, float]:
    records = [json.loads(line) for line in metrics_text.splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), [6] * 16, samples_per_shard=20, image_size=32)


def test_store_run_resumes_on_fresh_nodes_with_local_losses(s3_server, shards, tmp_path):
    url = s3_server.make_bucket("rsk-run")
    upload_shards(shards, f"{url}/shards")
    local = tmp_path / "local"
    _train_2proc(f"run.output_dir={local}", f"data.root={shards}", "run.max_steps=6", "data.num_workers=0")
    reference = _losses((local / "store" / "metrics.jsonl").read_text())

    store_args = [f"run.output_dir={url}/runs", f"data.root={url}/shards", "data.num_workers=1",
                  f"data.cache_dir={tmp_path / 'cache'}"]
    stage = tmp_path / "stage-a"
    _train_2proc(*store_args, f"run.stage_dir={stage}", "run.max_steps=4")
    store = Store(url)
    run_url = f"{url}/runs/store"
    assert store.cat(f"{run_url}/checkpoints/latest").decode() == "step00000004"
    shutil.rmtree(stage)  # the nodes are gone with their disks
    shutil.rmtree(tmp_path / "cache")
    proc = _train_2proc(*store_args, f"run.stage_dir={tmp_path / 'stage-b'}", "run.max_steps=6",
                        "data.read_mode=ranged")
    assert "resumed from" in proc.stdout and "step00000004" in proc.stdout
    resumed = _losses(store.cat(f"{run_url}/metrics.jsonl").decode())
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    # The store's latest names a whole checkpoint: every file of its manifest, at its size.
    assert store.cat(f"{run_url}/checkpoints/latest").decode() == "step00000006"
    manifest = json.loads(store.cat(f"{run_url}/checkpoints/step00000006/complete.json"))
    listed = store.listing(f"{run_url}/checkpoints/step00000006")
    assert {n: e["size"] for n, e in manifest["files"].items()}.items() <= listed.items()
    assert store.exists(f"{run_url}/summary.json") and store.exists(f"{run_url}/config.yaml")
    # The credentials appear nowhere: not in the output, the staging folder or the store's run folder.
    secrets = [os.environ["AWS_ACCESS_KEY_ID"].encode(), os.environ["AWS_SECRET_ACCESS_KEY"].encode()]
    texts = [proc.stdout.encode(), proc.stderr.encode()]
    texts += [p.read_bytes() for p in (tmp_path / "stage-b").rglob("*") if p.is_file()]
    texts += [store.fs.cat_file(key) for key in store.fs.find(store.path(run_url))]
    assert len(texts) > 10 and not any(secret in text for secret in secrets for text in texts)


def test_store_dying_mid_run_retries_then_stops_with_the_last_checkpoint_intact(shards, tmp_path):
    server = S3Server(tmp_path / "moto.log")
    try:
        with s3_environment(server):
            url = server.make_bucket("rsk-dies")
            upload_shards(shards, f"{url}/shards")
            stage = tmp_path / "stage"
            cmd = [sys.executable, "rskdist/train.py", *COMMON, f"run.output_dir={url}/runs",
                   f"run.stage_dir={stage}", f"data.root={url}/shards", "data.read_mode=ranged",
                   "data.num_workers=0", "run.max_steps=400", "deepspeed.zero_stage=0"]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=launch_env())
            store, deadline = Store(url), time.monotonic() + 300
            try:
                while read_pointer(stage / "store" / "checkpoints", "latest") is None or not store.exists(
                        f"{url}/runs/store/checkpoints/latest"):
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                    time.sleep(0.2)
            except BaseException:
                proc.kill()
                raise
            server.stop()  # the store goes away mid-run
            started = time.monotonic()
            out, err = proc.communicate(timeout=300)
    finally:
        server.stop()
    assert proc.returncode != 0
    assert time.monotonic() - started < 120
    assert "did not answer" in err and "after 3 tries" in err and f"{url}/shards" in err, err[-3000:]
    assert "Traceback" not in err.split("did not answer")[0].splitlines()[-1]
    # Nothing lost: the staging folder's latest names a checkpoint whose every file is there.
    folder = stage / "store" / "checkpoints"
    tag = read_pointer(folder, "latest")
    assert tag is not None and verify_checkpoint(folder / tag, 0) is None
    assert (folder / tag / "complete.json").is_file()


def test_store_gone_for_uploads_ends_the_job_listing_what_is_missing(tmp_path):
    """The data is local, the store dies after the first upload: training finishes, the end of
    the job waits for the uploads, then fails naming what is not on the store; the staging
    folder holds every checkpoint whole."""
    server = S3Server(tmp_path / "moto.log")
    try:
        with s3_environment(server):
            url = server.make_bucket("rsk-uploads")
            stage = tmp_path / "stage"
            cmd = [sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", "run.loggers=[]",
                   "run.name=up", f"run.output_dir={url}/runs", f"run.stage_dir={stage}", "run.save_every=2",
                   "run.max_steps=12", "run.store_retries=2", "run.upload_wait_minutes=1", "eval.every_epochs=-1",
                   "deepspeed.zero_stage=0"]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=launch_env())
            store, deadline = Store(url), time.monotonic() + 300
            try:
                while not store.exists(f"{url}/runs/up/checkpoints/latest"):
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                    time.sleep(0.2)
            except BaseException:
                proc.kill()
                raise
            server.stop()
            out, err = proc.communicate(timeout=400)
    finally:
        server.stop()
    assert proc.returncode == 2, err[-3000:]
    assert f"the run folder on {url}/runs/up is behind its staging copy {stage / 'up'}" in err
    summary = err[err.index("is behind its staging copy"):]
    assert "checkpoint step00000012 (and " in summary and "older save(s) it supersedes): upload s3://" in summary
    assert "the run's records (metrics.jsonl, config.yaml, ...) neither" in summary
    assert "rerun the same command on this node to upload it" in summary and len(summary) < 1200
    assert err.count("warning: rank 0: upload of") == 1
    folder = stage / "up" / "checkpoints"
    assert read_pointer(folder, "latest") == "step00000012"
    assert verify_checkpoint(folder / "step00000012", 0) is None
    assert "step 12/12" in out
