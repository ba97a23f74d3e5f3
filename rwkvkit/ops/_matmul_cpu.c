/* rwkvkit/ops/_matmul_cpu.c: y = x @ W^T for bf16 x [M, K] and the nn.Linear weight W [N, K] as it
 * is (row-major, no packed copy kept), bf16 y [M, N], fp32 sums, on AMX-BF16 tiles (Sapphire Rapids
 * on); optionally y = relu(y)^2 (the channel-mix's key) in the same pass, or instead of storing y
 * the channel-mix's end: res += sigmoid(r) * y (bf16 roundings as the PyTorch path, res fp32).
 *
 * Why not F.linear: oneDNN is as fast on a hot matrix, but in a prefill every weight is used once and
 * comes cold from memory, and oneDNN's blocking does not hide that. Here each thread owns a run of
 * 32-column panels of W (or, for a prompt of 64 rows a thread or more, a run of 32-row blocks of x
 * and all the panels); a group of two panels (64 rows of W, K inputs) is packed into the tile
 * layout (pairs of inputs interleaved: 16 x 16 transposes of 32-bit pairs, AVX-512) in a
 * thread-local buffer, then reused for all M rows. While the tiles work on one group the next one
 * is packed (a tile every few tile steps) and the one after that is prefetched into L2, so the weight
 * traffic and the packing overlap the tile products. x is read by the tiles in place (stride K).
 *
 * Numerics: TDPBF16PS multiplies bf16 pairs exactly and sums them in fp32 (the order differs from
 * oneDNN's, so results differ from F.linear by fp32 summation error; AMX treats subnormal inputs and
 * sums as zero). y is rounded to bf16 as torch rounds (nearest even, NaN quietened); with relu2 the
 * rounded y goes through relu, the square is taken in fp32 and rounded again: the values of
 * relu_square_(F.linear(x, W)) in bf16, up to the products' summation order.
 *
 * Fast path only: N % 32 == 0 and K % 32 == 0 (the wrapper checks; callers use F.linear otherwise).
 * Any M: a last block of fewer than 32 rows is read from a zero-padded copy. OpenMP: at run time
 * this is PyTorch's libgomp (already loaded), as in the other extensions. Built without AMX support
 * in the compiler (or run on a CPU without it) the module loads and reports available = 0.
 */
#include "_args.h"
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_math.h"

#include "_amx.h"
#ifdef HAVE_AMX
#define INLINE static inline __attribute__((always_inline))
#endif

static int amx_ok = 0; /* set by configure(): the CPU has AMX-BF16, Linux lets us use it, not portable */

#ifdef HAVE_AMX

/* eight 16 x 64-byte tiles: 0-3 the fp32 sums of a 32 x 32 block, 4-5 two 16-row slices of x,
   6-7 the two 16-column halves of the panel */
AMX_TARGET static void tile_config(void) { amx_tiles_16x64(); }

/* a panel: W rows [n0, n0 + 32) -> [K / 32][2 halves][16 pairs kk][16 columns][2] bf16, B-tile
   (kb, h) at p + (kb * 2 + h) * 512: its row kk holds W[n0 + 16h + c][32kb + 2kk + q] for c, q.
   Read as 32-bit pairs, tile (kb, h) is the transpose of the 16 x 16 block W32[n0 + 16h + c][16kb + kk].
   This packs the tiles t in [t0, t1) of the panel (t = kb * 2 + h). */
AMX_TARGET static void pack_tiles(const uint16_t *w, long K, uint16_t *p, long t0, long t1) {
    for (long t = t0; t < t1; t++) {
        const long kb = t >> 1, h = t & 1;
        const char *src = (const char *)(w + h * 16 * K + kb * 32);
        const long ld = K * 2; /* bytes per row of W */
        uint16_t *dst = p + t * 512;
        /* output row 4l + b, 128-bit lane q = W32[4q + i][4l + b], i = 0..3: gather the 4 x 4 blocks
           (rows 4q.., columns 4l..) of all q into one register per (l, row offset r) with 128-bit
           loads (the load ports do most of the moving), then a 4 x 4 transpose inside the lanes */
        for (int l = 0; l < 4; l++) {
            __m512i z[4];
            for (int r = 0; r < 4; r++) {
                const char *b = src + r * ld + l * 16;
                __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const void *)b));
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const void *)(b + 4 * ld)), 1);
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const void *)(b + 8 * ld)), 2);
                z[r] = _mm512_inserti32x4(v, _mm_loadu_si128((const void *)(b + 12 * ld)), 3);
            }
            const __m512i s0 = _mm512_unpacklo_epi32(z[0], z[1]), s1 = _mm512_unpackhi_epi32(z[0], z[1]);
            const __m512i s2 = _mm512_unpacklo_epi32(z[2], z[3]), s3 = _mm512_unpackhi_epi32(z[2], z[3]);
            _mm512_store_si512((void *)(dst + (4 * l + 0) * 32), _mm512_unpacklo_epi64(s0, s2));
            _mm512_store_si512((void *)(dst + (4 * l + 1) * 32), _mm512_unpackhi_epi64(s0, s2));
            _mm512_store_si512((void *)(dst + (4 * l + 2) * 32), _mm512_unpacklo_epi64(s1, s3));
            _mm512_store_si512((void *)(dst + (4 * l + 3) * 32), _mm512_unpackhi_epi64(s1, s3));
        }
    }
}


