"""Shared pytest fixtures and tier handling for rskdist."""

import os

import pytest

import torch


def pytest_collection_modifyitems(config, items):
    # The gpu tier runs only where CUDA exists.
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture
def rendezvous_file(tmp_path):
    """A file:// init_method for torch.distributed in spawned test processes."""
    return f"file://{os.path.join(str(tmp_path), 'rdzv')}"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline hub + empty HF cache + sockets that refuse to connect: nothing can hang."""
    import socket

    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server on a free loopback port, with this process's AWS_* variables pointed at
    it for the module's tests (the dev extra installs moto[server] and s3fs)."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[dev]')")
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[dev]')")
    from s3server import S3Server, s3_environment

    server = S3Server(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        with s3_environment(server):
            yield server
    finally:
        server.stop()
