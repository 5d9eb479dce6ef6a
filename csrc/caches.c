/* Reading the data caches' sizes (see caches.h).  Each source is tried only where it can exist;
 * none of them is required. */
#include "caches.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#define BN_HAS_CPUID 1
#include <cpuid.h>
#endif
#ifdef __APPLE__
#include <sys/sysctl.h>
#endif
#ifdef _WIN32
#include <windows.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

/* "32K" and the like (sysfs's sizes, BNORM_CACHES): bytes, or -1 if text is not such a size.
 * *end is where the size ended. */
static npy_intp parse_size(const char *text, const char **end)
{
    char *stop;
    const long long v = strtoll(text, &stop, 10);
    if (stop == text || v < 0)
        return -1;
    long long scale = 1;
    if (*stop == 'K' || *stop == 'k')
        scale = 1LL << 10;
    else if (*stop == 'M' || *stop == 'm')
        scale = 1LL << 20;
    else if (*stop == 'G' || *stop == 'g')
        scale = 1LL << 30;
    if (scale != 1)
        stop++;
    if (v > (1LL << 40) / scale) /* no cache is a TiB: a typo */
        return -1;
    *end = stop;
    return (npy_intp)(v * scale);
}

/* Whether a source gave enough to derive the thresholds from. */
static int usable(const bn_caches *c)
{
    return c->l1d > 0 && c->l2 > 0;
}

#ifdef __linux__
/* The first line of dir/name, or "" */
static void read_line(const char *dir, const char *name, char *buf, size_t n)
{
    char path[160];
    buf[0] = '\0';
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    if (!fgets(buf, (int)n, f))
        buf[0] = '\0';
    fclose(f);
    buf[strcspn(buf, "\n")] = '\0';
}

static void from_sysfs(bn_caches *c)
{
    for (int i = 0; i < 16; i++) {
        char dir[96], level[16], type[32], size[32], ways[16], line[16];
        const char *end;
        snprintf(dir, sizeof dir, "/sys/devices/system/cpu/cpu0/cache/index%d", i);
        read_line(dir, "level", level, sizeof level);
        if (!level[0])
            break; /* the indexes are numbered without gaps */
        read_line(dir, "type", type, sizeof type);
        read_line(dir, "size", size, sizeof size);
        read_line(dir, "ways_of_associativity", ways, sizeof ways);
        read_line(dir, "coherency_line_size", line, sizeof line);
        if (strcmp(type, "Instruction") == 0)
            continue;
        const npy_intp bytes = parse_size(size, &end);
        if (bytes <= 0)
            continue;
        if (strcmp(level, "1") == 0) {
            c->l1d = bytes;
            c->l1d_ways = atol(ways);
            c->line = atol(line);
        } else if (strcmp(level, "2") == 0) {
            c->l2 = bytes;
        } else if (strcmp(level, "3") == 0) {
            c->l3 = bytes;
        }
    }
}
#endif

#ifdef BN_HAS_CPUID
/* Leaf 4 (Intel) and 0x8000001D (AMD's copy of it; leaf 4 reads as no caches there) describe one
 * cache per subleaf in the same layout. */
static void from_cpuid_leaf(bn_caches *c, unsigned leaf)
{
    for (unsigned sub = 0; sub < 16; sub++) {
        unsigned a, b, cx, d;
        if (!__get_cpuid_count(leaf, sub, &a, &b, &cx, &d))
            return;
        const unsigned type = a & 31, level = a >> 5 & 7; /* type 1 data, 2 code, 3 unified */
        if (type == 0)
            return;
        if (type == 2)
            continue;
        const npy_intp ways = (npy_intp)(b >> 22) + 1, parts = (npy_intp)(b >> 12 & 0x3ff) + 1;
        const npy_intp line = (npy_intp)(b & 0xfff) + 1, sets = (npy_intp)cx + 1;
        const npy_intp bytes = ways * parts * line * sets;
        if (level == 1) {
            c->l1d = bytes;
            c->l1d_ways = ways;
            c->line = line;
        } else if (level == 2) {
            c->l2 = bytes;
        } else if (level == 3) {
            c->l3 = bytes;
        }
    }
}

static void from_cpuid(bn_caches *c)
{
    if ((unsigned)__get_cpuid_max(0, NULL) >= 4u)
        from_cpuid_leaf(c, 4);
    if (!usable(c) && (unsigned)__get_cpuid_max(0x80000000u, NULL) >= 0x8000001Du) {
        *c = (bn_caches){0};
        from_cpuid_leaf(c, 0x8000001Du);
    }
}
#endif

