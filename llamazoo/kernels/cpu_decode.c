/* One decode step of a whole Llama decoder stack in one call: for each layer, RMSNorm, q/k/v (one linear
 * call), RoPE, the KV-cache write, attention of each row's new token over its cache slots, o_proj, the
 * residual add, RMSNorm, gate/up (one call), SiLU * up, down_proj, the residual add.
 *
 * Why: a decode step of a small model is bound by the ~90 torch ops per layer that eager PyTorch runs
 * around the matmuls (measured on SmolLM2-135M, bf16, 2 threads: ~16 of a 28 ms step), not by reading the
 * weights. Here the step costs the linear kernels of cpu_linear.c plus a few microseconds per layer.
 *
 * The numbers are those of llamazoo.model.llama's eager ops: activations rounded to the model dtype where
 * torch's bf16 ops round them (each product and sum of RoPE, SiLU and its product, the norms' steps), the
 * residual stream in fp32, attention scores and softmax in fp32 with bf16 probabilities (mixedp_attn) or
 * fp32 ones. Reductions run in a fixed order of their own, so a row's numbers do not depend on the batch
 * or on the other rows' lengths (continuous batching relies on that); they differ from torch's in the
 * summation order only.
 *
 * Activations live in fp32 buffers holding the model dtype's values; the KV cache holds the model dtype.
 */
#include <math.h>

#include "lz_common.h"

/* glibc's vector math library (libmvec): exp of 8 floats, within 1 ulp */
__m256 _ZGVdN8v_expf(__m256 x);

enum { LZ_BF16 = 0, LZ_F32 = 1, LZ_INT8 = 2, LZ_INT4 = 3 };

/* A projection: up to 3 bf16 / fp32 weights sharing the inputs (q/k/v), or one int8 / int4 matrix. */
typedef struct {
    int64_t kind, nw;
    const void* w[3];
    int64_t n[3];
    const void* scale; /* int8: bf16 scales [N, K/g]; int4: bf16 (scale, zero) pairs [N, K/g, 2] */
    int64_t k, group;
} lz_proj;

typedef struct {
    const void* attn_norm;
    const void* mlp_norm;
    void* k_cache; /* [rows, kv_heads, slots, head_dim], contiguous */
    void* v_cache;
    lz_proj qkv, o, gate_up, down;
} lz_layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter, slots;
    int64_t bf16;        /* weights, norms, cache and activations in bf16 (else fp32) */
    int64_t fp32_ln;     /* bf16 models: RMSNorm in fp32 */
    int64_t round_probs; /* bf16 models with mixedp_attn: probabilities rounded to bf16 before P.V */
    float eps, attn_scale;
    const void* final_norm; /* the model's last RMSNorm and its LM head; NULL: no head in this stack */
    lz_proj head;
} lz_stack;

static inline float rnd(float v) { return bf16_to_float(float_to_bf16(v)); }

/* x[i] rounded to bf16 (nearest even, NaN kept), in place. */
static void round_bf16(float* x, int64_t n) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u), quiet = _mm256_set1_epi32(0x400000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256i u = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
        _mm256_storeu_ps(x + i, _mm256_castsi256_ps(_mm256_and_si256(r, high)));
    }
    for (; i < n; i++) x[i] = rnd(x[i]);
}

