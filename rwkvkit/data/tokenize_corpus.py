"""``rwkvkit tokenize``: text and jsonl files -> a binidx token corpus for training.

Inputs are files or directories (walked recursively in sorted order; ``.jsonl`` files and text
files with the extensions in ``TEXT_SUFFIXES`` are taken, the others left out and counted by
extension on stderr; anything named explicitly is taken). A text file is one document; a
``.jsonl`` file holds one document per non-blank line, ``{"text": ...}`` (the key is
``--jsonl-key``). Documents keep their order. Each is encoded with the World tokenizer and written
with id 0 after it (RWKV-LM's layout, see ``binidx.py``).

Work is split into tasks (a text file, or a block of jsonl lines) that a process pool encodes;
the main process writes the results in order through the atomic :class:`BinIdxWriter`, so an
interrupted run leaves the previous output (or nothing) in place, never a partial one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from rwkvkit.data.binidx import BinIdxWriter

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
BLOCK_BYTES = 4 << 20  # jsonl lines per task: about this many bytes

# task: (path, first line number, payload); payload None = the whole text file, else jsonl lines
Task = tuple[str, int, list[bytes] | None]
# input bytes, all ids (uint16), tokens per document, inputs skipped (with --on-error skip)
Result = tuple[int, np.ndarray, np.ndarray, list[str]]

_worker_tok = None
_worker_key = "text"
_worker_skip = False


class CorpusError(ValueError):
    """An input that cannot be read as a document (bad UTF-8, bad JSON, missing key)."""


def collect_inputs(inputs: list[str], left_out: list[Path] | None = None) -> list[Path]:
    """The files to read, in order: explicit files as given, directories walked sorted. The files of
    a directory that are neither text nor ``.jsonl`` are appended to ``left_out`` when given."""
    files: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames):
                    q = Path(dirpath) / f
                    if q.suffix == ".jsonl" or q.suffix in TEXT_SUFFIXES:
                        files.append(q)
                    elif left_out is not None:
                        left_out.append(q)
        else:
            raise FileNotFoundError(f"input {name!r} does not exist")
    return files


def left_out_summary(left_out: list[Path]) -> str:
    """One line on the files a directory walk left out: how many, of which extensions, and how to
    take them anyway."""
    kinds = Counter(p.suffix or "without extension" for p in left_out)
    each = ", ".join(f"{n} {ext}" for ext, n in kinds.most_common())
    text = "/".join(sorted(TEXT_SUFFIXES))
    return (
        f"left out {_files(len(left_out))} of the input folders that are not text ({text}) or .jsonl: "
        f"{each} (name a file to take it whatever its extension)"
    )


def _files(n: int) -> str:
    return f"{n} file" + ("s" if n != 1 else "")


def _tasks(files: list[Path]) -> Iterator[Task]:
    for path in files:
        if path.suffix != ".jsonl":
            yield str(path), 1, None
            continue
        with open(path, "rb") as f:
            block: list[bytes] = []
            size, first = 0, 1
            for lineno, line in enumerate(f, start=1):
                block.append(line)
                size += len(line)
                if size >= BLOCK_BYTES:
                    yield str(path), first, block
                    block, size, first = [], 0, lineno + 1
            if block:
                yield str(path), first, block


def _init_worker(vocab: str | None, key: str, skip: bool = False) -> None:
    global _worker_tok, _worker_key, _worker_skip
    from rwkvkit.tokenizer import Tokenizer

    _worker_tok = Tokenizer(vocab)
    _worker_key = key
    _worker_skip = skip


def _document(where: str, line: bytes) -> str:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise CorpusError(f"{where}: not a JSON line ({e})") from None
    if not isinstance(obj, dict) or _worker_key not in obj:
        raise CorpusError(f"{where}: expected an object with a {_worker_key!r} field")
    text = obj[_worker_key]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {_worker_key!r} is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CorpusError(f"{where}: the text holds a lone surrogate at index {e.start}") from None
    return text


def _documents(task: Task) -> tuple[int, list[bytes | str], list[str]]:
    """The task's documents, and the inputs skipped (errors raise unless skipping)."""
    path, first, lines = task
    docs: list[bytes | str] = []
    skipped: list[str] = []
    if lines is None:
        data = Path(path).read_bytes()
        try:
            data.decode("utf-8")
            docs.append(data)  # valid UTF-8, so its ids equal those of the decoded text
        except UnicodeDecodeError as e:
            err = CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})")
            if not _worker_skip:
                raise err from None
            skipped.append(str(err))
        return len(data), docs, skipped
    for k, line in enumerate(lines):
        if line.strip():
            try:
                docs.append(_document(f"{path}:{first + k}", line))
            except CorpusError as err:
                if not _worker_skip:
                    raise
                skipped.append(str(err))
    return sum(len(x) for x in lines), docs, skipped


def _encode_task(task: Task) -> Result:
    assert _worker_tok is not None, "worker not initialised"
    n_bytes, docs, skipped = _documents(task)
    arrays = _worker_tok.encode_batch_array(docs, dtype=np.uint16, num_threads=1)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
    return n_bytes, flat, sizes, skipped


