/* Pass sequencing and per-feature arithmetic (see passes.h).  No Python here. */
#include "passes.h"

#include <math.h>
#include <stdlib.h>

int bn_scratch_alloc(bn_scratch *s, npy_intp nfeat, size_t itemsize)
{
    const size_t n = (size_t)(nfeat ? nfeat : 1);
    enum { NDOUBLES = 6 + BN_NACC, NTYPED = 6 };
    s->block = calloc(n, NDOUBLES * sizeof(double) + NTYPED * itemsize);
    if (!s->block)
        return -1;
    double *d = s->block;
    double **vectors[] = {&s->gamma, &s->beta, &s->mean, &s->var, &s->rstd, &s->resid};
    for (size_t i = 0; i < sizeof vectors / sizeof *vectors; i++)
        *vectors[i] = d + i * n;
    s->acc = d + 6 * n;
    char *t = (char *)(d + NDOUBLES * n);
    char **typed[] = {&s->shift, &s->scale, &s->offset, &s->dyscale, &s->act_scale, &s->act_offset};
    for (size_t i = 0; i < NTYPED; i++)
        *typed[i] = t + i * n * itemsize;
    return 0;
}

void bn_scratch_free(bn_scratch *s)
{
    free(s->block);
    s->block = NULL;
}

/* Walk the operands with the plan the layout gives and run one pass; with parameters (layer and
 * RMS norm) the kernel gets them, in their own numbering. */
static int run_pass(const bn_call *c, bn_kernel kernel, const bn_coefs *coefs, npy_intp nops,
                    const bn_operand *const *ops)
{
    char *data[BN_MAXOPS];
    const npy_intp *strides[BN_MAXOPS];
    for (npy_intp k = 0; k < nops; k++) {
        data[k] = ops[k]->data;
        strides[k] = ops[k]->strides;
    }
    const int params = c->L.nparam > 0;
    bn_coefs with = *coefs;
    if (params) {
        with.pgamma = c->p.scale;
        with.pbeta = c->p.offset;
        with.nparam = c->L.nparam;
    }
    bn_plan plan;
    bn_plan_init(&plan, c->L.ndim, c->L.shape, c->L.fstride, params ? c->L.pstride : NULL, nops,
                 data, strides);
    return bn_run(&plan, kernel, &with);
}

/* Split each mean into shift (the coefficient type) + resid, the mean's low bits that a float32 mean
 * would lose: (x - shift) is exact near the mean, and resid goes into the per-feature offset. */
static void split_mean(bn_call *c)
{
    bn_scratch *s = &c->s;
    const size_t isz = c->K->coef_itemsize;
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        bn_store_as(s->shift, f, s->mean[f], isz);
        s->resid[f] = s->mean[f] - bn_load_as(s->shift, f, isz);
    }
}

/* The statistics pass over s.shift's shift: sum0 = sum(x - shift), sum1 = sum((x - shift)^2). */
static int run_stats(bn_call *c)
{
    const bn_coefs sums = {.shift = c->s.shift, .acc = c->s.acc, .nfeat = c->L.nfeat};
    const bn_operand *ops[1] = {&c->x};
    return run_pass(c, c->K->stats, &sums, 1, ops);
}

/* One pass, float64 sums of data shifted by each feature's first element (close to its mean, so
 * no cancellation). */
int bn_step_stats(bn_call *c)
{
    bn_scratch *s = &c->s;
    const bn_layout *L = &c->L;
    const size_t isz = c->K->coef_itemsize;
    npy_intp kept_strides[BN_MAXDIMS];
    for (npy_intp i = 0; i < L->nkept; i++)
        kept_strides[i] = c->x.strides[L->kept[i]];
    /* each feature's first element as a coefficient: half precision packed in dyscale (free
     * here) first, then widened */
    const int widen = c->K->itemsize != isz;
    bn_gather_first(L->nkept, L->fshape, kept_strides, c->x.data, c->K->itemsize,
                    widen ? s->dyscale : s->shift);
    if (widen) {
        c->K->widen(s->dyscale, s->mean, L->nfeat);
        for (npy_intp f = 0; f < L->nfeat; f++)
            bn_store_as(s->shift, f, s->mean[f], isz);
    }
    if (run_stats(c) < 0)
        return -1;
    const double *sum0 = s->acc, *sum1 = s->acc + L->nfeat;
    for (npy_intp f = 0; f < L->nfeat; f++) {
        const double d = sum0[f] / (double)L->m;
        const double var = sum1[f] / (double)L->m - d * d;
        s->mean[f] = bn_load_as(s->shift, f, isz) + d;
        s->var[f] = var < 0 ? 0 : var; /* rounding only; NaN stays NaN */
    }
    return 0;
}

