/* Decoding for the native tokenizer core: ids -> bytes, ids -> str.
 *
 * A translation unit of the module (the Core type: _core.h). Two paths to str:
 *   - text_decode: when every id is in the vocabulary, each id's text is copied from tables
 *     pre-decoded at every str width (build_text in _trie.c) into a str allocated once at its final
 *     width; runs of ids that split characters are decoded on their own.
 *   - otherwise (unknown ids, invalid UTF-8, ASCII/Latin-1 text where CPython's decoder is faster)
 *     the bytes are joined (decode_into) and given to PyUnicode_DecodeUTF8 with the caller's errors.
 */
#include "_core.h"

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
PyObject *Core_decode_bytes(Core *self, PyObject *args) {
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

/* decode(ids, errors) -> str: unknown ids and invalid UTF-8 are both errors or both replaced. */
PyObject *Core_decode(Core *self, PyObject *args) {
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
