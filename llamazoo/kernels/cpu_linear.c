/* y[M,N] = x[M,K] . W[N,K]^T for small M on x86-64 CPUs with AVX2 and FMA, W held as bf16, fp32, int8 or int4.
 *
 * Why these exist: on CPUs without bf16 GEMM instructions (AVX2, no AVX512-BF16/AMX) torch's bf16 matmul
 * costs about one matrix-vector product per row, and the int8 weight-only kernel converts at well
 * under memory speed. Here each weight is read once per call, turned into 8 fp32 lanes in a register and
 * multiplied into up to MR rows of x (fp32) at a time; the call streams the weights at memory speed for
 * one row and stays compute-bound, not copy-bound, for a few dozen.
 *
 * Every output y[m,n] is one fp32 sum in a fixed order (8 lanes over k in steps of 8, then the lanes
 * added pairwise), whatever M is and whichever rows share the call: a row gives the same numbers alone
 * or in a batch (continuous batching relies on that).
 *
 * Weight formats (row n at w + n * row_bytes):
 *   bf16: K values.
 *   int8: K codes q; value = q * scale[n, k / g] (scales bf16 [N, K/g]; g = K: one per row).
 *   int4: K/2 bytes, input k in byte k/2 (even k in the low nibble), codes q in 0..15;
 *         value = (q - 8) * s + z with (s, z) = sz[n, k / g] (bf16 pairs [N, K/g, 2]).
 * int4 multiplies integers, as llama.cpp's Q4_0 x Q8_0 dot product does: x is quantized per 32 inputs
 * (x ~ d * xq, xq = round(x / d) in -127..127, d = absmax / 127) and each block's sum of q * xq is exact
 * (maddubs: 32 products in 4 instructions, where a float path needs 4 conversions and 4 FMAs per 8 weights).
 * The sums of (q - 8) * d * xq and z * d * xq per group are then added in fp32 in a fixed order.
 * Threads: OpenMP over blocks of NR output rows (the process's libgomp, shared with torch).
 */
#include "lz_common.h"

#ifndef NR
#define NR 4 /* weight rows per block */
#endif
#ifndef NR4
#define NR4 8 /* int4 weight rows per block (fewer instructions per weight byte than bf16's: more rows pay) */
#endif
#ifndef MR
#define MR 2 /* rows of x per pass over a block (3 spills on AVX2: 16 registers) */
#endif

static inline __m256 load_int8x8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* Multiplies the 8-lane weight vector of block row b into the accumulators of rows 0..mc-1 (mc <= R). */
#define FMA_ROWS_R(wv, b, R)                                                   \
    for (int a = 0; a < (R); a++)                                              \
        if (a < mc) acc[a][b] = _mm256_fmadd_ps(wv, xv[a], acc[a][b]);
#define FMA_ROWS(wv, b) FMA_ROWS_R(wv, b, MR)

#define LOAD_X_R(xs, stride, k, R)                                             \
    for (int a = 0; a < (R); a++)                                              \
        if (a < mc) xv[a] = _mm256_loadu_ps(xs + a * (stride) + (k));
#define LOAD_X(xs, stride, k) LOAD_X_R(xs, stride, k, MR)

#define STORE_Y(scale_row)                                                     \
    for (int a = 0; a < mc; a++)                                               \
        for (int b = 0; b < nr; b++) PUT_Y(m0 + a, n0 + b, hsum(acc[a][b]) * (scale_row));

/* x as fp32 rows: x itself, or a converted copy in *buf (bf16 -> fp32 is exact). */
static const float* fp32_rows(const void* x, int x_bf16, int64_t n, float** buf) {
    *buf = NULL;
    if (!x_bf16) return (const float*)x;
    float* out = (float*)malloc(sizeof(float) * (n + 8));
    const uint16_t* h = (const uint16_t*)x;
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(h[i]);
    *buf = out;
    return out;
}

/* Output element (row, col) of a [M, ldy] result, fp32 or bf16. */
#define PUT_Y(row, col, value)                                                                          \
    do {                                                                                               \
        if (y_bf16)                                                                                    \
            ((uint16_t*)y)[(row) * ldy + (col)] = float_to_bf16(value);                                \
        else                                                                                           \
            ((float*)y)[(row) * ldy + (col)] = (value);                                                \
    } while (0)

/* The tile loop of the bf16 and fp32 kernels: one parallel loop over the blocks of NR rows of nw weights
 * (q/k/v, gate/up share a call); weight i writes columns cols[i].. of y, each output one sum in the same
 * order as in a call of its own. WTYPE / LOAD: the weight element and its 8-lane fp32 loader.
 * Rows of at most 4 KB (SmolLM2's 576 inputs: 1.1 KB) are too short for the hardware prefetcher to get
 * going: the *_short variants fetch the next block's rows (they follow these in memory) as they go.
 * Measured (2 threads, ms at 1 / 8 rows): bf16, 30 x SmolLM2's gate+up 6.0 -> 4.5 / 12.5 -> 8.7, its LM
 * head 2.9 -> 2.0 / 6.3 -> 4.2, but Llama-2-7b's gate/up (8 KB rows) 5.3 -> 6.6 at 1 row; int8 per channel,
 * SmolLM2's gate+up at 1 row 5.4 -> 2.7, its LM head 1.5 -> 1.1, but at 8 rows slower (7b's down 5.8 ->
 * 8.6). Two functions, not a flag: a test inside the loop costs more than the prefetch gains. */
