"""Build script for rwkvkit's optional native parts (the tokenizer core).

Everything else is declared in pyproject.toml. If the C compiler is missing the build still
succeeds and rwkvkit falls back to its pure-Python twins.
"""

from setuptools import setup

setup()
