/* The kernels, generated from kernels_impl.h for every dtype and CPU target, and the choice of
 * target.  Tuning constants shared by the passes live here, each with the measurement behind it.
 */
#include "kernels.h"

#include "caches.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
/* SSE2 is part of every x86-64 (MSVC says so with _M_X64 alone) */
#if defined(__SSE2__) || defined(_M_X64)
#define BN_SSE2 1
#include <emmintrin.h>
#endif
#ifdef BN_X86_TARGETS
#include <immintrin.h> /* F16C and AVX-512, used only in the functions compiled for them */
#include <cpuid.h>
#endif

/* clang: fuse a product into an add (FMA) exactly where one expression writes a * b + c, on every
 * pass alike, as GCC's -ffp-contract=fast does with these kernels.  Under -ffp-contract=fast clang
 * leaves contraction to its backend, which fuses only a multiply that still feeds an add after
 * vectorization.  In backward_sums without ReLU, clang's SLP vectorizer packed the independent
 * `acc0 += w` and `acc1 += w * v` (the 16 lanes' sums and the tail's) into one two-lane add, so
 * `w * v` was rounded on its own there.  With ReLU, where w is a select, it was fused.  The fused
 * backward's dgamma then differed from the unfused one by an ulp (float64 (6,10,5,4) axis=1,
 * x86-64-v3 and v4: 21 unfused multiplies in bwd_sums_double, none in bwd_sums_relu_double).
 * contract(on) has the front end emit each written a * b + c as one fmuladd, which no later pass
 * splits: an FMA where the target has one, a multiply and an add on the baseline. */
#ifdef __clang__
#pragma clang fp contract(on)
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define BN_INLINE __forceinline
#else
#define BN_INLINE inline __attribute__((always_inline))
#endif
#define BN_LANES 16
#define BN_ROWS 4 /* batch rows side by side */
/* and in the statistics pass, which reads x alone: each group loads and stores the per-feature
 * sums once, so larger groups halve that traffic ((4096,1024) float64 on 2 threads: 0.83 ->
 * 0.55 ms; (256,1024) float32 44 -> 36 us) */
#define BN_STATS_ROWS 8
/* The size thresholds (kernels.h), derived from the data caches at import by bn_tune_for.  The
 * values here are the fallback caches' (caches.h), those of the machine the thresholds were
 * measured on: 32 KiB 8-way L1d, 64-byte lines, 1 MiB L2 per core, 32 MiB L3. */
bn_thresholds bn_tune = {4096, 64, 128, 256, 4096, (npy_intp)4 << 20, (npy_intp)24 << 20,
                         (npy_intp)32 << 20};

void bn_tune_for(const bn_caches *c)
{
    bn_thresholds t;
    /* The line: streamed outputs must cover whole ones (16 bytes at least: SSE2's stores). */
    t.line = c->line >= 16 && (c->line & (c->line - 1)) == 0 ? c->line : BN_FALLBACK_LINE;
    /* One way of the L1d (its size over its ways): addresses this far apart share a set.  4 KiB,
     * a page, where the ways are unknown: L1 caches indexed by virtual address are no larger. */
    t.l1_way = c->l1d_ways > 0 && c->l1d % c->l1d_ways == 0 && c->l1d / c->l1d_ways >= t.line
                   ? c->l1d / c->l1d_ways
                   : 4096;
    /* Short rows, whose group of BN_ROWS side by side spans a few lines that the prefetchers
     * follow as one stream: 2 lines in the elementwise passes, 4 in the reductions (which read x
     * alone, or 8 rows of it).  Long rows, each a stream of its own: one L1 way and up. */
    t.short_row_apply = 2 * t.line;
    t.short_row_reduce = 4 * t.line;
    t.long_row = t.l1_way;
    /* Streamed: more than the L2 caches hold, so that the data comes from the last level or from
     * memory and the prefetchers set the pace: 4 L2s (here two cores' L2s twice over). */
    t.streamed = 4 * c->l2;
    /* The last level cache: the L3, or the L2 where there is no L3.  Outputs stream from 3/4 of
     * it (the pass's inputs and output would not stay there with room to spare), or from all of
     * it for short rows (see BN_STREAM_OUT below). */
    const npy_intp llc = c->l3 > 0 ? c->l3 : c->l2;
    t.stream_out = llc / 4 * 3;
    t.stream_out_short_rows = llc;
    bn_tune = t;
}

