"""``rwkvkit bench tokenizer``: World tokenizer speed and memory, rwkvkit beside the references.

One run prints MB/s (UTF-8 bytes of input per second, best of ``--repeat``; one-thread rows are
timed by the calling thread's CPU clock so that other load on a shared machine does not count,
threaded rows by the wall clock) for:
rwkvkit's native core (list and uint16-array outputs, one thread and all threads), its pure-Python
twin, the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, and the Rust wheels
(``pyrwkv_tokenizer`` / ``rwkv_tokenizer``) when installed. Memory is the resident-set growth of
building each tokenizer, measured in a fresh subprocess.

The corpus (``--size-mb``, at least 5) is built from files on the machine: CPython's standard
library sources (code with English comments), English text under /usr/share/doc, CPython's CJK test
texts, and generated multilingual text (seeded draws of vocabulary words per script, plus emoji).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
import unicodedata
from collections.abc import Callable
from typing import Any

from rwkvkit.cli_args import non_negative_float, positive_float, positive_int

TARGETS = {"encode array": 150.0, "encode list": 60.0, "decode": 600.0, "memory": 20.0}
SCRIPTS = (
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
    "CYRILLIC",
    "GREEK",
    "ARABIC",
    "DEVANAGARI",
    "THAI",
    "HEBREW",
)


def _read_files(paths: list[str], budget: int) -> str:
    parts, size = [], 0
    for p in paths:
        if size >= budget:
            break
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text.encode())
    return "".join(parts)


def _generated_multilingual(n_bytes: int, seed: int = 0) -> str:
    """Sentences of vocabulary words grouped by script, with punctuation, numbers and emoji."""
    from rwkvkit.tokenizer import load_vocab

    words: dict[str, list[str]] = {s: [] for s in SCRIPTS}
    for token in load_vocab():
        try:
            s = token.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if s:
            script = unicodedata.name(s[0], "?").split()[0]
            if script in words:
                words[script].append(s)
    rng = random.Random(seed)
    emoji = [chr(c) for c in range(0x1F300, 0x1F64F)] + ["👍🏽", "👨‍👩‍👧", "🇯🇵", "✨", "❤️"]
    scripts = [s for s in SCRIPTS if words[s]]
    out, size = [], 0
    while size < n_bytes:
        script = rng.choice(scripts)
        sep = "" if script in ("CJK", "HIRAGANA", "KATAKANA", "THAI") else " "
        sentence = sep.join(rng.choice(words[script]) for _ in range(rng.randint(4, 24)))
        tail = rng.choice(["。", "！", ".", "?", f" {rng.randint(0, 9999)}.", " " + rng.choice(emoji)])
        line = sentence + tail + ("\n" if rng.random() < 0.2 else " ")
        out.append(line)
        size += len(line.encode())
    return "".join(out)


def build_corpus(size_mb: float = 6.0, seed: int = 0) -> tuple[str, dict[str, float]]:
    """The mixed benchmark corpus and its composition in MB."""
    total = int(size_mb * 1e6)
    lib = sysconfig.get_paths()["stdlib"]
    sections = {
        "python sources": _read_files(sorted(glob.glob(os.path.join(lib, "*.py"))), int(total * 0.45)),
        "english docs": _read_files(
            sorted(glob.glob("/usr/share/doc/**/*.txt", recursive=True))
            + sorted(glob.glob("/usr/share/doc/*/README*", recursive=False)),
            int(total * 0.15),
        ),
        "cjk test texts": _read_files(
            sorted(glob.glob(os.path.join(lib, "test", "cjkencodings", "*-utf8.txt"))), total
        ),
    }
    used = sum(len(t.encode()) for t in sections.values())
    sections["generated multilingual"] = _generated_multilingual(max(total - used, total // 5), seed)
    composition = {k: len(v.encode()) / 1e6 for k, v in sections.items()}
    return "".join(sections.values()), composition


def _best(
    fn: Callable[[], Any], repeat: int, clock: Callable[[], float] = time.thread_time
) -> tuple[float, Any]:
    """Best time of ``repeat`` runs. One-thread work is timed by the calling thread's CPU clock,
    which other processes on a shared machine do not inflate; threaded work by the wall clock."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        best = min(best, clock() - t0)
    return best, out


def _docs(text: str, size: int = 1 << 16) -> list[str]:
    """Cut at line ends into documents of about ``size`` characters (for batch encoding)."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    return docs


_MEMORY_SNIPPET = """
import gc, json, sys
def rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}
kind = sys.argv[1]
if kind == "rwkvkit":
    from rwkvkit.tokenizer import Tokenizer
    import numpy
    make = lambda: Tokenizer(backend=sys.argv[2])
elif kind == "reference":
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    make = lambda: TRIE_TOKENIZER(sys.argv[2])
else:
    mod = __import__(kind)
    make = lambda: mod.RWKVTokenizer()
