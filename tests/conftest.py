"""Command-line options of the test suite (pytest reads them from this, the tests' root conftest) and the
shared fixtures: ``one_thread``, ``world_model``."""

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


@pytest.fixture(scope="session")
def world_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A tiny random Finch (2 layers, 64 wide) with the World tokenizer's 65536-token vocabulary: for
    the server engine's tests, which turn its tokens into text."""
    import rwkvkit
    from rwkvkit.testing import random_checkpoint

    path = tmp_path_factory.mktemp("world") / "m.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=3, path=path)
    return rwkvkit.load(path)