/* SLICE (fp32 weights): several passes over a block (more rows of x than MR) go over k in slices of KC, so
 * that each slice of the block's rows is read from L1 by every pass (4 rows of 4096 fp32, 64 KB, were read
 * from L2 by each); the sums carried between slices are the same fp32 values: the order and the numbers
 * do not change. 2 threads, ms for 2 x Llama-2-7b's gate/up, down, qkv, LM head: at 8 rows 32.8 / 16.1 / 18.8 /
 * 46.3 -> 32.2 / 15.3 / 17.9 / 43.9, at 32 rows 102 / 51 / 58 / 146 -> 93 / 45 / 52 / 142 (unchanged at 1-2
 * rows: one pass). bf16 rows (half the bytes) ran 2-7% slower that way at 8-32 rows: SLICE 0, whole rows. */
#define KC 1024
#define KC_ROWS 64

#define TILE_KERNEL(NAME, WTYPE, LOAD, PREFETCH, SLICE, ROWS)                                      \
    static void NAME(const float* x, int nw, const void* const* ws, const int64_t* ns, const int64_t* first, \
                     const int64_t* cols, void* y, int y_bf16, int64_t ldy, int64_t M, int64_t K, int threads) { \
        int64_t blocks = first[nw];                                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
        for (int64_t gb = 0; gb < blocks; gb++) {                                                      \
            int i = 0;                                                                                 \
            while (gb >= first[i + 1]) i++;                                                            \
            const WTYPE* w = (const WTYPE*)ws[i];                                                      \
            int64_t N = ns[i], n0 = (gb - first[i]) * NR;                                              \
            int nr = N - n0 < NR ? (int)(N - n0) : NR;                                                 \
            const WTYPE* rows[NR];                                                                     \
            for (int b = 0; b < NR; b++) rows[b] = w + (n0 + (b < nr ? b : 0)) * K;                    \
            const char* next = (const char*)(w + (n0 + NR < N ? n0 + NR : n0) * K);                    \
            (void)next;                                                                                \
            int64_t kc = SLICE && M > (ROWS) && M <= KC_ROWS ? SLICE : K;                                    \
            __m256 part[KC_ROWS][NR]; /* the sums so far of every row, between two slices of k */     \
            for (int64_t k0 = 0; k0 < K; k0 += kc) {                                                   \
                int64_t k1 = k0 + kc < K ? k0 + kc : K;                                                \
                for (int64_t m0 = 0; m0 < M; m0 += (ROWS)) {                                           \
                    int mc = M - m0 < (ROWS) ? (int)(M - m0) : (ROWS);                                 \
                    const float* xs = x + m0 * K;                                                      \
                    __m256 acc[ROWS][NR], xv[ROWS];                                                    \
                    for (int a = 0; a < (ROWS); a++)                                                   \
                        for (int b = 0; b < NR; b++)                                                   \
                            acc[a][b] = k0 && a < mc ? part[m0 + a][b] : _mm256_setzero_ps();          \
                    for (int64_t k = k0; k < k1; k += 8) {                                             \
                        LOAD_X_R(xs, K, k, ROWS);                                                      \
                        PREFETCH;                                                                      \
                        for (int b = 0; b < NR; b++) {                                                 \
                            __m256 wv = LOAD(rows[b] + k);                                             \
                            FMA_ROWS_R(wv, b, ROWS);                                                   \
                        }                                                                              \
                    }                                                                                  \
                    if (k1 < K)                                                                        \
                        for (int a = 0; a < mc; a++)                                                   \
                            for (int b = 0; b < NR; b++) part[m0 + a][b] = acc[a][b];                  \
                    else                                                                               \
                        for (int a = 0; a < mc; a++)                                                   \
                            for (int b = 0; b < nr; b++) PUT_Y(m0 + a, cols[i] + n0 + b, hsum(acc[a][b])); \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }

TILE_KERNEL(bf16_long, uint16_t, load_bf16x8, (void)0, 0, MR)
TILE_KERNEL(bf16_short, uint16_t, load_bf16x8, _mm_prefetch(next + k * 2 * NR, _MM_HINT_T0), 0, MR)
/* fp32 weights: oneDNN's packed fp32 weights are as fast at one row, but at 8 rows (2 threads, ms)
 * Llama-2-7b's gate/up 23.0 -> 16.9, its down 13.4 -> 8.1, SmolLM2's LM head 8.1 -> 6.8. Rows of at most
 * 4 KB prefetched from 2 rows of x on (at one row it did not pay: 7.0 -> 7.3 ms for 30 x SmolLM2's gate+up). */
TILE_KERNEL(f32_rows, float, _mm256_loadu_ps, (void)0, KC, MR)
/* 3 rows of x per pass (12 accumulators, 3 rows of x, a weight vector: the 16 registers) from 3 rows on: the
 * same sums, each weight vector used once more (2 threads, ms at 8 rows: Llama-2-7b's gate/up 18.2 -> 17.1,
 * LM head 26.3 -> 24.9, down 8.8 -> 9.2); bf16 weights ran 20-30% slower that way (their conversion spills). */
TILE_KERNEL(f32_rows3, float, _mm256_loadu_ps, (void)0, KC, 3)
TILE_KERNEL(f32_short, float, _mm256_loadu_ps,
            (_mm_prefetch(next + k * 4 * NR, _MM_HINT_T0), _mm_prefetch(next + k * 4 * NR + 64, _MM_HINT_T0)), 0, MR)

/* Prompt-sized M (PANEL_MIN_ROWS rows and more): the tile kernels above convert every weight vector again for
 * each pair of x rows and keep 8 accumulators; here each thread converts a panel of PNB weight rows x PKC
 * inputs to fp32 once (L1-sized: 48 KB), then runs all of a chunk of PMC x rows over it, 3 rows x 4 weight
 * rows at a time (12 accumulators, 3 x vectors, 1 weight vector: the 16 registers). Same sums in the same
 * order as the tile kernels (8 lanes over k in steps of 8, carried between slices of k, lanes added
 * pairwise at the end), so a row's numbers still do not depend on M or on which kernel ran it. 2 threads,
 * GFLOP/s at 16 / 64 / 168 / 512 rows, upcast fp32 GEMM (torch) vs tile kernel vs panels: SmolLM2's gate
 * 51/90/94/79 vs 94/97/97/94 vs 104/134/134/135; Llama-2-7b's gate 55/90/100/118 vs 101/107/107/95 vs
 * 91/129/127/130, its down 58/73/79/80 vs 102/109/98/52 vs 90/130/133/134. */
#define PNB 12   /* weight rows per panel: 3 tiles of PNR */
#define PNR 4
#define PKC 1024 /* inputs per slice of a panel */
#define PMC 96   /* x rows per chunk (a chunk's slice, 384 KB, stays in L2 while the panels pass over it) */
#ifndef PANEL_MIN_ROWS /* where panels overtake the tile kernels (Llama-2-7b's shapes; SmolLM2's from ~12 rows) */
#define PANEL_MIN_ROWS 24
#endif
#ifndef INT8_PANEL_MIN_ROWS /* (the int8 tile kernels convert at less cost) */
#define INT8_PANEL_MIN_ROWS 32
#endif

enum { PANEL_BF16, PANEL_F32, PANEL_INT8 };
typedef struct {
    int kind;
    const void* w;
    const uint16_t* scale; /* int8: bf16 [N, K / g] */
    int64_t g;             /* int8: inputs per scale (K: one per row, applied to the sum as the tile kernel does) */
} panel_weight;

/* dst[0..kc) = row n's inputs k0..k0+kc as the tile kernels' loaders give them. */
static inline void panel_row(const panel_weight* pw, int64_t n, int64_t K, int64_t k0, int64_t kc, float* dst) {
    if (pw->kind == PANEL_BF16) {
        const uint16_t* src = (const uint16_t*)pw->w + n * K + k0;
        for (int64_t k = 0; k < kc; k += 8) _mm256_store_ps(dst + k, load_bf16x8(src + k));
    } else if (pw->kind == PANEL_F32) {
        memcpy(dst, (const float*)pw->w + n * K + k0, sizeof(float) * kc);
    } else {
        const int8_t* src = (const int8_t*)pw->w + n * K + k0;
        if (pw->g == K) {
            for (int64_t k = 0; k < kc; k += 8) _mm256_store_ps(dst + k, load_int8x8(src + k));
        } else {
            const uint16_t* sc = pw->scale + n * (K / pw->g);
            for (int64_t k = 0; k < kc; k += 8) {
                __m256 s = _mm256_set1_ps(bf16_to_float(sc[(k0 + k) / pw->g]));
                _mm256_store_ps(dst + k, _mm256_mul_ps(load_int8x8(src + k), s));
            }
        }
    }
}

/* R rows of x (stride ldx) times PNR panel rows (stride kc) over one slice; sums carried in part (stride PNB)
 * between slices; at the last slice nb (<= PNR) outputs per row are written, times scale[b] when given. */
#define PANEL_TILE(R)                                                                                      \
    static inline __attribute__((always_inline)) void panel_tile##R(                                      \
        const float* x, int64_t ldx, const float* w, int64_t kc, __m256* part, int first, int last, int nb, \
        const float* scale, void* y, int y_bf16, int64_t ldy, int64_t row, int64_t col) {                  \
        __m256 acc[R][PNR];                                                                               \
        for (int a = 0; a < R; a++)                                                                       \
            for (int b = 0; b < PNR; b++) acc[a][b] = first ? _mm256_setzero_ps() : part[a * PNB + b];    \
        for (int64_t k = 0; k < kc; k += 8) {                                                             \
            __m256 xv[R];                                                                                 \
            for (int a = 0; a < R; a++) xv[a] = _mm256_loadu_ps(x + a * ldx + k);                         \
            for (int b = 0; b < PNR; b++) {                                                               \
                __m256 wv = _mm256_load_ps(w + b * kc + k);                                               \
                for (int a = 0; a < R; a++) acc[a][b] = _mm256_fmadd_ps(wv, xv[a], acc[a][b]);            \
            }                                                                                             \
        }                                                                                                 \
        if (!last) {                                                                                      \
            for (int a = 0; a < R; a++)                                                                   \
                for (int b = 0; b < PNR; b++) part[a * PNB + b] = acc[a][b];                              \
        } else {                                                                                          \
            for (int a = 0; a < R; a++)                                                                   \
                for (int b = 0; b < nb; b++)                                                              \
                    PUT_Y(row + a, col + b, scale ? hsum(acc[a][b]) * scale[b] : hsum(acc[a][b]));       \
        }                                                                                                 \
    }
PANEL_TILE(3)
PANEL_TILE(2)
PANEL_TILE(1)

/* y [M, sum of ns] = x [M, K] (fp32) . [W_0; W_1; ...]^T; first / cols as `layout` gives them for PNB rows per block. */
static void panels(const float* x, const panel_weight* ws, const int64_t* ns, const int64_t* first, const int64_t* cols,
                   int nw, void* y, int y_bf16, int64_t ldy, int64_t M, int64_t K, int threads) {
    int64_t blocks = first[nw];
#pragma omp parallel num_threads(threads)
    {
        float* buf = aligned_alloc(64, sizeof(float) * PNB * PKC);
        __m256* part = aligned_alloc(64, sizeof(__m256) * PMC * PNB);
        for (int64_t c0 = 0; c0 < M; c0 += PMC) {
            int64_t c1 = c0 + PMC < M ? c0 + PMC : M;
#pragma omp for schedule(static)
            for (int64_t gb = 0; gb < blocks; gb++) {
                int i = 0;
                while (gb >= first[i + 1]) i++;
                const panel_weight* pw = ws + i;
                int64_t N = ns[i], n0 = (gb - first[i]) * PNB;
                int nb = N - n0 < PNB ? (int)(N - n0) : PNB;
                float scale[PNB];
                int row_scale = pw->kind == PANEL_INT8 && pw->g == K;
                for (int b = 0; b < PNB; b++) scale[b] = row_scale && b < nb ? bf16_to_float(pw->scale[n0 + b]) : 1.0f;
                for (int64_t k0 = 0; k0 < K; k0 += PKC) {
                    int64_t kc = K - k0 < PKC ? K - k0 : PKC;
                    for (int b = 0; b < PNB; b++) panel_row(pw, n0 + (b < nb ? b : 0), K, k0, kc, buf + b * kc);
                    int is_first = k0 == 0, is_last = k0 + kc >= K;
                    for (int64_t m0 = c0; m0 < c1; m0 += 3) {
                        int r = c1 - m0 < 3 ? (int)(c1 - m0) : 3;
                        const float* xs = x + m0 * K + k0;
                        for (int t = 0; t < nb; t += PNR) {
                            int nt = nb - t < PNR ? nb - t : PNR;
                            __m256* p = part + (m0 - c0) * PNB + t;
                            const float* sc = row_scale ? scale + t : NULL;
                            int64_t col = cols[i] + n0 + t;
                            if (r == 3)
                                panel_tile3(xs, K, buf + t * kc, kc, p, is_first, is_last, nt, sc, y, y_bf16, ldy, m0, col);
                            else if (r == 2)
                                panel_tile2(xs, K, buf + t * kc, kc, p, is_first, is_last, nt, sc, y, y_bf16, ldy, m0, col);
                            else
                                panel_tile1(xs, K, buf + t * kc, kc, p, is_first, is_last, nt, sc, y, y_bf16, ldy, m0, col);
                        }
                    }
                }
            }
        }
        free(buf);
        free(part);
    }
}

#define MAX_WEIGHTS 8

/* first[i]: weight i's first block of rows; cols[i]: its first output column (both nw + 1 long). */
static void layout(int nw, const int64_t* ns, int64_t* first, int64_t* cols, int64_t rows_per_block) {
    first[0] = cols[0] = 0;
    for (int i = 0; i < nw; i++) {
        first[i + 1] = first[i] + (ns[i] + rows_per_block - 1) / rows_per_block;
        cols[i + 1] = cols[i] + ns[i];
    }
}

/* panels() over nw weights of one kind without scales (bf16, fp32). */
static void panels_of(int kind, const float* x, int nw, const void* const* ws, const int64_t* ns, void* y, int y_bf16,
                      int64_t M, int64_t K, int threads) {
    panel_weight pw[MAX_WEIGHTS];
    int64_t first[MAX_WEIGHTS + 1], cols[MAX_WEIGHTS + 1];
    for (int i = 0; i < nw; i++) pw[i] = (panel_weight){kind, ws[i], NULL, K};
    layout(nw, ns, first, cols, PNB);
    panels(x, pw, ns, first, cols, nw, y, y_bf16, cols[nw], M, K, threads);
}

/* y [M, sum of ns] = x [M, K] . [W_0; W_1; ...]^T for nw bf16 weights W_i [ns[i], K] (nw <= MAX_WEIGHTS);
 * x fp32 or bf16 (x_bf16), y fp32 or bf16 (y_bf16: each fp32 sum rounded once). */
void lz_linear_bf16_multi(const void* x, int x_bf16, int nw, const void* const* ws, const int64_t* ns, void* y,
                          int y_bf16, int64_t M, int64_t K, int threads) {
    int64_t first[MAX_WEIGHTS + 1], cols[MAX_WEIGHTS + 1];
    layout(nw, ns, first, cols, NR);
    float* buf;
    const float* xf = fp32_rows(x, x_bf16, M * K, &buf);
    if (M >= PANEL_MIN_ROWS)
        panels_of(PANEL_BF16, xf, nw, ws, ns, y, y_bf16, M, K, threads);
    else if (K <= 2048)
        bf16_short(xf, nw, ws, ns, first, cols, y, y_bf16, cols[nw], M, K, threads);
    else
        bf16_long(xf, nw, ws, ns, first, cols, y, y_bf16, cols[nw], M, K, threads);
    free(buf);
}

void lz_linear_bf16(const void* x, int x_bf16, const uint16_t* w, void* y, int y_bf16, int64_t M, int64_t N, int64_t K,
                    int threads) {
    const void* ws[1] = {w};
    lz_linear_bf16_multi(x, x_bf16, 1, ws, &N, y, y_bf16, M, K, threads);
}

/* y [M, sum of ns] = x [M, K] . [W_0; W_1; ...]^T for nw fp32 weights (nw <= MAX_WEIGHTS), all fp32. */
void lz_linear_f32_multi(const float* x, int nw, const void* const* ws, const int64_t* ns, float* y, int64_t M,
                         int64_t K, int threads) {
    if (M >= PANEL_MIN_ROWS && K <= 2048) { /* longer rows: copying fp32 panels costs what they gain (7b shapes) */
        panels_of(PANEL_F32, x, nw, ws, ns, y, 0, M, K, threads);
        return;
    }
    int64_t first[MAX_WEIGHTS + 1], cols[MAX_WEIGHTS + 1];
    layout(nw, ns, first, cols, NR);
    if (K <= 1024 && M > 1) /* 2 threads, 30 x SmolLM2's at 8 rows, ms: gate+up 12.9 -> 10.4, LM head 6.4 -> 5.6 */
        f32_short(x, nw, ws, ns, first, cols, y, 0, cols[nw], M, K, threads);
    else if (M > 2)
        f32_rows3(x, nw, ws, ns, first, cols, y, 0, cols[nw], M, K, threads);
    else
        f32_rows(x, nw, ws, ns, first, cols, y, 0, cols[nw], M, K, threads);
}

/* One scale per row, applied to the sum; int8_rows_short prefetches (see TILE_KERNEL). The tile loop of
 * TILE_KERNEL written again for one weight: through TILE_KERNEL (several weights, with a scale per weight) the
 * compiler's code ran Llama-2-7b's gate/up at one row 13% slower (3.36 -> 3.80 ms). */
#define INT8_ROWS_KERNEL(NAME, PREFETCH)                                                               \
    static void NAME(const float* x, const int8_t* w, const uint16_t* scale, void* y, int y_bf16, int64_t M, \
                     int64_t N, int64_t K, int64_t ldy, int threads) {                                 \
        int64_t blocks = (N + NR - 1) / NR;                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                   \
            int64_t n0 = blk * NR;                                                                     \
            int nr = N - n0 < NR ? (int)(N - n0) : NR;                                                 \
            const int8_t* rows[NR];                                                                    \
            for (int b = 0; b < NR; b++) rows[b] = w + (n0 + (b < nr ? b : 0)) * K;                    \
            const char* next = (const char*)(w + (blk + 1 < blocks ? n0 + NR : n0) * K);               \
            (void)next;                                                                                \
            for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                   \
                int mc = M - m0 < MR ? (int)(M - m0) : MR;                                             \
                const float* xs = x + m0 * K;                                                          \
                __m256 acc[MR][NR], xv[MR];                                                            \
                for (int a = 0; a < MR; a++)                                                           \
                    for (int b = 0; b < NR; b++) acc[a][b] = _mm256_setzero_ps();                      \
                for (int64_t k = 0; k < K; k += 8) {                                                   \
                    LOAD_X(xs, K, k);                                                                  \
                    PREFETCH;                                                                          \
                    for (int b = 0; b < NR; b++) {                                                     \
                        __m256 wv = load_int8x8(rows[b] + k);                                          \
                        FMA_ROWS(wv, b);                                                               \
                    }                                                                                  \
                }                                                                                      \
                for (int a = 0; a < mc; a++)                                                           \
                    for (int b = 0; b < nr; b++)                                                       \
                        PUT_Y(m0 + a, n0 + b, hsum(acc[a][b]) * bf16_to_float(scale[n0 + b]));         \
            }                                                                                          \
        }                                                                                              \
    }

