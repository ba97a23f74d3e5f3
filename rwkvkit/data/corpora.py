"""Text corpora available on most machines, for the demo model and for tests of the trainer.

Three sources, each a generator of documents (one ``str`` per document), each skipping cleanly
(yielding nothing) when its files are absent:

- ``python_stdlib()``: the ``.py`` files of Python's standard library (``sysconfig`` stdlib path),
  without ``site-packages``, test suites and IDLE.
- ``jane_austen()``: the six novels in Debian's ``r-cran-janeaustenr`` (``data/Rdata.rdb``: R's lazy-load
  database with a gzipped ``.rdx`` index, every object an R serialisation compressed with zlib, bzip2 or xz). A small reader of R's
  XDR serialisation format is enough; R itself is not needed. One document per novel.
- ``world_english_bible()``: the World English Bible from Debian's ``sword-text-web`` (a SWORD ``zText``
  module: ``*.bzz`` zlib blocks, ``*.bzs`` block index, ``*.bzv`` verse index; OSIS markup stripped).
  One document per testament.

``demo_corpus()`` chains them. Public-domain texts only; nothing is downloaded.
"""

from __future__ import annotations

import bz2
import gzip
import html
import lzma
import re
import struct
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}

AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/lib/R/library/janeaustenr")
SWORD_WEB_DIRS = (
    "/usr/share/sword/modules/texts/ztext/engWEB2015eb",
    "/usr/share/sword/modules/texts/ztext/engweb2015eb",
    "/usr/share/sword/modules/texts/ztext/web",
)


def python_stdlib(root: str | Path | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """Yield the source of each standard-library module (sorted by path, so the order is fixed)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        return
    total = 0
    for path in sorted(base.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(base).parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if max_bytes is not None and total >= max_bytes:
            return


# ---- R lazy-load databases (janeaustenr) --------------------------------------------------------


def _r_decompress(blob: bytes) -> bytes:
    """One object of an R ``.rdb``/``.rdx``: 4-byte big-endian length, then zlib (or 'Z'/'2'/'X'/'0' typed)."""
    (n,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    kind = body[:1]
    if kind == b"Z":  # zlib with an explicit type byte
        out = zlib.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != n:
        raise ValueError(f"R object decompressed to {len(out)} bytes, header says {n}")
    return out


class _RReader:
    """A reader of R's XDR serialisation (versions 2 and 3), enough for data objects."""

    def __init__(self, data: bytes) -> None:
        self.d, self.i, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.i = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):  # noqa: C901 - one branch per R type, as in R's serialize.c
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == 254 or t in (253, 252, 251, 250, 242, 241):  # NIL and the special environments
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t in (249, 248, 247):  # namespace / package / persistent: a string vector
            self.int()
            out = [self.item() for _ in range(self.int())]
            self.refs.append(out)
            return out
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t in (2, 3, 5, 6, 17, 240, 239):  # pairlists, closures, promises, language
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            del attr
            node = [(tag, car)]
            if isinstance(cdr, list) and cdr and isinstance(cdr[0], tuple):
                node += cdr
            return node
        if t == 4:  # ENVSXP
            env: dict = {}
            self.refs.append(env)
            self.int()
            for _ in range(4):
                self.item()
            return env
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i : self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if t in (10, 13):  # logical, integer
            n = self.length()
            out = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
        elif t == 14:  # real
            n = self.length()
            out = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        elif t == 15:  # complex
            n = self.length()
            self.i += 16 * n
            out = [None] * n
        elif t == 24:  # raw
            n = self.length()
            out = self.d[self.i : self.i + n]
            self.i += n
        elif t in (16, 19, 20):  # character vector, list, expression
            out = [self.item() for _ in range(self.length())]
        elif t == 25:  # S4 object without data part
            out = None
        else:
            raise ValueError(f"R serialisation: unsupported type {t} at byte {self.i - 4}")
        if has_attr:
            attrs = self.item() or []
            if t == 19:
                names = dict(attrs).get("names")
                if names and len(names) == len(out):
                    return dict(zip(names, out))
        return out


