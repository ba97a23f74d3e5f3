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
 * The parts (separate translation units sharing _core.h): _trie.c builds the tables, _encode.c is the
 * greedy walk, _encode_api.c turns Python arguments into bytes and ids into Python objects,
 * _decode.c decodes, and _native.c is the module (the Core type and its methods).
 */
#include "_core.h"

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

void Core_dealloc(Core *self) {
    core_free_tables(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}


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
int Core_init(Core *self, PyObject *args, PyObject *kw) {
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