/* The thresholds as the kernels name them, with the measurements behind them. */
/* bytes in one way of the L1 data cache: addresses this far apart share a set */
#define BN_L1_WAY (bn_tune.l1_way)
/* Bytes: passes over more than BN_STREAMED bytes (more than this machine's L2 caches hold), of
 * rows longer than the short ones and shorter than BN_LONG_ROW, walk rows one at a time (see
 * rows_one_by_one). */
#define BN_STREAMED (bn_tune.streamed)
#define BN_SHORT_ROW_REDUCE (bn_tune.short_row_reduce)
#define BN_SHORT_ROW_APPLY (bn_tune.short_row_apply)
#define BN_LONG_ROW (bn_tune.long_row)
/* Bytes: an elementwise pass that touches more than this (its inputs and its output) writes the
 * output with non-temporal stores.  A plain store first reads the line it writes; past the last
 * level cache (32 MB here) that read costs a third of the traffic, and the prefetchers of the
 * machine we measured follow a pass that reads per-feature coefficients badly besides: normalize
 * (4096,1024) float32 on one thread 1.3 -> 0.63 ms, (16384,1024) 5.7 -> 3.5 ms; on 8 MiB arrays,
 * whose input and output stay in that cache, plain stores are faster (235 vs 308 us).  24 MiB
 * here: 3/4 of the L3. */
#define BN_STREAM_OUT (bn_tune.stream_out)
/* ... except a pass over short rows (BN_SHORT_ROW_APPLY bytes at most), which reads and writes
 * memory in order: plain stores keep up with that while the pass fits in the last level cache,
 * and leave the output there for the next pass ((8,112,112,32) float32, 24.5 MiB touched, on 2
 * threads: inference forward 458 -> 232 us, training forward 677 -> 458 us; above the cache, at
 * 36.8 MiB, backward_apply's non-temporal stores still win).  32 MiB here: the whole L3. */
#define BN_STREAM_OUT_SHORT_ROWS (bn_tune.stream_out_short_rows)
#define BN_LINE (bn_tune.line) /* bytes in a cache line */

/* Non-temporal stores of n bytes (a multiple of 16) to p, 16-byte aligned at least.  SSE2's 16-byte
 * stores exist in every x86-64 build; the write-combining buffers merge them into whole lines.
 * Elsewhere (aarch64 included, whose stnp is only a hint), plain stores. */
static BN_INLINE void stream_store(char *p, const void *src, size_t n)
{
#ifdef BN_SSE2
    for (size_t q = 0; q < n; q += 16)
        _mm_stream_si128((__m128i *)(p + q),
                         _mm_loadu_si128((const __m128i *)((const char *)src + q)));
#else
    memcpy(p, src, n);
#endif
}

/* t's elements are stored to memory here, before anything reads it.  For stream_store: clang
 * otherwise forwards the tile's element stores into its 16-byte loads, which cuts the tile's
 * arithmetic into pieces its SLP vectorizer no longer takes whole (3 scalar lanes, 8, 4 and 1:
 * backward (64,56,56,64) float32 on one thread, x86-64-v3, 16.8 -> 8.3 ms with this).  GCC
 * vectorizes the tile either way and streams from registers: nothing for it. */
#ifdef __clang__
#define BN_KEEP_IN_MEMORY(t) __asm__("" : : "r"(t) : "memory")
#else
#define BN_KEEP_IN_MEMORY(t) ((void)0)
#endif

/* Non-temporal stores are weakly ordered: fence them before another thread may read the output. */
static BN_INLINE void stream_fence(void)
{
#ifdef BN_SSE2
    _mm_sfence();
#endif
}

/* ---- half precision: IEEE binary16 and bfloat16, as stored bits ----
 * Conversions by integer arithmetic, so that every target (and the compiler's vectorizer) has
 * them: float16 after F. Giesen's round-to-nearest-even conversions (the same results as NumPy's
 * astype, which tests/test_half.py checks for every float16), bfloat16 as ml_dtypes rounds it. */

