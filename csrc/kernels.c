/* The iteration scheme (plans, pieces, threads) and the per-dtype kernels generated from
 * kernels_impl.h. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "kernels.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BN_INLINE inline __attribute__((always_inline))
#define BN_LANES 16
#define BN_ROWS 4 /* batch rows side by side */
/* and in the statistics pass, which reads x alone: each group loads and stores the per-feature
 * sums once, so larger groups halve that traffic ((4096,1024) float64 on 2 threads: 0.83 ->
 * 0.55 ms; (256,1024) float32 44 -> 39 us) */
#define BN_STATS_ROWS 8
/* bytes in one way of the L1 data cache: addresses this far apart share a set */
#define BN_L1_WAY 4096
/* Bytes: passes over more than BN_STREAMED bytes (more than this machine's L2 caches hold), of
 * rows longer than the short ones and shorter than BN_LONG_ROW, walk rows one at a time (see
 * rows_one_by_one). */
#define BN_STREAMED ((npy_intp)4 << 20)
#define BN_SHORT_ROW_REDUCE 256
#define BN_SHORT_ROW_APPLY 128
#define BN_LONG_ROW 4096
/* Bytes: an elementwise pass that touches more than this (its inputs and its output) writes the
 * output with non-temporal stores.  A plain store first reads the line it writes; past the last
 * level cache (32 MB here) that read costs a third of the traffic, and the prefetchers of the
 * machine we measured follow a pass that reads per-feature coefficients badly besides: normalize
 * (4096,1024) float32 on one thread 1.03 -> 0.62 ms, (16384,1024) 5.7 -> 3.5 ms; on 8 MiB arrays,
 * whose input and output stay in that cache, plain stores are faster (235 vs 308 us). */
#define BN_STREAM_OUT ((npy_intp)24 << 20)
/* ... except a pass over short rows (BN_SHORT_ROW_APPLY bytes at most), which reads and writes
 * memory in order: plain stores keep up with that while the pass fits in the last level cache,
 * and leave the output there for the next pass ((8,112,112,32) float32, 24.5 MiB touched, on 2
 * threads: inference forward 458 -> 232 us, training forward 677 -> 458 us; above the cache, at
 * 36.8 MiB, backward_apply's non-temporal stores still win). */
#define BN_STREAM_OUT_SHORT_ROWS ((npy_intp)32 << 20)
#define BN_LINE 64 /* bytes in a cache line */

/* One build runs on any x86-64: the kernels are compiled for AVX-512, AVX2+FMA and baseline, and
 * the loader picks the best the CPU has. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BNORM_NO_CLONES)
#define BN_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BN_TARGETS
#endif

/* Non-temporal stores of n bytes (a multiple of 16) to p, 16-byte aligned at least.  SSE2's 16-byte
 * stores exist in every x86-64 build; the write-combining buffers merge them into whole lines.
 * Elsewhere, plain stores. */
static BN_INLINE void stream_store(char *p, const void *src, size_t n)
{
#if defined(__SSE2__)
    for (size_t q = 0; q < n; q += 16)
        _mm_stream_si128((__m128i *)(p + q),
                         _mm_loadu_si128((const __m128i *)((const char *)src + q)));
#else
    memcpy(p, src, n);
#endif
}

/* Non-temporal stores are weakly ordered: fence them before another thread may read the output. */
static BN_INLINE void stream_fence(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

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

/* A pool of our own rather than OpenMP: GNU OpenMP's idle workers spin, and in a NumPy training
 * loop that spinning takes the cores OpenBLAS needs for the next matmul (bnorm's layer was slower
 * than NumPy's in examples/digits_mlp.py).  These workers sleep between jobs.  The caller works on
 * the job itself and takes pieces from a shared counter, so a worker that wakes late finds the job
 * done and costs nothing; a small job never waits for a thread to start. */

typedef struct bn_job bn_job;
typedef void (*bn_piece_fn)(const bn_job *job, npy_intp piece);

struct bn_job {
    bn_piece_fn run;
    npy_intp count;      /* pieces */
    npy_intp next;       /* the next piece to take (atomic) */
    npy_intp helpers;    /* workers still wanted (under pool_lock) */
};

static npy_intp num_threads = 1;

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER; /* one job on the pool at a time */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER; /* a job was posted */
static pthread_cond_t pool_idle = PTHREAD_COND_INITIALIZER; /* the last helper left a job */
/* Written under pool_lock; the two counters are also read outside it, atomically, to spin. */
static bn_job *pool_job;      /* the posted job, NULL once its caller has finished its share */
static npy_intp pool_posted;  /* jobs posted so far: a worker's wake-up condition */
static npy_intp pool_workers; /* workers started */
static npy_intp pool_busy;    /* workers inside the posted job */

/* Before sleeping on a condition, spin this long for it: the passes of one forward or backward
 * come microseconds apart and a sleeping thread takes longer than that to wake.  Short enough
 * not to keep a core from BLAS's threads between a network's layers. */
#define BN_SPIN_NS 20000

static npy_intp now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (npy_intp)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Spin while (*counter == value) == equal, for at most BN_SPIN_NS (call without pool_lock). */
static void spin_while(const npy_intp *counter, int equal, npy_intp value)
{
    const npy_intp deadline = now_ns() + BN_SPIN_NS;
    for (npy_intp i = 1; (__atomic_load_n(counter, __ATOMIC_ACQUIRE) == value) == equal; i++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (i % 64 == 0 && now_ns() > deadline)
            return;
    }
}

static void take_pieces(bn_job *job)
{
    npy_intp i;
    while ((i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->count)
        job->run(job, i);
}

/* arg: pool_posted when the worker was started, so that it takes the job being posted. */
static void *worker_main(void *arg)
{
    npy_intp seen = (npy_intp)(intptr_t)arg;
    for (;;) {
        spin_while(&pool_posted, 1, seen);
        pthread_mutex_lock(&pool_lock);
        while (pool_posted == seen)
            pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_posted;
        bn_job *job = pool_job;
        if (job && job->helpers > 0) {
            job->helpers--;
            __atomic_store_n(&pool_busy, pool_busy + 1, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&pool_lock);
            take_pieces(job);
            pthread_mutex_lock(&pool_lock);
            __atomic_store_n(&pool_busy, pool_busy - 1, __ATOMIC_RELEASE);
            if (pool_busy == 0)
                pthread_cond_signal(&pool_idle);
        }
        pthread_mutex_unlock(&pool_lock);
    }
    return NULL;
}

/* Start workers until there are `want` (under pool_lock); returns how many there are. */
static npy_intp start_workers(npy_intp want)
{
    while (pool_workers < want) {
        pthread_t thread;
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0)
            break;
        int failed = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) != 0 ||
                     pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)pool_posted) != 0;
        pthread_attr_destroy(&attr);
        if (failed)
            break; /* fewer threads is slower, never wrong */
        pool_workers++;
    }
    return pool_workers < want ? pool_workers : want;
}

