/* rwkvkit.ops._decode_v7: one token (T = 1) of RWKV-7 (Goose) for every row, on the CPU, in one call.
 *
 * The twin of _decode_cpu.c's step for Eagle and Finch, with Goose's own plan and layer: every layer
 * and the head inside one OpenMP parallel region, matrix-vector products split over the team (rows
 * claimed in chunks), the LoRAs split by columns, the per-head work (kk, the WKV-7 step of
 * _wkv7_step.h, GroupNorm, the bonus, the gate) split over (row, head) pairs, the per-row pieces
 * (norms, token shifts: _decode_ew.c's vector code) split over rows, between barriers. The matrix kernels are _decode_matvec.c's and _decode_rows1.c's (fp32, bf16, fp16,
 * int8 Q8_0; fp32 activations) and, for a step of several rows of a bf16 or int8 model (act_bf16),
 * _decode_bf16.c's (the matrices' inputs rounded to bf16, VDPBF16PS where the CPU has it: one weight
 * read serves every row at half the instructions), as in Finch's step; all are compiled into this
 * module too; _decode.h declares them.
 *
 * It computes what rwkvkit/models/rwkv7.py computes (checked against the reference there), up to
 * summation order and, with act_bf16 = 0, without rounding activations to bf16 between operations. The plan is a flat int64 array written by rwkvkit/models/rwkv7_step.py in the layout of
 * plan7_t / layer7_t below (mat_t records: kind, n_out, n_in, data, scales; LoRAs input-major).
 *
 * Python entry (keyword arguments only, see _args.h):
 *   step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, threads, portable,
 *        act_bf16, bf16dp)
 *     x [B, C] fp32 embeddings (the residual, updated in place); att/ffn shift [L, B, C] fp32;
 *     wkv [L, B, H, N, N] fp32 [value][key]; logits [B, V] fp32; portable: plain C kernels only;
 *     act_bf16: the matrices take bf16 activations (bf16 / int8 matrices); bf16dp: VDPBF16PS allowed.
 *   layout() -> (header ints, ints per layer).
 */
#include "_decode.h"
#include "_wkv7_step.h"


typedef struct {
    int64_t ln1_w, ln1_b, ln2_w, ln2_b;         /* float [C] */
    int64_t mix[6];                             /* x_r, x_w, x_k, x_v, x_a, x_g [C] */
    int64_t w0, a0, v0, k_k, k_a, r_k;          /* float [C] (v0: 0 in layer 0) */
    int64_t lnx_w, lnx_b, fmix_k;               /* float [C] */
    mat_t w1, w2, a1, a2, v1, v2, g1, g2;       /* LoRAs, input-major (v1, v2 empty in layer 0) */
    mat_t r, k, v, o, fk, fv;                   /* time-mix and channel-mix matrices */
} layer7_t;

typedef struct {
    int64_t version, n_layer, C, H, N, F, V, Dw, Da, Dv, Dg;
    int64_t rescale; /* fp16 models: x halved after every rescale-th block (0: never) */
    int64_t ln_out_w, ln_out_b;
    mat_t head;
    layer7_t layers[];
} plan7_t;

#define HEADER7_INTS ((int64_t)(sizeof(plan7_t) / sizeof(int64_t)))
#define LAYER7_INTS ((int64_t)(sizeof(layer7_t) / sizeof(int64_t)))
#define CLAIMS7 4 /* matrix phases per layer: r k v, o, fk, fv */
#define F(p) ((const float *)(intptr_t)(p))

typedef struct {
    const plan7_t *P;
    int64_t B;
    float *x;
    const float *att_in, *ffn_in, *wkv_in;
    float *att_out, *ffn_out, *wkv_out, *logits;
    float *buf;
    team_barrier_t *bar;
    atomic_long *claims;
    int wkv_avx512, act_bf16;
} step7_args;

static inline float sigm(float x) { return 1.f / (1.f + expf(-x)); }

/* columns [lo, hi) of y = x @ W for the LoRA m (input-major [n_in, n_out]) over B rows */
static inline void lora_part(const mat_t *m, int64_t B, const float *x, float *y, int tid, int nt) {
    int64_t lo, hi;
    if (m->n == 0) return;
    split16(m->n, tid, nt, &lo, &hi);
    if (lo < hi) lora_cols(m, lo, hi, x, m->k, B, y, m->n);
}

