/* rwkvkit.ops._fused_cpu: fused element-wise kernels around the matrices of an RWKV block (CPU, forward).
 *
 * Inference on the CPU spends a large share of a prefill on element-wise passes between the matrix
 * products: dtype casts, token-shift mixes, GroupNorm, gates. Each kernel here does one such chain in
 * a single pass over rows of [R, C] (R = B * T), reading and writing fp32 or bf16 directly, so the
 * intermediates never go to memory. The math is the PyTorch fallback's (rwkvkit/models/common.py,
 * rwkv5.py, rwkv6.py), including where that path rounds an intermediate to the compute dtype.
 *
 * Conventions (validated by the Python wrapper, rwkvkit/ops/fused.py):
 *   - pointers are raw integers to contiguous buffers; a dtype code says what each holds:
 *     0 = float32, 1 = bfloat16 (fp32 -> bf16 rounds to nearest even, like torch's cast);
 *   - token shift: row r = b * T + t reads as its previous token row r - 1, or prev[b] when t == 0;
 *   - rows are split over OpenMP threads (nthreads from the caller, which follows
 *     torch.get_num_threads() and uses one thread for small inputs); the OpenMP runtime is the one
 *     torch already loaded (libgomp.so.1), so both share one thread pool.
 *
 * Rounding follows torch's: the file is compiled without FMA contraction, and fmaf is written out
 * exactly where torch fuses (addcmul), so fp32 results agree bit for bit or within an ulp or two.
 *
 * exp is a vectorisable Cephes-style polynomial (about 1 ulp, as Sleef's in torch), so every loop
 * here vectorises (AVX-512, AVX2 or baseline code, picked at import).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"

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
static int isa_level = 0; /* 2: AVX-512 F+BW, 1: AVX2+FMA, 0: baseline; set at import */

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

/* ---- token-shift mixes ----------------------------------------------------------------------- */

typedef struct {
    long R, T, C, M;
    const float *x, *prev, *mix; /* x [R, C], prev [B, C], mix [M, C] */
    int lerp, out_dt;
    char *out; /* [M, R, C] */
} mix_args;

/* out_j = x + (prev - x) * mix_j (Finch, lerp = 0) or x * mix_j + prev * (1 - mix_j) (RWKV-4/5),
   for j < M, rounded to out_dt; prev is the token-shifted x, read from the row above. The Finch form
   is one fused multiply-add, as torch's addcmul; the lerp rounds every step, as the four tensor ops
   of the PyTorch path. */
BODY void mix_rows_body(const mix_args *a, long r0, long r1) {
    const long C = a->C;
    float buf[C];
    for (long r = r0; r < r1; r++) {
        const float *restrict x = a->x + r * C;
        const float *restrict p = (r % a->T == 0) ? a->prev + (r / a->T) * C : x - C;
        for (long j = 0; j < a->M; j++) {
            const float *restrict m = a->mix + j * C;
            if (a->lerp)
                for (long c = 0; c < C; c++) buf[c] = x[c] * m[c] + p[c] * (1.0f - m[c]);
            else
                for (long c = 0; c < C; c++) buf[c] = fmaf(p[c] - x[c], m[c], x[c]);
            store_row(a->out + (size_t)(j * a->R + r) * C * dt_size(a->out_dt), a->out_dt, buf, C);
        }
    }
}
VARIANTS(mix_rows, mix_args)

