"""Resolve a ``--model`` argument to a local file: a path, or a file in a Hugging Face repository.

Accepted forms:

- a local path (``model.pth``, ``~/models/RWKV-x060-World-1B6.pth``, ``.safetensors``)
- ``hf://owner/repo/path/in/repo.pth`` (optionally ``hf://owner/repo/file.pth@revision``)
- ``owner/repo:path/in/repo.pth`` (optionally ``owner/repo@revision:file.pth``)

Remote files are fetched with ``huggingface_hub`` (imported only then; ``pip install rwkvkit[hub]``)
into its usual cache, so a second run works offline. When the network is unreachable and the file is
not cached, ``ModelNotFound`` says so and what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    """The model argument names nothing that can be opened or downloaded."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str  # owner/name
    filename: str  # path inside the repository
    revision: str | None = None


_REPO = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"


def parse_hub_ref(ref: str) -> HubFile | None:
    """The Hugging Face file that ``ref`` names, or None if it is not in a hub form."""
    if ref.startswith("hf://"):
        body = ref[len("hf://") :]
        revision = None
        if "@" in body:
            body, revision = body.rsplit("@", 1)
        parts = body.split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise ModelNotFound(f"{ref!r}: expected hf://owner/repo/path/to/file.pth")
        return HubFile(f"{parts[0]}/{parts[1]}", parts[2], revision or None)
    m = re.fullmatch(rf"({_REPO})(?:@([^:]+))?:(.+)", ref)
    if m and not os.path.exists(ref):
        return HubFile(m.group(1), m.group(3), m.group(2))
    return None


def resolve_model(ref: str | os.PathLike, *, cache_dir: str | None = None) -> Path:
    """A local path for ``ref`` (downloading it from the Hugging Face hub if it names a hub file)."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    hub = parse_hub_ref(text)
    if hub is None:
        if path.exists():
            raise ModelNotFound(f"model path {text!r} is not a file")
        raise ModelNotFound(
            f"model file {text!r} does not exist. Give a local .pth/.safetensors file, or a Hugging Face "
            "file as hf://owner/repo/file.pth or owner/repo:file.pth"
        )
    return download(hub, cache_dir=cache_dir)


def download(hub: HubFile, *, cache_dir: str | None = None) -> Path:
    try:
        import huggingface_hub
    except ImportError as e:
        raise ModelNotFound(
            f"{hub.repo_id}:{hub.filename} is a Hugging Face file; downloading it needs huggingface_hub "
            "(pip install 'rwkvkit[hub]'), or download it yourself and pass the local path"
        ) from e
    name = f"{hub.repo_id}:{hub.filename}" + (f"@{hub.revision}" if hub.revision else "")
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id=hub.repo_id, filename=hub.filename, revision=hub.revision, cache_dir=cache_dir
        )
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not available"
        kind = type(e).__name__
        if _looks_offline(e):
            raise ModelNotFound(
                f"cannot download {name}: the Hugging Face hub is unreachable ({kind}) and the file is "
                "not in the local cache. Connect to the internet and retry, or download the file "
                "elsewhere and pass its local path with --model"
            ) from e
        raise ModelNotFound(f"cannot download {name} from the Hugging Face hub: {kind}: {e}") from e
    return Path(local)


def _looks_offline(e: BaseException) -> bool:
    names = {type(x).__name__ for x in _chain(e)}
    offline = {
        "LocalEntryNotFoundError",
        "ConnectionError",
        "ConnectError",
        "OfflineModeIsEnabled",
        "Timeout",
    }
    return bool(names & offline) or any("connect" in n.lower() or "timeout" in n.lower() for n in names)


def _chain(e: BaseException | None) -> list[BaseException]:
    out = []
    while e is not None and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out
