/* Native core of the RWKV World tokenizer: greedy longest match over a double-array trie.
 *
 * Built as the optional extension ``rwkvkit.tokenizer._native``; ``_pure.py`` is its pure-Python
 * twin with the same results (the test oracle and the fallback when this module is missing).
 *
 * Tables (about 1.3 MB for the 65 529-token World vocabulary):
 *   cells[s] = {base, check}: the child of node s on byte c is t = base[s] + c when check[t] == s.
 *              The root is node 0; empty cells have check == -1. Every base is >= 0 and the arrays
 *              carry 256 spare cells at the end, so base + c never leaves them (no bounds test).
 *   value[s] = the token id that ends at node s (0 when none; id 0 is end-of-document, no bytes).
 *   blob/off/len: the bytes of every id for decoding; the blob has 16 spare bytes so short tokens
 *              are copied with one fixed 16-byte move.
 * The encode loop runs without the GIL; outputs are written to C buffers and turned into Python
 * objects (cached int objects for lists, a bytearray for arrays) with the GIL held again.
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

/* Greedy longest match of src[0:n] into out (capacity n: every token has >= 1 byte).
 * A walk ends by itself within 129 steps (a node at depth 128 is a leaf, and a leaf's base 0 leads
 * to cells 0..255 whose parent is never a leaf), so far from the end no bounds test is needed. */
static Py_ssize_t encode_loop(const Core *self, const uint8_t *src, Py_ssize_t n, uint16_t *out) {
    const uint64_t *cells = self->packed;
    const uint8_t *len = self->len;
    const uint32_t root_base = (uint32_t)(cells[0] & FIELD);
    Py_ssize_t i = 0, k = 0;
    while (i + 130 <= n) {
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
        out[k++] = (uint16_t)best;
        i += len[best];
    }
    while (i < n) {
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
        out[k++] = (uint16_t)best;
        i += len[best];
    }
    return k;
}

typedef struct {
    PyObject *bytes_obj; /* a new reference to the UTF-8 source when we had to make one */
    Py_buffer view;
    int has_view;
    const uint8_t *data;
    Py_ssize_t n;
} Source;

static int source_open(PyObject *obj, Source *src) {
    src->bytes_obj = NULL;
    src->has_view = 0;
    if (PyUnicode_Check(obj)) {
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (!p) return -1; /* UnicodeEncodeError for lone surrogates */
        src->data = (const uint8_t *)p;
        src->n = n;
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

static void source_close(Source *src) {
    if (src->has_view) PyBuffer_Release(&src->view);
    Py_XDECREF(src->bytes_obj);
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

/* Encode into a malloc'ed uint16 buffer; *count gets the number of ids. */
static uint16_t *encode_to_buffer(Core *self, PyObject *obj, Py_ssize_t *count) {
    Source src;
    if (source_open(obj, &src) < 0) return NULL;
    uint16_t *out = malloc(sizeof(uint16_t) * (size_t)(src.n > 0 ? src.n : 1));
    if (!out) {
        source_close(&src);
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t k;
    if (src.n > 4096) {
        Py_BEGIN_ALLOW_THREADS
        k = encode_loop(self, src.data, src.n, out);
        Py_END_ALLOW_THREADS
    } else {
        k = encode_loop(self, src.data, src.n, out);
    }
    source_close(&src);
    *count = k;
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
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m; i++) counts[i] = encode_loop(self, srcs[i].data, srcs[i].n, out + starts[i]);
    Py_END_ALLOW_THREADS
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
/* Decoding.                                                                                    */

#define MODE_STRICT 0
#define MODE_REPLACE 1 /* unknown ids become U+FFFD (EF BF BD) */

static int bad_id(long long id, Py_ssize_t pos, int32_t n_ids) {
    PyErr_Format(PyExc_ValueError, "token id %lld at position %zd is outside the vocabulary (0..%d)", id, pos,
                 (int)n_ids - 1);
    return -1;
}

typedef struct {
    uint8_t *p;
    Py_ssize_t n, cap;
} OutBuf;

static int out_reserve(OutBuf *o, Py_ssize_t extra) {
    if (o->n + extra <= o->cap) return 0;
    Py_ssize_t nc = o->cap * 2 + extra;
    uint8_t *p = realloc(o->p, (size_t)nc);
    if (!p) return -1;
    o->p = p;
    o->cap = nc;
    return 0;
}

static inline int put_id(const Core *self, OutBuf *o, long long id, Py_ssize_t pos, int mode) {
    uint32_t sp = (unsigned long long)id < (unsigned long long)self->n_ids ? self->span[id] : 0;
    unsigned l = sp & 0xFF;
    if (l == 0) { /* id 0, an unused id, or out of range */
        if (id == 0) return 0; /* end-of-document: no bytes */
        if (mode == MODE_STRICT) return bad_id(id, pos, self->n_ids);
        if (out_reserve(o, 3) < 0) return -1;
        memcpy(o->p + o->n, "\xef\xbf\xbd", 3);
        o->n += 3;
        return 0;
    }
    const uint8_t *src = self->blob + (sp >> 8);
    if (o->n + 16 > o->cap || l > 16) {
        if (out_reserve(o, l + 16) < 0) return -1;
        memcpy(o->p + o->n, src, l);
    } else {
        memcpy(o->p + o->n, src, 16); /* fixed-size copy: the blob has 16 spare bytes */
    }
    o->n += l;
    return 0;
}

/* The value of an exact int that fits one digit, without a call (most token ids). */
static inline int small_int(PyObject *o, long long *out) {
    if (!PyLong_CheckExact(o)) return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o)) return 0;
    *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)o);
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size == 0 || size == 1) {
        *out = size ? (long long)((PyLongObject *)o)->ob_digit[0] : 0;
        return 1;
    }
    return 0;
