/* rwkvkit/ops/_decode_ew.c: the element-wise pieces of the native step (_decode_step.c) that run on
 * every row between its matrices: Finch's token-shift mixes, the residual add, relu^2 and the sigmoid
 * gate of the channel-mix, the SiLU gate after the GroupNorm, the tanh of Finch's LoRA codes and its
 * decay factors exp(-exp(.)) (libm's scalar expf / tanhf took about 3% of a 16-row step).
 *
 * Why: at 16 rows these loops touch some 100k values per layer. Built for the portable baseline they
 * ran 4 lanes wide, and relu^2 was a branch per value on a random sign (a misprediction in two); they
 * took about a tenth of a 16-row step. With AVX-512 (use_avx512) every value goes through 16-lane
 * code, the last partial vector under a mask, so a value gets the same operations wherever it falls:
 * a row's result depends neither on the number of rows nor on the threads' split. The sigmoids use
 * fexp (_cpu_math.h, about 1 ulp from libm's expf) on both paths. */
#include "_decode.h"

#if HAVE_X86
AVX512 static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* 1 / (1 + exp(-x)) on 16 lanes, with fexp16 (_cpu_math.h): the scalar sigmoid's values */
AVX512 static inline __m512 sigmoid16(__m512 x) {
    const __m512 e = fexp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

AVX512 static void shift_mix_avx512(int64_t n, const float *prev, const float *xn, const float *m, float *d,
                                    float *out) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 a = _mm512_maskz_loadu_ps(k, xn + i);
        const __m512 di = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, prev + i), a);
        if (d) _mm512_mask_storeu_ps(d + i, k, di);
        _mm512_mask_storeu_ps(out + i, k, _mm512_add_ps(a, _mm512_mul_ps(di, _mm512_maskz_loadu_ps(k, m + i))));
    }
}

AVX512 static void lora_mix_avx512(int64_t n, const float *xn, const float *d, const float *maa, float *out) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(k, maa + i), _mm512_maskz_loadu_ps(k, out + i));
        const __m512 y = _mm512_add_ps(_mm512_maskz_loadu_ps(k, xn + i), _mm512_mul_ps(_mm512_maskz_loadu_ps(k, d + i), s));
        _mm512_mask_storeu_ps(out + i, k, y);
    }
}

AVX512 static void add_avx512(int64_t n, float *x, const float *o) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        _mm512_mask_storeu_ps(x + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, o + i)));
    }
}

AVX512 static void relu_sq_avx512(int64_t n, float *x) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 z = _mm512_max_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_setzero_ps());
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(z, z));
    }
}

AVX512 static void silu_gate_avx512(int64_t n, float *y, const float *g) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 gi = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + i), _mm512_mul_ps(gi, sigmoid16(gi)));
        _mm512_mask_storeu_ps(y + i, k, v);
    }
}

AVX512 static void gated_residual_avx512(int64_t n, float *x, const float *r, const float *v, float keep) {
    const __m512 kp = _mm512_set1_ps(keep);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 g = _mm512_mul_ps(sigmoid16(_mm512_maskz_loadu_ps(k, r + i)), _mm512_maskz_loadu_ps(k, v + i));
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(k, x + i), g), kp));
    }
}
/* tanh on 16 lanes: sign(x) (1 - e) / (1 + e), e = exp(-2|x|), and its odd series below |x| = 1/16
   (where 1 - e would cancel): a few ulp from libm's tanhf */
AVX512 static inline __m512 tanh16(__m512 x) {
    const __m512 a = _mm512_abs_ps(x), a2 = _mm512_mul_ps(x, x);
    const __m512 e = fexp16(_mm512_mul_ps(a, _mm512_set1_ps(-2.f)));
    const __m512 big = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
    __m512 p = _mm512_fmadd_ps(a2, _mm512_set1_ps(-17.f / 315.f), _mm512_set1_ps(2.f / 15.f));
    p = _mm512_fmadd_ps(a2, p, _mm512_set1_ps(-1.f / 3.f));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(a2, a), p, a);
    const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.0625f), _CMP_LT_OQ), big, small);
    return _mm512_or_ps(t, _mm512_and_ps(x, _mm512_set1_ps(-0.f))); /* the sign of x back */
}