static inline float load_value(const void* p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

/* sum of squares in a fixed order (8 lanes, then the tail) */
static float sum_squares(const float* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float s = hsum(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

/* RMSNorm of one row h [D] into out [D], as llamazoo.model.llama.RMSNorm computes it. */
static void rms_norm(const lz_stack* m, const float* h, const void* w, float* out, float* tmp) {
    int64_t D = m->hidden;
    if (!m->bf16 || m->fp32_ln) {
        float r = 1.0f / sqrtf(sum_squares(h, D) / (float)D + m->eps);
        for (int64_t i = 0; i < D; i++) out[i] = h[i] * r;
        if (m->bf16) round_bf16(out, D);
        for (int64_t i = 0; i < D; i++) out[i] = load_value(w, i, (int)m->bf16) * out[i];
    } else { /* the model dtype's steps: x rounded, its squares rounded, mean in fp32, rsqrt in fp32 */
        memcpy(tmp, h, sizeof(float) * D);
        round_bf16(tmp, D);
        for (int64_t i = 0; i < D; i++) out[i] = tmp[i] * tmp[i];
        round_bf16(out, D);
        float sum = 0.0f;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= D; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(out + i));
        sum = hsum(acc);
        for (; i < D; i++) sum += out[i];
        float var = rnd(rnd(sum / (float)D) + m->eps);
        float r = rnd(1.0f / sqrtf(var));
        for (i = 0; i < D; i++) out[i] = tmp[i] * r;
        round_bf16(out, D);
    }
    if (m->bf16) {
        if (!m->fp32_ln)
            for (int64_t i = 0; i < D; i++) out[i] = bf16_to_float(((const uint16_t*)w)[i]) * out[i];
        round_bf16(out, D);
    }
}

/* y [M, N] = x [M, K] . W^T in fp32 (the kernels' sums), rounded to the model dtype. */
static void project(const lz_stack* m, const lz_proj* p, const float* x, float* y, int64_t M, int threads) {
    int64_t N = p->n[0] + (p->nw > 1 ? p->n[1] : 0) + (p->nw > 2 ? p->n[2] : 0);
    switch (p->kind) {
    case LZ_BF16: lz_linear_bf16_multi(x, 0, (int)p->nw, p->w, p->n, y, 0, M, p->k, threads); break;
    case LZ_F32: lz_linear_f32_multi(x, (int)p->nw, p->w, p->n, y, M, p->k, threads); break;
    case LZ_INT8: lz_linear_int8(x, 0, p->w[0], p->scale, y, 0, M, p->n[0], p->k, p->group, threads); break;
    default: lz_linear_int4(x, 0, p->w[0], p->scale, y, 0, M, p->n[0], p->k, p->group, threads); break;
    }
    if (m->bf16) round_bf16(y, M * N);
}

/* RoPE of one head x [hd] in place: x * cos + rotate_half(x) * sin, each product and the sum rounded
 * to the model dtype as torch's ops round them. */
static void rope(float* x, const float* cs, const float* sn, int64_t hd, int bf16) {
    int64_t half = hd / 2;
    float out[1024];
    for (int64_t i = 0; i < hd; i++) {
        float rot = i < half ? -x[i + half] : x[i - half];
        float a = x[i] * cs[i], b = rot * sn[i];
        if (bf16) {
            a = rnd(a);
            b = rnd(b);
            out[i] = rnd(a + b);
        } else {
            out[i] = a + b;
        }
    }
    memcpy(x, out, sizeof(float) * hd);
}

static inline float dot_cache(const float* q, const void* k, int64_t hd, int bf16) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    float s;
    if (bf16) {
        const uint16_t* kb = (const uint16_t*)k;
        for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_bf16x8(kb + i), acc);
        s = hsum(acc);
        for (; i < hd; i++) s += q[i] * bf16_to_float(kb[i]);
    } else {
        const float* kf = (const float*)k;
        for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kf + i), acc);
        s = hsum(acc);
        for (; i < hd; i++) s += q[i] * kf[i];
    }
    return s;
}

/* exp of n floats in place (libmvec, 8 at a time; the tail through a padded copy) */
static void exp_inplace(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _ZGVdN8v_expf(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float t[8] = {0};
        memcpy(t, x + i, sizeof(float) * (n - i));
        _mm256_storeu_ps(t, _ZGVdN8v_expf(_mm256_loadu_ps(t)));
        memcpy(x + i, t, sizeof(float) * (n - i));
    }
}

/* One query head of one row over its cache slots: scores in fp32, softmax, P.V; y [hd] in the model dtype. */
static void attend(const lz_stack* m, const float* q, const char* kc, const char* vc, const uint8_t* mask,
                   int64_t width, float* scores, int64_t* slot_of, float* y) {
    int64_t hd = m->head_dim, esz = m->bf16 ? 2 : 4, n = 0;
    int bf16 = (int)m->bf16;
    for (int64_t s = 0; s < width; s++)
        if (mask[s]) {
            scores[n] = dot_cache(q, kc + s * hd * esz, hd, bf16) * m->attn_scale;
            slot_of[n++] = s;
        }
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = scores[i] > mx ? scores[i] : mx;
    for (int64_t i = 0; i < n; i++) scores[i] -= mx;
    exp_inplace(scores, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += scores[i];
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) scores[i] *= inv;
    if (m->round_probs) round_bf16(scores, n);
    for (int64_t d = 0; d < hd; d++) y[d] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        __m256 p = _mm256_set1_ps(scores[i]);
        const char* v = vc + slot_of[i] * hd * esz;
        int64_t d = 0;
        if (bf16) {
            for (; d + 8 <= hd; d += 8)
                _mm256_storeu_ps(y + d, _mm256_fmadd_ps(p, load_bf16x8((const uint16_t*)v + d), _mm256_loadu_ps(y + d)));
            for (; d < hd; d++) y[d] += scores[i] * bf16_to_float(((const uint16_t*)v)[d]);
        } else {
            for (; d + 8 <= hd; d += 8)
                _mm256_storeu_ps(y + d, _mm256_fmadd_ps(p, _mm256_loadu_ps((const float*)v + d), _mm256_loadu_ps(y + d)));
            for (; d < hd; d++) y[d] += scores[i] * ((const float*)v)[d];
        }
    }
    if (bf16) round_bf16(y, hd);
}

