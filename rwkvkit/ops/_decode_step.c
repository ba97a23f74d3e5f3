/* rwkvkit/ops/_decode_step.c: one token of Eagle or Finch for every row: every layer and the head,
 * run by a team of threads between barriers (the plan, the numerics and the threads: _decode_cpu.c). */
#include "_decode.h"

/* ---- element-wise pieces (one row of C) --------------------------------------------------------- */

/* One head of the WKV step: y[j] = sum_i r_i (S_ij + u_i k_i v_j); S'_ij = w_i S_ij + k_i v_j. */
static void wkv_head(int64_t N, const float *restrict r, const float *restrict k, const float *restrict v,
                     const float *restrict w, const float *restrict u, const float *restrict S,
                     float *restrict So, float *restrict y) {
    float ruk = 0.f;
    for (int64_t i = 0; i < N; i++) ruk += r[i] * u[i] * k[i];
    for (int64_t j = 0; j < N; j++) y[j] = ruk * v[j];
    for (int64_t i = 0; i < N; i++) {
        const float ri = r[i], wi = w[i], ki = k[i];
        const float *restrict Si = S + i * N;
        float *restrict Soi = So + i * N;
        for (int64_t j = 0; j < N; j++) {
            y[j] += ri * Si[j];
            Soi[j] = wi * Si[j] + ki * v[j];
        }
    }
}

#if HAVE_X86
/* The same for N a multiple of 16 (up to 64): y in registers, FMAs, and the new state written with
   streaming stores. At 16 rows the states (2.4 MB a row at 0.1B) do not stay in cache from step to
   step, and an ordinary store first reads the line it overwrites: a third of the state traffic. */
AVX512 static void wkv_head_avx512(int64_t N, const float *restrict r, const float *restrict k,
                                   const float *restrict v, const float *restrict w, const float *restrict u,
                                   const float *restrict S, float *restrict So, float *restrict y) {
    float ruk = 0.f;
    for (int64_t i = 0; i < N; i++) ruk += r[i] * u[i] * k[i];
    const int64_t nb = N / 16;
    const int stream = ((uintptr_t)So & 63) == 0;
    __m512 yv[4], vv[4];
    for (int64_t b = 0; b < nb; b++) {
        vv[b] = _mm512_loadu_ps(v + 16 * b);
        yv[b] = _mm512_mul_ps(_mm512_set1_ps(ruk), vv[b]);
    }
    for (int64_t i = 0; i < N; i++) {
        const __m512 ri = _mm512_set1_ps(r[i]), wi = _mm512_set1_ps(w[i]), ki = _mm512_set1_ps(k[i]);
        const float *Si = S + i * N;
        float *Soi = So + i * N;
        for (int64_t b = 0; b < nb; b++) {
            const __m512 s = _mm512_loadu_ps(Si + 16 * b);
            yv[b] = _mm512_fmadd_ps(ri, s, yv[b]);
            const __m512 o = _mm512_fmadd_ps(wi, s, _mm512_mul_ps(ki, vv[b]));
            if (stream)
                _mm512_stream_ps(Soi + 16 * b, o);
            else
                _mm512_storeu_ps(Soi + 16 * b, o);
        }
    }
    for (int64_t b = 0; b < nb; b++) _mm512_storeu_ps(y + 16 * b, yv[b]);
    if (stream) _mm_sfence(); /* the streamed state is ordered before the team's next barrier */
}
#endif

/* wkv_head on the CPU's best path */
static inline void wkv_head_any(int64_t N, const float *r, const float *k, const float *v, const float *w,
                                const float *u, const float *S, float *So, float *y) {
#if HAVE_X86
    if (use_avx512 && N % 16 == 0 && N <= 64) {
        wkv_head_avx512(N, r, k, v, w, u, S, So, y);
        return;
    }
#endif
    wkv_head(N, r, k, v, w, u, S, So, y);
}

#define F(p) ((const float *)(intptr_t)(p))

/* ---- the step ----------------------------------------------------------------------------------- */


