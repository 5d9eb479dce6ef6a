/* The iteration scheme (plans, pieces, threads) and the per-dtype kernels generated from
 * kernels_impl.h. */
#include "kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BN_INLINE inline __attribute__((always_inline))
#define BN_LANES 16

/* One build runs on any x86-64: the kernels are compiled for AVX-512, AVX2+FMA and baseline, and
 * the loader picks the best the CPU has. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BNORM_NO_CLONES)
#define BN_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BN_TARGETS
#endif

#define BN_T float
#define BN_NAME(n) n##_float
#include "kernels_impl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(n) n##_double
#include "kernels_impl.h"
#undef BN_T
#undef BN_NAME

/* ---- threads ---- */

static npy_intp num_threads = 1;

/* GNU OpenMP's thread pool does not survive fork(): a child that enters a parallel region after
 * its parent used the pool hangs.  Such a child runs the kernels on one thread. */
static int pool_started, pool_lost_in_fork;

static void after_fork_in_child(void)
{
    if (__atomic_load_n(&pool_started, __ATOMIC_RELAXED))
        pool_lost_in_fork = 1;
}

int bn_threads_init(void)
{
    return pthread_atfork(NULL, NULL, after_fork_in_child);
}

npy_intp bn_get_num_threads(void)
{
    return pool_lost_in_fork ? 1 : __atomic_load_n(&num_threads, __ATOMIC_RELAXED);
}

void bn_set_num_threads(npy_intp n)
{
    __atomic_store_n(&num_threads, n < 1 ? 1 : n, __ATOMIC_RELAXED);
}

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
    if (p->fstride[outer] != p->fstride[inner] * n)
        return 0;
    for (npy_intp k = 0; k < p->nops; k++)
        if (p->stride[k][outer] != p->stride[k][inner] * n)
            return 0;
    return 1;
}

void bn_plan_init(bn_plan *p, npy_intp ndim, const npy_intp *shape, const npy_intp *fstride,
                  npy_intp nops, char *const *data, const npy_intp *const *strides)
{
    memset(p, 0, sizeof *p);
    p->nops = nops;
    p->size = 1;
    for (npy_intp k = 0; k < nops; k++)
        p->data[k] = data[k];
    npy_intp n = 0;
    for (npy_intp d = 0; d < ndim; d++) {
        p->size *= shape[d];
        if (shape[d] == 1)
            continue;
        p->shape[n] = shape[d];
        p->fstride[n] = fstride[d];
        for (npy_intp k = 0; k < nops; k++)
            p->stride[k][n] = strides[k][d];
        if (p->stride[0][n] < 0) {
            /* Walk operand 0 forwards: the same elements, in memory order. */
            for (npy_intp k = 0; k < nops; k++) {
                p->data[k] += (shape[d] - 1) * p->stride[k][n];
                p->stride[k][n] = -p->stride[k][n];
            }
            p->fbase += (shape[d] - 1) * p->fstride[n];
            p->fstride[n] = -p->fstride[n];
        }
        n++;
    }
    /* Largest strides outermost; a stable insertion sort keeps C order among equals. */
    for (npy_intp i = 1; i < n; i++)
        for (npy_intp j = i; j > 0 && stride_weight(p, j - 1) < stride_weight(p, j); j--)
            swap_dims(p, j - 1, j);
    npy_intp kept = n ? 1 : 0;
    for (npy_intp d = 1; d < n; d++) {
        if (mergeable(p, kept - 1, d)) {
            p->shape[kept - 1] *= p->shape[d];
            p->fstride[kept - 1] = p->fstride[d];
            for (npy_intp k = 0; k < nops; k++)
                p->stride[k][kept - 1] = p->stride[k][d];
        } else {
            if (kept != d)
                swap_dims(p, kept, d);
            kept++;
        }
    }
    /* The kernels take 2-D blocks: pad with outer dimensions of length 1. */
    while (kept < 2) {
        for (npy_intp d = kept; d > 0; d--)
            swap_dims(p, d - 1, d);
        p->shape[0] = 1;
        p->fstride[0] = 0;
        for (npy_intp k = 0; k < nops; k++)
            p->stride[k][0] = 0;
        kept++;
    }
    p->ndim = kept;
}

/* ---- pieces ---- */

/* A piece is a range of one dimension; pieces are what threads take.  Their number depends only
 * on the plan, never on the thread count, so every reduction adds the same partial sums in the
 * same order however many threads run. */
#define BN_PIECE_MIN ((npy_intp)1 << 15) /* elements: below this a piece is not worth a thread */
#define BN_MAX_PIECES ((npy_intp)64)

