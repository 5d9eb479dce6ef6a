/* The CPU's data caches, read once at import: the kernels' size thresholds are derived from them
 * (kernels.c, bn_tune_for).  Plain C, no Python. */
#ifndef BNORM_CACHES_H
#define BNORM_CACHES_H

#include "kernels.h" /* npy_intp */

/* Bytes; 0: not reported.  Sizes are per cache instance (one core's L1d and, here, L2; the L3
 * that a group of cores shares). */
typedef struct bn_caches {
    npy_intp l1d, l1d_ways, line, l2, l3;
    const char *source; /* "sysfs", "cpuid", "sysctl", "windows", "sysconf" or "fallback" */
} bn_caches;

/* The caches of the machine the size thresholds were measured on (AMD EPYC, 2 cores): used when
 * no source reports an L1d and an L2, so that such machines behave as before the thresholds
 * were derived. */
#define BN_FALLBACK_L1D ((npy_intp)32 << 10)
#define BN_FALLBACK_L1D_WAYS 8
#define BN_FALLBACK_LINE 64
#define BN_FALLBACK_L2 ((npy_intp)1 << 20)
#define BN_FALLBACK_L3 ((npy_intp)32 << 20)

/* The first source that reports both an L1d and an L2, in this order: Linux's sysfs
 * (/sys/devices/system/cpu/cpu0/cache, x86 and aarch64 alike), CPUID leaf 4 (Intel) or
 * 0x8000001D (AMD) on x86-64, macOS's sysctl, Windows' GetLogicalProcessorInformation, sysconf's
 * _SC_LEVEL*_CACHE_* (glibc; last: on this machine's VM glibc reports the L3 as 320 MiB, from
 * CPUID's legacy leaf 0x80000006, where sysfs and leaf 0x8000001D say 32 MiB); else the fallback
 * above. */
void bn_caches_detect(bn_caches *c);

/* Replace the sizes by "L1D,L2,L3" (bytes, with an optional K, M or G suffix; an L3 of 0 means
 * none): the environment variable BNORM_CACHES, for tests and experiments.  Ways and line size
 * stay as detected.  0 on success, -1 (c unchanged) for text that is not three such sizes with
 * L1d and L2 > 0. */
int bn_caches_parse(const char *text, bn_caches *c);

#endif