void bn_step_m2(bn_call *c)
{
    for (npy_intp f = 0; f < c->L.nfeat; f++)
        c->s.var[f] *= (double)c->L.m;
}

int bn_step_rstd(bn_call *c, double eps)
{
    bn_rstd(c->s.var, eps, c->s.rstd, c->L.nfeat);
    return 0;
}

/* normalize's coefficients, after split_mean: scale = rstd * gamma, offset = beta - resid * scale,
 * in the coefficient type (the backward of a fused ReLU recomputes them to find its mask). */
static void normalize_coefs(bn_call *c, char *scale, char *offset)
{
    const bn_scratch *s = &c->s;
    const size_t isz = c->K->coef_itemsize;
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        bn_store_as(scale, f, s->rstd[f] * s->gamma[f], isz);
        bn_store_as(offset, f, s->beta[f] - s->resid[f] * bn_load_as(scale, f, isz), isz);
    }
}

/* As (x - shift) * scale + (beta - resid * scale): one subtraction and one fused multiply-add per
 * element. */
int bn_step_normalize(bn_call *c, int relu)
{
    bn_scratch *s = &c->s;
    split_mean(c);
    normalize_coefs(c, s->scale, s->offset);
    const bn_coefs coefs = {.shift = s->shift, .scale = s->scale, .offset = s->offset,
                            .nfeat = c->L.nfeat};
    const bn_operand *ops[2] = {&c->x, &c->result};
    const bn_kernel k = c->L.nparam ? c->K->params_normalize[relu]
                                    : relu ? c->K->normalize_relu : c->K->normalize;
    return run_pass(c, k, &coefs, 2, ops);
}

/* batch_mean: the low part of the mean is recomputed from the data, so the sums are exact even
 * when mean was rounded to float32. */
int bn_step_bwd_sums(bn_call *c, int batch_mean, int relu)
{
    bn_scratch *s = &c->s;
    const npy_intp nf = c->L.nfeat;
    split_mean(c);
    if (relu)
        normalize_coefs(c, s->act_scale, s->act_offset);
    const bn_coefs sums = {.shift = s->shift, .act_scale = s->act_scale,
                           .act_offset = s->act_offset, .acc = s->acc, .nfeat = nf};
    const bn_operand *ops[2] = {&c->x, &c->dy};
    const bn_kernel k = c->L.nparam ? c->K->params_bwd_sums[relu]
                                    : relu ? c->K->bwd_sums_relu : c->K->bwd_sums;
    if (run_pass(c, k, &sums, 2, ops) < 0)
        return -1;
    double *sum_dy = s->acc, *sum_dyv = s->acc + nf, *sum_v = s->acc + 2 * nf;
    for (npy_intp f = 0; f < nf; f++) {
        if (batch_mean)
            s->resid[f] = sum_v[f] / (double)c->L.m;
        sum_dyv[f] -= s->resid[f] * sum_dy[f];
    }
    return 0;
}

/* The backward's elementwise pass with s.shift, scale, offset, dyscale (and the forward's
 * coefficients for a ReLU's mask).  With parameters it also sums dbeta and dgamma into p.acc,
 * x-hat from the forward's coefficients, made again here from the exact mean. */
