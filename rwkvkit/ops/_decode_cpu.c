/* rwkvkit.ops._decode_cpu: one-token (T = 1) steps of Eagle and Finch on the CPU, and the matrix
 * kernels behind int8 weights.
 *
 * Decoding a token reads every weight once and does little else, so its speed is bytes per token over
 * memory bandwidth plus a fixed cost per operation. In PyTorch a Finch layer is about 40 small ops,
 * each a few microseconds of dispatch for 768 numbers of work; here a whole step (every layer and the
 * head) is one call, inside one OpenMP parallel region: matrix-vector products split their output rows
 * over the threads, the small element-wise work runs on thread 0 between barriers.
 *
 * OpenMP is the runtime PyTorch itself uses on Linux (its libgomp.so.1 is already loaded when this
 * module is), so these threads are PyTorch's threads: no second pool competing for the cores.
 *
 * Weights are read where the model keeps them; each matrix is described by (kind, n_out, n_in, data,
 * scales):
 *   MK_F32   float32 [n_out, n_in]
 *   MK_BF16  bfloat16 [n_out, n_in], widened exactly to float32
 *   MK_Q8    int8 [n_out, n_in] with one float16 scale per block of 32 inputs, [n_out, n_in / 32]
 *            (the layout of ggml's Q8_0: w = q * scale)
 * Activations are float32 everywhere (no activation quantisation), sums are float32.
 * The Finch LoRAs are stored input-major ([n_in, n_out], as in the checkpoints) in float32 or bfloat16.
 *
 * The step computes exactly what rwkvkit/models (the PyTorch modules, checked against the reference)
 * compute; its numbers differ from them only by summation order (and, for bf16 / int8 models, by not
 * rounding activations to bf16 between operations). The plan (which pointer is which weight) is a flat
 * int64 array built by rwkvkit/models/engine.py; its layout is the structs of _decode.h.
 *
 * The parts: _decode_matvec.c (matrix kernels), _decode_step.c (the step), this file (the Python
 * module: keyword arguments read into the structs of _decode.h, see _args.h).
 */
#include "_decode.h"

/* ---- Python entry points (keyword arguments only) ------------------------------------------------ */

/* step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, threads) */
static PyObject *py_step(PyObject *self, PyObject *args, PyObject *kw) {
    step_args a;
    long nt;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"plan", ARG_PTR, &a.P}, {"B", ARG_I64, &a.B}, {"x", ARG_PTR, &a.x},
        {"att_in", ARG_PTR, &a.att_in}, {"att_out", ARG_PTR, &a.att_out},
        {"ffn_in", ARG_PTR, &a.ffn_in}, {"ffn_out", ARG_PTR, &a.ffn_out},
        {"wkv_in", ARG_PTR, &a.wkv_in}, {"wkv_out", ARG_PTR, &a.wkv_out},
        {"logits", ARG_PTR, &a.logits}, {"threads", ARG_LONG, &nt},
    };
    if (!parse_named("step", args, kw, spec, NARGS(spec))) return NULL;
    if (a.B < 1) {
        PyErr_SetString(PyExc_ValueError, "step: B must be positive");
        return NULL;
    }
    const plan_t *P = a.P;
    float *buf = malloc(sizeof(float) * (size_t)scratch_floats(P, a.B));
    const size_t n_claims = (size_t)(CLAIMS_PER_LAYER * P->n_layer + 1);
    atomic_long *claims = calloc(n_claims, sizeof(atomic_long));
    team_barrier_t bar;
    atomic_init(&bar.count, 0);
    atomic_init(&bar.gen, 0);
    if (!buf || !claims) {
        free(buf);
        free(claims);
        return PyErr_NoMemory();
    }
    a.buf = buf;
    a.bar = &bar;
    a.claims = claims;
    const int n_threads = threads_at_least_1(nt);
    Py_BEGIN_ALLOW_THREADS
#if HAVE_X86
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* flush denormals (decayed states) on this thread; workers set their own */
#endif
#pragma omp parallel num_threads(n_threads)
    {
#if HAVE_X86
        const unsigned int wcsr = _mm_getcsr();
        _mm_setcsr(wcsr | 0x8040);
#endif
        step_team(&a, omp_get_thread_num(), omp_get_num_threads());
#if HAVE_X86
        _mm_setcsr(wcsr);
#endif
    }
#if HAVE_X86
    _mm_setcsr(csr);