INT8_ROWS_KERNEL(int8_rows, (void)0)
INT8_ROWS_KERNEL(int8_rows_short, if ((k & 15) == 0) _mm_prefetch(next + k * NR, _MM_HINT_T0))

/* 3 to INT8_PANEL_MIN_ROWS - 1 rows of x (batched decoding), one scale per row: each weight vector converted
 * once for up to 8 rows of x (8 accumulators, x read from L1 as the FMAs' operands), where the kernels above
 * convert it again for every pair of rows; the weight read in memory order. The same sums as theirs.
 * 2 threads, ms per step of SmolLM2's 30 layers + LM head (135 MB, streamed from memory) at 4 / 8 / 16 rows:
 * int8_rows 25.2 / 32.4 / 48.6, int8_rows_short 16.4 / 30.0 / 56.7, this 16.1 / 21.2 / 41.3; but with rows of
 * 4096-11008 inputs (Llama-2-7b's) 8 rows of x no longer fit in L1 and it ran 1.3-1.5x slower than int8_rows. */
#define MR_INT8 8
static inline __attribute__((always_inline)) void int8_pass(const int8_t* row, const float* xs, int64_t K, const int R,
                                                            float scale, void* y, int y_bf16, int64_t ldy, int64_t m0,
                                                            int64_t n) {
    __m256 acc[MR_INT8];
    for (int a = 0; a < R; a++) acc[a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 wv = load_int8x8(row + k);
        for (int a = 0; a < R; a++) acc[a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + a * K + k), acc[a]);
    }
    for (int a = 0; a < R; a++) PUT_Y(m0 + a, n, hsum(acc[a]) * scale);
}

