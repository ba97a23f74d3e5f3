/* rwkvkit/ops/_decode_matvec.c: the step's matrix kernels. y[b, n] = sum_i W[n, i] x[b, i] for a few input
 * rows b (decode) over fp32, bf16 or int8 (Q8_0) weights, rows of W split over the team (evenly, or
 * claimed in chunks), and the input-major LoRA products. Matrix kinds and layouts: _decode_cpu.c. */
#include "_decode.h"

int use_avx512 = 0;

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

static void mat_rows(const job_t *job, int64_t r0, int64_t r1, int64_t B) {
    const mat_t *m = job->m;
    const float *x = job->x;
    float *y = job->y;
    const int64_t ldy = m->n;
    if (job->xb && m->kind != MK_F32) {
        rows_bf16(m, r0, r1, job->xb, B, y, ldy);
        return;
    }
#if HAVE_X86
    if (use_avx512 && m->k % 32 == 0) {
        rows_avx512(m, r0, r1, x, B, y, ldy);
        return;
    }
#endif
    rows_generic(m, r0, r1, x, B, y, ldy);
}

void mats_team(const job_t *jobs, int n_jobs, int64_t B, int tid, int nt) {
    int64_t total = 0;
    for (int j = 0; j < n_jobs; j++) total += jobs[j].m->n;
    int64_t lo, hi, base = 0;
    split(total, tid, nt, &lo, &hi);
    for (int j = 0; j < n_jobs; j++) {
        const int64_t n = jobs[j].m->n, a = lo > base ? lo - base : 0, e = hi - base < n ? hi - base : n;
        if (a < e) mat_rows(&jobs[j], a, e, B);
        base += n;
    }
}

/* ---- LoRA (input-major): y[b, n] = sum_i x[b, i] W[i, n] for n in [n0, n1) -----------------------
 * Every output is summed over i in order, one FMA per term (x[b, i] * W[i, n] + y), whatever the tile it
 * falls in: tiles of up to 4 input rows x 4 vectors of 16 outputs keep their sums in registers. */

#if HAVE_X86
#define LORA_INLINE static inline __attribute__((always_inline))

LORA_INLINE AVX512 void lora_tile(const mat_t *m, int64_t n, const int NC, const float *x, int64_t ldx,
                                  const int NB, float *y, int64_t ldy, const int BF) {
    const int64_t K = m->k, N = m->n;
    __m512 acc[4][4];
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < NC; c++) acc[b][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K; i++) {
        __m512 wv[4];
        for (int c = 0; c < NC; c++)
            wv[c] = BF ? load_bf16x16((const uint16_t *)m->w + i * N + n + 16 * c)
                       : _mm512_loadu_ps((const float *)m->w + i * N + n + 16 * c);
        for (int b = 0; b < NB; b++) {
            const __m512 xi = _mm512_set1_ps(x[b * ldx + i]);
            for (int c = 0; c < NC; c++) acc[b][c] = _mm512_fmadd_ps(xi, wv[c], acc[b][c]);
        }
    }
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(y + b * ldy + n + 16 * c, acc[b][c]);
}

typedef void (*lora_fn)(const mat_t *, int64_t, const float *, int64_t, float *, int64_t);
#define LORA_FN(BF, NB, NC)                                                                                   \
    AVX512 static void lora_##BF##_##NB##_##NC(const mat_t *m, int64_t n, const float *x, int64_t ldx, float *y, \
                                                int64_t ldy) {                                                \
        lora_tile(m, n, NC, x, ldx, NB, y, ldy, BF);                                                          \
    }
