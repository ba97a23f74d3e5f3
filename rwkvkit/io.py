"""Files in and out: atomic writes, and PyTorch files read without running pickled code.

Writes: the data goes to a temporary file in the destination's folder, which is then renamed over
the destination (atomic on POSIX). A failure removes the temporary file and leaves what was already
saved untouched. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.

Reads: ``safe_torch_load`` is ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and
dicts only: a pickle that would import or call anything is refused), with its errors turned into a
``ValueError`` that says which problem it was: code in the file, or a file that is not (or no
longer, truncated) a PyTorch file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output(path: str | os.PathLike, what: str, *, force: bool = False,
                 inputs: tuple[str | os.PathLike | None, ...] = (), hint: str = "--force replaces it") -> Path:  # fmt: skip
    """Where a command may write an output it names ``what`` (e.g. "--save-state"): a ValueError saying
    why not for a folder, a folder that does not exist, one of the command's own ``inputs`` (never,
    even with ``force``), or an existing file unless ``force`` (``hint`` says how to force). Checked
    before the work, so that nothing is computed for a file that cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{what} {str(p)!r}: the folder {str(p.parent)!r} does not exist")
    for q in inputs:
        if q is not None and p.exists() and Path(q).exists() and p.samefile(q):
            raise ValueError(f"{what} {str(p)!r} is one of this command's inputs; write elsewhere")
    if p.exists() and not force:
        raise ValueError(f"{what} {str(p)!r} exists; {hint}")
    return p


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atomic_write``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _detail(e: BaseException) -> str:
    """The informative line of torch's long weights_only message (or the first line of any other)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln:
            return ln
    useful = [
        ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the"))
    ]
    return (useful or lines or [type(e).__name__])[0][:300]


def safe_torch_load(path: str | os.PathLike, what: str = "file", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``; ValueError names the problem and ``what``.

    A file that holds pickled objects (classes, functions: what could run code) is refused with
    "pickled objects"; random bytes, truncation or another format read as "not a PyTorch file".
    ``FileNotFoundError`` passes through.
    """
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        detail = _detail(e)
        if "GLOBAL" in detail:
            raise ValueError(
                f"refusing to load {what} {str(path)!r}: it contains pickled objects other than tensors "
                f"(loading them could run code; rwkvkit reads files with weights_only=True). {detail}"
            ) from None
        raise ValueError(f"cannot read {what} {str(path)!r}: it is not a PyTorch file ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read {what} {str(path)!r}: the file is truncated or is not a PyTorch file ({_detail(e)})"
        ) from None