static int run_bwd_apply(bn_call *c, int relu)
{
    bn_scratch *s = &c->s;
    const int params = c->L.nparam > 0;
    if (params)
        normalize_coefs(c, s->act_scale, s->act_offset);
    const bn_coefs coefs = {.shift = s->shift, .scale = s->scale, .offset = s->offset,
                            .dyscale = s->dyscale, .act_scale = s->act_scale,
                            .act_offset = s->act_offset, .pacc = params ? c->p.acc : NULL,
                            .nfeat = c->L.nfeat};
    const bn_operand *ops[3] = {&c->x, &c->dy, &c->result};
    const bn_kernel k = params ? c->K->params_bwd_apply[relu]
                               : relu ? c->K->bwd_apply_relu : c->K->bwd_apply;
    return run_pass(c, k, &coefs, 3, ops);
}

/* training: dx = gamma * rstd * (dy - sum_dy / count - xhat * rstd * sum_dy_xmu / count);
 * otherwise dx = gamma * rstd * dy.  With relu, dy masked (the kernels recompute the mask). */
int bn_step_bwd_apply(bn_call *c, double count, int training, int relu)
{
    bn_scratch *s = &c->s;
    const npy_intp nf = c->L.nfeat;
    const size_t isz = c->K->coef_itemsize;
    const double *sum_dy = s->acc, *sum_dy_xmu = s->acc + nf;
    /* dx = a * dy does not read x (without a ReLU's mask to find): the normalize pass over dy,
     * with zero shift and offset */
    const int dy_only = !training && !relu;
    for (npy_intp f = 0; f < nf; f++) {
        const double r = s->rstd[f], a = s->gamma[f] * r;
        bn_store_as(s->scale, f,
                    training ? -a * r * r * sum_dy_xmu[f] / count : dy_only ? a : 0.0, isz);
        const double scale = bn_load_as(s->scale, f, isz);
        bn_store_as(s->offset, f, training ? -a * sum_dy[f] / count - s->resid[f] * scale : 0.0,
                    isz);
        bn_store_as(s->dyscale, f, a, isz);
        if (dy_only)
            bn_store_as(s->shift, f, 0.0, isz);
    }
    if (dy_only) {
        const bn_coefs coefs = {.shift = s->shift, .scale = s->scale, .offset = s->offset,
                                .nfeat = nf};
        const bn_operand *ops[2] = {&c->dy, &c->result};
        return run_pass(c, c->K->normalize, &coefs, 2, ops);
    }
    return run_bwd_apply(c, relu);
}

int bn_step_bwd_apply_given(bn_call *c, double count, int relu)
{
    split_mean(c);
    if (relu)
        normalize_coefs(c, c->s.act_scale, c->s.act_offset);
    return bn_step_bwd_apply(c, count, 1, relu);
}

const double *bn_step_dgamma(bn_call *c)
{
    const npy_intp nf = c->L.nfeat;
    for (npy_intp f = 0; f < nf; f++)
        c->s.var[f] = c->s.rstd[f] * c->s.acc[nf + f];
    return c->s.var;
}

/* ---- layer and RMS norm ---- */

void bn_params_prepare(bn_call *c)
{
    const size_t isz = c->K->coef_itemsize;
    for (npy_intp q = 0; q < c->L.nparam; q++) {
        bn_store_as(c->p.scale, q, c->p.gamma[q], isz);
        bn_store_as(c->p.offset, q, c->p.beta[q], isz);
    }
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        c->s.gamma[f] = 1.0;
        c->s.beta[f] = 0.0;
    }
}

/* about zero, not a shift: x^2's mean is the statistic itself */
int bn_step_mean_square(bn_call *c)
{
    bn_scratch *s = &c->s;
    const size_t isz = c->K->coef_itemsize;
    for (npy_intp f = 0; f < c->L.nfeat; f++)
        bn_store_as(s->shift, f, 0.0, isz);
    if (run_stats(c) < 0)
        return -1;
    const double *sum1 = s->acc + c->L.nfeat;
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        s->mean[f] = 0.0;
        s->var[f] = sum1[f] / (double)c->L.m;
    }
    return 0;
}

int bn_step_rms_bwd_sums(bn_call *c)
{
    if (bn_step_bwd_sums(c, 0, 0) < 0)
        return -1;
    for (npy_intp f = 0; f < c->L.nfeat; f++)
        c->s.acc[f] = 0.0;
    return 0;
}

