"""The run folder's mirror on a real S3 server (moto on loopback), without a trainer: a save
that cannot be uploaded is retried and `latest` on the store only ever names a whole
checkpoint; a resume on an empty node downloads what its ranks need."""

import json
import time

from rskdist.store.fs import Store
from rskdist.store.mirror import RunMirror


def _checkpoint(run, tag, files, world_size=2):
    """A saved checkpoint as CheckpointManager leaves it: files, complete.json, latest."""
    folder = run / "checkpoints" / tag
    folder.mkdir(parents=True)
    manifest = {"tag": tag, "world_size": world_size, "files": {}}
    for name, (data, ranks) in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
        manifest["files"][name] = {"size": len(data or b"x" * 7), "ranks": ranks}
    (folder / "complete.json").write_text(json.dumps(manifest))
    (run / "checkpoints" / "latest").write_text(tag)


def _mirror(run, url, rank=0, local_rank=0, world_size=2):
    mirror = RunMirror(run, url, rank=rank, local_rank=local_rank, world_size=world_size, retries=2, backoff_s=0.05)
    mirror.await_s = 1.0
    return mirror


def _wait_unsent(mirror, tag):
    deadline = time.monotonic() + 60
    while tag not in mirror.unsent:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_failed_upload_is_retried_and_latest_only_names_whole_checkpoints(s3_server, tmp_path):
    run, url = tmp_path / "run", "s3://late-bucket/runs/a"
    (run / "metrics.jsonl").parent.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    _checkpoint(run, "step00000002", {"mp_rank_00_model_states.pt": (b"w2" * 100, [0, 1])})
    mirror = _mirror(run, url)
    mirror.saved("step00000002")  # the bucket does not exist yet: the upload fails, in the background
    _wait_unsent(mirror, "step00000002")
    assert "late-bucket" in mirror.unsent["step00000002"]
    s3_server.make_bucket("late-bucket")
    assert mirror.finish(60) == []  # tried again at the end
    store = Store(url)
    assert store.cat(f"{url}/checkpoints/latest") == b"step00000002"
    assert store.cat(f"{url}/metrics.jsonl") == b'{"step": 2}\n'

    # A failed save is superseded by the next one that reaches the store.
    mirror = _mirror(run, url.replace("late-bucket", "later-bucket"))
    _checkpoint(run, "step00000004", {"mp_rank_00_model_states.pt": (b"w4" * 100, [0, 1])})
    mirror.saved("step00000004")
    _wait_unsent(mirror, "step00000004")
    s3_server.make_bucket("later-bucket")
    _checkpoint(run, "step00000006", {"mp_rank_00_model_states.pt": (b"w6" * 100, [0, 1])})
    mirror.saved("step00000006")
    assert mirror.finish(60) == []
    later = url.replace("late-bucket", "later-bucket")
    assert store.cat(f"{later}/checkpoints/latest") == b"step00000006"
    assert set(store.listing(f"{later}/checkpoints/step00000006")) == {"mp_rank_00_model_states.pt", "complete.json"}

    # A save whose other node never uploads its file: not marked complete, reported at the end.
    _checkpoint(run, "step00000008", {"mp_rank_00_model_states.pt": (b"w8" * 100, [0]),
                                      "zero_pp_rank_1_mp_rank_00_optim_states.pt": (None, [1])})
    mirror = _mirror(run, url)
    mirror.saved("step00000008")
    missing = mirror.finish(60)
    assert len(missing) == 1 and missing[0].startswith("checkpoint step00000008:")
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt not uploaded" in missing[0]
    assert store.cat(f"{url}/checkpoints/latest") == b"step00000002"
    assert store.exists(f"{url}/checkpoints/step00000008/mp_rank_00_model_states.pt")


def test_restore_on_an_empty_node_fetches_what_its_ranks_need(s3_server, tmp_path):
    url = s3_server.make_bucket("restore-bucket") + "/runs/b"
    run = tmp_path / "first"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    files = {"mp_rank_00_model_states.pt": (b"m" * 50, [0, 1]),
             "zero_pp_rank_0_mp_rank_00_optim_states.pt": (b"o0" * 30, [0]),
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": (b"o1" * 30, [1])}
    _checkpoint(run, "step00000004", files)
    mirror = _mirror(run, url)
    mirror.saved("step00000004")
    assert mirror.finish(60) == []

    # The second node (rank 1 alone on it) fetches its own optimizer shard and the shared file.
    node_b = tmp_path / "node-b"
    assert _mirror(node_b, url, rank=1, local_rank=0).restore() == "step00000004"
    got = {p.name for p in (node_b / "checkpoints" / "step00000004").iterdir()}
    assert got == {"mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "complete.json"}
    assert not (node_b / "metrics.jsonl").exists()  # the records are rank 0's
    # Rank 0's node: its shard, the shared file, the records; the pointer names the tag.
    node_a = tmp_path / "node-a"
    assert _mirror(node_a, url).restore() == "step00000004"
    assert (node_a / "checkpoints" / "latest").read_text() == "step00000004"
    assert (node_a / "metrics.jsonl").read_text() == '{"step": 4}\n'
    assert (node_a / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() \
        == b"o0" * 30
    # Resumed by another world size: every file, whichever ranks saw it.
    node_c = tmp_path / "node-c"
    assert _mirror(node_c, url, rank=0, world_size=4).restore() == "step00000004"
    assert {p.name for p in (node_c / "checkpoints" / "step00000004").iterdir()} == {*files, "complete.json"}
    # A node already holding that checkpoint keeps its copy; no store at all: nothing to restore.
    assert _mirror(node_a, url).restore() == "step00000004"
    assert _mirror(tmp_path / "c", s3_server.make_bucket("empty-bucket") + "/r").restore() is None
