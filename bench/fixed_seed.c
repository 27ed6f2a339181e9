/* Preloaded into nginx by bench/callgrind.py: the kernel's random bytes
 * replaced by a stream from LUAGUARD_BENCH_SEED. LuaJIT seeds its PRNG
 * from getrandom per process, and the PRNG randomises trace penalties
 * (hence which traces abort at start-up), string hashing and its
 * allocator's mmap hints: two runs of one measurement that differ there
 * differ by up to a few hundred instructions per request, which their
 * difference does not cancel. With one seed for both runs of a pair their
 * start-up is the same; each pair of a repeat gets its own seed, so the
 * median is still over random ones. Bench only: nothing here is secure. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/types.h>

static uint64_t state;
static int seeded;

static void fill(void *buf, size_t n)
{
    unsigned char *p = buf;
    if (!seeded) {
        const char *s = getenv("LUAGUARD_BENCH_SEED");
        state = s ? strtoull(s, NULL, 0) : 1;
        seeded = 1;
    }
    while (n) {
        /* splitmix64 */
        uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        for (int i = 0; i < 8 && n; i++, n--) {
            *p++ = (unsigned char)(z >> (8 * i));
        }
    }
}

/* LuaJIT calls syscall(SYS_getrandom, ...) itself. */
long syscall(long nr, ...)
{
    static long (*next)(long, ...);
    long a[6];
    va_list ap;
    va_start(ap, nr);
    for (int i = 0; i < 6; i++) {
        a[i] = va_arg(ap, long);
    }
    va_end(ap);
    if (nr == SYS_getrandom) {
        fill((void *)a[0], (size_t)a[1]);
        return a[1];
    }
    if (!next) {
        next = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    }
    return next(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

ssize_t getrandom(void *buf, size_t n, unsigned int flags)
{
    (void)flags;
    fill(buf, n);
    return (ssize_t)n;
}

int getentropy(void *buf, size_t n)
{
    fill(buf, n);
    return 0;
}
