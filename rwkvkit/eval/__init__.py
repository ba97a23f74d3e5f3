"""Evaluation: lm-evaluation-harness tasks and the perplexity of text files (``rwkvkit eval``).

- ``harness.py``: ``RWKVLM``, lm-eval's model interface over ``rwkvkit.scoring`` (needs the ``eval``
  extra: lm-eval is imported only there).
- ``cli.py``: ``rwkvkit eval --model M --tasks T1,T2``; task names, YAML files and folders.
- ``perplexity.py``: ``rwkvkit eval perplexity FILE...`` (needs no extra).
- ``common.py``: model options, loading, the vocabulary choice.
- ``tasks/``: small local tasks in lm-eval's YAML format over JSON lines, one per output type.
"""
