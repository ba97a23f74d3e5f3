/* rwkvkit/ops/_decode.h: what the parts of the native one-token step and its matrix kernels share
 * (_decode_matvec.c: the matrix-vector kernels; _decode_rows1.c: the one-row dot kernels of bf16, fp16
 * and int8; _decode_lora.c: the LoRA kernels; _decode_bf16.c: the several-row kernels with
 * bf16 activations; _decode_step.c: the step itself; _decode_ew.c: its element-wise pieces; _decode_probe.c: the machine's limits;
 * _decode_cpu.c: the Python module): the plan's structs, which engine.py writes as a flat int64 array,
 * the matrix kinds, the team of threads' jobs and barrier, and the functions across the files. */
#ifndef RWKVKIT_DECODE_H
#define RWKVKIT_DECODE_H

#include "_args.h"
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#else
#define HAVE_X86 0
#endif

enum { MK_F32 = 0, MK_BF16 = 1, MK_Q8 = 2, MK_F16 = 3 };

typedef struct {
    int64_t kind, n, k, w, s; /* w, s: addresses */
} mat_t;

typedef struct {
    int64_t ln1_w, ln1_b, ln2_w, ln2_b;         /* float [C] */
    int64_t maa_x, maa[5];                      /* Finch: time_maa_x and w, k, v, r, g; Eagle: time_mix_{k,v,r,g} in maa[1..4] */
    int64_t decay;                              /* Finch: time_decay [C]; Eagle: time_decay [H, N] */
    int64_t u;                                  /* time_faaaa [H, N] */
    int64_t lnx_w, lnx_b;                       /* float [C] */
    int64_t fmix_k, fmix_r;                     /* channel-mix token shift */
    mat_t w1, w2, dw1, dw2;                     /* Finch LoRAs, input-major (kind MK_F32 or MK_BF16) */
    mat_t r, k, v, g, o, fk, fr, fv;            /* time-mix and channel-mix matrices */
} layer_t;

typedef struct {
    int64_t version, n_layer, C, H, N, F, V, D, Dw;
    int64_t rescale; /* fp16 models: x halved after every rescale-th block (0: never) */
    int64_t ln_out_w, ln_out_b;
    mat_t head;
    layer_t layers[];
} plan_t;

#define PLAN_HEADER_INTS ((int64_t)(sizeof(plan_t) / sizeof(int64_t)))
#define LAYER_INTS ((int64_t)(sizeof(layer_t) / sizeof(int64_t)))

extern int use_avx512; /* the matrix kernels' AVX-512 paths (configure: the CPU and portable=0) */
extern int use_bf16dp; /* and VDPBF16PS for bf16 activations (AVX512_BF16, configure) */
extern int use_dot_bf16, use_dot_vnni; /* the one-row dot kernels of _decode_rows1.c (configure) */

static inline float f16f(uint16_t h) { /* IEEE half -> float, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000 | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}


#if HAVE_X86
AVX512 static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

static inline void split(int64_t total, int tid, int nt, int64_t *lo, int64_t *hi) {
    *lo = total * tid / nt;
    *hi = total * (tid + 1) / nt;
}
/* Column split aligned to 16 so vector stores of two threads never share a cache line. */
static inline void split16(int64_t total, int tid, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (total + 15) / 16, a, b;
    split(blocks, tid, nt, &a, &b);
    *lo = a * 16 < total ? a * 16 : total;
    *hi = b * 16 < total ? b * 16 : total;
}

/* Several matrices with their own inputs and outputs; xb: the inputs rounded to bf16 for the bf16-activation
   kernels (_decode_bf16.c, bf16 and int8 matrices), or NULL: float32 inputs. */
typedef struct {
    const mat_t *m;
    const float *x;
    float *y;
    const uint16_t *xb;
} job_t;

typedef struct {
    atomic_int count, gen;
} team_barrier_t;

typedef struct {
    const plan_t *P;
    int64_t B;
    float *x; /* [B, C] residual, updated */
    const float *att_in, *ffn_in, *wkv_in;
    float *att_out, *ffn_out, *wkv_out, *logits;
    float *buf;
    int act_bf16; /* the matrices of bf16 and int8 models take bf16 activations (B > 1 only: engine.py) */
    team_barrier_t *bar;
    atomic_long *claims; /* one zeroed counter per matrix phase */
} step_args;

#define CLAIMS_PER_LAYER 4

/* _decode_matvec.c */
void mats_team(const job_t *jobs, int n_jobs, int64_t B, int tid, int nt);
void mats_claim(const job_t *jobs, int n_jobs, int64_t B, atomic_long *next);
void team_barrier(team_barrier_t *b, int team); /* spins briefly, then yields the core */
/* team(args, tid, nt) on n_threads OpenMP threads, denormals flushed on each (and on the caller) */
void team_run(void (*team)(const void *args, int tid, int nt), const void *args, int n_threads);
void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *out);
void matvec_configure(int portable, int rowdot); /* use_avx512 and the one-row dot kernels, from the CPU */
/* _decode_lora.c */
void lora_cols(const mat_t *m, int64_t n0, int64_t n1, const float *x, int64_t ldx, int64_t B, float *y,
               int64_t ldy);
/* _decode_rows1.c: one-row kernels (rows1_applies: this matrix takes them; prep: x prepared once) */
int rows1_applies(const mat_t *m);
int64_t rows1_prep_bytes(const mat_t *m);
void rows1_prep(const mat_t *m, const float *x, void *prep);
void rows1(const mat_t *m, int64_t r0, int64_t r1, const float *x, const void *prep, float *y);
void *rows1_buffer(int64_t bytes);
/* _decode_bf16.c */
void to_bf16(const float *x, uint16_t *out, int64_t n);
/* span_t: weights the caller multiplies next (the team's next claim), read into L2 while this call computes */
typedef struct {
    const char *p;
    int64_t bytes;
} span_t;
void rows_bf16(const mat_t *m, int64_t r0, int64_t r1, const uint16_t *xb, int64_t B, float *y, int64_t ldy,
               span_t next);
/* _decode_ew.c: the step's element-wise pieces */
void ew_shift_mix(int64_t n, const float *prev, const float *xn, const float *m, float *d, float *out);
void ew_lora_mix(int64_t n, const float *xn, const float *d, const float *maa, float *out);
void ew_add(int64_t n, float *x, const float *o);
void ew_relu_sq(int64_t n, float *x);
void ew_silu_gate(int64_t n, float *y, const float *g);
void ew_gated_residual(int64_t n, float *x, const float *r, const float *v, float keep);
void ew_tanh(int64_t n, float *x);
void ew_decay(int64_t n, const float *td, float *x);
/* _decode_step.c */
void step_team(const step_args *a, int tid, int nt);
/* _decode_probe.c (benchmarks: the machine's limits) */
double probe_peak(int kind, int64_t iters);
double probe_read(const void *buf, int64_t bytes);
int64_t scratch_floats(const plan_t *P, int64_t B);

#endif
