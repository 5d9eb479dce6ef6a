/* Memory for large outputs (y, dx): a few recently freed buffers are kept and handed out again.
 *
 * Why: glibc serves blocks of 32 MiB and more with a fresh mmap and unmaps them on free, so a
 * new output of that size is paid for again on every call with a page fault per page, the kernel
 * zeroing each one.  Measured here on a 51 MB (49 MiB) float32 output: 5.4 ms to fill fresh
 * memory against 2 ms for memory already mapped, which made forward 2.4x slower than with out=.
 * A training loop frees and asks for the same sizes every step, so a handful of kept buffers
 * serve it.
 *
 * Plain C, no Python: module.c hands these functions to NumPy as a memory handler (NEP 49), so
 * the outputs are ordinary arrays that own their data and give it back here when they die. */
#ifndef BNORM_BUFFERS_H
#define BNORM_BUFFERS_H

#include <stddef.h>

/* Outputs smaller than this come from NumPy's own allocator.  From glibc's (initial) mmap
 * threshold up, glibc gives the pages back too: blocks it maps it unmaps, and once freed blocks
 * have raised the threshold, freeing a step's y and dx at the top of the heap trims it.  A
 * training step with (256,1024) float64 outputs took 992 page faults and 2.6 ms on one thread
 * (0.35 ms without them) while the cache started at 4 MiB. */
#define BN_BUFFER_MIN ((size_t)128 << 10)
/* Bytes kept by default: a training step's y and dx for the largest benchmark case in float64
 * (2 x 98 MiB) with room to spare. */
#define BN_BUFFER_CACHE_DEFAULT ((size_t)512 << 20)

/* The NEP 49 allocator functions (ctx unused).  Every buffer carries its own size, so what is
 * kept never depends on the size the caller says it frees. */
void *bn_buffer_malloc(void *ctx, size_t size);
void *bn_buffer_calloc(void *ctx, size_t nelem, size_t elsize);
void *bn_buffer_realloc(void *ctx, void *ptr, size_t new_size);
void bn_buffer_free(void *ctx, void *ptr, size_t size);

/* Keep at most max_bytes of freed buffers (0: keep none, and release what is kept); returns the
 * previous limit.  bn_buffers_init registers the fork handlers: call once, 0 or an errno value. */
size_t bn_buffers_set_limit(size_t max_bytes);
int bn_buffers_init(void);

#endif
