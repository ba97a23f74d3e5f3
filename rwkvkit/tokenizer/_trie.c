/* Native core of the RWKV World tokenizer: greedy longest match over a double-array trie.
 *
 * Built as the optional extension ``rwkvkit.tokenizer._native``; ``_pure.py`` is its pure-Python
 * twin with the same results (the test oracle and the fallback when this module is missing).
 *
 * Tables (about 5 MB for the 65 529-token World vocabulary, 116 079 trie nodes):
 *   packed[s]: one 64-bit cell per double-array slot, base (24 bits) | check << 24 | value << 48.
 *              The child of node s on byte c is t = base(s) + c when check(t) == s; value(t) is the
 *              token id ending at t (0 when none). The root is slot 0. Built darts-style from the
 *              sorted keys with separate base/check/value arrays, then packed so that each step of
 *              a walk is one load. 256 spare slots at the end keep base + c inside the array.
 *   blob/span/len: the bytes of every id, for decoding; the blob has 16 spare bytes so short
 *              tokens are copied with one fixed 16-byte move.
 *   cinfo/text1/text2/text4: each id's text pre-decoded at every str width (see _decode.c).
 *   ints: a cached int object per id, so list outputs cost one reference count per token.
 * The encode loop runs without the GIL; outputs are written to C buffers and turned into Python
 * objects (cached int objects for lists, a bytearray for arrays) with the GIL held again.
 * Decoding lives in _decode.c, included below as part of this translation unit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t base;
    int32_t check;
} Cell;

typedef struct {
    PyObject_HEAD
    Cell *cells;
    uint16_t *value;
    Py_ssize_t n_cells; /* allocated, including the 256 spare cells */
    uint8_t *blob;      /* all token bytes, id order, plus 16 spare bytes */
    uint32_t *off;      /* off[id] = start of id's bytes in blob */
    uint32_t *span;     /* off[id] << 8 | len[id]: one load per id when decoding */
    uint8_t *len;       /* len[id] = byte length (0 for id 0 and unused ids) */
    int32_t n_ids;      /* ids are 0 .. n_ids - 1 */
    PyObject **ints;    /* cached int objects for every id */
    Py_ssize_t n_nodes;
    uint64_t *packed;   /* the encode table: base | check << 24 | value << 48, one load per step */
    /* Text of every id that is valid UTF-8 on its own, pre-decoded at each str width, so decoding
     * to str is a copy per token: cinfo[id] = char offset << 16 | class << 8 | n_chars, with class
     * 0 ASCII, 1 Latin-1, 2 UCS-2, 4 UCS-4 and n_chars 0xFF for ids that are not whole text. */
    uint64_t *cinfo;
    Py_UCS1 *text1;
    Py_UCS2 *text2;
    Py_UCS4 *text4;
} Core;

#define FIELD 0xFFFFFFull /* base and check are 24-bit fields of a packed cell */
#define CHECK(c) ((int32_t)(((c) >> 24) & FIELD))

/* ------------------------------------------------------------------------------------------ */
/* Building: darts-style recursive placement over the sorted keys.                             */

typedef struct {
    const uint8_t **keys;
    const uint8_t *klen;
    const uint16_t *kid;
    Core *core;
    Py_ssize_t cap;      /* usable cells (excluding the 256 spare) */
    Py_ssize_t next_check;
    Py_ssize_t max_used;
    int *codes;          /* scratch, 256 per depth (kept off the C stack: depth reaches 129) */
    Py_ssize_t *starts;  /* scratch, 257 per depth */
} Builder;

static int grow(Builder *b, Py_ssize_t need) {
    if (need < b->cap) return 0;
    Py_ssize_t ncap = b->cap;
    while (ncap <= need) ncap *= 2;
    Cell *c = realloc(b->core->cells, (size_t)(ncap + 256) * sizeof(Cell));
    if (!c) return -1;
    b->core->cells = c;
    uint16_t *v = realloc(b->core->value, (size_t)(ncap + 256) * sizeof(uint16_t));
    if (!v) return -1;
    b->core->value = v;
    for (Py_ssize_t i = b->cap + 256; i < ncap + 256; i++) {
        c[i].base = 0;
        c[i].check = -1;
        v[i] = 0;
    }
    b->cap = ncap;
    return 0;
}