#endif
    Py_END_ALLOW_THREADS
    free(buf);
    free(claims);
    Py_RETURN_NONE;
}

/* matmul(*, kind, w, s, n, k, x, m, y, threads): y[m, n] = x[m, k] @ W^T (float32 x and y). */
static PyObject *py_matmul(PyObject *self, PyObject *args, PyObject *kw) {
    mat_t mat;
    int64_t m;
    long nt;
    const float *xp;
    float *yp;
    const named_arg spec[] = {
        {"kind", ARG_I64, &mat.kind}, {"w", ARG_I64, &mat.w}, {"s", ARG_I64, &mat.s}, {"n", ARG_I64, &mat.n},
        {"k", ARG_I64, &mat.k}, {"x", ARG_PTR, &xp}, {"m", ARG_I64, &m}, {"y", ARG_PTR, &yp},
        {"threads", ARG_LONG, &nt},
    };
    if (!parse_named("matmul", args, kw, spec, NARGS(spec))) return NULL;
    const int64_t n = mat.n, k = mat.k;
    const int n_threads = threads_at_least_1(nt);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(n_threads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t b0 = 0; b0 < m; b0 += 16) { /* 16 rows of x at a time stay in L1/L2 */
            const int64_t bn = m - b0 < 16 ? m - b0 : 16;
            const job_t job = {&mat, xp + b0 * k, yp + b0 * n};
            mats_team(&job, 1, bn, tid, team);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* dequantize_q8(*, q, s, n, k, out, threads): out[n, k] bfloat16 = q * scale (rounded to nearest even). */
static PyObject *py_dequantize_q8(PyObject *self, PyObject *args, PyObject *kw) {
    const int8_t *qp;
    const uint16_t *sp;
    uint16_t *op;
    int64_t n, k;
    long nt;
    const named_arg spec[] = {
        {"q", ARG_PTR, &qp}, {"s", ARG_PTR, &sp}, {"n", ARG_I64, &n}, {"k", ARG_I64, &k},
        {"out", ARG_PTR, &op}, {"threads", ARG_LONG, &nt},
    };
    if (!parse_named("dequantize_q8", args, kw, spec, NARGS(spec))) return NULL;
    const int n_threads = threads_at_least_1(nt);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(n_threads)
    {
        int64_t lo, hi;
        split(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (int64_t r = lo; r < hi; r++)
            for (int64_t j = 0; j < k / 32; j++) {
                const float sc = f16f(sp[r * (k / 32) + j]);
                for (int64_t i = 0; i < 32; i++)
                    op[r * k + 32 * j + i] = f32_to_bf16((float)qp[r * k + 32 * j + i] * sc);
            }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_layout(PyObject *self, PyObject *args) {
    return Py_BuildValue("(LL)", (long long)PLAN_HEADER_INTS, (long long)LAYER_INTS);
}

/* configure(*, portable): the matrix kernels' AVX-512 paths on (where the CPU has them and portable is 0)
   or off; sets the module's avx512 and returns it. The Python module calls it at import. */
static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw) {
    int portable = 0;
    const named_arg spec[] = {{"portable", ARG_INT, &portable}};
    if (!parse_named("configure", args, kw, spec, NARGS(spec))) return NULL;
    use_avx512 = 0;
#if HAVE_X86
    __builtin_cpu_init();
    use_avx512 = !portable && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#endif
    PyObject *flag = PyLong_FromLong(use_avx512);
    const int failed = !flag || PyObject_SetAttrString(self, "avx512", flag) < 0;
    Py_XDECREF(flag);
    if (failed) return NULL;
    return PyBool_FromLong(use_avx512);
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef methods[] = {
    {"step", KW(py_step),
     "step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, threads): one token"},
    {"matmul", KW(py_matmul), "matmul(*, kind, w, s, n, k, x, m, y, threads): y = x @ W^T"},
    {"dequantize_q8", KW(py_dequantize_q8), "dequantize_q8(*, q, s, n, k, out, threads): bf16 q * scale"},
    {"layout", py_layout, METH_NOARGS, "(header ints, ints per layer) of the plan"},
    {"configure", KW(py_configure), "configure(*, portable): AVX-512 on (portable=0, where available) or off"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_decode_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode_cpu(void) {
    PyObject *mod = PyModule_Create(&moddef); /* plain C kernels until configure() */
    if (mod && PyModule_AddIntConstant(mod, "avx512", 0) < 0) Py_CLEAR(mod);
    return mod;
}