/* rows of a 32 x 32 fp32 block (tiles a = columns 0-15, b = 16-31, 16 rows each) -> bf16 y */
AMX_TARGET INLINE void store_rows(uint16_t *y, long ldy, const float *a, const float *b, int nrows, int relu2) {
    for (int r = 0; r < nrows; r++) {
        __m512i lo = bf16_bits16(_mm512_load_ps(a + r * 16)), hi = bf16_bits16(_mm512_load_ps(b + r * 16));
        if (relu2) { /* relu of the rounded value, square in fp32, round again */
            const __m512 zl = _mm512_max_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_setzero_ps());
            const __m512 zh = _mm512_max_ps(_mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)), _mm512_setzero_ps());
            lo = bf16_bits16(_mm512_mul_ps(zl, zl));
            hi = bf16_bits16(_mm512_mul_ps(zh, zh));
        }
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)),
                                             _mm512_cvtepi32_epi16(hi), 1);
        _mm512_storeu_si512((void *)(y + r * ldy), v);
    }
}

/* the gated residual (the channel-mix's end): res += bf16(bf16(sigmoid(r)) * bf16(y)) for rows of a
   32 x 32 block, r bf16 and res fp32 [M, N] at the block's corner: the values of
   x + fused.sigmoid_mul(r, F.linear(...), float32) */
AMX_TARGET INLINE void gate_rows(float *res, const uint16_t *r, long ld, const float *a, const float *b, int nrows) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < nrows; i++)
        for (int h = 0; h < 2; h++) {
            const __m512 v = bf16_value16(bf16_bits16(_mm512_load_ps((h ? b : a) + i * 16)));
            const __m512 rr = bf16_value16(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(r + i * ld + h * 16))));
            const __m512 sg = bf16_value16(bf16_bits16(_mm512_div_ps(one, _mm512_add_ps(one, fexp16(_mm512_sub_ps(_mm512_setzero_ps(), rr))))));
            const __m512 g = bf16_value16(bf16_bits16(_mm512_mul_ps(sg, v)));
            float *o = res + i * ld + h * 16;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), g));
        }
}

typedef struct {
    const uint16_t *x, *w, *xtail; /* xtail: the last M % 32 rows of x, zero-padded to 32, or NULL */
    uint16_t *y;
    long M, N, K;
    int relu2;
    const uint16_t *gate; /* with res: the gated residual epilogue (gate_rows), y unused */
    float *res;
} mm_args;

/* per-thread panel buffers (two groups: the one in use and the next), kept between calls */
static __thread uint16_t *tl_buf = NULL;
static __thread size_t tl_size = 0;
/* panels per group: one. With the columns split between the threads, two panels per pass over a
   32-row block of x read x from L3 half as often (measured cold, K = 2688: 1.0x F.linear with 1,
   1.15x with 2); since a prompt's rows are split instead (each thread's block of x stays in its own
   cache) one panel is faster in the model (A/B over a 512-token prefill, three runs: 2.4-2.7 ms) */
static const int group_width = 1;

static uint16_t *panel_buffers(long K) {
    const size_t need = (size_t)2 * group_width * 32 * K * sizeof(uint16_t);
    if (tl_size < need) {
        free(tl_buf);
        tl_buf = aligned_alloc(64, need);
        tl_size = tl_buf ? need : 0;
    }
    return tl_buf;
}

/* tile t of a group of panels (t / (2 KB) the panel, then as pack_tiles) */
AMX_TARGET static inline void pack_group_tile(const uint16_t *wg, long K, uint16_t *pg, long t) {
    const long T1 = K / 16, p = t / T1, tt = t % T1;
    pack_tiles(wg + p * 32 * K, K, pg + p * 32 * K, tt, tt + 1);
}

/* panels [g0, g1) of 32 output columns, all M rows, in groups of up to group_width panels: for each
   32-row block of x the group's panels in turn (the block stays in L1/L2 between them) */
