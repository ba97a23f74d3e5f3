/* rwkvkit/ops/_fused_lora.c: Finch's LoRAs tanh(x @ w1) [@ w2] on AMX tiles. Conventions: _fused_cpu.c. */
#include "_fused.h"
#include "_amx.h"

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

PyObject *fused_lora(PyObject *self, PyObject *args, PyObject *kw) {
#ifdef HAVE_AMX
    lora_args a;
    long nthreads;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"K", ARG_LONG, &a.K}, {"D", ARG_LONG, &a.D}, {"N", ARG_LONG, &a.N},
        {"x", ARG_PTR, &a.x}, {"w1", ARG_PTR, &a.w1}, {"w2", ARG_OPT_PTR, &a.w2}, {"out", ARG_PTR, &a.out},
        {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("lora", args, kw, spec, NARGS(spec))) return NULL;
    if (!fused_amx_ok) {
        PyErr_SetString(PyExc_RuntimeError, "lora: needs AMX-BF16");
        return NULL;
    }
    if (a.R <= 0 || a.K <= 0 || a.K % 32 || a.D <= 0 || a.D % (a.w2 ? 32 : 16) || (a.w2 && (a.N <= 0 || a.N % 16))) {
        PyErr_SetString(PyExc_ValueError, "lora: bad sizes");
        return NULL;
    }
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
    (void)args, (void)kw;
    PyErr_SetString(PyExc_RuntimeError, "lora: built without AMX support");
    return NULL;
#endif
}
