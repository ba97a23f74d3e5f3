/* rwkvkit.ops._wkv7_fused: RWKV-7's time-mix between its matrices, for prompts on the CPU, in one pass.
 *
 * After the block's matrix products (r, k, v and the LoRAs' outputs, fp32 or bf16 [B, T, C]) the
 * time-mix is element-wise work per (token, head) around the WKV recurrence; in PyTorch it is some
 * thirty passes over [B, T, C] (most of a bf16 prompt's time). Here each (batch row, head) pair runs
 * over its tokens once, per token (fp32 throughout, x the head's slice of N channels):
 *     kk = k * k_k / |k * k_k|                            (L2 over the head, floor 1e-12)
 *     a  = sigmoid(a0 + za);  k' = k * (1 + (a - 1) * k_a)
 *     v' = v (layer 0, also written to v_first) or v + (v_first - v) * sigmoid(v0 + zv)
 *     d  = exp(-exp(-0.5) * sigmoid(w0 + zw))              (the decay factor)
 *     S <- S * d + (S . -kk) (kk * a) + v' k'; y = S r     (state [value][key]; _wkv7_step.h's row step,
 *                                                        or with AVX-512 and N = 64 head_n64_t on a
 *                                                        transposed copy of the head's state)
 *     out = (GroupNorm_head(y) * ln_x + bonus * v') * g,  bonus = sum(r * k' * r_k)
 * which is TimeMix7.forward (rwkvkit/models/rwkv7.py) from its matrices' outputs to the output
 * matrix's input, up to summation order (the tests hold the two together). (batch, head) pairs are
 * split over OpenMP threads (PyTorch's libgomp). The inputs are read two tokens ahead (software
 * prefetch: a pair's slices are C apart from token to token). One bf16 512-token layer of the 0.1B shape
 * (12 heads), one thread: 12.8 ms -> 4.8 ms with the transposed kernel, the vectorised element-wise
 * loops (ivdep) and the prefetch.
 *
 * Python entry: timemix(*, B, T, H, N, r, k, v, zw, za, zv, g, <name>_bf16 for each, v_first,
 * w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, state, out, out_bf16, first, threads, portable): pointers as
 * integers to contiguous buffers checked by rwkvkit/ops/wkv7_fused.py; zv may be 0 in layer 0;
 * v_first [B, T, C] fp32 (written when first, read otherwise); the parameters fp32 [C]; state
 * [B, H, N, N] fp32 updated in place; out [B, T, C] fp32 or bf16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "_args.h"
#include "_cpu_math.h"
#include "_wkv7_step.h"

enum { I_R, I_K, I_V, I_ZW, I_ZA, I_ZV, I_G, N_IN };
static const char *const IN_NAMES[N_IN] = {"r", "k", "v", "zw", "za", "zv", "g"};

typedef struct {
    long B, T, H, N;
    const void *in[N_IN];
    int bf16[N_IN];
    float *v_first;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;
    float *state;
    void *out;
    int out_bf16, first, avx512;
} tm7_t;

static inline void load(float *restrict dst, const void *src, int bf16, long off, long n) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + off, sizeof(float) * (size_t)n);
    }
}

static inline float sigm(float x) { return 1.f / (1.f + fexp(-x)); }

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

#ifdef WKV7_HAVE_N64_AVX512
/* N == 64 with AVX-512 on the TRANSPOSED state St [key][value] (pair() transposes the head's state in
 * and out once per call): a row of St is one key's column of S over the 64 values, so S . a and the
 * output are sums of rows scaled by broadcast scalars, vector accumulations with no horizontal sums:
 *     sa = sum_j St_j a_j;  y = sum_j St_j (d_j r_j) + sa (b . r) + v (k . r)   (old state, as above)
 *     St_j <- St_j d_j + sa b_j + v k_j
 * about 3x fewer instructions per (token, head) than the row-wise kernel. Same math, another
 * summation order (sequential over keys, in two interleaved halves). */
