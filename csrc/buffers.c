/* The output buffer cache; see buffers.h for why. */
#define _GNU_SOURCE
#include "buffers.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threads.h"
#ifdef __linux__
#include <sys/mman.h> /* madvise */
#endif
#ifdef _WIN32
#include <malloc.h> /* _aligned_malloc */
#endif

/* A block is a header holding the data's size, then the data: 64-byte aligned, and half a page
 * past a page boundary.  A load waits for an earlier store whose address agrees with it in the
 * low 12 bits ("4K aliasing"); arrays from NumPy's allocator start 16 bytes past a page, and a
 * pass writing just ahead of what it reads, in those bits, stalls (normalize (4096,1024) float32
 * on one thread, output 48 bytes ahead of x: 1.7 ms; 2 KiB: 0.7 ms). */
#define HEADER ((size_t)2048 + 64)
#define PAGE ((size_t)4096)
#define HUGE_PAGE ((size_t)2 << 20)
#define MAX_KEPT 16

typedef struct {
    char *block;
    size_t size;
} kept_buffer;

static kept_buffer kept[MAX_KEPT]; /* oldest first */
static size_t nkept, kept_bytes;
static size_t kept_limit = BN_BUFFER_CACHE_DEFAULT;
static bn_mutex kept_lock = BN_MUTEX_INIT;

static size_t block_size(const char *block)
{
    size_t size;
    memcpy(&size, block, sizeof size);
    return size;
}

/* Aligned blocks: Windows has no posix_memalign, and its aligned blocks need their own free. */
static void *aligned_alloc_block(size_t alignment, size_t n)
{
#ifdef _WIN32
    return _aligned_malloc(n, alignment);
#else
    void *block;
    return posix_memalign(&block, alignment, n) == 0 ? block : NULL;
#endif
}

static void free_block(void *block)
{
#ifdef _WIN32
    _aligned_free(block);
#else
    free(block);
#endif
}

static char *new_block(size_t size)
{
    /* Large blocks start on a huge-page boundary and ask for huge pages (THP's "madvise" mode,
     * as NumPy's own allocator does): one fault per 2 MiB instead of one per 4 KiB.  Linux
     * only; elsewhere the alignment stays, harmless. */
    const int huge = size >= HUGE_PAGE;
    char *block;
    if (size > SIZE_MAX - HUGE_PAGE ||
        !(block = aligned_alloc_block(huge ? HUGE_PAGE : PAGE, HEADER + size)))
        return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge)
        (void)madvise(block, HEADER + size, MADV_HUGEPAGE); /* a hint: failing it costs only speed */
#endif
    memcpy(block, &size, sizeof size);
    return block;
}

/* Remove kept[i]; returns its block. */
static char *take_kept(size_t i)
{
    char *block = kept[i].block;
    kept_bytes -= kept[i].size;
    memmove(&kept[i], &kept[i + 1], (nkept - i - 1) * sizeof kept[0]);
    nkept--;
    return block;
}

void *bn_buffer_malloc(void *ctx, size_t size)
{
    char *block = NULL;
    if (size >= BN_BUFFER_MIN) {
        bn_mutex_lock(&kept_lock);
        for (size_t i = nkept; i-- > 0;) /* newest first: likeliest still in cache */
            if (kept[i].size == size) {
                block = take_kept(i);
                break;
            }
        bn_mutex_unlock(&kept_lock);
    }
    if (!block)
        block = new_block(size);
    return block ? block + HEADER : NULL;
}

void *bn_buffer_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    void *data = bn_buffer_malloc(ctx, nelem * elsize);
    if (data)
        memset(data, 0, nelem * elsize);
    return data;
}

void *bn_buffer_realloc(void *ctx, void *ptr, size_t new_size)
{
    void *data = bn_buffer_malloc(ctx, new_size);
    if (data && ptr) {
        const size_t old_size = block_size((char *)ptr - HEADER);
        memcpy(data, ptr, old_size < new_size ? old_size : new_size);
        bn_buffer_free(ctx, ptr, old_size);
    }
    return data;
}

void bn_buffer_free(void *ctx, void *ptr, size_t size_said)
{
    if (!ptr)
        return;
    char *block = (char *)ptr - HEADER;
    const size_t size = block_size(block);
    char *evicted[MAX_KEPT];
    size_t nevicted = 0;
    bn_mutex_lock(&kept_lock);
    if (size >= BN_BUFFER_MIN && size <= kept_limit) {
        while (nkept == MAX_KEPT || kept_bytes + size > kept_limit)
            evicted[nevicted++] = take_kept(0);
        kept[nkept++] = (kept_buffer){block, size};
        kept_bytes += size;
        block = NULL;
    }
    bn_mutex_unlock(&kept_lock);
    /* free() of a large block is a munmap: outside the lock */
    for (size_t i = 0; i < nevicted; i++)
        free_block(evicted[i]);
    free_block(block);
}

size_t bn_buffers_set_limit(size_t max_bytes)
{
    char *evicted[MAX_KEPT];
    size_t nevicted = 0;
    bn_mutex_lock(&kept_lock);
    const size_t previous = kept_limit;
    kept_limit = max_bytes;
    while (kept_bytes > kept_limit)
        evicted[nevicted++] = take_kept(0);
    bn_mutex_unlock(&kept_lock);
    for (size_t i = 0; i < nevicted; i++)
        free_block(evicted[i]);
    return previous;
}

/* Another thread may hold the lock when fork() copies this one: hold it across the fork.
 * (Windows has no fork.) */
#ifndef _WIN32
static void lock_kept(void) { bn_mutex_lock(&kept_lock); }
static void unlock_kept(void) { bn_mutex_unlock(&kept_lock); }

int bn_buffers_init(void)
{
    return pthread_atfork(lock_kept, unlock_kept, unlock_kept);
}
#else
int bn_buffers_init(void)
{
    return 0;
}
#endif
