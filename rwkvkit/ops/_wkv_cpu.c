/* rwkvkit.ops._wkv_cpu: the Eagle/Finch WKV recurrence on the CPU, forward only.
 *
 * The serial per-token recurrence (the same math as the naive PyTorch loop, which is the source of
 * truth) in C: for every (batch, head) and token t,
 *     y_t[j]   = sum_i r_t[i] * (S[i][j] + u[i] * k_t[i] * v_t[j])
 *     S[i][j]  = d_t[i] * S[i][j] + k_t[i] * v_t[j]        (d = exp(w), the decay factor in [0, 1])
 * One pass over the N x N state per token (per two tokens in the N == 64 AVX-512 kernel, each token's
 * operations the same and in the same order, so the same bits); the decay factors come exponentiated
 * from the caller or are computed here per token from Finch's raw decay (vectorised), and since they
 * lie in [0, 1] the recurrence is exact and stable for any decay. The inner loop over j is contiguous
 * and vectorises; (batch, head) pairs are split over OpenMP threads (PyTorch's own pool: the same
 * libgomp). Used for inference (prefill and decode) when no gradient is needed; training uses the
 * PyTorch forms.
 *
 * Arguments are named (keywords, read into job_t through _args.h); pointers are addresses (integers)
 * of contiguous buffers, validated by the Python wrapper (rwkvkit/ops/native.py):
 *   r, k, v: [B, T, H, N], float32 or bfloat16 (rkv_bf16), read as fp32 token by token (no cast pass);
 *   w: [B, T, H, N] (w_per_token=1) or [H, N] (0), either the decay factors exp(log decay) (float32,
 *      w_base = 0) or Finch's decay before its two exps (float32 or bfloat16, w_bf16), the factor then
 *      being exp(-exp(w_base + w)) with w_base [H, N] float32 (time_decay) - computed here per token;
 *   u: [H, N] float32; y: [B, T, H, N] float32;
 *   state: [B, H, N, N] float32 (key x value), updated in place;
 *   g (optional, 0 = none): [B, T, H, N] the gate before its silu, float32 or bfloat16 (g_bf16); then
 *      instead of y the kernel writes out [B, T, H, N] (float32 or bfloat16, out_bf16) =
 *      (LayerNorm over each head's N outputs, eps, times ln_w plus ln_b [H, N]) * silu(g): Eagle/Finch's
 *      GroupNorm and gate, done while the token's head output is in registers.
 */
#include "_args.h"
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

/* the per-token helpers are inlined into each ISA variant of the kernels (a call to the baseline
   version would run their loops unvectorised) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef struct {
    long B, T, H, N;
    const void *r, *k, *v, *w;
    const float *u, *w_base;
    float *s, *y;
    int w_per_token, rkv_bf16, w_bf16;
    /* optional GroupNorm epilogue (g != NULL): out = (LN_head(y) * ln_w + ln_b) * silu(g), y not stored */
    const void *g;
    const float *ln_w, *ln_b;
    float eps;
    void *out;
    int g_bf16, out_bf16;
    long first, last; /* range of (b, h) pairs */
    int failed;
} job_t;



ALWAYS_INLINE void load_vec(float *restrict dst, const void *src, int bf16, long off, long n) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + off, sizeof(float) * (size_t)n);
    }
}

/* One token of one head as fp32: r, k, v and the decay factors d (exp(-exp(w_base + w)) for Finch's
   raw decay). off is the token's offset in [B, T, H, N], h the head. */
ALWAYS_INLINE void load_token(const job_t *jb, long off, long h, const long N, float *restrict rt,
                              float *restrict kt, float *restrict vt, float *restrict dt) {
    load_vec(rt, jb->r, jb->rkv_bf16, off, N);
    load_vec(kt, jb->k, jb->rkv_bf16, off, N);
    load_vec(vt, jb->v, jb->rkv_bf16, off, N);
    load_vec(dt, jb->w, jb->w_bf16, jb->w_per_token ? off : h * N, N);
    if (jb->w_base) {
        const float *restrict base = jb->w_base + h * N;
        for (long i = 0; i < N; i++) dt[i] = fexp(base[i] + dt[i]); /* two loops: each vectorises */
        for (long i = 0; i < N; i++) dt[i] = fexp(-dt[i]);
    }
}

/* The GroupNorm epilogue for one token of head h (off its offset in [B, T, H, N]): the head's N
   outputs yt normalised, affine, times silu(g) (rounded to g's dtype, as F.silu), stored in out's
   dtype. tmp, e: N floats of scratch each. */
