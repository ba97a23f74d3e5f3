/* rwkvkit/ops/_sample_cpu.c: the per-row work of the batched sampler (rwkvkit.sampling_group.draw_group)
 * in a few passes per row, rows spread over OpenMP threads (PyTorch's libgomp).
 *
 * Top-p cutoff, exactly the reference's (sampling.top_p_cutoff): probabilities p (torch.softmax's,
 * computed by the caller) that are >= the candidate bound lb, sorted descending, float32 sequential
 * prefix sums, the first sum >= tp gives the cutoff; never reached: the smallest candidate; no
 * candidate at all: the same on every token. Only the sorted order of the tokens above some threshold
 * t matters, as long as their float32 sums reach tp, and non-negative floats sort as their bits do
 * (uint32), so:
 *   1. the candidates (>= lb) are compacted, bits and indices in index order (AVX-512 compress where
 *      there is AVX-512);
 *   2. a histogram of their bits >> 13 (8 exponent + 10 mantissa bits: buckets 1/1024 wide, a few
 *      tokens each) bounds the buckets' mass from below: the buckets from the top down to the first
 *      where that bound reaches tp * (1 + 2 gamma_n) are enough (a float32 sum of n positive terms is
 *      at least (1 - gamma_n) times the exact sum, gamma_n = n u / (1 - n u), u = 2^-24), else all;
 *   3. their values are sorted, descending, by two stable counting passes (the low 13 bits, then the
 *      bucket), insertion sort for a few: no comparison sort of the nucleus;
 *   4. the sequential float32 sums run down the sorted values until one reaches tp.
 *
 * Draw: the kept tokens (p >= cutoff, and not in the optional drop mask of top-k) in index order get
 * weights exp((x - max(x)) * inv_t) (max(x) given) (float32 subtraction and product as torch's ops do; exp through
 * double, close to correctly rounded: it can differ from torch.exp by an ulp, so the one-row path
 * uses this kernel too); the CDF is torch.cumsum's (a double running sum rounded to float32 at every
 * token), the target u * cdf[last] in float32, the token the first whose CDF exceeds it
 * (searchsorted right=True), V - 1 when none does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <pthread.h>

#include "_args.h"
#include "_sample.h"

int sample_avx512;

/* per thread, grown to the largest vocabulary seen and kept for the next call; freed when the thread
   ends (a pthread key's destructor: threads that come and go leave nothing behind) */
static pthread_key_t scratch_key;

static void scratch_release(scratch_t *s) {
    free(s->bits), free(s->sorted), free(s->tmp), free(s->hist), free(s->low), free(s->idx), free(s->kept);
    free(s->z), free(s->cdf);
    memset(s, 0, sizeof *s);
}

static void scratch_free(void *p) {
    scratch_release(p);
    free(p);
}

static scratch_t *scratch(long V) {
    scratch_t *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap >= V) return s;
    scratch_release(s);
    const size_t n = (size_t)V + 16; /* compress stores write up to 16 past the count */
    s->bits = malloc(n * 4), s->sorted = malloc(n * 4), s->tmp = malloc(n * 4), s->idx = malloc(n * 4);
    s->kept = malloc(n * 4), s->z = malloc(n * 4), s->cdf = malloc(n * 4);
    s->hist = malloc(((size_t)NBUCKET + 1) * 4), s->low = malloc(((size_t)1 << FINE) * 4);
    if (!s->low || !s->bits || !s->sorted || !s->tmp || !s->idx || !s->kept || !s->z || !s->cdf || !s->hist) {
        scratch_release(s);
        return NULL;
    }
    s->cap = V;
    return s;
}

/* ---- the weights' exp ------------------------------------------------------------------------------- */
/* exp(z) for z <= 0 (or -inf) rounded once to float32: z = k ln2 + r in double, |r| <= ln2 / 2, exp(r)
   by its Taylor polynomial to r^9 (truncation < 1e-11), 2^k put into the exponent bits. On 4M values
   in [-110, 0] it is the correctly rounded exp but for 25 (torch.exp differs from it on 0.9%, by an ulp).
   The loops calling it vectorise (with -fno-trapping-math). */
static inline __attribute__((always_inline)) float exp_weight(float z) {
    const double d = z < -104.0f ? -104.0f : z; /* exp(-104) rounds to 0 */
    const double t = d * 1.4426950408889634 + 0x1.8p52;
    const double k = t - 0x1.8p52; /* round(d / ln2), and k in the low bits of t */
    const double r = d - k * 0.6931471805599453;
    double q = 1.0 / 362880;
    q = q * r + 1.0 / 40320;
    q = q * r + 1.0 / 5040;
    q = q * r + 1.0 / 720;
    q = q * r + 1.0 / 120;
    q = q * r + 1.0 / 24;
    q = q * r + 1.0 / 6;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    int64_t e;
    memcpy(&e, &t, 8);
    e = (e - 0x4338000000000000LL + 1023) << 52;
    double scale;
    memcpy(&scale, &e, 8);
    return (float)(q * scale);
}