WKV7_N64_TARGET static void head_n64_t(float *restrict St, const wkv7_vecs_t *t, float *restrict y) {
    __m512 sa[4], yo[4], sb[4], yb[4], V[4];
    for (int q = 0; q < 4; q++) sa[q] = yo[q] = sb[q] = yb[q] = _mm512_setzero_ps();
    for (int j = 0; j < 64; j += 2) {
        const float *s0 = St + 64 * j, *s1 = s0 + 64;
        const __m512 a0 = _mm512_set1_ps(t->a[j]), a1 = _mm512_set1_ps(t->a[j + 1]);
        const __m512 r0 = _mm512_set1_ps(t->d[j] * t->r[j]), r1 = _mm512_set1_ps(t->d[j + 1] * t->r[j + 1]);
        for (int q = 0; q < 4; q++) {
            const __m512 x0 = _mm512_loadu_ps(s0 + 16 * q), x1 = _mm512_loadu_ps(s1 + 16 * q);
            sa[q] = _mm512_fmadd_ps(x0, a0, sa[q]), yo[q] = _mm512_fmadd_ps(x0, r0, yo[q]);
            sb[q] = _mm512_fmadd_ps(x1, a1, sb[q]), yb[q] = _mm512_fmadd_ps(x1, r1, yb[q]);
        }
    }
    __m512 bsum = _mm512_setzero_ps(), ksum = _mm512_setzero_ps();
    for (int q = 0; q < 4; q++) {
        const __m512 r = _mm512_loadu_ps(t->r + 16 * q);
        bsum = _mm512_fmadd_ps(_mm512_loadu_ps(t->b + 16 * q), r, bsum);
        ksum = _mm512_fmadd_ps(_mm512_loadu_ps(t->k + 16 * q), r, ksum);
    }
    const __m512 br = _mm512_set1_ps(_mm512_reduce_add_ps(bsum)), kr = _mm512_set1_ps(_mm512_reduce_add_ps(ksum));
    for (int q = 0; q < 4; q++) {
        V[q] = _mm512_loadu_ps(t->v + 16 * q);
        sa[q] = _mm512_add_ps(sa[q], sb[q]);
        const __m512 o = _mm512_fmadd_ps(sa[q], br, _mm512_add_ps(yo[q], yb[q]));
        _mm512_storeu_ps(y + 16 * q, _mm512_fmadd_ps(V[q], kr, o));
    }
    for (int j = 0; j < 64; j++) {
        float *row = St + 64 * j;
        const __m512 dj = _mm512_set1_ps(t->d[j]), bj = _mm512_set1_ps(t->b[j]), kj = _mm512_set1_ps(t->k[j]);
        for (int q = 0; q < 4; q++) {
            const __m512 x = _mm512_loadu_ps(row + 16 * q);
            _mm512_storeu_ps(row + 16 * q, _mm512_fmadd_ps(x, dj, _mm512_fmadd_ps(sa[q], bj, _mm512_mul_ps(V[q], kj))));
        }
    }
}
#endif

static void transpose(float *restrict dst, const float *restrict src, long N) {
    for (long i = 0; i < N; i++)
        for (long j = 0; j < N; j++) dst[j * N + i] = src[i * N + j];
}

/* one (batch row, head) pair over every token; buf: 12 * N + N * N floats */
MULTIVERSION static void pair(const tm7_t *p, long b, long h, float *buf) {
    const long N = p->N, C = p->H * N, c0 = h * N;
    float *r = buf, *k = r + N, *v = k + N, *zw = v + N, *za = zw + N, *zv = za + N, *g = zv + N;
    float *d = g + N, *aa = d + N, *bb = aa + N, *y = bb + N, *dr = y + N;
    float *S = p->state + (b * p->H + h) * N * N;
    const float *w0 = p->w0 + c0, *a0 = p->a0 + c0, *v0 = p->v0 + c0, *k_k = p->k_k + c0;
    const float *k_a = p->k_a + c0, *r_k = p->r_k + c0, *lw = p->lnx_w + c0, *lb = p->lnx_b + c0;
    float *vals[N_IN] = {r, k, v, zw, za, zv, g};
    float *St = NULL; /* the transposed state of head_n64_t, or NULL for the row-wise kernels */
#ifdef WKV7_HAVE_N64_AVX512
    if (p->avx512 && N == 64) {
        St = dr + N;
        transpose(St, S, N);
    }
#endif
    for (long t = 0; t < p->T; t++) {
        const long off = (b * p->T + t) * C + c0;
        if (t + 2 < p->T) { /* the inputs are strided by C across tokens: fetch two tokens ahead */
            const long ahead = off + 2 * C;
            for (int j = 0; j < N_IN; j++) {
                if (!p->in[j]) continue;
                const char *q = (const char *)p->in[j] + ahead * (p->bf16[j] ? 2 : 4);
                for (long c = 0; c < N * (p->bf16[j] ? 2 : 4); c += 64) __builtin_prefetch(q + c);
            }
            if (!p->first)
                for (long c = 0; c < N * 4; c += 64) __builtin_prefetch((const char *)(p->v_first + ahead) + c);
        }
        for (int j = 0; j < N_IN; j++)
            if (j != I_ZV || !p->first) load(vals[j], p->in[j], p->bf16[j], off, N);
        float nrm = 0.f;
        for (long i = 0; i < N; i++) {
            const float q = k[i] * k_k[i];
            nrm += q * q;
        }
        nrm = sqrtf(nrm);
        const float inv = 1.f / (nrm > 1e-12f ? nrm : 1e-12f);
        float *vf = p->v_first + off;
        /* branch-free loops with no dependence between iterations (ivdep: the buffers of buf do not
           overlap, and too many pointers for the compiler's run-time overlap checks): they vectorise */
#pragma GCC ivdep
        for (long i = 0; i < N; i++) {
            const float kn = k[i] * k_k[i] * inv, a = sigm(a0[i] + za[i]);
            aa[i] = -kn;
            bb[i] = kn * a;
            k[i] = k[i] * (1.f + (a - 1.f) * k_a[i]);
            d[i] = fexp(-0.60653066f * sigm(w0[i] + zw[i]));
        }
        if (p->first)
            memcpy(vf, v, sizeof(float) * (size_t)N);
        else
#pragma GCC ivdep
            for (long i = 0; i < N; i++) v[i] = v[i] + (vf[i] - v[i]) * sigm(v0[i] + zv[i]);
        float bonus = 0.f;
        for (long i = 0; i < N; i++) bonus += r[i] * k[i] * r_k[i];
        const wkv7_vecs_t vec = {r, d, k, v, aa, bb};
#ifdef WKV7_HAVE_N64_AVX512
        if (St)
            head_n64_t(St, &vec, y);
        else
#endif
            wkv7_head_generic(S, &vec, y, dr, N);
        const float mean = row_sum(y, N, 0, 0.f) / (float)N;
        const float rstd = 1.f / sqrtf(row_sum(y, N, 1, mean) / (float)N + 64e-5f);
        if (p->out_bf16) {
            uint16_t *o = (uint16_t *)p->out + off;
            for (long i = 0; i < N; i++) o[i] = f32_to_bf16(((y[i] - mean) * rstd * lw[i] + lb[i] + bonus * v[i]) * g[i]);
        } else {
            float *o = (float *)p->out + off;
            for (long i = 0; i < N; i++) o[i] = ((y[i] - mean) * rstd * lw[i] + lb[i] + bonus * v[i]) * g[i];
        }
    }
    if (St) transpose(S, St, N);
}

