/* rwkvkit/ops/_decode_matvec.c: the step's matrix kernels. y[b, n] = sum_i W[n, i] x[b, i] for a few input
 * rows b (decode) over fp32, bf16, fp16 or int8 (Q8_0) weights, rows of W split over the team (evenly, or
 * claimed in chunks); one row of bf16 / fp16 / int8 goes to _decode_rows1.c's dot kernels where the CPU
 * has them, with x prepared once per matrix here. Matrix kinds and layouts: _decode_cpu.c. */
#include "_decode.h"

int use_avx512 = 0;

/* ---- matrix rows: y[b, n] = sum_i W[n, i] x[b, i] for n in [r0, r1) ------------------------------- */

static void rows_generic(const mat_t *m, int64_t r0, int64_t r1, const float *x, int64_t B, float *y,
                         int64_t ldy) {
    const int64_t K = m->k;
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * K;
            float acc = 0.f;
            if (m->kind == MK_F32) {
                const float *w = (const float *)m->w + n * K;
                for (int64_t i = 0; i < K; i++) acc += w[i] * xb[i];
            } else if (m->kind == MK_BF16) {
                const uint16_t *w = (const uint16_t *)m->w + n * K;
                for (int64_t i = 0; i < K; i++) acc += bf16_to_f32(w[i]) * xb[i];
            } else if (m->kind == MK_F16) {
                const uint16_t *w = (const uint16_t *)m->w + n * K;
                for (int64_t i = 0; i < K; i++) acc += f16f(w[i]) * xb[i];
            } else {
                const int8_t *q = (const int8_t *)m->w + n * K;
                const uint16_t *s = (const uint16_t *)m->s + n * (K / 32);
                for (int64_t j = 0; j < K / 32; j++) {
                    float blk = 0.f;
                    for (int64_t i = 0; i < 32; i++) blk += (float)q[32 * j + i] * xb[32 * j + i];
                    acc += blk * f16f(s[j]);
                }
            }
            y[b * ldy + n] = acc;
        }
    }
}

#if HAVE_X86
/* Up to 4 input rows share each loaded weight row. */
#define NB_MAX 4

AVX512 static inline __m512 load_q8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The hardware prefetcher alone leaves these loops waiting on memory (measured: 10 -> 16 GB/s on two
 * cores with it): fetch the same cache line of the weight rows 8 ahead, i.e. two groups of four later. */
#define PREFETCH_AHEAD 8
#define PREFETCH_ROWS(p, K)                                                                                   \
    for (int r_ = 0; r_ < 4; r_++) _mm_prefetch((const char *)((p) + (PREFETCH_AHEAD + r_) * (K)), _MM_HINT_T0)

/* One input row, four weight rows at a time: four independent accumulation chains (one chain per row
 * would wait on the FMA latency every block) sharing each load of x. */
AVX512 static void rows4_avx512_b1(const mat_t *m, int64_t n, const float *x, float *y) {
    const int64_t K = m->k;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    if (m->kind == MK_Q8) {
        const int64_t nb = K / 32;
        const int8_t *q = (const int8_t *)m->w + n * K;
        const uint16_t *s = (const uint16_t *)m->s + n * nb;
#define Q8_ROW(acc, r)                                                                                        \
    {                                                                                                         \
        __m512 p = _mm512_mul_ps(load_q8x16(q + (r) * K + 32 * j), x0);                                        \
        p = _mm512_fmadd_ps(load_q8x16(q + (r) * K + 32 * j + 16), x1, p);                                     \
        acc = _mm512_fmadd_ps(p, _mm512_set1_ps(_cvtsh_ss(s[(r) * nb + j])), acc);                             \
    }
        for (int64_t j = 0; j < nb; j++) {
            const __m512 x0 = _mm512_loadu_ps(x + 32 * j), x1 = _mm512_loadu_ps(x + 32 * j + 16);
            if (!(j & 1)) PREFETCH_ROWS(q + 32 * j, K);
            Q8_ROW(a0, 0) Q8_ROW(a1, 1) Q8_ROW(a2, 2) Q8_ROW(a3, 3)
        }
#undef Q8_ROW
    } else if (m->kind == MK_BF16) {
        const uint16_t *w = (const uint16_t *)m->w + n * K;
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
            if (!(i & 31)) PREFETCH_ROWS(w + i, K);
            a0 = _mm512_fmadd_ps(load_bf16x16(w + i), xv, a0);
            a1 = _mm512_fmadd_ps(load_bf16x16(w + K + i), xv, a1);
            a2 = _mm512_fmadd_ps(load_bf16x16(w + 2 * K + i), xv, a2);
            a3 = _mm512_fmadd_ps(load_bf16x16(w + 3 * K + i), xv, a3);
        }
    } else {
        const float *w = (const float *)m->w + n * K;
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
            PREFETCH_ROWS(w + i, K);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + K + i), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * K + i), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * K + i), xv, a3);
        }
    }
    y[n] = _mm512_reduce_add_ps(a0);
    y[n + 1] = _mm512_reduce_add_ps(a1);
    y[n + 2] = _mm512_reduce_add_ps(a2);
    y[n + 3] = _mm512_reduce_add_ps(a3);
}

