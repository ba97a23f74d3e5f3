/* rwkvkit/ops/_decode_rows1.c: the one-row (B = 1) matrix-vector kernels of bf16, fp16 and int8 weights:
 * y[n] = sum_i W[n, i] x[i] for n in [r0, r1), float32 x, float32 sums.
 *
 * One row reads every weight once and does two FLOPs with it, so these loops should run at the memory's
 * streaming rate. Two things kept the widening kernels of _decode_matvec.c below it for 2-byte and 1-byte
 * weights: they read four weight rows at once (four streams 1.5 KB apart, which the hardware prefetcher
 * follows poorly; one row at a time reads the matrix as one sequential stream, see PF_BYTES), and they
 * spend 2-3 instructions per 16 weights widening them to fp32 before the FMA (bf16: zero-extend and
 * shift; int8: sign-extend, convert, and a scale per block). Here the weights are used as stored:
 *
 *   MK_BF16, AVX512_BF16: x is split once per matrix into x = xh + xl, two bf16 numbers (xh = x rounded
 *     to bf16, xl = the remainder rounded to bf16: about 16 bits of x), and each 32 weights cost two
 *     VDPBF16PS (products of two bf16 values are exact in fp32; sums fp32).
 *   MK_Q8, AVX512_VNNI: x is split once per matrix, per block of 32, into a 16-bit fixed-point number
 *     xq = x / sx (|xq| <= 32639, sx = the block's absmax / 32639) written as two 8-bit digits
 *     xq = 256 xh + xl (both signed); the weights become unsigned by w + 128 (one XOR), so that VPDPBUSD
 *     (unsigned x signed bytes, 4 products per lane) gives sum (w + 128) xh and sum (w + 128) xl, and
 *     256 * the first + the second - 128 * sum xq (a per-lane constant of x) is the exact integer
 *     sum w xq of each 4 inputs. That is scaled by the weight block's scale times sx and summed in fp32.
 *     64 weights cost two dot instructions and a few integer ops; x keeps ~16 bits (the activations are
 *     not quantised to 8 bits: that costs visible quality, see rwkvkit bench forward).
 *   MK_F16 (AVX-512F): the weights widened exactly by integer ops (load_f16) and an fp32 FMA per 16
 *     weights, the fp32 kernel's shape, without software prefetch (it cost 15-20% here).
 *
 * Without AVX512_BF16 / AVX512_VNNI (or with the dot kernels switched off by configure(rowdot=0): tests,
 * A/B timing) bf16 and int8 go through _decode_matvec.c's widening kernels; the portable C path handles
 * every kind. The prepared x (xh/xl, digits, corrections, scales) lives in a per-thread buffer, filled
 * once per matrix per step phase by mats_team / mats_claim (_decode_matvec.c). */
#include "_decode.h"

int use_dot_bf16 = 0; /* VDPBF16PS split-x kernel for bf16 rows (configure) */
int use_dot_vnni = 0; /* VPDPBUSD digit kernel for int8 rows (configure) */

#define Q8_XMAX 32639.f /* |xq| bound: xh = (xq + 128) >> 8 stays in [-127, 127], xl in [-128, 127] */

static inline int64_t pad64(int64_t k) { return (k + 63) / 64 * 64; }

int rows1_applies(const mat_t *m) {
#if HAVE_X86
    if (!use_avx512 || m->k % 32) return 0;
    return m->kind == MK_F16 || (m->kind == MK_BF16 && use_dot_bf16) || (m->kind == MK_Q8 && use_dot_vnni);
#else
    (void)m;
    return 0;
#endif
}

int64_t rows1_prep_bytes(const mat_t *m) {
    if (!rows1_applies(m) || m->kind == MK_F16) return 0;
    return 4 * pad64(m->k); /* bf16: xh, xl (2 + 2 bytes); int8: xh, xl (1 + 1), corr (4 / 4), sx (4 / 4) */
}

#if HAVE_X86
#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

/* One weight row at a time: the matrix is read as one sequential stream (rows are contiguous), which the
   hardware prefetcher follows; four rows at a time (four streams 1-3 KB apart, as the widening kernels
   read) left these loops at about 60% of the bandwidth (measured on this file's 65536 x 768 head,
   1 thread: bf16 12 -> 19-22 GB/s, int8 10 -> 16-19). Software prefetch PF_BYTES ahead on the stream
   (0 .. 4 KB measured: within the noise of a shared host; 1 KB was best more often than not). */