/* Place the children of node s, whose keys are sorted keys[lo:hi] sharing `depth` bytes. */
static int place(Builder *b, int32_t s, Py_ssize_t lo, Py_ssize_t hi, int depth) {
    Cell *cells;
    if (lo < hi && b->klen[lo] == depth) { /* the shortest key (first when sorted) ends here */
        b->core->value[s] = b->kid[lo];
        lo++;
    }
    if (lo >= hi) return 0; /* leaf: base 0 is safe, cells 0..255 never have a leaf as parent */
    int *codes = b->codes + 256 * depth;
    Py_ssize_t *starts = b->starts + 257 * depth;
    int n = 0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        int c = b->keys[i][depth];
        if (n == 0 || codes[n - 1] != c) {
            codes[n] = c;
            starts[n] = i;
            n++;
        }
    }
    starts[n] = hi;
    Py_ssize_t pos = (codes[0] + 1 > b->next_check ? codes[0] + 1 : b->next_check) - 1;
    Py_ssize_t nonzero = 0;
    int first = 0;
    Py_ssize_t base;
    for (;;) {
        pos++;
        if (grow(b, pos + 256) < 0) return -1;
        cells = b->core->cells;
        if (cells[pos].check != -1 || pos == 0) {
            nonzero++;
            continue;
        }
        if (!first) {
            b->next_check = pos;
            first = 1;
        }
        base = pos - codes[0];
        if (base < 0) continue;
        int ok = 1;
        for (int k = 1; k < n; k++) {
            if (cells[base + codes[k]].check != -1 || base + codes[k] == 0) {
                ok = 0;
                break;
            }
        }
        if (ok) break;
    }
    if ((double)nonzero / (double)(pos - b->next_check + 1) >= 0.95) b->next_check = pos;
    cells[s].base = (int32_t)base;
    for (int k = 0; k < n; k++) {
        Py_ssize_t t = base + codes[k];
        cells[t].check = s;
        if (t > b->max_used) b->max_used = t;
    }
    b->core->n_nodes += n;
    for (int k = 0; k < n; k++) {
        /* cells may move when grown: index, never keep pointers across the recursion */
        if (place(b, (int32_t)(base + codes[k]), starts[k], starts[k + 1], depth + 1) < 0) return -1;
    }
    return 0;
}

static const uint8_t **g_sort_keys;
static const uint8_t *g_sort_len;

static int cmp_keys(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    int la = g_sort_len[a], lb = g_sort_len[b];
    int m = memcmp(g_sort_keys[a], g_sort_keys[b], (size_t)(la < lb ? la : lb));
    if (m) return m;
    return la - lb;
}

static void core_free_tables(Core *self) {
    free(self->cells);
    free(self->value);
    free(self->packed);
    self->packed = NULL;
    free(self->cinfo);
    free(self->text1);
    free(self->text2);
    free(self->text4);
    self->cinfo = NULL;
    self->text1 = NULL;
    self->text2 = NULL;
    self->text4 = NULL;
    free(self->blob);
    free(self->off);
    free(self->span);
    self->span = NULL;
    free(self->len);
    self->cells = NULL;
    self->value = NULL;
    self->blob = NULL;
    self->off = NULL;
    self->len = NULL;
    if (self->ints) {
        for (int32_t i = 0; i < self->n_ids; i++) Py_XDECREF(self->ints[i]);
        free(self->ints);
        self->ints = NULL;
    }
}