static PyObject *py_mix(PyObject *self, PyObject *args) {
    mix_args a;
    unsigned long long px, pp, pm, po;
    int nthreads;
    if (!PyArg_ParseTuple(args, "llllKKKiiKi", &a.R, &a.T, &a.C, &a.M, &px, &pp, &pm, &a.lerp, &a.out_dt, &po,
                          &nthreads))
        return NULL;
    if (a.R <= 0 || a.T <= 0 || a.C <= 0 || a.C > MAX_C || a.M <= 0) {
        PyErr_SetString(PyExc_ValueError, "mix: bad sizes");
        return NULL;
    }
    a.x = (const float *)(uintptr_t)px;
    a.prev = (const float *)(uintptr_t)pp;
    a.mix = (const float *)(uintptr_t)pm;
    a.out = (char *)(uintptr_t)po;
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(mix_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- Finch: the five data-dependent mixes with their LoRA product --------------------------- */

typedef struct {
    long R, T, C, D;
    const float *x, *prev; /* x [R, C], prev [B, C] */
    const float *m;        /* [R, 5 * D]: tanh((x + d * maa_x) @ maa_w1), fp32 (the AVX/baseline path) */
    const float *w2;       /* [5, D, C] maa_w2, fp32 (the AVX/baseline path) */
    const uint16_t *m16;   /* the same two in bf16 (the AMX path) */
    const uint16_t *wp;    /* maa_w2 packed for AMX by fm_amx_pack */
    const float *maa;      /* [5, C] maa_w, maa_k, maa_v, maa_r, maa_g */
    int out_dt;
    char *out; /* [5, R, C] */
} fm_args;

#define FM_ROWS 4 /* rows per block: each w2 vector loaded serves 4 rows */
#define FM_COLS 64 /* columns per block: FM_ROWS x FM_COLS accumulators stay in registers */

/* out_j = x + d * (maa_j + m_j @ w2_j), d = prev - x, for the five branches j: the [5, R, C] LoRA
   product never goes to memory. Rows in blocks of FM_ROWS, columns in blocks of FM_COLS; the sum
   over the D inputs runs in order k = 0..D-1 with one FMA per term. */
BODY void finch_mix_rows_body(const fm_args *a, long r0, long r1) {
    const long C = a->C, D = a->D, R = a->R;
    const size_t osz = dt_size(a->out_dt);
    float buf[FM_ROWS][FM_COLS];
    /* rows innermost: one D x FM_COLS tile of w2 (8 KB) stays in L1 while every row block passes;
       with rows outermost each row block re-read all of w2 (480 KB) from L2 */
    for (long j = 0; j < 5; j++) {
        const float *restrict w2 = a->w2 + j * D * C;
        for (long c0 = 0; c0 < C; c0 += FM_COLS) {
            const long nc = C - c0 < FM_COLS ? C - c0 : FM_COLS;
            for (long rb = r0; rb < r1; rb += FM_ROWS) {
                const long nr = r1 - rb < FM_ROWS ? r1 - rb : FM_ROWS;
                float acc[FM_ROWS][FM_COLS] = {{0}};
                if (nr == FM_ROWS && nc == FM_COLS) { /* full block: constant trip counts vectorise */
                    for (long k = 0; k < D; k++) {
                        const float *restrict wk = w2 + k * C + c0;
#pragma GCC unroll 8
                        for (long i = 0; i < FM_ROWS; i++) {
                            const float mk = a->m[(rb + i) * 5 * D + j * D + k];
#pragma GCC unroll 64
                            for (long c = 0; c < FM_COLS; c++) acc[i][c] = fmaf(mk, wk[c], acc[i][c]);
                        }
                    }
                } else {
                    for (long k = 0; k < D; k++) {
                        const float *restrict wk = w2 + k * C + c0;
                        for (long i = 0; i < nr; i++) {
                            const float mk = a->m[(rb + i) * 5 * D + j * D + k];
                            for (long c = 0; c < nc; c++) acc[i][c] = fmaf(mk, wk[c], acc[i][c]);
                        }
                    }
                }
                const float *restrict maa = a->maa + j * C + c0;
                for (long i = 0; i < nr; i++) {
                    const long r = rb + i;
                    const float *restrict x = a->x + r * C + c0;
                    const float *restrict p = (r % a->T == 0) ? a->prev + (r / a->T) * C + c0 : x - C;
                    char *dst = a->out + ((size_t)(j * R + r) * C + c0) * osz;
                    if (nc == FM_COLS) { /* constant trip counts: unrolled, no loop overhead */
                        for (long c = 0; c < FM_COLS; c++)
                            buf[i][c] = fmaf(p[c] - x[c], maa[c] + acc[i][c], x[c]);
                        store_row(dst, a->out_dt, buf[i], FM_COLS);
                    } else {
                        for (long c = 0; c < nc; c++) buf[i][c] = fmaf(p[c] - x[c], maa[c] + acc[i][c], x[c]);
                        store_row(dst, a->out_dt, buf[i], nc);
                    }
                }
            }
        }
    }
}
VARIANTS(finch_mix_rows, fm_args)

/* The AMX path, for bf16 m and maa_w2 (the model's dtypes) on CPUs with AMX-BF16 (Sapphire Rapids
   on): one tile product (TDPBF16PS: 16 rows x 16 columns x 32 inputs, exact bf16 products summed
   in fp32) gives the LoRA term of 16 rows x 16 columns of one branch, 16 times the work of an
   AVX-512 FMA, so the pass is bound by its memory traffic (mostly writing the [5, R, C] output).
   Compared with the fp32 path only the order in which the D products are summed differs (and AMX
   treats subnormal inputs and sums as zero). The rest is AVX-512, which every AMX CPU has. */
#include "_amx.h"
#ifdef HAVE_AMX
#define FM_AMX_COLS 32 /* columns per step: two 16-column accumulator tiles */
static int amx_ok = 0; /* set at import (amx_request): the CPU has AMX-BF16 and Linux lets us use it */
#define FM_AMX_OK amx_ok

static inline long fm_amx_kb(long D) { return (D + 31) / 32; } /* 32-input steps */
static inline long fm_amx_cp(long C) { return (C + FM_AMX_COLS - 1) / FM_AMX_COLS * FM_AMX_COLS; }
static inline size_t fm_amx_pack_size(long C, long D) { return (size_t)5 * fm_amx_kb(D) * 32 * fm_amx_cp(C); }

/* maa_w2 [5, D, C] bf16 -> [5][KB][Cp / 16][16 pairs k][16 columns][2] (the B-tile layout: input
   pairs interleaved), zero-padded to KB * 32 inputs and Cp columns; part i of n of the work */
AMX_TARGET static void fm_amx_pack(const uint16_t *w2, uint16_t *wp, long C, long D, int i, int n) {
    const long KB = fm_amx_kb(D), CB = fm_amx_cp(C) / 16, tiles = 5 * KB * CB;
    for (long t = tiles * i / n; t < tiles * (i + 1) / n; t++) {
        const long j = t / (KB * CB), kb = t / CB % KB, cb = t % CB;
        uint16_t *dst = wp + t * 512;
        if (kb * 32 + 32 <= D && cb * 16 + 16 <= C) { /* a full tile: rows k, k + 1 -> 32-bit pairs */
            const uint16_t *src = w2 + (j * D + kb * 32) * C + cb * 16;
            for (long kk = 0; kk < 16; kk++) {
                const uint16_t *k0 = src + 2 * kk * C, *k1 = k0 + C;
                const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)k0));
                const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)k1));
                _mm512_storeu_si512((void *)(dst + kk * 32), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
            continue;
        }
        for (long kk = 0; kk < 16; kk++)
            for (long q = 0; q < 2; q++) {
                const long k = kb * 32 + kk * 2 + q;
                for (long c = 0; c < 16; c++) {
                    const long col = cb * 16 + c;
                    dst[kk * 32 + c * 2 + q] = (k < D && col < C) ? w2[(j * D + k) * C + col] : 0;
                }
            }
    }
}

