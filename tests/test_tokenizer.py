"""The World tokenizer against the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``.

Every check runs on both cores (the C double-array trie and its pure-Python twin); the reference
is built once per module (it is slow and takes ~300 MB).
"""

from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvkit.tokenizer import DEFAULT_VOCAB, Tokenizer, VocabError, native_available

BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="C core not built")),
    "python",
]
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.\n\nUser: hi\n\nAssistant:",
    "你好，世界。人工智能正在改变我们的生活方式，大型语言模型尤其如此。",
    "こんにちは、世界。今日はいい天気ですね。カタカナとひらがな。",
    "안녕하세요 세계. Привет, мир! مرحبا بالعالم. नमस्ते दुनिया. Γειά σου Κόσμε.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\tif x:\r\n        pass\n" * 3,
    "🎉😀👍🏽👨‍👩‍👧‍👦 🇯🇵 emoji ✨ and symbols ∑∫√ ≤≥ ™ © \u200b\ufeff",
    " " * 300 + "\n" * 40 + "=" * 200 + "\x00\x01\x7f",
]


@pytest.fixture(scope="module")
def ref():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(DEFAULT_VOCAB))


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request) -> Tokenizer:
    return Tokenizer(backend=request.param)


@pytest.fixture(scope="module")
def both() -> tuple[Tokenizer, Tokenizer]:
    if not native_available():
        pytest.skip("C core not built")
    return Tokenizer(backend="native"), Tokenizer(backend="python")


def _machine_texts() -> list[str]:
    """Real multilingual text from CPython's test data, and a few stdlib sources."""
    lib = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(lib, "test", "cjkencodings", "*-utf8.txt")))
    paths += [os.path.join(lib, name) for name in ("textwrap.py", "heapq.py", "json/decoder.py")]
    return [open(p, encoding="utf-8").read() for p in paths if os.path.exists(p)]


# ------------------------------------------------------------------------------- parity
def test_mixed_corpus_matches_reference(tok, ref):
    for text in MIXED + _machine_texts():
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text


def test_every_token_encodes_to_itself_as_reference(tok, ref):
    for idx, token in ref.idx2token.items():
        assert tok.decode_bytes([idx]) == token
        got = tok.encode(token)
        assert got == [idx] == ref.encodeBytes(token), idx


def test_vocabulary_shape(tok):
    assert tok.vocab_size == 65530
    assert tok.eod_id == 0
    assert [tok.encode(bytes([b]))[0] for b in range(256)] == list(range(1, 257))


@PROPS
@given(text=st.text(max_size=300))
def test_random_text_matches_reference(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids, errors="strict") == text


@PROPS
@given(data=st.binary(max_size=300))
def test_random_bytes_match_reference(tok, ref, data):
    ids = tok.encode(data)
    assert ids == ref.encodeBytes(data)
    assert tok.decode_bytes(ids) == data


@PROPS
@given(ids=st.lists(st.integers(1, 65529), max_size=40))
def test_concatenated_tokens_match_reference(tok, ref, ids):
    data = b"".join(ref.idx2token[i] for i in ids)  # long matches and near-misses
    assert tok.encode(data) == ref.encodeBytes(data)


@PROPS
@given(ids=st.lists(st.integers(-3, 65540), max_size=30))
def test_decode_modes(tok, ref, ids):
    assert tok.decode(ids, errors="reference") == ref.decode(ids)
    known = [i for i in ids if 0 <= i <= 65529]
    data = b"".join(ref.idx2token.get(i, b"") for i in known)
    assert tok.decode_bytes(known) == data
    expected = b"".join(ref.idx2token.get(i, b"\xef\xbf\xbd") if i else b"" for i in ids)
    assert tok.decode_bytes(ids, errors="replace") == expected
    assert tok.decode(ids) == expected.decode("utf-8", "replace")
    if len(known) < len(ids):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(ids, errors="strict")


