/* rwkvkit/ops/_sample_cutoff.c: the reference's top-p cutoff of one row of probabilities, steps 1-4 of
 * the scheme at the top of _sample_cpu.c: compaction of the candidates, a histogram of their bits, two
 * counting passes for the buckets that hold the nucleus, the float32 sequential prefix sums. */
#include "_sample.h"

/* ---- 1. compaction: bits and indices of the tokens whose bits are >= t, in index order ------------- */

#ifdef HAVE_X86
__attribute__((target("avx512f"))) static long compact_avx512(const uint32_t *b, long V, uint32_t t, uint32_t *ob,
                                                               int32_t *oi, uint32_t *max_bits, const float *ahead) {
    const __m512i vt = _mm512_set1_epi32((int)t);
    __m512i top = _mm512_setzero_si512();
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    long n = 0, i = 0;
    for (; i + 16 <= V; i += 16, lane = _mm512_add_epi32(lane, step)) {
        const __m512i v = _mm512_loadu_si512(b + i);
        const __mmask16 m = _mm512_cmpge_epu32_mask(v, vt);
        if (ahead) __builtin_prefetch(ahead + i); /* the logits the draw gathers, one line a step */
        top = _mm512_max_epu32(top, v);
        /* compress in registers, then a full store (the memory form is slow on some cores) */
        _mm512_storeu_si512(ob + n, _mm512_maskz_compress_epi32(m, v));
        _mm512_storeu_si512(oi + n, _mm512_maskz_compress_epi32(m, lane));
        n += __builtin_popcount(m);
    }
    uint32_t worst = _mm512_reduce_max_epu32(top);
    for (; i < V; i++) {
        ob[n] = b[i], oi[n] = (int32_t)i;
        n += b[i] >= t;
        worst = b[i] > worst ? b[i] : worst;
    }
    *max_bits = worst;
    return n;
}

__attribute__((target("avx512f"))) static long select_avx512(const uint32_t *b, long n, uint32_t t, uint32_t *ob) {
    const __m512i vt = _mm512_set1_epi32((int)t);
    long m = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i v = _mm512_loadu_si512(b + i);
        const __mmask16 k = _mm512_cmpge_epu32_mask(v, vt);
        _mm512_storeu_si512(ob + m, _mm512_maskz_compress_epi32(k, v));
        m += __builtin_popcount(k);
    }
    for (; i < n; i++) {
        ob[m] = b[i];
        m += b[i] >= t;
    }
    return m;
}

/* the indices of the tokens whose bits are >= t */
__attribute__((target("avx512f"))) long select_idx_avx512(const uint32_t *b, const int32_t *idx, long n,
                                                                  uint32_t t, int32_t *out) {
    const __m512i vt = _mm512_set1_epi32((int)t);
    long m = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __mmask16 k = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(b + i), vt);
        _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(k, _mm512_loadu_si512(idx + i)));
        m += __builtin_popcount(k);
    }
    for (; i < n; i++) {
        out[m] = idx[i];
        m += b[i] >= t;
    }
    return m;
}

#endif

static long compact(const uint32_t *b, long V, uint32_t t, uint32_t *ob, int32_t *oi, uint32_t *max_bits,
                    const float *ahead) {
#ifdef HAVE_X86
    if (sample_avx512) return compact_avx512(b, V, t, ob, oi, max_bits, ahead);
#endif
    uint32_t worst = 0;
    long n = 0;
    for (long i = 0; i < V; i++) { /* branch-free: write always, advance when kept */
        if (ahead && (i & 15) == 0) __builtin_prefetch(ahead + i);
        ob[n] = b[i], oi[n] = (int32_t)i;
        n += b[i] >= t;
        worst = b[i] > worst ? b[i] : worst;
    }
    *max_bits = worst;
    return n;
}

/* The top-p cutoff of one row of probabilities (module comment). Returns 0, or -1 when the row holds a
   value that is not a probability (negative, NaN, above 1). The candidates are left in s->bits / s->idx
   in index order (every token >= the cutoff is among them), *n_used their number. */