/* output j of row r for columns [c, c + 32) (n of them valid), acc the row's 32 LoRA terms; prefetches
   the next step's lines of this output (and of x, when j == 0), which the hardware does not guess */
AMX_TARGET static inline __attribute__((always_inline)) void fm_amx_out(const fm_args *a, long r, long j,
                                                                      long c, long n, const float *acc,
                                                                      int out_dt) {
    const long C = a->C;
    const float *x = a->x + r * C, *maa = a->maa + j * C + c;
    const float *p = (r % a->T == 0) ? a->prev + (r / a->T) * C : x - C;
    const size_t at = (size_t)(j * a->R + r) * C + c;
    if (c + 32 < C) {
        if (j == 0) {
            _mm_prefetch((const char *)(x + c + 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(x + c + 48), _MM_HINT_T0);
        }
        _mm_prefetch((const char *)a->out + (at + 32) * (out_dt == DT_BF16 ? 2 : 4), _MM_HINT_ET0);
        if (out_dt != DT_BF16) _mm_prefetch((const char *)((float *)a->out + at + 48), _MM_HINT_ET0);
    }
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n >= 32 ? 0xffff : (n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1));
    const __m512 x0 = _mm512_maskz_loadu_ps(m0, x + c), x1 = _mm512_maskz_loadu_ps(m1, x + c + 16);
    const __m512 d0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(m0, p + c), x0);
    const __m512 d1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(m1, p + c + 16), x1);
    const __m512 mix0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, maa), _mm512_load_ps(acc));
    const __m512 mix1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, maa + 16), _mm512_load_ps(acc + 16));
    const __m512 o0 = _mm512_fmadd_ps(d0, mix0, x0), o1 = _mm512_fmadd_ps(d1, mix1, x1);
    if (out_dt == DT_BF16) {
        const __m512i o = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_pack16(o0)), bf16_pack16(o1), 1);
        _mm512_mask_storeu_epi16((uint16_t *)a->out + at, (__mmask32)m0 | ((__mmask32)m1 << 16), o);
    } else {
        _mm512_mask_storeu_ps((float *)a->out + at, m0, o0);
        _mm512_mask_storeu_ps((float *)a->out + at + 16, m1, o1);
    }
}

/* outputs j of rows [rb, rb + nr), columns [c0, c0 + 32), from acc [32][32] */
AMX_TARGET static void fm_amx_outs(const fm_args *a, long rb, long nr, long j, long c0, const float *acc) {
    const long n = a->C - c0 < 32 ? a->C - c0 : 32;
    if (a->out_dt == DT_BF16)
        for (long i = 0; i < nr; i++) fm_amx_out(a, rb + i, j, c0, n, acc + i * 32, DT_BF16);
    else
        for (long i = 0; i < nr; i++) fm_amx_out(a, rb + i, j, c0, n, acc + i * 32, DT_F32);
}

/* rows [r0, r1): blocks of 32 rows, steps of 32 columns, one branch j at a time: the tiles compute
   the LoRA terms of a 32 x 32 block (tiles 4-7: 2 x 2 blocks of 16 x 16) into one of two buffers
   while the outputs of the previous block are written from the other, so the tile products run
   under the memory-bound outputs. Tiles: 0-1 = m (A), 2-3 = maa_w2 (B), 4-7 = accumulators. */
AMX_TARGET static void finch_mix_amx_rows(const fm_args *a, long r0, long r1) {
    const long C = a->C, D = a->D, KB = fm_amx_kb(D), CB = fm_amx_cp(C) / 16;
    amx_tiles_16x64();
    uint16_t abuf[5 * KB * 1024] __attribute__((aligned(64))); /* m of a row block, [5][KB][32][32] */
    float acc[2][32][32] __attribute__((aligned(64)));
    for (long rb = r0; rb < r1; rb += 32) {
        const long nr = r1 - rb < 32 ? r1 - rb : 32;
        /* A tiles: the block's m, zero-padded to 32 rows and KB * 32 inputs */
        for (long j = 0; j < 5; j++)
            for (long kb = 0; kb < KB; kb++)
                for (long i = 0; i < 32; i++) {
                    uint16_t *dst = abuf + ((j * KB + kb) * 32 + i) * 32;
                    const long nk = i >= nr ? 0 : (D - kb * 32 < 32 ? D - kb * 32 : 32);
                    memcpy(dst, a->m16 + (rb + i) * 5 * D + j * D + kb * 32, sizeof(uint16_t) * nk);
                    memset(dst + nk, 0, sizeof(uint16_t) * (32 - nk));
                }
        long pc = -1, pj = 0; /* the block whose outputs are pending, in acc[cur ^ 1] */
        int cur = 0;
        for (long c0 = 0; c0 < C; c0 += 32)
            for (long j = 0; j < 5; j++) {
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (long kb = 0; kb < KB; kb++) {
                    const uint16_t *b = a->wp + ((j * KB + kb) * CB + c0 / 16) * 512;
                    const uint16_t *am = abuf + (j * KB + kb) * 1024;
                    _tile_loadd(0, am, 64);
                    _tile_loadd(2, b, 64);
                    _tile_dpbf16ps(4, 0, 2);
                    _tile_loadd(3, b + 512, 64);
                    _tile_dpbf16ps(5, 0, 3);
                    _tile_loadd(1, am + 512, 64);
                    _tile_dpbf16ps(6, 1, 2);
                    _tile_dpbf16ps(7, 1, 3);
                }
                float *ac = &acc[cur][0][0];
                _tile_stored(4, ac, 128);
                _tile_stored(5, ac + 16, 128);
                _tile_stored(6, ac + 16 * 32, 128);
                _tile_stored(7, ac + 16 * 32 + 16, 128);
                if (pc >= 0) fm_amx_outs(a, rb, nr, pj, pc, &acc[cur ^ 1][0][0]);
                pc = c0;
                pj = j;
                cur ^= 1;
            }
        fm_amx_outs(a, rb, nr, pj, pc, &acc[cur ^ 1][0][0]);
    }
    _tile_release();
}
#else
#define FM_AMX_OK 0
#endif

