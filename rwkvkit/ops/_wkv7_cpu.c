/* rwkvkit.ops._wkv7_cpu: the RWKV-7 WKV recurrence on the CPU, forward only (inference).
 *
 * The exact per-token recurrence of wkv7_naive (rwkvkit/ops/wkv7.py, the source of truth), per
 * (batch, head) pair and token, with the state [N(value)][N(key)] fp32:
 *     S_i <- S_i * exp(w) + (S_i . a) b + v_i k ;   y_i = S_i . r
 * Two paths, both exact to fp32 rounding, per (batch, head) pair:
 * - calls of >= SEQ_MIN tokens (prefill): the head's state is transposed to key-major X = S^T, and
 *   each token is one pass over X whose every loop is an axpy over values (S a^T accumulated from
 *   the rows as they are written, for the next token); no horizontal reductions. Back at the end.
 * - shorter calls (decode): _wkv7_step.h's row step on the [value][key] state as it is (each row
 *   gives its two dot products and its update), the function a one-token decode step can share.
 * Each token's six vectors are read here (fp32 or bf16, converted per token), the decay exp(w) is
 * taken here (vectorised), and (batch, head) pairs are split over OpenMP threads (PyTorch's own
 * pool: the same libgomp). Decay factors lie in (0, 1], so nothing grows that the recurrence itself
 * does not; denormals are flushed to zero (they are below 1e-38).
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

/* A call of at least SEQ_MIN tokens transposes each head's state to key-major (X[j][i] = S[i][j]) for
   the sequence pass below, and back at the end; shorter calls (decode) run _wkv7_step.h's row step
   on the state as it is. */
#define SEQ_MIN 4

/* token t of batch row b, head h: its six vectors as fp32 into x (6 * N floats, in the order of
   wkv7_vecs_t: r, d, k, v, a, b), the decay factor d = exp(w) taken here */
ALWAYS_INLINE void load_token(const wkv7_seq_t *sq, long b, long h, long t, float *restrict x) {
    const long N = sq->N, off = ((b * sq->T + t) * sq->H + h) * N;
    for (int j = 0; j < 6; j++) load_vec(x + j * N, sq->in[j], sq->bf16[j], off, N);
    for (long i = 0; i < N; i++) x[IN_W * N + i] = fexp(x[IN_W * N + i]); /* in (0, 1] */
}

ALWAYS_INLINE wkv7_vecs_t vecs_at(const float *x, long N) {
    return (wkv7_vecs_t){x, x + N, x + 2 * N, x + 3 * N, x + 4 * N, x + 5 * N};
}

/* The key-major sequence pass of one head, any N: per token one pass over X, row j (key j) giving
       X_j <- d_j X_j + b_j sa + k_j v,   y += r_j X_j,   sa' += a'_j X_j
   (sa = S a^T over values, sa' the next token's, accumulated from the rows just written, in the
   same order as the first token's own pass). No reductions: every loop is an axpy over values.
   tok: two token buffers of 6 * N, acc: 3 * N floats (sa, sa', y). */
ALWAYS_INLINE void seq_head_generic(const wkv7_seq_t *sq, long b, long h, float *restrict X, float *tok,
                                    float *restrict acc) {
    const long N = sq->N, T = sq->T;
    float *restrict sa = acc, *restrict san = acc + N, *restrict y = acc + 2 * N;
    load_token(sq, b, h, 0, tok);
    const float *a0 = tok + IN_A * N;
    for (long i = 0; i < N; i++) sa[i] = 0.0f;
    for (long j = 0; j < N; j++)
        for (long i = 0; i < N; i++) sa[i] += a0[j] * X[j * N + i];
    for (long t = 0; t < T; t++) {
        const float *cur = tok + (t & 1) * 6 * N, *nxt = tok + ((t + 1) & 1) * 6 * N;
        if (t + 1 < T) load_token(sq, b, h, t + 1, (float *)nxt);
        const float *r = cur, *d = cur + N, *k = cur + 2 * N, *v = cur + 3 * N, *bb = cur + 5 * N;
        const float *an = nxt + IN_A * N;
        for (long i = 0; i < N; i++) y[i] = 0.0f, san[i] = 0.0f;
        for (long j = 0; j < N; j++) {
            float *restrict Xj = X + j * N;
            const float dj = d[j], bj = bb[j], kj = k[j], rj = r[j], aj = t + 1 < T ? an[j] : 0.0f;
            for (long i = 0; i < N; i++) {
                const float x = Xj[i] * dj + (bj * sa[i] + kj * v[i]);
                y[i] += rj * x;
                san[i] += aj * x;
                Xj[i] = x;
            }
        }
        memcpy(sq->y + ((b * T + t) * sq->H + h) * N, y, sizeof(float) * (size_t)N);
        memcpy(sa, san, sizeof(float) * (size_t)N);
    }
}

#ifdef WKV7_HAVE_N64_AVX512
/* The same pass for N == 64 with AVX-512: sa, sa', v and y stay in registers (four each), a row of X
   is four registers, the token's per-key scalars are broadcast. */