@PROPS
@given(
    texts=st.lists(st.text(max_size=60) | st.binary(max_size=60), max_size=12),
    threads=st.sampled_from([1, 3]),
)
def test_batch_equals_single(tok, texts, threads):
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=threads) == expected
    arrays = tok.encode_batch_array(texts, dtype=np.int32, num_threads=threads)
    assert [a.tolist() for a in arrays] == expected


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "café é", "ā Ħ ſ", "€ 你好 ok", "😀 x", "𪎌 rare, spelled in byte tokens", "a\x00b", ""],
)
def test_decode_builds_canonical_strings(tok, ref, text):
    """Each str width (ASCII, Latin-1, UCS-2, UCS-4) and byte-token runs decode to an equal str."""
    ids = tok.encode(text)
    for form in (ids, tuple(ids), np.asarray(ids, dtype=np.uint16), np.asarray(ids, dtype=np.int64)):
        out = tok.decode(form)
        assert out == text and hash(out) == hash(text) and ref.decode(ids) == text
        assert tok.decode([0, *ids, 0]) == text
    assert tok.decode(ids + tok.encode("😀".encode()[:3])) == text + "\ufffd"


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(1, 65529), min_size=1000, max_size=6000), cut=st.integers(0, 2000))
def test_long_inputs_match_reference(both, ref, ids, cut):
    """Long inputs go through the segmented multi-lane walk (joined at shared token boundaries)."""
    native, _ = both
    data = b"".join(ref.idx2token[i] for i in ids)[cut:]
    assert native.encode(data) == ref.encodeBytes(data)


@pytest.mark.parametrize(
    "text",
    ["a" * 70000, " " * 50001, "\n" * 40000 + "x", "ab" * 30000, "的" * 30000, "🎉" * 20000, "=-" * 33333],
)
def test_long_runs_match_python_twin(both, text):
    """Runs where segment starts fall out of phase with the text's tokens (joined late or never)."""
    native, python = both
    for src in (text, "q" + text, "qq" + text[:-1] + "\u00e9", text.encode()[1:]):
        assert native.encode(src) == python.encode(src)
        assert native.encode_array(src).tolist() == python.encode(src)


def test_native_and_python_agree_on_large_text(both):
    native, python = both
    text = "".join(MIXED + _machine_texts()) * 3
    assert native.encode(text) == python.encode(text)
    assert native.encode_batch([text, text[:999]], num_threads=2) == python.encode_batch([text, text[:999]])


# ------------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_array_forms(tok, dtype):
    text = "".join(MIXED)
    ids = tok.encode(text)
    arr = tok.encode_array(text, dtype=dtype)
    assert arr.dtype == np.dtype(dtype) and arr.tolist() == ids
    assert tok.decode(arr) == text
    assert tok.decode_bytes(arr[::-1].copy()) == tok.decode_bytes(ids[::-1])
    assert tok.decode(np.ones(3, dtype=dtype)) == "\x00" * 3  # id 1 is the byte 0x00


