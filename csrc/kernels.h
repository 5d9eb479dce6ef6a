/* The kernels' interface: what one pass does to one 2-D block of its operands, for each dtype and
 * each CPU target the kernels are compiled for (kernels.c instantiates kernels_impl.h once per
 * pair).  The iteration scheme (iter.h) cuts every pass into such blocks; nothing here knows about
 * shapes beyond a block, nor about Python.
 */
#ifndef BNORM_KERNELS_H
#define BNORM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* NumPy's index type, without NumPy's headers (they include Python.h): the kernels, the iteration
 * and the passes see no Python at all, so they run without the GIL by construction.  NumPy defines
 * it as Py_intptr_t, which is intptr_t; where both are seen (args.c, module.c) C11 accepts the
 * repeated typedef of one type, and a compiler error would tell if they ever differed. */
typedef intptr_t npy_intp;

#define BN_MAXOPS 3 /* x, dy, out */

/* Accumulators per feature that a reduction pass fills (all float64). */
enum { BN_ACC_SUM0, BN_ACC_SUM1, BN_ACC_SUM2, BN_NACC };

/* One 2-D block: n0 rows of n1 elements.  Operand k's element (i, j) is at
 * ptr[k] + i * s0[k] + j * s1[k] (bytes), belongs to feature f0 + i * fs0 + j * fs1 (what the
 * statistics are per) and has parameter p0 + i * ps0 + j * ps1 (what the affine parameters are
 * per, when they are not per feature: layer and RMS norm's columns; 0 for batch norm). */
typedef struct {
    npy_intp n0, n1;
    char *ptr[BN_MAXOPS];
    npy_intp s0[BN_MAXOPS], s1[BN_MAXOPS];
    npy_intp f0, fs0, fs1;
    npy_intp p0, ps0, ps1;
    npy_intp pass_size; /* elements in the whole pass (whether they stay in cache) */
} bn_block;

/* Per-feature vectors a pass reads (in the data's compute type: the dtype itself, float32 for
 * half precision) or fills (acc, float64, BN_NACC * nfeat).
 * The elementwise passes compute  out = (x - shift) * scale + offset [+ dy * dyscale]: shift is
 * the mean rounded to the compute type, so that x - shift is exact for data near the mean, also
 * far from zero; the mean's low bits, which the dtype cannot hold, are folded into offset. */
typedef struct {
    const void *shift, *scale, *offset, *dyscale;
    /* the forward's scale and offset, for the backward of a fused ReLU: its mask is
     * (x - shift) * act_scale + act_offset > 0, the pre-activation computed as forward did */
    const void *act_scale, *act_offset;
    double *acc;
    npy_intp nfeat;
    /* Per parameter (the passes with BN_PARAMS), in the compute type: the elementwise passes
     * compute  out = ((x - shift) * scale + offset) * pgamma + pbeta  forward and
     *          out = (x - shift) * scale + offset + dy * dyscale * pgamma  backward, the
     * reductions weigh dy by pgamma, and a fused ReLU's pre-activation is
     * ((x - shift) * act_scale + act_offset) * pgamma + pbeta.  pacc (float64, 2 * nparam):
     * backward's elementwise pass also sums  dy  and  dy * ((x - shift) * act_scale +
     * act_offset)  per parameter (dbeta and dgamma), with the mean already exact there. */
    const void *pgamma, *pbeta;
    double *pacc;
    npy_intp nparam;
} bn_coefs;

/* What a pass reads and does, as flags of the kernels' shared bodies. */
enum { BN_HAS_DY = 1, BN_RELU = 2, BN_PARAMS = 4 };

typedef void (*bn_kernel)(const bn_block *block, const bn_coefs *coefs);

/* The passes, per dtype.  Operands (plan order): stats: x.  bwd_sums: x, dy.  normalize: x, out.
 * bwd_apply: x, dy, out.  Sums are float64; the elementwise passes compute in coef_itemsize's
 * type (float32 for the half-precision dtypes, which are stored in 2 bytes and widened on load). */