#ifdef HAVE_X86
__attribute__((target("avx512f,avx512dq"))) static void exp_avx512(float *restrict z, long n) {
    for (long j = 0; j < n; j++) z[j] = exp_weight(z[j]);
}
#endif

static void exp_portable(float *restrict z, long n) {
    for (long j = 0; j < n; j++) z[j] = exp_weight(z[j]);
}

static void exp_inplace(float *z, long n) {
#ifdef HAVE_X86
    if (sample_avx512) {
        exp_avx512(z, n);
        return;
    }
#endif
    exp_portable(z, n);
}

/* ---- the draw: the first of the k weights w whose CDF exceeds u * CDF[k - 1] (k when none) ---------
   The CDF is torch.cumsum's on the CPU: a double running sum, rounded to float32 at every token. When
   every weight is >= 2^-16 (multiples of 2^-39) and k <= 2^14 (sums < 2^14), every double sum is exact:
   any order gives the same sums, so the total and 16-token blocks are summed in vector lanes and
   only the block that crosses the target is walked. Otherwise the running sum is kept token by token. */
static long first_above(const float *w, long k, float u, float *cdf) {
    uint32_t least = 0xffffffffu;
    for (long j = 0; j < k; j++) least = bits_of(w[j]) < least ? bits_of(w[j]) : least;
    if (k <= 16384 && least >= 0x37800000u) {
        double lane[8] = {0};
        long j = 0;
        for (; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) lane[l] += w[j + l];
        double total = 0.0;
        for (; j < k; j++) total += w[j];
        for (int l = 0; l < 8; l++) total += lane[l];
        const float target = u * (float)total;
        double acc = 0.0;
        for (j = 0; j + 16 <= k; j += 16) {
            double t[8];
            for (int l = 0; l < 8; l++) t[l] = (double)w[j + l] + (double)w[j + 8 + l];
            const double block = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
            if ((float)(acc + block) > target) break;
            acc += block;
        }
        for (; j < k; j++) {
            acc += w[j];
            if ((float)acc > target) return j;
        }
        return k;
    }
    double acc = 0.0;
    for (long j = 0; j < k; j++) {
        acc += w[j];
        cdf[j] = (float)acc;
    }
    const float target = u * (k ? cdf[k - 1] : 0.0f);
    long lo = 0, hi = k;
    while (lo < hi) { /* the first CDF value > target: searchsorted(right=True) */
        const long mid = (lo + hi) / 2;
        if (cdf[mid] > target) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* ---- the draw ------------------------------------------------------------------------------------- */
typedef struct {
    long b, V;
    const float *x, *top;    /* logits [b, V] (finite) and their row maxima [b] */
    const float *probs;      /* probabilities [b, V] (NULL: no top-p) */
    const uint8_t *drop;     /* [b, V] nonzero: left out by top-k (NULL: none) */
    const float *u;          /* [b] uniforms in [0, 1) */
    float lb, tp;            /* candidate bound, the float32 prefix sums' target */
    float inv_t;             /* 1 / temperature as the caller scales by (1: no product) */
    int64_t *tokens;         /* out [b] */
    float *cutoffs;          /* out [b] (NULL: not wanted); with x NULL only these are computed */
    int *status;             /* out [b]: 0, -1 invalid probabilities, -2 out of memory */
} job_t;

static void run_row(const job_t *a, long r) {
    const long V = a->V;
    scratch_t *s = scratch(V);
    if (!s) {
        a->status[r] = -2;
        return;
    }
    const float *p = a->probs ? a->probs + r * V : NULL;
    float cutoff = 0.0f;
    long n = V;
    if (p && top_p_cutoff_row(p, V, bits_of(a->lb), a->tp, s, &cutoff, &n, a->x ? a->x + r * V : NULL) != 0) {
        a->status[r] = -1;
        return;
    }
    if (a->cutoffs) a->cutoffs[r] = cutoff;
    a->status[r] = 0;
    if (!a->x) return;
    const float *x = a->x + r * V;
    const uint8_t *drop = a->drop ? a->drop + r * V : NULL;
    const float m = a->top[r]; /* max(x): the caller's (exact in any order) */
    long k = 0; /* the kept tokens, in index order, with their scaled logits */
    if (p) { /* the candidates' bits are at hand: p >= cutoff is bits >= cutoff's bits */
        const uint32_t c = bits_of(cutoff);
        if (drop)
            for (long j = 0; j < n; j++) {
                const int32_t i = s->idx[j];
                s->kept[k] = i;
                k += s->bits[j] >= c && !drop[i];
            }
#ifdef HAVE_X86
        else if (sample_avx512)
            k = select_idx_avx512(s->bits, s->idx, n, c, s->kept);
#endif
        else
            for (long j = 0; j < n; j++) {
                s->kept[k] = s->idx[j];
                k += s->bits[j] >= c;
            }
    } else {
        for (long i = 0; i < V; i++) {
            s->kept[k] = (int32_t)i;
            k += !(drop && drop[i]);
        }
    }
    const float inv_t = a->inv_t;
    if (inv_t == 1.0f)
        for (long j = 0; j < k; j++) s->z[j] = x[s->kept[j]] - m;
    else
        for (long j = 0; j < k; j++) s->z[j] = (x[s->kept[j]] - m) * inv_t;
    exp_inplace(s->z, k);
    const long lo = first_above(s->z, k, a->u[r], s->cdf);
    a->tokens[r] = lo < k ? s->kept[lo] : V - 1;
}

static PyObject *draw_rows(PyObject *self, PyObject *args, PyObject *kw) {
    job_t a;
    long threads;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"b", ARG_LONG, &a.b}, {"V", ARG_LONG, &a.V}, {"x", ARG_OPT_PTR, &a.x}, {"top", ARG_OPT_PTR, &a.top},
        {"probs", ARG_OPT_PTR, &a.probs},
        {"drop", ARG_OPT_PTR, &a.drop}, {"u", ARG_OPT_PTR, &a.u}, {"lb", ARG_FLOAT, &a.lb},
        {"tp", ARG_FLOAT, &a.tp}, {"inv_t", ARG_FLOAT, &a.inv_t},
        {"tokens", ARG_OPT_PTR, &a.tokens}, {"cutoffs", ARG_OPT_PTR, &a.cutoffs}, {"status", ARG_PTR, &a.status},
        {"threads", ARG_LONG, &threads},
    };
    if (!parse_named("draw_rows", args, kw, spec, NARGS(spec))) return NULL;
    if (a.b <= 0 || a.V <= 0 || a.V > INT32_MAX - 16) {
        PyErr_SetString(PyExc_ValueError, "draw_rows: b and V must be positive (V < 2**31 - 16)");
        return NULL;
    }
    if (a.x ? !(a.top && a.u && a.tokens) : !(a.probs && a.cutoffs)) {
        PyErr_SetString(PyExc_ValueError, "draw_rows: give x, top, u and tokens, or probs and cutoffs alone");
        return NULL;
    }
    if (threads > a.b) threads = a.b;
    if (threads < 1) threads = 1;
    Py_BEGIN_ALLOW_THREADS
    if (threads == 1) {
        for (long r = 0; r < a.b; r++) run_row(&a, r);
    } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (long r = 0; r < a.b; r++) run_row(&a, r);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int have_avx512; /* what the CPU supports; sample_avx512 is what runs */

/* use_avx512(flag): run the AVX-512 loops (when the CPU has them) or the portable ones, which give
   the same results (tests compare them); returns whether AVX-512 loops run now. */
static PyObject *set_avx512(PyObject *self, PyObject *arg) {
    const int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
    sample_avx512 = want && have_avx512;
    return PyBool_FromLong(sample_avx512);
}

static PyMethodDef methods[] = {
    {"draw_rows", (PyCFunction)(void (*)(void))draw_rows, METH_VARARGS | METH_KEYWORDS,
     "draw_rows(*, b, V, x, top, probs, drop, u, lb, tp, inv_t, tokens, cutoffs, status, threads): one token "
     "(or with x=None only the top-p cutoff) per row; status[r] is 0, -1 (probs not probabilities) or -2 (no "
     "memory)."},
    {"use_avx512", set_avx512, METH_O,
     "use_avx512(flag): the AVX-512 loops (if the CPU has them) or the portable ones; returns which run."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sample_cpu",
                                    "Top-p cutoffs and draws of the batched sampler on the CPU.", -1, methods};

PyMODINIT_FUNC PyInit__sample_cpu(void) {
    if (pthread_key_create(&scratch_key, scratch_free) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "_sample_cpu: no thread-local storage key");
        return NULL;
    }
#ifdef HAVE_X86
    __builtin_cpu_init();
    have_avx512 = sample_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
    return PyModule_Create(&module);
}
