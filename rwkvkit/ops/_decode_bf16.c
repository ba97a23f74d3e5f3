/* rwkvkit/ops/_decode_bf16.c: the matrix kernels of a step of several rows with bf16 activations:
 * y[b, n] = sum_i W[n, i] xb[b, i], where xb holds the rows of x rounded to bf16 (nearest even, as torch
 * rounds) and W is a bf16 matrix as stored or an int8 (Q8_0) matrix dequantised to bf16 (q * scale
 * rounded to nearest even: the matrix a prompt multiplies, see quant.py). Products are exact, sums fp32.
 *
 * Why: B rows cost B x 2 FLOPs per weight while the weights are read once. With fp32 activations that
 * is one 16-lane FMA per 16 weights per row plus widening the weights, and a 16-row step is bound by the
 * FMA units at about twice the time one row spends reading the weights. VDPBF16PS (AVX512_BF16) takes
 * 32 bf16 pairs per instruction and the bf16 weights as they are stored: half the instructions, no
 * widening. Which steps take this path (several rows of a bf16 or int8 model, the kernel choice) is
 * decided in _decode_step.c and engine.py; one row never does.
 *
 * Tiles: 4 weight rows x up to 4 input rows (16 accumulators in registers). The weight rows go by
 * chunks of CHUNK_ROWS (96 KB of bf16 at K = 768: they stay in L2), the input rows by groups of
 * GROUP_ROWS: a chunk is read from memory by the first group and from L2 by the next, and a group's
 * bf16 inputs (12 KB) and the tile being multiplied fit L1 together (all 16 rows at once did not: 24 KB
 * of inputs; measured on 16 distinct 2688x768 matrices, 1 thread: 16 rows 140 -> 160 GFLOP/s). Q8_0
 * chunks are dequantised once into a per-thread buffer, for every group. Every output is the same
 * sequence of operations whatever the number of rows B and wherever its row falls in the tiles, so a
 * row's result does not depend on the other rows of the batch.
 *
 * Without AVX512_BF16 (AVX-512F only, or the portable C): the same products with fp32 FMAs (a product
 * of two bf16 values is exact in fp32), so the values differ from the VDPBF16PS ones by summation
 * order only. */
#include "_decode.h"

int use_bf16dp = 0; /* VDPBF16PS available and wanted (configure) */

/* ---- the rows' activations to bf16 -------------------------------------------------------------- */

#if HAVE_X86
#define BF16DP __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

BF16DP static void to_bf16_dp(const float *x, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(out + i), (__m512i)v);
    }
    for (; i < n; i += 16) { /* the last values under a mask (the channel-mix key's claims: 40 at a time) */
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x + i));
        _mm256_mask_storeu_epi16((void *)(out + i), k, (__m256i)v);
    }
}
#endif

