"""Command-line options of the test suite (pytest reads them from this, the tests' root conftest)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gpu-device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="tests/gpu: run on CUDA (skipped without it), or at tiny sizes on the CPU",
    )