typedef struct {
    npy_intp dim, count;
    int partials; /* pieces split a batch dimension of a reduction: each sums on its own */
} bn_split;

static bn_split choose_split(const bn_plan *p, const bn_coefs *c)
{
    bn_split best = {0, 1, 0};
    npy_intp want = p->size / BN_PIECE_MIN;
    if (want > BN_MAX_PIECES)
        want = BN_MAX_PIECES;
    if (want < 2)
        return best;
    /* Partial sums cost BN_NACC doubles per feature per piece: keep them under a quarter of the
     * data (splitting a feature dimension needs none). */
    const npy_intp partial_cap = c->nfeat ? p->size / (4 * BN_NACC * c->nfeat) : 0;
    for (npy_intp d = 0; d < p->ndim; d++) {
        const int partials = c->acc != NULL && p->fstride[d] == 0;
        npy_intp count = p->shape[d] < want ? p->shape[d] : want;
        if (partials && count > partial_cap)
            count = partial_cap;
        if (count > best.count) {
            best.dim = d;
            best.count = count;
            best.partials = partials;
        }
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
    npy_intp f = p->fbase + lo * p->fstride[dim];

    bn_block b;
    b.n0 = extent[nd - 2];
    b.n1 = extent[nd - 1];
    b.fs0 = p->fstride[nd - 2];
    b.fs1 = p->fstride[nd - 1];
    for (npy_intp k = 0; k < p->nops; k++) {
        b.s0[k] = p->stride[k][nd - 2];
        b.s1[k] = p->stride[k][nd - 1];
    }
    for (;;) {
        for (npy_intp k = 0; k < p->nops; k++)
            b.ptr[k] = cur[k];
        b.f0 = f;
        kernel(&b, c);
        npy_intp d = nouter - 1;
        for (; d >= 0; d--) {
            for (npy_intp k = 0; k < p->nops; k++)
                cur[k] += p->stride[k][d];
            f += p->fstride[d];
            if (++index[d] < extent[d])
                break;
            for (npy_intp k = 0; k < p->nops; k++)
                cur[k] -= p->stride[k][d] * extent[d];
            f -= p->fstride[d] * extent[d];
            index[d] = 0;
        }
        if (d < 0)
            return;
    }
}

/* Piece i of s.count along s.dim, summing into its own partial sums when it has them. */
static void run_numbered_piece(const bn_plan *p, bn_kernel kernel, const bn_coefs *c, bn_split s,
                               double *partial, npy_intp i)
{
    const npy_intp length = p->shape[s.dim], base = length / s.count, extra = length % s.count;
    const npy_intp lo = i * base + (i < extra ? i : extra);
    const npy_intp hi = lo + base + (i < extra ? 1 : 0);
    bn_coefs mine = *c;
    if (partial)
        mine.acc = partial + i * BN_NACC * c->nfeat;
    run_piece(p, kernel, &mine, s.dim, lo, hi);
}

int bn_run(const bn_plan *p, bn_kernel kernel, const bn_coefs *c)
{
    if (p->size == 0)
        return 0;
    const bn_split s = choose_split(p, c);
    const npy_intp accsize = BN_NACC * c->nfeat;
    double *partial = NULL;
    if (s.partials) {
        partial = calloc((size_t)(s.count * accsize), sizeof(double));
        if (!partial)
            return -1;
    }
    npy_intp threads = bn_get_num_threads();
    if (threads > s.count)
        threads = s.count;
    if (threads > 1)
        __atomic_store_n(&pool_started, 1, __ATOMIC_RELAXED);
    if (threads == 1) {
        /* no parallel region at all: entering one costs more than a small array's work */
        for (npy_intp i = 0; i < s.count; i++)
            run_numbered_piece(p, kernel, c, s, partial, i);
    } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)threads)
#endif
        for (npy_intp i = 0; i < s.count; i++)
            run_numbered_piece(p, kernel, c, s, partial, i);
    }
    if (partial) {
        for (npy_intp i = 0; i < s.count; i++)
            for (npy_intp j = 0; j < accsize; j++)
                c->acc[j] += partial[i * accsize + j];
        free(partial);
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
        memcpy(dst + (size_t)f * itemsize, data, itemsize);
        for (npy_intp d = nkept - 1; d >= 0; d--) {
            data += fstrides[d];
            if (++index[d] < fshape[d])
                break;
            data -= fstrides[d] * fshape[d];
            index[d] = 0;
        }
    }
}
