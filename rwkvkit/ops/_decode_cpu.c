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
 * int64 array built by rwkvkit/models/engine.py; its layout is the structs below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#else
#define HAVE_X86 0
#endif

enum { MK_F32 = 0, MK_BF16 = 1, MK_Q8 = 2 };

typedef struct {
    int64_t kind, n, k, w, s; /* w, s: addresses */
} mat_t;

typedef struct {
    int64_t ln1_w, ln1_b, ln2_w, ln2_b;         /* float [C] */
    int64_t maa_x, maa[5];                      /* Finch: time_maa_x and w, k, v, r, g; Eagle: time_mix_{k,v,r,g} in maa[1..4] */
    int64_t decay;                              /* Finch: time_decay [C]; Eagle: time_decay [H, N] */
    int64_t u;                                  /* time_faaaa [H, N] */
    int64_t lnx_w, lnx_b;                       /* float [C] */
    int64_t fmix_k, fmix_r;                     /* channel-mix token shift */
    mat_t w1, w2, dw1, dw2;                     /* Finch LoRAs, input-major (kind MK_F32 or MK_BF16) */
    mat_t r, k, v, g, o, fk, fr, fv;            /* time-mix and channel-mix matrices */
} layer_t;

typedef struct {
    int64_t version, n_layer, C, H, N, F, V, D, Dw;
    int64_t ln_out_w, ln_out_b;
    mat_t head;
    layer_t layers[];
} plan_t;

#define PLAN_HEADER_INTS ((int64_t)(sizeof(plan_t) / sizeof(int64_t)))
#define LAYER_INTS ((int64_t)(sizeof(layer_t) / sizeof(int64_t)))

static int use_avx512 = 0;

/* ---- scalars ----------------------------------------------------------------------------------- */


static inline float f16f(uint16_t h) { /* IEEE half -> float, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000 | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}


static inline void split(int64_t total, int tid, int nt, int64_t *lo, int64_t *hi) {
    *lo = total * tid / nt;
    *hi = total * (tid + 1) / nt;
}

/* ---- matrix rows: y[b, n] = sum_i W[n, i] x[b, i] for n in [r0, r1) ------------------------------- */

static void rows_generic(const mat_t *m, int64_t r0, int64_t r1, const float *x, int64_t B, float *y,
                         int64_t ldy) {
    const int64_t K = m->k;
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * K;
            float acc = 0.f;
            if (m->kind == MK_F32) {
                const float *w = (const float *)m->w + n * K;
                for (int64_t i = 0; i < K; i++) acc += w[i] * xb[i];
            } else if (m->kind == MK_BF16) {
                const uint16_t *w = (const uint16_t *)m->w + n * K;
                for (int64_t i = 0; i < K; i++) acc += bf16_to_f32(w[i]) * xb[i];
            } else {
                const int8_t *q = (const int8_t *)m->w + n * K;
                const uint16_t *s = (const uint16_t *)m->s + n * (K / 32);
                for (int64_t j = 0; j < K / 32; j++) {
                    float blk = 0.f;
                    for (int64_t i = 0; i < 32; i++) blk += (float)q[32 * j + i] * xb[32 * j + i];
                    acc += blk * f16f(s[j]);
                }
            }
            y[b * ldy + n] = acc;
        }
    }
}

#if HAVE_X86
/* Up to 4 input rows share each loaded weight row. */
#define NB_MAX 4

AVX512 static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

AVX512 static inline __m512 load_q8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The hardware prefetcher alone leaves these loops waiting on memory (measured: 10 -> 16 GB/s on two
 * cores with it): fetch the same cache line of the weight rows 8 ahead, i.e. two groups of four later. */
#define PREFETCH_AHEAD 8
#define PREFETCH_ROWS(p, K)                                                                                   \
    for (int r_ = 0; r_ < 4; r_++) _mm_prefetch((const char *)((p) + (PREFETCH_AHEAD + r_) * (K)), _MM_HINT_T0)

/* One input row, four weight rows at a time: four independent accumulation chains (one chain per row
 * would wait on the FMA latency every block) sharing each load of x. */
