/* Decoding for the native tokenizer core: ids -> bytes, ids -> str.
 *
 * Included by _trie.c (one translation unit, so the Core type and helpers stay static); not
 * compiled on its own. Two paths to str:
 *   - text_decode: when every id is in the vocabulary, each id's text is copied from tables
 *     pre-decoded at every str width (build_text in _trie.c) into a str allocated once at its final
 *     width; runs of ids that split characters are decoded on their own.
 *   - otherwise (unknown ids, invalid UTF-8, ASCII/Latin-1 text where CPython's decoder is faster)
 *     the bytes are joined (decode_into) and given to PyUnicode_DecodeUTF8 with the caller's errors.
 */

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
