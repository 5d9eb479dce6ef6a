/* The kernels' thread pool; see pool.h for why it is ours. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "pool.h"

#include <stdint.h>
#include <time.h>

#include "threads.h"
#ifndef _WIN32
#include <unistd.h>
#endif
#ifdef __linux__
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <emmintrin.h> /* _mm_pause */
#endif

static npy_intp num_threads = 1;

static bn_mutex job_lock = BN_MUTEX_INIT; /* one job on the pool at a time */
static bn_mutex pool_lock = BN_MUTEX_INIT;
static bn_cond pool_wake = BN_COND_INIT; /* a job was posted */
static bn_cond pool_idle = BN_COND_INIT; /* the last helper left a job */
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
#ifdef _WIN32
    LARGE_INTEGER count, freq;
    QueryPerformanceCounter(&count);
    QueryPerformanceFrequency(&freq);
    return (npy_intp)((double)count.QuadPart * 1e9 / (double)freq.QuadPart);
#else
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (npy_intp)t.tv_sec * 1000000000 + t.tv_nsec;
#endif
}

/* Spin while (*counter == value) == equal, for at most BN_SPIN_NS (call without pool_lock). */
static void spin_while(const npy_intp *counter, int equal, npy_intp value)
{
    const npy_intp deadline = now_ns() + BN_SPIN_NS;
    for (npy_intp i = 1; (bn_atomic_load(counter) == value) == equal; i++) {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
        _mm_pause();
#endif
        if (i % 64 == 0 && now_ns() > deadline)
            return;
    }
}

static void take_pieces(bn_job *job)
{
    npy_intp i;
    while ((i = bn_atomic_fetch_add(&job->next, 1)) < job->count)
        job->run(job, i);
}

/* arg: pool_posted when the worker was started, so that it takes the job being posted. */
static void worker_loop(void *arg)
{
    npy_intp seen = (npy_intp)(intptr_t)arg;
    for (;;) {
        spin_while(&pool_posted, 1, seen);
        bn_mutex_lock(&pool_lock);
        while (pool_posted == seen)
            bn_cond_wait(&pool_wake, &pool_lock);
        seen = pool_posted;
        bn_job *job = pool_job;
        if (job && job->helpers > 0) {
            job->helpers--;
            bn_atomic_store(&pool_busy, pool_busy + 1);
            bn_mutex_unlock(&pool_lock);
            take_pieces(job);
            bn_mutex_lock(&pool_lock);
            bn_atomic_store(&pool_busy, pool_busy - 1);
            if (pool_busy == 0)
                bn_cond_signal(&pool_idle);
        }
        bn_mutex_unlock(&pool_lock);
    }
}

/* A detached worker thread; returns 0 when started. */
#ifdef _WIN32
static DWORD WINAPI worker_main(LPVOID arg)
{
    worker_loop(arg);
    return 0;
}

static int start_thread(void *arg)
{
    HANDLE thread = CreateThread(NULL, 0, worker_main, arg, 0, NULL);
    if (!thread)
        return -1;
    CloseHandle(thread); /* the thread runs on: detached */
    return 0;
}
#else
static void *worker_main(void *arg)
{
    worker_loop(arg);
    return NULL;
}

static int start_thread(void *arg)
{
    pthread_t thread;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return -1;
    const int failed = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) != 0 ||
                       pthread_create(&thread, &attr, worker_main, arg) != 0;
    pthread_attr_destroy(&attr);
    return failed ? -1 : 0;
}
#endif

/* Start workers until there are `want` (under pool_lock); returns how many there are. */
static npy_intp start_workers(npy_intp want)
{
    while (pool_workers < want) {
        if (start_thread((void *)(intptr_t)pool_posted) != 0)
            break; /* fewer threads is slower, never wrong */
        pool_workers++;
    }
    return pool_workers < want ? pool_workers : want;
}

void bn_run_job(bn_job *job, npy_intp threads)
{
    /* Another caller has the pool (Python threads calling bnorm at once): the cores are busy
     * anyway, this caller does its job alone. */
    if (threads < 2 || bn_mutex_trylock(&job_lock) != 0) {
        take_pieces(job);
        return;
    }
    bn_mutex_lock(&pool_lock);
    job->helpers = start_workers(threads - 1);
    if (job->helpers > 0) {
        pool_job = job;
        bn_atomic_store(&pool_posted, pool_posted + 1);
        bn_cond_broadcast(&pool_wake);
    }
    bn_mutex_unlock(&pool_lock);
    take_pieces(job);
    bn_mutex_lock(&pool_lock);
    pool_job = NULL; /* a worker waking from now on must not touch the job */
    bn_mutex_unlock(&pool_lock);
    spin_while(&pool_busy, 0, 0);
    bn_mutex_lock(&pool_lock);
    while (pool_busy > 0)
        bn_cond_wait(&pool_idle, &pool_lock);
    bn_mutex_unlock(&pool_lock);
    bn_mutex_unlock(&job_lock);
}

/* fork() copies only the calling thread: hold the locks across it so that the child gets them in
 * a known state, and let the child start its own workers.  (Windows has no fork.) */
#ifndef _WIN32
static void before_fork(void)
{
    bn_mutex_lock(&job_lock);
    bn_mutex_lock(&pool_lock);
}

static void after_fork_in_parent(void)
{
    bn_mutex_unlock(&pool_lock);
    bn_mutex_unlock(&job_lock);
}

static void after_fork_in_child(void)
{
    /* The parent's workers are still counted as waiters in the condition variables' copies, and
     * glibc's signal/broadcast would wait for them to leave: start the child with fresh ones. */
    static const bn_cond fresh = BN_COND_INIT;
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
#else
int bn_threads_init(void)
{
    return 0;
}
#endif

/* The CPUs this process may run on where the OS says (Linux: its affinity mask, which taskset,
 * cgroups' cpusets and batch schedulers set), else the CPUs online. */
npy_intp bn_default_num_threads(void)
{
#ifdef _WIN32
    /* all processor groups: a thread the pool starts may run in any */
    const DWORD online = GetActiveProcessorCount(ALL_PROCESSOR_GROUPS);
    return online > 0 ? (npy_intp)online : 1;
#else
#ifdef __linux__
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 0)
        return CPU_COUNT(&cpus);
#endif
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? online : 1;
#endif
}

npy_intp bn_get_num_threads(void)
{
    return bn_atomic_load(&num_threads);
}

void bn_set_num_threads(npy_intp n)
{
    bn_atomic_store(&num_threads, n < 1 ? 1 : n);
}
