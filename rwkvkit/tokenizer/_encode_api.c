/* rwkvkit/tokenizer/_encode_api.c: encode()'s Python side: str / bytes arguments to UTF-8 (without the
 * GIL where it can), the walk (_encode.c), ids to lists or arrays, batches over threads. */
#include "_core.h"

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

PyObject *Core_encode(Core *self, PyObject *obj) {
    Py_ssize_t k;
    uint16_t *buf = encode_to_buffer(self, obj, &k);
    if (!buf) return NULL;
    PyObject *list = ids_to_list(self, buf, k);
    free(buf);
    return list;
}

/* encode_raw(text, itemsize) -> bytearray of native-endian unsigned ids, itemsize 2, 4 or 8. */
PyObject *Core_encode_raw(Core *self, PyObject *args) {
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
PyObject *Core_encode_batch(Core *self, PyObject *args) {
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