/* Run job->run on every piece, with up to `threads` threads including the caller's. */
static void run_job(bn_job *job, npy_intp threads)
{
    /* Another caller has the pool (Python threads calling bnorm at once): the cores are busy
     * anyway, this caller does its job alone. */
    if (threads < 2 || pthread_mutex_trylock(&job_lock) != 0) {
        take_pieces(job);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    job->helpers = start_workers(threads - 1);
    if (job->helpers > 0) {
        pool_job = job;
        __atomic_store_n(&pool_posted, pool_posted + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&pool_wake);
    }
    pthread_mutex_unlock(&pool_lock);
    take_pieces(job);
    pthread_mutex_lock(&pool_lock);
    pool_job = NULL; /* a worker waking from now on must not touch the job */
    pthread_mutex_unlock(&pool_lock);
    spin_while(&pool_busy, 0, 0);
    pthread_mutex_lock(&pool_lock);
    while (pool_busy > 0)
        pthread_cond_wait(&pool_idle, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&job_lock);
}

/* fork() copies only the calling thread: hold the locks across it so that the child gets them in
 * a known state, and let the child start its own workers. */
static void before_fork(void)
{
    pthread_mutex_lock(&job_lock);
    pthread_mutex_lock(&pool_lock);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&job_lock);
}

static void after_fork_in_child(void)
{
    /* The parent's workers are still counted as waiters in the condition variables' copies, and
     * glibc's signal/broadcast would wait for them to leave: start the child with fresh ones. */
    static const pthread_cond_t fresh = PTHREAD_COND_INITIALIZER;
    pool_wake = fresh;
    pool_idle = fresh;
    pool_workers = 0;
    pool_busy = 0;
    pool_job = NULL;
    after_fork_in_parent();
}

int bn_threads_init(void)
{
    return pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}

npy_intp bn_default_num_threads(void)
{
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 0)
        return CPU_COUNT(&cpus);
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? online : 1;
}

npy_intp bn_get_num_threads(void)
{
    return __atomic_load_n(&num_threads, __ATOMIC_RELAXED);
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
    int partials; /* pieces split a batch dimension of a reduction: each sums on its own */
} bn_split;

static bn_split choose_split(const bn_plan *p, const bn_coefs *c)
{
    bn_split best = {0, 1, 0};
    npy_intp want = p->size / BN_PIECE_MIN;
    if (want > BN_MAX_PIECES)
        want = BN_MAX_PIECES;
    if (c->acc != NULL) {
        want /= BN_REDUCE_PIECE_SCALE;
        if (want > BN_MAX_PARTIALS)
            want = BN_MAX_PARTIALS;
    }
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
    b.pass_size = p->size;
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

/* A pass over a plan as a job for the pool. */
typedef struct {
    bn_job job;
    const bn_plan *plan;
    bn_kernel kernel;
    const bn_coefs *coefs;
    bn_split split;
    double *partial;
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
    run_piece(pass->plan, pass->kernel, &mine, s.dim, lo, hi);
}

int bn_run(const bn_plan *p, bn_kernel kernel, const bn_coefs *c)
{
    if (p->size == 0)
        return 0;
    bn_pass pass = {{run_numbered_piece, 0, 0, 0}, p, kernel, c, choose_split(p, c), NULL};
    pass.job.count = pass.split.count;
    const npy_intp accsize = BN_NACC * c->nfeat;
    if (pass.split.partials) {
        pass.partial = malloc((size_t)(pass.split.count * accsize) * sizeof(double));
        if (!pass.partial)
            return -1;
    }
    const npy_intp threads = bn_get_num_threads();
    run_job(&pass.job, threads < pass.job.count ? threads : pass.job.count);
    if (pass.partial) {
        for (npy_intp i = 0; i < pass.split.count; i++)
            for (npy_intp j = 0; j < accsize; j++)
                c->acc[j] += pass.partial[i * accsize + j];
        free(pass.partial);
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
        /* float or double: constant sizes make each copy a move, not a call to memcpy */
        if (itemsize == sizeof(float))
            memcpy(dst + (size_t)f * sizeof(float), data, sizeof(float));
        else
            memcpy(dst + (size_t)f * sizeof(double), data, sizeof(double));
        for (npy_intp d = nkept - 1; d >= 0; d--) {
            data += fstrides[d];
            if (++index[d] < fshape[d])
                break;
            data -= fstrides[d] * fshape[d];
            index[d] = 0;
        }
    }
}
