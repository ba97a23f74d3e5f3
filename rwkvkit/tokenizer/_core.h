/* rwkvkit/tokenizer/_core.h: the Core type of the native tokenizer and what its parts share. */
#ifndef RWKVKIT_TOKENIZER_CORE_H
#define RWKVKIT_TOKENIZER_CORE_H

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

#define NOT_TEXT 0xFF /* cinfo's n_chars for ids that are not whole text */

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

/* _trie.c */
int Core_init(Core *self, PyObject *args, PyObject *kw);
void Core_dealloc(Core *self);
/* _encode.c */
Py_ssize_t encode_loop(const Core *self, const uint8_t *src, Py_ssize_t n, uint16_t *out);
/* _encode_api.c */
PyObject *Core_encode(Core *self, PyObject *obj);
PyObject *Core_encode_raw(Core *self, PyObject *args);
PyObject *Core_encode_batch(Core *self, PyObject *args);
/* _decode_text.c: the str of ids, or NULL with *done = 0 when the byte path must decode them */
PyObject *text_decode(const Core *self, PyObject *ids, int *done);
/* _decode.c */
PyObject *Core_decode_bytes(Core *self, PyObject *args);
PyObject *Core_decode(Core *self, PyObject *args);

#endif
