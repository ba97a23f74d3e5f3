/* rwkvkit/ops/_fused_mix.c: the token-shift mixes, alone (mix) and after a residual add and
 * LayerNorm (add_norm_mix). Conventions: _fused_cpu.c. */
#include "_fused.h"

/* ---- token-shift mixes ----------------------------------------------------------------------- */

typedef struct {
    long R, T, C, M;
    const float *x, *prev, *mix; /* x [R, C], prev [B, C], mix [M, C] */
    int lerp, out_dt;
    char *out; /* [M, R, C] */
} mix_args;

/* out_j = x + (prev - x) * mix_j (Finch, lerp = 0) or x * mix_j + prev * (1 - mix_j) (RWKV-4/5),
   for j < M, rounded to out_dt; prev is the token-shifted x, read from the row above. The Finch form
   is one fused multiply-add, as torch's addcmul; the lerp rounds every step, as the four tensor ops
   of the PyTorch path. */
BODY void mix_rows_body(const mix_args *a, long r0, long r1) {
    const long C = a->C;
    float buf[C];
    for (long r = r0; r < r1; r++) {
        const float *restrict x = a->x + r * C;
        const float *restrict p = (r % a->T == 0) ? a->prev + (r / a->T) * C : x - C;
        for (long j = 0; j < a->M; j++) {
            const float *restrict m = a->mix + j * C;
            if (a->lerp)
                for (long c = 0; c < C; c++) buf[c] = x[c] * m[c] + p[c] * (1.0f - m[c]);
            else
                for (long c = 0; c < C; c++) buf[c] = fmaf(p[c] - x[c], m[c], x[c]);
            store_row(a->out + (size_t)(j * a->R + r) * C * dt_size(a->out_dt), a->out_dt, buf, C);
        }
    }
}
VARIANTS(mix_rows, mix_args)