ALWAYS_INLINE void gn_token(const job_t *jb, long off, long h, const long N, const float *restrict yt,
                            float *restrict tmp, float *restrict e) {
    load_vec(tmp, jb->g, jb->g_bf16, off, N);
    /* silu; exp and division in separate loops, each of which vectorises */
    for (long i = 0; i < N; i++) e[i] = fexp(-tmp[i]);
    for (long i = 0; i < N; i++) tmp[i] = tmp[i] / (1.0f + e[i]);
    if (jb->g_bf16)
        for (long i = 0; i < N; i++) tmp[i] = bf16_to_f32(f32_to_bf16(tmp[i]));
    const float mean = row_sum(yt, N, 0, 0.0f) / (float)N;
    const float rstd = 1.0f / sqrtf(row_sum(yt, N, 1, mean) / (float)N + jb->eps);
    const float *restrict w = jb->ln_w + h * N, *restrict b = jb->ln_b + h * N;
    for (long i = 0; i < N; i++) tmp[i] = fmaf((yt[i] - mean) * rstd, w[i], b[i]) * tmp[i];
    if (jb->out_bf16) {
        uint16_t *o = (uint16_t *)jb->out + off;
        for (long i = 0; i < N; i++) o[i] = f32_to_bf16(tmp[i]);
    } else {
        memcpy((float *)jb->out + off, tmp, sizeof(float) * (size_t)N);
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void run_pair(const job_t *jb, long bh, float *restrict buf) {
    const long T = jb->T, H = jb->H, N = jb->N;
    const long b = bh / H, h = bh % H;
    const long ts = H * N; /* token stride */
    float *restrict S = jb->s + bh * N * N;
    const float *restrict u = jb->u + h * N;
    for (long t = 0; t < T; t++) {
        const long off = (b * T + t) * ts + h * N;
        float *restrict yt = buf, *restrict rt = buf + N, *restrict kt = buf + 2 * N;
        float *restrict vt = buf + 3 * N, *restrict wt = buf + 4 * N;
        load_token(jb, off, h, N, rt, kt, vt, wt);
        for (long j = 0; j < N; j++) yt[j] = 0.0f;
        for (long i = 0; i < N; i++) {
            const float ri = rt[i], ki = kt[i], di = wt[i];
            const float rui = ri * u[i] * ki;
            float *restrict Si = S + i * N;
            for (long j = 0; j < N; j++) {
                const float sij = Si[j];
                yt[j] += ri * sij + rui * vt[j];
                Si[j] = sij * di + ki * vt[j];
            }
        }
        if (jb->g) {
            gn_token(jb, off, h, N, yt, buf + 5 * N, wt); /* the decays are used up: scratch */
        } else {
            float *restrict out = jb->y + off;
            for (long j = 0; j < N; j++) out[j] = yt[j];
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_N64_AVX512 1
#define N64_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

/* The bonus factor of one token (N == 64): sum_i r_i u_i k_i, in 16 lanes (a serial sum would be a
   64-add dependency chain) */
N64_TARGET ALWAYS_INLINE float n64_bonus(const float *rt, const float *kt, const float *u) {
    __m512 rk = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(rt), _mm512_loadu_ps(u)), _mm512_loadu_ps(kt));
    for (long i = 16; i < 64; i += 16)
        rk = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(rt + i), _mm512_loadu_ps(u + i)),
                             _mm512_loadu_ps(kt + i), rk);
    return _mm512_reduce_add_ps(rk);
}

/* tokens per block in run_pair_n64 (even; 2 to 16 measured within a few percent of each other) */
#define N64_BLOCK 4

/* N == 64 (every released Eagle/Finch) with AVX-512: the four 16-lane column blocks of a state row
   are updated together, and two tokens t, t + 1 share one pass over the state: per row i, S_i is
   loaded once, gives token t's output terms, is updated with token t's decay and k v, gives token
   t + 1's output terms, is updated with token t + 1's, and is stored once. Each token's operations
   and their order are those of a pass of its own (S' after token t is the fp32 value that pass would
   store), so the results do not depend on how the tokens are paired; the pass is bound by its FMAs
   rather than by the state's loads and stores, and the eight output accumulators are independent
   register chains. An odd last token runs alone. The tokens go in small blocks of N64_BLOCK: first
   all their inputs, decays and bonus factors, then the passes over the state, then their GroupNorm
   epilogues (independent per-token work next to each other, where it can overlap). */
N64_TARGET static void run_pair_n64(const job_t *jb, long bh, float *buf) {
    const long T = jb->T, H = jb->H, N = 64, TB = N64_BLOCK;
    const long b = bh / H, h = bh % H;
    const long ts = H * N;
    float *S = jb->s + bh * N * N;
    const float *u = jb->u + h * N;
    /* buf: the block's r, k, v, d, y (TB x N each) */
    float *R = buf, *K = buf + TB * N, *V = buf + 2 * TB * N, *D = buf + 3 * TB * N, *Y = buf + 4 * TB * N;
    float bonus[N64_BLOCK];
    for (long t0 = 0; t0 < T; t0 += TB) {
        const long nt = T - t0 < TB ? T - t0 : TB;
        const long off0 = (b * T + t0) * ts + h * N; /* the block's first token */
        for (long q = 0; q < nt; q++) {
            load_token(jb, off0 + q * ts, h, N, R + q * N, K + q * N, V + q * N, D + q * N);
            bonus[q] = n64_bonus(R + q * N, K + q * N, u);
        }
        long q = 0;
        for (; q + 2 <= nt; q += 2) {
            const float *r0 = R + q * N, *k0 = K + q * N, *d0 = D + q * N, *r1 = r0 + N, *k1 = k0 + N, *d1 = d0 + N;
            __m512 va[4], vb[4], a[4], c[4];
            const __m512 ba = _mm512_set1_ps(bonus[q]), bb = _mm512_set1_ps(bonus[q + 1]);
            for (int j = 0; j < 4; j++) {
                va[j] = _mm512_loadu_ps(V + q * N + 16 * j);
                vb[j] = _mm512_loadu_ps(V + (q + 1) * N + 16 * j);
                a[j] = _mm512_mul_ps(ba, va[j]);
                c[j] = _mm512_mul_ps(bb, vb[j]);
            }
            for (long i = 0; i < N; i++) {
                const __m512 ra = _mm512_set1_ps(r0[i]), ka = _mm512_set1_ps(k0[i]), da = _mm512_set1_ps(d0[i]);
                const __m512 rb = _mm512_set1_ps(r1[i]), kb = _mm512_set1_ps(k1[i]), db = _mm512_set1_ps(d1[i]);
                float *Si = S + i * N;
                for (int j = 0; j < 4; j++) {
                    const __m512 s = _mm512_loadu_ps(Si + 16 * j);
                    a[j] = _mm512_fmadd_ps(ra, s, a[j]);
                    const __m512 s1 = _mm512_fmadd_ps(s, da, _mm512_mul_ps(ka, va[j]));
                    c[j] = _mm512_fmadd_ps(rb, s1, c[j]);
                    _mm512_storeu_ps(Si + 16 * j, _mm512_fmadd_ps(s1, db, _mm512_mul_ps(kb, vb[j])));
                }
            }
            float *ya = jb->g ? Y + q * N : jb->y + off0 + q * ts, *yb = jb->g ? ya + N : ya + ts;
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(ya + 16 * j, a[j]), _mm512_storeu_ps(yb + 16 * j, c[j]);
        }
        if (q < nt) { /* an odd last token */
            const float *r0 = R + q * N, *k0 = K + q * N, *d0 = D + q * N;
            __m512 va[4], a[4];
            const __m512 ba = _mm512_set1_ps(bonus[q]);
            for (int j = 0; j < 4; j++) va[j] = _mm512_loadu_ps(V + q * N + 16 * j), a[j] = _mm512_mul_ps(ba, va[j]);
            for (long i = 0; i < N; i++) {
                const __m512 ra = _mm512_set1_ps(r0[i]), ka = _mm512_set1_ps(k0[i]), da = _mm512_set1_ps(d0[i]);
                float *Si = S + i * N;
                for (int j = 0; j < 4; j++) {
                    const __m512 s = _mm512_loadu_ps(Si + 16 * j);
                    a[j] = _mm512_fmadd_ps(ra, s, a[j]);
                    _mm512_storeu_ps(Si + 16 * j, _mm512_fmadd_ps(s, da, _mm512_mul_ps(ka, va[j])));
                }
            }
            float *ya = jb->g ? Y + q * N : jb->y + off0 + q * ts;
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(ya + 16 * j, a[j]);
        }
        if (jb->g) /* r and the decays are used up: scratch */
            for (q = 0; q < nt; q++) gn_token(jb, off0 + q * ts, h, N, Y + q * N, R + q * N, D + q * N);
    }
}
#endif

static void *run_job(void *arg) {
    job_t *jb = (job_t *)arg;
    /* run_pair: one token's y, r, k, v, d, scratch; run_pair_n64: a block of tokens' r, k, v, d, y */
    size_t nbuf = 6 * (size_t)jb->N;
#ifdef HAVE_N64_AVX512
    if (jb->N == 64) nbuf = 5 * N64_BLOCK * 64;
#endif
    float *buf = (float *)malloc(sizeof(float) * nbuf);
    if (!buf) {
        jb->failed = 1;
        return NULL;
    }
    /* strong decays drive state entries towards 0: flush denormals (below 1e-38, far under any
       tolerance) instead of paying their ~100x slower arithmetic */
    FTZ_ON();
#ifdef HAVE_N64_AVX512
    if (jb->N == 64 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        for (long bh = jb->first; bh < jb->last; bh++) run_pair_n64(jb, bh, buf);
    } else
#endif
        for (long bh = jb->first; bh < jb->last; bh++) run_pair(jb, bh, buf);
    FTZ_OFF();
    free(buf);
    return NULL;
}

static PyObject *wkv_forward(PyObject *self, PyObject *args, PyObject *kw) {
    job_t base;
    long nthreads;
    memset(&base, 0, sizeof base);
    const named_arg spec[] = {
        {"B", ARG_LONG, &base.B}, {"T", ARG_LONG, &base.T}, {"H", ARG_LONG, &base.H}, {"N", ARG_LONG, &base.N},
        {"r", ARG_PTR, &base.r}, {"k", ARG_PTR, &base.k}, {"v", ARG_PTR, &base.v}, {"w", ARG_PTR, &base.w},
        {"w_base", ARG_OPT_PTR, &base.w_base}, /* absent: w holds the decay factors */
        {"u", ARG_PTR, &base.u}, {"state", ARG_PTR, &base.s}, {"y", ARG_OPT_PTR, &base.y},
        {"w_per_token", ARG_INT, &base.w_per_token}, {"rkv_bf16", ARG_INT, &base.rkv_bf16},
        {"w_bf16", ARG_INT, &base.w_bf16},
        {"g", ARG_OPT_PTR, &base.g}, /* absent: y is stored, no GroupNorm epilogue */
        {"ln_w", ARG_OPT_PTR, &base.ln_w}, {"ln_b", ARG_OPT_PTR, &base.ln_b}, {"eps", ARG_FLOAT, &base.eps},
        {"out", ARG_OPT_PTR, &base.out}, {"g_bf16", ARG_INT, &base.g_bf16}, {"out_bf16", ARG_INT, &base.out_bf16},
        {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("wkv_forward", args, kw, spec, NARGS(spec))) return NULL;
    const long B = base.B, H = base.H;
    if (B <= 0 || base.T <= 0 || H <= 0 || base.N <= 0) {
        PyErr_SetString(PyExc_ValueError, "wkv_forward: B, T, H, N must be positive");
        return NULL;
    }
    if (base.g ? !(base.ln_w && base.ln_b && base.out) : !base.y) {
        PyErr_SetString(PyExc_ValueError, "wkv_forward: give y, or g with ln_w, ln_b and out");
        return NULL;
    }
    long pairs = B * H;
    nthreads = threads_at_least_1(nthreads);
    if (nthreads > pairs) nthreads = (int)pairs;
    if (nthreads > 64) nthreads = 64;
    job_t jobs[64];
    for (int i = 0; i < nthreads; i++) {
        jobs[i] = base;
        jobs[i].first = pairs * i / nthreads;
        jobs[i].last = pairs * (i + 1) / nthreads;
        jobs[i].failed = 0;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (nthreads == 1) {
        run_job(&jobs[0]);
    } else {
        /* OpenMP, not threads of our own: the pool is PyTorch's (the same libgomp), whose workers
           would otherwise spin on the cores between its ops while our threads wait for them */
#pragma omp parallel num_threads(nthreads)
        {
            const int i = omp_get_thread_num(), n = omp_get_num_threads();
            /* the team may be smaller than asked: thread i takes every n-th job */
            for (int j = i; j < nthreads; j += n) run_job(&jobs[j]);
        }
    }
    for (int i = 0; i < nthreads; i++) failed |= jobs[i].failed;
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"wkv_forward", (PyCFunction)(void (*)(void))wkv_forward, METH_VARARGS | METH_KEYWORDS,
     "wkv_forward(*, B, T, H, N, r, k, v, w, w_base=None, u, state, y=None, w_per_token, rkv_bf16, w_bf16, "
     "g=None, ln_w=None, ln_b=None, eps, out=None, g_bf16, out_bf16, threads): addresses as integers "
     "(no g: y is written, no GroupNorm epilogue)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wkv_cpu", "Eagle/Finch WKV forward on the CPU.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__wkv_cpu(void) { return PyModule_Create(&module); }