#define PF_BYTES 1024
#define PF(p) _mm_prefetch((const char *)(p) + PF_BYTES, _MM_HINT_T0)

/* ---- bf16 ---------------------------------------------------------------------------------------- */

BF16DOT static void prep_bf16(const float *x, int64_t K, uint16_t *xh, uint16_t *xl) {
    for (int64_t i = 0; i < K; i += 16) { /* K % 32 == 0 */
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m256bh h = _mm512_cvtneps_pbh(v);
        const __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
        _mm256_storeu_si256((__m256i *)(xh + i), (__m256i)h);
        _mm256_storeu_si256((__m256i *)(xl + i), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hv)));
    }
}

#define DP(acc, w, x) acc = _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)_mm512_loadu_si512(x))

BF16DOT static void rows_bf16dot(const mat_t *m, int64_t r0, int64_t r1, const void *prep, float *y) {
    const int64_t K = m->k;
    const uint16_t *xh = prep, *xl = xh + pad64(K);
    for (int64_t n = r0; n < r1; n++) {
        const uint16_t *w = (const uint16_t *)m->w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 64 <= K; i += 64) {
            PF(w + i);
            PF(w + i + 32);
            const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 32);
            DP(a0, w0, xh + i);
            DP(a1, w0, xl + i);
            DP(a2, w1, xh + i + 32);
            DP(a3, w1, xl + i + 32);
        }
        if (i < K) { /* K % 64 == 32 */
            const __m512i w0 = _mm512_loadu_si512(w + i);
            DP(a0, w0, xh + i);
            DP(a1, w0, xl + i);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    }
}
#undef DP

/* ---- int8 (Q8_0) --------------------------------------------------------------------------------- */

typedef struct {
    int8_t *h, *l;   /* digits [Kp] */
    int32_t *corr;   /* -128 * sum of xq over each 4 inputs [Kp / 4] */
    float *sx;       /* the block's scale, per 4 inputs [Kp / 4] */
} q8x_t;

static inline q8x_t q8x_parts(void *prep, int64_t K) {
    const int64_t Kp = pad64(K);
    int8_t *h = prep;
    q8x_t p = {h, h + Kp, (int32_t *)(h + 2 * Kp), (float *)(h + 3 * Kp)};
    return p;
}

VNNI static void prep_q8(const float *x, int64_t K, void *prep) {
    const int64_t Kp = pad64(K);
    const q8x_t p = q8x_parts(prep, K);
    memset(prep, 0, (size_t)(4 * Kp));
    for (int64_t j = 0; j < K / 32; j++) { /* one block of 32 inputs */
        const __m512 v0 = _mm512_loadu_ps(x + 32 * j), v1 = _mm512_loadu_ps(x + 32 * j + 16);
        const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float sx = mx / Q8_XMAX, inv = mx > 0.f ? Q8_XMAX / mx : 0.f;
        const __m512 vi = _mm512_set1_ps(inv);
        for (int hf = 0; hf < 2; hf++) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(hf ? v1 : v0, vi)); /* nearest */
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
            const __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
            const int64_t i = 32 * j + 16 * hf;
            _mm_storeu_si128((__m128i *)(p.h + i), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128((__m128i *)(p.l + i), _mm512_cvtepi32_epi8(lo));
            _mm_storeu_ps(p.sx + i / 4, _mm_set1_ps(sx));
        }
    }
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t i = 0; i < K; i += 64) { /* corr = -128 (256 sum xh + sum xl) over each 4 */
        const __m512i sh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(p.h + i));
        const __m512i sl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(p.l + i));
        const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(sh, 8), sl);
        _mm512_storeu_si512(p.corr + i / 4, _mm512_mullo_epi32(s, _mm512_set1_epi32(-128)));
    }
}

/* Every 64 inputs (two blocks) the lanes' integer sums are scaled by [sw(2t) x 8, sw(2t+1) x 8] * sx,
   the weight scales of 16 blocks converted once per 512 inputs. */