AMX_TARGET static void mm_panels(const mm_args *a, long g0, long g1, uint16_t *buf) {
    const long M = a->M, N = a->N, K = a->K, KB = K / 32, MG = (M + 31) / 32, GW = group_width;
    const long lpr = K / 32; /* 64-byte lines per row of W */
    const uint16_t *x = a->x, *w = a->w;
    float acc[4][256] __attribute__((aligned(64)));
    tile_config();
    /* the first group: prefetch the next one, pack this one */
    {
        const long n1 = g0 + GW < g1 ? (g1 - g0 - GW < GW ? g1 - g0 - GW : GW) : 0;
        for (long o = 0; o < n1 * 32 * K * 2; o += 64) _mm_prefetch((const char *)(w + (g0 + GW) * 32 * K) + o, _MM_HINT_T1);
        const long n0 = g1 - g0 < GW ? g1 - g0 : GW;
        for (long t = 0; t < n0 * 2 * KB; t++) pack_group_tile(w + g0 * 32 * K, K, buf, t);
    }
    for (long g = g0, i = 0; g < g1; g += GW, i++) {
        const long np = g1 - g < GW ? g1 - g : GW; /* panels in this group */
        uint16_t *cur = buf + (i & 1) * GW * 32 * K, *nxt = buf + ((i + 1) & 1) * GW * 32 * K;
        /* spread over this group's S tile steps: packing the next group's T tiles, prefetching the
           lines of the one after (32 rows of lpr lines per panel) into L2 */
        const long gn = g + GW, gf = g + 2 * GW;
        const long nn = gn < g1 ? (g1 - gn < GW ? g1 - gn : GW) : 0, nf = gf < g1 ? (g1 - gf < GW ? g1 - gf : GW) : 0;
        const uint16_t *wn = w + gn * 32 * K;
        const char *wf = (const char *)(w + gf * 32 * K);
        const long S = MG * KB * np, T = nn * 2 * KB, F = nf * 32 * lpr;
        long pc = 0, pt = 0, fc = 0, fl = 0; /* credits, next tile, next line */
        for (long mg = 0; mg < MG; mg++) {
            const int tail = a->xtail && mg == MG - 1;
            const uint16_t *a0 = tail ? a->xtail : x + mg * 32 * K, *a1 = a0 + 16 * K;
            const long rows = M - mg * 32 < 32 ? M - mg * 32 : 32;
            for (long p = 0; p < np; p++) {
                const uint16_t *bp = cur + p * 32 * K;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (long kb = 0; kb < KB; kb++) {
                    _tile_loadd(4, a0 + kb * 32, K * 2);
                    _tile_loadd(6, bp + kb * 1024, 64);
                    _tile_loadd(7, bp + kb * 1024 + 512, 64);
                    _tile_loadd(5, a1 + kb * 32, K * 2);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    for (pc += T; pc >= S; pc -= S) pack_group_tile(wn, K, nxt, pt++);
                    for (fc += F; fc >= S; fc -= S, fl++) _mm_prefetch(wf + fl * 64, _MM_HINT_T1);
                }
                _tile_stored(0, acc[0], 64);
                _tile_stored(1, acc[1], 64);
                _tile_stored(2, acc[2], 64);
                _tile_stored(3, acc[3], 64);
                const long at = mg * 32 * N + (g + p) * 32;
                if (a->res) {
                    gate_rows(a->res + at, a->gate + at, N, acc[0], acc[1], rows < 16 ? (int)rows : 16);
                    if (rows > 16)
                        gate_rows(a->res + at + 16 * N, a->gate + at + 16 * N, N, acc[2], acc[3], (int)rows - 16);
                    continue;
                }
                uint16_t *yo = a->y + at;
                store_rows(yo, N, acc[0], acc[1], rows < 16 ? (int)rows : 16, a->relu2);
                if (rows > 16) store_rows(yo + 16 * N, N, acc[2], acc[3], (int)rows - 16, a->relu2);
            }
        }
    }
    _tile_release();
}
#endif /* HAVE_AMX */

/* linear(*, M, N, K, x, w, y, relu2, threads) or linear(*, M, N, K, x, w, gate, res, threads): pointers
   as integers; returns None. With gate and res (no y): res += bf16(bf16(sigmoid(gate)) * bf16(x @ W^T)) */
static PyObject *py_linear(PyObject *self, PyObject *args, PyObject *kw) {
    mm_args a;
    long nthreads;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"M", ARG_LONG, &a.M}, {"N", ARG_LONG, &a.N}, {"K", ARG_LONG, &a.K},
        {"x", ARG_PTR, &a.x}, {"w", ARG_PTR, &a.w}, {"y", ARG_OPT_PTR, &a.y}, {"relu2", ARG_INT, &a.relu2},
        {"gate", ARG_OPT_PTR, &a.gate}, {"res", ARG_OPT_PTR, &a.res}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("linear", args, kw, spec, NARGS(spec))) return NULL;
    const long M = a.M, N = a.N, K = a.K;