void step_team(const step_args *a, int tid, int nt) {
    const plan_t *P = a->P;
    const int64_t B = a->B, C = P->C, H = P->H, N = P->N, Fd = P->F, D = P->D, Dw = P->Dw;
    const int finch = P->version == 6, hb = a->act_bf16;
    float *x = a->x;
    /* scratch: xn, d, xj[5], m (5D), t (Dw), decay, r, k, v, g, y, o, fk, fr, fv; then bf16: xj[1..4], y, fk, xn */
    float *xn = a->buf, *d = xn + B * C, *xj = d + B * C, *m5 = xj + 5 * B * C, *tw = m5 + B * 5 * D;
    float *dec = tw + B * Dw, *r = dec + B * C, *k = r + B * C, *v = k + B * C, *g = v + B * C;
    float *y = g + B * C, *o = y + B * C, *fk = o + B * C, *fr = fk + B * Fd, *fv = fr + B * C;
    float *xw = xj, *xk = xj + B * C, *xv = xj + 2 * B * C, *xr = xj + 3 * B * C, *xg = xj + 4 * B * C;
    uint16_t *xjb = (uint16_t *)(fv + B * C), *yb = xjb + 4 * B * C, *fkb = yb + B * C, *xnb = fkb + B * Fd;
    uint16_t *xkb = xjb, *xvb = xjb + B * C, *xrb = xjb + 2 * B * C, *xgb = xjb + 3 * B * C;
    int64_t lo, hi, b0, b1;
    split(B, tid, nt, &b0, &b1); /* the rows of the per-row phases (one row: on one thread) */
#define SYNC() team_barrier(a->bar, nt)
#define BF(p) (hb ? (p) : NULL)

    for (int64_t l = 0; l < P->n_layer; l++) {
        const layer_t *L = &P->layers[l];
        const float *att_in = a->att_in + l * B * C, *ffn_in = a->ffn_in + l * B * C;
        float *att_out = a->att_out + l * B * C, *ffn_out = a->ffn_out + l * B * C;
        const float *S = a->wkv_in + l * B * H * N * N;
        float *So = a->wkv_out + l * B * H * N * N;
        atomic_long *claims = a->claims + CLAIMS_PER_LAYER * l;

        /* 1. LayerNorm, token shift (and Eagle's static mixes) */
        for (int64_t b = b0; b < b1; b++) {
            float *xnb = xn + b * C, *db = d + b * C;
            layer_norm(x + b * C, F(L->ln1_w), F(L->ln1_b), 1e-5f, C, xnb);
            memcpy(att_out + b * C, xnb, C * sizeof(float));
            if (finch) { /* d, and the first LoRA's input, kept in xw until the LoRA has read it */
                ew_shift_mix(C, att_in + b * C, xnb, F(L->maa_x), db, xw + b * C);
            } else { /* x * mix + prev * (1 - mix), as the reference */
                for (int64_t c = 0; c < C; c++) db[c] = att_in[b * C + c] - xnb[c];
                for (int j = 1; j < 5; j++) {
                    const float *mix = F(L->maa[j]);
                    float *out = xj + j * B * C + b * C;
                    for (int64_t c = 0; c < C; c++) out[c] = xnb[c] * mix[c] + att_in[b * C + c] * (1.f - mix[c]);
                    if (hb) to_bf16(out, xjb + (j - 1) * B * C + b * C, C);
                }
            }
        }
SYNC();
        if (finch) {
            /* 2. m = tanh(xxx @ maa_w1), the five branch LoRA codes [B, 5D] */
            split16(5 * D, tid, nt, &lo, &hi);
            lora_cols(&L->w1, lo, hi, xw, C, B, m5, 5 * D);
            for (int64_t b = 0; b < B; b++) ew_tanh(hi - lo, m5 + b * 5 * D + lo);
SYNC();
            /* 3. x_j = x + d * (maa_j + m_j @ maa_w2[j]) for w, k, v, r, g (columns split) */
            split16(C, tid, nt, &lo, &hi);
            for (int j = 0; j < 5; j++) {
                mat_t w2j = L->w2; /* [D, C] slice j of [5, D, C] */
                w2j.k = D;
                w2j.n = C;
                w2j.w += j * D * C * (L->w2.kind == MK_F32 ? 4 : 2); /* bf16, fp16: 2 bytes */
                float *out = xj + j * B * C;
                lora_cols(&w2j, lo, hi, m5 + j * D, 5 * D, B, out, C);
                const float *maa = F(L->maa[j]);
                for (int64_t b = 0; b < B; b++) {
                    ew_lora_mix(hi - lo, xn + b * C + lo, d + b * C + lo, maa + lo, out + b * C + lo);
                    if (hb && j > 0) to_bf16(out + b * C + lo, xjb + (j - 1) * B * C + b * C + lo, hi - lo);
                }
            }
SYNC();
            /* 4. the decay LoRA's code: tanh(x_w @ decay_w1) */
            split16(Dw, tid, nt, &lo, &hi);
            lora_cols(&L->dw1, lo, hi, xw, C, B, tw, Dw);
            for (int64_t b = 0; b < B; b++) ew_tanh(hi - lo, tw + b * Dw + lo);
SYNC();
            /* 5a. decay factor exp(-exp(time_decay + code @ decay_w2)) (columns split) */
            split16(C, tid, nt, &lo, &hi);
            lora_cols(&L->dw2, lo, hi, tw, Dw, B, dec, C);
            const float *td = F(L->decay);
            for (int64_t b = 0; b < B; b++) ew_decay(hi - lo, td + lo, dec + b * C + lo);
        } else { /* Eagle: one decay per channel */
            const float *td = F(L->decay);
            for (int64_t b = b0; b < b1; b++)
                for (int64_t c = 0; c < C; c++) dec[b * C + c] = expf(-expf(td[c]));
        }
        /* 5b. r, k, v, g */
        {
            const job_t jobs[4] = {{&L->r, xr, r, BF(xrb)}, {&L->k, xk, k, BF(xkb)}, {&L->v, xv, v, BF(xvb)},
                                   {&L->g, xg, g, BF(xgb)}};
            mats_claim(jobs, 4, B, claims + 0);
        }
SYNC();
        /* 6. WKV per (row, head), then the head's GroupNorm times silu(gate) */
        split(B * H, tid, nt, &lo, &hi);
        for (int64_t bh = lo; bh < hi; bh++) {
            const int64_t b = bh / H, h = bh % H, off = b * C + h * N;
            float *yh = y + off;
            wkv_head_any(N, r + off, k + off, v + off, dec + off, F(L->u) + h * N, S + bh * N * N, So + bh * N * N, yh);
            layer_norm(yh, F(L->lnx_w) + h * N, F(L->lnx_b) + h * N, 64e-5f, N, yh);
            ew_silu_gate(N, yh, g + off);
            if (hb) to_bf16(yh, yb + off, N);
        }
SYNC();
        /* 7. output matrix */
        {
            const job_t jobs[1] = {{&L->o, y, o, BF(yb)}};
            mats_claim(jobs, 1, B, claims + 1);
        }
SYNC();
        /* 8. residual, LayerNorm, channel-mix token shift */
        {
            const float *mk = F(L->fmix_k), *mr = F(L->fmix_r);
            for (int64_t b = b0; b < b1; b++) {
                float *xb = x + b * C, *xnb = xn + b * C;
                ew_add(C, xb, o + b * C);
                layer_norm(xb, F(L->ln2_w), F(L->ln2_b), 1e-5f, C, xnb);
                memcpy(ffn_out + b * C, xnb, C * sizeof(float));
                if (finch) {
                    ew_shift_mix(C, ffn_in + b * C, xnb, mk, NULL, xk + b * C);
                    ew_shift_mix(C, ffn_in + b * C, xnb, mr, NULL, xr + b * C);
                } else {
                    for (int64_t c = 0; c < C; c++) {
                        const float p = ffn_in[b * C + c];
                        xk[b * C + c] = xnb[c] * mk[c] + p * (1.f - mk[c]);
                        xr[b * C + c] = xnb[c] * mr[c] + p * (1.f - mr[c]);
                    }
                }
                if (hb) {
                    to_bf16(xk + b * C, xkb + b * C, C);
                    to_bf16(xr + b * C, xrb + b * C, C);
                }
            }
        }
SYNC();
        /* 9. key (then relu^2) and receptance */
        {
            const job_t jobs[2] = {{&L->fk, xk, fk, BF(xkb)}, {&L->fr, xr, fr, BF(xrb)}};
            mats_claim(jobs, 2, B, claims + 2);
        }
SYNC();
        split16(B * Fd, tid, nt, &lo, &hi);
        ew_relu_sq(hi - lo, fk + lo);
        if (hb) to_bf16(fk + lo, fkb + lo, hi - lo);
SYNC();
        /* 10. value */
        {
            const job_t jobs[1] = {{&L->fv, fk, fv, BF(fkb)}};
            mats_claim(jobs, 1, B, claims + 3);
        }
SYNC();
        /* 11. residual (fp16 models: halved after every rescale-th block, as their weights were at load) */
        const float keep = P->rescale && (l + 1) % P->rescale == 0 ? 0.5f : 1.f;
        ew_gated_residual((b1 - b0) * C, x + b0 * C, fr + b0 * C, fv + b0 * C, keep);
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
        mats_claim(jobs, 1, B, a->claims + CLAIMS_PER_LAYER * P->n_layer);
    }
    SYNC(); /* everyone is done before OpenMP's own (long-spinning) end-of-region barrier */
#undef BF
#undef SYNC
}

/* The step's scratch in floats: the float32 buffers, then the bf16 copies of the matrices' inputs. */
int64_t scratch_floats(const plan_t *P, int64_t B) {
    return B * (16 * P->C + 5 * P->D + P->Dw + P->F) + (B * (6 * P->C + P->F) + 1) / 2;
}