/* out[i] = bf16(x[i]) for n values (the same bits on either path, denormals aside: the step flushes them) */
void to_bf16(const float *x, uint16_t *out, int64_t n) {
#if HAVE_X86
    if (use_bf16dp) {
        to_bf16_dp(x, out, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

/* Weights are prefetched into L2, not L1: at 16 rows the rows' bf16 inputs (24 KB at C = 768) and the
   tile being multiplied fill L1 already, and prefetches into it evicted them (measured: bf16 B = 1
   7 -> 11 GB/s, B = 16 +20%, int8 B = 16 +15%; 1 thread, 0.1B shapes). */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif

/* ---- Q8_0 rows dequantised to bf16, into a per-thread buffer ------------------------------------ */

static __thread uint16_t *wtile;
static __thread int64_t wtile_cap;

static uint16_t *tile_buffer(int64_t n) {
    if (n > wtile_cap) {
        free(wtile);
        wtile = aligned_alloc(64, (size_t)((n * 2 + 63) / 64 * 64));
        wtile_cap = wtile ? n : 0;
    }
    return wtile;
}

static void dequant_rows_c(const mat_t *m, int64_t n, int rows, uint16_t *out) {
    const int64_t K = m->k, nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const int8_t *q = (const int8_t *)m->w + (n + r) * K;
        const uint16_t *s = (const uint16_t *)m->s + (n + r) * nb;
        for (int64_t i = 0; i < K; i++) out[r * K + i] = f32_to_bf16((float)q[i] * f16f(s[i / 32]));
    }
}

#if HAVE_X86
AVX512 static void dequant_rows_avx512(const mat_t *m, int64_t n, int rows, uint16_t *out) {
    const int64_t K = m->k, nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const int8_t *q = (const int8_t *)m->w + (n + r) * K;
        const uint16_t *s = (const uint16_t *)m->s + (n + r) * nb;
        for (int64_t j = 0; j < nb; j++) {
            const __m512 sc = _mm512_set1_ps(_cvtsh_ss(s[j]));
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * j + 16 * h))));
                const __m512i u = _mm512_castps_si512(_mm512_mul_ps(v, sc)); /* f32_to_bf16, no NaN here */
                const __m512i rnd = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                                     _mm512_set1_epi32(0x7fff));
                _mm256_storeu_si256((__m256i *)(out + r * K + 32 * j + 16 * h),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, rnd), 16)));
            }
        }
    }
}

BF16DP static void dequant_rows_dp(const mat_t *m, int64_t n, int rows, uint16_t *out) {
    const int64_t K = m->k, nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const int8_t *q = (const int8_t *)m->w + (n + r) * K;
        const uint16_t *s = (const uint16_t *)m->s + (n + r) * nb;
        _mm_prefetch((const char *)(q + 8 * K), PF_HINT); /* the rows two tiles on */
        for (int64_t j = 0; j < nb; j++) {
            const __m512 sc = _mm512_set1_ps(_cvtsh_ss(s[j]));
            if (!(j & 1)) _mm_prefetch((const char *)(q + 8 * K + 32 * j), PF_HINT);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * j))));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * j + 16))));
            const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sc), _mm512_mul_ps(lo, sc));
            _mm512_store_si512((void *)(out + r * K + 32 * j), (__m512i)v);
        }
    }
}

/* ---- tiles: R weight rows (w, row stride ldw) x NB input rows (xb, row stride K) ------------------ */

#define TILE_INLINE static inline __attribute__((always_inline))
#ifndef GROUP_ROWS
#define GROUP_ROWS 8
#endif
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 64
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif

/* The 16 sums of a tile's accumulators v[4r + b] in one pass (45 instructions instead of 16 horizontal
   sums of 8), stored as y[b * ldy + r] for the R x NB outputs that exist. Every output is summed in the
   same order (lanes (i, i+8), (i+4, i+12), then pairs, then pairs), whatever R and NB are. */
TILE_INLINE AVX512 void store_sums(const __m512 v[16], const int R, const int NB, float *y, int64_t ldy) {
    __m512 s[8], t[4], q[2];
    for (int p = 0; p < 8; p++) /* lanes of 128 bits: [v0 L0+L2, v0 L1+L3, v1 L0+L2, v1 L1+L3] */
        s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xee));
    for (int p = 0; p < 4; p++) /* lane L: the four partial sums of v[4p + L] */
        t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0xdd));
    for (int p = 0; p < 2; p++)
        q[p] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * p], t[2 * p + 1]), _mm512_unpackhi_ps(t[2 * p], t[2 * p + 1]));
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(q[0]), _mm512_castps_pd(q[1]))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(q[0]), _mm512_castps_pd(q[1]))));
    /* lane L, element m of u: the sum of v[4m + L], i.e. r = m, b = L */
    float out[16];
    _mm512_storeu_ps(out, u);
    for (int b = 0; b < NB; b++) memcpy(y + b * ldy, out + 4 * b, R * sizeof(float));
}