static PyObject *py_timemix(PyObject *self, PyObject *args, PyObject *kw) {
    tm7_t p;
    long threads;
    int portable = 0;
    memset(&p, 0, sizeof p);
    named_arg spec[40]; /* 33 used */
    int n = 0;
    spec[n++] = (named_arg){"B", ARG_LONG, &p.B};
    spec[n++] = (named_arg){"T", ARG_LONG, &p.T};
    spec[n++] = (named_arg){"H", ARG_LONG, &p.H};
    spec[n++] = (named_arg){"N", ARG_LONG, &p.N};
    for (int j = 0; j < N_IN; j++) spec[n++] = (named_arg){IN_NAMES[j], j == I_ZV ? ARG_OPT_PTR : ARG_PTR, &p.in[j]};
    static const char *const BF[N_IN] = {"r_bf16", "k_bf16", "v_bf16", "zw_bf16", "za_bf16", "zv_bf16", "g_bf16"};
    for (int j = 0; j < N_IN; j++) spec[n++] = (named_arg){BF[j], ARG_INT, &p.bf16[j]};
    spec[n++] = (named_arg){"v_first", ARG_PTR, &p.v_first};
    spec[n++] = (named_arg){"w0", ARG_PTR, &p.w0};
    spec[n++] = (named_arg){"a0", ARG_PTR, &p.a0};
    spec[n++] = (named_arg){"v0", ARG_PTR, &p.v0};
    spec[n++] = (named_arg){"k_k", ARG_PTR, &p.k_k};
    spec[n++] = (named_arg){"k_a", ARG_PTR, &p.k_a};
    spec[n++] = (named_arg){"r_k", ARG_PTR, &p.r_k};
    spec[n++] = (named_arg){"lnx_w", ARG_PTR, &p.lnx_w};
    spec[n++] = (named_arg){"lnx_b", ARG_PTR, &p.lnx_b};
    spec[n++] = (named_arg){"state", ARG_PTR, &p.state};
    spec[n++] = (named_arg){"out", ARG_PTR, &p.out};
    spec[n++] = (named_arg){"out_bf16", ARG_INT, &p.out_bf16};
    spec[n++] = (named_arg){"first", ARG_INT, &p.first};
    spec[n++] = (named_arg){"threads", ARG_LONG, &threads};
    spec[n++] = (named_arg){"portable", ARG_INT, &portable};
    if (!parse_named("timemix", args, kw, spec, n)) return NULL;
    if (p.B < 1 || p.T < 1 || p.H < 1 || p.N < 1 || (!p.first && !p.in[I_ZV])) {
        PyErr_SetString(PyExc_ValueError, "timemix: bad shapes, or zv missing in a layer after the first");
        return NULL;
    }
#ifdef WKV7_HAVE_N64_AVX512
    p.avx512 = !portable && wkv7_avx512_ok();
#endif
    const long pairs = p.B * p.H, nt = threads < 1 ? 1 : (threads > pairs ? pairs : threads);
    const long per = 12 * p.N + p.N * p.N; /* pair()'s scratch, the transposed state included */
    float *bufs = malloc(sizeof(float) * (size_t)(nt * per));
    if (!bufs) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads((int)nt)
    {
#if defined(__x86_64__)
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040); /* flush denormals (decayed states) */
#endif
        float *buf = bufs + omp_get_thread_num() * per;
#pragma omp for schedule(static)
        for (long bh = 0; bh < pairs; bh++) pair(&p, bh / p.H, bh % p.H, buf);
#if defined(__x86_64__)
        _mm_setcsr(csr);
#endif
    }
    Py_END_ALLOW_THREADS
    free(bufs);
    Py_RETURN_NONE;
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef methods[] = {
    {"timemix", KW(py_timemix), "timemix(*, ...): RWKV-7's time-mix between its matrices (see the module)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_wkv7_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wkv7_fused(void) { return PyModule_Create(&moddef); }