AVX512 static void tanh_avx512(int64_t n, float *x) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        _mm512_mask_storeu_ps(x + i, k, tanh16(_mm512_maskz_loadu_ps(k, x + i)));
    }
}

AVX512 static void decay_avx512(int64_t n, const float *td, float *x) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail(n - i);
        const __m512 y = fexp16(_mm512_add_ps(_mm512_maskz_loadu_ps(k, td + i), _mm512_maskz_loadu_ps(k, x + i)));
        _mm512_mask_storeu_ps(x + i, k, fexp16(_mm512_sub_ps(_mm512_setzero_ps(), y)));
    }
}
#define VEC(call)      \
    if (use_avx512) {  \
        call;          \
        return;        \
    }
#else
#define VEC(call)
#endif

static inline float sigmoid(float x) { return 1.f / (1.f + fexp(-x)); }

static inline float tanh1(float x) {
    const float a = fabsf(x), a2 = x * x;
    float t;
    if (a < 0.0625f) {
        t = a + a2 * a * (-1.f / 3.f + a2 * (2.f / 15.f + a2 * (-17.f / 315.f)));
    } else {
        const float e = fexp(-2.f * a);
        t = (1.f - e) / (1.f + e);
    }
    return copysignf(t, x);
}

/* d = prev - xn (when d is not NULL) and out = xn + (prev - xn) * m: Finch's token-shift mixes */
void ew_shift_mix(int64_t n, const float *prev, const float *xn, const float *m, float *d, float *out) {
    VEC(shift_mix_avx512(n, prev, xn, m, d, out))
    for (int64_t i = 0; i < n; i++) {
        const float di = prev[i] - xn[i];
        if (d) d[i] = di;
        out[i] = xn[i] + di * m[i];
    }
}

/* out = xn + d * (maa + out): Finch's five data-dependent mixes, out holding the LoRA's term */
void ew_lora_mix(int64_t n, const float *xn, const float *d, const float *maa, float *out) {
    VEC(lora_mix_avx512(n, xn, d, maa, out))
    for (int64_t i = 0; i < n; i++) out[i] = xn[i] + d[i] * (maa[i] + out[i]);
}

/* x += o */
void ew_add(int64_t n, float *x, const float *o) {
    VEC(add_avx512(n, x, o))
    for (int64_t i = 0; i < n; i++) x[i] += o[i];
}

/* x = max(x, 0)^2 */
void ew_relu_sq(int64_t n, float *x) {
    VEC(relu_sq_avx512(n, x))
    for (int64_t i = 0; i < n; i++) {
        const float z = x[i] > 0.f ? x[i] : 0.f;
        x[i] = z * z;
    }
}

/* y *= g * sigmoid(g) */
void ew_silu_gate(int64_t n, float *y, const float *g) {
    VEC(silu_gate_avx512(n, y, g))
    for (int64_t i = 0; i < n; i++) y[i] *= g[i] * sigmoid(g[i]);
}

/* x = (x + sigmoid(r) * v) * keep: the channel-mix's output added to the residual */
void ew_gated_residual(int64_t n, float *x, const float *r, const float *v, float keep) {
    VEC(gated_residual_avx512(n, x, r, v, keep))
    for (int64_t i = 0; i < n; i++) x[i] = (x[i] + sigmoid(r[i]) * v[i]) * keep;
}

/* x = tanh(x): Finch's LoRA codes */
void ew_tanh(int64_t n, float *x) {
    VEC(tanh_avx512(n, x))
    for (int64_t i = 0; i < n; i++) x[i] = tanh1(x[i]);
}

/* x = exp(-exp(td + x)): Finch's decay factors from the decay LoRA's output x */
void ew_decay(int64_t n, const float *td, float *x) {
    VEC(decay_avx512(n, td, x))
    for (int64_t i = 0; i < n; i++) x[i] = fexp(-fexp(td[i] + x[i]));
}