AVX512 static void rows4_avx512_b1(const mat_t *m, int64_t n, const float *x, float *y) {
    const int64_t K = m->k;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    if (m->kind == MK_Q8) {
        const int64_t nb = K / 32;
        const int8_t *q = (const int8_t *)m->w + n * K;
        const uint16_t *s = (const uint16_t *)m->s + n * nb;
#define Q8_ROW(acc, r)                                                                                        \
    {                                                                                                         \
        __m512 p = _mm512_mul_ps(load_q8x16(q + (r) * K + 32 * j), x0);                                        \
        p = _mm512_fmadd_ps(load_q8x16(q + (r) * K + 32 * j + 16), x1, p);                                     \
        acc = _mm512_fmadd_ps(p, _mm512_set1_ps(_cvtsh_ss(s[(r) * nb + j])), acc);                             \
    }
        for (int64_t j = 0; j < nb; j++) {
            const __m512 x0 = _mm512_loadu_ps(x + 32 * j), x1 = _mm512_loadu_ps(x + 32 * j + 16);
            if (!(j & 1)) PREFETCH_ROWS(q + 32 * j, K);
            Q8_ROW(a0, 0) Q8_ROW(a1, 1) Q8_ROW(a2, 2) Q8_ROW(a3, 3)
        }
#undef Q8_ROW
    } else if (m->kind == MK_BF16) {
        const uint16_t *w = (const uint16_t *)m->w + n * K;
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
            if (!(i & 31)) PREFETCH_ROWS(w + i, K);
            a0 = _mm512_fmadd_ps(load_bf16x16(w + i), xv, a0);
            a1 = _mm512_fmadd_ps(load_bf16x16(w + K + i), xv, a1);
            a2 = _mm512_fmadd_ps(load_bf16x16(w + 2 * K + i), xv, a2);
            a3 = _mm512_fmadd_ps(load_bf16x16(w + 3 * K + i), xv, a3);
        }
    } else {
        const float *w = (const float *)m->w + n * K;
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
            PREFETCH_ROWS(w + i, K);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + K + i), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * K + i), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * K + i), xv, a3);
        }
    }
    y[n] = _mm512_reduce_add_ps(a0);
    y[n + 1] = _mm512_reduce_add_ps(a1);
    y[n + 2] = _mm512_reduce_add_ps(a2);
    y[n + 3] = _mm512_reduce_add_ps(a3);
}

/* 16 weights of row r at column i as floats (q8: times the block's scale). */
AVX512 static inline __m512 load_w16(const mat_t *m, int64_t r, int64_t i) {
    const int64_t K = m->k;
    if (m->kind == MK_Q8) {
        const float sc = _cvtsh_ss(((const uint16_t *)m->s)[r * (K / 32) + i / 32]);
        return _mm512_mul_ps(load_q8x16((const int8_t *)m->w + r * K + i), _mm512_set1_ps(sc));
    }
    if (m->kind == MK_BF16) return load_bf16x16((const uint16_t *)m->w + r * K + i);
    return _mm512_loadu_ps((const float *)m->w + r * K + i);
}

/* A batch (decode of several rows): four weight rows times four inputs per tile, so each weight
 * vector loaded (and widened) serves four inputs and each input vector four rows. */