def read_r_lazyload(prefix: str | Path) -> dict[str, object]:
    """All objects of an R lazy-load database (``prefix.rdb`` + ``prefix.rdx``), by name."""
    prefix = Path(prefix)
    index_blob = Path(str(prefix) + ".rdx").read_bytes()  # saveRDS: gzip, or the rdb's own framing
    raw = gzip.decompress(index_blob) if index_blob[:2] == b"\x1f\x8b" else _r_decompress(index_blob)
    index = _RReader(raw).item()
    variables = index["variables"] if isinstance(index, dict) else {}
    rdb = Path(str(prefix) + ".rdb").read_bytes()
    out = {}
    for name, (offset, size) in variables.items():
        blob = rdb[int(offset) : int(offset) + int(size)]
        out[name] = _RReader(_r_decompress(blob)).item()
    return out


def jane_austen(dirs: tuple[str, ...] = AUSTEN_DIRS) -> Iterator[str]:
    """Yield each Jane Austen novel of ``r-cran-janeaustenr`` as one text (lines joined with newlines)."""
    for d in dirs:
        prefix = Path(d) / "data" / "Rdata"
        if Path(str(prefix) + ".rdb").is_file():
            break
    else:
        return
    for _name, obj in sorted(read_r_lazyload(prefix).items()):
        if isinstance(obj, list) and obj and all(isinstance(s, str) or s is None for s in obj):
            text = "\n".join(s or "" for s in obj)
            yield re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---- SWORD zText (World English Bible) ----------------------------------------------------------

_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]*>")


def _strip_osis(text: str) -> str:
    text = _NOTE.sub(" ", text)  # footnotes sit between words without spaces
    text = re.sub(r"<(?:title)\b[^>]*>.*?</title>", "", text, flags=re.S)
    text = _TAG.sub("", text)
    text = re.sub(r"\s+", " ", html.unescape(text)).strip()
    return re.sub(r" ([.,;:!?\u2019\u201d)])", r"\1", text)


def read_sword_ztext(module_dir: str | Path, testament: str) -> list[str]:
    """The verses of one testament (``"ot"`` or ``"nt"``) of a SWORD zText module, markup removed."""
    d = Path(module_dir)
    bzs, bzv, bzz = (d / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    if not (bzs.is_file() and bzv.is_file() and bzz.is_file()):
        return []
    blocks_raw, index, data = bzs.read_bytes(), bzv.read_bytes(), bzz.read_bytes()
    cache: dict[int, bytes] = {}
    verses = []
    for j in range(len(index) // 10):
        block, start, size = struct.unpack_from("<IIH", index, 10 * j)
        if size == 0:
            continue
        if block not in cache:
            off, csize, _usize = struct.unpack_from("<III", blocks_raw, 12 * block)
            cache = {block: zlib.decompress(data[off : off + csize])}
        raw = cache[block][start : start + size].decode("utf-8", errors="replace")  # offsets are bytes
        verse = _strip_osis(raw)
        if verse:
            verses.append(verse)
    return verses


def world_english_bible(dirs: tuple[str, ...] = SWORD_WEB_DIRS) -> Iterator[str]:
    """Yield the World English Bible, one document per testament (verses separated by newlines)."""
    for d in dirs:
        if Path(d).is_dir():
            for testament in ("ot", "nt"):
                verses = read_sword_ztext(d, testament)
                if verses:
                    yield "\n".join(verses) + "\n"
            return


def demo_corpus(stdlib_max_bytes: int | None = None) -> Iterator[str]:
    """The demo model's corpus: stdlib sources, then Jane Austen and the WEB Bible when installed."""
    yield from python_stdlib(max_bytes=stdlib_max_bytes)
    yield from jane_austen()
    yield from world_english_bible()