static void Core_dealloc(Core *self) {
    core_free_tables(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define NOT_TEXT 0xFF

/* Fill cinfo/text1/text2/text4 (see Core). */
static int build_text(Core *self) {
    Py_ssize_t total = 0;
    self->cinfo = calloc((size_t)self->n_ids, sizeof(uint64_t));
    if (!self->cinfo) {
        PyErr_NoMemory();
        return -1;
    }
    for (int pass = 0; pass < 2; pass++) {
        Py_ssize_t at = 0;
        for (int32_t id = 1; id < self->n_ids; id++) {
            unsigned l = self->len[id];
            PyObject *u = l ? PyUnicode_DecodeUTF8((const char *)self->blob + self->off[id], l, "strict") : NULL;
            if (!u) {
                PyErr_Clear();
                self->cinfo[id] = NOT_TEXT;
                continue;
            }
            Py_ssize_t n = PyUnicode_GET_LENGTH(u);
            int kind = PyUnicode_KIND(u);
            unsigned cls = PyUnicode_IS_ASCII(u) ? 0 : (unsigned)kind;
            if (pass == 1) {
                self->cinfo[id] = (uint64_t)at << 16 | (uint64_t)cls << 8 | (uint64_t)n;
                for (Py_ssize_t k = 0; k < n; k++) {
                    Py_UCS4 ch = PyUnicode_READ(kind, PyUnicode_DATA(u), k);
                    self->text4[at + k] = ch;
                    self->text2[at + k] = (Py_UCS2)(ch <= 0xFFFF ? ch : 0);
                    self->text1[at + k] = (Py_UCS1)(ch <= 0xFF ? ch : 0);
                }
            }
            at += n;
            Py_DECREF(u);
        }
        if (pass == 0) {
            total = at + 16; /* 16 spare characters for fixed-size copies */
            self->text1 = calloc((size_t)total, sizeof(Py_UCS1));
            self->text2 = calloc((size_t)total, sizeof(Py_UCS2));
            self->text4 = calloc((size_t)total, sizeof(Py_UCS4));
            if (!self->text1 || !self->text2 || !self->text4) {
                PyErr_NoMemory();
                return -1;
            }
        }
    }
    return 0;
}

/* Core(tokens): tokens[i] is the bytes of id i; tokens[0] must be b"" (end-of-document). */
static int Core_init(Core *self, PyObject *args, PyObject *kw) {
    PyObject *seq;
    static char *kwlist[] = {"tokens", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:Core", kwlist, &seq)) return -1;
    core_free_tables(self);
    PyObject *fast = PySequence_Fast(seq, "Core(tokens): tokens must be a sequence of bytes");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 257 || n > 65536) {
        PyErr_Format(PyExc_ValueError, "Core(tokens): need 257..65536 entries (ids 0..255 and the bytes), got %zd", n);
        Py_DECREF(fast);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "Core(tokens): entry %zd is not bytes", i);
            Py_DECREF(fast);
            return -1;
        }
        Py_ssize_t l = PyBytes_GET_SIZE(items[i]);
        if (l > 255 || (i == 0 && l != 0)) {
            PyErr_Format(PyExc_ValueError, "Core(tokens): entry %zd has length %zd (id 0 must be empty, others <= 255)", i, l);
            Py_DECREF(fast);
            return -1;
        }
        total += (size_t)l;
    }
    self->n_ids = (int32_t)n;
    self->blob = malloc(total + 16);
    self->off = malloc(sizeof(uint32_t) * (size_t)n);
    self->len = malloc((size_t)n);
    self->span = malloc(sizeof(uint32_t) * (size_t)n);
    self->ints = calloc((size_t)n, sizeof(PyObject *));
    int *order = malloc(sizeof(int) * (size_t)n);
    const uint8_t **keys = malloc(sizeof(uint8_t *) * (size_t)n);
    uint8_t *klen = malloc((size_t)n);
    uint16_t *kid = malloc(sizeof(uint16_t) * (size_t)n);
    const uint8_t **skeys = malloc(sizeof(uint8_t *) * (size_t)n);
    if (!self->blob || !self->off || !self->span || !self->len || !self->ints || !order || !keys || !klen || !kid || !skeys) {
        PyErr_NoMemory();
        goto fail;
    }
    memset(self->blob + total, 0, 16);
    size_t o = 0;
    Py_ssize_t nk = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t l = PyBytes_GET_SIZE(items[i]);
        memcpy(self->blob + o, PyBytes_AS_STRING(items[i]), (size_t)l);
        self->off[i] = (uint32_t)o;
        self->len[i] = (uint8_t)l;
        self->span[i] = (uint32_t)o << 8 | (uint32_t)l; /* o < 65536 * 256 */
        o += (size_t)l;
        self->ints[i] = PyLong_FromSsize_t(i);
        if (!self->ints[i]) goto fail;
        keys[i] = self->blob + self->off[i];
        if (l > 0) order[nk++] = (int)i;
    }
    /* Every single byte must be a token, or some input could not be encoded. */
    g_sort_keys = keys;
    g_sort_len = self->len;
    qsort(order, (size_t)nk, sizeof(int), cmp_keys);
    for (Py_ssize_t k = 0; k < nk; k++) {
        int id = order[k];
        skeys[k] = keys[id];
        klen[k] = self->len[id];
        kid[k] = (uint16_t)id;
        if (k > 0 && klen[k] == klen[k - 1] && memcmp(skeys[k], skeys[k - 1], klen[k]) == 0) {
            PyErr_Format(PyExc_ValueError, "Core(tokens): ids %d and %d have the same bytes", (int)kid[k - 1], id);
            goto fail;
        }
    }
    Builder b = {skeys, klen, kid, self, 1024, 0, 0, NULL, NULL};
    b.codes = malloc(sizeof(int) * 256 * 257);
    b.starts = malloc(sizeof(Py_ssize_t) * 257 * 257);
    if (!b.codes || !b.starts) {
        free(b.codes);
        free(b.starts);
        PyErr_NoMemory();
        goto fail;
    }
    self->cells = malloc((size_t)(b.cap + 256) * sizeof(Cell));
    self->value = malloc((size_t)(b.cap + 256) * sizeof(uint16_t));
    if (!self->cells || !self->value) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < b.cap + 256; i++) {
        self->cells[i].base = 0;
        self->cells[i].check = -1;
        self->value[i] = 0;
    }
    self->cells[0].check = -2; /* the root is used, parent of nobody */
    self->n_nodes = 1;
    int placed = place(&b, 0, 0, nk, 0);
    free(b.codes);
    free(b.starts);
    if (placed < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    for (int c = 0; c < 256; c++) {
        Py_ssize_t t = self->cells[0].base + c;
        if (self->cells[t].check != 0 || self->value[t] == 0) {
            PyErr_Format(PyExc_ValueError, "Core(tokens): the single byte 0x%02x is not a token", c);
            goto fail;
        }
    }
    /* shrink to the used part plus the 256 spare cells */
    self->n_cells = b.max_used + 1 + 256;
    if (self->n_cells < b.cap + 256) {
        Cell *c = realloc(self->cells, (size_t)self->n_cells * sizeof(Cell));
        uint16_t *v = realloc(self->value, (size_t)self->n_cells * sizeof(uint16_t));
        if (c) self->cells = c;
        if (v) self->value = v;
        for (Py_ssize_t i = b.max_used + 1; i < self->n_cells; i++) {
            self->cells[i].check = -1;
            self->value[i] = 0;
        }
    }
    if (self->n_cells >= (Py_ssize_t)FIELD - 2) {
        PyErr_Format(PyExc_ValueError, "Core(tokens): the trie needs %zd cells, more than this core supports",
                     self->n_cells);
        goto fail;
    }
    self->packed = malloc(sizeof(uint64_t) * (size_t)self->n_cells);
    if (!self->packed) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < self->n_cells; i++) {
        uint64_t check = (uint64_t)(uint32_t)self->cells[i].check & FIELD; /* -1 -> FIELD, -2 -> FIELD-1 */
        self->packed[i] = (uint64_t)(uint32_t)self->cells[i].base | check << 24 | (uint64_t)self->value[i] << 48;
    }
    free(self->cells);
    free(self->value);
    self->cells = NULL;
    self->value = NULL;
    if (build_text(self) < 0) goto fail;
    free(order);
    free(keys);
    free(klen);
    free(kid);
    free(skeys);
    Py_DECREF(fast);
    return 0;
