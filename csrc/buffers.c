/* The output buffer cache; see buffers.h for why. */
#define _GNU_SOURCE
#include "buffers.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

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
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t block_size(const char *block)
{
    size_t size;
    memcpy(&size, block, sizeof size);
    return size;
}

static char *new_block(size_t size)
{
    /* Large blocks start on a huge-page boundary and ask for huge pages (THP's "madvise" mode,
     * as NumPy's own allocator does): one fault per 2 MiB instead of one per 4 KiB. */
    const int huge = size >= HUGE_PAGE;
    void *block;
    if (size > SIZE_MAX - HUGE_PAGE ||
        posix_memalign(&block, huge ? HUGE_PAGE : PAGE, HEADER + size) != 0)
        return NULL;
    if (huge)
        (void)madvise(block, HEADER + size, MADV_HUGEPAGE); /* a hint: failing it costs only speed */
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
        pthread_mutex_lock(&kept_lock);
        for (size_t i = nkept; i-- > 0;) /* newest first: likeliest still in cache */
            if (kept[i].size == size) {
                block = take_kept(i);
                break;
            }
        pthread_mutex_unlock(&kept_lock);
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
    pthread_mutex_lock(&kept_lock);
    if (size >= BN_BUFFER_MIN && size <= kept_limit) {
        while (nkept == MAX_KEPT || kept_bytes + size > kept_limit)
            evicted[nevicted++] = take_kept(0);
        kept[nkept++] = (kept_buffer){block, size};
        kept_bytes += size;
        block = NULL;
    }
    pthread_mutex_unlock(&kept_lock);
    /* free() of a large block is a munmap: outside the lock */
    for (size_t i = 0; i < nevicted; i++)
        free(evicted[i]);
    free(block);
}

size_t bn_buffers_set_limit(size_t max_bytes)
{
    char *evicted[MAX_KEPT];
    size_t nevicted = 0;
    pthread_mutex_lock(&kept_lock);
    const size_t previous = kept_limit;
    kept_limit = max_bytes;
    while (kept_bytes > kept_limit)
        evicted[nevicted++] = take_kept(0);
    pthread_mutex_unlock(&kept_lock);
    for (size_t i = 0; i < nevicted; i++)
        free(evicted[i]);
    return previous;
}

/* Another thread may hold the lock when fork() copies this one: hold it across the fork. */
static void lock_kept(void) { pthread_mutex_lock(&kept_lock); }
static void unlock_kept(void) { pthread_mutex_unlock(&kept_lock); }

int bn_buffers_init(void)
{
    return pthread_atfork(lock_kept, unlock_kept, unlock_kept);
}
