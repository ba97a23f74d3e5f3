"""Build script for rwkvkit's optional native parts (the tokenizer core).

Everything else is declared in pyproject.toml. The extension is optional: if the C compiler is
missing the build still succeeds and rwkvkit falls back to its pure-Python twins.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rwkvkit.tokenizer._native",
            ["rwkvkit/tokenizer/_trie.c"],  # includes _decode.c
            depends=["rwkvkit/tokenizer/_decode.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall"],
            optional=True,
        )
    ]
)