/* one (row, head): kk, the key, the value residual, the WKV step, GroupNorm, the bonus and the gate */
static void head7(const step7_args *a, const layer7_t *L, int first, float *const *s, int64_t b, int64_t h,
                  const float *S_in, float *S_out, float *dr) {
    const int64_t C = a->P->C, N = a->P->N, off = b * C + h * N;
    float *r = s[0] + off, *k = s[1] + off, *v = s[2] + off, *vf = s[3] + off, *dec = s[4] + off;
    float *aa = s[5] + off, *vg = s[6] + off, *g = s[7] + off, *kk = s[8] + off, *bb = s[9] + off;
    float *y = s[10] + off;
    const float *k_k = F(L->k_k) + h * N, *k_a = F(L->k_a) + h * N, *r_k = F(L->r_k) + h * N;
    float nrm = 0.f;
    for (int64_t j = 0; j < N; j++) {
        kk[j] = k[j] * k_k[j];
        nrm += kk[j] * kk[j];
    }
    nrm = sqrtf(nrm);
    const float inv = 1.f / (nrm > 1e-12f ? nrm : 1e-12f);
    float bonus = 0.f;
    for (int64_t j = 0; j < N; j++) {
        const float kn = kk[j] * inv, aj = aa[j];
        kk[j] = -kn;
        bb[j] = kn * aj;
        k[j] = k[j] * (1.f + (aj - 1.f) * k_a[j]);
        if (first)
            vf[j] = v[j];
        else
            v[j] = v[j] + (vf[j] - v[j]) * vg[j];
        bonus += r[j] * k[j] * r_k[j];
    }
    const wkv7_vecs_t t = {r, dec, k, v, kk, bb};
#ifdef WKV7_HAVE_N64_AVX512
    if (a->wkv_avx512 && N == 64)
        wkv7_head_n64(S_in, S_out, &t, y);
    else
#endif
    {
        memcpy(S_out, S_in, sizeof(float) * N * N);
        wkv7_head_generic(S_out, &t, y, dr, N);
    }
    layer_norm(y, F(L->lnx_w) + h * N, F(L->lnx_b) + h * N, 64e-5f, N, y);
    for (int64_t j = 0; j < N; j++) y[j] = (y[j] + bonus * v[j]) * g[j];
}

