/* The iteration scheme: plans (iter.h), the pieces a plan is cut into, and running a kernel over
 * them on the pool's threads. */
#include "iter.h"

#include <stdlib.h>
#include <string.h>

#include "pool.h"

/* ---- plans ---- */

static npy_intp abs_intp(npy_intp v)
{
    return v < 0 ? -v : v;
}

static npy_intp stride_weight(const bn_plan *p, npy_intp d)
{
    npy_intp w = 0;
    for (npy_intp k = 0; k < p->nops; k++)
        w += abs_intp(p->stride[k][d]);
    return w;
}

static void swap_dims(bn_plan *p, npy_intp a, npy_intp b)
{
    npy_intp t = p->shape[a];
    p->shape[a] = p->shape[b];
    p->shape[b] = t;
    t = p->fstride[a];
    p->fstride[a] = p->fstride[b];
    p->fstride[b] = t;
    t = p->pstride[a];
    p->pstride[a] = p->pstride[b];
    p->pstride[b] = t;
    for (npy_intp k = 0; k < p->nops; k++) {
        t = p->stride[k][a];
        p->stride[k][a] = p->stride[k][b];
        p->stride[k][b] = t;
    }
}

/* Dimension outer can absorb dimension inner (next to it) when stepping outer once is the same as
 * stepping inner shape[inner] times, for every operand and for the feature number. */
static int mergeable(const bn_plan *p, npy_intp outer, npy_intp inner)
{
    const npy_intp n = p->shape[inner];
    if (p->fstride[outer] != p->fstride[inner] * n || p->pstride[outer] != p->pstride[inner] * n)
        return 0;
    for (npy_intp k = 0; k < p->nops; k++)
        if (p->stride[k][outer] != p->stride[k][inner] * n)
            return 0;
    return 1;
}

/* Step 1: copy the dimensions in, leaving out those of length 1 (they move nothing). */
static void copy_dims_without_unit(bn_plan *p, npy_intp ndim, const npy_intp *shape,
                                   const npy_intp *fstride, const npy_intp *pstride,
                                   const npy_intp *const *strides)
{
    npy_intp n = 0;
    for (npy_intp d = 0; d < ndim; d++) {
        p->size *= shape[d];
        if (shape[d] == 1)
            continue;
        p->shape[n] = shape[d];
        p->fstride[n] = fstride[d];
        p->pstride[n] = pstride ? pstride[d] : 0;
        for (npy_intp k = 0; k < p->nops; k++)
            p->stride[k][n] = strides[k][d];
        n++;
    }
    p->ndim = n;
}

/* Step 2: walk operand 0 forwards along every dimension: the same elements, in memory order.  The
 * box starts at each dimension's far end, and so does the feature numbering. */
static void flip_negative_strides(bn_plan *p)
{
    for (npy_intp d = 0; d < p->ndim; d++) {
        if (p->stride[0][d] >= 0)
            continue;
        for (npy_intp k = 0; k < p->nops; k++) {
            p->data[k] += (p->shape[d] - 1) * p->stride[k][d];
            p->stride[k][d] = -p->stride[k][d];
        }
        p->fbase += (p->shape[d] - 1) * p->fstride[d];
        p->fstride[d] = -p->fstride[d];
        p->pbase += (p->shape[d] - 1) * p->pstride[d];
        p->pstride[d] = -p->pstride[d];
    }
}

/* Step 3: largest strides outermost; a stable insertion sort keeps C order among equals. */
static void sort_by_stride(bn_plan *p)
{
    for (npy_intp i = 1; i < p->ndim; i++)
        for (npy_intp j = i; j > 0 && stride_weight(p, j - 1) < stride_weight(p, j); j--)
            swap_dims(p, j - 1, j);
}

/* Step 4: fold each dimension into the one outside it where stepping that one is the same as
 * stepping through all of this one (see mergeable). */
static void merge_contiguous(bn_plan *p)
{
    npy_intp kept = p->ndim ? 1 : 0;
    for (npy_intp d = 1; d < p->ndim; d++) {
        if (mergeable(p, kept - 1, d)) {
            p->shape[kept - 1] *= p->shape[d];
            p->fstride[kept - 1] = p->fstride[d];
            p->pstride[kept - 1] = p->pstride[d];
            for (npy_intp k = 0; k < p->nops; k++)
                p->stride[k][kept - 1] = p->stride[k][d];
        } else {
            if (kept != d)
                swap_dims(p, kept, d);
            kept++;
        }
    }
    p->ndim = kept;
}

/* Step 5: the kernels take 2-D blocks: pad with outer dimensions of length 1. */
static void pad_to_2d(bn_plan *p)
{
    while (p->ndim < 2) {
        for (npy_intp d = p->ndim; d > 0; d--)
            swap_dims(p, d - 1, d);
        p->shape[0] = 1;
        p->fstride[0] = 0;
        p->pstride[0] = 0;
        for (npy_intp k = 0; k < p->nops; k++)
            p->stride[k][0] = 0;
        p->ndim++;
    }
}