typedef struct {
    bn_kernel stats;     /* SUM0 += x - shift, SUM1 += (x - shift)^2 */
    bn_kernel bwd_sums;  /* SUM0 += dy, SUM1 += dy * (x - shift), SUM2 += x - shift */
    bn_kernel normalize; /* out = (x - shift) * scale + offset */
    bn_kernel bwd_apply; /* out = (x - shift) * scale + offset + dy * dyscale */
    /* with a ReLU after the normalization: normalize's out is max(0, out); the backward passes
     * take dy as 0 where the forward's ReLU was not passed */
    bn_kernel normalize_relu, bwd_sums_relu, bwd_apply_relu;
    /* the same with per-parameter gamma and beta (BN_PARAMS), [relu] */
    bn_kernel params_normalize[2], params_bwd_sums[2], params_bwd_apply[2];
    void (*widen)(const char *src, double *dst, npy_intp n); /* n packed elements to float64 */
    size_t itemsize;      /* of an element as stored */
    size_t coef_itemsize; /* of bn_coefs' vectors: 4 (float) or 8 (double) */
} bn_dtype_kernels;

typedef enum { BN_FLOAT32, BN_FLOAT64, BN_FLOAT16, BN_BFLOAT16, BN_NDTYPES } bn_dtype;

/* The CPU targets the kernels are compiled for, from the most widely runnable to the fastest.
 * The x86-64 levels need GCC's or clang's target attribute and __builtin_cpu_supports (both
 * define __GNUC__; MSVC and clang-cl do not): elsewhere only the baseline is built; on aarch64 it
 * is named "neon" (AdvSIMD is part of aarch64's baseline, and the kernels vectorize for it). */
typedef enum {
    BN_TARGET_BASELINE,
#if defined(__x86_64__) && defined(__GNUC__)
#define BN_X86_TARGETS 1
    BN_TARGET_X86_64_V3, /* AVX2 + FMA */
    BN_TARGET_X86_64_V4, /* AVX-512 */
#endif
    BN_NTARGETS
} bn_target;

/* "baseline", "x86-64-v3", "x86-64-v4"; "neon" on aarch64 */
const char *bn_target_name(bn_target target);

/* The best target this CPU runs. */
bn_target bn_best_target(void);

/* Use target's kernels from now on (it must be <= bn_best_target()); chosen once, at import. */
void bn_use_target(bn_target target);
bn_target bn_current_target(void);

/* The kernels of the current target for a dtype. */
const bn_dtype_kernels *bn_kernels(bn_dtype dtype);

/* The passes' size thresholds, in bytes, derived from the data caches (kernels.c says how and
 * why).  Set once at import, before any kernel runs (module.c, under the GIL, before the pool
 * has work), and only read afterwards. */
typedef struct {
    npy_intp l1_way;                /* one way of the L1d: rows this far apart share its sets */
    npy_intp line;                  /* a cache line: streamed outputs cover whole ones */
    npy_intp short_row_apply;       /* rows up to this are short, in the elementwise passes */
    npy_intp short_row_reduce;      /* ... and in the reductions */
    npy_intp long_row;              /* rows from this are long */
    npy_intp streamed;              /* passes over more walk middling rows one at a time */
    npy_intp stream_out;            /* passes touching more write with non-temporal stores */
    npy_intp stream_out_short_rows; /* ... when their rows are short */
} bn_thresholds;

extern bn_thresholds bn_tune;

struct bn_caches;
/* Derive bn_tune from the caches (caches.h). */
void bn_tune_for(const struct bn_caches *c);

/* rstd[i] = 1 / sqrt(var[i] + eps), i < n, on the current target (the same bits on all). */
void bn_rstd(const double *var, double eps, double *rstd, npy_intp n);

#endif