static void int8_rows8(const float* x, const int8_t* w, const uint16_t* scale, void* y, int y_bf16, int64_t M,
                       int64_t N, int64_t K, int64_t ldy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* row = w + n * K;
        float s = bf16_to_float(scale[n]);
        int64_t m0 = 0;
        for (; m0 + MR_INT8 <= M; m0 += MR_INT8) int8_pass(row, x + m0 * K, K, MR_INT8, s, y, y_bf16, ldy, m0, n);
        switch (M - m0) { /* the last rows: a pass of constant width each, as above */
        case 7: int8_pass(row, x + m0 * K, K, 7, s, y, y_bf16, ldy, m0, n); break;
        case 6: int8_pass(row, x + m0 * K, K, 6, s, y, y_bf16, ldy, m0, n); break;
        case 5: int8_pass(row, x + m0 * K, K, 5, s, y, y_bf16, ldy, m0, n); break;
        case 4: int8_pass(row, x + m0 * K, K, 4, s, y, y_bf16, ldy, m0, n); break;
        case 3: int8_pass(row, x + m0 * K, K, 3, s, y, y_bf16, ldy, m0, n); break;
        case 2: int8_pass(row, x + m0 * K, K, 2, s, y, y_bf16, ldy, m0, n); break;
        case 1: int8_pass(row, x + m0 * K, K, 1, s, y, y_bf16, ldy, m0, n); break;
        default: break;
        }
    }
}

