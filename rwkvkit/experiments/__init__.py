"""The paper's three experiments, each one command: ``rwkvkit experiment mqar | long-context | speed``.

- ``mqar``: multi-query associative recall (Zoology's task) for RWKV-4, Eagle, Finch, attention, Mamba.
- ``long_context``: loss against position on held-out books, models trained at a short context.
- ``speed``: the token-mixing operators' time and peak memory against T, and per-token decode
  latency and memory per sequence, Finch against a transformer with a KV cache.
- shared pieces: ``models`` (the five models by name), ``baselines`` (transformer, Mamba, selective
  scan), ``memory`` (peak-memory measures), ``report`` (metadata, JSON, tables, plots, progress).

Each experiment has presets: ``cpu`` (finishes in about an hour on a 2-core machine), ``gpu`` (the
paper's scale) and ``toy`` (seconds, for tests). Imports point one way: experiments -> train/models.
Nothing is imported here; ``rwkvkit.experiments.cli`` dispatches the subcommands.
"""
