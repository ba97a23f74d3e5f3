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
 *   MK_F16   float16 [n_out, n_in], widened exactly to float32
 * Activations are float32 everywhere (no 8-bit activations: one row's bf16 and int8 dot kernels carry
 * x as two bf16 parts or two 8-bit digits of a 16-bit number, _decode_rows1.c), sums are float32.
 * The Finch LoRAs are stored input-major ([n_in, n_out], as in the checkpoints) in float32, bfloat16 or
 * float16. fp16 models' layer rescaling (x halved after every `rescale`-th block) is in the plan.
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

static void step_team_of(const void *a, int tid, int nt) { step_team(a, tid, nt); }

/* step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, act_bf16, threads) */
static PyObject *py_step(PyObject *self, PyObject *args, PyObject *kw) {
    step_args a;
    long nt;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"plan", ARG_PTR, &a.P}, {"B", ARG_I64, &a.B}, {"x", ARG_PTR, &a.x},
        {"att_in", ARG_PTR, &a.att_in}, {"att_out", ARG_PTR, &a.att_out},
        {"ffn_in", ARG_PTR, &a.ffn_in}, {"ffn_out", ARG_PTR, &a.ffn_out},
        {"wkv_in", ARG_PTR, &a.wkv_in}, {"wkv_out", ARG_PTR, &a.wkv_out},
        {"logits", ARG_PTR, &a.logits}, {"act_bf16", ARG_INT, &a.act_bf16}, {"threads", ARG_LONG, &nt},
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
    team_run(step_team_of, &a, n_threads);
    Py_END_ALLOW_THREADS
    free(buf);
    free(claims);
    Py_RETURN_NONE;
}

/* matmul(*, kind, w, s, n, k, x, m, y, act_bf16, threads): y[m, n] = x[m, k] @ W^T (float32 x and y);
   act_bf16 = 1: x rounded to bf16 and the step's bf16-activation kernels (bf16 and int8 matrices). */
static PyObject *py_matmul(PyObject *self, PyObject *args, PyObject *kw) {
    mat_t mat;
    int64_t m;
    long nt;
    int act_bf16;
    const float *xp;
    float *yp;
    const named_arg spec[] = {
        {"kind", ARG_I64, &mat.kind}, {"w", ARG_I64, &mat.w}, {"s", ARG_I64, &mat.s}, {"n", ARG_I64, &mat.n},
        {"k", ARG_I64, &mat.k}, {"x", ARG_PTR, &xp}, {"m", ARG_I64, &m}, {"y", ARG_PTR, &yp},
        {"act_bf16", ARG_INT, &act_bf16}, {"threads", ARG_LONG, &nt},
    };
    if (!parse_named("matmul", args, kw, spec, NARGS(spec))) return NULL;
    const int64_t n = mat.n, k = mat.k;
    uint16_t *xb = NULL;
    if (act_bf16) {
        xb = malloc(sizeof(uint16_t) * (size_t)(m * k + 1));
        if (!xb) return PyErr_NoMemory();
    }
    const int n_threads = threads_at_least_1(nt);
    Py_BEGIN_ALLOW_THREADS
    if (xb) to_bf16(xp, xb, m * k);
#pragma omp parallel num_threads(n_threads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t b0 = 0; b0 < m; b0 += 16) { /* 16 rows of x at a time stay in L1/L2 */
            const int64_t bn = m - b0 < 16 ? m - b0 : 16;
            const job_t job = {&mat, xp + b0 * k, yp + b0 * n, xb ? xb + b0 * k : NULL};
            mats_team(&job, 1, bn, tid, team);
        }
    }
    Py_END_ALLOW_THREADS
    free(xb);
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

/* probe(*, kind, iters, buf, bytes, threads): each of `threads` threads runs probe_peak(kind, iters)
   (kind 0-2) or, kind 3, reads its share of `bytes` at `buf` (probe_read); returns the sum of their
   results. The caller times it (rwkvkit/bench/limits.py); -1: the CPU lacks the instruction. */