void bn_plan_init(bn_plan *p, npy_intp ndim, const npy_intp *shape, const npy_intp *fstride,
                  const npy_intp *pstride, npy_intp nops, char *const *data,
                  const npy_intp *const *strides)
{
    memset(p, 0, sizeof *p);
    p->nops = nops;
    p->size = 1;
    for (npy_intp k = 0; k < nops; k++)
        p->data[k] = data[k];
    copy_dims_without_unit(p, ndim, shape, fstride, pstride, strides);
    flip_negative_strides(p);
    sort_by_stride(p);
    merge_contiguous(p);
    pad_to_2d(p);
}

/* ---- pieces ---- */

/* A piece is a range of one dimension; pieces are what threads take.  Their number depends only
 * on the plan, never on the thread count, so every reduction adds the same partial sums in the
 * same order however many threads run. */
#define BN_PIECE_MIN ((npy_intp)1 << 15) /* elements: below this a piece is not worth a thread */
#define BN_MAX_PIECES ((npy_intp)64)
/* A reduction split along the batch sums each piece on its own, and the caller adds up the
 * partial sums after the pass: fewer pieces, as many as a machine with 16 cores needs
 * ((4096,1024) float32 on 2 threads, forward 1.13 -> 1.02 ms, backward 2.06 -> 1.90 ms). */
#define BN_MAX_PARTIALS ((npy_intp)16)
/* A reduction's pieces are this many times larger: a piece along the batch also zeroes its
 * partial sums and the caller adds them, and one along the features reads short strided runs
 * ((256,1024) float32 on 2 threads, 8 -> 2 pieces: statistics 36 -> 29 us, backward sums 53 ->
 * 45 us, forward 57 -> 49 us; one thread gains too, and so do (2048,256) and (8,56,56,64)). */
#define BN_REDUCE_PIECE_SCALE 4

typedef struct {
    npy_intp dim, count;
    int partials;  /* pieces split a batch dimension of a reduction: each sums on its own */
    int ppartials; /* the same for per-parameter sums, split along a dimension of features */
} bn_split;

static bn_split choose_split(const bn_plan *p, const bn_coefs *c)
{
    bn_split best = {0, 1, 0, 0};
    npy_intp want = p->size / BN_PIECE_MIN;
    if (want > BN_MAX_PIECES)
        want = BN_MAX_PIECES;
    if (c->acc != NULL || c->pacc != NULL) {
        want /= BN_REDUCE_PIECE_SCALE;
        if (want > BN_MAX_PARTIALS)
            want = BN_MAX_PARTIALS;
    }
    if (want < 2)
        return best;
    /* Partial sums cost BN_NACC doubles per feature per piece: keep them under a quarter of the
     * data (splitting a feature dimension needs none). */
    const npy_intp partial_cap = c->nfeat ? p->size / (4 * BN_NACC * c->nfeat) : 0;
    const npy_intp ppartial_cap = c->nparam ? p->size / (4 * 2 * c->nparam) : 0;
    for (npy_intp d = 0; d < p->ndim; d++) {
        const int partials = c->acc != NULL && p->fstride[d] == 0;
        const int ppartials = c->pacc != NULL && p->pstride[d] == 0;
        npy_intp count = p->shape[d] < want ? p->shape[d] : want;
        if (partials && count > partial_cap)
            count = partial_cap;
        if (ppartials && count > ppartial_cap)
            count = ppartial_cap;
        if (count > best.count) {
            best.dim = d;
            best.count = count;
            best.partials = partials;
            best.ppartials = ppartials;
        }
        /* The outermost dimension that gives half the pieces wanted is enough: its pieces are
         * long runs of memory, where an inner dimension's are short runs in every outer step
         * (group norm NHWC (32,56,56,64) float32, 32 pieces of one sample instead of 64 of 49
         * rows in each sample: forward on 2 threads 3.9 -> 1.4 ms; batch norm NCHW
         * (32,64,56,56) split by sample, not channel: forward 2.9 -> 1.2 ms). */
        if (2 * best.count >= want)
            break;
    }
    return best;
}

