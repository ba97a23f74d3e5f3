/* rwkvkit/ops/_decode_probe.c: the machine's limits for the batched step, measured rather than
 * guessed (``rwkvkit bench forward``): the peak rate of the one instruction each kind of matrix
 * product is built on, and the rate at which a core streams memory it has not seen.
 *
 * probe_peak: `iters` rounds of 16 independent accumulators (more than any core's latency x
 * throughput), data in registers, nothing but the instruction under test in the loop:
 *   kind 0: VFMADD231PS zmm (fp32 FMA, 32 FLOPs), 1: VDPBF16PS zmm (64 FLOPs, AVX512_BF16),
 *   2: VPDPBUSD zmm (int8 x uint8 -> int32, 128 ops, AVX512_VNNI).
 * probe_read: the sum of the 64-bit words of `bytes` bytes (then of the last bytes, one by one), read
 * with 64-byte loads into 8 independent integer sums.
 * Both return a value that depends on every operation, so that nothing is optimised away; -1: the
 * CPU (or the build) lacks the instruction. */
#include "_decode.h"

#if HAVE_X86
#define PEAK_LOOP(T, ZERO, OP, ONE)                                     \
    T acc[16];                                                          \
    for (int i = 0; i < 16; i++) acc[i] = ZERO;                         \
    for (int64_t it = 0; it < iters; it++)                              \
        for (int i = 0; i < 16; i++) acc[i] = OP(acc[i], ONE, ONE);     \
    for (int i = 1; i < 16; i++) acc[0] = _mm512_add_ps((__m512)acc[0], (__m512)acc[i]); \
    return _mm512_reduce_add_ps((__m512)acc[0]);

__attribute__((target("avx512f,fma"))) static double peak_fma(int64_t iters, float seed) {
    const __m512 one = _mm512_set1_ps(seed);
#define FMA3(a, b, c) _mm512_fmadd_ps(b, c, a)
    PEAK_LOOP(__m512, _mm512_setzero_ps(), FMA3, one)
#undef FMA3
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static double peak_bf16(int64_t iters, float seed) {
    const __m512bh one = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(seed));
    PEAK_LOOP(__m512, _mm512_setzero_ps(), _mm512_dpbf16_ps, one)
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static double peak_vnni(int64_t iters, float seed) {
    const __m512i one = _mm512_set1_epi8((char)(seed > 0 ? 1 : 2));
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], one, one);
    for (int i = 1; i < 16; i++) acc[0] = _mm512_add_epi32(acc[0], acc[i]);
    return (double)_mm512_reduce_add_epi32(acc[0]);
}

__attribute__((target("avx512f"))) static double read_avx512(const uint8_t *p, int64_t bytes) {
    __m512i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 512 <= bytes; i += 512)
        for (int j = 0; j < 8; j++) acc[j] = _mm512_add_epi64(acc[j], _mm512_loadu_si512((const void *)(p + i + 64 * j)));
    for (int j = 1; j < 8; j++) acc[0] = _mm512_add_epi64(acc[0], acc[j]);
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(acc[0]);
    for (; i + 8 <= bytes; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        s += v;
    }
    for (; i < bytes; i++) s += p[i];
    return (double)s;
}
#endif

double probe_peak(int kind, int64_t iters) {
#if HAVE_X86
    __builtin_cpu_init();
    const float seed = 1e-7f;
    if (kind == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return peak_fma(iters, seed);
    if (kind == 1 && __builtin_cpu_supports("avx512bf16")) return peak_bf16(iters, seed);
    if (kind == 2 && __builtin_cpu_supports("avx512vnni")) return peak_vnni(iters, seed);
#else
    (void)kind;
    (void)iters;
#endif
    return -1.0;
}

double probe_read(const void *buf, int64_t bytes) {
    const uint8_t *p = (const uint8_t *)buf;
#if HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return read_avx512(p, bytes);
#endif
    uint64_t s = 0;
    for (int64_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        s += v;
    }
    for (int64_t i = bytes / 8 * 8; i < bytes; i++) s += p[i];
    return (double)s;
}