static void store_cache(void* cache, int64_t at, const float* x, int64_t n, int bf16) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t*)cache)[at + i] = float_to_bf16(x[i]);
    else
        memcpy((float*)cache + at, x, sizeof(float) * n);
}

/* h [B, hidden] fp32, the residual stream, updated in place through every layer. Row b writes its new key
 * and value at cache slot slot[b] and attends over the slots s < width with mask[b * width + s]; cs / sn
 * [B, head_dim] hold its RoPE cos and sin (model dtype). logits (when not NULL and the stack has a head):
 * [B, vocab] fp32, the head's outputs (rounded to the model dtype) of the final norm of h. */
void lz_decode_stack(const lz_stack* m, const lz_layer* layers, float* h, int64_t B, const int64_t* slot,
                     const uint8_t* mask, int64_t width, const void* cs, const void* sn, float* logits,
                     int threads) {
    int64_t D = m->hidden, H = m->heads, G = m->kv_heads, hd = m->head_dim, I = m->inter, S = m->slots;
    int64_t QKV = (H + 2 * G) * hd, rep = H / G;
    int bf16 = (int)m->bf16;
    int64_t esz = bf16 ? 2 : 4;
    float* x = (float*)malloc(sizeof(float) * B * D);
    float* tmp = (float*)malloc(sizeof(float) * D);
    float* qkv = (float*)malloc(sizeof(float) * B * QKV);
    float* att = (float*)malloc(sizeof(float) * B * H * hd);
    float* out = (float*)malloc(sizeof(float) * B * D);
    float* gu = (float*)malloc(sizeof(float) * B * 2 * I);
    float* act = (float*)malloc(sizeof(float) * B * I);
    float* scores = (float*)malloc(sizeof(float) * B * H * (width + 8));
    int64_t* slots = (int64_t*)malloc(sizeof(int64_t) * B * H * (width + 8));
    float* trig = (float*)malloc(sizeof(float) * B * 2 * hd);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < hd; i++) {
            trig[b * 2 * hd + i] = load_value(cs, b * hd + i, bf16);
            trig[b * 2 * hd + hd + i] = load_value(sn, b * hd + i, bf16);
        }
    for (int64_t l = 0; l < m->n_layers; l++) {
        const lz_layer* L = layers + l;
        for (int64_t b = 0; b < B; b++) rms_norm(m, h + b * D, L->attn_norm, x + b * D, tmp);
        project(m, &L->qkv, x, qkv, B, threads);
        for (int64_t b = 0; b < B; b++) {
            float* row = qkv + b * QKV;
            const float* c = trig + b * 2 * hd;
            for (int64_t j = 0; j < H + G; j++) rope(row + j * hd, c, c + hd, hd, bf16); /* q heads, then k heads */
            for (int64_t g = 0; g < G; g++) {
                int64_t at = ((b * G + g) * S + slot[b]) * hd;
                store_cache(L->k_cache, at, row + (H + g) * hd, hd, bf16);
                store_cache(L->v_cache, at, row + (H + G + g) * hd, hd, bf16);
            }
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (B * H > 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, head = bh % H, g = head / rep;
            const char* kc = (const char*)L->k_cache + (b * G + g) * S * hd * esz;
            const char* vc = (const char*)L->v_cache + (b * G + g) * S * hd * esz;
            attend(m, qkv + b * QKV + head * hd, kc, vc, mask + b * width, width, scores + bh * (width + 8),
                   slots + bh * (width + 8), att + bh * hd);
        }
        project(m, &L->o, att, out, B, threads);
        for (int64_t i = 0; i < B * D; i++) h[i] += out[i];
        for (int64_t b = 0; b < B; b++) rms_norm(m, h + b * D, L->mlp_norm, x + b * D, tmp);
        project(m, &L->gate_up, x, gu, B, threads);
        for (int64_t b = 0; b < B; b++) { /* silu(gate) = gate / (1 + exp(-gate)), rounded; times up, rounded */
            const float* gate = gu + b * 2 * I;
            const float* up = gate + I;
            float* a = act + b * I;
            for (int64_t i = 0; i < I; i++) a[i] = -gate[i];
            exp_inplace(a, I);
            for (int64_t i = 0; i < I; i++) a[i] = gate[i] / (1.0f + a[i]);
            if (bf16) round_bf16(a, I);
            for (int64_t i = 0; i < I; i++) a[i] *= up[i];
            if (bf16) round_bf16(a, I);
        }
        project(m, &L->down, act, out, B, threads);
        for (int64_t i = 0; i < B * D; i++) h[i] += out[i];
    }
    if (logits && m->final_norm) {
        for (int64_t b = 0; b < B; b++) rms_norm(m, h + b * D, m->final_norm, x + b * D, tmp);
        project(m, &m->head, x, logits, B, threads);
    }
    free(x);
    free(tmp);
    free(qkv);
    free(att);
    free(out);
    free(gu);
    free(act);
    free(scores);
    free(slots);
    free(trig);
}
