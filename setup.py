"""Build script for rwkvkit's optional native parts (the tokenizer core, the CPU WKV kernel,
the one-token decode step).

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
        ),
        Extension(
            "rwkvkit.ops._wkv_cpu",
            ["rwkvkit/ops/_wkv_cpu.c"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-pthread"],
            extra_link_args=["-pthread", "-lm"],
            optional=True,
        ),
        Extension(  # OpenMP: at run time this is PyTorch's own libgomp, already loaded
            "rwkvkit.ops._decode_cpu",
            ["rwkvkit/ops/_decode_cpu.c"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
    ]
)
