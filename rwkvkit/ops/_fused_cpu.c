/* rwkvkit.ops._fused_cpu: fused element-wise kernels around the matrices of an RWKV block (CPU, forward).
 *
 * Inference on the CPU spends a large share of a prefill on element-wise passes between the matrix
 * products: dtype casts, token-shift mixes, GroupNorm, gates. Each kernel here does one such chain in
 * a single pass over rows of [R, C] (R = B * T), reading and writing fp32 or bf16 directly, so the
 * intermediates never go to memory. The math is the PyTorch fallback's (rwkvkit/models/common.py,
 * rwkv5.py, rwkv6.py), including where that path rounds an intermediate to the compute dtype.
 *
 * Conventions (validated by the Python wrapper, rwkvkit/ops/fused.py):
 *   - arguments are named (keywords, _args.h); pointers are addresses (integers) of contiguous
 *     buffers; a dtype code says what each holds:
 *     0 = float32, 1 = bfloat16 (fp32 -> bf16 rounds to nearest even, like torch's cast);
 *   - token shift: row r = b * T + t reads as its previous token row r - 1, or prev[b] when t == 0;
 *   - rows are split over OpenMP threads (threads from the caller, which follows
 *     torch.get_num_threads() and uses one thread for small inputs); the OpenMP runtime is the one
 *     torch already loaded (libgomp.so.1), so both share one thread pool.
 *
 * Rounding follows torch's: the files are compiled without FMA contraction, and fmaf is written out
 * exactly where torch fuses (addcmul), so fp32 results agree bit for bit or within an ulp or two.
 *
 * exp is a vectorisable Cephes-style polynomial (about 1 ulp, as Sleef's in torch), so every loop
 * here vectorises (AVX-512, AVX2 or baseline code, picked by configure()).
 *
 * The kernels live in _fused_mix.c, _fused_finch.c, _fused_act.c and _fused_lora.c (one concern each,
 * sharing _fused.h); this file holds the module: its configuration and the table of entry points.
 */
#include "_fused.h"
#include "_amx.h"

int isa_level = 0;
int fused_amx_ok = 0;

/* configure(*, portable): pick the row workers' ISA (the best the CPU has) and let the AMX paths run
   when the CPU and Linux allow it and portable is 0; sets the module's finch_mix_amx and returns it.
   The Python module calls it at import (rwkvkit.kernels decides). */
static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw) {
    int portable = 0;
    const named_arg spec[] = {{"portable", ARG_INT, &portable}};
    if (!parse_named("configure", args, kw, spec, NARGS(spec))) return NULL;
#ifdef HAVE_VARIANTS
    __builtin_cpu_init();
    isa_level = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        isa_level = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        isa_level = 1;
#endif
#ifdef HAVE_AMX
    fused_amx_ok = portable ? 0 : amx_request();
#endif
    PyObject *flag = PyLong_FromLong(fused_amx_ok);
    const int failed = !flag || PyObject_SetAttrString(self, "finch_mix_amx", flag) < 0;
    Py_XDECREF(flag);
    if (failed) return NULL;
    return PyBool_FromLong(fused_amx_ok);
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef methods[] = {
    {"mix", KW(fused_mix), "mix(*, R, T, C, M, x, prev, mix, lerp, out_dt, out, threads): token-shift mixes"},
    {"finch_mix", KW(fused_finch_mix),
     "finch_mix(*, R, T, C, D, x, prev, m, w2, mw_dt, maa, out_dt, out, threads): Finch's five mixes, maa_w2"},
    {"group_norm_gate", KW(fused_group_norm_gate),
     "group_norm_gate(*, R, C, N, y, g, g_dt, weight, bias, eps, out, out_dt, threads)"},
    {"relu_square", KW(fused_relu_square), "relu_square(*, n, k, dt, threads): k = relu(k)^2 in place"},
    {"sigmoid_mul", KW(fused_sigmoid_mul),
     "sigmoid_mul(*, R, C, r, v, in_dt, out, out_dt, res=None, threads): res: an fp32 residual to add"},
    {"lora", KW(fused_lora),
     "lora(*, R, K, D, N, x, w1, w2=None, out, threads): bf16(tanh(bf16(x @ w1))) [@ w2, rounded] (AMX)"},
    {"add_norm_mix", KW(fused_add_norm_mix),
     "add_norm_mix(*, R, T, C, M, x, add=None, add_dt, ln_w, ln_b, eps, prev, mix, lerp, out_dt, x_out=None, "
     "xn_out=None, last=None, out, threads): residual add, LayerNorm, token-shift mixes"},
    {"configure", KW(py_configure), "configure(*, portable): the ISA and AMX choice; returns whether AMX is used"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_cpu",
                                    "Fused element-wise kernels of an RWKV block on the CPU.", -1, methods};

PyMODINIT_FUNC PyInit__fused_cpu(void) {
    PyObject *mod = PyModule_Create(&module); /* baseline code, no AMX until configure() */
    if (mod && PyModule_AddIntConstant(mod, "finch_mix_amx", 0) < 0) Py_CLEAR(mod);
    return mod;
}