#ifdef HAVE_AMX
    if (!amx_ok) {
        PyErr_SetString(PyExc_RuntimeError, "the AMX matmul is not available on this CPU");
        return NULL;
    }
    if (M < 1 || N < 32 || K < 32 || N % 32 || K % 32) {
        PyErr_SetString(PyExc_ValueError, "linear needs M >= 1, N and K positive multiples of 32");
        return NULL;
    }
    if (!a.gate != !a.res || !a.y == !a.res) {
        PyErr_SetString(PyExc_ValueError, "linear: give y, or gate and res");
        return NULL;
    }
    uint16_t *xtail = NULL;
    const long tail = M % 32;
    if (tail) {
        xtail = aligned_alloc(64, (size_t)32 * K * sizeof(uint16_t));
        if (!xtail) return PyErr_NoMemory();
        memcpy(xtail, a.x + (M - tail) * K, (size_t)tail * K * sizeof(uint16_t));
        memset(xtail + tail * K, 0, (size_t)(32 - tail) * K * sizeof(uint16_t));
        a.xtail = xtail;
    }
    const long NG = N / 32;
    if (nthreads > NG) nthreads = NG;
    nthreads = threads_at_least_1(nthreads);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (nthreads == 1) {
        uint16_t *buf = panel_buffers(K);
        if (buf) mm_panels(&a, 0, NG, buf);
        else failed = 1;
    } else {
        /* a prompt: each thread takes a run of 32-row blocks and all the panels (packing all of W), so
           its output rows are the rows the row-wise kernels after it read on the same core; the column
           split left half of every row in the other core's cache (in-model A/B, 512 rows: about 4%
           faster prefill despite the doubled packing). Few rows: the panels are split instead. */
        const int by_rows = M >= 64 * nthreads;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            uint16_t *buf = panel_buffers(K);
            if (!buf) failed = 1;
            else if (by_rows) { /* rows [32 b0, 32 b1) */
                const long MB = (M + 31) / 32, b0 = MB * t / nt, b1 = MB * (t + 1) / nt;
                mm_args s = a;
                s.x = a.x + b0 * 32 * K;
                s.M = (b1 * 32 < M ? b1 * 32 : M) - b0 * 32;
                s.xtail = (b1 * 32 >= M) ? a.xtail : NULL;
                if (s.y) s.y = a.y + b0 * 32 * N;
                if (s.res) { s.res = a.res + b0 * 32 * N; s.gate = a.gate + b0 * 32 * N; }
                if (s.M > 0) mm_panels(&s, 0, NG, buf);
            } else {
                const long g0 = NG * t / nt, g1 = NG * (t + 1) / nt;
                if (g0 < g1) mm_panels(&a, g0, g1, buf);
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(xtail);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)M, (void)N, (void)K, (void)nthreads;
    PyErr_SetString(PyExc_RuntimeError, "the AMX matmul was not compiled in (needs gcc >= 12 on x86-64)");
    return NULL;
#endif
}

/* configure(*, portable): use AMX when the CPU and Linux allow it and portable is 0; sets the module's
   `available` and returns it. The Python module calls it at import (rwkvkit.kernels decides). */
static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw) {
    int portable = 0;
    const named_arg spec[] = {{"portable", ARG_INT, &portable}};
    if (!parse_named("configure", args, kw, spec, NARGS(spec))) return NULL;
#ifdef HAVE_AMX
    amx_ok = portable ? 0 : amx_request();
#endif
    if (PyObject_SetAttrString(self, "available", amx_ok ? Py_True : Py_False) < 0) return NULL;
    return PyBool_FromLong(amx_ok);
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_VARARGS | METH_KEYWORDS,
     "linear(*, M, N, K, x, w, y=None, relu2, gate=None, res=None, threads): y[M, N] = x[M, K] @ w[N, K]^T "
     "in bf16 (relu2: relu(y)^2), or with gate and res the gated residual epilogue"},
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, portable): AMX on (portable=0, where available) or off; returns whether it is used"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matmul_cpu",
                                    "bf16 x @ W^T on AMX tiles, W packed on the fly.", -1, methods};

PyMODINIT_FUNC PyInit__matmul_cpu(void) {
    PyObject *mod = PyModule_Create(&module); /* AMX stays off until configure() */
    if (mod && PyModule_AddIntConstant(mod, "available", 0) < 0) Py_CLEAR(mod);
    return mod;
}
