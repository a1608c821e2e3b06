"""Shards on a real S3 server (moto on loopback): the same batches as from local disk in both
reading modes, a verified node-local cache, and clear errors for missing buckets and objects."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rskdist.data.loader import build_eval_loader, build_train_loader
from rskdist.data.remote import StoreReading, coalesce
from rskdist.data.shards import check_store_shards, load_index, upload_shards
from rskdist.store.fs import Store, StoreError, StoreUnavailable
from test_data_stream import make_shards

DEBUG = str(Path(__file__).resolve().parent.parent / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def shards(s3_server, tmp_path_factory):
    local = make_shards(tmp_path_factory.mktemp("local"), [6] * 8, samples_per_shard=10)
    url = s3_server.make_bucket("rsk-shards") + "/demo"
    upload_shards(local, url)
    return local, url


def _batches(root, steps=3, **kw):
    loader = build_train_loader(root, rank=1, world_size=2, classes_per_rank=2, m=2, image_size=16,
                                num_workers=0, seed=3, **kw)
    out = []
    for x, y in loader:
        out.append((x.clone(), y.clone()))
        if len(out) == steps:
            break
    return out


@pytest.mark.parametrize("reading", [StoreReading(mode="stage"), StoreReading(mode="ranged", request_bytes=4096),
                                     StoreReading(mode="ranged", request_bytes=1)])
def test_store_batches_equal_local_ones(shards, reading, tmp_path):
    local, url = shards
    reading = StoreReading(**{**reading.__dict__, "cache_dir": str(tmp_path / "cache")})
    for (xl, yl), (xs, ys) in zip(_batches(local), _batches(url, store=reading)):
        assert torch.equal(xl, xs) and torch.equal(yl, ys)
    ev_local = list(build_eval_loader(local, rank=0, world_size=1, batch_size=8, image_size=16, num_workers=0))
    ev_store = list(build_eval_loader(url, rank=0, world_size=1, batch_size=8, image_size=16, num_workers=0,
                                      store=reading))
    for a, b in zip(ev_local, ev_store):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_stage_cache_is_verified_and_bounded(shards, tmp_path):
    local, url = shards
    index = load_index(local)
    shard = index["splits"]["train"]["shards"][0]
    reading = StoreReading(mode="stage", cache_dir=str(tmp_path), cache_bytes=2 * shard["num_bytes"] + 10)
    _batches(url, steps=2, store=reading)
    cached = [p for p in tmp_path.rglob("shard-*.tar")]
    assert cached and sum(p.stat().st_size for p in cached) <= reading.cache_bytes
    # A cached copy of the wrong size is fetched again, and the result is what the store holds.
    victim = cached[0]
    victim.write_bytes(b"x" * 10)
    _batches(url, steps=2, store=reading)
    if victim.exists():
        assert victim.stat().st_size > 10
    # A shard whose bytes differ from the index's checksum is refused with its URL.
    bad = Store(url)
    name = f"{url}/train/{shard['file']}"
    original = bad.cat(name)
    bad.fs.pipe_file(bad.path(name), original[:-1] + bytes([original[-1] ^ 1]))
    try:
        for p in tmp_path.rglob("shard-000000.tar"):
            p.unlink()
        with pytest.raises(StoreUnavailable, match="SHA-256"):
            loader = build_train_loader(url, rank=0, world_size=1, classes_per_rank=8, m=2, image_size=16,
                                        num_workers=0, store=reading, steps_per_epoch=1)
            for _ in loader:
                pass
    finally:
        bad.fs.pipe_file(bad.path(name), original)


def test_missing_bucket_object_and_shard_name_the_url(shards, s3_server):
    _, url = shards
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-x/demo/index.json: not found"):
        load_index("s3://no-such-bucket-x/demo")
    with pytest.raises(StoreError, match=r"s3://rsk-shards/elsewhere/index.json: not found"):
        load_index("s3://rsk-shards/elsewhere")
    store = Store(url)
    gone = f"{url}/test/shard-000000.tar"
    data = store.cat(gone)
    store.remove(gone)
    try:
        with pytest.raises(StoreError, match="test/shard-000000.tar: not found"):
            check_store_shards(url, ["train", "test"])
    finally:
        store.fs.pipe_file(store.path(gone), data)
    check_store_shards(url, ["train", "test"])


def test_dead_endpoint_retries_then_says_so(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    store = Store("s3://rsk-shards/demo", retries=3, backoff_s=0.05)
    with pytest.raises(StoreUnavailable, match=r"did not answer \(endpoint http://127.0.0.1:9\) after 3 tries"):
        store.cat("s3://rsk-shards/demo/index.json")


def test_coalesce_merges_neighbours_within_the_request_size():
    items = [(0, 1000, 100), (1, 0, 50), (0, 0, 100), (0, 5000, 10), (0, 200, 100)]
    groups = coalesce(items, request_bytes=1200)
    assert [(g[0], g[1], g[2]) for g in groups] == [(0, 0, 1100), (0, 5000, 5010), (1, 0, 50)]
    assert sorted(i for g in groups for i in g[3]) == list(range(len(items)))
    assert len(coalesce(items, request_bytes=1)) == len(items)
    rng = np.random.default_rng(0)
    many = [(int(rng.integers(3)), int(o), 7) for o in rng.integers(0, 10**6, 200)]
    for shard, start, end, members in coalesce(many, 4096):
        assert end - start <= max(4096, 7)
        assert all(many[i][0] == shard and start <= many[i][1] < end for i in members)


def test_config_refuses_a_missing_bucket_before_training(shards):
    from rskdist.config import load_config, validate

    common = ["data.source=shards", "data.global_batch=16", "data.m=2", "run.store_retries=2"]
    cfg = load_config(DEBUG, [*common, "data.root=s3://no-such-bucket-x/demo"])
    with pytest.raises(ValueError, match=r"s3://no-such-bucket-x/demo/index.json: not found"):
        validate(cfg, world_size=2)
    validate(load_config(DEBUG, [*common, f"data.root={shards[1]}"]), world_size=2)


def test_make_shards_uploads_to_a_store(s3_server, tmp_path):
    import subprocess
    import sys

    url = s3_server.make_bucket("rsk-digits") + "/digits"
    tool = Path(__file__).resolve().parent.parent / "tools" / "make_shards.py"
    proc = subprocess.run([sys.executable, str(tool), "digits", "--out", str(tmp_path / "digits"), "--quiet",
                           "--upload", url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"data.root={url}" in proc.stderr
    assert load_index(url) == load_index(str(tmp_path / "digits"))
    check_store_shards(url, ["train", "test"])


def test_refused_credentials_name_the_url_and_never_the_keys(tmp_path):
    from rskdist.config import load_config, validate
    from s3server import S3Server, s3_environment

    server = S3Server(tmp_path / "moto.log", check_credentials=True)  # the test's keys are unknown to it
    try:
        with s3_environment(server):
            with pytest.raises(StoreError, match=r"read s3://locked/demo/index.json: access denied") as err:
                load_index("s3://locked/demo")
            cfg = load_config(DEBUG, ["run.output_dir=s3://locked/runs", "run.store_retries=1"])
            with pytest.raises(StoreError, match=r"run.output_dir: check s3://locked: access denied") as err2:
                validate(cfg, world_size=1)
            for text in (str(err.value), str(err2.value)):
                assert "check the credentials" in text
                assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http_shards(shards, tmp_path_factory):
    """The same shards behind a plain HTTP server on loopback (python -m http.server: folder
    pages without sizes, and no byte ranges: it sends the whole file for a Range request)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from rskdist.comm import free_port

    local = shards[0]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(Path(local).parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/{Path(local).name}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/index.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield local, url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_https_shards_are_checked_by_head_and_staged(http_shards, tmp_path):
    """An HTTP(S) store: the folder page gives no sizes, so each shard's size is asked of the
    object itself; staged reading gives the local batches."""
    local, url = http_shards
    check_store_shards(url, ["train", "test"])
    reading = StoreReading(mode="stage", cache_dir=str(tmp_path / "cache"))
    for (xl, yl), (xs, ys) in zip(_batches(local), _batches(url, store=reading)):
        assert torch.equal(xl, xs) and torch.equal(yl, ys)


def test_a_server_without_byte_ranges_is_refused_for_ranged_reading(http_shards):
    """Sent whole files for ranged requests, the loader must not take them for broken images
    (black images, the run going on): the config is refused before training, and a reader
    that gets there anyway stops with the reason."""
    from rskdist.config import load_config, validate

    local, url = http_shards
    with pytest.raises(StoreError, match="does not serve byte ranges; read these shards with data.read_mode=stage"):
        check_store_shards(url, ["train"], ranged=True)
    common = ["data.source=shards", "data.global_batch=16", "data.m=2", f"data.root={url}"]
    with pytest.raises(ValueError, match="does not serve byte ranges"):
        validate(load_config(DEBUG, [*common, "data.read_mode=ranged"]), world_size=2)
    validate(load_config(DEBUG, common), world_size=2)  # stage: fine
    with pytest.raises(StoreUnavailable, match="does not serve byte ranges"):
        _batches(url, store=StoreReading(mode="ranged"))
