/* What every kernel entry and every parallel block share: the floating-point environment they run in, scratch
 * allocation (with a fault-injection hook for the tests) and the failure flag set from inside parallel blocks.
 *
 * Subnormal numbers (below ~1.2e-38 in float32, ~2.2e-308 in float64) take a microcode assist on x86 for every
 * operation that reads or produces one: a conv whose inputs are 1% subnormal ran 22x slower, all-subnormal 159x.
 * So the engine runs its kernels with flush-to-zero (results that would be subnormal become 0) and
 * denormals-are-zero (subnormal inputs read as 0), as TensorFlow does in its CPU threads. The mode is a per-thread
 * register (MXCSR on x86, FPCR on aarch64): each def entry sets it on the calling thread and each parallel block on
 * every thread of its team, and both put back exactly what was there before, so NumPy, BLAS and user code that
 * share those threads keep IEEE behaviour. `ce_flush_denormal` (set_flush_denormal in Python) turns it off.
 */
#ifndef CE_RUNTIME_H
#define CE_RUNTIME_H

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned long long ce_fpstate;
#define CE_FLUSH_BITS 0x8040ull            /* MXCSR: FTZ (bit 15) | DAZ (bit 6) */
#define CE_FLUSH_SUPPORTED 1
static inline ce_fpstate ce_fp_read(void) { return _mm_getcsr(); }
static inline void ce_fp_write(ce_fpstate s) { _mm_setcsr((unsigned int)s); }
#elif defined(__aarch64__)
typedef unsigned long long ce_fpstate;
#define CE_FLUSH_BITS (1ull << 24)         /* FPCR.FZ: flushes both inputs and results */
#define CE_FLUSH_SUPPORTED 1
static inline ce_fpstate ce_fp_read(void) { unsigned long long v; __asm__ __volatile__("mrs %0, fpcr" : "=r"(v)); return v; }
static inline void ce_fp_write(ce_fpstate s) { __asm__ __volatile__("msr fpcr, %0" : : "r"(s)); }
#else
typedef unsigned long long ce_fpstate;
#define CE_FLUSH_BITS 0ull
#define CE_FLUSH_SUPPORTED 0
static inline ce_fpstate ce_fp_read(void) { return 0; }
static inline void ce_fp_write(ce_fpstate s) { (void)s; }
#endif

/* Process-wide switch, read by every thread at the entry of each call or block. Changing it while another Python
 * thread is inside a call affects that call's blocks from then on only; change it between calls. */
static int ce_flush_denormal = 1;

/* The compiler barriers keep floating-point work from being moved across the mode switch. */
static inline ce_fpstate ce_fp_enter(void) {
    ce_fpstate old = ce_fp_read();
    if (__atomic_load_n(&ce_flush_denormal, __ATOMIC_RELAXED) && (old & CE_FLUSH_BITS) != CE_FLUSH_BITS)
        ce_fp_write(old | CE_FLUSH_BITS);
    __asm__ __volatile__("" ::: "memory");
    return old;
}

static inline void ce_fp_leave(ce_fpstate old) {
    __asm__ __volatile__("" ::: "memory");
    if (ce_fp_read() != old) ce_fp_write(old);
}

/* A def entry remembers, per thread, the mode its caller had. OpenMP starts its worker threads when a team first
 * needs them, and a new thread inherits the mode of the thread that starts it: started from inside a call, the
 * workers would keep flushing after it. So the calling thread steps back to its caller's mode around each parallel
 * block (ce_fp_suspend/ce_fp_resume), and every thread of the team enters the engine's mode inside the block. */
static __thread int ce_call_depth = 0;
static __thread ce_fpstate ce_caller_mode = 0;

static inline ce_fpstate ce_fp_enter_call(void) {
    ce_fpstate old = ce_fp_enter();
    if (ce_call_depth++ == 0) ce_caller_mode = old;
    return old;
}

static inline void ce_fp_leave_call(ce_fpstate old) {
    ce_call_depth--;
    ce_fp_leave(old);
}

