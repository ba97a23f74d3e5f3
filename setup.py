"""Build script for rwkvkit's optional native parts (the tokenizer core, the CPU WKV kernels
(v5/v6 and v7), the one-token decode step, the fused element-wise CPU kernels, the AMX bf16 matmul, the batched sampler's per-row work).

Everything else is declared in pyproject.toml. The extension is optional: if the C compiler is
missing the build still succeeds and rwkvkit falls back to its pure-Python twins.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rwkvkit.tokenizer._native",
            [
                "rwkvkit/tokenizer/_native.c",
                "rwkvkit/tokenizer/_trie.c",
                "rwkvkit/tokenizer/_encode.c",
                "rwkvkit/tokenizer/_encode_api.c",
                "rwkvkit/tokenizer/_decode.c",
                "rwkvkit/tokenizer/_decode_text.c",
            ],
            depends=["rwkvkit/tokenizer/_core.h"],
            extra_compile_args=["-O3", "-std=c99", "-Wall"],
            optional=True,
        ),
        Extension(
            "rwkvkit.ops._wkv_cpu",
            ["rwkvkit/ops/_wkv_cpu.c"],
            depends=["rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],  # libgomp.so.1: PyTorch's, already loaded
            optional=True,
        ),
        Extension(  # RWKV-7's WKV; OpenMP: at run time PyTorch's own libgomp
            "rwkvkit.ops._wkv7_cpu",
            ["rwkvkit/ops/_wkv7_cpu.c"],
            depends=["rwkvkit/ops/_cpu_math.h", "rwkvkit/ops/_wkv7_step.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
        Extension(  # OpenMP: at run time this is PyTorch's own libgomp, already loaded
            "rwkvkit.ops._decode_cpu",
            [
                "rwkvkit/ops/_decode_cpu.c",
                "rwkvkit/ops/_decode_matvec.c",
                "rwkvkit/ops/_decode_rows1.c",
                "rwkvkit/ops/_decode_lora.c",
                "rwkvkit/ops/_decode_bf16.c",
                "rwkvkit/ops/_decode_step.c",
                "rwkvkit/ops/_decode_ew.c",
                "rwkvkit/ops/_decode_probe.c",
            ],
            depends=["rwkvkit/ops/_decode.h", "rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
        Extension(  # RWKV-7's time-mix between its matrices, for prompts
            "rwkvkit.ops._wkv7_fused",
            ["rwkvkit/ops/_wkv7_fused.c"],
            depends=["rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h", "rwkvkit/ops/_wkv7_step.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
        Extension(  # RWKV-7's one-token step, with the matrix kernels of _decode_matvec.c / _decode_bf16.c compiled in
            "rwkvkit.ops._decode_v7",
            [
                "rwkvkit/ops/_decode_v7.c",
                "rwkvkit/ops/_decode_matvec.c",
                "rwkvkit/ops/_decode_rows1.c",
                "rwkvkit/ops/_decode_lora.c",
                "rwkvkit/ops/_decode_bf16.c",
                "rwkvkit/ops/_decode_ew.c",
            ],
            depends=["rwkvkit/ops/_decode.h", "rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h", "rwkvkit/ops/_wkv7_step.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
        Extension(
            "rwkvkit.ops._fused_cpu",
            [
                "rwkvkit/ops/_fused_cpu.c",
                "rwkvkit/ops/_fused_mix.c",
                "rwkvkit/ops/_fused_finch.c",
                "rwkvkit/ops/_fused_act.c",
                "rwkvkit/ops/_fused_lora.c",
            ],
            depends=["rwkvkit/ops/_fused.h", "rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h", "rwkvkit/ops/_amx.h"],
            # no FMA contraction: a*b + c rounds twice, as torch's element-wise ops do
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp", "-lm"],  # libgomp.so.1: resolves to the one torch has loaded
            optional=True,
        ),
        Extension(  # the batched sampler's top-p cutoffs and draws; OpenMP: PyTorch's libgomp
            "rwkvkit.ops._sample_cpu",
            ["rwkvkit/ops/_sample_cpu.c", "rwkvkit/ops/_sample_cutoff.c"],
            depends=["rwkvkit/ops/_args.h", "rwkvkit/ops/_sample.h"],
            # no FMA contraction: the same weights from the AVX-512 and the portable exp; no trapping
            # math (values unchanged): the exp loop's clamp vectorises
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        Extension(  # AMX tile code through target attributes; without AMX it loads and says so
            "rwkvkit.ops._matmul_cpu",
            ["rwkvkit/ops/_matmul_cpu.c"],
            depends=["rwkvkit/ops/_args.h", "rwkvkit/ops/_cpu_math.h", "rwkvkit/ops/_amx.h"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp"],  # libgomp.so.1: resolves to the one torch has loaded
            optional=True,
        ),
    ]
)