def test_array_errors(tok):
    with pytest.raises(ValueError, match="dtype"):
        tok.encode_array("x", dtype=np.int16)
    with pytest.raises(TypeError, match="1-D integer"):
        tok.decode(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(TypeError, match="1-D integer"):
        tok.decode(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="-1 at position 1"):
        tok.decode_bytes(np.array([5, -1], dtype=np.int64))


# ------------------------------------------------------------------------------- streaming
def test_stream_decoder_never_emits_half_characters(tok):
    text = "a😀b你好é\n🇯🇵"
    byte_ids = [b + 1 for b in text.encode()]  # one id per byte: ids 1..256 are the single bytes
    dec = tok.stream_decoder()
    pieces = [dec.feed(i) for i in byte_ids]
    assert "".join(pieces) + dec.flush() == text
    assert pieces[:5] == ["a", "", "", "", "😀"]
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_on_real_ids_and_flush(tok):
    text = "".join(MIXED)
    dec = tok.stream_decoder(errors="strict")
    out = [dec.feed(tok.encode(text)[k : k + 3]) for k in range(0, len(tok.encode(text)), 3)]
    assert "".join(out) + dec.flush() == text
    dec = tok.stream_decoder()
    assert dec.feed(tok.encode("😀".encode()[:2])) == ""
    assert dec.flush() == "\ufffd"
    strict = tok.stream_decoder(errors="strict")
    strict.feed(tok.encode("😀".encode()[:2]))
    with pytest.raises(UnicodeDecodeError):
        strict.flush()


# ------------------------------------------------------------------------------- errors
def test_bad_input_errors(tok):
    with pytest.raises(UnicodeEncodeError, match="lone surrogate U\\+D800"):
        tok.encode("ab\ud800c")
    with pytest.raises(UnicodeEncodeError, match="lone surrogate U\\+DFFF"):
        tok.encode_array("x" * 5000 + "é\udfff")  # long: converted without the GIL
    with pytest.raises(UnicodeEncodeError, match="batch item 1"):
        tok.encode_batch(["ok", "x\udfff"], num_threads=2)
    for bad in (None, 5, ["a"], 3.5):
        with pytest.raises(TypeError, match="str or bytes"):
            tok.encode(bad)
    with pytest.raises(TypeError, match="list of texts"):
        tok.encode_batch("abc")
    with pytest.raises(TypeError, match="item 1 is str"):
        tok.decode([1, "2"])
    with pytest.raises(TypeError, match="list, tuple or 1-D"):
        tok.decode("abc")
    with pytest.raises(ValueError, match="70000 at position 0"):
        tok.decode([70000], errors="strict")
    with pytest.raises(ValueError, match="errors must be"):
        tok.decode([1], errors="ignore")
    with pytest.raises(UnicodeDecodeError):
        tok.decode(tok.encode(b"\xff"), errors="strict")
    assert tok.decode(tok.encode(b"\xff")) == "\ufffd"
    assert tok.decode(range(257, 260)) == tok.decode([257, 258, 259])
    assert tok.decode([np.int64(300)]) == tok.decode([300])


def test_backend_argument_and_fallback(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        Tokenizer(backend="rust")
    from rwkvkit.tokenizer import world

    monkeypatch.setattr(world, "native_available", lambda: False)
    with pytest.raises(ImportError, match="pip install --no-deps --no-build-isolation -e ."):
        Tokenizer(backend="native")
    fallback = Tokenizer()
    assert fallback.backend == "python" and fallback.encode("Hello") == [33155]


# ------------------------------------------------------------------------------- vocab files
def _write(tmp_path, name: str, lines: list[str], newline: str = "\n") -> str:
    p = tmp_path / name
    p.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return str(p)


def _byte_lines() -> list[str]:
    return [f"{b + 1} {bytes([b])!r} 1" if b >= 128 else f"{b + 1} {chr(b)!r} 1" for b in range(256)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_vocab_lf_and_crlf(tmp_path, backend):
    lines = _byte_lines() + [
        "257 'ab' 2",
        "258 b'\\xe4\\xbd' 2",
        "259 '你好' 6",
        "260 'abc' 3",
        '262 "\'q" 2',
    ]
    for newline in ("\n", "\r\n"):
        tok = Tokenizer(_write(tmp_path, f"v{len(newline)}.txt", lines, newline), backend=backend)
        assert tok.vocab_size == 263
        assert tok.encode("abcab你好'q") == [260, 257, 259, 262]
        assert tok.encode(b"\xe4\xbd\xa0") == [258, 0xA0 + 1]
        assert tok.decode([261, 257], errors="replace") == "\ufffdab"  # 261 is unused


def test_shipped_vocab_in_lf_gives_same_ids(tmp_path, tok):
    p = tmp_path / "lf.txt"
    p.write_bytes(DEFAULT_VOCAB.read_bytes().replace(b"\r\n", b"\n"))
    other = Tokenizer(str(p), backend=tok.backend)
    text = "".join(MIXED)
    assert other.encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("257 'ab'", "expected '<id> <literal> <length>'"),
        ("257 'ab' 3", "has 2 bytes but the line says 3"),
        ("x 'ab' 2", "must be integers"),
        ("257 __import__('os').system('false') 1", "bad token literal"),
        ("257 'ab 2", "bad token literal"),
        ("257 12 2", "bad token literal"),
        ("1 'zz' 2", "id 1 appears twice"),
        ("257 'a' 1", "already has id"),
        ("0 'zz' 2", "outside 1..65535"),
    ],
)
def test_malformed_vocab_files(tmp_path, bad_line, message):
    lines = _byte_lines() + [bad_line]
    path = _write(tmp_path, "bad.txt", lines)
    with pytest.raises(VocabError, match=message) as err:
        Tokenizer(path, backend="python")
    assert "bad.txt:257" in str(err.value)


def test_vocab_missing_bytes_and_files(tmp_path):
    path = _write(tmp_path, "short.txt", _byte_lines()[:200])
    with pytest.raises(VocabError, match="missing 0xc8"):
        Tokenizer(path)
    with pytest.raises(FileNotFoundError, match="cannot read vocabulary"):
        Tokenizer(str(tmp_path / "nope.txt"))
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"\n".join(line.encode() for line in _byte_lines()) + b"\n257 '\xe9' 1\n")
    with pytest.raises(VocabError, match="latin1.txt:257: the file is not valid UTF-8"):
        Tokenizer(str(p))


def test_native_tables_are_small(both):
    native, _ = both
    stats = native.stats()
    assert stats["nodes"] == 116079
    assert stats["table_bytes"] < 8_000_000  # trie, token bytes, pre-decoded text, int cache
