"""Shared fixtures: seeded RNG per test and the device parametrisation (GPU tests skip cleanly
where no CUDA device exists, and run unchanged where one does)."""

import zlib

import pytest
import torch

CUDA_SKIP_REASON = "needs a CUDA device"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A per-test seed: different data for every test, the same on every rerun (crc32, not
    # hash(): str hashes are salted per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
