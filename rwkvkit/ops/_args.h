/* rwkvkit/ops/_args.h: named arguments for the kernels' Python entry points.
 *
 * Every entry point of the native ops takes keyword arguments only, and reads them into its own
 * argument struct through a table that pairs each keyword with the struct field it fills:
 *
 *     wkv_args a;
 *     const named_arg spec[] = {{"B", ARG_LONG, &a.B}, {"r", ARG_PTR, &a.r}, ...};
 *     if (!parse_named("wkv_forward", args, kw, spec, NARGS(spec))) return NULL;
 *
 * so no argument depends on its position, a missing or unknown keyword is a TypeError naming it, and
 * the kernels take one struct instead of a list of integers and pointers. Pointers arrive as Python
 * integers (tensor.data_ptr()); ARG_OPT_PTR may be left out or be 0 / None (NULL).
 */
#ifndef RWKVKIT_ARGS_H
#define RWKVKIT_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ARG_LONG, ARG_INT, ARG_I64, ARG_FLOAT, ARG_PTR, ARG_OPT_PTR };

typedef struct {
    const char *name;
    int kind;
    void *dst; /* long *, int *, int64_t *, float *, or the address of a pointer field */
} named_arg;

#define NARGS(spec) (sizeof(spec) / sizeof((spec)[0]))

static inline int named_store(const char *fn, const named_arg *a, PyObject *v) {
    if (a->kind == ARG_FLOAT) {
        const double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) return 0;
        *(float *)a->dst = (float)d;
        return 1;
    }
    if (a->kind == ARG_PTR || a->kind == ARG_OPT_PTR) {
        void *p = NULL;
        if (v != Py_None) {
            const unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) return 0;
            p = (void *)(uintptr_t)u;
        }
        if (!p && a->kind == ARG_PTR) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be a non-null address", fn, a->name);
            return 0;
        }
        memcpy(a->dst, &p, sizeof p); /* every object pointer field has the layout of void * */
        return 1;
    }
    const long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) return 0;
    if (a->kind == ARG_LONG) *(long *)a->dst = (long)x;
    else if (a->kind == ARG_INT) *(int *)a->dst = (int)x;
    else *(int64_t *)a->dst = (int64_t)x;
    return 1;
}

/* Fill the fields of spec from the keyword arguments kw (no positional ones); 0 with a Python error set
   on a missing, unknown or mistyped argument. */
static inline int parse_named(const char *fn, PyObject *args, PyObject *kw, const named_arg *spec, size_t n) {
    if (args && PyTuple_GET_SIZE(args) != 0) {
        PyErr_Format(PyExc_TypeError, "%s takes keyword arguments only", fn);
        return 0;
    }
    PyObject *values[64];
    if (n > 64) {
        PyErr_Format(PyExc_SystemError, "%s: too many arguments", fn);
        return 0;
    }
    Py_ssize_t found = 0;
    for (size_t i = 0; i < n; i++) {
        values[i] = kw ? PyDict_GetItemString(kw, spec[i].name) : NULL; /* borrowed */
        found += values[i] != NULL;
    }
    if (kw && PyDict_GET_SIZE(kw) != found) { /* some keyword names no argument */
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kw, &pos, &key, &value)) {
            const char *k = PyUnicode_AsUTF8(key);
            size_t i = 0;
            while (k && i < n && strcmp(k, spec[i].name) != 0) i++;
            if (i == n) {
                PyErr_Format(PyExc_TypeError, "%s: unknown argument '%s'", fn, k ? k : "?");
                return 0;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (!values[i]) {
            if (spec[i].kind == ARG_OPT_PTR) {
                void *null = NULL;
                memcpy(spec[i].dst, &null, sizeof null);
                continue;
            }
            PyErr_Format(PyExc_TypeError, "%s: missing argument '%s'", fn, spec[i].name);
            return 0;
        }
        if (!named_store(fn, &spec[i], values[i])) return 0;
    }
    return 1;
}

/* The threads argument every entry point takes: at least 1. */
static inline int threads_at_least_1(long nt) { return nt < 1 ? 1 : (int)nt; }

#endif
