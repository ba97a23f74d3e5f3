/* rwkvkit/tokenizer/_native.c: the module rwkvkit.tokenizer._native, its Core type and the table of its
 * methods (the tables: _trie.c; encoding: _encode.c, _encode_api.c; decoding: _decode.c). */
#include "_core.h"

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