/* ---- group norm ---- */

void bn_group_combine(const bn_call *c, npy_intp C, npy_intp G, double *gmean, double *gvar)
{
    const npy_intp N = C ? c->L.nfeat / C : 0, per = C / G;
    const double *mean = c->s.mean, *var = c->s.var;
    for (npy_intp n = 0; n < N; n++)
        for (npy_intp g = 0; g < G; g++) {
            const npy_intp f0 = n * C + g * per;
            double mu = 0;
            for (npy_intp i = 0; i < per; i++)
                mu += mean[f0 + i];
            mu /= (double)per;
            double v = 0;
            for (npy_intp i = 0; i < per; i++) {
                const double d = mean[f0 + i] - mu;
                v += var[f0 + i] + d * d;
            }
            gmean[n * G + g] = mu;
            gvar[n * G + g] = v / (double)per;
        }
}

void bn_group_expand(bn_call *c, npy_intp C, npy_intp G, const double *gmean,
                     const double *grstd, const double *cgamma, const double *cbeta)
{
    bn_scratch *s = &c->s;
    const npy_intp per = C / G;
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        const npy_intp n = f / C, ch = f % C, g = n * G + ch / per;
        s->mean[f] = gmean[g];
        s->rstd[f] = grstd[g];
        s->gamma[f] = cgamma[ch];
        s->beta[f] = cbeta[ch];
    }
}

/* Per (sample, group) of K elements, with S0 = sum(dy), S1 = sum(dy * (x - mean)) per channel:
 * dx = rstd * (gamma_c * dy - A / K - (x - mean) * rstd^2 * B / K), A = sum_c gamma_c * S0,
 * B = sum_c gamma_c * S1; dgamma_c = sum_n rstd * S1, dbeta_c = sum_n S0. */
int bn_step_group_backward(bn_call *c, npy_intp C, npy_intp G, int relu, double *dgamma,
                           double *dbeta)
{
    bn_scratch *s = &c->s;
    const size_t isz = c->K->coef_itemsize;
    const npy_intp nf = c->L.nfeat, N = C ? nf / C : 0, per = C / G;
    if (bn_step_bwd_sums(c, 0, relu) < 0)
        return -1;
    double *sum_dy = s->acc, *sum_dyv = s->acc + nf;
    const double *sum_v = s->acc + 2 * nf;
    const double K = (double)c->L.m * (double)per;
    for (npy_intp n = 0; n < N; n++)
        for (npy_intp g = 0; g < G; g++) {
            const npy_intp f0 = n * C + g * per;
            /* the exact mean's distance from the one given (equal for the group's channels) */
            double sv = 0;
            for (npy_intp i = 0; i < per; i++)
                sv += sum_v[f0 + i];
            const double delta = sv / K - s->resid[f0];
            double A = 0, B = 0;
            for (npy_intp i = 0; i < per; i++) {
                const npy_intp f = f0 + i;
                sum_dyv[f] -= delta * sum_dy[f];
                s->resid[f] += delta;
                A += s->gamma[f] * sum_dy[f];
                B += s->gamma[f] * sum_dyv[f];
            }
            const double r = s->rstd[f0];
            for (npy_intp i = 0; i < per; i++) {
                const npy_intp f = f0 + i, ch = g * per + i;
                bn_store_as(s->scale, f, -r * r * r * B / K, isz);
                bn_store_as(s->offset, f, -r * A / K - s->resid[f] * bn_load_as(s->scale, f, isz),
                            isz);
                bn_store_as(s->dyscale, f, s->gamma[f] * r, isz);
                dgamma[ch] += r * sum_dyv[f];
                dbeta[ch] += sum_dy[f];
            }
        }
    if (relu)
        normalize_coefs(c, s->act_scale, s->act_offset);
    return run_bwd_apply(c, relu);
}

void bn_running_update(double *work, const double *batch, double batch_scale, double momentum,
                       npy_intp nfeat)
{
    for (npy_intp f = 0; f < nfeat; f++)
        work[f] = momentum * work[f] + (1.0 - momentum) * (batch_scale * batch[f]);
}
