/* rwkvkit/tokenizer/_encode.c: the greedy longest-match walk over the trie (tables: _trie.c). */
#include "_core.h"

/* ------------------------------------------------------------------------------------------ */
/* Encoding.                                                                                    */

/* Greedy longest match of the tokens that start in src[i:stop] (the last may end past stop; src
 * has n bytes) into out + *k. Returns the position after the last token.
 * A walk ends by itself within 129 steps (a node at depth 128 is a leaf, and a leaf's base 0 leads
 * to cells 0..255 whose parent is never a leaf), so far from the end no bounds test is needed. */
static Py_ssize_t encode_range(const Core *self, const uint8_t *src, Py_ssize_t n, Py_ssize_t i, Py_ssize_t stop,
                               uint16_t *out, Py_ssize_t *k) {
    const uint64_t *cells = self->packed;
    const uint8_t *len = self->len;
    const uint32_t root_base = (uint32_t)(cells[0] & FIELD);
    Py_ssize_t kk = *k;
    while (i < stop && i + 130 <= n) {
        uint32_t s = root_base + src[i]; /* every byte is a token: the first step always matches */
        uint64_t c = cells[s];
        uint32_t best = (uint32_t)(c >> 48);
        const uint8_t *p = src + i + 1;
        for (;;) {
            uint32_t t = (uint32_t)(c & FIELD) + *p;
            uint64_t ct = cells[t];
            if ((uint32_t)CHECK(ct) != s) break;
            s = t;
            c = ct;
            p++;
            uint32_t v = (uint32_t)(ct >> 48);
            best = v ? v : best;
        }
        out[kk++] = (uint16_t)best;
        i += len[best];
    }
    while (i < stop && i < n) {
        uint32_t s = root_base + src[i];
        uint64_t c = cells[s];
        uint32_t best = (uint32_t)(c >> 48);
        for (Py_ssize_t j = i + 1; j < n; j++) {
            uint32_t t = (uint32_t)(c & FIELD) + src[j];
            uint64_t ct = cells[t];
            if ((uint32_t)CHECK(ct) != s) break;
            s = t;
            c = ct;
            uint32_t v = (uint32_t)(ct >> 48);
            best = v ? v : best;
        }
        out[kk++] = (uint16_t)best;
        i += len[best];
    }
    *k = kk;
    return i;
}

/* Greedy longest match of src[0:n] into out (capacity n: every token has >= 1 byte).
 *
 * A single walk is a chain of dependent loads (one per byte), so long inputs are cut into
 * segments and N_LANES walks run interleaved, each on its own segment (a lane that finishes takes
 * the next one), and the loads of the lanes overlap. Measured on this project's 2-core machine:
 * 2, 3 and 4 lanes all gave ~1.3x over one walk; branch-free lane steps were slower.
 * Each segment is tokenized as if the text started there; the pieces are then joined: greedy
 * matching from a position does not depend on what came before, so a segment's tokens are exact
 * from the first position where they share a boundary with the text tokenized so far, which a
 * few single-lane tokens past the segment start find (in text within a token or two; if never,
 * the text is simply tokenized on, single lane, past that segment). */
#define N_LANES 3
#define SEG_PAD 128 /* a segment's last token may end up to 127 bytes past the segment */

#define LANE_VARS(i)                                                                                      \
    Py_ssize_t st##i = 0, end##i = 0, k##i = 0, seg##i = -1;                                              \
    const uint8_t *p##i = src;                                                                            \
    uint32_t s##i = 0, best##i = 0;                                                                       \
    uint64_t c##i = 0;                                                                                    \
    uint16_t *dst##i = tmp

#define LANE_START(i)                                                                                     \
    do {                                                                                                  \
        seg##i = next++;                                                                                  \
        st##i = seg##i * seg;                                                                             \
        end##i = st##i + seg;                                                                             \
        k##i = 0;                                                                                         \
        dst##i = tmp + seg##i * region;                                                                   \
        s##i = root_base + src[st##i];                                                                    \
        c##i = cells[s##i];                                                                               \
        best##i = (uint32_t)(c##i >> 48);                                                                 \
        p##i = src + st##i + 1;                                                                           \
    } while (0)

/* One trie step of lane i; on a miss the token is emitted and the lane starts the next token, or
 * the next segment once it has passed the end of its own. */
