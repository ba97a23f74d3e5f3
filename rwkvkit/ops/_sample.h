/* rwkvkit/ops/_sample.h: what the two files of the batched sampler's extension share
 * (_sample_cutoff.c: the top-p cutoff; _sample_cpu.c: the weights, the draw and the Python module; the
 * scheme is described at the top of _sample_cpu.c): the scratch buffers, float bits, the ISA switch. */
#ifndef RWKVKIT_SAMPLE_H
#define RWKVKIT_SAMPLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define ONE_BITS 0x3f800000u /* 1.0f: probabilities above it make the row invalid */
#define FINE 13              /* the candidates' buckets: bits >> 13, 1/1024 wide (~8 tokens of a flat row) */
#define NBUCKET ((ONE_BITS >> FINE) + 1u) /* buckets of [0, 1.0f] */
#define SMALL_SORT 64 /* up to this many tokens above the buckets' bound are sorted by insertion */

typedef struct {
    long cap;
    uint32_t *bits, *sorted, *tmp, *hist, *low; /* candidates' bits (index order), sorting, histograms */
    int32_t *idx, *kept;                  /* candidates' indices, kept tokens' indices */
    float *z, *cdf;                       /* kept tokens' scaled logits, then weights; their CDF */
} scratch_t;

extern int sample_avx512; /* the AVX-512 loops run (the CPU has them and they are not switched off) */

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* _sample_cutoff.c */
#ifdef HAVE_X86
__attribute__((target("avx512f"))) long select_idx_avx512(const uint32_t *b, const int32_t *idx, long n,
                                                                  uint32_t t, int32_t *out);
#endif
int top_p_cutoff_row(const float *p, long V, uint32_t lb, float tp, scratch_t *s, float *cutoff, long *n_used,
                     const float *x);

#endif
