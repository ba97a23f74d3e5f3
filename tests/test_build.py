"""Every C extension setup.py declares is built and imports where a C compiler is present.

setup.py marks the extensions optional so that a machine without a compiler still installs rwkvkit (the
PyTorch paths run instead); the price is that a compile error only prints a warning and the tests of
that kernel skip. This test turns such a silent skip into a failure on machines that can build.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def _declared() -> list[str]:
    text = SETUP.read_text()
    return re.findall(r'Extension\(\s*(?:#[^\n]*\n\s*)?"(rwkvkit\.[\w.]+)"', text)


def test_setup_declares_the_extensions() -> None:
    names = _declared()
    assert "rwkvkit.ops._decode_cpu" in names and "rwkvkit.ops._decode_v7" in names, names


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the extensions are built and tested on Linux"
)
@pytest.mark.parametrize("name", _declared())
def test_extension_is_built(name: str) -> None:
    try:
        importlib.import_module(name)
    except ImportError as e:  # a compile or link error in the build, or an undefined symbol
        pytest.fail(
            f"{name} did not build or load here ({e}); rebuild with `pip install -e .` and read its errors"
        )