static void step7_team(const step7_args *a, int tid, int nt) {
    const plan7_t *P = a->P;
    const int64_t B = a->B, C = P->C, H = P->H, N = P->N, Fd = P->F;
    float *x = a->x, *buf = a->buf;
    /* scratch [B, C] each: r k v vfirst dec a vgate g kk bb y, then xn, the six mixes, o, fv; fk [B, F];
       the LoRA codes [B, D*]; N floats per thread for the portable WKV step */
    float *s[11];
    for (int i = 0; i < 11; i++) s[i] = buf + i * B * C;
    float *xn = buf + 11 * B * C, *xj = xn + B * C, *o = xj + 6 * B * C, *fv = o + B * C, *fk = fv + B * C;
    float *tw = fk + B * Fd, *ta = tw + B * P->Dw, *tv = ta + B * P->Da, *tg = tv + B * P->Dv;
    float *dr = tg + B * P->Dg + tid * N;
    float *xr = xj, *xw = xj + B * C, *xk = xj + 2 * B * C, *xv = xj + 3 * B * C, *xa = xj + 4 * B * C;
    float *xg = xj + 5 * B * C;
    /* bf16 copies of the matrices' inputs (act_bf16): r k v, o, fk, fv, head */
    const int hb = a->act_bf16;
    uint16_t *xrb = (uint16_t *)(tg + B * P->Dg + (int64_t)nt * N), *xkb = xrb + B * C, *xvb = xkb + B * C;
    uint16_t *yb = xvb + B * C, *fxb = yb + B * C, *fkb = fxb + B * C, *xnb = fkb + B * Fd;
    int64_t lo, hi, b0, b1;
    split(B, tid, nt, &b0, &b1); /* the rows of the per-row phases (one row: on one thread) */
#define SYNC() team_barrier(a->bar, nt)
#define BF(p) (hb ? (p) : NULL)
    for (int64_t l = 0; l < P->n_layer; l++) {
        const layer7_t *L = &P->layers[l];
        const int first = l == 0;
        const float *att_in = a->att_in + l * B * C, *ffn_in = a->ffn_in + l * B * C;
        float *att_out = a->att_out + l * B * C, *ffn_out = a->ffn_out + l * B * C;
        const float *S_in = a->wkv_in + l * B * H * N * N;
        float *S_out = a->wkv_out + l * B * H * N * N;
        atomic_long *claims = a->claims + CLAIMS7 * l;
        /* 1. ln1 and the six token-shift mixes x + (prev - x) * mix_j (rows split) */
        for (int64_t b = b0; b < b1; b++) {
            float *xnb = xn + b * C;
            layer_norm(x + b * C, F(L->ln1_w), F(L->ln1_b), 1e-5f, C, xnb);
            memcpy(att_out + b * C, xnb, C * sizeof(float));
            for (int j = 0; j < 6; j++)
                ew_shift_mix(C, att_in + b * C, xnb, F(L->mix[j]), NULL, xj + j * B * C + b * C);
            if (hb) {
                to_bf16(xr + b * C, xrb + b * C, C);
                to_bf16(xk + b * C, xkb + b * C, C);
                to_bf16(xv + b * C, xvb + b * C, C);
            }
        }
        SYNC();
        /* 2. the LoRAs' first matrices (columns split), then r, k, v (rows claimed) */
        lora_part(&L->w1, B, xw, tw, tid, nt);
        lora_part(&L->a1, B, xa, ta, tid, nt);
        if (!first) lora_part(&L->v1, B, xv, tv, tid, nt);
        lora_part(&L->g1, B, xg, tg, tid, nt);
        {
            const job_t jobs[3] = {{&L->r, xr, s[0], BF(xrb)}, {&L->k, xk, s[1], BF(xkb)}, {&L->v, xv, s[2], BF(xvb)}};
            mats_claim(jobs, 3, B, claims + 0);
        }
        SYNC();
        /* 3. the codes' activations (tanh for w, sigmoid for g; thread 0, small), then their second matrices */
        if (tid == 0) {
            for (int64_t i = 0; i < B * P->Dw; i++) tw[i] = tanhf(tw[i]);
            for (int64_t i = 0; i < B * P->Dg; i++) tg[i] = sigm(tg[i]);
        }
        SYNC();
        lora_part(&L->w2, B, tw, s[4], tid, nt);
        lora_part(&L->a2, B, ta, s[5], tid, nt);
        if (!first) lora_part(&L->v2, B, tv, s[6], tid, nt);
        lora_part(&L->g2, B, tg, s[7], tid, nt);
        split16(C, tid, nt, &lo, &hi);
        {
            const float *w0 = F(L->w0), *a0 = F(L->a0), *v0 = F(L->v0);
            for (int64_t b = 0; b < B; b++)
                for (int64_t c = lo; c < hi; c++) {
                    const int64_t i = b * C + c;
                    /* decay factor exp(w), w = -exp(-0.5) * sigmoid(w0 + lora) */
                    s[4][i] = expf(-0.60653066f * sigm(w0[c] + s[4][i]));
                    s[5][i] = sigm(a0[c] + s[5][i]);
                    if (!first) s[6][i] = sigm(v0[c] + s[6][i]);
                }
        }
        SYNC();
        /* 4. per (row, head) */
        split(B * H, tid, nt, &lo, &hi);
        for (int64_t bh = lo; bh < hi; bh++) {
            head7(a, L, first, s, bh / H, bh % H, S_in + bh * N * N, S_out + bh * N * N, dr);
            if (hb) to_bf16(s[10] + bh * N, yb + bh * N, N); /* (row b, head h) at b * C + h * N = bh * N */
        }
        SYNC();
        /* 5. output matrix */
        {
            const job_t jobs[1] = {{&L->o, s[10], o, BF(yb)}};
            mats_claim(jobs, 1, B, claims + 1);
        }
        SYNC();
        /* 6. residual, ln2, the channel-mix's token shift (rows split) */
        for (int64_t b = b0; b < b1; b++) {
            float *xb = x + b * C, *xnb = xn + b * C;
            ew_add(C, xb, o + b * C);
            layer_norm(xb, F(L->ln2_w), F(L->ln2_b), 1e-5f, C, xnb);
            memcpy(ffn_out + b * C, xnb, C * sizeof(float));
            ew_shift_mix(C, ffn_in + b * C, xnb, F(L->fmix_k), NULL, xk + b * C);
            if (hb) to_bf16(xk + b * C, fxb + b * C, C);
        }
        SYNC();
        /* 7. key, relu^2, value, residual */
        {
            const job_t jobs[1] = {{&L->fk, xk, fk, BF(fxb)}};
            mats_claim(jobs, 1, B, claims + 2);
        }
        SYNC();
        split16(B * Fd, tid, nt, &lo, &hi);
        ew_relu_sq(hi - lo, fk + lo);
        if (hb && lo < hi) to_bf16(fk + lo, fkb + lo, hi - lo);
        SYNC();
        {
            const job_t jobs[1] = {{&L->fv, fk, fv, BF(fkb)}};
            mats_claim(jobs, 1, B, claims + 3);
        }
        SYNC();
        { /* residual (fp16 models: halved after every rescale-th block, as their weights; rows split) */
            const float keep = P->rescale && (l + 1) % P->rescale == 0 ? 0.5f : 1.f;
            for (int64_t i = b0 * C; i < b1 * C; i++) x[i] = (x[i] + fv[i]) * keep;
        }
        /* no barrier: the next layer's (or the head's) first phase takes the same rows on each thread */
    }
    /* head */
    for (int64_t b = b0; b < b1; b++) {
        layer_norm(x + b * C, F(P->ln_out_w), F(P->ln_out_b), 1e-5f, C, xn + b * C);
        if (hb) to_bf16(xn + b * C, xnb + b * C, C);
    }
    SYNC();
    {
        const job_t jobs[1] = {{&P->head, xn, a->logits, BF(xnb)}};
        mats_claim(jobs, 1, B, a->claims + CLAIMS7 * P->n_layer);
    }
    SYNC();
#undef BF
#undef SYNC
}