static PyObject *py_probe(PyObject *self, PyObject *args, PyObject *kw) {
    int kind;
    int64_t iters, bytes;
    const void *buf;
    long nt;
    const named_arg spec[] = {
        {"kind", ARG_INT, &kind}, {"iters", ARG_I64, &iters}, {"buf", ARG_OPT_PTR, &buf},
        {"bytes", ARG_I64, &bytes}, {"threads", ARG_LONG, &nt},
    };
    if (!parse_named("probe", args, kw, spec, NARGS(spec))) return NULL;
    if (kind < 0 || kind > 3 || (kind == 3 && (!buf || bytes < 0))) {
        PyErr_SetString(PyExc_ValueError, "probe: kind 0-2 (peaks) or 3 (read: buf and bytes >= 0)");
        return NULL;
    }
    const int n_threads = threads_at_least_1(nt);
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        if (kind < 3) {
            const double r = probe_peak(kind, iters);
            total += r < 0 ? -1e300 : r;
        } else {
            int64_t lo, hi; /* 64-byte pieces; the last thread also takes the bytes after the last piece */
            split(bytes / 64, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            const int64_t end = hi == bytes / 64 ? bytes : 64 * hi;
            total += probe_read((const char *)buf + 64 * lo, end - 64 * lo);
        }
    }
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(total < -1e299 ? -1.0 : total);
}

static PyObject *py_layout(PyObject *self, PyObject *args) {
    return Py_BuildValue("(LL)", (long long)PLAN_HEADER_INTS, (long long)LAYER_INTS);
}

/* configure(*, portable, bf16dp, rowdot): the matrix kernels' AVX-512 paths on (where the CPU has them and
   portable is 0) or off; VDPBF16PS for bf16 activations (where the CPU has it and bf16dp is 1: bf16dp=0 tests
   the AVX-512F fallback of CPUs without AVX512_BF16); the one-row dot kernels of bf16 (AVX512_BF16) and
   int8 (AVX512_VNNI) matrices (where the CPU has them and rowdot is 1: rowdot=0 runs the widening kernels
   of CPUs without them). Sets the module's avx512, bf16dp, dot_bf16 and dot_vnni; returns avx512. The
   Python module calls it at import. */
static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw) {
    int portable = 0, bf16dp = 1, rowdot = 1;
    const named_arg spec[] = {
        {"portable", ARG_INT, &portable}, {"bf16dp", ARG_INT, &bf16dp}, {"rowdot", ARG_INT, &rowdot},
    };
    if (!parse_named("configure", args, kw, spec, NARGS(spec))) return NULL;
    matvec_configure(portable, rowdot);
    use_bf16dp = 0;
#if HAVE_X86
    use_bf16dp = use_avx512 && bf16dp && __builtin_cpu_supports("avx512bf16");
#endif
    const char *names[4] = {"avx512", "bf16dp", "dot_bf16", "dot_vnni"};
    const int values[4] = {use_avx512, use_bf16dp, use_dot_bf16, use_dot_vnni};
    for (int i = 0; i < 4; i++) {
        PyObject *flag = PyLong_FromLong(values[i]);
        const int failed = !flag || PyObject_SetAttrString(self, names[i], flag) < 0;
        Py_XDECREF(flag);
        if (failed) return NULL;
    }
    return PyBool_FromLong(use_avx512);
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef methods[] = {
    {"step", KW(py_step),
     "step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, act_bf16, threads): "
     "one token"},
    {"matmul", KW(py_matmul), "matmul(*, kind, w, s, n, k, x, m, y, act_bf16, threads): y = x @ W^T"},
    {"dequantize_q8", KW(py_dequantize_q8), "dequantize_q8(*, q, s, n, k, out, threads): bf16 q * scale"},
    {"probe", KW(py_probe), "probe(*, kind, iters, buf, bytes, threads): the machine's limits (benchmarks)"},
    {"layout", py_layout, METH_NOARGS, "(header ints, ints per layer) of the plan"},
    {"configure", KW(py_configure), "configure(*, portable, bf16dp, rowdot): AVX-512 on (portable=0, where available) or off; "
     "VDPBF16PS on (bf16dp=1, where available) or the bf16 products as fp32 FMAs; the one-row dot kernels of bf16 "
     "and int8 on (rowdot=1, where available) or the widening kernels"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_decode_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode_cpu(void) {
    PyObject *mod = PyModule_Create(&moddef); /* plain C kernels until configure() */
    const char *names[4] = {"avx512", "bf16dp", "dot_bf16", "dot_vnni"};
    for (int i = 0; mod && i < 4; i++)
        if (PyModule_AddIntConstant(mod, names[i], 0) < 0) Py_CLEAR(mod);
    return mod;
}