int top_p_cutoff_row(const float *p, long V, uint32_t lb, float tp, scratch_t *s, float *cutoff, long *n_used,
                      const float *x) {
    const uint32_t *b = (const uint32_t *)p;
    uint32_t t = lb;
    for (;;) {
        uint32_t max_bits;
        const long n = compact(b, V, t, s->bits, s->idx, &max_bits, x); /* x: prefetched */
        if (max_bits > ONE_BITS) return -1;
        if (n == 0) { /* no candidate: the reference sorts the whole row */
            t = 0;
            continue;
        }
        const uint32_t lo = t >> FINE, hi = max_bits >> FINE;
        uint32_t *hist = s->hist;
        memset(hist + lo, 0, (hi + 1 - lo) * 4);
        for (long j = 0; j < n; j++) hist[s->bits[j] >> FINE]++;
        /* the buckets from the top whose mass surely brings the float32 sums to tp (8 at a time) */
        const double g = (double)n / 16777216.0, gamma = g / (1.0 - g);
        const double need = g < 0.25 ? (double)tp * (1.0 + 2.0 * gamma) * (1.0 + 1e-9) : __builtin_inf();
        double cum = 0.0;
        long b0 = lo, found = 0;
        for (long k = hi; k >= (long)lo && !found; k -= 8) {
            const long kl = k - 7 > (long)lo ? k - 7 : (long)lo;
            long c = 0;
            for (long q = kl; q <= k; q++) c += hist[q];
            cum += c * (double)float_of((uint32_t)kl << FINE); /* a lower bound of their mass */
            if (c && cum >= need) b0 = kl, found = 1; /* (need is 0 at top_p = 0: the first token) */
        }
        /* sort the tokens of the buckets >= b0, descending: two stable counting passes, first on the
           low FINE bits, then on the buckets (a few tokens: insertion sort) */
        const uint32_t from = (uint32_t)b0 << FINE;
        long off = 0;
        uint32_t *a = s->tmp, *o = s->sorted;
#ifdef HAVE_X86
        if (sample_avx512) off = select_avx512(s->bits, n, from, a);
        else
#endif
            for (long j = 0; j < n; j++) { /* branch-free selection */
                a[off] = s->bits[j];
                off += s->bits[j] >= from;
            }
        if (off <= SMALL_SORT) {
            for (long i = 1; i < off; i++) {
                const uint32_t v = a[i];
                long j = i;
                for (; j > 0 && a[j - 1] < v; j--) a[j] = a[j - 1];
                a[j] = v;
            }
        } else {
            uint32_t *low = s->low; /* counts, then slots, of the low digit, descending */
            const uint32_t mask = (1u << FINE) - 1;
            memset(low, 0, (mask + 1) * 4);
            for (long j = 0; j < off; j++) low[mask - (a[j] & mask)]++;
            for (uint32_t d = 0, c = 0; d <= mask; d++) {
                const uint32_t k = low[d];
                low[d] = c, c += k;
            }
            for (long j = 0; j < off; j++) o[low[mask - (a[j] & mask)]++] = a[j];
            for (long q = hi, c = 0; q >= b0; q--) { /* the buckets' slots, descending */
                const long k = hist[q];
                hist[q] = (uint32_t)c, c += k;
            }
            for (long j = 0; j < off; j++) a[hist[o[j] >> FINE]++] = o[j];
        }
        float sum = 0.0f;
        for (long j = 0; j < off; j++) {
            sum += float_of(a[j]); /* sequential float32 sums: NumPy's cumsum */
            if (sum >= tp) {
                *cutoff = float_of(a[j]);
                *n_used = n;
                return 0;
            }
        }
        *cutoff = float_of(a[off - 1]); /* never reached (all candidates summed): the smallest */
        *n_used = n;
        return 0;
    }
}