AVX512 static void rows4_avx512_b4(const mat_t *m, int64_t n, const float *x, int64_t b0, int64_t nb,
                                   float *y, int64_t ldy) {
    const int64_t K = m->k;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    const float *xb = x + b0 * K;
    if (nb == 4) { /* constant trip counts: the 16 accumulators stay in registers */
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 w0 = load_w16(m, n, i), w1 = load_w16(m, n + 1, i);
            const __m512 w2 = load_w16(m, n + 2, i), w3 = load_w16(m, n + 3, i);
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) {
                const __m512 xv = _mm512_loadu_ps(xb + b * K + i);
                acc[0][b] = _mm512_fmadd_ps(w0, xv, acc[0][b]);
                acc[1][b] = _mm512_fmadd_ps(w1, xv, acc[1][b]);
                acc[2][b] = _mm512_fmadd_ps(w2, xv, acc[2][b]);
                acc[3][b] = _mm512_fmadd_ps(w3, xv, acc[3][b]);
            }
        }
        for (int b = 0; b < 4; b++)
            for (int r = 0; r < 4; r++) y[(b0 + b) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][b]);
        return;
    }
    for (int64_t i = 0; i < K; i += 16) {
        const __m512 w0 = load_w16(m, n, i), w1 = load_w16(m, n + 1, i);
        const __m512 w2 = load_w16(m, n + 2, i), w3 = load_w16(m, n + 3, i);
        for (int64_t b = 0; b < nb; b++) {
            const __m512 xv = _mm512_loadu_ps(xb + b * K + i);
            acc[0][b] = _mm512_fmadd_ps(w0, xv, acc[0][b]);
            acc[1][b] = _mm512_fmadd_ps(w1, xv, acc[1][b]);
            acc[2][b] = _mm512_fmadd_ps(w2, xv, acc[2][b]);
            acc[3][b] = _mm512_fmadd_ps(w3, xv, acc[3][b]);
        }
    }
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < 4; r++) y[(b0 + b) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][b]);
}

AVX512 static void rows_avx512(const mat_t *m, int64_t r0, int64_t r1, const float *x, int64_t B, float *y,
                               int64_t ldy) {
    const int64_t K = m->k;
    if (B == 1) {
        for (; r0 + 4 <= r1; r0 += 4) rows4_avx512_b1(m, r0, x, y);
    } else {
        for (; r0 + 4 <= r1; r0 += 4)
            for (int64_t b0 = 0; b0 < B; b0 += 4) rows4_avx512_b4(m, r0, x, b0, B - b0 < 4 ? B - b0 : 4, y, ldy);
    }
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t b0 = 0; b0 < B; b0 += NB_MAX) {
            const int64_t nb = B - b0 < NB_MAX ? B - b0 : NB_MAX;
            const float *x0 = x + b0 * K;
            __m512 acc[NB_MAX] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            if (m->kind == MK_Q8) {
                const int8_t *q = (const int8_t *)m->w + n * K;
                const uint16_t *s = (const uint16_t *)m->s + n * (K / 32);
                for (int64_t j = 0; j < K / 32; j++) {
                    const __m512 w0 = load_q8x16(q + 32 * j), w1 = load_q8x16(q + 32 * j + 16);
                    const __m512 sc = _mm512_set1_ps(_cvtsh_ss(s[j]));
                    for (int64_t b = 0; b < nb; b++) {
                        const float *xb = x0 + b * K + 32 * j;
                        __m512 p = _mm512_mul_ps(w0, _mm512_loadu_ps(xb));
                        p = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), p);
                        acc[b] = _mm512_fmadd_ps(p, sc, acc[b]);
                    }
                }
            } else if (m->kind == MK_BF16) {
                const uint16_t *w = (const uint16_t *)m->w + n * K;
                for (int64_t i = 0; i < K; i += 16) {
                    const __m512 wv = load_bf16x16(w + i);
                    for (int64_t b = 0; b < nb; b++)
                        acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + b * K + i), acc[b]);
                }
            } else {
                const float *w = (const float *)m->w + n * K;
                for (int64_t i = 0; i < K; i += 16) {
                    const __m512 wv = _mm512_loadu_ps(w + i);
                    for (int64_t b = 0; b < nb; b++)
                        acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + b * K + i), acc[b]);
                }
            }
            for (int64_t b = 0; b < nb; b++) y[(b0 + b) * ldy + n] = _mm512_reduce_add_ps(acc[b]);
        }
    }
}
#endif

static void mat_rows(const mat_t *m, int64_t r0, int64_t r1, const float *x, int64_t B, float *y, int64_t ldy) {
#if HAVE_X86
    if (use_avx512 && m->k % 32 == 0) {
        rows_avx512(m, r0, r1, x, B, y, ldy);
        return;
    }
#endif
    rows_generic(m, r0, r1, x, B, y, ldy);
}