static PyObject *py_finch_mix(PyObject *self, PyObject *args) {
    fm_args a;
    unsigned long long px, pp, pm, pw, pa, po;
    int nthreads, mw_dt;
    if (!PyArg_ParseTuple(args, "llllKKKKiKiKi", &a.R, &a.T, &a.C, &a.D, &px, &pp, &pm, &pw, &mw_dt, &pa,
                          &a.out_dt, &po, &nthreads))
        return NULL;
    if (a.R <= 0 || a.T <= 0 || a.C <= 0 || a.D <= 0 || (mw_dt != DT_F32 && mw_dt != DT_BF16)) {
        PyErr_SetString(PyExc_ValueError, "finch_mix: bad sizes or dtype");
        return NULL;
    }
    a.x = (const float *)(uintptr_t)px;
    a.prev = (const float *)(uintptr_t)pp;
    a.maa = (const float *)(uintptr_t)pa;
    a.out = (char *)(uintptr_t)po;
    a.m = a.w2 = NULL;
    a.m16 = a.wp = NULL;
    void *tmp = NULL; /* the packed maa_w2 (AMX) or fp32 copies of bf16 m and maa_w2 */
    int use_amx = 0;
    if (mw_dt == DT_F32) {
        a.m = (const float *)(uintptr_t)pm;
        a.w2 = (const float *)(uintptr_t)pw;
    } else {
#ifdef HAVE_AMX
        use_amx = amx_ok && a.D <= 256; /* the m block lives on the stack: 80 KB at D = 256 */
#endif
        if (use_amx) {
#ifdef HAVE_AMX
            a.m16 = (const uint16_t *)(uintptr_t)pm;
            tmp = malloc(sizeof(uint16_t) * fm_amx_pack_size(a.C, a.D));
#endif
        } else { /* no AMX: the fp32 path on exact fp32 copies */
            const size_t nm = (size_t)a.R * 5 * a.D, nw = (size_t)5 * a.D * a.C;
            float *f = malloc(sizeof(float) * (nm + nw));
            if (f) {
                for (size_t i = 0; i < nm; i++) f[i] = bf16_to_f32(((const uint16_t *)(uintptr_t)pm)[i]);
                for (size_t i = 0; i < nw; i++) f[nm + i] = bf16_to_f32(((const uint16_t *)(uintptr_t)pw)[i]);
                a.m = f;
                a.w2 = f + nm;
            }
            tmp = f;
        }
        if (!tmp) return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AMX
    if (use_amx) {
        const uint16_t *w2 = (const uint16_t *)(uintptr_t)pw;
        a.wp = tmp;
        if (nthreads <= 1) {
            fm_amx_pack(w2, tmp, a.C, a.D, 0, 1);
            finch_mix_amx_rows(&a, 0, a.R);
        } else {
#pragma omp parallel num_threads(nthreads)
            {
                fm_amx_pack(w2, tmp, a.C, a.D, omp_get_thread_num(), omp_get_num_threads());
#pragma omp barrier
                /* whole 32-row blocks per thread */
                const long blocks = (a.R + 31) / 32;
                long b0, b1;
                split_rows(blocks, &b0, &b1);
                const long r1 = b1 * 32 < a.R ? b1 * 32 : a.R;
                if (b0 * 32 < r1) finch_mix_amx_rows(&a, b0 * 32, r1);
            }
        }
    } else
#endif
    if (nthreads <= 1) {
        finch_mix_rows(&a, 0, a.R);
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            /* whole row blocks per thread */
            const long blocks = (a.R + FM_ROWS - 1) / FM_ROWS;
            long b0, b1;
            split_rows(blocks, &b0, &b1);
            const long r1 = b1 * FM_ROWS < a.R ? b1 * FM_ROWS : a.R;
            if (b0 * FM_ROWS < r1) finch_mix_rows(&a, b0 * FM_ROWS, r1);
        }
    }
    Py_END_ALLOW_THREADS
    free(tmp);
    Py_RETURN_NONE;
}

/* ---- per-head GroupNorm times silu(gate) ----------------------------------------------------- */

typedef struct {
    long R, C, N;
    const float *y, *weight, *bias; /* y [R, C] fp32 (the WKV output); weight, bias [C] */
    const char *g;                  /* [R, C] gate pre-activation, dtype g_dt */
    float eps;
    int g_dt, out_dt;
    char *out; /* [R, C] */
} gn_args;

