/* The kernels' thread pool; see pool.h for why it is ours. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

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

void bn_run_job(bn_job *job, npy_intp threads)
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
