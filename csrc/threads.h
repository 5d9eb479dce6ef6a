/* The few threading primitives the pool (pool.c) and the buffer cache (buffers.c) use: a mutex
 * and a condition variable, both statically initialized, and atomic loads, stores and adds on
 * npy_intp.  pthreads and GCC's __atomic builtins (GCC, clang, mingw-w64) where they exist; on
 * Windows Win32's slim reader/writer locks and condition variables (Vista and later) rather than
 * a pthreads emulation, and with MSVC its interlocked intrinsics.  Plain C, no Python.
 */
#ifndef BNORM_THREADS_H
#define BNORM_THREADS_H

#include "kernels.h" /* npy_intp */

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>

typedef SRWLOCK bn_mutex;
typedef CONDITION_VARIABLE bn_cond;
#define BN_MUTEX_INIT SRWLOCK_INIT
#define BN_COND_INIT CONDITION_VARIABLE_INIT

static inline void bn_mutex_lock(bn_mutex *m) { AcquireSRWLockExclusive(m); }
static inline void bn_mutex_unlock(bn_mutex *m) { ReleaseSRWLockExclusive(m); }
/* 0 when taken, as pthread_mutex_trylock */
static inline int bn_mutex_trylock(bn_mutex *m) { return TryAcquireSRWLockExclusive(m) ? 0 : 1; }
static inline void bn_cond_wait(bn_cond *c, bn_mutex *m) { SleepConditionVariableSRW(c, m, INFINITE, 0); }
static inline void bn_cond_signal(bn_cond *c) { WakeConditionVariable(c); }
static inline void bn_cond_broadcast(bn_cond *c) { WakeAllConditionVariable(c); }
#else
#include <pthread.h>

typedef pthread_mutex_t bn_mutex;
typedef pthread_cond_t bn_cond;
#define BN_MUTEX_INIT PTHREAD_MUTEX_INITIALIZER
#define BN_COND_INIT PTHREAD_COND_INITIALIZER

static inline void bn_mutex_lock(bn_mutex *m) { pthread_mutex_lock(m); }
static inline void bn_mutex_unlock(bn_mutex *m) { pthread_mutex_unlock(m); }
static inline int bn_mutex_trylock(bn_mutex *m) { return pthread_mutex_trylock(m); }
static inline void bn_cond_wait(bn_cond *c, bn_mutex *m) { pthread_cond_wait(c, m); }
static inline void bn_cond_signal(bn_cond *c) { pthread_cond_signal(c); }
static inline void bn_cond_broadcast(bn_cond *c) { pthread_cond_broadcast(c); }
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
/* MSVC (x64): aligned 8-byte loads and stores are atomic, and x64's ordering makes a plain load
 * an acquire and a plain store a release once the compiler keeps its order (the barrier). */
static inline npy_intp bn_atomic_load(const npy_intp *p)
{
    const npy_intp v = *(const volatile npy_intp *)p;
    _ReadWriteBarrier();
    return v;
}
static inline void bn_atomic_store(npy_intp *p, npy_intp v)
{
    _ReadWriteBarrier();
    *(volatile npy_intp *)p = v;
}
static inline npy_intp bn_atomic_fetch_add(npy_intp *p, npy_intp v)
{
    return (npy_intp)_InterlockedExchangeAdd64((volatile __int64 *)p, (__int64)v);
}
#else
/* acquire loads and release stores: what a thread that spins on a counter needs */
static inline npy_intp bn_atomic_load(const npy_intp *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void bn_atomic_store(npy_intp *p, npy_intp v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* relaxed: handing out pieces orders nothing else */
static inline npy_intp bn_atomic_fetch_add(npy_intp *p, npy_intp v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
#endif

#endif