/* Several matrices with their own inputs and outputs, their rows split evenly over the team. */
typedef struct {
    const mat_t *m;
    const float *x;
    float *y;
} job_t;

static void mats_team(const job_t *jobs, int n_jobs, int64_t B, int tid, int nt) {
    int64_t total = 0;
    for (int j = 0; j < n_jobs; j++) total += jobs[j].m->n;
    int64_t lo, hi, base = 0;
    split(total, tid, nt, &lo, &hi);
    for (int j = 0; j < n_jobs; j++) {
        const int64_t n = jobs[j].m->n, a = lo > base ? lo - base : 0, e = hi - base < n ? hi - base : n;
        if (a < e) mat_rows(jobs[j].m, a, e, jobs[j].x, B, jobs[j].y, n);
        base += n;
    }
}

/* ---- LoRA (input-major): y[b, n] = sum_i x[b, i] W[i, n] for n in [n0, n1) ----------------------- */

#if HAVE_X86
AVX512 static void lora_cols_avx512(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t B, float *y) {
    const int64_t K = m->k, N = m->n;
    for (int64_t b = 0; b < B; b++) {
        float *yb = y + b * N;
        for (int64_t n = n0; n < n1; n++) yb[n] = 0.f;
        for (int64_t i = 0; i < K; i++) {
            const __m512 xi = _mm512_set1_ps(x[b * K + i]);
            int64_t n = n0;
            if (m->kind == MK_BF16) {
                const uint16_t *w = (const uint16_t *)m->w + i * N;
                for (; n + 16 <= n1; n += 16)
                    _mm512_storeu_ps(yb + n, _mm512_fmadd_ps(xi, load_bf16x16(w + n), _mm512_loadu_ps(yb + n)));
                for (; n < n1; n++) yb[n] += x[b * K + i] * bf16_to_f32(w[n]);
            } else {
                const float *w = (const float *)m->w + i * N;
                for (; n + 16 <= n1; n += 16)
                    _mm512_storeu_ps(yb + n, _mm512_fmadd_ps(xi, _mm512_loadu_ps(w + n), _mm512_loadu_ps(yb + n)));
                for (; n < n1; n++) yb[n] += x[b * K + i] * w[n];
            }
        }
    }
}
#endif

static void lora_cols(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t B, float *y) {
#if HAVE_X86
    if (use_avx512) {
        lora_cols_avx512(m, n0, n1, x, B, y);
        return;
    }
#endif
    const int64_t K = m->k, N = m->n;
    for (int64_t b = 0; b < B; b++) {
        float *yb = y + b * N;
        for (int64_t n = n0; n < n1; n++) yb[n] = 0.f;
        for (int64_t i = 0; i < K; i++) {
            const float xi = x[b * K + i];
            if (m->kind == MK_BF16) {
                const uint16_t *w = (const uint16_t *)m->w + i * N;
                for (int64_t n = n0; n < n1; n++) yb[n] += xi * bf16_to_f32(w[n]);
            } else {
                const float *w = (const float *)m->w + i * N;
                for (int64_t n = n0; n < n1; n++) yb[n] += xi * w[n];
            }
        }
    }
}

/* Column split aligned to 16 so vector stores of two threads never share a cache line. */
static void split16(int64_t total, int tid, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (total + 15) / 16, a, b;
    split(blocks, tid, nt, &a, &b);
    *lo = a * 16 < total ? a * 16 : total;
    *hi = b * 16 < total ? b * 16 : total;
}

/* ---- team synchronisation ------------------------------------------------------------------------
 * OpenMP's own barrier spins for a long time before it sleeps; on a machine with more runnable threads
 * than cores, a thread spinning there keeps the one it waits for off the core (measured: a step went
 * from 10 ms to 300 ms with one other busy process on two cores). This barrier spins briefly, then
 * yields the core. Matrix rows are handed out in chunks from a shared counter, so a thread that loses
 * its core holds up one chunk, not its whole share. */
#include <sched.h>
#include <stdatomic.h>

typedef struct {
    atomic_int count, gen;
} team_barrier_t;

