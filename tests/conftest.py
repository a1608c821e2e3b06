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