TILE_INLINE BF16DP void tile_dp(const uint16_t *w, int64_t ldw, const int R, const uint16_t *xb, int64_t K,
                                const int NB, float *y, int64_t ldy, const uint16_t *pf) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps(); /* unrolled: not a memset of a stack copy */
    for (int64_t i = 0; i < K; i += 32) {
        __m512bh wv[4];
        if (pf) /* a later tile's rows, while this one computes (first input tile only) */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(pf + r * ldw + i), PF_HINT);
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w + r * ldw + i));
        for (int b = 0; b < NB; b++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + b * K + i));
            for (int r = 0; r < R; r++) acc[4 * r + b] = _mm512_dpbf16_ps(acc[4 * r + b], wv[r], xv);
        }
    }
    store_sums(acc, R, NB, y, ldy);
}

AVX512 static inline __m512 widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

TILE_INLINE AVX512 void tile_fma(const uint16_t *w, int64_t ldw, const int R, const uint16_t *xb, int64_t K,
                                 const int NB, float *y, int64_t ldy, const uint16_t *pf) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K; i += 16) {
        __m512 wv[4];
        if (pf && !(i & 31))
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(pf + r * ldw + i), PF_HINT);
        for (int r = 0; r < R; r++) wv[r] = widen16(w + r * ldw + i);
        for (int b = 0; b < NB; b++) {
            const __m512 xv = widen16(xb + b * K + i);
            for (int r = 0; r < R; r++) acc[4 * r + b] = _mm512_fmadd_ps(wv[r], xv, acc[4 * r + b]);
        }
    }
    store_sums(acc, R, NB, y, ldy);
}

/* Every (R, NB) pair as its own specialisation, so that the accumulators stay in registers. */
#define TILE_CASES(fn, TARGET)                                                                                \
    TARGET static void fn##_any(const uint16_t *w, int64_t ldw, int R, const uint16_t *xb, int64_t K, int NB, \
                                float *y, int64_t ldy, const uint16_t *pf) {                                  \
        switch (R * 8 + NB) {                                                                                 \
        case 4 * 8 + 4: fn(w, ldw, 4, xb, K, 4, y, ldy, pf); break;                                           \
        case 4 * 8 + 3: fn(w, ldw, 4, xb, K, 3, y, ldy, pf); break;                                           \
        case 4 * 8 + 2: fn(w, ldw, 4, xb, K, 2, y, ldy, pf); break;                                           \
        case 4 * 8 + 1: fn(w, ldw, 4, xb, K, 1, y, ldy, pf); break;                                           \
        case 1 * 8 + 4: fn(w, ldw, 1, xb, K, 4, y, ldy, pf); break;                                           \
        case 1 * 8 + 3: fn(w, ldw, 1, xb, K, 3, y, ldy, pf); break;                                           \
        case 1 * 8 + 2: fn(w, ldw, 1, xb, K, 2, y, ldy, pf); break;                                           \
        default: fn(w, ldw, 1, xb, K, 1, y, ldy, pf); break;                                                  \
        }                                                                                                     \
    }
TILE_CASES(tile_dp, BF16DP)
TILE_CASES(tile_fma, AVX512)

typedef void (*tile_fn)(const uint16_t *, int64_t, int, const uint16_t *, int64_t, int, float *, int64_t,
                        const uint16_t *);
#endif

/* ---- y[b, n] for n in [r0, r1), all B rows -------------------------------------------------------- */

static void rows_bf16_c(const mat_t *m, int64_t r0, int64_t r1, const uint16_t *xb, int64_t B, float *y,
                        int64_t ldy) {
    const int64_t K = m->k;
    uint16_t *wq = m->kind == MK_Q8 ? tile_buffer(K) : NULL;
    for (int64_t n = r0; n < r1; n++) {
        const uint16_t *w = (const uint16_t *)m->w + n * K;
        if (wq) {
            dequant_rows_c(m, n, 1, wq);
            w = wq;
        }
        for (int64_t b = 0; b < B; b++) {
            float acc = 0.f;
            for (int64_t i = 0; i < K; i++) acc += bf16_to_f32(w[i]) * bf16_to_f32(xb[b * K + i]);
            y[b * ldy + n] = acc;
        }
    }
}