static BN_INLINE uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static BN_INLINE float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Branch-free: every case is computed and one selected, so that the loops around vectorize. */
static BN_INLINE float f16_to_f32(uint16_t h)
{
    const uint32_t exp_mask = (uint32_t)0x7c00 << 13; /* the exponent, in float's place */
    const uint32_t u = (uint32_t)(h & 0x7fff) << 13, exp = u & exp_mask;
    const uint32_t rebiased = u + ((uint32_t)(127 - 15) << 23);
    const uint32_t inf_nan = rebiased + ((uint32_t)(128 - 16) << 23); /* all exponent bits set */
    /* zero and subnormals: renormalized by float arithmetic (exact) */
    const float subnormal =
        f32_from_bits(rebiased + ((uint32_t)1 << 23)) - f32_from_bits((uint32_t)113 << 23);
    const uint32_t magnitude = exp == exp_mask ? inf_nan
                               : exp == 0      ? f32_bits(subnormal)
                                               : rebiased;
    return f32_from_bits(magnitude | (uint32_t)(h & 0x8000) << 16);
}

static BN_INLINE uint16_t f32_to_f16(float value)
{
    const uint32_t f32_inf = (uint32_t)255 << 23, f16_overflow = (uint32_t)(127 + 16) << 23;
    /* adding this float aligns a subnormal half's 10 bits at the bottom, rounded to nearest even */
    const uint32_t denorm_magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
    const uint32_t all = f32_bits(value), sign = all & 0x80000000u, u = all ^ sign;
    const uint32_t inf_nan = u > f32_inf ? 0x7e00 : 0x7c00; /* nan made quiet */
    const uint32_t subnormal = f32_bits(f32_from_bits(u) + f32_from_bits(denorm_magic)) - denorm_magic;
    /* rebias, round to nearest even */
    const uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xfff + ((u >> 13) & 1)) >> 13;
    const uint32_t h = u >= f16_overflow          ? inf_nan
                       : u < (uint32_t)113 << 23 ? subnormal
                                                  : normal;
    return (uint16_t)(h | sign >> 16);
}

static BN_INLINE float bf16_to_f32(uint16_t h)
{
    return f32_from_bits((uint32_t)h << 16);
}

static BN_INLINE uint16_t f32_to_bf16(float value)
{
    const uint32_t u = f32_bits(value);
    const uint32_t rounded = (u + 0x7fff + (u >> 16 & 1)) >> 16; /* to nearest even */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? u >> 16 | 0x40 : rounded); /* nan: quiet */
}

/* Where a reduction's block finds its parameters (layer and RMS norm): the element (r, l) of a
 * tile starting at parameter p has parameter p + r * ps0 + l * ps1. */
typedef struct {
    const void *gamma, *beta;
    npy_intp p, ps0, ps1;
} bn_param_walk;

/* One build runs on any x86-64: the kernels are compiled for AVX-512, AVX2+FMA and the baseline
 * (SSE2), and bn_use_target picks one at import (the best the CPU has, or BNORM_CPU's cap).
 * kernels_target.h instantiates kernels_impl.h for every dtype, named n_<dtype>_<BN_SUFFIX>. */
#define BN_CAT_(a, b, c) a##_##b##_##c
#define BN_CAT(a, b, c) BN_CAT_(a, b, c)
#define BN_NAME(n) BN_CAT(n, BN_TNAME, BN_SUFFIX)

/* BN_F16C: the target converts float16 with F16C's instructions, a tile at a time (see
 * kernels_target.h); BN_AVX512: with 16 lanes in one register. */
#define BN_SUFFIX baseline
#define BN_TARGET_ATTR
#define BN_F16C 0
#define BN_AVX512 0
#include "kernels_target.h"
#undef BN_TARGET_ATTR
#undef BN_SUFFIX
#undef BN_F16C
#undef BN_AVX512

#ifdef BN_X86_TARGETS
#define BN_SUFFIX v3
#define BN_TARGET_ATTR __attribute__((target("arch=x86-64-v3")))
#define BN_F16C 1
#define BN_AVX512 0
#include "kernels_target.h"
#undef BN_TARGET_ATTR
#undef BN_SUFFIX
#undef BN_F16C
#undef BN_AVX512

#define BN_SUFFIX v4
#define BN_TARGET_ATTR __attribute__((target("arch=x86-64-v4")))
#define BN_F16C 1
#define BN_AVX512 1
#include "kernels_target.h"
#undef BN_TARGET_ATTR
#undef BN_SUFFIX
#undef BN_F16C
#undef BN_AVX512
#endif

