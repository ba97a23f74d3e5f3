# The two commands of the README. Both set up their own environment on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test format clean

NATIVE := $(wildcard rwkvkit/tokenizer/_*.c rwkvkit/tokenizer/_*.h rwkvkit/ops/_*.c rwkvkit/ops/_*.h)

$(STAMP): pyproject.toml requirements.lock setup.py $(NATIVE)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rwkvkit demo

test: $(STAMP)
	$(BIN)/ruff format --check rwkvkit tests
	$(BIN)/ruff check rwkvkit tests
	$(BIN)/python -m pytest -q -x --durations=15

format: $(STAMP)
	$(BIN)/ruff format rwkvkit tests
	$(BIN)/ruff check --fix rwkvkit tests

clean:
	rm -rf $(VENV) build *.egg-info rwkvkit/tokenizer/*.so