/* One scale per g inputs of a row: each weight scaled as it is loaded. */
static void int8_groups(const float* x, const int8_t* w, const uint16_t* scale, void* y, int y_bf16, int64_t M, int64_t N,
                        int64_t K, int64_t g, int64_t ldy, int threads) {
    int64_t blocks = (N + NR - 1) / NR, groups = K / g;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * NR;
        int nr = N - n0 < NR ? (int)(N - n0) : NR;
        const int8_t* rows[NR];
        const uint16_t* scales[NR];
        for (int b = 0; b < NR; b++) {
            int64_t n = n0 + (b < nr ? b : 0);
            rows[b] = w + n * K;
            scales[b] = scale + n * groups;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mc = M - m0 < MR ? (int)(M - m0) : MR;
            const float* xs = x + m0 * K;
            __m256 acc[MR][NR], xv[MR];
            for (int a = 0; a < MR; a++)
                for (int b = 0; b < NR; b++) acc[a][b] = _mm256_setzero_ps();
            for (int64_t gi = 0; gi < groups; gi++) {
                float sc[NR]; /* broadcast from memory when used: in registers they would spill */
                for (int b = 0; b < NR; b++) sc[b] = bf16_to_float(scales[b][gi]);
                for (int64_t k = gi * g; k < (gi + 1) * g; k += 8) {
                    LOAD_X(xs, K, k);
                    for (int b = 0; b < NR; b++) {
                        __m256 wv = _mm256_mul_ps(load_int8x8(rows[b] + k), _mm256_broadcast_ss(&sc[b]));
                        FMA_ROWS(wv, b);
                    }
                }
            }
            STORE_Y(1.0f)
        }
    }
}