/* [target][dtype], in bn_target's order */
static const bn_dtype_kernels *const kernel_table[BN_NTARGETS][BN_NDTYPES] = {
    {&bn_kernels_float_baseline, &bn_kernels_double_baseline, &bn_kernels_float16_baseline,
     &bn_kernels_bfloat16_baseline},
#ifdef BN_X86_TARGETS
    {&bn_kernels_float_v3, &bn_kernels_double_v3, &bn_kernels_float16_v3,
     &bn_kernels_bfloat16_v3},
    {&bn_kernels_float_v4, &bn_kernels_double_v4, &bn_kernels_float16_v4,
     &bn_kernels_bfloat16_v4},
#endif
};

typedef void (*bn_rstd_fn)(const double *var, double eps, double *rstd, npy_intp n);
static const bn_rstd_fn rstd_table[BN_NTARGETS] = {
    rstd_all_baseline,
#ifdef BN_X86_TARGETS
    rstd_all_v3,
    rstd_all_v4,
#endif
};

static const char *const target_names[BN_NTARGETS] = {
#if defined(__aarch64__)
    "neon", /* AdvSIMD is part of aarch64's baseline: the plain build's kernels use it */
#else
    "baseline",
#endif
#ifdef BN_X86_TARGETS
    "x86-64-v3",
    "x86-64-v4",
#endif
};

static bn_target current_target = BN_TARGET_BASELINE;

const char *bn_target_name(bn_target target)
{
    return target_names[target];
}

#ifdef BN_X86_TARGETS
/* CPUID and XGETBV read directly rather than through __builtin_cpu_supports: that builtin needs
 * the compiler's runtime (__cpu_model, in libgcc or compiler-rt), which Apple's toolchain does
 * not provide for x86-64, and clang 14's knows no "f16c".  A level counts when the CPU has every
 * feature the compiler may use for it (-march=x86-64-vN) and the OS saves the registers' state:
 * macOS turns on AVX-512's state only on a thread's first use, so there x86-64-v4 is not picked
 * (v3 is). */
static unsigned bits(unsigned leaf, unsigned sub, int reg)
{
    unsigned r[4] = {0, 0, 0, 0};
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3]))
        return 0;
    return r[reg];
}

enum { EAX, EBX, ECX, EDX }; /* leaves past the CPU's last read as 0 */
#define HAS(value, mask) (((value) & (mask)) == (mask))

bn_target bn_best_target(void)
{
    /* leaf 1, ECX: SSE3, SSSE3, FMA, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, OSXSAVE, AVX, F16C */
    const unsigned v3_leaf1 = 1u << 0 | 1u << 9 | 1u << 12 | 1u << 13 | 1u << 19 | 1u << 20 |
                              1u << 22 | 1u << 23 | 1u << 27 | 1u << 28 | 1u << 29;
    /* leaf 7, EBX: BMI1, AVX2, BMI2; then AVX512F, AVX512DQ, AVX512CD, AVX512BW, AVX512VL */
    const unsigned v3_leaf7 = 1u << 3 | 1u << 5 | 1u << 8;
    const unsigned v4_leaf7 = 1u << 16 | 1u << 17 | 1u << 28 | 1u << 30 | 1u << 31;
    /* leaf 0x80000001, ECX: LAHF/SAHF, LZCNT */
    const unsigned v3_ext = 1u << 0 | 1u << 5;
    if (!HAS(bits(1, 0, ECX), v3_leaf1) ||
        !HAS(bits(7, 0, EBX), v3_leaf7) || !HAS(bits(0x80000001u, 0, ECX), v3_ext))
        return BN_TARGET_BASELINE;
    /* XCR0: the state the OS saves (OSXSAVE, checked above, says XGETBV exists) */
    unsigned xcr0, xcr0_high;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
    if (!HAS(xcr0, 0x6u)) /* SSE and AVX registers */
        return BN_TARGET_BASELINE;
    if (HAS(bits(7, 0, EBX), v4_leaf7) && HAS(xcr0, 0xe0u)) /* opmasks, ZMM 0-15 and 16-31 */
        return BN_TARGET_X86_64_V4;
    return BN_TARGET_X86_64_V3;
}
#else
bn_target bn_best_target(void)
{
    return BN_TARGET_BASELINE;
}
#endif

void bn_use_target(bn_target target)
{
    current_target = target;
}

bn_target bn_current_target(void)
{
    return current_target;
}

const bn_dtype_kernels *bn_kernels(bn_dtype dtype)
{
    return kernel_table[current_target][dtype];
}

void bn_rstd(const double *var, double eps, double *rstd, npy_intp n)
{
    rstd_table[current_target](var, eps, rstd, n);
}