WKV7_N64_TARGET static void seq_head_n64(const wkv7_seq_t *sq, long b, long h, float *X, float *tok) {
    const long N = 64, T = sq->T;
    __m512 sa[4], san[4], y[4], v[4];
    load_token(sq, b, h, 0, tok);
    for (int q = 0; q < 4; q++) sa[q] = _mm512_setzero_ps();
    for (long j = 0; j < N; j++) {
        const __m512 aj = _mm512_set1_ps(tok[IN_A * N + j]);
        for (int q = 0; q < 4; q++) sa[q] = _mm512_fmadd_ps(aj, _mm512_loadu_ps(X + j * N + 16 * q), sa[q]);
    }
    for (long t = 0; t < T; t++) {
        const float *cur = tok + (t & 1) * 6 * N, *nxt = tok + ((t + 1) & 1) * 6 * N;
        if (t + 1 < T) load_token(sq, b, h, t + 1, (float *)nxt);
        const float *r = cur, *d = cur + N, *k = cur + 2 * N, *bb = cur + 5 * N, *an = nxt + IN_A * N;
        const int more = t + 1 < T;
        for (int q = 0; q < 4; q++) {
            v[q] = _mm512_loadu_ps(cur + IN_V * N + 16 * q);
            y[q] = san[q] = _mm512_setzero_ps();
        }
        for (long j = 0; j < N; j++) {
            float *Xj = X + j * N;
            const __m512 dj = _mm512_set1_ps(d[j]), bj = _mm512_set1_ps(bb[j]), kj = _mm512_set1_ps(k[j]);
            const __m512 rj = _mm512_set1_ps(r[j]), aj = _mm512_set1_ps(more ? an[j] : 0.0f);
            for (int q = 0; q < 4; q++) {
                const __m512 w = _mm512_fmadd_ps(bj, sa[q], _mm512_mul_ps(kj, v[q]));
                const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(Xj + 16 * q), dj, w);
                y[q] = _mm512_fmadd_ps(rj, x, y[q]);
                san[q] = _mm512_fmadd_ps(aj, x, san[q]);
                _mm512_storeu_ps(Xj + 16 * q, x);
            }
        }
        float *yt = sq->y + ((b * T + t) * sq->H + h) * N;
        for (int q = 0; q < 4; q++) _mm512_storeu_ps(yt + 16 * q, y[q]), sa[q] = san[q];
    }
}
#endif

/* Decode (calls of fewer than SEQ_MIN tokens): batch rows first .. last - 1, token by token, every
   head through _wkv7_step.h's wkv7_token_heads on the [value][key] state. buf: 6 * H * N + N floats. */
MULTIVERSION
static void run_rows_step(const wkv7_seq_t *sq, long first, long last, float *buf) {
    const long T = sq->T, HN = sq->H * sq->N;
    for (long b = first; b < last; b++)
        for (long t = 0; t < T; t++) {
            const long off = (b * T + t) * HN;
            for (int j = 0; j < 6; j++) load_vec(buf + j * HN, sq->in[j], sq->bf16[j], off, HN);
            for (long i = 0; i < HN; i++) buf[IN_W * HN + i] = fexp(buf[IN_W * HN + i]); /* in (0, 1] */
            const wkv7_token_t tk = {sq->H, sq->N, sq->state + b * HN * sq->N, vecs_at(buf, HN), sq->y + off};
            wkv7_token_heads(&tk, buf + 6 * HN, sq->avx512);
        }
}

/* Prompts: (batch, head) pairs first .. last - 1, each head's state transposed to key-major for the
   sequence pass and back. buf: N * N + 15 * N floats (the transposed state, two token buffers, the
   generic pass's accumulators). */
MULTIVERSION
static void run_pairs_seq(const wkv7_seq_t *sq, long first, long last, float *buf) {
    const long H = sq->H, N = sq->N;
    float *X = buf, *tok = buf + N * N, *acc = tok + 12 * N;
    for (long bh = first; bh < last; bh++) {
        const long b = bh / H, h = bh % H;
        float *S = sq->state + bh * N * N;
        for (long i = 0; i < N; i++)
            for (long j = 0; j < N; j++) X[j * N + i] = S[i * N + j];
#ifdef WKV7_HAVE_N64_AVX512
        if (sq->avx512 && N == 64)
            seq_head_n64(sq, b, h, X, tok);
        else
#endif
            seq_head_generic(sq, b, h, X, tok, acc);
        for (long i = 0; i < N; i++)
            for (long j = 0; j < N; j++) S[i * N + j] = X[j * N + i];
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
    /* work units split over threads: batch rows when decoding, (batch, head) pairs otherwise */
    const int decode = sq.T < SEQ_MIN;
    const long units = decode ? sq.B : sq.B * sq.H;
    const size_t nbuf = decode ? (size_t)(7 * sq.H * sq.N) : (size_t)(sq.N * sq.N + 15 * sq.N);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > units) nthreads = (int)units;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    /* OpenMP, not threads of our own: the pool is PyTorch's (the same libgomp), whose workers would
       otherwise spin on the cores between its ops while ours run */
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (nthreads > 1)
    {
        const int i = omp_get_thread_num(), n = omp_get_num_threads();
        float *buf = (float *)malloc(sizeof(float) * nbuf);
        if (!buf) {
            failed = 1;
        } else {
            FTZ_ON();
            const long first = units * i / n, last = units * (i + 1) / n;
            if (decode)
                run_rows_step(&sq, first, last, buf);
            else
                run_pairs_seq(&sq, first, last, buf);
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
