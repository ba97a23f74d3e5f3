/* rwkvkit/ops/_fused_finch.c: Finch's five data-dependent token-shift mixes with their LoRA
 * product (fp32 rows, or AMX tiles for bf16). Conventions: _fused_cpu.c. */
#include "_fused.h"
#include "_amx.h"

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
#ifdef HAVE_AMX
#define FM_AMX_COLS 32 /* columns per step: two 16-column accumulator tiles */

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
#endif

PyObject *fused_finch_mix(PyObject *self, PyObject *args, PyObject *kw) {
    fm_args a;
    long nthreads;
    int mw_dt;
    const void *pm, *pw; /* m and maa_w2, fp32 or bf16 (mw_dt) */
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"T", ARG_LONG, &a.T}, {"C", ARG_LONG, &a.C}, {"D", ARG_LONG, &a.D},
        {"x", ARG_PTR, &a.x}, {"prev", ARG_PTR, &a.prev}, {"m", ARG_PTR, &pm}, {"w2", ARG_PTR, &pw},
        {"mw_dt", ARG_INT, &mw_dt}, {"maa", ARG_PTR, &a.maa}, {"out_dt", ARG_INT, &a.out_dt},
        {"out", ARG_PTR, &a.out}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("finch_mix", args, kw, spec, NARGS(spec))) return NULL;
    if (a.R <= 0 || a.T <= 0 || a.C <= 0 || a.D <= 0 || (mw_dt != DT_F32 && mw_dt != DT_BF16)) {
        PyErr_SetString(PyExc_ValueError, "finch_mix: bad sizes or dtype");
        return NULL;
    }
    void *tmp = NULL; /* the packed maa_w2 (AMX) or fp32 copies of bf16 m and maa_w2 */
    int use_amx = 0;
    if (mw_dt == DT_F32) {
        a.m = (const float *)pm;
        a.w2 = (const float *)pw;
    } else {
#ifdef HAVE_AMX
        use_amx = fused_amx_ok && a.D <= 256; /* the m block lives on the stack: 80 KB at D = 256 */
#endif
        if (use_amx) {
#ifdef HAVE_AMX
            a.m16 = (const uint16_t *)pm;
            tmp = malloc(sizeof(uint16_t) * fm_amx_pack_size(a.C, a.D));
#endif
        } else { /* no AMX: the fp32 path on exact fp32 copies */
            const size_t nm = (size_t)a.R * 5 * a.D, nw = (size_t)5 * a.D * a.C;
            float *f = malloc(sizeof(float) * (nm + nw));
            if (f) {
                for (size_t i = 0; i < nm; i++) f[i] = bf16_to_f32(((const uint16_t *)pm)[i]);
                for (size_t i = 0; i < nw; i++) f[nm + i] = bf16_to_f32(((const uint16_t *)pw)[i]);
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
        const uint16_t *w2 = (const uint16_t *)pw;
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
