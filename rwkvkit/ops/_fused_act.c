/* rwkvkit/ops/_fused_act.c: the activations after the matrices: GroupNorm times silu(gate),
 * relu^2, sigmoid gating (with the residual add). Conventions: _fused_cpu.c. */
#include "_fused.h"

/* ---- per-head GroupNorm times silu(gate) ----------------------------------------------------- */

typedef struct {
    long R, C, N;
    const float *y, *weight, *bias; /* y [R, C] fp32 (the WKV output); weight, bias [C] */
    const char *g;                  /* [R, C] gate pre-activation, dtype g_dt */
    float eps;
    int g_dt, out_dt;
    char *out; /* [R, C] */
} gn_args;

/* out = (LayerNorm_N(y) * weight + bias) * silu(g) per head of N channels. silu(g) is rounded to g's
   dtype first, as F.silu on a bf16 tensor returns bf16. */
BODY void gn_rows_body(const gn_args *a, long r0, long r1) {
    const long C = a->C, N = a->N;
    float buf[C], gate[C];
    for (long r = r0; r < r1; r++) {
        const float *restrict y = a->y + r * C;
        load_row(gate, a->g + (size_t)r * C * dt_size(a->g_dt), a->g_dt, C);
        for (long c = 0; c < C; c++) gate[c] = round_to(gate[c] / (1.0f + fexp(-gate[c])), a->g_dt);
        for (long h = 0; h < C; h += N) {
            const float mean = row_sum(y + h, N, 0, 0.0f) / (float)N;
            const float rstd = 1.0f / sqrtf(row_sum(y + h, N, 1, mean) / (float)N + a->eps);
            for (long i = h; i < h + N; i++)
                buf[i] = fmaf((y[i] - mean) * rstd, a->weight[i], a->bias[i]) * gate[i];
        }
        store_row(a->out + (size_t)r * C * dt_size(a->out_dt), a->out_dt, buf, C);
    }
}
VARIANTS(gn_rows, gn_args)

PyObject *fused_group_norm_gate(PyObject *self, PyObject *args, PyObject *kw) {
    gn_args a;
    long nthreads;
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"C", ARG_LONG, &a.C}, {"N", ARG_LONG, &a.N}, {"y", ARG_PTR, &a.y},
        {"g", ARG_PTR, &a.g}, {"g_dt", ARG_INT, &a.g_dt}, {"weight", ARG_PTR, &a.weight},
        {"bias", ARG_PTR, &a.bias}, {"eps", ARG_FLOAT, &a.eps}, {"out", ARG_PTR, &a.out},
        {"out_dt", ARG_INT, &a.out_dt}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("group_norm_gate", args, kw, spec, NARGS(spec))) return NULL;
    if (a.R <= 0 || a.C <= 0 || a.C > MAX_C || a.N <= 0 || a.C % a.N) {
        PyErr_SetString(PyExc_ValueError, "group_norm_gate: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(gn_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- channel-mix activations ----------------------------------------------------------------- */

/* k = relu(k)^2 in place over n values of dtype dt (rounded once, as relu_().square_()); in blocks of
   1024 through fp32 so that every loop vectorises. */
typedef struct {
    char *k;
    int dt;
} rs_args;

BODY void relu_square_range_body(const rs_args *a, long i0, long i1) {
    char *k = a->k;
    const int dt = a->dt;
    float buf[1024];
    const size_t sz = dt_size(dt);
    for (long b = i0; b < i1; b += 1024) {
        const long n = i1 - b < 1024 ? i1 - b : 1024;
        load_row(buf, k + (size_t)b * sz, dt, n);
        for (long i = 0; i < n; i++) {
            const float z = buf[i] > 0.0f ? buf[i] : 0.0f;
            buf[i] = z * z;
        }
        store_row(k + (size_t)b * sz, dt, buf, n);
    }
}
VARIANTS(relu_square_range, rs_args)

PyObject *fused_relu_square(PyObject *self, PyObject *args, PyObject *kw) {
    rs_args a;
    long n, nthreads;
    const named_arg spec[] = {
        {"n", ARG_LONG, &n}, {"k", ARG_PTR, &a.k}, {"dt", ARG_INT, &a.dt}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("relu_square", args, kw, spec, NARGS(spec))) return NULL;
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(relu_square_range, &a, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

typedef struct {
    long R, C;
    const char *r, *v; /* [R, C], dtype in_dt each */
    const float *res;  /* optional [R, C] fp32 residual (out_dt fp32): out = res + sigmoid(r) * v; out may be res */
    int in_dt, out_dt;
    char *out;
} sm_args;

/* out = sigmoid(r) * v: sigmoid rounded to the input dtype, then the product rounded to it (as
   torch.sigmoid(r) * v on bf16 tensors), then stored in out_dt; with res, res + that product in
   fp32 (the residual add x + out of the block, one fp32 rounding as torch's add). */
BODY void sigmoid_mul_rows_body(const sm_args *a, long r0, long r1) {
    const long C = a->C;
    const size_t in_sz = dt_size(a->in_dt);
    float rr[C], vv[C];
    for (long row = r0; row < r1; row++) {
        load_row(rr, a->r + (size_t)row * C * in_sz, a->in_dt, C);
        load_row(vv, a->v + (size_t)row * C * in_sz, a->in_dt, C);
        for (long c = 0; c < C; c++) {
            const float s = round_to(1.0f / (1.0f + fexp(-rr[c])), a->in_dt);
            rr[c] = round_to(s * vv[c], a->in_dt);
        }
        if (a->res)
            for (long c = 0; c < C; c++) rr[c] = a->res[row * C + c] + rr[c];
        store_row(a->out + (size_t)row * C * dt_size(a->out_dt), a->out_dt, rr, C);
    }
}
VARIANTS(sigmoid_mul_rows, sm_args)

PyObject *fused_sigmoid_mul(PyObject *self, PyObject *args, PyObject *kw) {
    sm_args a;
    long nthreads;
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"C", ARG_LONG, &a.C}, {"r", ARG_PTR, &a.r}, {"v", ARG_PTR, &a.v},
        {"in_dt", ARG_INT, &a.in_dt}, {"out", ARG_PTR, &a.out}, {"out_dt", ARG_INT, &a.out_dt},
        {"res", ARG_OPT_PTR, &a.res}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("sigmoid_mul", args, kw, spec, NARGS(spec))) return NULL;
    if (a.res && a.out_dt != DT_F32) {
        PyErr_SetString(PyExc_ValueError, "sigmoid_mul: a residual needs a float32 output");
        return NULL;
    }
    if (a.R <= 0 || a.C <= 0 || a.C > MAX_C) {
        PyErr_SetString(PyExc_ValueError, "sigmoid_mul: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(sigmoid_mul_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