PyObject *fused_mix(PyObject *self, PyObject *args, PyObject *kw) {
    mix_args a;
    long nthreads;
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"T", ARG_LONG, &a.T}, {"C", ARG_LONG, &a.C}, {"M", ARG_LONG, &a.M},
        {"x", ARG_PTR, &a.x}, {"prev", ARG_PTR, &a.prev}, {"mix", ARG_PTR, &a.mix}, {"lerp", ARG_INT, &a.lerp},
        {"out_dt", ARG_INT, &a.out_dt}, {"out", ARG_PTR, &a.out}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("mix", args, kw, spec, NARGS(spec))) return NULL;
    if (a.R <= 0 || a.T <= 0 || a.C <= 0 || a.C > MAX_C || a.M <= 0) {
        PyErr_SetString(PyExc_ValueError, "mix: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(mix_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


/* ---- residual add, LayerNorm and the token-shift mixes in one pass ---------------------------- */

typedef struct {
    long R, T, C, M;
    const float *x;       /* [R, C] fp32 residual stream */
    const char *add;      /* optional [R, C] (dtype add_dt): x + add is the new residual */
    const float *w, *b;   /* LayerNorm weight, bias [C] */
    float eps;
    const float *prev;    /* [B, C]: LayerNorm output of the token before each sequence's first row */
    const float *mix;     /* [M, C] */
    int add_dt, lerp, out_dt;
    float *x_out;         /* optional [R, C]: x + add */
    float *xn_out;        /* optional [R, C]: LayerNorm output */
    float *last;          /* optional [B, C]: LayerNorm output of each sequence's last row */
    char *out;            /* [M, R, C] mixes, out_dt */
} anm_args;

/* s = x[r] + add[r] (fp32, one rounding as torch's add), y = LayerNorm(s) */
BODY void anm_norm_row(const anm_args *a, long r, float *restrict s, float *restrict y) {
    const long C = a->C;
    const float *restrict x = a->x + r * C;
    if (a->add) {
        load_row(y, a->add + (size_t)r * C * dt_size(a->add_dt), a->add_dt, C);
        for (long c = 0; c < C; c++) s[c] = x[c] + y[c];
    } else {
        memcpy(s, x, sizeof(float) * (size_t)C);
    }
    const float mean = row_sum(s, C, 0, 0.0f) / (float)C;
    const float rstd = 1.0f / sqrtf(row_sum(s, C, 1, mean) / (float)C + a->eps);
    for (long c = 0; c < C; c++) y[c] = (s[c] - mean) * rstd * a->w[c] + a->b[c];
}

/* rows [r0, r1): the previous row's LayerNorm output is recomputed for the first row of the range
   (the row above belongs to the other thread) unless it starts a sequence (then prev) */
BODY void anm_rows_body(const anm_args *a, long r0, long r1) {
    const long C = a->C;
    float s[C], y0[C], y1[C], buf[C];
    float *p = y0, *y = y1;
    const float *pp;
    if (r0 % a->T) {
        anm_norm_row(a, r0 - 1, s, p);
        pp = p;
    } else {
        pp = a->prev + (r0 / a->T) * C;
    }
    for (long r = r0; r < r1; r++) {
        anm_norm_row(a, r, s, y);
        if (a->x_out) memcpy(a->x_out + r * C, s, sizeof(float) * (size_t)C);
        if (a->xn_out) memcpy(a->xn_out + r * C, y, sizeof(float) * (size_t)C);
        if (a->last && r % a->T == a->T - 1) memcpy(a->last + (r / a->T) * C, y, sizeof(float) * (size_t)C);
        const float *restrict pr = (r % a->T == 0) ? a->prev + (r / a->T) * C : pp;
        for (long j = 0; j < a->M; j++) {
            const float *restrict m = a->mix + j * C;
            if (a->lerp)
                for (long c = 0; c < C; c++) buf[c] = y[c] * m[c] + pr[c] * (1.0f - m[c]);
            else
                for (long c = 0; c < C; c++) buf[c] = fmaf(pr[c] - y[c], m[c], y[c]);
            store_row(a->out + (size_t)(j * a->R + r) * C * dt_size(a->out_dt), a->out_dt, buf, C);
        }
        float *t = p; /* this row's output is the next row's previous token */
        p = y;
        y = t;
        pp = p;
    }
}
VARIANTS(anm_rows, anm_args)

PyObject *fused_add_norm_mix(PyObject *self, PyObject *args, PyObject *kw) {
    anm_args a;
    long nthreads;
    const named_arg spec[] = {
        {"R", ARG_LONG, &a.R}, {"T", ARG_LONG, &a.T}, {"C", ARG_LONG, &a.C}, {"M", ARG_LONG, &a.M},
        {"x", ARG_PTR, &a.x}, {"add", ARG_OPT_PTR, &a.add}, {"add_dt", ARG_INT, &a.add_dt},
        {"ln_w", ARG_PTR, &a.w}, {"ln_b", ARG_PTR, &a.b}, {"eps", ARG_FLOAT, &a.eps}, {"prev", ARG_PTR, &a.prev},
        {"mix", ARG_PTR, &a.mix}, {"lerp", ARG_INT, &a.lerp}, {"out_dt", ARG_INT, &a.out_dt},
        {"x_out", ARG_OPT_PTR, &a.x_out}, {"xn_out", ARG_OPT_PTR, &a.xn_out}, {"last", ARG_OPT_PTR, &a.last},
        {"out", ARG_PTR, &a.out}, {"threads", ARG_LONG, &nthreads},
    };
    if (!parse_named("add_norm_mix", args, kw, spec, NARGS(spec))) return NULL;
    if (a.R <= 0 || a.T <= 0 || a.R % a.T || a.C <= 0 || a.C > MAX_C || a.M < 0) {
        PyErr_SetString(PyExc_ValueError, "add_norm_mix: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    RUN_ROWS(anm_rows, &a, a.R, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
