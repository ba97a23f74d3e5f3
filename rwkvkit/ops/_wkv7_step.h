/* rwkvkit/ops/_wkv7_step.h: one token of the RWKV-7 WKV recurrence on the CPU, for one head or all
 * heads, on the state as the model keeps it ([value][key]): the decode path of _wkv7_cpu.c (calls
 * of a few tokens), meant to be shared with a one-token decode step.
 *
 * Per head, with the state S [N(value)][N(key)] fp32 (the reference's layout) and one token's fp32
 * vectors r, d (the decay factors exp(w)), k, v, a, b [N]:
 *     S_i  <- S_i * d + (S_i . a) b + v_i k          (row i of S, a row over keys)
 *     y_i   = S_i . r                                 (the updated row)
 * Rows are independent: each row is loaded once, gives its two dot products and its update, and is
 * stored once; the out-of-order core overlaps consecutive rows' reductions. The output is taken from
 * the OLD row with the identity S_i' . r = S_i . (d * r) + (S_i . a)(b . r) + v_i (k . r), so the two
 * reductions of a row are independent of each other and of its update (the same value as the
 * updated row's dot product up to fp32 rounding).
 *
 * Include after <stdint.h>, <string.h> and "_cpu_math.h". Everything here is static inline: the
 * generic loops are inlined into each ISA clone of their caller (mark the caller MULTIVERSION), the
 * N == 64 AVX-512 variant carries its own target attribute and is chosen with wkv7_avx512_ok().
 */
#ifndef RWKVKIT_WKV7_STEP_H
#define RWKVKIT_WKV7_STEP_H

#define WKV7_INLINE static inline __attribute__((always_inline))

/* one token of one head: fp32 vectors [N] (d = exp(w)), and scratch of 2 * N floats */
typedef struct {
    const float *r, *d, *k, *v, *a, *b;
} wkv7_vecs_t;