fail:
    free(order);
    free(keys);
    free(klen);
    free(kid);
    free(skeys);
    core_free_tables(self);
    Py_DECREF(fast);
    return -1;
}

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

static Py_ssize_t encode_loop(const Core *self, const uint8_t *src, Py_ssize_t n, uint16_t *out) {
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

/* The UTF-8 bytes of an encode() argument. ASCII str and bytes-like objects are read in place;
 * any other str is converted by ucs_to_utf8 into a buffer of our own, without the GIL (so the
 * threads of a batch convert in parallel) and without CPython's habit of caching a UTF-8 copy
 * inside the str for its whole life. */
typedef struct {
    Py_buffer view;
    int has_view;
    PyObject *str;      /* borrowed: a non-ASCII str still to convert */
    uint8_t *owned;     /* our UTF-8 copy of it */
    int bad;            /* it holds a lone surrogate */
    const uint8_t *data;
    Py_ssize_t n;       /* byte count (before conversion: an upper bound) */
} Source;

/* str data of one kind -> UTF-8 at o (4 spare bytes needed); returns the byte count, or -1 when
 * the text holds a lone surrogate. Runs of 4 ASCII characters are copied directly; any other
 * character is encoded without branching on its length (mixed scripts defeat branch prediction). */
static Py_ssize_t ucs_to_utf8(int kind, const void *data, Py_ssize_t len, uint8_t *o) {
    uint8_t *o0 = o;
    Py_ssize_t i = 0;
    uint32_t bad = 0;
#define CONVERT(T)                                                                                        \
    do {                                                                                                  \
        const T *u = (const T *)data;                                                                     \
        while (i < len) {                                                                                 \
            if (i + 4 <= len && (u[i] | u[i + 1] | u[i + 2] | u[i + 3]) < 0x80) { /* ASCII run */        \
                o[0] = (uint8_t)u[i];                                                                     \
                o[1] = (uint8_t)u[i + 1];                                                                 \
                o[2] = (uint8_t)u[i + 2];                                                                 \
                o[3] = (uint8_t)u[i + 3];                                                                 \
                o += 4;                                                                                   \
                i += 4;                                                                                   \
                continue;                                                                                 \
            }                                                                                             \
            uint32_t c = u[i++];                                                                          \
            unsigned L = 1u + (c >= 0x80) + (c >= 0x800) + (c >= 0x10000);                                \
            uint32_t w1 = c;                                                                              \
            uint32_t w2 = (0xC0 | c >> 6) | (0x80 | (c & 0x3F)) << 8;                                     \
            uint32_t w3 = (0xE0 | c >> 12) | (0x80 | ((c >> 6) & 0x3F)) << 8 | (0x80 | (c & 0x3F)) << 16; \
            uint32_t w4 = (0xF0 | c >> 18) | (0x80 | ((c >> 12) & 0x3F)) << 8 |                           \
                          (0x80 | ((c >> 6) & 0x3F)) << 16 | (0x80u | (c & 0x3F)) << 24;                   \
            uint32_t w = L == 1 ? w1 : L == 2 ? w2 : L == 3 ? w3 : w4;                                    \
            bad |= (c & 0xFFFFF800u) == 0xD800u;                                                          \
            memcpy(o, &w, 4); /* little-endian; the buffer has 4 spare bytes */                           \
            o += L;                                                                                       \
        }                                                                                                 \
    } while (0)
    if (kind == PyUnicode_1BYTE_KIND)
        CONVERT(Py_UCS1);
    else if (kind == PyUnicode_2BYTE_KIND)
        CONVERT(Py_UCS2);
    else
        CONVERT(Py_UCS4);
#undef CONVERT
    return bad ? -1 : o - o0;
}

static int source_open(PyObject *obj, Source *src) {
    src->has_view = 0;
    src->str = NULL;
    src->owned = NULL;
    src->bad = 0;
    if (PyUnicode_Check(obj)) {
        if (PyUnicode_IS_ASCII(obj)) {
            src->data = PyUnicode_DATA(obj);
            src->n = PyUnicode_GET_LENGTH(obj);
            return 0;
        }
        int kind = PyUnicode_KIND(obj);
        src->str = obj;
        src->data = NULL;
        src->n = PyUnicode_GET_LENGTH(obj) * (kind == PyUnicode_1BYTE_KIND ? 2 : kind == PyUnicode_2BYTE_KIND ? 3 : 4);
        return 0;
    }
    if (PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        if (PyObject_GetBuffer(obj, &src->view, PyBUF_SIMPLE) < 0) return -1;
        src->has_view = 1;
        src->data = src->view.buf;
        src->n = src->view.len;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "encode() takes str or bytes, not %.100s", Py_TYPE(obj)->tp_name);
    return -1;
}

/* Without the GIL: convert a non-ASCII str (sets bad, or returns -1 when out of memory). */
static int source_prepare(Source *src) {
    if (!src->str) return 0;
    src->owned = malloc((size_t)src->n + 4);
    if (!src->owned) return -1;
    Py_ssize_t n = ucs_to_utf8(PyUnicode_KIND(src->str), PyUnicode_DATA(src->str), PyUnicode_GET_LENGTH(src->str),
                               src->owned);
    src->bad = n < 0;
    src->n = n < 0 ? 0 : n;
    src->data = src->owned;
    return 0;
}

/* With the GIL, after source_prepare: raise the error it found, if any. */
static int source_check(Source *src, int prepared) {
    if (prepared < 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (src->bad) {
        PyObject *b = PyUnicode_AsUTF8String(src->str); /* raises CPython's UnicodeEncodeError */
        if (b) {
            Py_DECREF(b);
            PyErr_SetString(PyExc_UnicodeError, "text could not be converted to UTF-8");
        }
        return -1;
    }
    return 0;
}

static void source_close(Source *src) {
    if (src->has_view) PyBuffer_Release(&src->view);
    free(src->owned);
    src->owned = NULL;
}

static PyObject *ids_to_list(Core *self, const uint16_t *buf, Py_ssize_t k) {
    PyObject *list = PyList_New(k);
    if (!list) return NULL;
    PyObject **ints = self->ints;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *v = ints[buf[i]];
        Py_INCREF(v);
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static PyObject *ids_to_bytearray(const uint16_t *buf, Py_ssize_t k, int itemsize) {
    PyObject *out = PyByteArray_FromStringAndSize(NULL, k * itemsize);
    if (!out) return NULL;
    char *dst = PyByteArray_AS_STRING(out);
    if (itemsize == 2) {
        if (k) memcpy(dst, buf, (size_t)k * 2);
    } else if (itemsize == 4) {
        uint32_t *d = (uint32_t *)dst;
        for (Py_ssize_t i = 0; i < k; i++) d[i] = buf[i];
    } else {
        uint64_t *d = (uint64_t *)dst;
        for (Py_ssize_t i = 0; i < k; i++) d[i] = buf[i];
    }
    return out;
}

/* Convert (if needed) and encode into a malloc'ed uint16 buffer, sized once the UTF-8 length is
 * known (every token has >= 1 byte). Returns -1 when out of memory. */
static int prepare_and_encode(Core *self, Source *src, uint16_t **out, Py_ssize_t *count) {
    if (source_prepare(src) < 0) return -1;
    *count = 0;
    *out = malloc(sizeof(uint16_t) * (size_t)(src->n > 0 ? src->n : 1));
    if (!*out) return -1;
    if (!src->bad) *count = encode_loop(self, src->data, src->n, *out);
    return 0;
}

/* Encode into a malloc'ed uint16 buffer; *count gets the number of ids. */
static uint16_t *encode_to_buffer(Core *self, PyObject *obj, Py_ssize_t *count) {
    Source src;
    if (source_open(obj, &src) < 0) return NULL;
    uint16_t *out = NULL;
    int rc;
    if (src.n > 4096) {
        Py_BEGIN_ALLOW_THREADS
        rc = prepare_and_encode(self, &src, &out, count);
        Py_END_ALLOW_THREADS
    } else {
        rc = prepare_and_encode(self, &src, &out, count);
    }
    if (source_check(&src, rc) < 0) {
        source_close(&src);
        free(out);
        return NULL;
    }
    source_close(&src);
    return out;
}

static PyObject *Core_encode(Core *self, PyObject *obj) {
    Py_ssize_t k;
    uint16_t *buf = encode_to_buffer(self, obj, &k);
    if (!buf) return NULL;
    PyObject *list = ids_to_list(self, buf, k);
    free(buf);
    return list;
}

/* encode_raw(text, itemsize) -> bytearray of native-endian unsigned ids, itemsize 2, 4 or 8. */
static PyObject *Core_encode_raw(Core *self, PyObject *args) {
    PyObject *obj;
    int itemsize;
    if (!PyArg_ParseTuple(args, "Oi:encode_raw", &obj, &itemsize)) return NULL;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "encode_raw: itemsize must be 2, 4 or 8, not %d", itemsize);
        return NULL;
    }
    Py_ssize_t k;
    uint16_t *buf = encode_to_buffer(self, obj, &k);
    if (!buf) return NULL;
    PyObject *out = ids_to_bytearray(buf, k, itemsize);
    free(buf);
    return out;
}

/* encode_batch(list_of_texts, itemsize) -> list of lists (itemsize 0) or of bytearrays.
 * The whole batch is encoded in one stretch without the GIL, so threads that each take a slice
 * of a batch run in parallel even when the documents are short. */
static PyObject *Core_encode_batch(Core *self, PyObject *args) {
    PyObject *seq;
    int itemsize;
    if (!PyArg_ParseTuple(args, "O!i:encode_batch", &PyList_Type, &seq, &itemsize)) return NULL;
    if (itemsize != 0 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "encode_batch: itemsize must be 0, 2, 4 or 8, not %d", itemsize);
        return NULL;
    }
    /* hold our own references: the list may change while the GIL is released */
    PyObject *items = PySequence_Tuple(seq);
    if (!items) return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(items);
    Source *srcs = calloc((size_t)(m ? m : 1), sizeof(Source));
    Py_ssize_t *starts = malloc(sizeof(Py_ssize_t) * (size_t)(m + 1));
    Py_ssize_t *counts = malloc(sizeof(Py_ssize_t) * (size_t)(m ? m : 1));
    uint16_t *out = NULL;
    PyObject *result = NULL;
    Py_ssize_t opened = 0, total = 0;
    if (!srcs || !starts || !counts) {
        PyErr_NoMemory();
        goto done;
    }
    for (; opened < m; opened++) {
        if (source_open(PyTuple_GET_ITEM(items, opened), &srcs[opened]) < 0) goto done;
        starts[opened] = total;
        total += srcs[opened].n;
    }
    out = malloc(sizeof(uint16_t) * (size_t)(total ? total : 1));
    if (!out) {
        PyErr_NoMemory();
        goto done;
    }
    int prepared = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m && prepared == 0; i++) {
        prepared = source_prepare(&srcs[i]);
        counts[i] = prepared == 0 && !srcs[i].bad ? encode_loop(self, srcs[i].data, srcs[i].n, out + starts[i]) : 0;
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m; i++)
        if (source_check(&srcs[i], prepared) < 0) goto done;
    result = PyList_New(m);
    if (!result) goto done;
    for (Py_ssize_t i = 0; i < m; i++) {
        PyObject *r = itemsize ? ids_to_bytearray(out + starts[i], counts[i], itemsize)
                               : ids_to_list(self, out + starts[i], counts[i]);
        if (!r) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, r);
    }