/* out = (LayerNorm_N(y) * weight + bias) * silu(g) per head of N channels. silu(g) is rounded to g's
   dtype first, as F.silu on a bf16 tensor returns bf16. */
BODY void gn_rows_body(const gn_args *a, long r0, long r1) {
    const long C = a->C, N = a->N;
    float buf[C], gate[C];
    for (long r = r0; r < r1; r++) {
        const float *restrict y = a->y + r * C;
        load_row(gate, a->g + (size_t)r * C * dt_size(a->g_dt), a->g_dt, C);
        for (long c = 0; c < C; c++) gate[c] = round_to(gate[c] / (1.0f + fexp(-gate[c])), a->g_dt);
        for (long h = 0; h < C; h += N) {
            const float mean = row_sum(y + h, N, 0, 0.0f) / (float)N;
            const float rstd = 1.0f / sqrtf(row_sum(y + h, N, 1, mean) / (float)N + a->eps);
            for (long i = h; i < h + N; i++)
                buf[i] = fmaf((y[i] - mean) * rstd, a->weight[i], a->bias[i]) * gate[i];
        }
        store_row(a->out + (size_t)r * C * dt_size(a->out_dt), a->out_dt, buf, C);
    }
}
VARIANTS(gn_rows, gn_args)

static PyObject *py_group_norm_gate(PyObject *self, PyObject *args) {
    gn_args a;
    unsigned long long py, pg, pw, pb, po;
    int nthreads;
    if (!PyArg_ParseTuple(args, "lllKKiKKfKii", &a.R, &a.C, &a.N, &py, &pg, &a.g_dt, &pw, &pb, &a.eps, &po,
                          &a.out_dt, &nthreads))
        return NULL;
    if (a.R <= 0 || a.C <= 0 || a.C > MAX_C || a.N <= 0 || a.C % a.N) {
        PyErr_SetString(PyExc_ValueError, "group_norm_gate: bad sizes");
        return NULL;
    }
    a.y = (const float *)(uintptr_t)py;
    a.g = (const char *)(uintptr_t)pg;
    a.weight = (const float *)(uintptr_t)pw;
    a.bias = (const float *)(uintptr_t)pb;
    a.out = (char *)(uintptr_t)po;
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(gn_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- channel-mix activations ----------------------------------------------------------------- */

/* k = relu(k)^2 in place over n values of dtype dt (rounded once, as relu_().square_()); in blocks of
   1024 through fp32 so that every loop vectorises. */
typedef struct {
    char *k;
    int dt;
} rs_args;

BODY void relu_square_range_body(const rs_args *a, long i0, long i1) {
    char *k = a->k;
    const int dt = a->dt;
    float buf[1024];
    const size_t sz = dt_size(dt);
    for (long b = i0; b < i1; b += 1024) {
        const long n = i1 - b < 1024 ? i1 - b : 1024;
        load_row(buf, k + (size_t)b * sz, dt, n);
        for (long i = 0; i < n; i++) {
            const float z = buf[i] > 0.0f ? buf[i] : 0.0f;
            buf[i] = z * z;
        }
        store_row(k + (size_t)b * sz, dt, buf, n);
    }
}
VARIANTS(relu_square_range, rs_args)

static PyObject *py_relu_square(PyObject *self, PyObject *args) {
    long n;
    unsigned long long pk;
    int dt, nthreads;
    if (!PyArg_ParseTuple(args, "lKii", &n, &pk, &dt, &nthreads)) return NULL;
    const rs_args a = {(char *)(uintptr_t)pk, dt};
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(relu_square_range, &a, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

typedef struct {
    long R, C;
    const char *r, *v; /* [R, C], dtype in_dt each */
    const float *res;  /* optional [R, C] fp32 residual (out_dt fp32): out = res + sigmoid(r) * v; out may be res */
    int in_dt, out_dt;
    char *out;
} sm_args;

/* out = sigmoid(r) * v: sigmoid rounded to the input dtype, then the product rounded to it (as
   torch.sigmoid(r) * v on bf16 tensors), then stored in out_dt; with res, res + that product in
   fp32 (the residual add x + out of the block, one fp32 rounding as torch's add). */
BODY void sigmoid_mul_rows_body(const sm_args *a, long r0, long r1) {
    const long C = a->C;
    const size_t in_sz = dt_size(a->in_dt);
    float rr[C], vv[C];
    for (long row = r0; row < r1; row++) {
        load_row(rr, a->r + (size_t)row * C * in_sz, a->in_dt, C);
        load_row(vv, a->v + (size_t)row * C * in_sz, a->in_dt, C);
        for (long c = 0; c < C; c++) {
            const float s = round_to(1.0f / (1.0f + fexp(-rr[c])), a->in_dt);
            rr[c] = round_to(s * vv[c], a->in_dt);
        }
        if (a->res)
            for (long c = 0; c < C; c++) rr[c] = a->res[row * C + c] + rr[c];
        store_row(a->out + (size_t)row * C * dt_size(a->out_dt), a->out_dt, rr, C);
    }
}
VARIANTS(sigmoid_mul_rows, sm_args)

static PyObject *py_sigmoid_mul(PyObject *self, PyObject *args) {
    sm_args a;
    unsigned long long pr, pv, po, pres;
    int nthreads;
    if (!PyArg_ParseTuple(args, "llKKiKiKi", &a.R, &a.C, &pr, &pv, &a.in_dt, &po, &a.out_dt, &pres, &nthreads))
        return NULL;
    a.res = (const float *)(uintptr_t)pres;
    if (a.res && a.out_dt != DT_F32) {
        PyErr_SetString(PyExc_ValueError, "sigmoid_mul: a residual needs a float32 output");
        return NULL;
    }
    if (a.R <= 0 || a.C <= 0 || a.C > MAX_C) {
        PyErr_SetString(PyExc_ValueError, "sigmoid_mul: bad sizes");
        return NULL;
    }
    a.r = (const char *)(uintptr_t)pr;
    a.v = (const char *)(uintptr_t)pv;
    a.out = (char *)(uintptr_t)po;
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(sigmoid_mul_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- residual add, LayerNorm and the token-shift mixes in one pass ---------------------------- */

typedef struct {
    long R, T, C, M;
    const float *x;       /* [R, C] fp32 residual stream */
    const char *add;      /* optional [R, C] (dtype add_dt): x + add is the new residual */
    const float *w, *b;   /* LayerNorm weight, bias [C] */
    float eps;
    const float *prev;    /* [B, C]: LayerNorm output of the token before each sequence's first row */
    const float *mix;     /* [M, C] */
    int add_dt, lerp, out_dt;
    float *x_out;         /* optional [R, C]: x + add */
    float *xn_out;        /* optional [R, C]: LayerNorm output */
    float *last;          /* optional [B, C]: LayerNorm output of each sequence's last row */
    char *out;            /* [M, R, C] mixes, out_dt */
} anm_args;

/* s = x[r] + add[r] (fp32, one rounding as torch's add), y = LayerNorm(s) */
BODY void anm_norm_row(const anm_args *a, long r, float *restrict s, float *restrict y) {
    const long C = a->C;
    const float *restrict x = a->x + r * C;
    if (a->add) {
        load_row(y, a->add + (size_t)r * C * dt_size(a->add_dt), a->add_dt, C);
        for (long c = 0; c < C; c++) s[c] = x[c] + y[c];
    } else {
        memcpy(s, x, sizeof(float) * (size_t)C);
    }
    const float mean = row_sum(s, C, 0, 0.0f) / (float)C;
    const float rstd = 1.0f / sqrtf(row_sum(s, C, 1, mean) / (float)C + a->eps);
    for (long c = 0; c < C; c++) y[c] = (s[c] - mean) * rstd * a->w[c] + a->b[c];
}

/* rows [r0, r1): the previous row's LayerNorm output is recomputed for the first row of the range
   (the row above belongs to the other thread) unless it starts a sequence (then prev) */
BODY void anm_rows_body(const anm_args *a, long r0, long r1) {
    const long C = a->C;
    float s[C], y0[C], y1[C], buf[C];
    float *p = y0, *y = y1;
    const float *pp;
    if (r0 % a->T) {
        anm_norm_row(a, r0 - 1, s, p);
        pp = p;
    } else {
        pp = a->prev + (r0 / a->T) * C;
    }
    for (long r = r0; r < r1; r++) {
        anm_norm_row(a, r, s, y);
        if (a->x_out) memcpy(a->x_out + r * C, s, sizeof(float) * (size_t)C);
        if (a->xn_out) memcpy(a->xn_out + r * C, y, sizeof(float) * (size_t)C);
        if (a->last && r % a->T == a->T - 1) memcpy(a->last + (r / a->T) * C, y, sizeof(float) * (size_t)C);
        const float *restrict pr = (r % a->T == 0) ? a->prev + (r / a->T) * C : pp;
        for (long j = 0; j < a->M; j++) {
            const float *restrict m = a->mix + j * C;
            if (a->lerp)
                for (long c = 0; c < C; c++) buf[c] = y[c] * m[c] + pr[c] * (1.0f - m[c]);
            else
                for (long c = 0; c < C; c++) buf[c] = fmaf(pr[c] - y[c], m[c], y[c]);
            store_row(a->out + (size_t)(j * a->R + r) * C * dt_size(a->out_dt), a->out_dt, buf, C);
        }
        float *t = p; /* this row's output is the next row's previous token */
        p = y;
        y = t;
        pp = p;
    }
}
VARIANTS(anm_rows, anm_args)

static PyObject *py_add_norm_mix(PyObject *self, PyObject *args) {
    anm_args a;
    unsigned long long px, pa, pw, pb, pp, pm, pxo, pxn, pl, po;
    int nthreads;
    if (!PyArg_ParseTuple(args, "llllKKiKKfKKiiKKKKi", &a.R, &a.T, &a.C, &a.M, &px, &pa, &a.add_dt, &pw, &pb,
                          &a.eps, &pp, &pm, &a.lerp, &a.out_dt, &pxo, &pxn, &pl, &po, &nthreads))
        return NULL;
    if (a.R <= 0 || a.T <= 0 || a.R % a.T || a.C <= 0 || a.C > MAX_C || a.M < 0) {
        PyErr_SetString(PyExc_ValueError, "add_norm_mix: bad sizes");
        return NULL;
    }
    a.x = (const float *)(uintptr_t)px;
    a.add = (const char *)(uintptr_t)pa;
    a.w = (const float *)(uintptr_t)pw;
    a.b = (const float *)(uintptr_t)pb;
    a.prev = (const float *)(uintptr_t)pp;
    a.mix = (const float *)(uintptr_t)pm;
    a.x_out = (float *)(uintptr_t)pxo;
    a.xn_out = (float *)(uintptr_t)pxn;
    a.last = (float *)(uintptr_t)pl;
    a.out = (char *)(uintptr_t)po;
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(anm_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- Finch's LoRAs: tanh(x @ w1), and tanh(x @ w1) @ w2 (AMX) --------------------------------- */

/* Finch's two LoRAs on bf16 tensors, rounded as the PyTorch path rounds them: h = bf16(x @ w1),
   t = bf16(tanh(h)), then (with w2) out = bf16(t @ w2), else out = t. One kernel call instead of two or
   three bf16 matmuls (each with oneDNN's fixed cost of about 30 us) and a tanh pass, and t never goes
   to memory. x [R, K], w1 [K, D], w2 [D, N], all bf16 row-major; K % 32 == 0, D % 16 == 0 (D % 32 == 0
   with w2), N % 16 == 0 (the wrapper checks). tanh is the kernels' own (within a few fp32 ulps of
   torch's), so an output rarely lands one bf16 ulp away from the PyTorch path's. */
#ifdef HAVE_AMX
typedef struct {
    long R, K, D, N;
    const uint16_t *x, *w1, *w2; /* w2 NULL: out = t [R, D] */
    uint16_t *w1p, *w2p;         /* the B-tile copies, [KB][cols / 16][16][16][2] */
    uint16_t *out;
} lora_args;

/* w [K, N] row-major bf16 -> B tiles [K / 32][N / 16][16 pairs][16 columns][2], tiles i, i+n, ... */
AMX_TARGET static void lora_pack(const uint16_t *w, uint16_t *wp, long K, long N, int i, int n) {
    const long NB = N / 16, tiles = K / 32 * NB;
    for (long t = tiles * i / n; t < tiles * (i + 1) / n; t++) {
        const uint16_t *src = w + (t / NB) * 32 * N + (t % NB) * 16;
        uint16_t *dst = wp + t * 512;
        for (long kk = 0; kk < 16; kk++) {
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(src + 2 * kk * N)));
            const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(src + (2 * kk + 1) * N)));
            _mm512_storeu_si512((void *)(dst + kk * 32), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* tanh in 16 lanes: x - x^3/3 + 2x^5/15 below |x| = 0.01 (where 1 - 2/(e^2x + 1) would cancel),
   else 1 - 2 / (exp(2x) + 1), which saturates to +-1 */
AMX_TARGET static inline __m512 lora_tanh16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), e = fexp16(_mm512_add_ps(x, x));
    const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
    const __m512 x2 = _mm512_mul_ps(x, x);
    const __m512 poly = _mm512_fmadd_ps(x2, _mm512_set1_ps(2.0f / 15.0f), _mm512_set1_ps(-1.0f / 3.0f));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(x, x2), poly, x);
    const __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0.01f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(big, tiny, small);
}

/* 32 rows of A @ B into acc [32][cols] fp32, cols a multiple of 16: A rows from a (stride lda
   elements, KB steps of 32 inputs), B tiles bp ([KB][cols / 16] tiles). Blocks of 32 x 32 with 2 x 2
   tiles: 0-1 A (rows 0-15, 16-31), 2-3 B, 4-7 accumulators; every tile a product reads is loaded
   into its own register, so a load never waits for the product before it to let go of a tile. */
AMX_TARGET static void lora_product(const uint16_t *a, long lda, long KB, const uint16_t *bp, long cols,
                                    float *acc) {
    const long NB = cols / 16;
    for (long c0 = 0; c0 < NB; c0 += 2) {
        const int two = c0 + 1 < NB;
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (long kb = 0; kb < KB; kb++) {
            const uint16_t *b = bp + (kb * NB + c0) * 512;
            _tile_loadd(0, a + kb * 32, lda * 2);
            _tile_loadd(2, b, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_loadd(1, a + 16 * lda + kb * 32, lda * 2);
            _tile_dpbf16ps(6, 1, 2);
            if (two) {
                _tile_loadd(3, b + 512, 64);
                _tile_dpbf16ps(5, 0, 3);
                _tile_dpbf16ps(7, 1, 3);
            }
        }
        float *o = acc + c0 * 16;
        _tile_stored(4, o, cols * 4);
        _tile_stored(6, o + 16 * cols, cols * 4);
        if (two) {
            _tile_stored(5, o + 16, cols * 4);
            _tile_stored(7, o + 16 * cols + 16, cols * 4);
        }
    }
}

/* rows [r0, r1) in blocks of 32; a short last block's rows are copied zero-padded */
AMX_TARGET static int lora_rows(const lora_args *a, long r0, long r1) {
    const long K = a->K, D = a->D, N = a->N;
    /* scratch: fp32 accumulators [32][max(D, N)], t [32][D] bf16, a padded x block [32][K] */
    const long wide = D > N ? D : N;
    char *mem = aligned_alloc(64, (size_t)(32 * wide * 4 + 32 * D * 2 + 32 * K * 2 + 192));
    if (!mem) return 0;
    float *acc = (float *)mem;
    uint16_t *tb = (uint16_t *)(mem + 32 * wide * 4);
    uint16_t *xpad = tb + 32 * D + 32;
    amx_tiles_16x64();
    for (long rb = r0; rb < r1; rb += 32) {
        const long nr = r1 - rb < 32 ? r1 - rb : 32;
        const uint16_t *xa = a->x + rb * K;
        if (nr < 32) {
            memcpy(xpad, xa, sizeof(uint16_t) * nr * K);
            memset(xpad + nr * K, 0, sizeof(uint16_t) * (32 - nr) * K);
            xa = xpad;
        }
        lora_product(xa, K, K / 32, a->w1p, D, acc);
        /* h = bf16(x @ w1); t = bf16(tanh(h)) */
        uint16_t *tdst = a->w2 ? tb : a->out + rb * D;
        for (long i = 0; i < nr; i++)
            for (long c = 0; c < D; c += 16) {
                const __m512 h = bf16_value16(bf16_bits16(_mm512_loadu_ps(acc + i * D + c)));
                _mm256_storeu_si256((void *)(tdst + i * D + c), bf16_pack16(lora_tanh16(h)));
            }
        if (!a->w2) continue;
        if (nr < 32) memset(tb + nr * D, 0, sizeof(uint16_t) * (32 - nr) * D);
        lora_product(tb, D, D / 32, a->w2p, N, acc);
        for (long i = 0; i < nr; i++)
            for (long c = 0; c < N; c += 16)
                _mm256_storeu_si256((void *)(a->out + (rb + i) * N + c), bf16_pack16(_mm512_loadu_ps(acc + i * N + c)));
    }
    _tile_release();
    free(mem);
    return 1;
}
#endif

static PyObject *py_lora(PyObject *self, PyObject *args) {
#ifdef HAVE_AMX
    lora_args a;
    unsigned long long px, pw1, pw2, po;
    int nthreads;
    if (!PyArg_ParseTuple(args, "llllKKKKi", &a.R, &a.K, &a.D, &a.N, &px, &pw1, &pw2, &po, &nthreads))
        return NULL;
    if (!amx_ok) {
        PyErr_SetString(PyExc_RuntimeError, "lora: needs AMX-BF16");
        return NULL;
    }
    if (a.R <= 0 || a.K <= 0 || a.K % 32 || a.D <= 0 || a.D % (pw2 ? 32 : 16) || (pw2 && (a.N <= 0 || a.N % 16))) {
        PyErr_SetString(PyExc_ValueError, "lora: bad sizes");
        return NULL;
    }
    a.x = (const uint16_t *)(uintptr_t)px;
    a.w1 = (const uint16_t *)(uintptr_t)pw1;
    a.w2 = (const uint16_t *)(uintptr_t)pw2;
    a.out = (uint16_t *)(uintptr_t)po;
    const size_t n1 = (size_t)a.K * a.D, n2 = a.w2 ? (size_t)a.D * a.N : 0;
    uint16_t *packed = aligned_alloc(64, sizeof(uint16_t) * (n1 + n2 + 32));
    if (!packed) return PyErr_NoMemory();
    a.w1p = packed;
    a.w2p = a.w2 ? packed + n1 : NULL;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads) reduction(& : ok)
    {
        const int i = omp_get_thread_num(), n = omp_get_num_threads();
        lora_pack(a.w1, a.w1p, a.K, a.D, i, n);
        if (a.w2) lora_pack(a.w2, a.w2p, a.D, a.N, i, n);
#pragma omp barrier
        const long blocks = (a.R + 31) / 32;
        long b0, b1;
        split_rows(blocks, &b0, &b1);
        const long r1 = b1 * 32 < a.R ? b1 * 32 : a.R;
        if (b0 * 32 < r1) ok &= lora_rows(&a, b0 * 32, r1);
    }
    Py_END_ALLOW_THREADS
    free(packed);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "lora: built without AMX support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"mix", py_mix, METH_VARARGS,
     "mix(R, T, C, M, x, prev, mix, lerp, out_dt, out, nthreads): token-shift mixes"},
    {"finch_mix", py_finch_mix, METH_VARARGS,
     "finch_mix(R, T, C, D, x, prev, m, w2, mw_dt, maa, out_dt, out, nthreads): Finch's five mixes, maa_w2"},
    {"group_norm_gate", py_group_norm_gate, METH_VARARGS,
     "group_norm_gate(R, C, N, y, g, g_dt, weight, bias, eps, out, out_dt, nthreads)"},
    {"relu_square", py_relu_square, METH_VARARGS, "relu_square(n, k, dt, nthreads): k = relu(k)^2 in place"},
    {"sigmoid_mul", py_sigmoid_mul, METH_VARARGS,
     "sigmoid_mul(R, C, r, v, in_dt, out, out_dt, res, nthreads): res = 0 or an fp32 residual to add"},
    {"lora", py_lora, METH_VARARGS,
     "lora(R, K, D, N, x, w1, w2, out, nthreads): bf16(tanh(bf16(x @ w1))) [@ w2, rounded] (AMX; w2 = 0: none)"},
    {"add_norm_mix", py_add_norm_mix, METH_VARARGS,
     "add_norm_mix(R, T, C, M, x, add, add_dt, ln_w, ln_b, eps, prev, mix, lerp, out_dt, x_out, xn_out, "
     "last, out, nthreads): residual add, LayerNorm, token-shift mixes (0 = no such buffer)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_cpu",
                                    "Fused element-wise kernels of an RWKV block on the CPU.", -1, methods};

PyMODINIT_FUNC PyInit__fused_cpu(void) {
#ifdef HAVE_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        isa_level = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        isa_level = 1;
#endif
#ifdef HAVE_AMX
    amx_ok = amx_request();
#endif
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddIntConstant(mod, "finch_mix_amx", FM_AMX_OK) < 0) Py_CLEAR(mod);
    return mod;
}