/* 16 weights of row r at column i as floats (q8: times the block's scale). */
AVX512 static inline __m512 load_w16(const mat_t *m, int64_t r, int64_t i) {
    const int64_t K = m->k;
    if (m->kind == MK_Q8) {
        const float sc = _cvtsh_ss(((const uint16_t *)m->s)[r * (K / 32) + i / 32]);
        return _mm512_mul_ps(load_q8x16((const int8_t *)m->w + r * K + i), _mm512_set1_ps(sc));
    }
    if (m->kind == MK_BF16) return load_bf16x16((const uint16_t *)m->w + r * K + i);
    if (m->kind == MK_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)m->w + r * K + i)));
    return _mm512_loadu_ps((const float *)m->w + r * K + i);
}

/* A batch (decode of several rows): four weight rows times four inputs per tile, so each weight
 * vector loaded (and widened) serves four inputs and each input vector four rows. */
AVX512 static void rows4_avx512_b4(const mat_t *m, int64_t n, const float *x, int64_t b0, int64_t nb,
                                   float *y, int64_t ldy) {
    const int64_t K = m->k;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    const float *xb = x + b0 * K;
    if (nb == 4) { /* constant trip counts: the 16 accumulators stay in registers */
        for (int64_t i = 0; i < K; i += 16) {
            const __m512 w0 = load_w16(m, n, i), w1 = load_w16(m, n + 1, i);
            const __m512 w2 = load_w16(m, n + 2, i), w3 = load_w16(m, n + 3, i);
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) {
                const __m512 xv = _mm512_loadu_ps(xb + b * K + i);
                acc[0][b] = _mm512_fmadd_ps(w0, xv, acc[0][b]);
                acc[1][b] = _mm512_fmadd_ps(w1, xv, acc[1][b]);
                acc[2][b] = _mm512_fmadd_ps(w2, xv, acc[2][b]);
                acc[3][b] = _mm512_fmadd_ps(w3, xv, acc[3][b]);
            }
        }
        for (int b = 0; b < 4; b++)
            for (int r = 0; r < 4; r++) y[(b0 + b) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][b]);
        return;
    }
    for (int64_t i = 0; i < K; i += 16) {
        const __m512 w0 = load_w16(m, n, i), w1 = load_w16(m, n + 1, i);
        const __m512 w2 = load_w16(m, n + 2, i), w3 = load_w16(m, n + 3, i);
        for (int64_t b = 0; b < nb; b++) {
            const __m512 xv = _mm512_loadu_ps(xb + b * K + i);
            acc[0][b] = _mm512_fmadd_ps(w0, xv, acc[0][b]);
            acc[1][b] = _mm512_fmadd_ps(w1, xv, acc[1][b]);
            acc[2][b] = _mm512_fmadd_ps(w2, xv, acc[2][b]);
            acc[3][b] = _mm512_fmadd_ps(w3, xv, acc[3][b]);
        }
    }
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < 4; r++) y[(b0 + b) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][b]);
}

