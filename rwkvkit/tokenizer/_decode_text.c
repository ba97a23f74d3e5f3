/* rwkvkit/tokenizer/_decode_text.c: decode() straight to str when every id is in the vocabulary: each
 * id's text is copied from the tables pre-decoded at every str width (build_text in _trie.c) into a
 * str allocated once at its final width; runs of ids that split characters are decoded on their own.
 * text_decode says when it cannot (then _decode.c joins the bytes). */
#include "_core.h"

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
PyObject *text_decode(const Core *self, PyObject *ids, int *done) {
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
