/* rwkvkit/ops/_amx.h: what the AMX kernels (_fused_cpu.c, _matmul_cpu.c) share: the check that the CPU
 * has AMX-BF16 with the kernel's permission to use it, the tile configuration every kernel uses, and
 * the AVX-512 twin of _cpu_math.h's bf16 rounding they apply to tile results (fexp16 is _cpu_math.h's).
 * Include after _cpu_math.h. Defines HAVE_AMX (and AMX_TARGET, the target attribute of the kernels)
 * only where the compiler has the AMX intrinsics (gcc >= 12 on x86-64); the including file keeps a
 * fallback for the rest. */
#ifndef RWKVKIT_AMX_H
#define RWKVKIT_AMX_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define HAVE_AMX 1
#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AMX_INLINE static inline __attribute__((always_inline)) AMX_TARGET

/* 1 when the kernels may use AMX-BF16 tiles: the CPU has them (and AVX-512) and Linux granted the
   tile state, which it hands out only on request (ARCH_REQ_XCOMP_PERM = 0x1023 for
   XFEATURE_XTILEDATA = 18, once per process, valid for all its threads; asking again is harmless).
   Called by the modules' configure() unless the caller asked for portable kernels. */
static inline int amx_request(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("avx512f") ||
        !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512dq") ||
        !__builtin_cpu_supports("avx512vl"))
        return 0;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* all eight tiles 16 rows x 64 bytes (16 fp32 or 32 bf16 per row), for the calling thread */
AMX_INLINE void amx_tiles_16x64(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* f32_to_bf16 in 16 lanes (nearest even, NaN quietened): the bf16 bits in the low half of each
   32-bit lane */
AMX_INLINE __m512i bf16_bits16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

/* the same, packed to 16 bf16 values */
AMX_INLINE __m256i bf16_pack16(__m512 v) { return _mm512_cvtepi32_epi16(bf16_bits16(v)); }

/* a value rounded to bf16 and back: bf16 bits -> fp32 */
AMX_INLINE __m512 bf16_value16(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

/* fexp16: _cpu_math.h */
#endif

#endif
