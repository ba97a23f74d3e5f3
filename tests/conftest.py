"""Command-line options of the test suite (pytest reads them from this, the tests' root conftest) and the
shared ``one_thread`` fixture."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gpu-device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="tests/gpu: run on CUDA (skipped without it), or at tiny sizes on the CPU",
    )


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    decode-sized ops are far faster on one thread than on two contended ones (shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