def check_outputs(prefix: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Before any work: ``prefix.bin`` and ``prefix.idx`` can be written (not a folder, nor under a
    file, not one of ``inputs``); a ValueError names the problem. An existing corpus is replaced, a
    missing folder created."""
    from rwkvkit.cli_args import check_folder

    for ext in (".bin", ".idx"):
        p = Path(f"{prefix}{ext}")
        if p.is_dir():
            raise ValueError(f"output {str(p)!r} is a folder; give another -o prefix")
        check_folder(p.parent, "the folder of output")
        if p.exists() and any(Path(q).exists() and p.samefile(q) for q in inputs):
            raise ValueError(f"output {str(p)!r} is one of this command's inputs; write elsewhere")


def tokenize_files(
    inputs: list[str],
    prefix: str,
    *,
    workers: int = 1,
    jsonl_key: str = "text",
    vocab: str | None = None,
    progress: bool | None = None,
    skip_bad: bool = False,
) -> dict[str, float]:
    """Tokenize ``inputs`` into ``prefix.bin``/``prefix.idx``; returns counts and timing.

    A bad input (not UTF-8, a bad jsonl line) stops the run and leaves the previous output in
    place, or with ``skip_bad`` is left out and reported on stderr.
    """
    from tqdm import tqdm

    left_out: list[Path] = []
    files = collect_inputs(inputs, left_out)
    if left_out:
        print(f"rwkvkit tokenize: {left_out_summary(left_out)}", file=sys.stderr)
    if not files:
        raise FileNotFoundError("no input files found (text files, .jsonl, or directories holding them)")
    check_outputs(prefix, files)
    total = sum(f.stat().st_size for f in files)
    n_tasks = sum(1 if f.suffix != ".jsonl" else 1 + f.stat().st_size // BLOCK_BYTES for f in files)
    workers = max(1, min(workers, n_tasks))
    t0 = time.perf_counter()
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=None if progress is None else not progress,
    )
    pool = None
    try:
        if workers > 1:
            ctx = multiprocessing.get_context()
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(vocab, jsonl_key, skip_bad))
            results: Iterator[Result] = pool.imap(_encode_task, _tasks(files), chunksize=1)
        else:
            _init_worker(vocab, jsonl_key, skip_bad)
            results = map(_encode_task, _tasks(files))
        writer = BinIdxWriter(prefix, dtype=np.uint16)
        try:  # not a ``with``: a failure in close() (moving the files into place) must abort too
            n_skipped = 0
            for n_bytes, flat, sizes, skipped in results:
                for msg in skipped:
                    n_skipped += 1
                    if n_skipped <= 20:
                        bar.write(f"skipped {msg}", file=sys.stderr)
                start = 0
                for s in sizes.tolist():
                    writer.add(flat[start : start + s])
                    start += s
                bar.update(n_bytes)
            writer.close()
        except BaseException:
            writer.abort()  # no temporary file is left behind
            raise
        stats = {
            "docs": len(writer),
            "tokens": writer.n_tokens,
            "bytes": total,
            "skipped": n_skipped,
            "left_out": len(left_out),
        }
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None) -> int:
    """Tokenize text/jsonl files into a binidx corpus (PREFIX.bin + PREFIX.idx)."""
    ap = argparse.ArgumentParser(prog="rwkvkit tokenize", description=main.__doc__)
    ap.add_argument("inputs", nargs="+", help="text files, .jsonl files, or directories of them")
    ap.add_argument("-o", "--output", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    ap.add_argument("--jsonl-key", default="text", help="field holding the document in .jsonl lines")
    ap.add_argument("--vocab", default=None, help="vocabulary file (default: the World vocabulary)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="a file that is not UTF-8 or a bad jsonl line: stop (keeping the old output) or skip it",
    )
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        check_outputs(args.output, [p for p in args.inputs if Path(p).is_file()])
    except ValueError as e:
        ap.error(str(e))
    try:
        stats = tokenize_files(
            args.inputs,
            args.output,
            workers=args.workers,
            jsonl_key=args.jsonl_key,
            vocab=args.vocab,
            progress=False if args.no_progress else None,
            skip_bad=args.on_error == "skip",
        )
    except (CorpusError, FileNotFoundError, UnicodeError) as e:
        print(f"rwkvkit tokenize: {e}", file=sys.stderr)
        return 1
    mb = stats["bytes"] / 1e6
    print(
        f"{stats['docs']} documents, {stats['tokens']} tokens (with one 0 per document), {mb:.1f} MB "
        f"in {stats['seconds']:.1f} s ({mb / max(stats['seconds'], 1e-9):.1f} MB/s) -> "
        f"{args.output}.bin, {args.output}.idx"
        + (f"; {stats['skipped']} bad inputs skipped" if stats["skipped"] else "")
        + (f"; left out {_files(int(stats['left_out']))} of other types" if stats["left_out"] else "")
    )
    return 0
