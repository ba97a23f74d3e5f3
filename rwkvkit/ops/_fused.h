/* rwkvkit/ops/_fused.h: what the fused element-wise kernels (_fused_*.c, one Python module _fused_cpu)
 * share: the argument conventions, the ISA variants of the row workers, fp32/bf16 rows, the row split
 * over OpenMP, and the entry points the module file registers. */
#ifndef RWKVKIT_FUSED_H
#define RWKVKIT_FUSED_H

#include "_args.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"

extern int isa_level;     /* 2: AVX-512 F+BW, 1: AVX2+FMA, 0: baseline; set at import */
extern int fused_amx_ok;  /* the AMX paths may run (configure: the CPU, Linux and portable=0) */


/* Each row worker is written once (an always-inlined body) and compiled three times: for AVX-512
   (F + BW, so 16-bit bf16 lanes fill a zmm register), AVX2 + FMA, and the baseline; the best the CPU
   supports is picked once at import. (target_clones cannot name avx512bw.) */
#define BODY static inline __attribute__((always_inline))
#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_VARIANTS 1
#define VARIANTS(name, args_t)                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) static void name##_avx512(     \
        const args_t *a, long i0, long i1) {                                                          \
        name##_body(a, i0, i1);                                                                       \
    }                                                                                                 \
    __attribute__((target("avx2,fma"))) static void name##_avx2(const args_t *a, long i0, long i1) { \
        name##_body(a, i0, i1);                                                                       \
    }                                                                                                 \
    static void name##_base(const args_t *a, long i0, long i1) { name##_body(a, i0, i1); }            \
    static void name(const args_t *a, long i0, long i1) {                                             \
        if (isa_level == 2)                                                                           \
            name##_avx512(a, i0, i1);                                                                 \
        else if (isa_level == 1)                                                                      \
            name##_avx2(a, i0, i1);                                                                   \
        else                                                                                          \
            name##_base(a, i0, i1);                                                                   \
    }
#else
#define VARIANTS(name, args_t) \
    static void name(const args_t *a, long i0, long i1) { name##_body(a, i0, i1); }
#endif

#define DT_F32 0
#define DT_BF16 1
#define MAX_C 16384 /* longest row a kernel keeps in its on-stack scratch (floats) */

/* ---- scalar helpers, all inlined into the vectorised row loops ------------------------------- */


/* round an fp32 value to the given dtype and back (what storing it in that dtype keeps) */
static inline float round_to(float f, int dt) { return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

/* a row of n values of dtype dt -> fp32 */
static inline void load_row(float *restrict dst, const void *src, int dt, long n) {
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

/* fp32 row -> n values of dtype dt */
static inline void store_row(void *dst, int dt, const float *restrict src, long n) {
    if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (long i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}


static inline size_t dt_size(int dt) { return dt == DT_BF16 ? 2 : 4; }

/* rows [r0, r1) of R for thread `i` of `n` */
static inline void split_rows(long R, long *r0, long *r1) {
    const int n = omp_get_num_threads(), i = omp_get_thread_num();
    *r0 = R * i / n;
    *r1 = R * (i + 1) / n;
}

/* fn(a, i0, i1) over the rows [0, R): on the calling thread when nthreads <= 1, else split in equal
   ranges over an OpenMP team (torch's pool). Call with the GIL released. */
#define RUN_ROWS(fn, a, R, nthreads)                          \
    do {                                                      \
        const int nt_ = (nthreads);                           \
        if (nt_ <= 1) {                                       \
            fn((a), 0, (R));                                  \
        } else {                                              \
            _Pragma("omp parallel num_threads(nt_)")          \
            {                                                 \
                long r0_, r1_;                                \
                split_rows((R), &r0_, &r1_);                  \
                if (r0_ < r1_) fn((a), r0_, r1_);             \
            }                                                 \
        }                                                     \
    } while (0)


/* the Python entry points (keyword arguments only, see _args.h), registered in _fused_cpu.c */
PyObject *fused_mix(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_add_norm_mix(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_finch_mix(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_group_norm_gate(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_relu_square(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_sigmoid_mul(PyObject *self, PyObject *args, PyObject *kw);
PyObject *fused_lora(PyObject *self, PyObject *args, PyObject *kw);

#endif