AVX512 static void rows_avx512(const mat_t *m, int64_t r0, int64_t r1, const float *x, int64_t B, float *y,
                               int64_t ldy) {
    const int64_t K = m->k;
    if (B == 1 && m->kind != MK_F16) {
        for (; r0 + 4 <= r1; r0 += 4) rows4_avx512_b1(m, r0, x, y);
    } else {
        for (; r0 + 4 <= r1; r0 += 4)
            for (int64_t b0 = 0; b0 < B; b0 += 4) rows4_avx512_b4(m, r0, x, b0, B - b0 < 4 ? B - b0 : 4, y, ldy);
    }
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t b0 = 0; b0 < B; b0 += NB_MAX) {
            const int64_t nb = B - b0 < NB_MAX ? B - b0 : NB_MAX;
            const float *x0 = x + b0 * K;
            __m512 acc[NB_MAX] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            if (m->kind == MK_Q8) {
                const int8_t *q = (const int8_t *)m->w + n * K;
                const uint16_t *s = (const uint16_t *)m->s + n * (K / 32);
                for (int64_t j = 0; j < K / 32; j++) {
                    const __m512 w0 = load_q8x16(q + 32 * j), w1 = load_q8x16(q + 32 * j + 16);
                    const __m512 sc = _mm512_set1_ps(_cvtsh_ss(s[j]));
                    for (int64_t b = 0; b < nb; b++) {
                        const float *xb = x0 + b * K + 32 * j;
                        __m512 p = _mm512_mul_ps(w0, _mm512_loadu_ps(xb));
                        p = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), p);
                        acc[b] = _mm512_fmadd_ps(p, sc, acc[b]);
                    }
                }
            } else { /* bf16 (widened exactly), fp16 or fp32 */
                for (int64_t i = 0; i < K; i += 16) {
                    const __m512 wv = load_w16(m, n, i);
                    for (int64_t b = 0; b < nb; b++)
                        acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + b * K + i), acc[b]);
                }
            }
            for (int64_t b = 0; b < nb; b++) y[(b0 + b) * ldy + n] = _mm512_reduce_add_ps(acc[b]);
        }
    }
}
#endif

/* The inputs of one row prepared for _decode_rows1.c's kernels, once per matrix per thread: `prep` holds
   up to PREP_JOBS jobs' prepared inputs (NULL: none), filled when the thread first takes rows of a job. */
#define PREP_JOBS 8
typedef struct {
    char *buf;
    int64_t off[PREP_JOBS];
    int ready[PREP_JOBS];
} prep_t;

static void prep_init(prep_t *p, const job_t *jobs, int n_jobs, int64_t B) {
    int64_t total = 0;
    p->buf = NULL;
    if (B != 1 || n_jobs > PREP_JOBS) return;
    for (int j = 0; j < n_jobs; j++) {
        p->off[j] = total;
        p->ready[j] = 0;
        total += (rows1_prep_bytes(jobs[j].m) + 63) / 64 * 64;
    }
    if (total) p->buf = rows1_buffer(total);
}

static void mat_rows(const job_t *job, int64_t r0, int64_t r1, int64_t B, prep_t *p, int j, span_t next) {
    const mat_t *m = job->m;
    const float *x = job->x;
    float *y = job->y;
    const int64_t ldy = m->n;
    if (job->xb && (m->kind == MK_BF16 || m->kind == MK_Q8)) {
        rows_bf16(m, r0, r1, job->xb, B, y, ldy, next);
        return;
    }
    if (B == 1 && rows1_applies(m)) {
        const int64_t bytes = rows1_prep_bytes(m);
        if (!bytes) {
            rows1(m, r0, r1, x, NULL, y);
            return;
        }
        if (p->buf) {
            if (!p->ready[j]) rows1_prep(m, x, p->buf + p->off[j]);
            p->ready[j] = 1;
            rows1(m, r0, r1, x, p->buf + p->off[j], y);
            return;
        }
    }
#if HAVE_X86
    if (use_avx512 && m->k % 32 == 0) {
        rows_avx512(m, r0, r1, x, B, y, ldy);
        return;
    }
#endif
    rows_generic(m, r0, r1, x, B, y, ldy);
}

void mats_team(const job_t *jobs, int n_jobs, int64_t B, int tid, int nt) {
    int64_t total = 0;
    for (int j = 0; j < n_jobs; j++) total += jobs[j].m->n;
    int64_t lo, hi, base = 0;
    prep_t prep;
    prep_init(&prep, jobs, n_jobs, B);
    split(total, tid, nt, &lo, &hi);
    for (int j = 0; j < n_jobs; j++) {
        const int64_t n = jobs[j].m->n, a = lo > base ? lo - base : 0, e = hi - base < n ? hi - base : n;
        if (a < e) mat_rows(&jobs[j], a, e, B, &prep, j, (span_t){NULL, 0});
        base += n;
    }
}

#define ROW_CHUNK 32 /* fewest rows per claim; chunks are multiples of 4 (the kernels' row groups) */

/* Several matrices with their own inputs and outputs; the team claims chunks of their rows from *next
 * (zero before the phase, used once). About 64 chunks per phase: enough to balance, few enough that
 * the shared counter costs nothing. With bf16 activations (several rows) each thread claims one chunk
 * ahead and reads it into L2 while it multiplies the one before (rows_bf16). */
typedef struct {
    const job_t *jobs;
    int n_jobs;
    int64_t ch, total;
} claims_t;