done:
    for (Py_ssize_t i = 0; i < opened; i++) source_close(&srcs[i]);
    free(srcs);
    free(starts);
    free(counts);
    free(out);
    Py_DECREF(items);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding: Core_decode_bytes, Core_decode.                                                   */

#include "_decode.c"

static PyObject *Core_stats(Core *self, PyObject *Py_UNUSED(ignored)) {
    size_t blob = self->n_ids ? self->off[self->n_ids - 1] + self->len[self->n_ids - 1] + 16 : 0;
    size_t table = (size_t)self->n_cells * sizeof(uint64_t);
    size_t ids = (size_t)self->n_ids * (2 * sizeof(uint32_t) + 1 + sizeof(uint64_t) + sizeof(PyObject *));
    Py_ssize_t n_chars = 0;
    for (int32_t id = 0; id < self->n_ids; id++)
        if ((self->cinfo[id] & 0xFF) != NOT_TEXT) n_chars += (Py_ssize_t)(self->cinfo[id] & 0xFF);
    table += (size_t)(n_chars + 16) * (sizeof(Py_UCS1) + sizeof(Py_UCS2) + sizeof(Py_UCS4));
    return Py_BuildValue("{s:n,s:n,s:n,s:n}", "nodes", self->n_nodes, "cells", self->n_cells, "table_bytes",
                         (Py_ssize_t)(table + blob + ids), "n_ids", (Py_ssize_t)self->n_ids);
}

static PyMethodDef Core_methods[] = {
    {"encode", (PyCFunction)Core_encode, METH_O, "encode(text_or_bytes) -> list[int]"},
    {"encode_raw", (PyCFunction)Core_encode_raw, METH_VARARGS,
     "encode_raw(text_or_bytes, itemsize) -> bytearray of native unsigned ids"},
    {"encode_batch", (PyCFunction)Core_encode_batch, METH_VARARGS,
     "encode_batch(list, itemsize) -> list of lists (itemsize 0) or bytearrays; GIL released once"},
    {"decode_bytes", (PyCFunction)Core_decode_bytes, METH_VARARGS, "decode_bytes(ids, errors='strict') -> bytes"},
    {"decode", (PyCFunction)Core_decode, METH_VARARGS, "decode(ids, errors='replace') -> str"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "table sizes"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rwkvkit.tokenizer._native.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Double-array trie for greedy longest-match tokenization (see _trie.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "Native core of the RWKV World tokenizer.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