/* dot product in 16 interleaved partial sums (vectorises without reassociation flags) */
WKV7_INLINE float wkv7_dot(const float *restrict x, const float *restrict y, long n) {
    float acc[16] = {0};
    long i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[i + l] * y[i + l];
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

/* Portable: one token of one head, any N. S [N][N] updated in place, y [N] written; dr: N floats of
   scratch. */
WKV7_INLINE void wkv7_head_generic(float *restrict S, const wkv7_vecs_t *t, float *restrict y,
                                   float *restrict dr, long N) {
    const float *restrict d = t->d, *restrict k = t->k, *restrict a = t->a, *restrict b = t->b;
    for (long j = 0; j < N; j++) dr[j] = d[j] * t->r[j];
    const float br = wkv7_dot(b, t->r, N), kr = wkv7_dot(k, t->r, N);
    for (long i = 0; i < N; i++) {
        float *restrict Si = S + i * N;
        const float sa = wkv7_dot(Si, a, N), vi = t->v[i];
        y[i] = wkv7_dot(Si, dr, N) + sa * br + vi * kr;
        for (long j = 0; j < N; j++) Si[j] = Si[j] * d[j] + sa * b[j] + vi * k[j];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define WKV7_HAVE_N64_AVX512 1
#define WKV7_N64_TARGET __attribute__((target("avx512f,avx512dq,fma")))

static inline int wkv7_avx512_ok(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

/* sum of the 16 lanes of x and of y, returned in lanes 0 and 1 (one shared reduction tree) */
WKV7_N64_TARGET WKV7_INLINE __m128 wkv7_sum2(__m512 x, __m512 y) {
    const __m256 x8 = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    const __m256 y8 = _mm256_add_ps(_mm512_castps512_ps256(y), _mm512_extractf32x8_ps(y, 1));
    const __m128 x4 = _mm_add_ps(_mm256_castps256_ps128(x8), _mm256_extractf128_ps(x8, 1));
    const __m128 y4 = _mm_add_ps(_mm256_castps256_ps128(y8), _mm256_extractf128_ps(y8, 1));
    const __m128 h = _mm_hadd_ps(x4, y4); /* x01 x23 y01 y23 */
    return _mm_hadd_ps(h, h);             /* x, y, x, y */
}

/* N == 64 with AVX-512: the token's five key-side vectors (a, d, b, k, d * r) stay in 20 registers;
   each row of S is four registers. The state is read from S and written to So (So == S: in place); a
   separate So aligned to 64 bytes is written with streaming stores (at 16 rows of a 0.1B model the
   states, 37 MB, do not stay in cache from step to step, and an ordinary store first reads the line it
   overwrites). Not inlined (a target-specific function): callers of any ISA call it after checking
   wkv7_avx512_ok(). */
WKV7_N64_TARGET __attribute__((unused)) static void wkv7_head_n64(const float *S, float *So, const wkv7_vecs_t *t,
                                                                  float *y) {
    const int stream = So != S && ((uintptr_t)So & 63) == 0;
    __m512 A[4], D[4], Bv[4], K[4], DR[4];
    __m512 br = _mm512_setzero_ps(), kr = _mm512_setzero_ps();
    for (int q = 0; q < 4; q++) {
        const __m512 r = _mm512_loadu_ps(t->r + 16 * q);
        A[q] = _mm512_loadu_ps(t->a + 16 * q), D[q] = _mm512_loadu_ps(t->d + 16 * q);
        Bv[q] = _mm512_loadu_ps(t->b + 16 * q), K[q] = _mm512_loadu_ps(t->k + 16 * q);
        DR[q] = _mm512_mul_ps(D[q], r);
        br = _mm512_fmadd_ps(Bv[q], r, br), kr = _mm512_fmadd_ps(K[q], r, kr);
    }
    const __m128 brkr = wkv7_sum2(br, kr);
    const float bsr = _mm_cvtss_f32(brkr), ksr = _mm_cvtss_f32(_mm_shuffle_ps(brkr, brkr, 1));
    for (long i = 0; i < 64; i++) {
        const float *Si = S + 64 * i;
        float *Soi = So + 64 * i;
        __m512 s[4];
        for (int q = 0; q < 4; q++) s[q] = _mm512_loadu_ps(Si + 16 * q);
        __m512 pa = _mm512_mul_ps(s[0], A[0]), pr = _mm512_mul_ps(s[0], DR[0]);
        for (int q = 1; q < 4; q++) pa = _mm512_fmadd_ps(s[q], A[q], pa), pr = _mm512_fmadd_ps(s[q], DR[q], pr);
        const __m128 sums = wkv7_sum2(pa, pr);
        const float sa = _mm_cvtss_f32(sums), vi = t->v[i];
        y[i] = _mm_cvtss_f32(_mm_shuffle_ps(sums, sums, 1)) + sa * bsr + vi * ksr;
        const __m512 vsa = _mm512_set1_ps(sa), vv = _mm512_set1_ps(vi);
        for (int q = 0; q < 4; q++) {
            const __m512 o = _mm512_fmadd_ps(s[q], D[q], _mm512_fmadd_ps(vsa, Bv[q], _mm512_mul_ps(vv, K[q])));
            if (stream)
                _mm512_stream_ps(Soi + 16 * q, o);
            else
                _mm512_storeu_ps(Soi + 16 * q, o);
        }
    }
    if (stream) _mm_sfence(); /* the streamed state is ordered before whatever synchronises next */
}
#endif

/* One token of every head: state [H][N][N], the token's vectors [H * N] each (as in wkv7_vecs_t),
   y [H * N]; scratch: N floats. For the one-token decode step. */
typedef struct {
    long H, N;
    float *state;
    wkv7_vecs_t vec; /* pointers to [H * N] */
    float *y;
} wkv7_token_t;

WKV7_INLINE void wkv7_token_heads(const wkv7_token_t *tk, float *restrict scratch, int use_avx512) {
    const long N = tk->N;
    for (long h = 0; h < tk->H; h++) {
        const long o = h * N;
        const wkv7_vecs_t t = {tk->vec.r + o, tk->vec.d + o, tk->vec.k + o,
                               tk->vec.v + o, tk->vec.a + o, tk->vec.b + o};
        float *S = tk->state + h * N * N;
#ifdef WKV7_HAVE_N64_AVX512
        if (use_avx512 && N == 64) {
            wkv7_head_n64(S, S, &t, tk->y + o);
            continue;
        }
#endif
        (void)use_avx512;
        wkv7_head_generic(S, &t, tk->y + o, scratch, N);
    }
}

#endif
