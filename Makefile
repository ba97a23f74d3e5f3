# The two commands of the README. Both set up their own environment on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean bench

$(STAMP): pyproject.toml requirements.lock setup.py rwkvkit/tokenizer/_trie.c rwkvkit/tokenizer/_decode.c rwkvkit/ops/_wkv_cpu.c rwkvkit/ops/_wkv7_cpu.c rwkvkit/ops/_wkv7_step.h rwkvkit/ops/_decode_cpu.c rwkvkit/ops/_cpu_math.h rwkvkit/ops/_amx.h rwkvkit/ops/_fused_cpu.c rwkvkit/ops/_matmul_cpu.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rwkvkit demo

test: $(STAMP)
	$(BIN)/ruff format --check rwkvkit tests benchmarks
	$(BIN)/ruff check rwkvkit tests benchmarks
	$(BIN)/python -m pytest -q -x --durations=15

format: $(STAMP)
	$(BIN)/ruff format rwkvkit tests benchmarks
	$(BIN)/ruff check --fix rwkvkit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info rwkvkit/tokenizer/*.so