/* the step's scratch in floats: the float32 buffers, then the bf16 copies of the matrices' inputs */
static void step7_team_of(const void *a, int tid, int nt) { step7_team(a, tid, nt); }

static int64_t scratch7(const plan7_t *P, int64_t B, int nt) {
    return B * (20 * P->C + P->F + P->Dw + P->Da + P->Dv + P->Dg) + (int64_t)nt * P->N + (B * (6 * P->C + P->F) + 1) / 2;
}

static int cpu_avx512(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static PyObject *py_step(PyObject *self, PyObject *args, PyObject *kw) {
    step7_args a;
    long nt;
    int portable = 0, bf16dp = 1;
    memset(&a, 0, sizeof a);
    const named_arg spec[] = {
        {"plan", ARG_PTR, &a.P}, {"B", ARG_I64, &a.B}, {"x", ARG_PTR, &a.x},
        {"att_in", ARG_PTR, &a.att_in}, {"att_out", ARG_PTR, &a.att_out},
        {"ffn_in", ARG_PTR, &a.ffn_in}, {"ffn_out", ARG_PTR, &a.ffn_out},
        {"wkv_in", ARG_PTR, &a.wkv_in}, {"wkv_out", ARG_PTR, &a.wkv_out},
        {"logits", ARG_PTR, &a.logits}, {"threads", ARG_LONG, &nt}, {"portable", ARG_INT, &portable},
        {"act_bf16", ARG_INT, &a.act_bf16}, {"bf16dp", ARG_INT, &bf16dp},
    };
    if (!parse_named("step", args, kw, spec, NARGS(spec))) return NULL;
    if (a.B < 1) {
        PyErr_SetString(PyExc_ValueError, "step: B must be positive");
        return NULL;
    }
    const plan7_t *P = a.P;
    if (P->version != 7) {
        PyErr_SetString(PyExc_ValueError, "step: the plan is not an RWKV-7 plan");
        return NULL;
    }
    const int n_threads = threads_at_least_1(nt);
    matvec_configure(portable, 1); /* _decode_matvec.c's kernels, in this module */
#if HAVE_X86
    use_bf16dp = use_avx512 && bf16dp && __builtin_cpu_supports("avx512bf16"); /* _decode_bf16.c's */
#endif
    a.wkv_avx512 = use_avx512;
    float *buf = malloc(sizeof(float) * (size_t)scratch7(P, a.B, n_threads));
    atomic_long *claims = calloc((size_t)(CLAIMS7 * P->n_layer + 1), sizeof(atomic_long));
    team_barrier_t bar;
    atomic_init(&bar.count, 0);
    atomic_init(&bar.gen, 0);
    if (!buf || !claims) {
        free(buf);
        free(claims);
        return PyErr_NoMemory();
    }
    a.buf = buf;
    a.bar = &bar;
    a.claims = claims;
    Py_BEGIN_ALLOW_THREADS
    team_run(step7_team_of, &a, n_threads);
    Py_END_ALLOW_THREADS
    free(buf);
    free(claims);
    Py_RETURN_NONE;
}

static PyObject *py_layout(PyObject *self, PyObject *args) {
    return Py_BuildValue("(LL)", (long long)HEADER7_INTS, (long long)LAYER7_INTS);
}

static PyObject *py_avx512(PyObject *self, PyObject *args) { return PyBool_FromLong(cpu_avx512()); }

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef methods[] = {
    {"step", KW(py_step),
     "step(*, plan, B, x, att_in, att_out, ffn_in, ffn_out, wkv_in, wkv_out, logits, threads, portable, "
     "act_bf16, bf16dp)"},
    {"layout", py_layout, METH_NOARGS, "(header ints, ints per layer) of the plan"},
    {"avx512", py_avx512, METH_NOARGS, "whether the CPU has the AVX-512 kernels' features"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_decode_v7", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode_v7(void) { return PyModule_Create(&moddef); }