static void team_barrier(team_barrier_t *b, int team) {
    if (team == 1) return;
    const int gen = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == team - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->gen, 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->gen, memory_order_acquire) == gen; spins++) {
        if (spins < 2000) {
#if HAVE_X86
            _mm_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

#define ROW_CHUNK 32 /* fewest rows per claim; chunks are multiples of 4 (the kernels' row groups) */

/* Several matrices with their own inputs and outputs; the team claims chunks of their rows from *next
 * (zero before the phase, used once). About 64 chunks per phase: enough to balance, few enough that
 * the shared counter costs nothing. */
static void mats_claim(const job_t *jobs, int n_jobs, int64_t B, atomic_long *next) {
    int64_t rows = 0, total = 0;
    for (int j = 0; j < n_jobs; j++) rows += jobs[j].m->n;
    int64_t ch = (rows / 64) & ~(int64_t)3;
    if (ch < ROW_CHUNK) ch = ROW_CHUNK;
    for (int j = 0; j < n_jobs; j++) total += (jobs[j].m->n + ch - 1) / ch;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (c >= total) return;
        for (int j = 0; j < n_jobs; j++) {
            const int64_t n = jobs[j].m->n, chunks = (n + ch - 1) / ch;
            if (c < chunks) {
                const int64_t r0 = c * ch, r1 = r0 + ch < n ? r0 + ch : n;
                mat_rows(jobs[j].m, r0, r1, jobs[j].x, B, jobs[j].y, n);
                break;
            }
            c -= chunks;
        }
    }
}

/* ---- element-wise pieces (one row of C) --------------------------------------------------------- */

static void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *out) {
    const float mean = row_sum(x, n, 0, 0.f) / (float)n;
    const float rstd = 1.f / sqrtf(row_sum(x, n, 1, mean) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

static inline float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

/* One head of the WKV step: y[j] = sum_i r_i (S_ij + u_i k_i v_j); S'_ij = w_i S_ij + k_i v_j. */
static void wkv_head(int64_t N, const float *restrict r, const float *restrict k, const float *restrict v,
                     const float *restrict w, const float *restrict u, const float *restrict S,
                     float *restrict So, float *restrict y) {
    float ruk = 0.f;
    for (int64_t i = 0; i < N; i++) ruk += r[i] * u[i] * k[i];
    for (int64_t j = 0; j < N; j++) y[j] = ruk * v[j];
    for (int64_t i = 0; i < N; i++) {
        const float ri = r[i], wi = w[i], ki = k[i];
        const float *restrict Si = S + i * N;
        float *restrict Soi = So + i * N;
        for (int64_t j = 0; j < N; j++) {
            y[j] += ri * Si[j];
            Soi[j] = wi * Si[j] + ki * v[j];
        }
    }
}

#define F(p) ((const float *)(intptr_t)(p))

/* ---- the step ----------------------------------------------------------------------------------- */

typedef struct {
    const plan_t *P;
    int64_t B;
    float *x; /* [B, C] residual, updated */
    const float *att_in, *ffn_in, *wkv_in;
    float *att_out, *ffn_out, *wkv_out, *logits;
    float *buf;
    team_barrier_t *bar;
    atomic_long *claims; /* one zeroed counter per matrix phase */
} step_args;

#define CLAIMS_PER_LAYER 4

static void step_team(const step_args *a, int tid, int nt) {
    const plan_t *P = a->P;
    const int64_t B = a->B, C = P->C, H = P->H, N = P->N, Fd = P->F, D = P->D, Dw = P->Dw;
    const int finch = P->version == 6;
    float *x = a->x;
    /* scratch: xn, d, xj[5], m (5D), t (Dw), decay, r, k, v, g, y, o, fk, fr, fv */
    float *xn = a->buf, *d = xn + B * C, *xj = d + B * C, *m5 = xj + 5 * B * C, *tw = m5 + B * 5 * D;
    float *dec = tw + B * Dw, *r = dec + B * C, *k = r + B * C, *v = k + B * C, *g = v + B * C;
    float *y = g + B * C, *o = y + B * C, *fk = o + B * C, *fr = fk + B * Fd, *fv = fr + B * C;
    float *xw = xj, *xk = xj + B * C, *xv = xj + 2 * B * C, *xr = xj + 3 * B * C, *xg = xj + 4 * B * C;
    int64_t lo, hi;
#define SYNC() team_barrier(a->bar, nt)

    for (int64_t l = 0; l < P->n_layer; l++) {
        const layer_t *L = &P->layers[l];
        const float *att_in = a->att_in + l * B * C, *ffn_in = a->ffn_in + l * B * C;
        float *att_out = a->att_out + l * B * C, *ffn_out = a->ffn_out + l * B * C;
        const float *S = a->wkv_in + l * B * H * N * N;
        float *So = a->wkv_out + l * B * H * N * N;
        atomic_long *claims = a->claims + CLAIMS_PER_LAYER * l;

        /* 1. LayerNorm, token shift (and Eagle's static mixes) */
        if (tid == 0) {
            for (int64_t b = 0; b < B; b++) {
                float *xnb = xn + b * C, *db = d + b * C;
                layer_norm(x + b * C, F(L->ln1_w), F(L->ln1_b), 1e-5f, C, xnb);
                memcpy(att_out + b * C, xnb, C * sizeof(float));
                for (int64_t c = 0; c < C; c++) db[c] = att_in[b * C + c] - xnb[c];
                if (finch) { /* the first LoRA's input, kept in xw until the LoRA has read it */
                    const float *mx = F(L->maa_x);
                    for (int64_t c = 0; c < C; c++) xw[b * C + c] = xnb[c] + db[c] * mx[c];
                } else { /* x * mix + prev * (1 - mix), as the reference */
                    for (int j = 1; j < 5; j++) {
                        const float *mix = F(L->maa[j]);
                        float *out = xj + j * B * C + b * C;
                        for (int64_t c = 0; c < C; c++)
                            out[c] = xnb[c] * mix[c] + att_in[b * C + c] * (1.f - mix[c]);
                    }
                }
            }
        }
SYNC();
        if (finch) {
            /* 2. m = tanh(xxx @ maa_w1), the five branch LoRA codes [B, 5D] */
            split16(5 * D, tid, nt, &lo, &hi);
            lora_cols(&L->w1, lo, hi, xw, B, m5);
            for (int64_t b = 0; b < B; b++)
                for (int64_t n = lo; n < hi; n++) m5[b * 5 * D + n] = tanhf(m5[b * 5 * D + n]);
SYNC();
            /* 3. x_j = x + d * (maa_j + m_j @ maa_w2[j]) for w, k, v, r, g (columns split) */
            split16(C, tid, nt, &lo, &hi);
            for (int j = 0; j < 5; j++) {
                mat_t w2j = L->w2; /* [D, C] slice j of [5, D, C] */
                w2j.k = D;
                w2j.n = C;
                w2j.w += j * D * C * (L->w2.kind == MK_BF16 ? 2 : 4);
                float *out = xj + j * B * C;
                for (int64_t b = 0; b < B; b++) lora_cols(&w2j, lo, hi, m5 + b * 5 * D + j * D, 1, out + b * C);
                const float *maa = F(L->maa[j]);
                for (int64_t b = 0; b < B; b++)
                    for (int64_t c = lo; c < hi; c++)
                        out[b * C + c] = xn[b * C + c] + d[b * C + c] * (maa[c] + out[b * C + c]);
            }
SYNC();
            /* 4. the decay LoRA's code: tanh(x_w @ decay_w1) */
            split16(Dw, tid, nt, &lo, &hi);
            lora_cols(&L->dw1, lo, hi, xw, B, tw);
            for (int64_t b = 0; b < B; b++)
                for (int64_t n = lo; n < hi; n++) tw[b * Dw + n] = tanhf(tw[b * Dw + n]);
SYNC();
            /* 5a. decay factor exp(-exp(time_decay + code @ decay_w2)) (columns split) */
            split16(C, tid, nt, &lo, &hi);
            lora_cols(&L->dw2, lo, hi, tw, B, dec);
            const float *td = F(L->decay);
            for (int64_t b = 0; b < B; b++)
                for (int64_t c = lo; c < hi; c++) dec[b * C + c] = expf(-expf(td[c] + dec[b * C + c]));
        } else if (tid == 0) { /* Eagle: one decay per channel */
            const float *td = F(L->decay);
            for (int64_t b = 0; b < B; b++)
                for (int64_t c = 0; c < C; c++) dec[b * C + c] = expf(-expf(td[c]));
        }
        /* 5b. r, k, v, g */
        {
            const job_t jobs[4] = {{&L->r, xr, r}, {&L->k, xk, k}, {&L->v, xv, v}, {&L->g, xg, g}};
            mats_claim(jobs, 4, B, claims + 0);
        }
SYNC();
        /* 6. WKV per (row, head), then the head's GroupNorm times silu(gate) */
        split(B * H, tid, nt, &lo, &hi);
        for (int64_t bh = lo; bh < hi; bh++) {
            const int64_t b = bh / H, h = bh % H, off = b * C + h * N;
            float *yh = y + off;
            wkv_head(N, r + off, k + off, v + off, dec + off, F(L->u) + h * N, S + bh * N * N, So + bh * N * N, yh);
            layer_norm(yh, F(L->lnx_w) + h * N, F(L->lnx_b) + h * N, 64e-5f, N, yh);
            for (int64_t j = 0; j < N; j++) {
                const float gj = g[off + j];
                yh[j] *= gj * sigmoidf_(gj);
            }
        }
SYNC();
        /* 7. output matrix */
        {
            const job_t jobs[1] = {{&L->o, y, o}};
            mats_claim(jobs, 1, B, claims + 1);
        }
SYNC();
        /* 8. residual, LayerNorm, channel-mix token shift */
        if (tid == 0) {
            const float *mk = F(L->fmix_k), *mr = F(L->fmix_r);
            for (int64_t b = 0; b < B; b++) {
                float *xb = x + b * C, *xnb = xn + b * C;
                for (int64_t c = 0; c < C; c++) xb[c] += o[b * C + c];
                layer_norm(xb, F(L->ln2_w), F(L->ln2_b), 1e-5f, C, xnb);
                memcpy(ffn_out + b * C, xnb, C * sizeof(float));
                for (int64_t c = 0; c < C; c++) {
                    const float p = ffn_in[b * C + c];
                    if (finch) {
                        const float dd = p - xnb[c];
                        xk[b * C + c] = xnb[c] + dd * mk[c];
                        xr[b * C + c] = xnb[c] + dd * mr[c];
                    } else {
                        xk[b * C + c] = xnb[c] * mk[c] + p * (1.f - mk[c]);
                        xr[b * C + c] = xnb[c] * mr[c] + p * (1.f - mr[c]);
                    }
                }
            }
        }
SYNC();
        /* 9. key (then relu^2) and receptance */
        {
            const job_t jobs[2] = {{&L->fk, xk, fk}, {&L->fr, xr, fr}};
            mats_claim(jobs, 2, B, claims + 2);
        }
SYNC();
        split16(B * Fd, tid, nt, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) {
            const float z = fk[i] > 0.f ? fk[i] : 0.f;
            fk[i] = z * z;
        }
SYNC();
        /* 10. value */
        {
            const job_t jobs[1] = {{&L->fv, fk, fv}};
            mats_claim(jobs, 1, B, claims + 3);
        }
SYNC();
        /* 11. residual */
        if (tid == 0)
            for (int64_t i = 0; i < B * C; i++) x[i] += sigmoidf_(fr[i]) * fv[i];
SYNC();
    }
    /* head */
    if (tid == 0)
        for (int64_t b = 0; b < B; b++) layer_norm(x + b * C, F(P->ln_out_w), F(P->ln_out_b), 1e-5f, C, xn + b * C);
SYNC();
    {
        const job_t jobs[1] = {{&P->head, xn, a->logits}};
        mats_claim(jobs, 1, B, a->claims + CLAIMS_PER_LAYER * P->n_layer);
    }
    SYNC(); /* everyone is done before OpenMP's own (long-spinning) end-of-region barrier */
#undef SYNC
}

static int64_t scratch_floats(const plan_t *P, int64_t B) {
    return B * (16 * P->C + 5 * P->D + P->Dw + P->F);
}

/* ---- Python entry points ------------------------------------------------------------------------ */

static int threads_arg(long nt) {
    if (nt < 1) nt = 1;
    return (int)nt;
}

static PyObject *py_step(PyObject *self, PyObject *args) {
    unsigned long long plan, x, ai, ao, fi, fo, wi, wo, lg;
    long long B;
    long nt;
    if (!PyArg_ParseTuple(args, "KLKKKKKKKKl", &plan, &B, &x, &ai, &ao, &fi, &fo, &wi, &wo, &lg, &nt)) return NULL;
    const plan_t *P = (const plan_t *)(uintptr_t)plan;
    float *buf = malloc(sizeof(float) * (size_t)scratch_floats(P, B));
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
    step_args a = {P, B, (float *)(uintptr_t)x, (const float *)(uintptr_t)ai, (const float *)(uintptr_t)fi,
                   (const float *)(uintptr_t)wi, (float *)(uintptr_t)ao, (float *)(uintptr_t)fo,
                   (float *)(uintptr_t)wo, (float *)(uintptr_t)lg, buf, &bar, claims};
    const int n_threads = threads_arg(nt);
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

/* matmul(kind, w, s, n, k, x, m, y, threads): y[m, n] = x[m, k] @ W^T (float32 x and y). */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    long long kind, n, k, m;
    unsigned long long w, s, x, y;
    long nt;
    if (!PyArg_ParseTuple(args, "LKKLLKLKl", &kind, &w, &s, &n, &k, &x, &m, &y, &nt)) return NULL;
    const mat_t mat = {kind, n, k, (int64_t)w, (int64_t)s};
    const float *xp = (const float *)(uintptr_t)x;
    float *yp = (float *)(uintptr_t)y;
    const int n_threads = threads_arg(nt);
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

/* dequantize_q8(q, s, n, k, out, threads): out[n, k] bfloat16 = q * scale (rounded to nearest even). */
static PyObject *py_dequantize_q8(PyObject *self, PyObject *args) {
    unsigned long long q, s, out;
    long long n, k;
    long nt;
    if (!PyArg_ParseTuple(args, "KKLLKl", &q, &s, &n, &k, &out, &nt)) return NULL;
    const int8_t *qp = (const int8_t *)(uintptr_t)q;
    const uint16_t *sp = (const uint16_t *)(uintptr_t)s;
    uint16_t *op = (uint16_t *)(uintptr_t)out;
    const int n_threads = threads_arg(nt);
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

static PyObject *py_scratch(PyObject *self, PyObject *args) {
    unsigned long long plan;
    long long B;
    if (!PyArg_ParseTuple(args, "KL", &plan, &B)) return NULL;
    return PyLong_FromLongLong(scratch_floats((const plan_t *)(uintptr_t)plan, B));
}

static PyMethodDef methods[] = {
    {"step", py_step, METH_VARARGS, "step(plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, threads)"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(kind, w, s, n, k, x, m, y, threads): y = x @ W^T"},
    {"dequantize_q8", py_dequantize_q8, METH_VARARGS, "dequantize_q8(q, s, n, k, out_bf16, threads)"},
    {"layout", py_layout, METH_NOARGS, "(header ints, ints per layer) of the plan"},
    {"scratch_floats", py_scratch, METH_VARARGS, "scratch floats a step of B rows uses"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_decode_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode_cpu(void) {
#if HAVE_X86
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    const char *portable = getenv("RWKVKIT_PORTABLE_KERNELS"); /* tests: force the plain C kernels */
    if (portable && strcmp(portable, "0") != 0) use_avx512 = 0;
#endif
    PyObject *mod = PyModule_Create(&moddef);
    if (mod) PyModule_AddIntConstant(mod, "avx512", use_avx512);
    return mod;
}
