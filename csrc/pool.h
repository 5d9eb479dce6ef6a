/* The threads that run a pass's pieces.
 *
 * A pool of our own rather than OpenMP: GNU OpenMP's idle workers spin, and in a NumPy training
 * loop that spinning takes the cores OpenBLAS needs for the next matmul (bnorm's layer was slower
 * than NumPy's in examples/digits_mlp.py).  These workers sleep between jobs.  The caller works on
 * the job itself and takes pieces from a shared counter, so a worker that wakes late finds the job
 * done and costs nothing; a small job never waits for a thread to start.  Plain C: pthreads, or
 * Win32 threads on Windows (threads.h).
 */
#ifndef BNORM_POOL_H
#define BNORM_POOL_H

#include "kernels.h" /* npy_intp */

typedef struct bn_job bn_job;
typedef void (*bn_piece_fn)(const bn_job *job, npy_intp piece);

/* A job: run(job, i) for every piece i in [0, count), in any order, on any thread.  Embed it as
 * the first member of a struct that carries what the pieces need. */
struct bn_job {
    bn_piece_fn run;
    npy_intp count;   /* pieces */
    npy_intp next;    /* the next piece to take (atomic) */
    npy_intp helpers; /* workers still wanted (under the pool's lock) */
};

/* Run every piece of job with up to `threads` threads, the caller's included; returns when all
 * are done.  Never fails: without workers the caller runs them all. */
void bn_run_job(bn_job *job, npy_intp threads);

/* Threads the passes may use (>= 1), and the default: the CPUs this process may run on.
 * bn_threads_init registers the fork handlers: call it once, returns 0 or an errno value. */
int bn_threads_init(void);
npy_intp bn_default_num_threads(void);
npy_intp bn_get_num_threads(void);
void bn_set_num_threads(npy_intp n);

#endif