#define LANE_STEP(i)                                                                              \
    do {                                                                                                  \
        uint32_t t_ = (uint32_t)(c##i & FIELD) + *p##i;                                                   \
        uint64_t ct_ = cells[t_];                                                                         \
        if ((uint32_t)CHECK(ct_) == s##i) {                                                               \
            uint32_t v_ = (uint32_t)(ct_ >> 48);                                                          \
            s##i = t_;                                                                                    \
            c##i = ct_;                                                                                   \
            p##i++;                                                                                       \
            best##i = v_ ? v_ : best##i;                                                                  \
        } else {                                                                                          \
            dst##i[k##i++] = (uint16_t)best##i;                                                           \
            st##i += len[best##i];                                                                        \
            if (st##i >= end##i) {                                                                        \
                seg_k[seg##i] = k##i;                                                                     \
                seg_q[seg##i] = st##i;                                                                    \
                if (next >= n_multi) {                                                                    \
                    seg##i = -1;                                                                          \
                    goto lanes_done;                                                                      \
                }                                                                                         \
                LANE_START(i);                                                                            \
            } else {                                                                                      \
                s##i = root_base + src[st##i];                                                            \
                c##i = cells[s##i];                                                                       \
                best##i = (uint32_t)(c##i >> 48);                                                         \
                p##i = src + st##i + 1;                                                                   \
            }                                                                                             \
        }                                                                                                 \
    } while (0)

#define LANE_FINISH(i)                                                                                    \
    do {                                                                                                  \
        if (seg##i >= 0) {                                                                                \
            Py_ssize_t kk_ = k##i;                                                                        \
            seg_q[seg##i] = encode_range(self, src, n, st##i, end##i, dst##i, &kk_);                      \
            seg_k[seg##i] = kk_;                                                                          \
        }                                                                                                 \
    } while (0)

Py_ssize_t encode_loop(const Core *self, const uint8_t *src, Py_ssize_t n, uint16_t *out) {
    Py_ssize_t k = 0;
    Py_ssize_t seg = n / (4 * N_LANES);
    seg = seg < 1024 ? 1024 : seg > 16384 ? 16384 : seg;
    Py_ssize_t n_multi = n > 256 ? (n - 256) / seg : 0; /* segments walked by the lanes */
    uint16_t *tmp = NULL;
    Py_ssize_t *seg_k = NULL, *seg_q = NULL;
    if (n_multi >= N_LANES) {
        tmp = malloc(sizeof(uint16_t) * (size_t)((n_multi + 1) * (seg + SEG_PAD) + 256 + 16));
        seg_k = malloc(sizeof(Py_ssize_t) * (size_t)(n_multi + 1));
        seg_q = malloc(sizeof(Py_ssize_t) * (size_t)(n_multi + 1));
    }
    if (!tmp || !seg_k || !seg_q) {
        free(tmp);
        free(seg_k);
        free(seg_q);
        encode_range(self, src, n, 0, n, out, &k);
        return k;
    }
    const uint64_t *cells = self->packed;
    const uint8_t *len = self->len;
    const uint32_t root_base = (uint32_t)(cells[0] & FIELD);
    const Py_ssize_t region = seg + SEG_PAD;
    Py_ssize_t next = 0;
    LANE_VARS(0);
    LANE_VARS(1);
    LANE_VARS(2);
    LANE_START(0);
    LANE_START(1);
    LANE_START(2);
    for (;;) { /* all lanes busy until the segments run out */
        LANE_STEP(0);
        LANE_STEP(1);
        LANE_STEP(2);
    }
lanes_done:
    LANE_FINISH(0);
    LANE_FINISH(1);
    LANE_FINISH(2);
    {
        Py_ssize_t kk = 0;
        seg_q[n_multi] = encode_range(self, src, n, n_multi * seg, n, tmp + n_multi * region, &kk);
        seg_k[n_multi] = kk;
    }
    /* join: ia is where the text tokenized so far ends */
    Py_ssize_t ia = 0;
    for (Py_ssize_t j = 0; j <= n_multi; j++) {
        const uint16_t *t = tmp + j * region;
        Py_ssize_t cnt = seg_k[j], pb = j * seg, jb = 0;
        for (;;) {
            while (pb < ia && jb < cnt) pb += len[t[jb++]];
            if (pb == ia) { /* boundaries meet: the rest of the segment is exact */
                memcpy(out + k, t + jb, sizeof(uint16_t) * (size_t)(cnt - jb));
                k += cnt - jb;
                ia = seg_q[j];
                break;
            }
            if (jb == cnt && pb < ia) break; /* the segment lies behind: nothing to take */
            ia = encode_range(self, src, n, ia, ia + 1, out, &k); /* one more token, single lane */
        }
    }
    free(tmp);
    free(seg_k);
    free(seg_q);
    return k;
}