VNNI static void rows_q8vnni(const mat_t *m, int64_t r0, int64_t r1, const void *prep, float *y) {
    const int64_t K = m->k, nb = K / 32;
    const q8x_t p = q8x_parts((void *)prep, K);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    const __m512i idx0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t n = r0; n < r1; n++) {
        const int8_t *q = (const int8_t *)m->w + n * K;
        const uint16_t *s = (const uint16_t *)m->s + n * nb;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < nb; g += 16) {
            const __mmask16 sm = nb - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nb - g)) - 1);
            const __m512 sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(sm, s + g));
            const int64_t end = 32 * (g + 16) < K ? 32 * (g + 16) : K;
            __m512i idx = idx0;
            for (int64_t c = 32 * g; c < end; c += 64) {
                const __mmask64 wm = end - c >= 64 ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
                PF(q + c);
                const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(wm, q + c), bias);
                const __m512i th = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(p.h + c));
                const __m512i tl = _mm512_dpbusd_epi32(_mm512_loadu_si512(p.corr + c / 4), w, _mm512_loadu_si512(p.l + c));
                const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(th, 8), tl));
                const __m512 sc = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sw), _mm512_loadu_ps(p.sx + c / 4));
                acc = _mm512_fmadd_ps(sum, sc, acc);
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
            }
        }
        y[n] = _mm512_reduce_add_ps(acc);
    }
}

/* ---- fp16 ---------------------------------------------------------------------------------------- */

/* 16 fp16 weights widened to fp32 with integer ops and one multiply, exactly: the exponent and mantissa
   bits moved into place (an fp32 number 2^-112 times the value, subnormal for fp16 subnormals) times
   2^112; fp16 inf / NaN (exponent 31) get the all-ones exponent; the sign is copied. Read from memory,
   VCVTPH2PS with its load left these loops at 19-22 GB/s where this reaches 30-36 (bench matvec, 2
   threads, the 65536 x 768 head; streaming read 25-37). The multiply needs fp32 subnormal inputs: the
   caller clears MXCSR.DAZ around it (the step sets it). */
AVX512 static inline __m512 load_f16(const uint16_t *p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    const __m512i a = _mm512_and_si512(h, _mm512_set1_epi32(0x7fff));
    __m512 f = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 13)), _mm512_set1_ps(0x1p112f));
    const __mmask16 special = _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x7c00));
    f = _mm512_castsi512_ps(_mm512_mask_or_epi32(_mm512_castps_si512(f), special, _mm512_castps_si512(f),
                                                 _mm512_set1_epi32(0x7f800000)));
    /* sign | magnitude: bit 31 from h << 16, the rest from f */
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_set1_epi32(INT32_MIN), _mm512_slli_epi32(h, 16),
                                                         _mm512_castps_si512(f), 0xca));
}
#define LOAD_F16(p) load_f16(p)

AVX512 static void rows_f16(const mat_t *m, int64_t r0, int64_t r1, const float *x, float *y) {
    const int64_t K = m->k;
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x40u); /* no DAZ: fp16 subnormals pass through fp32 subnormals (load_f16) */
    for (int64_t n = r0; n < r1; n++) {
        const uint16_t *w = (const uint16_t *)m->w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 64 <= K; i += 64) {
            a0 = _mm512_fmadd_ps(LOAD_F16(w + i), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(LOAD_F16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
            a2 = _mm512_fmadd_ps(LOAD_F16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
            a3 = _mm512_fmadd_ps(LOAD_F16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
        }
        if (i < K) { /* K % 64 == 32 */
            a0 = _mm512_fmadd_ps(LOAD_F16(w + i), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(LOAD_F16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    }
    _mm_setcsr(csr);
}
#undef LOAD_F16
#endif

void rows1_prep(const mat_t *m, const float *x, void *prep) {
#if HAVE_X86
    if (m->kind == MK_BF16) prep_bf16(x, m->k, prep, (uint16_t *)prep + pad64(m->k));
    if (m->kind == MK_Q8) prep_q8(x, m->k, prep);
#endif
}

void rows1(const mat_t *m, int64_t r0, int64_t r1, const float *x, const void *prep, float *y) {
#if HAVE_X86
    if (m->kind == MK_BF16)
        rows_bf16dot(m, r0, r1, prep, y);
    else if (m->kind == MK_Q8)
        rows_q8vnni(m, r0, r1, prep, y);
    else
        rows_f16(m, r0, r1, x, y);
#endif
}

/* The per-thread buffer of the prepared inputs (grown as needed, kept for the thread's life). */
static __thread void *prep_buf;
static __thread int64_t prep_cap;

void *rows1_buffer(int64_t bytes) {
    if (bytes > prep_cap) {
        free(prep_buf);
        prep_buf = aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
        prep_cap = prep_buf ? bytes : 0;
    }
    return prep_buf;
}