/* The bytes of rows [n0, n1) of m (int8 rows without their scales: those are 1/16 as much). */
static span_t rows_span(const mat_t *m, int64_t n0, int64_t n1) {
    const int64_t row = m->kind == MK_Q8 ? m->k : 2 * m->k;
    return (span_t){(const char *)m->w + n0 * row, (n1 - n0) * row};
}

/* Each chunk of rows is multiplied by every group of input rows, but only the first group reads it from
   memory: with 16 rows that left the memory idle for half the time and the FMA units waiting for it for
   the other half (a step's matrices took about the sum of their compute time and their read time).
   So while a chunk is multiplied, the next one (the next chunk of this call, or `next`: the team's next
   claim) is prefetched into L2 a few lines before each tile, spread evenly over the chunk's tiles
   (measured, 0.1B shapes, 16 rows, 2 threads, A/B in one process: 18.1 -> 16.4 ms for a step's matrices;
   into L1 or non-temporal instead: 19.1; without the first group's own prefetch: 16.9). */
void rows_bf16(const mat_t *m, int64_t r0, int64_t r1, const uint16_t *xb, int64_t B, float *y, int64_t ldy,
               span_t next) {
    const int64_t K = m->k;
#if HAVE_X86
    if (use_avx512 && K % 32 == 0) {
        const tile_fn tile = use_bf16dp ? tile_dp_any : tile_fma_any;
        const int q8 = m->kind == MK_Q8;
        uint16_t *wq = q8 ? tile_buffer(CHUNK_ROWS * K) : NULL;
        if (q8 && !wq) {
            rows_bf16_c(m, r0, r1, xb, B, y, ldy); /* no memory for the tile: the slow path still works */
            return;
        }
        for (int64_t c0 = r0; c0 < r1; c0 += CHUNK_ROWS) {
            const int64_t c1 = c0 + CHUNK_ROWS < r1 ? c0 + CHUNK_ROWS : r1;
            if (q8) { /* the chunk's rows dequantised once, for every group of input rows */
                if (use_bf16dp) dequant_rows_dp(m, c0, (int)(c1 - c0), wq);
                else dequant_rows_avx512(m, c0, (int)(c1 - c0), wq);
            }
            const span_t ahead = c1 < r1 ? rows_span(m, c1, c1 + CHUNK_ROWS < r1 ? c1 + CHUNK_ROWS : r1) : next;
            const int64_t tiles = (c1 - c0 + 3) / 4 * ((B + 3) / 4);
            const int64_t per_tile = ahead.p ? ((ahead.bytes + 63) / 64 + tiles - 1) / tiles : 0;
            const char *pa = ahead.p, *const pe = ahead.p ? ahead.p + ahead.bytes : NULL;
            for (int64_t g0 = 0; g0 < B; g0 += GROUP_ROWS) {
                const int64_t g1 = g0 + GROUP_ROWS < B ? g0 + GROUP_ROWS : B;
                for (int64_t n = c0; n < c1;) {
                    const int R = c1 - n >= 4 ? 4 : 1;
                    const uint16_t *w = q8 ? wq + (n - c0) * K : (const uint16_t *)m->w + n * K, *pf = NULL;
                    if (!q8 && g0 == 0 && n + (PF_AHEAD + 1) * R <= r1) pf = w + PF_AHEAD * R * K; /* two tiles on */
                    for (int64_t b0 = g0; b0 < g1; b0 += 4) {
                        const int nb = g1 - b0 < 4 ? (int)(g1 - b0) : 4;
                        for (int64_t l = 0; l < per_tile && pa < pe; l++, pa += 64) _mm_prefetch(pa, PF_HINT);
                        tile(w, K, R, xb + b0 * K, K, nb, y + b0 * ldy + n, ldy, b0 == g0 ? pf : NULL);
                    }
                    n += R;
                }
            }
        }
        return;
    }
#endif
    rows_bf16_c(m, r0, r1, xb, B, y, ldy);
}