#define LORA_NB(BF, NB) LORA_FN(BF, NB, 1) LORA_FN(BF, NB, 2) LORA_FN(BF, NB, 3) LORA_FN(BF, NB, 4)
#define LORA_BF(BF) LORA_NB(BF, 1) LORA_NB(BF, 2) LORA_NB(BF, 3) LORA_NB(BF, 4)
LORA_BF(0)
LORA_BF(1)
#define LORA_ROW(BF, NB) {lora_##BF##_##NB##_1, lora_##BF##_##NB##_2, lora_##BF##_##NB##_3, lora_##BF##_##NB##_4}
static const lora_fn lora_tiles[2][4][4] = {
    {LORA_ROW(0, 1), LORA_ROW(0, 2), LORA_ROW(0, 3), LORA_ROW(0, 4)},
    {LORA_ROW(1, 1), LORA_ROW(1, 2), LORA_ROW(1, 3), LORA_ROW(1, 4)},
};

AVX512 static void lora_cols_avx512(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t ldx,
                                    int64_t B, float *y, int64_t ldy) {
    const int64_t K = m->k, N = m->n, vec_end = n0 + (n1 - n0) / 16 * 16;
    const int bf = m->kind == MK_BF16;
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        const int nb = B - b0 < 4 ? (int)(B - b0) : 4;
        for (int64_t n = n0; n < vec_end;) {
            const int nc = (vec_end - n) / 16 < 4 ? (int)((vec_end - n) / 16) : 4;
            lora_tiles[bf][nb - 1][nc - 1](m, n, x + b0 * ldx, ldx, y + b0 * ldy, ldy);
            n += 16 * nc;
        }
    }
    for (int64_t b = 0; b < B; b++) { /* the last columns, fewer than 16 */
        float *yb = y + b * ldy;
        for (int64_t n = vec_end; n < n1; n++) yb[n] = 0.f;
        for (int64_t i = 0; i < K; i++) {
            if (bf) {
                const uint16_t *w = (const uint16_t *)m->w + i * N;
                for (int64_t n = vec_end; n < n1; n++) yb[n] += x[b * ldx + i] * bf16_to_f32(w[n]);
            } else {
                const float *w = (const float *)m->w + i * N;
                for (int64_t n = vec_end; n < n1; n++) yb[n] += x[b * ldx + i] * w[n];
            }
        }
    }
}
#endif

void lora_cols(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t ldx, int64_t B, float *y,
               int64_t ldy) {
#if HAVE_X86
    if (use_avx512) {
        lora_cols_avx512(m, n0, n1, x, ldx, B, y, ldy);
        return;
    }
#endif
    const int64_t K = m->k, N = m->n;
    for (int64_t b = 0; b < B; b++) {
        float *yb = y + b * ldy;
        for (int64_t n = n0; n < n1; n++) yb[n] = 0.f;
        for (int64_t i = 0; i < K; i++) {
            const float xi = x[b * ldx + i];
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

#define ROW_CHUNK 32 /* fewest rows per claim; chunks are multiples of 4 (the kernels' row groups) */

/* Several matrices with their own inputs and outputs; the team claims chunks of their rows from *next
 * (zero before the phase, used once). About 64 chunks per phase: enough to balance, few enough that
 * the shared counter costs nothing. */
void mats_claim(const job_t *jobs, int n_jobs, int64_t B, atomic_long *next) {
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
                mat_rows(&jobs[j], r0, r1, B);
                break;
            }
            c -= chunks;
        }
    }
}

/* ---- team synchronisation ------------------------------------------------------------------------
 * OpenMP's own barrier spins for a long time before it sleeps; on a machine with more runnable threads
 * than cores, a thread spinning there keeps the one it waits for off the core (measured: a step went
 * from 10 ms to 300 ms with one other busy process on two cores). This barrier spins briefly, then
 * yields the core. Matrix rows are handed out in chunks from a shared counter, so a thread that loses
 * its core holds up one chunk, not its whole share. */

#include <sched.h>

void team_barrier(team_barrier_t *b, int team) {
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

/* LayerNorm of one row of n (the blocks' ln1/ln2/ln_out and, per head, the GroupNorm) */
void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *out) {
    const float mean = row_sum(x, n, 0, 0.f) / (float)n;
    const float rstd = 1.f / sqrtf(row_sum(x, n, 1, mean) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}