#endif
}

static int decode_into(Core *self, PyObject *ids, int mode, OutBuf *o) {
    o->n = 0;
    o->cap = 64;
    o->p = malloc(64);
    if (!o->p) return -1;
    if (PyList_Check(ids) || PyTuple_Check(ids)) {
        if (out_reserve(o, PySequence_Fast_GET_SIZE(ids) * 4 + 32) < 0) return -1;
        /* size and items re-read every step: __index__ of a non-int item may run Python code */
        Py_ssize_t i = 0;
        while (i < PySequence_Fast_GET_SIZE(ids)) {
            /* fast run: exact small ints of tokens <= 16 bytes, state in locals (no aliasing through o) */
            PyObject **items = PySequence_Fast_ITEMS(ids);
            Py_ssize_t n = PySequence_Fast_GET_SIZE(ids), pos = o->n, stop = o->cap - 16;
            uint8_t *dst = o->p;
            const uint32_t *span = self->span;
            const uint8_t *blob = self->blob;
            const unsigned long long n_ids = (unsigned long long)self->n_ids;
            for (; i < n && pos <= stop; i++) {
                long long v;
                if (!small_int(items[i], &v) || (unsigned long long)v >= n_ids) break;
                uint32_t sp = span[v];
                unsigned l = sp & 0xFF;
                if (l == 0 || l > 16) break;
                memcpy(dst + pos, blob + (sp >> 8), 16);
                pos += l;
            }
            o->n = pos;
            if (i >= n) break;
            PyObject *item = items[i];
            long long id;
            if (small_int(item, &id)) {
                if (put_id(self, o, id, i, mode) < 0) return -1;
                i++;
                continue;
            }
            if (PyLong_Check(item)) {
                id = PyLong_AsLongLong(item);
            } else {
                Py_INCREF(item);
                PyObject *ix = PyNumber_Index(item);
                if (!ix) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_TypeError, "token ids must be ints; item %zd is %.100s", i,
                                 Py_TYPE(item)->tp_name);
                    Py_DECREF(item);
                    return -1;
                }
                Py_DECREF(item);
                id = PyLong_AsLongLong(ix);
                Py_DECREF(ix);
            }
            if (id == -1 && PyErr_Occurred()) {
                PyErr_Clear(); /* OverflowError: out of range either way */
                id = -1;
            }
            if (put_id(self, o, id, i, mode) < 0) return -1;
            i++;
        }
        return 0;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(ids, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "token ids must be a list, tuple or 1-D integer array, not %.100s",
                     Py_TYPE(ids)->tp_name);
        return -1;
    }
    const char *f = v.format ? v.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    char fc = *f;
    int sgn;
    if (f[0] && f[1]) fc = 0;
    switch (fc) {
    case 'b': case 'h': case 'i': case 'l': case 'q': sgn = 1; break;
    case 'B': case 'H': case 'I': case 'L': case 'Q': sgn = 0; break;
    default:
        PyErr_Format(PyExc_TypeError, "token id arrays must hold integers, not format '%s'", v.format);
        PyBuffer_Release(&v);
        return -1;
    }
    Py_ssize_t n = v.len / v.itemsize;
    int rc = out_reserve(o, n * 4 + 32);
    Py_ssize_t i = 0;
    while (rc == 0 && i < n) {
        /* fast run over tokens <= 16 bytes with the state in locals, per element type */
        Py_ssize_t pos = o->n, stop = o->cap - 16;
        uint8_t *dst = o->p;
        const uint32_t *span = self->span;
        const uint8_t *blob = self->blob;
        const unsigned long long n_ids = (unsigned long long)self->n_ids;
#define FAST_RUN(T)                                                                                       \
    for (; i < n && pos <= stop; i++) {                                                                   \
        unsigned long long u = (unsigned long long)(long long)((const T *)v.buf)[i];                     \
        if (u >= n_ids) break;                                                                            \
        uint32_t sp = span[u];                                                                            \
        unsigned l = sp & 0xFF;                                                                           \
        if (l == 0 || l > 16) break;                                                                      \
        memcpy(dst + pos, blob + (sp >> 8), 16);                                                          \
        pos += l;                                                                                         \
    }
        switch (v.itemsize * (sgn ? -1 : 1)) {
        case 2: FAST_RUN(uint16_t) break;
        case -2: FAST_RUN(int16_t) break;
        case 4: FAST_RUN(uint32_t) break;
        case -4: FAST_RUN(int32_t) break;
        case -8: FAST_RUN(int64_t) break;
        default: break;
        }
#undef FAST_RUN
        o->n = pos;
        if (i >= n) break;
        long long id;
        const char *p = (const char *)v.buf + i * v.itemsize;
        switch (v.itemsize) {
        case 1: id = sgn ? *(const int8_t *)p : *(const uint8_t *)p; break;
        case 2: id = sgn ? *(const int16_t *)p : *(const uint16_t *)p; break;
        case 4: id = sgn ? (long long)*(const int32_t *)p : (long long)*(const uint32_t *)p; break;
        default: {
            uint64_t u = *(const uint64_t *)p;
            id = (!sgn && u > (uint64_t)INT64_MAX) ? -1 : (long long)u;
        }
        }
        rc = put_id(self, o, id, i, mode);
        i++;
    }
    PyBuffer_Release(&v);
    return rc;
}