/* g: inputs per scale, a multiple of 8 (g = K: one scale per row); x fp32 or bf16, y fp32 or bf16. */
void lz_linear_int8(const void* x, int x_bf16, const int8_t* w, const uint16_t* scale, void* y, int y_bf16, int64_t M,
                    int64_t N, int64_t K, int64_t g, int threads) {
    const int64_t ldy = N;
    float* buf;
    const float* xf = fp32_rows(x, x_bf16, M * K, &buf);
    if (M >= INT8_PANEL_MIN_ROWS) {
        panel_weight pw = {PANEL_INT8, w, scale, g};
        int64_t first[2], cols[2];
        layout(1, &N, first, cols, PNB);
        panels(xf, &pw, &N, first, cols, 1, y, y_bf16, ldy, M, K, threads);
    } else if (g == K && M > MR && K <= 2048)
        int8_rows8(xf, w, scale, y, y_bf16, M, N, K, ldy, threads);
    else if (g == K && K <= 2048)
        int8_rows_short(xf, w, scale, y, y_bf16, M, N, K, ldy, threads);
    else if (g == K)
        int8_rows(xf, w, scale, y, y_bf16, M, N, K, ldy, threads);
    else
        int8_groups(xf, w, scale, y, y_bf16, M, N, K, g, ldy, threads);
    free(buf);
}

/* One block of 32 inputs as int8 codes q (in -127..127, rounded to nearest even, as torch.round) times the
 * returned scale absmax / 127 (llama.cpp's Q8_0 activations). */
static inline float q8_block(const float* src, int32_t q[32]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(src + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float dm = _mm_cvtss_f32(h) / 127.0f;
    __m256 idv = _mm256_set1_ps(dm != 0.0f ? 1.0f / dm : 0.0f);
    for (int i = 0; i < 4; i++)
        _mm256_storeu_si256((__m256i*)(q + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv)));
    return dm;
}

