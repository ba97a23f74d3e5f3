/* rwkvkit/ops/_decode_lora.c: the step's LoRA products (input-major): y[b, n] = sum_i x[b, i] W[i, n] for
 * n in [n0, n1), W fp32, bf16 or fp16 [n_in, n_out] as the checkpoints store the LoRAs.
 * Every output is summed over i in order, one FMA per term (x[b, i] * W[i, n] + y), whatever the tile it
 * falls in: tiles of up to 4 input rows x 4 vectors of 16 outputs keep their sums in registers. */
#include "_decode.h"

/* one weight of the LoRA as float */
static inline float lora_w(const mat_t *m, int64_t idx) {
    if (m->kind == MK_BF16) return bf16_to_f32(((const uint16_t *)m->w)[idx]);
    if (m->kind == MK_F16) return f16f(((const uint16_t *)m->w)[idx]);
    return ((const float *)m->w)[idx];
}

#if HAVE_X86
#define LORA_INLINE static inline __attribute__((always_inline))

/* KD: 0 fp32, 1 bf16, 2 fp16 */
LORA_INLINE AVX512 __m512 lora_load16(const void *w, int64_t idx, const int KD) {
    if (KD == 1) return load_bf16x16((const uint16_t *)w + idx);
    if (KD == 2) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + idx)));
    return _mm512_loadu_ps((const float *)w + idx);
}

LORA_INLINE AVX512 void lora_tile(const mat_t *m, int64_t n, const int NC, const float *x, int64_t ldx,
                                  const int NB, float *y, int64_t ldy, const int KD) {
    const int64_t K = m->k, N = m->n;
    __m512 acc[4][4];
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < NC; c++) acc[b][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K; i++) {
        __m512 wv[4];
        for (int c = 0; c < NC; c++) wv[c] = lora_load16((const void *)(intptr_t)m->w, i * N + n + 16 * c, KD);
        for (int b = 0; b < NB; b++) {
            const __m512 xi = _mm512_set1_ps(x[b * ldx + i]);
            for (int c = 0; c < NC; c++) acc[b][c] = _mm512_fmadd_ps(xi, wv[c], acc[b][c]);
        }
    }
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(y + b * ldy + n + 16 * c, acc[b][c]);
}

typedef void (*lora_fn)(const mat_t *, int64_t, const float *, int64_t, float *, int64_t);
#define LORA_FN(KD, NB, NC)                                                                                   \
    AVX512 static void lora_##KD##_##NB##_##NC(const mat_t *m, int64_t n, const float *x, int64_t ldx, float *y, \
                                                int64_t ldy) {                                                \
        lora_tile(m, n, NC, x, ldx, NB, y, ldy, KD);                                                          \
    }
#define LORA_NB(KD, NB) LORA_FN(KD, NB, 1) LORA_FN(KD, NB, 2) LORA_FN(KD, NB, 3) LORA_FN(KD, NB, 4)
#define LORA_KD(KD) LORA_NB(KD, 1) LORA_NB(KD, 2) LORA_NB(KD, 3) LORA_NB(KD, 4)
LORA_KD(0)
LORA_KD(1)
LORA_KD(2)
#define LORA_ROW(KD, NB) {lora_##KD##_##NB##_1, lora_##KD##_##NB##_2, lora_##KD##_##NB##_3, lora_##KD##_##NB##_4}
#define LORA_TABLE(KD) {LORA_ROW(KD, 1), LORA_ROW(KD, 2), LORA_ROW(KD, 3), LORA_ROW(KD, 4)}
static const lora_fn lora_tiles[3][4][4] = {LORA_TABLE(0), LORA_TABLE(1), LORA_TABLE(2)};

AVX512 static void lora_cols_avx512(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t ldx,
                                    int64_t B, float *y, int64_t ldy) {
    const int64_t K = m->k, N = m->n, vec_end = n0 + (n1 - n0) / 16 * 16;
    const int kd = m->kind == MK_BF16 ? 1 : m->kind == MK_F16 ? 2 : 0;
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        const int nb = B - b0 < 4 ? (int)(B - b0) : 4;
        for (int64_t n = n0; n < vec_end;) {
            const int nc = (vec_end - n) / 16 < 4 ? (int)((vec_end - n) / 16) : 4;
            lora_tiles[kd][nb - 1][nc - 1](m, n, x + b0 * ldx, ldx, y + b0 * ldy, ldy);
            n += 16 * nc;
        }
    }
    for (int64_t b = 0; b < B; b++) { /* the last columns, fewer than 16 */
        float *yb = y + b * ldy;
        for (int64_t n = vec_end; n < n1; n++) yb[n] = 0.f;
        for (int64_t i = 0; i < K; i++)
            for (int64_t n = vec_end; n < n1; n++) yb[n] += x[b * ldx + i] * lora_w(m, i * N + n);
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
            for (int64_t n = n0; n < n1; n++) yb[n] += xi * lora_w(m, i * N + n);
        }
    }
}