static inline ce_fpstate ce_fp_suspend(void) {
    ce_fpstate now = ce_fp_read();
    __asm__ __volatile__("" ::: "memory");
    if (ce_call_depth > 0 && now != ce_caller_mode) ce_fp_write(ce_caller_mode);
    return now;
}

static inline void ce_fp_resume(ce_fpstate now) { ce_fp_leave(now); }

/* Flush bits of the calling thread's mode right now (what the tests read inside and after a call). */
static inline int ce_fp_flushing(void) { return (ce_fp_read() & CE_FLUSH_BITS) == CE_FLUSH_BITS && CE_FLUSH_SUPPORTED; }

/* Fault injection for the tests: when ce_alloc_countdown is n >= 0, the scratch allocation n allocations from now
 * (counted over all threads) returns NULL; -1, the default, never fails. */
static long ce_alloc_countdown = -1;

static inline int ce_alloc_should_fail(void) {
    long n = __atomic_load_n(&ce_alloc_countdown, __ATOMIC_RELAXED);
    while (n >= 0) {
        if (__atomic_compare_exchange_n(&ce_alloc_countdown, &n, n - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return n == 0;
    }
    return 0;
}

/* Scratch starts on a cache line (CE_ALIGN bytes): the row-vector kernels' copies are whole 64-byte vectors from
 * a buffer's start (a stride-2 3x3 conv's rows of 16 output pixels, an 8x8 plane's pairs of rows), and glibc's
 * malloc gives 16-byte alignment, so every such vector load straddled two lines. Intel Xeon (family 6 model 207),
 * batch 64, 2 threads, forward GFLOP/s 16-byte / 64-byte aligned, interleaved: 64x32x32x32 -> 64 3x3 s2 151 / 169,
 * 64x64x32x32 -> 128 s2 157 / 175, 64x128x8x8 -> 128 175 / 189, 32x64x56x56 -> 64 141 / 149; input gradient s2 119 /
 * 127, 8x8 144 / 156; weight gradient s2 130 / 150, 8x8 144 / 162, 56x56 170 / 186 (16x16 planes, whose padded rows
 * of 18 put most vectors off a line anyway, even). The same bits: only addresses change. Where the C library has no
 * posix_memalign (Windows), plain malloc: ce_free must free what both give. */
#define CE_ALIGN 64

/* Accounting for the tests: while ce_alloc_counting is set, every scratch allocation (over all threads) is
 * entered in a table by its address and size, and its free removes it: ce_alloc_peak is then the most bytes held
 * at once, which the scratch reports (conv2d_scratch_bytes) are checked against. A spin lock guards the table;
 * with counting off the only cost is one relaxed load per allocation and free. */
#define CE_ALLOC_SLOTS 8192
static int ce_alloc_counting = 0;
static long long ce_alloc_now = 0, ce_alloc_peak = 0, ce_alloc_lost = 0, ce_alloc_misaligned = 0;
static void* ce_alloc_ptr[CE_ALLOC_SLOTS];
static size_t ce_alloc_size[CE_ALLOC_SLOTS];
static char ce_alloc_lock = 0;

static inline size_t ce_alloc_slot(const void* p) { return ((size_t)p >> 6) % CE_ALLOC_SLOTS; }

static void ce_alloc_enter(void* p, size_t n) {
    size_t i, k;
    if (p == NULL || !__atomic_load_n(&ce_alloc_counting, __ATOMIC_RELAXED)) return;
    while (__atomic_test_and_set(&ce_alloc_lock, __ATOMIC_ACQUIRE)) {}
    for (i = ce_alloc_slot(p), k = 0; k < CE_ALLOC_SLOTS && ce_alloc_ptr[i] != NULL; k++) i = (i + 1) % CE_ALLOC_SLOTS;
    if (k < CE_ALLOC_SLOTS) {
        ce_alloc_ptr[i] = p;
        ce_alloc_size[i] = n;
        ce_alloc_now += (long long)n;
        if (ce_alloc_now > ce_alloc_peak) ce_alloc_peak = ce_alloc_now;
        if ((size_t)p % CE_ALIGN != 0) ce_alloc_misaligned++;
    } else {
        ce_alloc_lost++;
    }
    __atomic_clear(&ce_alloc_lock, __ATOMIC_RELEASE);
}

static void ce_alloc_leave(void* p) {
    size_t i, k;
    if (p == NULL || !__atomic_load_n(&ce_alloc_counting, __ATOMIC_RELAXED)) return;
    while (__atomic_test_and_set(&ce_alloc_lock, __ATOMIC_ACQUIRE)) {}
    for (i = ce_alloc_slot(p), k = 0; k < CE_ALLOC_SLOTS && ce_alloc_ptr[i] != p; k++) i = (i + 1) % CE_ALLOC_SLOTS;
    if (k < CE_ALLOC_SLOTS) {
        ce_alloc_now -= (long long)ce_alloc_size[i];
        ce_alloc_ptr[i] = NULL;
        /* re-enter the entries after it that probing may have passed over */
        for (i = (i + 1) % CE_ALLOC_SLOTS; ce_alloc_ptr[i] != NULL; i = (i + 1) % CE_ALLOC_SLOTS) {
            void* q = ce_alloc_ptr[i];
            size_t n = ce_alloc_size[i], j = ce_alloc_slot(q);
            ce_alloc_ptr[i] = NULL;
            while (ce_alloc_ptr[j] != NULL) j = (j + 1) % CE_ALLOC_SLOTS;
            ce_alloc_ptr[j] = q;
            ce_alloc_size[j] = n;
        }
    }
    __atomic_clear(&ce_alloc_lock, __ATOMIC_RELEASE);
}

/* Start counting (on) from an empty table, or stop; returns the peak since the previous call, or -1 when more
 * allocations were live at once than the table holds (then the peak is unknown). */
static long long ce_alloc_restart(int on) {
    long long peak = ce_alloc_lost ? -1 : ce_alloc_peak;
    while (__atomic_test_and_set(&ce_alloc_lock, __ATOMIC_ACQUIRE)) {}
    memset(ce_alloc_ptr, 0, sizeof ce_alloc_ptr);
    ce_alloc_now = ce_alloc_peak = ce_alloc_lost = ce_alloc_misaligned = 0;
    __atomic_store_n(&ce_alloc_counting, on, __ATOMIC_RELAXED);
    __atomic_clear(&ce_alloc_lock, __ATOMIC_RELEASE);
    return peak;
}

static inline void* ce_aligned(size_t n) {
#if defined(_WIN32)
    return malloc(n);
#else
    void* p;
    return posix_memalign(&p, CE_ALIGN, n ? n : 1) == 0 ? p : NULL;
#endif
}
static inline void* ce_malloc(size_t n) {
    void* p;
    if (ce_alloc_should_fail()) return NULL;
    p = ce_aligned(n);
    ce_alloc_enter(p, n);
    return p;
}
static inline void* ce_calloc(size_t n, size_t size) {
    void* p;
    if (ce_alloc_should_fail()) return NULL;
    if (size != 0 && n > (size_t)-1 / size) return NULL;
    p = ce_aligned(n * size);
    if (p != NULL) memset(p, 0, n * size);
    ce_alloc_enter(p, n * size);
    return p;
}
static inline void ce_free(void* p) {
    ce_alloc_leave(p);
    free(p);
}

/* Record a failure from inside a parallel block. Cython makes a variable assigned inside prange/parallel private
 * (lastprivate), so a plain `failed = 1` there is lost when another thread runs the last iteration and the caller
 * returns uninitialised output as a result; a store through the pointer reaches the one shared flag. */
static inline void ce_flag_failure(int* failed) { __atomic_store_n(failed, 1, __ATOMIC_RELAXED); }

#endif