/* x [M, K] -> xq [M, K] int8, reordered as the low and high nibbles of the weight bytes come in (below),
 * d [M, K/32], and dsum [M, K/g]: the sum over a group's blocks
 * of d * (sum of the block's xq). */
static void quantize_x_q8(const float* x, int8_t* xq, float* d, float* dsum, int64_t M, int64_t K, int64_t g) {
    int64_t blocks = K / 32, per_group = g / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t blk = 0; blk < blocks; blk++) {
            int32_t q[32];
            float dm = q8_block(x + m * K + blk * 32, q);
            d[m * blocks + blk] = dm;
            /* in each 64 inputs (blocks A, B): A's even inputs, B's even, A's odd, B's odd; a last lone block:
             * its even inputs, then its odd ones */
            int8_t* base = xq + m * K + blk / 2 * 64;
            int lone = blk == blocks - 1 && blocks % 2;
            int8_t* even = base + (blk % 2) * 16;
            int8_t* odd = even + (lone ? 16 : 32);
            int32_t total = 0;
            for (int j = 0; j < 16; j++) {
                even[j] = (int8_t)q[2 * j];
                odd[j] = (int8_t)q[2 * j + 1];
                total += q[2 * j] + q[2 * j + 1];
            }
            int64_t gi = blk / per_group;
            float part = dm * (float)total;
            dsum[m * (K / g) + gi] = blk % per_group ? dsum[m * (K / g) + gi] + part : part;
        }
    }
}

/* Row n's (s, z) pairs as fp32 scales s[gi] and offsets zo[gi] = z - 8 s (so (q - 8) s + z = q s + zo). */
static void int4_row_scales(const uint16_t* pairs, int64_t groups, float* s, float* zo) {
    int64_t gi = 0;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (; gi + 8 <= groups; gi += 8) { /* 8 pairs: each 32-bit lane holds s (low half) and z (high half) */
        __m256i v = _mm256_loadu_si256((const __m256i*)(pairs + 2 * gi));
        __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 zv = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        _mm256_storeu_ps(s + gi, sv);
        _mm256_storeu_ps(zo + gi, _mm256_fnmadd_ps(eight, sv, zv));
    }
    for (; gi < groups; gi++) {
        s[gi] = bf16_to_float(pairs[2 * gi]);
        zo[gi] = bf16_to_float(pairs[2 * gi + 1]) - 8.0f * s[gi];
    }
}

/* Group 32 (one (s, z) pair per block): a weight row's block factors f[kb] = dx[kb] * s[kb] against one row
 * of x, and its offset, the sum over groups of (z - 8 s) * dsum, in one pass over the pairs: the numbers
 * int4_row_scales, the factor loop and `dot` give (the same operations in the same order). */
static float group32_factors(const uint16_t* pairs, int64_t groups, const float* dx, const float* dsum, float* f) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
    __m256 acc = _mm256_setzero_ps();
    int64_t gi = 0;
    for (; gi + 8 <= groups; gi += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(pairs + 2 * gi));
        __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 zv = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        _mm256_storeu_ps(f + gi, _mm256_mul_ps(_mm256_loadu_ps(dx + gi), sv));
        acc = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, sv, zv), _mm256_loadu_ps(dsum + gi), acc);
    }
    float out = hsum(acc);
    for (; gi < groups; gi++) {
        float sg = bf16_to_float(pairs[2 * gi]), zo = bf16_to_float(pairs[2 * gi + 1]) - 8.0f * sg;
        f[gi] = dx[gi] * sg;
        out += zo * dsum[gi];
    }
    return out;
}

/* sum over i of a[i] * b[i] in a fixed order (8 lanes, then the tail). */
static float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float out = hsum(acc);
    for (; i < n; i++) out += a[i] * b[i];
    return out;
}

/* The exact block sums of rows 0..mc-1 of xq against NR4 int4 weight rows, each times its factor d * s,
 * into acc (mc a constant at each call: the compiler keeps acc in registers). */
static inline __attribute__((always_inline)) void int4_block(const int mc, __m256 acc[MR][NR4], const int8_t* xq,
                                                             int64_t K, const uint8_t* const rows[NR4],
                                                             const float* ds, int64_t blocks, const uint8_t* next,
                                                             const uint16_t* next_sz) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t kb = 0;
    for (; kb + 2 <= blocks; kb += 2) { /* two blocks: 32 weight bytes, one madd and one convert */
        __m256i xlo[MR], xhi[MR];
        for (int a = 0; a < mc; a++) {
            xlo[a] = _mm256_loadu_si256((const __m256i*)(xq + a * K + kb * 32));
            xhi[a] = _mm256_loadu_si256((const __m256i*)(xq + a * K + kb * 32 + 32));
        }
        /* the next block's rows, 256 bytes per step (they follow these in memory): 2 KB rows are too short
         * for the hardware prefetcher to get going */
        for (int l = 0; l < 4; l++) _mm_prefetch((const char*)(next + kb * 128 + l * 64), _MM_HINT_T0);
        /* and its (s, z) pairs, 64 bytes per step (all of them at group 32): read at the block's start,
         * they stalled it (2 threads, ms at 1 row, Llama-2-7b's gate/up 3.25 -> 3.02, down 1.52 -> 1.40) */
        _mm_prefetch((const char*)next_sz + kb * 32, _MM_HINT_T0);
        for (int b = 0; b < NR4; b++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(rows[b] + kb * 16));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int a = 0; a < mc; a++) {
                /* 16-bit lanes: each the sum of 4 products of at most 15 * 127: no overflow */
                __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[a]), _mm256_maddubs_epi16(hi, xhi[a]));
                __m256i p = _mm256_madd_epi16(p16, ones); /* lanes 0-3: block kb, 4-7: block kb + 1 */
                const float* f = ds + (a * NR4 + b) * blocks + kb;
                __m256 fv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(f)), _mm_broadcast_ss(f + 1), 1);
                acc[a][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), fv, acc[a][b]);
            }
        }
    }
    for (; kb < blocks; kb++) { /* a last lone block */
        __m256i xv[MR];
        for (int a = 0; a < mc; a++) xv[a] = _mm256_loadu_si256((const __m256i*)(xq + a * K + kb * 32));
        for (int b = 0; b < NR4; b++) {
            __m128i v = _mm_loadu_si128((const __m128i*)(rows[b] + kb * 16));
            __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
            for (int a = 0; a < mc; a++) {
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv[a]), ones);
                acc[a][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(ds + (a * NR4 + b) * blocks + kb),
                                            acc[a][b]);
            }
        }
    }
}

