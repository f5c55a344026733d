/* What llamazoo's CPU kernels share: bf16 <-> fp32 conversions as torch does them, a horizontal sum, and
 * the linear kernels of cpu_linear.c (called by the decode step of cpu_decode.c). */
#ifndef LZ_COMMON_H
#define LZ_COMMON_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void lz_linear_bf16_multi(const void* x, int x_bf16, int nw, const void* const* ws, const int64_t* ns, void* y,
                          int y_bf16, int64_t M, int64_t K, int threads);
void lz_linear_f32_multi(const float* x, int nw, const void* const* ws, const int64_t* ns, float* y, int64_t M,
                         int64_t K, int threads);
void lz_linear_int8(const void* x, int x_bf16, const int8_t* w, const uint16_t* scale, void* y, int y_bf16, int64_t M,
                    int64_t N, int64_t K, int64_t g, int threads);
void lz_linear_int4(const void* x_in, int x_bf16, const uint8_t* w, const uint16_t* sz, void* y, int y_bf16, int64_t M,
                    int64_t N, int64_t K, int64_t g, int threads);
#endif
