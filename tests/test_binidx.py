"""binidx files: round trips, the RWKV-LM layout byte for byte, atomic writes, clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from rwkvkit.data.binidx import BinIdx, BinIdxError, BinIdxWriter, write_binidx

DOCS = [[5, 6, 7], [], np.array([65529, 1], dtype=np.int64), (300,)]


def _read_like_rwkv_lm(prefix: str) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    """RWKV-LM's ``MMapIndexedDataset.Index`` reading steps, written out independently."""
    codes = {
        1: np.uint8,
        2: np.int8,
        3: np.int16,
        4: np.int32,
        5: np.int64,
        6: float,
        7: np.double,
        8: np.uint16,
    }
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8)) == (1,)
        (code,) = struct.unpack("<B", f.read(1))
        n = struct.unpack("<Q", f.read(8))[0]
        doc_count = struct.unpack("<Q", f.read(8))[0]
        offset = f.tell()
    buf = np.memmap(prefix + ".idx", mode="r", order="C")
    sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=offset + sizes.nbytes)
    doc_idx = np.frombuffer(
        buf, dtype=np.int64, count=doc_count, offset=offset + sizes.nbytes + pointers.nbytes
    )
    dtype = np.dtype(codes[code])
    data = np.memmap(prefix + ".bin", mode="r", order="C")
    seqs = [np.frombuffer(data, dtype=dtype, count=int(s), offset=int(p)) for s, p in zip(sizes, pointers)]
    return dtype, seqs, np.array(doc_idx)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_and_rwkv_lm_layout(tmp_path, dtype):
    prefix = str(tmp_path / "corpus")
    write_binidx(prefix, DOCS, dtype=dtype)
    data = BinIdx(prefix)
    expected = [list(d) + [0] for d in DOCS]
    assert len(data) == 4 and data.dtype == np.dtype(dtype)
    assert [data[i].tolist() for i in range(4)] == expected
    assert data[-1].tolist() == [300, 0]
    assert data.tokens.tolist() == sum(expected, [])
    assert data.n_tokens == 10
    ref_dtype, seqs, doc_idx = _read_like_rwkv_lm(prefix)
    assert ref_dtype == np.dtype(dtype)
    assert [s.tolist() for s in seqs] == expected
    assert doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert (tmp_path / "corpus.bin").stat().st_size == 10 * np.dtype(dtype).itemsize
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]


def test_empty_corpus_and_prefix_with_extension(tmp_path):
    write_binidx(tmp_path / "empty.bin", [])
    data = BinIdx(tmp_path / "empty.idx")
    assert len(data) == 0 and data.n_tokens == 0 and data.tokens.size == 0
    with pytest.raises(IndexError):
        data[0]


def test_streaming_writer_and_interruption_keeps_old_files(tmp_path):
    prefix = tmp_path / "c"
    write_binidx(prefix, [[1, 2]])
    before = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    with pytest.raises(RuntimeError, match="interrupted"):
        with BinIdxWriter(prefix) as w:
            for i in range(100):
                w.add(np.arange(i, dtype=np.uint16))
            raise RuntimeError("interrupted")
    assert (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx"]
    with BinIdxWriter(prefix) as w:
        for i in range(100):
            w.add(np.arange(i, dtype=np.uint16))
        assert len(w) == 100
    data = BinIdx(prefix)
    assert len(data) == 100 and data[37].tolist() == list(range(37)) + [0]


def test_bad_documents(tmp_path):
    with pytest.raises(ValueError, match="70000 does not fit"):
        write_binidx(tmp_path / "a", [[1, 70000]])
    with pytest.raises(ValueError, match="-1 does not fit"):
        write_binidx(tmp_path / "a", [[-1]])
    with pytest.raises(TypeError, match="1-D sequence of integer"):
        write_binidx(tmp_path / "a", [[[1, 2]]])
    with pytest.raises(TypeError, match="1-D sequence of integer"):
        write_binidx(tmp_path / "a", [[1.5]])
    with pytest.raises(ValueError, match="dtype"):
        write_binidx(tmp_path / "a", [[1]], dtype=np.float32)
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary files left


def test_corrupt_files_are_reported(tmp_path):
    prefix = tmp_path / "c"
    with pytest.raises(BinIdxError, match="missing"):
        BinIdx(prefix)
    write_binidx(prefix, [[1, 2, 3], [4]])
    bin_path, idx_path = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    good_bin, good_idx = bin_path.read_bytes(), idx_path.read_bytes()
    bin_path.write_bytes(good_bin[:-2])
    with pytest.raises(BinIdxError, match="truncated or mismatched"):
        BinIdx(prefix)
    bin_path.write_bytes(good_bin)
    idx_path.write_bytes(b"XXXXXXXXX" + good_idx[9:])
    with pytest.raises(BinIdxError, match="not a binidx index"):
        BinIdx(prefix)
    idx_path.write_bytes(good_idx[:-8])
    with pytest.raises(BinIdxError, match="doc_idx entries need"):
        BinIdx(prefix)
    idx_path.write_bytes(good_idx[:10])
    with pytest.raises(BinIdxError, match="too short"):
        BinIdx(prefix)
