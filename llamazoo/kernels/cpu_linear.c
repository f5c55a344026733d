/* y[M,N] = x[M,K] . W[N,K]^T for small M on x86-64 CPUs with AVX2 and FMA, W held as bf16 or int8.
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
 * Threads: OpenMP over blocks of NR output rows (the process's libgomp, shared with torch).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifndef NR
#define NR 4 /* weight rows per block */
#endif
#ifndef MR
#define MR 2 /* rows of x per pass over a block (3 spills on AVX2: 16 registers) */
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m256 load_bf16x8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_int8x8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* Multiplies the 8-lane weight vector of block row b into the accumulators of rows 0..mc-1. */
#define FMA_ROWS(wv, b)                                                        \
    for (int a = 0; a < MR; a++)                                               \
        if (a < mc) acc[a][b] = _mm256_fmadd_ps(wv, xv[a], acc[a][b]);

#define LOAD_X(xs, stride, k)                                                  \
    for (int a = 0; a < MR; a++)                                               \
        if (a < mc) xv[a] = _mm256_loadu_ps(xs + a * (stride) + (k));

#define STORE_Y(scale_row)                                                     \
    for (int a = 0; a < mc; a++)                                               \
        for (int b = 0; b < nr; b++)                                           \
            y[(m0 + a) * N + n0 + b] = hsum(acc[a][b]) * (scale_row);

void lz_linear_bf16(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * NR;
        int nr = N - n0 < NR ? (int)(N - n0) : NR;
        const uint16_t* rows[NR];
        for (int b = 0; b < NR; b++) rows[b] = w + (n0 + (b < nr ? b : 0)) * K;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mc = M - m0 < MR ? (int)(M - m0) : MR;
            const float* xs = x + m0 * K;
            __m256 acc[MR][NR], xv[MR];
            for (int a = 0; a < MR; a++)
                for (int b = 0; b < NR; b++) acc[a][b] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) {
                LOAD_X(xs, K, k);
                for (int b = 0; b < NR; b++) {
                    __m256 wv = load_bf16x8(rows[b] + k);
                    FMA_ROWS(wv, b);
                }
            }
            STORE_Y(1.0f)
        }
    }
}

/* One scale per row, applied to the sum. */
static void int8_rows(const float* x, const int8_t* w, const uint16_t* scale, float* y, int64_t M, int64_t N,
                      int64_t K, int threads) {
    int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * NR;
        int nr = N - n0 < NR ? (int)(N - n0) : NR;
        const int8_t* rows[NR];
        for (int b = 0; b < NR; b++) rows[b] = w + (n0 + (b < nr ? b : 0)) * K;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mc = M - m0 < MR ? (int)(M - m0) : MR;
            const float* xs = x + m0 * K;
            __m256 acc[MR][NR], xv[MR];
            for (int a = 0; a < MR; a++)
                for (int b = 0; b < NR; b++) acc[a][b] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) {
                LOAD_X(xs, K, k);
                for (int b = 0; b < NR; b++) {
                    __m256 wv = load_int8x8(rows[b] + k);
                    FMA_ROWS(wv, b);
                }
            }
            for (int a = 0; a < mc; a++)
                for (int b = 0; b < nr; b++)
                    y[(m0 + a) * N + n0 + b] = hsum(acc[a][b]) * bf16_to_float(scale[n0 + b]);
        }
    }
}

/* One scale per g inputs of a row: each weight scaled as it is loaded. */
static void int8_groups(const float* x, const int8_t* w, const uint16_t* scale, float* y, int64_t M, int64_t N,
                        int64_t K, int64_t g, int threads) {
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

/* g: inputs per scale, a multiple of 8 (g = K: one scale per row). */
void lz_linear_int8(const float* x, const int8_t* w, const uint16_t* scale, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t g, int threads) {
    if (g == K)
        int8_rows(x, w, scale, y, M, N, K, threads);
    else
        int8_groups(x, w, scale, y, M, N, K, g, threads);
}