#ifdef __APPLE__
static npy_intp sysctl_value(const char *name)
{
    long long v = 0;
    size_t n = sizeof v;
    if (sysctlbyname(name, &v, &n, NULL, 0) != 0 || n != sizeof v)
        return 0;
    return (npy_intp)v;
}

static void from_sysctl(bn_caches *c)
{
    c->l1d = sysctl_value("hw.l1dcachesize");
    c->l2 = sysctl_value("hw.l2cachesize");
    c->l3 = sysctl_value("hw.l3cachesize");
    c->line = sysctl_value("hw.cachelinesize");
}
#endif

#ifdef _WIN32
static void from_windows(bn_caches *c)
{
    DWORD bytes = 0;
    GetLogicalProcessorInformation(NULL, &bytes);
    SYSTEM_LOGICAL_PROCESSOR_INFORMATION *info = malloc(bytes ? bytes : 1);
    if (!info)
        return;
    if (GetLogicalProcessorInformation(info, &bytes)) {
        const size_t n = bytes / sizeof *info;
        for (size_t i = 0; i < n; i++) {
            if (info[i].Relationship != RelationCache)
                continue;
            const CACHE_DESCRIPTOR *d = &info[i].Cache;
            if (d->Type == CacheInstruction)
                continue;
            if (d->Level == 1) {
                c->l1d = (npy_intp)d->Size;
                c->l1d_ways = d->Associativity == CACHE_FULLY_ASSOCIATIVE ? 0 : d->Associativity;
                c->line = d->LineSize;
            } else if (d->Level == 2) {
                c->l2 = (npy_intp)d->Size;
            } else if (d->Level == 3) {
                c->l3 = (npy_intp)d->Size;
            }
        }
    }
    free(info);
}
#endif

#ifdef _SC_LEVEL1_DCACHE_SIZE
static npy_intp sysconf_value(int name)
{
    const long v = sysconf(name);
    return v > 0 ? (npy_intp)v : 0;
}

static void from_sysconf(bn_caches *c)
{
    c->l1d = sysconf_value(_SC_LEVEL1_DCACHE_SIZE);
    c->l1d_ways = sysconf_value(_SC_LEVEL1_DCACHE_ASSOC);
    c->line = sysconf_value(_SC_LEVEL1_DCACHE_LINESIZE);
    c->l2 = sysconf_value(_SC_LEVEL2_CACHE_SIZE);
    c->l3 = sysconf_value(_SC_LEVEL3_CACHE_SIZE);
}
#endif

void bn_caches_detect(bn_caches *c)
{
    static const struct {
        void (*read)(bn_caches *c);
        const char *name;
    } sources[] = {
#ifdef __linux__
        {from_sysfs, "sysfs"},
#endif
#ifdef BN_HAS_CPUID
        {from_cpuid, "cpuid"},
#endif
#ifdef __APPLE__
        {from_sysctl, "sysctl"},
#endif
#ifdef _WIN32
        {from_windows, "windows"},
#endif
#ifdef _SC_LEVEL1_DCACHE_SIZE
        {from_sysconf, "sysconf"},
#endif
        {NULL, NULL}, /* no empty array where none of the above exists */
    };
    for (size_t i = 0; sources[i].read; i++) {
        *c = (bn_caches){0};
        sources[i].read(c);
        if (usable(c)) {
            c->source = sources[i].name;
            return;
        }
    }
    *c = (bn_caches){BN_FALLBACK_L1D, BN_FALLBACK_L1D_WAYS, BN_FALLBACK_LINE, BN_FALLBACK_L2,
                     BN_FALLBACK_L3, "fallback"};
}

int bn_caches_parse(const char *text, bn_caches *c)
{
    npy_intp sizes[3];
    const char *p = text;
    for (int i = 0; i < 3; i++) {
        sizes[i] = parse_size(p, &p);
        if (sizes[i] < 0 || *p != (i < 2 ? ',' : '\0'))
            return -1;
        p++;
    }
    if (sizes[0] == 0 || sizes[1] == 0)
        return -1;
    c->l1d = sizes[0];
    c->l2 = sizes[1];
    c->l3 = sizes[2];
    c->source = "BNORM_CACHES";
    return 0;
}
