"""``rwkvkit bench serve`` runs with only what the ``serve`` extra installs (no httpx, no openai: its
clients are the standard library's), and what it measures is read from the real server: chat turn 2
starts from the state after turn 1's reply, and the per-step profile adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Installed here by other extras (dev, eval, train, hub) but not by ``serve``: importing one fails.
NOT_IN_SERVE = ("httpx", "openai", "lm_eval", "yaml", "tqdm", "matplotlib", "rwkv", "huggingface_hub",
                "requests", "aiohttp", "safetensors")  # fmt: skip

BLOCKER = """
import importlib.machinery, sys
BLOCK = set(%r)
class _Refuse:
    def __init__(self, name): self.name = name
    def create_module(self, spec): raise ModuleNotFoundError("not in the serve extra: " + self.name, name=self.name)
    def exec_module(self, module): raise ModuleNotFoundError("not in the serve extra: " + self.name, name=self.name)
class _Block:  # found (torch probes what is installed) but not importable
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCK:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Refuse(name)
        return spec
sys.meta_path.insert(0, _Block())
"""


def test_bench_serve_runs_on_the_serve_extra_alone(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER % (NOT_IN_SERVE,))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import httpx"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "not in the serve extra: httpx" in blocked.stderr  # the blocker works
    cmd = [sys.executable, "-m", "rwkvkit.cli", "bench", "serve", "--measure", "throughput,chat,profile",
           "--layers", "2", "--embd", "64", "--clients", "1,2", "--tokens", "4", "--chat-history", "80",
           "--chat-reply", "4", "--threads", "1", "--json"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["throughput"]) == {"1", "2"} and min(out["throughput"].values()) > 0
    one, two, edited = (out["chat"][k] for k in ("turn1", "turn2", "turn2_edited"))
    assert one["cached_tokens"] == 0 and one["prompt_tokens"] >= 80
    # turn 2: turn 1's prompt and its 4-token reply come from the state kept after the reply
    assert two["cached_tokens"] == one["prompt_tokens"] + 4 and two["prompt_tokens"] > two["cached_tokens"]
    assert edited["cached_tokens"] == one["prompt_tokens"]  # an edited reply: only turn 1's prompt
    prof = out["profile"]
    assert set(prof["server"]) == set(prof["in_process"]) == {"1", "2"}
    for p in [*prof["server"].values(), *prof["in_process"].values()]:
        parts = sum(p[k] for k in ("model_s", "sample_s", "score_s", "emit_s", "prefill_s"))
        assert p["steps"] > 0 and 0 < parts <= p["step_ms"] * 1.001 and p["model_s"] > 0
    assert [prof["in_process"][k]["rows_per_step"] for k in ("1", "2")] == [1, 2]
    assert "in process (no HTTP), 2 rows" in r.stdout and "2 rows vs 1: a step costs" in r.stdout
