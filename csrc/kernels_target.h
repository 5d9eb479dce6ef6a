/* kernels_impl.h for every dtype, compiled for the target that kernels.c has defined:
 * BN_TARGET_ATTR (a function attribute) and BN_SUFFIX (the target in the kernels' names).
 * BN_TNAME names the dtype in the kernels' names. */

/* rstd = 1 / sqrt(var + eps) per feature: square root and division are exact-rounded in IEEE
 * arithmetic, so every target gives the same bits, the wider ones sooner (64 features in 2 us
 * calls: 0.2 us with SSE2's two lanes). */
static BN_TARGET_ATTR void BN_CAT(rstd, all, BN_SUFFIX)(const double *var, double eps,
                                                         double *rstd, npy_intp n)
{
    for (npy_intp i = 0; i < n; i++)
        rstd[i] = 1.0 / sqrt(var[i] + eps);
}

#if BN_F16C
/* F16C: a tile of BN_LANES float16 (at src, any alignment) as float32 (exact) and back (to dst,
 * any alignment), rounded to nearest even, as the integer conversions do, in a few instructions
 * instead of ~30 per vector.  A NaN narrows to the integer conversion's quiet NaN (sign | 0x7e00;
 * F16C keeps 9 bits of payload), so that every target gives the same bits; F16C widens a
 * signaling NaN quiet, which the kernels' arithmetic does anyway. */
static BN_TARGET_ATTR BN_INLINE void BN_CAT(f16, widen_tile, BN_SUFFIX)(const void *src,
                                                                       float *dst)
{
#if BN_AVX512
    _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src)));
#else
    _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src)));
    _mm256_storeu_ps(dst + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src + 1)));
#endif
}

static BN_TARGET_ATTR BN_INLINE __m128i BN_CAT(f16, canonical_nan, BN_SUFFIX)(__m128i h)
{
    const __m128i nan = _mm_cmpgt_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)),
                                        _mm_set1_epi16(0x7c00));
    return _mm_andnot_si128(_mm_and_si128(nan, _mm_set1_epi16(0x01ff)), h);
}

static BN_TARGET_ATTR BN_INLINE void BN_CAT(f16, narrow_tile, BN_SUFFIX)(const float *src,
                                                                        void *dst)
{
#if BN_AVX512
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT);
    const __m256i nan = _mm256_cmpgt_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)),
                                           _mm256_set1_epi16(0x7c00));
    _mm256_storeu_si256((__m256i *)dst,
                        _mm256_andnot_si256(_mm256_and_si256(nan, _mm256_set1_epi16(0x01ff)), h));
#else
    for (int q = 0; q < BN_LANES; q += 8)
        _mm_storeu_si128((__m128i *)dst + q / 8,
                         BN_CAT(f16, canonical_nan, BN_SUFFIX)(_mm256_cvtps_ph(
                             _mm256_loadu_ps(src + q), _MM_FROUND_TO_NEAREST_INT)));
#endif
}

/* bfloat16, a tile at a time: the same integer arithmetic as bf16_to_f32 and f32_to_bf16 (nearest
 * even, NaN made quiet), on whole registers; GCC's own vectorization of the scalar conversions
 * inside the loops cost a third more time (normalize (64,56,56,64) on one thread). */
static BN_TARGET_ATTR BN_INLINE void BN_CAT(bf16, widen_tile, BN_SUFFIX)(const void *src,
                                                                        float *dst)
{
#if BN_AVX512
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    _mm512_storeu_si512(dst, _mm512_slli_epi32(u, 16));
#else
    for (int q = 0; q < BN_LANES; q += 8) {
        const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src + q / 8));
        _mm256_storeu_si256((__m256i *)(dst + q), _mm256_slli_epi32(u, 16));
    }
#endif
}

#if !BN_AVX512
/* 8 floats as bfloat16 bits in 32-bit lanes */
static BN_TARGET_ATTR BN_INLINE __m256i BN_CAT(bf16, narrow8, BN_SUFFIX)(const float *src)
{
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i rounded = _mm256_srli_epi32(up, 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}
#endif

static BN_TARGET_ATTR BN_INLINE void BN_CAT(bf16, narrow_tile, BN_SUFFIX)(const float *src,
                                                                         void *dst)
{
#if BN_AVX512
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __m512i rounded = _mm512_srli_epi32(up, 16);
    const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
    const __m512i h = _mm512_mask_mov_epi32(
        rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(h));
#else
    /* every lane is below 0x10000: the unsigned saturating pack keeps it; it packs within 128-bit
     * halves, which the permutation puts back in order */
    const __m256i h = _mm256_packus_epi32(BN_CAT(bf16, narrow8, BN_SUFFIX)(src),
                                          BN_CAT(bf16, narrow8, BN_SUFFIX)(src + 8));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(h, 0xd8));
#endif
}
#endif

#define BN_T float
#define BN_C float
#define BN_TNAME float
#define BN_WIDEN(v) (v)
#define BN_NARROW(v) (v)
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME

#define BN_T double
#define BN_C double
#define BN_TNAME double
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW
#undef BN_WIDEN_TILE
#undef BN_NARROW_TILE

/* half precision: stored in 2 bytes, computed in float32 */
#define BN_T uint16_t
#define BN_C float
#define BN_TNAME float16
#define BN_WIDEN(v) f16_to_f32(v)
#define BN_NARROW(v) f32_to_f16(v)
#if BN_F16C
/* whole tiles: BN_LANES elements from src (BN_T, any alignment) to dst (BN_C), and back */
#define BN_WIDEN_TILE(src, dst) BN_CAT(f16, widen_tile, BN_SUFFIX)(src, dst)
#define BN_NARROW_TILE(src, dst) BN_CAT(f16, narrow_tile, BN_SUFFIX)(src, dst)
#endif
#include "kernels_impl.h"
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW
#undef BN_WIDEN_TILE
#undef BN_NARROW_TILE

#define BN_TNAME bfloat16
#define BN_WIDEN(v) bf16_to_f32(v)
#define BN_NARROW(v) f32_to_bf16(v)
#if BN_F16C
#define BN_WIDEN_TILE(src, dst) BN_CAT(bf16, widen_tile, BN_SUFFIX)(src, dst)
#define BN_NARROW_TILE(src, dst) BN_CAT(bf16, narrow_tile, BN_SUFFIX)(src, dst)
#endif
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW
#undef BN_WIDEN_TILE
#undef BN_NARROW_TILE