static void run_piece(const bn_plan *p, bn_kernel kernel, const bn_coefs *c, npy_intp dim,
                      npy_intp lo, npy_intp hi)
{
    const npy_intp nd = p->ndim, nouter = nd - 2;
    npy_intp extent[BN_MAXDIMS], index[BN_MAXDIMS];
    char *cur[BN_MAXOPS];
    memcpy(extent, p->shape, sizeof(npy_intp) * (size_t)nd);
    extent[dim] = hi - lo;
    for (npy_intp d = 0; d < nd; d++) {
        if (extent[d] == 0)
            return;
        index[d] = 0;
    }
    for (npy_intp k = 0; k < p->nops; k++)
        cur[k] = p->data[k] + lo * p->stride[k][dim];
    npy_intp f = p->fbase + lo * p->fstride[dim], q = p->pbase + lo * p->pstride[dim];

    bn_block b;
    b.n0 = extent[nd - 2];
    b.n1 = extent[nd - 1];
    b.fs0 = p->fstride[nd - 2];
    b.fs1 = p->fstride[nd - 1];
    b.ps0 = p->pstride[nd - 2];
    b.ps1 = p->pstride[nd - 1];
    b.pass_size = p->size;
    for (npy_intp k = 0; k < p->nops; k++) {
        b.s0[k] = p->stride[k][nd - 2];
        b.s1[k] = p->stride[k][nd - 1];
    }
    for (;;) {
        for (npy_intp k = 0; k < p->nops; k++)
            b.ptr[k] = cur[k];
        b.f0 = f;
        b.p0 = q;
        kernel(&b, c);
        npy_intp d = nouter - 1;
        for (; d >= 0; d--) {
            for (npy_intp k = 0; k < p->nops; k++)
                cur[k] += p->stride[k][d];
            f += p->fstride[d];
            q += p->pstride[d];
            if (++index[d] < extent[d])
                break;
            for (npy_intp k = 0; k < p->nops; k++)
                cur[k] -= p->stride[k][d] * extent[d];
            f -= p->fstride[d] * extent[d];
            q -= p->pstride[d] * extent[d];
            index[d] = 0;
        }
        if (d < 0)
            return;
    }
}

/* A pass over a plan as a job for the pool. */
typedef struct {
    bn_job job;
    const bn_plan *plan;
    bn_kernel kernel;
    const bn_coefs *coefs;
    bn_split split;
    double *partial, *ppartial;
} bn_pass;

/* Piece i of split.count along split.dim, summing into its own partial sums when it has them. */
static void run_numbered_piece(const bn_job *job, npy_intp i)
{
    const bn_pass *pass = (const bn_pass *)job;
    const bn_split s = pass->split;
    const npy_intp length = pass->plan->shape[s.dim], base = length / s.count,
                   extra = length % s.count;
    const npy_intp lo = i * base + (i < extra ? i : extra);
    const npy_intp hi = lo + base + (i < extra ? 1 : 0);
    bn_coefs mine = *pass->coefs;
    if (pass->partial) {
        /* zeroed here, in parallel, and left in this thread's cache */
        mine.acc = pass->partial + i * BN_NACC * mine.nfeat;
        memset(mine.acc, 0, (size_t)(BN_NACC * mine.nfeat) * sizeof(double));
    }
    if (pass->ppartial) {
        mine.pacc = pass->ppartial + i * 2 * mine.nparam;
        memset(mine.pacc, 0, (size_t)(2 * mine.nparam) * sizeof(double));
    }
    run_piece(pass->plan, pass->kernel, &mine, s.dim, lo, hi);
}

int bn_run(const bn_plan *p, bn_kernel kernel, const bn_coefs *c)
{
    if (p->size == 0)
        return 0;
    bn_pass pass = {{run_numbered_piece, 0, 0, 0}, p, kernel, c, choose_split(p, c), NULL,
                    NULL};
    pass.job.count = pass.split.count;
    const npy_intp accsize = BN_NACC * c->nfeat, paccsize = 2 * c->nparam;
    if (pass.split.partials) {
        pass.partial = malloc((size_t)(pass.split.count * accsize) * sizeof(double));
        if (!pass.partial)
            return -1;
    }
    if (pass.split.ppartials) {
        pass.ppartial = malloc((size_t)(pass.split.count * paccsize) * sizeof(double));
        if (!pass.ppartial) {
            free(pass.partial);
            return -1;
        }
    }
    const npy_intp threads = bn_get_num_threads();
    bn_run_job(&pass.job, threads < pass.job.count ? threads : pass.job.count);
    if (pass.partial) {
        for (npy_intp i = 0; i < pass.split.count; i++)
            for (npy_intp j = 0; j < accsize; j++)
                c->acc[j] += pass.partial[i * accsize + j];
        free(pass.partial);
    }
    if (pass.ppartial) {
        for (npy_intp i = 0; i < pass.split.count; i++)
            for (npy_intp j = 0; j < paccsize; j++)
                c->pacc[j] += pass.ppartial[i * paccsize + j];
        free(pass.ppartial);
    }
    return 0;
}

void bn_gather_first(npy_intp nkept, const npy_intp *fshape, const npy_intp *fstrides,
                     const char *data, size_t itemsize, char *dst)
{
    npy_intp index[BN_MAXDIMS] = {0};
    npy_intp nfeat = 1;
    for (npy_intp d = 0; d < nkept; d++)
        nfeat *= fshape[d];
    for (npy_intp f = 0; f < nfeat; f++) {
        /* constant sizes make each copy a move, not a call to memcpy */
        if (itemsize == 2)
            memcpy(dst + (size_t)f * 2, data, 2);
        else if (itemsize == 4)
            memcpy(dst + (size_t)f * 4, data, 4);
        else
            memcpy(dst + (size_t)f * 8, data, 8);
        for (npy_intp d = nkept - 1; d >= 0; d--) {
            data += fstrides[d];
            if (++index[d] < fshape[d])
                break;
            data -= fstrides[d] * fshape[d];
            index[d] = 0;
        }
    }
}
