"""rskdist/comm.py helpers that need no process group."""

from pathlib import Path

from rskdist.launch import release_shm_buffer, shm_buffer_path


def test_release_shm_buffer_removes_only_this_ranks_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    mine, peer = Path(shm_buffer_path(1, str(tmp_path))), Path(shm_buffer_path(0, str(tmp_path)))
    assert mine.name.startswith("deepspeed_allreduce_buffer_") and mine.name.endswith("_127.0.0.1_12345_1")
    mine.write_bytes(b"1")
    peer.write_bytes(b"0")
    assert release_shm_buffer(1, str(tmp_path)) is True
    assert not mine.exists() and peer.exists()  # a peer removes its own
    assert release_shm_buffer(1, str(tmp_path)) is False  # nothing left: no error
