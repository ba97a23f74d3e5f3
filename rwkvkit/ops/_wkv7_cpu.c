/* rwkvkit.ops._wkv7_cpu: the RWKV-7 WKV recurrence on the CPU, forward only (inference).
 *
 * The exact per-token recurrence of wkv7_naive (rwkvkit/ops/wkv7.py, the source of truth), per
 * (batch, head) pair and token, with the state [N(value)][N(key)] fp32:
 *     S_i <- S_i * exp(w) + (S_i . a) b + v_i k ;   y_i = S_i . r
 * The per-token update of one head is _wkv7_step.h's (shared with a one-token decode step); this
 * file adds the sequence loop: each token's six vectors are read (fp32 or bf16, converted here), the
 * decay exp(w) is taken here (vectorised), and (batch, head) pairs are split over OpenMP threads
 * (PyTorch's own pool: the same libgomp). Decay factors lie in (0, 1], so nothing grows that the
 * recurrence itself does not; denormals are flushed to zero (they are below 1e-38).
 *
 * Python entry: wkv7_forward(*, B, T, H, N, r, w, k, v, a, b, r_bf16, w_bf16, k_bf16, v_bf16, a_bf16,
 * b_bf16, state, y, threads, portable=False), all keyword arguments (portable: the portable loop even
 * where the AVX-512 one applies, for tests); r..b, state and y are raw pointers (integers) to
 * contiguous buffers validated by the wrapper (rwkvkit/ops/wkv7_native.py):
 *   r, w, k, v, a, b: [B, T, H, N] float32, or bfloat16 where their x_bf16 flag is 1; w the LOG decay;
 *   state: [B, H, N, N] float32 [value][key], updated in place; y: [B, T, H, N] float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FTZ_ON() unsigned int csr_saved_ = _mm_getcsr(); _mm_setcsr(csr_saved_ | 0x8040)
#define FTZ_OFF() _mm_setcsr(csr_saved_)
#else
#define FTZ_ON() (void)0
#define FTZ_OFF() (void)0
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"
#include "_wkv7_step.h"

#define MAX_THREADS 64

/* the sequence: shapes, the six inputs (each fp32 or bf16), the state and the output */
typedef struct {
    long B, T, H, N;
    const void *in[6]; /* r, w, k, v, a, b: [B, T, H, N] */
    int bf16[6];
    float *state; /* [B, H, N, N] */
    float *y;     /* [B, T, H, N] */
    int avx512;
} wkv7_seq_t;

enum { IN_R, IN_W, IN_K, IN_V, IN_A, IN_B };

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void load_vec(float *restrict dst, const void *src, int bf16, long off, long n) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + off, sizeof(float) * (size_t)n);
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* (batch, head) pairs first .. last - 1, all tokens. buf: 7 * N floats (the token's six vectors,
   the generic step's scratch). */
MULTIVERSION
static void run_pairs(const wkv7_seq_t *sq, long first, long last, float *buf) {
    const long T = sq->T, H = sq->H, N = sq->N;
    float *x[6];
    for (int j = 0; j < 6; j++) x[j] = buf + j * N;
    const wkv7_vecs_t vecs = {x[IN_R], x[IN_W], x[IN_K], x[IN_V], x[IN_A], x[IN_B]}; /* d in place of w */
    for (long bh = first; bh < last; bh++) {
        const long b = bh / H, h = bh % H;
        float *S = sq->state + bh * N * N;
        for (long t = 0; t < T; t++) {
            const long off = ((b * T + t) * H + h) * N;
            for (int j = 0; j < 6; j++) load_vec(x[j], sq->in[j], sq->bf16[j], off, N);
            for (long i = 0; i < N; i++) x[IN_W][i] = fexp(x[IN_W][i]); /* decay factor, in (0, 1] */
#ifdef WKV7_HAVE_N64_AVX512
            if (sq->avx512 && N == 64) {
                wkv7_head_n64(S, &vecs, sq->y + off);
                continue;
            }
#endif
            wkv7_head_generic(S, &vecs, sq->y + off, buf + 6 * N, N);
        }
    }
}

static PyObject *wkv7_forward(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"B", "T", "H", "N", "r", "w", "k", "v", "a", "b", "r_bf16", "w_bf16", "k_bf16",
                             "v_bf16", "a_bf16", "b_bf16", "state", "y", "threads", "portable", NULL};
    /* keyword-only arguments must be optional in the format ("|$"): missing ones stay 0, refused below */
    wkv7_seq_t sq = {0};
    unsigned long long p[6] = {0}, ps = 0, py = 0;
    int nthreads = 1, portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$llllKKKKKKiiiiiiKKip", kwlist, &sq.B, &sq.T, &sq.H, &sq.N,
                                     &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &sq.bf16[0], &sq.bf16[1],
                                     &sq.bf16[2], &sq.bf16[3], &sq.bf16[4], &sq.bf16[5], &ps, &py, &nthreads,
                                     &portable))
        return NULL;
    if (sq.B <= 0 || sq.T <= 0 || sq.H <= 0 || sq.N <= 0) {
        PyErr_SetString(PyExc_ValueError, "wkv7_forward: B, T, H, N must be given and positive");
        return NULL;
    }
    if (!p[0] || !p[1] || !p[2] || !p[3] || !p[4] || !p[5] || !ps || !py) {
        PyErr_SetString(PyExc_ValueError, "wkv7_forward: r, w, k, v, a, b, state and y must be given (non-null)");
        return NULL;
    }
    for (int j = 0; j < 6; j++) sq.in[j] = (const void *)(uintptr_t)p[j];
    sq.state = (float *)(uintptr_t)ps;
    sq.y = (float *)(uintptr_t)py;
#ifdef WKV7_HAVE_N64_AVX512
    sq.avx512 = !portable && wkv7_avx512_ok();
#else
    sq.avx512 = 0;
#endif
    const long pairs = sq.B * sq.H;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > pairs) nthreads = (int)pairs;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    /* OpenMP, not threads of our own: the pool is PyTorch's (the same libgomp), whose workers would
       otherwise spin on the cores between its ops while ours run */
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (nthreads > 1)
    {
        const int i = omp_get_thread_num(), n = omp_get_num_threads();
        float *buf = (float *)malloc(sizeof(float) * 7 * (size_t)sq.N);
        if (!buf) {
            failed = 1;
        } else {
            FTZ_ON();
            run_pairs(&sq, pairs * i / n, pairs * (i + 1) / n, buf);
            FTZ_OFF();
            free(buf);
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"wkv7_forward", (PyCFunction)(void (*)(void))wkv7_forward, METH_VARARGS | METH_KEYWORDS,
     "wkv7_forward(*, B, T, H, N, r, w, k, v, a, b, r_bf16, w_bf16, k_bf16, v_bf16, a_bf16, b_bf16, "
     "state, y, threads, portable=False): the RWKV-7 WKV over a sequence; raw pointers, keyword arguments only"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wkv7_cpu", "RWKV-7 WKV forward on the CPU.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__wkv7_cpu(void) { return PyModule_Create(&module); }