/* Claim c as (job, rows [r0, r1)); 0 past the last. */
static int claim_rows(const claims_t *cl, int64_t c, int *j, int64_t *r0, int64_t *r1) {
    if (c >= cl->total) return 0;
    for (*j = 0; *j < cl->n_jobs; (*j)++) {
        const int64_t n = cl->jobs[*j].m->n, chunks = (n + cl->ch - 1) / cl->ch;
        if (c < chunks) {
            *r0 = c * cl->ch;
            *r1 = *r0 + cl->ch < n ? *r0 + cl->ch : n;
            return 1;
        }
        c -= chunks;
    }
    return 0;
}

void mats_claim(const job_t *jobs, int n_jobs, int64_t B, atomic_long *next) {
    int64_t rows = 0;
    claims_t cl = {jobs, n_jobs, 0, 0};
    for (int j = 0; j < n_jobs; j++) rows += jobs[j].m->n;
    cl.ch = (rows / 64) & ~(int64_t)3;
    if (cl.ch < ROW_CHUNK) cl.ch = ROW_CHUNK;
    for (int j = 0; j < n_jobs; j++) cl.total += (jobs[j].m->n + cl.ch - 1) / cl.ch;
    const int ahead = jobs[0].xb != NULL;
    prep_t prep;
    prep_init(&prep, jobs, n_jobs, B);
    int64_t c = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
    int j, jn;
    int64_t r0, r1, n0, n1;
    while (claim_rows(&cl, c, &j, &r0, &r1)) {
        const int64_t cn = ahead ? atomic_fetch_add_explicit(next, 1, memory_order_relaxed) : -1;
        span_t pf = {NULL, 0};
        if (cn >= 0 && claim_rows(&cl, cn, &jn, &n0, &n1)) {
            const mat_t *mn = jobs[jn].m;
            const int64_t row = mn->kind == MK_Q8 ? mn->k : mn->kind == MK_F32 ? 4 * mn->k : 2 * mn->k;
            pf = (span_t){(const char *)mn->w + n0 * row, (n1 - n0) * row};
        }
        mat_rows(&jobs[j], r0, r1, B, &prep, j, pf);
        c = ahead ? cn : atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
    }
}

/* use_avx512 (the kernels' AVX-512 paths: the CPU has them and portable is 0) and the one-row dot
   kernels (rowdot 1 and the CPU has AVX512_BF16 / AVX512_VNNI; rowdot 0: the widening kernels, as on
   CPUs without them). Each extension module that compiles these kernels in calls it. */
void matvec_configure(int portable, int rowdot) {
    use_avx512 = use_dot_bf16 = use_dot_vnni = 0;
#if HAVE_X86
    __builtin_cpu_init();
    use_avx512 = !portable && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    use_dot_bf16 = use_avx512 && rowdot && __builtin_cpu_supports("avx512bf16");
    use_dot_vnni = use_avx512 && rowdot && __builtin_cpu_supports("avx512vnni");
#endif
}

/* ---- team synchronisation ------------------------------------------------------------------------
 * OpenMP's own barrier spins for a long time before it sleeps; on a machine with more runnable threads
 * than cores, a thread spinning there keeps the one it waits for off the core (measured: a step went
 * from 10 ms to 300 ms with one other busy process on two cores). This barrier spins briefly, then
 * yields the core. Matrix rows are handed out in chunks from a shared counter, so a thread that loses
 * its core holds up one chunk, not its whole share. */

#include <sched.h>

void team_run(void (*team)(const void *args, int tid, int nt), const void *args, int n_threads) {
#if HAVE_X86
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* flush denormals (decayed states) on this thread; workers set their own */
#endif
#pragma omp parallel num_threads(n_threads)
    {
#if HAVE_X86
        const unsigned int wcsr = _mm_getcsr();
        _mm_setcsr(wcsr | 0x8040);
#endif
        team(args, omp_get_thread_num(), omp_get_num_threads());
#if HAVE_X86
        _mm_setcsr(wcsr);
#endif
    }
#if HAVE_X86
    _mm_setcsr(csr);
#endif
}

void team_barrier(team_barrier_t *b, int team) {
    if (team == 1) return;
    const int gen = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == team - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->gen, 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->gen, memory_order_acquire) == gen; spins++) {
        if (spins < 2000) {
#if HAVE_X86
            _mm_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

/* LayerNorm of one row of n (the blocks' ln1/ln2/ln_out and, per head, the GroupNorm) */
void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *out) {
    const float mean = row_sum(x, n, 0, 0.f) / (float)n;
    const float rstd = 1.f / sqrtf(row_sum(x, n, 1, mean) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}
