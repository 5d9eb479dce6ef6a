/* The sequencing of passes and the per-feature arithmetic around them, for one call.
 *
 * Everything here works on plain C structs (the layout of the axes, the operands' data and
 * strides, the per-feature scratch) and holds no Python object, so that it runs without the GIL
 * by construction: module.c releases the GIL around the steps.  Each step returns 0, or -1 when
 * memory ran out (the caller raises MemoryError).
 */
#ifndef BNORM_PASSES_H
#define BNORM_PASSES_H

#include "iter.h"

/* The axes of x: which are kept (features), how features are numbered. */
typedef struct {
    npy_intp ndim;                /* of x */
    const npy_intp *shape;        /* x's (borrowed) */
    npy_intp nkept;               /* feature axes, ascending */
    npy_intp kept[BN_MAXDIMS];
    npy_intp fshape[BN_MAXDIMS];  /* F */
    npy_intp fstride[BN_MAXDIMS]; /* per axis of x: feature-number stride, 0 on batch axes */
    npy_intp nfeat;               /* prod(F) */
    npy_intp m;                   /* elements reduced per feature */
    /* Layer and RMS norm: their parameters are per element of the normalized axes (the batch
     * axes here), numbered in C order: pstride per axis of x as fstride; nparam 0 otherwise. */
    npy_intp pstride[BN_MAXDIMS];
    npy_intp nparam;
} bn_layout;

/* An array of the layout's shape: its data and byte strides (borrowed). */
typedef struct {
    char *data;
    const npy_intp *strides;
} bn_operand;

/* Everything a call computes per feature, float64 unless noted, in one allocation. */
typedef struct {
    double *gamma, *beta, *mean, *var, *rstd;
    double *resid; /* mean minus shift: the low part the coefficient type cannot hold */
    double *acc;   /* BN_NACC * nfeat reduction sums */
    char *shift, *scale, *offset, *dyscale; /* in the kernels' coefficient type */
    char *act_scale, *act_offset; /* the forward's scale and offset, for a fused ReLU's mask */
    void *block;
} bn_scratch;

/* One call: its layout, kernels, operands (x; dy for backward; result, what an elementwise pass
 * writes) and scratch. */
typedef struct {
    bn_layout L;
    const bn_dtype_kernels *K;
    bn_operand x, dy, result;
    bn_scratch s;
    /* per parameter (L.nparam of them): gamma, beta; scale and offset hold them in the
     * coefficient type for the kernels, acc the sums of dy and dy * xhat (dbeta, dgamma) */
    bn_scratch p;
} bn_call;

/* Element f of an aligned per-feature vector of floats (itemsize 4) or doubles (itemsize 8).
 * Typed accesses, not memcpy: a float or double store cannot change the pointers in bn_call, so
 * the per-feature loops keep them in registers (with memcpy, (32,64) calls took 0.3 us longer). */
static inline void bn_store_as(char *dst, npy_intp f, double v, size_t itemsize)
{
    if (itemsize == sizeof(float))
        ((float *)dst)[f] = (float)v;
    else
        ((double *)dst)[f] = v;
}

static inline double bn_load_as(const char *src, npy_intp f, size_t itemsize)
{
    return itemsize == sizeof(float) ? (double)((const float *)src)[f] : ((const double *)src)[f];
}

/* The scratch for nfeat features (zeroed), and its release (bn_scratch_free of a zeroed struct
 * is a no-op).  Returns 0 or -1. */
int bn_scratch_alloc(bn_scratch *s, npy_intp nfeat, size_t itemsize);
void bn_scratch_free(bn_scratch *s);

/* Batch mean and biased variance of x per feature into s.mean, s.var. */
int bn_step_stats(bn_call *c);
/* s.var = m2 = sum((x - mean)^2) per feature, from the variance bn_step_stats left. */
void bn_step_m2(bn_call *c);
/* s.rstd = 1 / sqrt(s.var + eps) (returns 0, to chain with the steps that can fail) */
int bn_step_rstd(bn_call *c, double eps);
/* result = (x - mean) * (rstd * gamma) + beta, then max(0, result) with relu */
int bn_step_normalize(bn_call *c, int relu);

/* acc[0] = sum(dy), acc[1] = sum(dy * (x - mean)) per feature.  batch_mean: mean is x's own
 * batch mean (its low part is recomputed from the data); otherwise mean is taken as given.
 * relu: the forward had a fused ReLU, whose mask is applied to dy (recomputed from x, mean, rstd,
 * gamma and beta as given, the forward's normalize coefficients kept for bn_step_bwd_apply). */
int bn_step_bwd_sums(bn_call *c, int batch_mean, int relu);
/* result = dx from the sums in acc, over count elements per feature (training), or
 * dx = gamma * rstd * dy (not training); relu as for bn_step_bwd_sums, which ran before. */
int bn_step_bwd_apply(bn_call *c, double count, int training, int relu);
/* bn_step_bwd_apply(training) with sums reduced elsewhere (across workers), mean as given. */
int bn_step_bwd_apply_given(bn_call *c, double count, int relu);
/* dgamma per feature, rstd * sum(dy * (x - mean)), into s.var (free in backward); returns it. */
const double *bn_step_dgamma(bn_call *c);

/* ---- layer and RMS norm: features are the rows (the axes not normalized), parameters the
 * columns; the batch-norm steps above take parameters into account when L.nparam > 0 ---- */

/* p.gamma, p.beta into the kernels' coefficient type, and the rows' own gamma and beta to 1 and
 * 0 (the affine parameters are per column). */
void bn_params_prepare(bn_call *c);
/* RMS norm's statistic: s.mean = 0, s.var = mean(x^2) per row (float64 sums of x itself). */
int bn_step_mean_square(bn_call *c);
/* RMS norm's backward sums: bn_step_bwd_sums about zero, without the sum(dy) term (there is no
 * mean to subtract). */
int bn_step_rms_bwd_sums(bn_call *c);

/* ---- group norm: features are (sample, channel) pairs, f = n * C + c, over G groups of
 * C / G consecutive channels; statistics are per (sample, group) ---- */

/* The per-(sample, group) mean and biased variance from bn_step_stats' per-(sample, channel)
 * ones (equal counts: the mean of the means, and the variances' mean plus the means' spread). */
void bn_group_combine(const bn_call *c, npy_intp C, npy_intp G, double *gmean, double *gvar);
/* s.mean, s.rstd, s.gamma, s.beta per (sample, channel): its group's statistics and its
 * channel's parameters (cgamma, cbeta: C each). */
void bn_group_expand(bn_call *c, npy_intp C, npy_intp G, const double *gmean,
                     const double *grstd, const double *cgamma, const double *cbeta);
/* Group norm's backward after bn_group_expand: dx into result, per channel dgamma and dbeta
 * (C each, zeroed by the caller).  The groups' means are taken to be x's own (their low bits
 * recomputed from the data, as batch norm's training backward does). */
int bn_step_group_backward(bn_call *c, npy_intp C, npy_intp G, int relu, double *dgamma,
                           double *dbeta);

/* work = momentum * work + (1 - momentum) * batch_scale * batch, per feature: a running
 * statistic's update (batch_scale M / (M - 1) makes a biased variance unbiased). */
void bn_running_update(double *work, const double *batch, double batch_scale, double momentum,
                       npy_intp nfeat);

#endif
