"""Pieces of the trainer: config parsing, RWKV-LM's init, optimiser groups and schedule, L2Wrap,
the magic-prime data order, and the corpus readers."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from rwkvkit.config import ModelConfig
from rwkvkit.models import RWKV
from rwkvkit.train import data as D
from rwkvkit.train.config import TrainConfig, load_config
from rwkvkit.train.init import init_weights
from rwkvkit.train.optim import L2Wrap, lr_at, param_groups

# ---- config ---------------------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layer: 3\n  version: 7\nlr_init: 3e-4\ndata: a.npy\nlora_targets: [att.key]\n")
    cfg = load_config(
        p,
        [
            "lr_init=1e-3",
            "grad_checkpoint=true",
            "mode=full",
            "lora_targets=att.key,ffn.key",
            "model.a_lora=16",
        ],
    )
    assert cfg.model.n_layer == 3 and cfg.lr_init == 1e-3 and cfg.grad_checkpoint is True
    assert cfg.model.version == 7 and cfg.model.n_embd == 64 and cfg.model.sizes == {"a_lora": 16}
    mc = cfg.model.build(100)  # the ModelConfig: the other widths from RWKV-LM's rule at n_embd 64
    assert (mc.version, mc.n_layer, mc.a_lora, mc.decay_lora, mc.vocab_size) == (7, 3, 16, 32, 100)
    assert cfg.to_dict()["model"] == {
        "version": 7, "n_layer": 3, "n_embd": 64, "head_size": 64, "vocab_size": 0, "ffn_dim": 0, "a_lora": 16
    }  # fmt: skip
    assert load_config(None, ["data=a.npy", "model={version: 5, n_embd: 128}"]).model.n_embd == 128
    assert cfg.lora_targets == ["att.key", "ffn.key"]
    assert load_config(p).lr_init == 3e-4  # "3e-4" is a string to YAML 1.1; still a float here


@pytest.mark.parametrize(
    "override, msg",
    [
        (["n_layr=3"], "unknown training option"),
        (["model.n_layer=abc"], "model.n_layer must be int"),
        (["model.n_layer=0"], "n_layer must be positive"),
        (
            ["version=7", "n_embd=64"],
            r"model section now: version, n_embd \(in YAML: model: \{version: 7, n_embd: 64\}",
        ),
        (["model.version=4", "model.mix_lora=8"], r"model.mix_lora is not a size of RWKV-4"),
        (["model=[1]"], "must be a mapping"),
        (["mode=lora"], "needs load="),
        (["lr_schedule=linear"], "lr_schedule must be"),
        (["ctx_len=0"], "ctx_len must be positive"),
        (["grad_clip=x"], "must be a number"),
        (["oops"], "key=value"),
        (["lr_init=inf"], "lr_init must be a positive number, got inf"),
        (["lr_final=.nan"], "lr_final must be a positive number, got nan"),
        (["lr_init=1.5"], "lr_init 1.5 is above 1: far too large for Adam"),
        (["log_every=0"], "log_every must be positive, got 0"),
        (["eval_batches=0"], "eval_batches must be positive, got 0"),
        (["model.ffn_dim=-4"], "model.ffn_dim must be >= 0, got -4"),
        (["model.mix_lora=-1"], "model.mix_lora must be >= 0, got -1"),
        (["weight_decay=-1"], "weight_decay must be a number >= 0, got -1.0"),
        (["l2wrap=-1"], "l2wrap must be a number >= 0, got -1.0"),
        (["grad_clip=-1"], "grad_clip must be a number >= 0, got -1.0"),
        (["max_minutes=-1"], "max_minutes must be a number >= 0, got -1.0"),
        (["threads=-1"], "threads must be >= 0, got -1"),
        (["eval_every=-1"], "eval_every must be >= 0, got -1"),
        (["save_every=-1"], "save_every must be >= 0, got -1"),
        (["beta2=1"], r"beta2 must be in \[0, 1\), got 1.0"),
        (
            ["backend=native"],
            r"backend must be one of \('auto', 'chunked', 'naive'\) to train \('native' runs",
        ),
    ],
)
def test_config_bad_input_names_the_problem(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, ["data=a.npy"] + override)


def test_config_requires_data():
    with pytest.raises(ValueError, match="data="):
        TrainConfig().validate()


# ---- init -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5, 6])
def test_init_follows_rwkv_lm(version):
    L, C = 3, 128
    cfg = ModelConfig(version, L, C, 256, head_size=C if version == 4 else 64, mix_lora=8, decay_lora=16)
    m = init_weights(RWKV(cfg), seed=0)
    sd = m.state_dict()
    n = torch.arange(C, dtype=torch.float64)
    for layer in range(L):
        r01, r10 = layer / (L - 1), 1 - layer / L
        b = f"blocks.{layer}."
        decay = sd[b + "att.time_decay"].double().flatten()
        want = (
            (-5 + 8 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
            if version == 4
            else -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
        )
        torch.testing.assert_close(decay, want.float().double(), atol=1e-6, rtol=0)
        assert torch.all(sd[b + "att.output.weight"] == 0) and torch.all(sd[b + "ffn.value.weight"] == 0)
        assert torch.all(sd[b + "ffn.receptance.weight"] == 0)
        ddd = n / C
        if version == 6:
            torch.testing.assert_close(
                sd[b + "att.time_maa_k"].flatten().double(), (1 - ddd**r10).float().double()
            )
            torch.testing.assert_close(
                sd[b + "ffn.time_maa_k"].flatten().double(), (1 - ddd ** (r10**3)).float().double()
            )
            assert torch.all(sd[b + "att.time_maa_w1"] == 0) and sd[b + "att.time_maa_w2"].abs().max() <= 0.01
        if version == 5:
            torch.testing.assert_close(
                sd[b + "att.time_mix_v"].flatten().double(), (ddd**r10 + 0.3 * r01).float().double()
            )
        if version != 4:
            faaaa = sd[b + "att.time_faaaa"].double().flatten()
            torch.testing.assert_close(
                faaaa, (r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1).float().double()
            )
            assert torch.allclose(sd[b + "att.ln_x.weight"], torch.tensor(((layer + 1) / L) ** 0.7))
            w = sd[b + "att.key.weight"]  # orthogonal, gain 0.1
            torch.testing.assert_close(w @ w.T, 0.01 * torch.eye(C), atol=1e-5, rtol=0)
    head = sd["head.weight"]  # [V, C] orthogonal columns, gain 0.5*sqrt(V/C)
    torch.testing.assert_close(head.T @ head, 0.25 * (256 / C) * torch.eye(C), atol=1e-4, rtol=0)
    assert sd["emb.weight"].abs().max() <= 1e-4
    again = init_weights(RWKV(cfg), seed=0).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)  # seeded: reproducible


def test_goose_init_follows_rwkv_lm():
    """RWKV-v7/train_temp: the static mixes, w0/a0/v0/k_k/k_a/r_k ramps, LoRAs zero then orthogonal 0.1,
    matrices orthogonal with gain 1 whatever their shape (key 0.1, output and ffn.value 0)."""
    L, C, N = 3, 128, 32
    m = init_weights(RWKV(ModelConfig(7, L, C, 256, head_size=N)), seed=0)
    sd = m.state_dict()
    n = torch.arange(C, dtype=torch.float64)
    lin = n / (C - 1) - 0.5
    zig = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * zig.abs()

    def close(key, want):
        torch.testing.assert_close(
            sd[key].double().flatten(), want.float().double().flatten(), atol=1e-6, rtol=0
        )

    for layer in range(L):
        r01, r10 = layer / (L - 1), 1 - layer / L
        b = f"blocks.{layer}."
        ddd = n / C
        for name, p in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            close(b + f"att.x_{name}", 1 - ddd ** (p * r10))
        close(b + "ffn.x_k", 1 - ddd ** (r10**4))
        close(b + "att.w0", -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + zig * 2.5)
        close(b + "att.a0", -0.19 + zig * 0.3 + lin * 0.4)
        close(b + "att.v0", 0.73 - lin * 0.4)
        close(b + "att.k_k", 0.71 - lin * 0.1)
        assert torch.all(sd[b + "att.k_a"] == torch.tensor(1.02)) and torch.all(sd[b + "att.r_k"] == -0.04)
        assert torch.allclose(sd[b + "att.ln_x.weight"], torch.tensor(((layer + 1) / L) ** 0.7))
        for lora in "wavg":
            w1, w2 = sd[b + f"att.{lora}1"], sd[b + f"att.{lora}2"]  # [C, D] zero, [D, C] orthogonal x0.1
            assert torch.all(w1 == 0) and w1.shape == (C, 32)
            torch.testing.assert_close(w2 @ w2.T, 0.01 * torch.eye(w2.shape[0]), atol=1e-5, rtol=0)
        assert torch.all(sd[b + "att.output.weight"] == 0) and torch.all(sd[b + "ffn.value.weight"] == 0)
        key, r = sd[b + "att.key.weight"], sd[b + "att.receptance.weight"]
        torch.testing.assert_close(key @ key.T, 0.01 * torch.eye(C), atol=1e-5, rtol=0)
        torch.testing.assert_close(r @ r.T, torch.eye(C), atol=1e-4, rtol=0)
        fk = sd[b + "ffn.key.weight"]  # [4C, C]: orthonormal columns, gain 1 (not sqrt(4) as v5/v6)
        torch.testing.assert_close(fk.T @ fk, torch.eye(C), atol=1e-4, rtol=0)
    head = sd["head.weight"]  # still 0.5*sqrt(V/C)
    torch.testing.assert_close(head.T @ head, 0.25 * (256 / C) * torch.eye(C), atol=1e-4, rtol=0)
    assert "blocks.0.att.v1" not in dict(m.named_parameters())  # block 0's value LoRA: a buffer, initialised
    assert sd["blocks.0.att.v2"].abs().sum() > 0 and torch.all(sd["blocks.0.att.v1"] == 0)
    groups = {g["name"]: g for g in param_groups(m.named_parameters(), 0.001)}
    w0s = [p for n, p in m.named_parameters() if n.endswith("att.w0")]
    assert groups["x2"]["lr_mult"] == 2.0 and {id(p) for p in groups["x2"]["params"]} == {id(p) for p in w0s}
    decayed = {id(p) for p in groups["decay"]["params"]}
    named = dict(m.named_parameters())
    assert id(named["blocks.1.att.key.weight"]) in decayed and id(named["emb.weight"]) in decayed
    assert not {id(named[f"blocks.1.att.{k}"]) for k in ("w1", "a2", "g1", "x_r", "k_k", "r_k")} & decayed


# ---- optimiser ------------------------------------------------------------------------------------


def test_param_groups_decay_only_matrices_and_lr_multipliers():
    m = init_weights(RWKV(ModelConfig(6, 2, 64, 64, head_size=32, mix_lora=8, decay_lora=16)))
    groups = {g["name"]: g for g in param_groups(m.named_parameters(), 0.01)}
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert decayed and all(n.endswith(".weight") and m.get_parameter(n).dim() == 2 for n in decayed)
    assert "emb.weight" in decayed and "head.weight" in decayed
    assert not any("time_" in n or "ln" in n.split(".")[-2] for n in decayed)
    assert groups["x2"]["lr_mult"] == 2 and all("time_decay" in names[id(p)] for p in groups["x2"]["params"])
    assert groups["x3"]["lr_mult"] == 3 and {names[id(p)].split(".")[-1] for p in groups["x3"]["params"]} == {
        "time_faaaa"
    }
    assert groups["plain"]["weight_decay"] == 0 and groups["x2"]["weight_decay"] == 0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(m.parameters()))


def test_lr_schedule_warmup_cosine_exp():
    cfg = TrainConfig(data="x", lr_init=1e-3, lr_final=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    cfg.lr_schedule = "exp"
    assert lr_at(60, cfg) == pytest.approx(1e-3 * math.sqrt(0.1))
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_l2wrap_pushes_down_the_max_logit_only():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = logits.logsumexp(-1).mean() * 0  # zero base gradient: only L2Wrap's
    L2Wrap.apply(loss, logits, 1e-4).backward()
    g = logits.grad
    mx, idx = logits.detach().max(-1, keepdim=True)
    expect = torch.zeros_like(g).scatter_(-1, idx, mx * 1e-4 / 6)
    torch.testing.assert_close(g, expect)


# ---- data -----------------------------------------------------------------------------------------


def test_magic_prime_order_is_a_permutation_and_deterministic():
    tokens = np.arange(1, 32 * 50 + 2, dtype=np.int64) % 60
    ds = D.TokenDataset(tokens, 32, seed=0)
    assert ds.prime % 3 == 2 and ds.prime <= ds.n_windows
    starts = [ds.start(g) for g in range(ds.prime)]
    assert sorted(starts) == [i * 32 for i in range(ds.prime)]
    x, y = ds.sample(5)
    assert torch.equal(x[1:], y[:-1]) and x.shape == (32,)
    assert starts != [i * 32 for i in range(ds.prime)]  # scrambled
    assert [D.TokenDataset(tokens, 32, seed=1).start(g) for g in range(5)] != starts[:5]


def test_global_batch_is_the_same_for_any_process_split():
    one = [D.global_index(s, 0, 1, 0, 1, 4) + b for s in range(3) for b in range(4)]
    two = [D.global_index(s, 0, 1, r, 2, 2) + b for s in range(3) for r in range(2) for b in range(2)]
    acc = [D.global_index(s, m, 2, 0, 1, 2) + b for s in range(3) for m in range(2) for b in range(2)]
    assert one == two == acc == list(range(12))


def test_read_tokens_formats_and_errors(tmp_path):
    from rwkvkit.data.binidx import write_binidx

    docs = [[5, 6, 7], [8, 9]]
    write_binidx(tmp_path / "c", docs)
    np.save(tmp_path / "t.npy", np.array([5, 6, 7, 0, 8, 9, 0], dtype=np.uint16))
    np.array([5, 6, 7, 0, 8, 9, 0], dtype=np.uint16).tofile(tmp_path / "raw.bin")
    for p in (tmp_path / "c", tmp_path / "t.npy", tmp_path / "raw.bin"):
        assert D.read_tokens(p).tolist() == [5, 6, 7, 0, 8, 9, 0]
    with pytest.raises(FileNotFoundError, match="token file"):
        D.read_tokens(tmp_path / "nope")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        D.TokenDataset(np.array([1, 2, 300, 4, 5] * 10), 4, vocab_size=256)
    with pytest.raises(ValueError, match="fewer than ctx_len"):
        D.TokenDataset(np.array([1, 2, 3]), 4)


def test_check_ids_reads_every_block(tmp_path):
    t = np.zeros(1000, dtype=np.int32)
    D.check_ids(t, 8, "x")
    t[997] = 8
    with pytest.raises(
        ValueError, match=r"^x holds token id 8 at position 997, outside .* of 8 \(ids 0..7\)$"
    ):
        D.check_ids(t, 8, "x", block=100)
    t[997], t[5] = 0, -1
    with pytest.raises(ValueError, match="token id -1 at position 5"):
        D.check_ids(t, 8, "x", block=100)
    D.check_ids(np.full(10, 65535, dtype=np.uint16), 65536, "x")  # uint16 under 65536 ids: nothing to read


def test_memory_mapped_int64_data_gives_no_warning(tmp_path):
    """torch warns once per process about a read-only (memory-mapped) array: a fresh process shows it."""
    import subprocess
    import sys

    np.save(tmp_path / "t.npy", np.arange(200, dtype=np.int64) % 50)
    code = (
        "import sys, warnings; warnings.simplefilter('error'); from rwkvkit.train import data as D; "
        "t = D.read_tokens(sys.argv[1]); x, y = D.TokenDataset(t, 16).batch(0, 2); "
        "v = D.val_batches(t, 16, 2, 2); assert x.shape == (2, 16) and v[0][0][0, 0] == 0"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "t.npy")], capture_output=True, text=True
    )
    assert run.returncode == 0 and not run.stderr, run.stderr


def test_val_split_is_the_tail(tmp_path):
    t = np.arange(1000)
    tr, va = D.split_train_val(t, 0.1, 16)
    assert len(va) == 100 and tr[-1] + 1 == va[0]
    batches = D.val_batches(va, 16, 2, 3)
    assert len(batches) == 3 and batches[0][0].shape == (2, 16)
    assert torch.equal(batches[0][0][:, 1:], batches[0][1][:, :-1])


# ---- corpora --------------------------------------------------------------------------------------


def test_corpora_skip_cleanly_when_absent(tmp_path):
    from rwkvkit.data import corpora

    assert list(corpora.jane_austen((str(tmp_path / "none"),))) == []
    assert list(corpora.world_english_bible((str(tmp_path / "none"),))) == []
    assert list(corpora.python_stdlib(tmp_path / "none")) == []


def test_stdlib_reader_and_sword_reader_on_a_tiny_module(tmp_path):
    import struct

    from rwkvkit.data import corpora

    (tmp_path / "lib" / "pkg").mkdir(parents=True)
    (tmp_path / "lib" / "a.py").write_text("x = 1\n")
    (tmp_path / "lib" / "pkg" / "b.py").write_text("y = 2\n")
    (tmp_path / "lib" / "site-packages").mkdir()
    (tmp_path / "lib" / "site-packages" / "c.py").write_text("z = 3\n")
    assert list(corpora.python_stdlib(tmp_path / "lib")) == ["x = 1\n", "y = 2\n"]
    # a zText module with one block of two verses (plus an empty index entry)
    v1 = b'<w lemma="x">In</w> the <note placement="foot">a note</note>beginning.'
    v2 = "He said, \u201cYes\u201d.".encode()
    block = v1 + v2
    comp = zlib.compress(block)
    d = tmp_path / "web"
    d.mkdir()
    (d / "ot.bzz").write_bytes(comp)
    (d / "ot.bzs").write_bytes(struct.pack("<III", 0, len(comp), len(block)))
    idx = (
        struct.pack("<IIH", 0, 0, 0)
        + struct.pack("<IIH", 0, 0, len(v1))
        + struct.pack("<IIH", 0, len(v1), len(v2))
    )
    (d / "ot.bzv").write_bytes(idx)
    assert corpora.read_sword_ztext(d, "ot") == ["In the beginning.", "He said, \u201cYes\u201d."]
    assert list(corpora.world_english_bible((str(d),))) == ["In the beginning.\nHe said, \u201cYes\u201d.\n"]


def test_jane_austen_when_installed():
    from rwkvkit.data import corpora

    books = list(corpora.jane_austen())
    if not books:
        pytest.skip("r-cran-janeaustenr is not installed")
    assert len(books) == 6 and any("Emma Woodhouse, handsome, clever, and rich" in b for b in books)


def test_subset_vocab_keeps_bytes_and_frequent_tokens(tmp_path):
    from rwkvkit.tokenizer import Tokenizer
    from rwkvkit.train.vocab import subset_vocab, write_vocab

    docs = ["def function(self):\n    return self.value\n"] * 20 + ["the quick brown fox\n"] * 5
    tokens = subset_vocab(docs, 300)
    assert len(tokens) == 300 and tokens[1:257] == [bytes([b]) for b in range(256)]
    assert b"def" in tokens or b" return" in tokens or b"self" in tokens
    path = tmp_path / "v.txt"
    write_vocab(tokens, path)
    tok = Tokenizer(path)
    text = "def function(self): the fox \u00e9\U0001f600"
    ids = tok.encode(text)
    assert max(ids) < 300 and tok.decode(ids) == text


def test_metrics_log_resume_truncation_and_combined_runs(tmp_path):
    from rwkvkit.train.metrics import MetricsLog, combine_runs, read_metrics

    log = MetricsLog(tmp_path / "a")
    for s in range(1, 5):
        log.write({"step": s, "loss": 5.0 - s, "tokens": 10 * s})
    MetricsLog(tmp_path / "a", keep_upto=2)  # a run resumed from step 2 drops the later records
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2]
    log_b = MetricsLog(tmp_path / "b")
    log_b.write({"step": 1, "loss": 1.0, "tokens": 10, "val_loss": 1.5})
    both = combine_runs([tmp_path / "a", tmp_path / "b"])
    assert [(r["step"], r["tokens"], r["run"]) for r in both] == [(1, 10, 0), (2, 20, 0), (3, 30, 1)]
    assert log_b.plot().stat().st_size > 1000
