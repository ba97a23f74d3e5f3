/* rwkvkit/ops/_cpu_math.h: scalar helpers shared by the CPU kernels (_wkv_cpu.c, _fused_cpu.c,
 * _decode_cpu.c), written so that loops calling them vectorise: bf16 <-> fp32 conversions with torch's
 * rounding, a float exp (and fexp16, its AVX-512 twin), and the row sums of the norms. Include after <stdint.h> and <string.h>. */
#ifndef RWKVKIT_CPU_MATH_H
#define RWKVKIT_CPU_MATH_H

#define CPU_MATH_INLINE static inline __attribute__((always_inline))

/* bf16 -> fp32: exact (the bf16 bits are the top half of the fp32 bits) */
CPU_MATH_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, round to nearest, ties to even, NaN stays NaN: torch's conversion */
CPU_MATH_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest, ties to even */
    const uint32_t quiet = (u >> 16) | 0x40u;                         /* NaN stays NaN (quietened) */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded);
}

/* exp(x) for float: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial (Cephes expf, about
   1 ulp), 2^n put into the exponent bits. Below -87.3 (results under FLT_MIN) it returns 0, above
   88.37 +inf. */
CPU_MATH_INLINE float fexp(float x) {
    const float xc = x < -87.3f ? -87.3f : (x > 88.37f ? 88.37f : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float y = p * scale;
    return x < -87.3f ? 0.0f : (x > 88.37f ? __builtin_inff() : y);
}

/* sum of x[i] (squares = 0) or of (x[i] - center)^2 (squares = 1) over n values, in 16 interleaved
   partial sums so that the loop vectorises (a single running sum is one long dependency chain); every
   kernel's LayerNorm / GroupNorm uses it, so they all sum in the same order */
CPU_MATH_INLINE float row_sum(const float *restrict x, long n, int squares, float center) {
    float acc[16] = {0};
    long i = 0;
    if (!squares)
        for (; i + 16 <= n; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += x[i + l];
    else
        for (; i + 16 <= n; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += (x[i + l] - center) * (x[i + l] - center);
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += squares ? (x[i] - center) * (x[i] - center) : x[i];
    return s;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CPU_MATH_AVX512 static inline __attribute__((always_inline, target("avx512f,avx512dq")))

/* fexp in 16 lanes: the same steps (each multiply and add rounded, as written there), so the same
   values */
CPU_MATH_AVX512 __m512 fexp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.37f);
    const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi), magic = _mm512_set1_ps(12582912.0f);
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), magic), magic);
    __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
    return _mm512_mask_mov_ps(_mm512_mask_mov_ps(y, under, _mm512_setzero_ps()), over,
                              _mm512_set1_ps(__builtin_inff()));
}
#endif

#endif