gc.collect(); before = rss()
tok = make(); tok.encode("warm up")
gc.collect(); after = rss()
print(json.dumps({"rss": after["VmRSS"] - before["VmRSS"], "peak": after["VmHWM"] - before["VmRSS"]}))
"""


def _memory(args: list[str]) -> str:
    try:
        r = subprocess.run(
            [sys.executable, "-c", _MEMORY_SNIPPET, *args], capture_output=True, text=True, timeout=300
        )
        m = json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return "n/a"
    return f"{m['rss']:.1f} MB (peak {m['peak']:.0f})"


def _rust_wheel() -> tuple[str, Any] | None:
    for name in ("pyrwkv_tokenizer", "rwkv_tokenizer"):
        try:
            mod = __import__(name)
            return name, mod.RWKVTokenizer()
        except (ImportError, AttributeError):
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    """Benchmark the World tokenizer: rwkvkit (native, python twin), the reference, Rust wheels."""
    ap = argparse.ArgumentParser(prog="rwkvkit bench tokenizer", description=main.__doc__)
    ap.add_argument("--size-mb", type=non_negative_float, default=6.0, help="corpus size in MB (>= 5)")
    ap.add_argument(
        "--repeat", type=positive_int, default=3, help="timed runs per measurement (best is kept)"
    )
    ap.add_argument(
        "--threads", type=positive_int, default=os.cpu_count() or 1, help="threads for the batch rows"
    )
    ap.add_argument(
        "--twin-mb", type=positive_float, default=0.5, help="MB slice for the (slow) pure-Python twin (> 0)"
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the slow rwkv reference")
    args = ap.parse_args(argv)
    if args.size_mb < 5:
        ap.error("--size-mb must be at least 5")

    from rwkvkit.tokenizer import DEFAULT_VOCAB, Tokenizer, native_available

    text, comp = build_corpus(args.size_mb)
    data_mb = len(text.encode()) / 1e6
    print(f"corpus {data_mb:.2f} MB: " + ", ".join(f"{k} {v:.2f}" for k, v in comp.items()))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load:.1f} (other work on the cores lowers every figure)"
    )
    rows: list[tuple[str, str, str, str, str]] = []

    def mbps(seconds: float, mb: float = data_mb) -> str:
        return f"{mb / seconds:8.1f}"

    ids: list[int] = []
    if native_available():
        tok = Tokenizer(backend="native")
        t_list, ids = _best(lambda: tok.encode(text), args.repeat)
        t_arr, arr = _best(lambda: tok.encode_array(text), args.repeat)
        t_dec, out = _best(lambda: tok.decode(ids), args.repeat)
        t_deca, _ = _best(lambda: tok.decode(arr), args.repeat)
        assert out == text and arr.tolist() == ids
        mem = _memory(["rwkvkit", "native"])
        rows.append(
            ("rwkvkit native, 1 thread", mbps(t_list), mbps(t_arr), f"{mbps(t_dec)} /{mbps(t_deca)}", mem)
        )
        docs = _docs(text)
        t_bl, _ = _best(
            lambda: tok.encode_batch(docs, num_threads=args.threads), args.repeat, time.perf_counter
        )
        t_ba, _ = _best(
            lambda: tok.encode_batch_array(docs, num_threads=args.threads), args.repeat, time.perf_counter
        )
        t_b1, _ = _best(lambda: tok.encode_batch_array(docs, num_threads=1), args.repeat, time.perf_counter)
        n = args.threads
        rows.append((f"native batch, {n} thread{'s' * (n > 1)} (wall)", mbps(t_bl), mbps(t_ba), "", ""))
        if n > 1:  # the same batch on one thread: what the threads add
            rows.append(("native batch, 1 thread (wall)", "", mbps(t_b1), "", ""))
        print(f"tokens {len(ids)} ({len(text.encode()) / max(len(ids), 1):.2f} bytes/token)")
    else:
        rows.append(("rwkvkit native", "not built", "", "", ""))

    twin = Tokenizer(backend="python")
    piece = text.encode()[: int(args.twin_mb * 1e6)].decode("utf-8", "ignore")
    piece_mb = len(piece.encode()) / 1e6
    t_tw, tw_ids = _best(lambda: twin.encode(piece), 1)
    t_twd, _ = _best(lambda: twin.decode(tw_ids), 1)
    rows.append(
        (
            f"rwkvkit python twin ({piece_mb:.1f} MB)",
            mbps(t_tw, piece_mb),
            "",
            mbps(t_twd, piece_mb),
            _memory(["rwkvkit", "python"]),
        )
    )

    same = "not checked"
    if not args.no_reference:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        ref = TRIE_TOKENIZER(str(DEFAULT_VOCAB))
        t_ref, ref_ids = _best(lambda: ref.encode(text), 1)
        t_refd, _ = _best(lambda: ref.decode(ref_ids), 1)
        if ids:
            same = "yes" if ref_ids == ids else "NO"
        rows.append(
            (
                "rwkv reference (python)",
                mbps(t_ref),
                "",
                mbps(t_refd),
                _memory(["reference", str(DEFAULT_VOCAB)]),
            )
        )
        del ref

    wheel = _rust_wheel()
    if wheel is None:
        rows.append(("pyrwkv-tokenizer / rwkv-tokenizer", "not installed", "", "", ""))
    else:
        name, rt = wheel
        t_rt, rt_ids = _best(lambda: rt.encode(text), args.repeat)
        t_rtd, _ = _best(lambda: rt.decode(rt_ids), args.repeat)
        rows.append((f"{name} (Rust)", mbps(t_rt), "", mbps(t_rtd), _memory([name])))
        if ids:
            print(f"{name} ids identical to rwkvkit: {'yes' if list(rt_ids) == ids else 'NO'}")

    print(
        f"\n{'MB/s (best of ' + str(args.repeat) + ')':<34}{'encode list':>12}{'encode array':>14}{'decode list/array':>20}   memory"
    )
    for name, a, b, c, d in rows:
        print(f"{name:<34}{a:>12}{b:>14}{c:>20}   {d}")
    print("one-thread rows: CPU time of the calling thread; '(wall)' rows: wall clock")
    print(f"ids identical to the reference on the corpus: {same}")
    print(
        "targets (one core): "
        + ", ".join(f"{k} >= {v:g} MB/s" for k, v in TARGETS.items() if k != "memory")
        + ", memory <= 20 MB"
    )
    return 0 if same != "NO" else 1


if __name__ == "__main__":
    sys.exit(main())