static int parse_mode(const char *errors) {
    if (strcmp(errors, "strict") == 0) return MODE_STRICT;
    if (strcmp(errors, "replace") == 0) return MODE_REPLACE;
    PyErr_Format(PyExc_ValueError, "errors must be 'strict' or 'replace', not '%s'", errors);
    return -1;
}

/* decode_bytes(ids, errors) -> bytes */
static PyObject *Core_decode_bytes(Core *self, PyObject *args) {
    PyObject *ids;
    const char *errors = "strict";
    if (!PyArg_ParseTuple(args, "O|s:decode_bytes", &ids, &errors)) return NULL;
    int mode = parse_mode(errors);
    if (mode < 0) return NULL;
    OutBuf o = {NULL, 0, 0};
    if (decode_into(self, ids, mode, &o) < 0) {
        free(o.p);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    PyObject *r = PyBytes_FromStringAndSize((const char *)o.p, o.n);
    free(o.p);
    return r;
}

/* Ids as a malloc'ed uint16 buffer. Returns 1 when every id is a plain int inside the vocabulary,
 * 0 when some is not (or ids is not a list, tuple or integer buffer: the byte path then reports
 * it), -1 on a memory error. */
static int ids_u16(const Core *self, PyObject *ids, uint16_t **out, Py_ssize_t *count) {
    const unsigned long long n_ids = (unsigned long long)self->n_ids;
    uint16_t *buf;
    if (PyList_Check(ids) || PyTuple_Check(ids)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
        PyObject **items = PySequence_Fast_ITEMS(ids);
        buf = malloc(sizeof(uint16_t) * (size_t)(n ? n : 1));
        if (!buf) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            long long v;
            if (!small_int(items[i], &v) || (unsigned long long)v >= n_ids) {
                free(buf);
                return 0;
            }
            buf[i] = (uint16_t)v;
        }
        *out = buf;
        *count = n;
        return 1;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(ids, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    const char *f = v.format ? v.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int code = (f[0] && !f[1]) ? f[0] : 0;
    Py_ssize_t n = v.itemsize > 0 ? v.len / v.itemsize : 0;
    buf = malloc(sizeof(uint16_t) * (size_t)(n ? n : 1));
    if (!buf) {
        PyBuffer_Release(&v);
        PyErr_NoMemory();
        return -1;
    }
    int ok = 1;
#define TO_U16(T)                                                                                         \
    for (Py_ssize_t i = 0; i < n; i++) {                                                                  \
        unsigned long long u = (unsigned long long)(long long)((const T *)v.buf)[i];                     \
        if (u >= n_ids) {                                                                                 \
            ok = 0;                                                                                       \
            break;                                                                                        \
        }                                                                                                 \
        buf[i] = (uint16_t)u;                                                                             \
    }
    if (code == 'H' && v.itemsize == 2) {
        TO_U16(uint16_t)
    } else if ((code == 'i' || code == 'l') && v.itemsize == 4) {
        TO_U16(int32_t)
    } else if ((code == 'I' || code == 'L') && v.itemsize == 4) {
        TO_U16(uint32_t)
    } else if ((code == 'l' || code == 'q') && v.itemsize == 8) {
        TO_U16(int64_t)
    } else {
        ok = 0;
    }
#undef TO_U16
    PyBuffer_Release(&v);
    if (!ok) {
        free(buf);
        return 0;
    }
    *out = buf;
    *count = n;
    return 1;
}

/* A maximal run of ids that are not whole text (bytes of split characters), decoded on its own:
 * both ends of such a run are character boundaries, so when its bytes are valid UTF-8 its
 * characters are exactly those of the same bytes inside the whole text. */
typedef struct {
    Py_ssize_t start, end;
    PyObject *text;
} Run;

static void free_runs(Run *runs, Py_ssize_t n_runs) {
    for (Py_ssize_t k = 0; k < n_runs; k++) Py_XDECREF(runs[k].text);
    free(runs);
}

/* str of ids in the vocabulary: one copy per token from the pre-decoded tables, into a str
 * allocated once at its final width. Sets *done = 0 and returns NULL when the ids need the byte
 * path instead (an id outside the vocabulary, a non-int, or bytes that are not valid UTF-8). */
static PyObject *text_decode(const Core *self, PyObject *ids, int *done) {
    uint16_t *buf;
    Py_ssize_t n, n_runs = 0, cap_runs = 0;
    Run *runs = NULL;
    *done = 1;
    int r = ids_u16(self, ids, &buf, &n);
    if (r < 0) return NULL;
    *done = 0;
    if (r == 0) return NULL;
    const uint64_t *ci = self->cinfo;
    Py_ssize_t total = 0;
    unsigned cls = 0, any_bytes = 0;
    for (Py_ssize_t i = 0; i < n; i++) { /* tight first pass: state in registers */
        uint64_t c = ci[buf[i]];
        unsigned nc = (unsigned)(c & 0xFF);
        any_bytes |= nc == NOT_TEXT;
        total += nc == NOT_TEXT ? 0 : nc;
        cls |= (unsigned)(c >> 8) & 0xFF;
    }
    if (!(cls & 6) && !any_bytes) goto fallback; /* ASCII/Latin-1 text: CPython's decoder is faster */
    for (Py_ssize_t i = 0; any_bytes && i < n; i++) { /* runs of ids that are not whole text */
        uint64_t c = ci[buf[i]];
        if ((c & 0xFF) != NOT_TEXT) continue;
        Py_ssize_t j = i, nbytes = 0;
        while (j < n && (ci[buf[j]] & 0xFF) == NOT_TEXT) {
            if (!self->len[buf[j]]) goto fallback; /* an unused id: the byte path reports or replaces it */
            nbytes += self->len[buf[j++]];
        }
        char *bytes = malloc((size_t)nbytes + 1);
        if (!bytes || (n_runs == cap_runs && !(runs = realloc(runs, sizeof(Run) * (size_t)(cap_runs = cap_runs * 2 + 8))))) {
            free(bytes);
            goto fallback; /* out of memory: the byte path will report it if it persists */
        }
        Py_ssize_t at = 0;
        for (Py_ssize_t k = i; k < j; k++) {
            memcpy(bytes + at, self->blob + self->off[buf[k]], self->len[buf[k]]);
            at += self->len[buf[k]];
        }
        PyObject *t = PyUnicode_DecodeUTF8(bytes, nbytes, "strict");
        free(bytes);
        if (!t) {
            PyErr_Clear();
            goto fallback;
        }
        runs[n_runs].start = i;
        runs[n_runs].end = j;
        runs[n_runs++].text = t;
        total += PyUnicode_GET_LENGTH(t);
        cls |= PyUnicode_IS_ASCII(t) ? 0 : (unsigned)PyUnicode_KIND(t);
        i = j - 1;
    }
    *done = 1;
    Py_UCS4 maxchar = (cls & 4) ? 0x10FFFF : (cls & 2) ? 0xFFFF : (cls & 1) ? 0xFF : 0x7F;
    PyObject *u = PyUnicode_New(total, maxchar);
    if (!u) {
        free(buf);
        free_runs(runs, n_runs);
        return NULL;
    }
#define COPY_TEXT(T, src)                                                                                 \
    do {                                                                                                  \
        T *d = (T *)PyUnicode_DATA(u);                                                                    \
        Py_ssize_t pos = 0, next_run = 0;                                                                 \
        Py_ssize_t run_at = n_runs ? runs[0].start : n;                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                              \
            if (i == run_at) {                                                                            \
                PyObject *t = runs[next_run].text;                                                        \
                int tk = PyUnicode_KIND(t);                                                               \
                const void *td = PyUnicode_DATA(t);                                                       \
                for (Py_ssize_t q = 0; q < PyUnicode_GET_LENGTH(t); q++) d[pos++] = (T)PyUnicode_READ(tk, td, q); \
                i = runs[next_run].end - 1;                                                               \
                next_run++;                                                                               \
                run_at = next_run < n_runs ? runs[next_run].start : n;                                    \
                continue;                                                                                 \
            }                                                                                             \
            uint64_t c = ci[buf[i]];                                                                      \
            size_t nc = (size_t)(c & 0xFF);                                                               \
            const T *from = (src) + (c >> 16);                                                            \
            if (nc <= 4 && pos + 4 <= total)                                                              \
                memcpy(d + pos, from, 4 * sizeof(T)); /* fixed sizes; the tables have 16 spare */         \
            else if (nc <= 16 && pos + 16 <= total)                                                       \
                memcpy(d + pos, from, 16 * sizeof(T));                                                    \
            else                                                                                          \
                memcpy(d + pos, from, nc * sizeof(T));                                                    \
            pos += (Py_ssize_t)nc;                                                                        \
        }                                                                                                 \
    } while (0)
    switch (PyUnicode_KIND(u)) {
    case PyUnicode_1BYTE_KIND: COPY_TEXT(Py_UCS1, self->text1); break;
    case PyUnicode_2BYTE_KIND: COPY_TEXT(Py_UCS2, self->text2); break;
    default: COPY_TEXT(Py_UCS4, self->text4); break;
    }
#undef COPY_TEXT
    free(buf);
    free_runs(runs, n_runs);
    return u;
fallback:
    free(buf);
    free_runs(runs, n_runs);
    return NULL;
}

/* decode(ids, errors) -> str: unknown ids and invalid UTF-8 are both errors or both replaced. */
static PyObject *Core_decode(Core *self, PyObject *args) {
    PyObject *ids;
    const char *errors = "replace";
    if (!PyArg_ParseTuple(args, "O|s:decode", &ids, &errors)) return NULL;
    int mode = parse_mode(errors);
    if (mode < 0) return NULL;
    int done;
    PyObject *text = text_decode(self, ids, &done);
    if (text || done) return text;
    OutBuf o = {NULL, 0, 0};
    if (decode_into(self, ids, mode, &o) < 0) {
        free(o.p);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    PyObject *r = PyUnicode_DecodeUTF8((const char *)o.p, o.n, errors);
    free(o.p);
    return r;
}

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