/* g: inputs per (scale, zero), a multiple of 32 dividing K. */
void lz_linear_int4(const void* x_in, int x_bf16, const uint8_t* w, const uint16_t* sz, void* y, int y_bf16, int64_t M,
                    int64_t N, int64_t K, int64_t g, int threads) {
    const int64_t ldy = N;
    float* buf;
    const float* x = fp32_rows(x_in, x_bf16, M * K, &buf);
    int64_t blocks = K / 32, groups = K / g, per_group = g / 32, nblk = (N + NR4 - 1) / NR4;
    int8_t* xq = (int8_t*)malloc(M * K + 64);
    float* d = (float*)malloc(sizeof(float) * (M * blocks + 1));
    float* dsum = (float*)malloc(sizeof(float) * (M * groups + 1));
    quantize_x_q8(x, xq, d, dsum, M, K, g);
    /* decode rows at group 32: each row's factors and offset in one pass over its pairs (below), rather than
     * scales and offsets first, then the factors, then the offset's dot product, three passes (prompts keep
     * those: the scales serve every pair of rows). 2 threads, one row, 2 x Llama-2-7b's layers: 11.6 -> 10.1
     * ms (the kernel runs out of instructions before memory: ~21 GB/s where int8 streams at ~25) */
    const int fused_prep = per_group == 1 && M <= MR;
#pragma omp parallel num_threads(threads)
    {
        /* per thread: the block's scales and offsets, and each (x row, weight row)'s block factors d * s */
        float* s = (float*)malloc(sizeof(float) * NR4 * groups);
        float* zo = (float*)malloc(sizeof(float) * NR4 * groups);
        float* ds = (float*)malloc(sizeof(float) * MR * NR4 * blocks);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            int64_t n0 = blk * NR4;
            int nr = N - n0 < NR4 ? (int)(N - n0) : NR4;
            const uint8_t* rows[NR4];
            const uint16_t* pairs[NR4];
            for (int b = 0; b < NR4; b++) {
                int64_t n = n0 + (b < nr ? b : 0);
                rows[b] = w + n * (K / 2);
                pairs[b] = sz + n * groups * 2;
                if (!fused_prep) int4_row_scales(pairs[b], groups, s + b * groups, zo + b * groups);
            }
            const uint8_t* next = w + (blk + 1 < nblk ? n0 + NR4 : n0) * (K / 2);
            const uint16_t* next_sz = sz + (blk + 1 < nblk ? n0 + NR4 : n0) * groups * 2;
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                int mc = M - m0 < MR ? (int)(M - m0) : MR;
                __m256 acc[MR][NR4];
                float off[MR][NR4];
                for (int a = 0; a < mc; a++)
                    for (int b = 0; b < NR4; b++) {
                        acc[a][b] = _mm256_setzero_ps();
                        if (fused_prep) {
                            off[a][b] = group32_factors(pairs[b], groups, d + (m0 + a) * blocks, dsum + (m0 + a) * groups,
                                                        ds + (a * NR4 + b) * blocks);
                            continue;
                        }
                        off[a][b] = dot(zo + b * groups, dsum + (m0 + a) * groups, groups);
                        float* f = ds + (a * NR4 + b) * blocks;
                        const float* dx = d + (m0 + a) * blocks;
                        const float* sb = s + b * groups;
                        if (per_group == 1)
                            for (int64_t kb = 0; kb < blocks; kb++) f[kb] = dx[kb] * sb[kb];
                        else
                            for (int64_t gi = 0, kb = 0; gi < groups; gi++)
                                for (int64_t j = 0; j < per_group; j++, kb++) f[kb] = dx[kb] * sb[gi];
                    }
                if (mc == MR)
                    int4_block(MR, acc, xq + m0 * K, K, rows, ds, blocks, next, next_sz);
                else
                    int4_block(1, acc, xq + m0 * K, K, rows, ds, blocks, next, next_sz);
                for (int a = 0; a < mc; a++)
                    for (int b = 0; b < nr; b++) PUT_Y(m0 + a, n0 + b, hsum(acc[a][b]) + off[a][b]);
            }
        }
        free(s);
        free(zo);
        free(ds);
    }
    free(xq);
    free(d);
    free(dsum);
    free(buf);
}
