"""What the CPU and the build offer: ISA support, maker, pause length, OpenMP, compiler. Built at the baseline ISA so
it loads anywhere."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int ce_openmp_enabled(void) { return 1; }
    static int ce_openmp_version(void) { return _OPENMP; }
    #else
    static int ce_openmp_enabled(void) { return 0; }
    static int ce_openmp_version(void) { return 0; }
    #endif
    #include <time.h>
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #define CE_PAUSE() __builtin_ia32_pause()
    static int ce_is_amd(void) {
        __builtin_cpu_init();
        return __builtin_cpu_is("amd");
    }
    #include <cpuid.h>
    /* The x86 family as the vendors number it (base family, plus the extended family where the base is 0xF):
       0x19 for AMD's Zen 3 and Zen 4, 0x1A for Zen 5, 6 for Intel's cores. 0 where CPUID has no leaf 1. */
    static int ce_cpu_family(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
        unsigned base = (a >> 8) & 0xF;
        return (int)(base == 0xF ? base + ((a >> 20) & 0xFF) : base);
    }
    static int ce_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    static int ce_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512cd") && ce_has_avx2();
    }
    #else
    #define CE_PAUSE() ((void)0)
    static int ce_is_amd(void) { return 0; }
    static int ce_cpu_family(void) { return 0; }
    static int ce_has_avx2(void) { return 0; }
    static int ce_has_avx512(void) { return 0; }
    #endif
    /* Nanoseconds one pause instruction (what libgomp's spin-wait runs, GOMP_SPINCOUNT times) takes: the best of
       `rounds` runs of `count`, so that a run the scheduler interrupted does not count. 0 where there is no pause
       instruction or no clock. */
    static double ce_pause_ns(int count, int rounds) {
        double best = 0.0;
        for (int r = 0; r < rounds; r++) {
            struct timespec a, b;
            if (clock_gettime(CLOCK_MONOTONIC, &a) != 0) return 0.0;
            for (int i = 0; i < count; i++) CE_PAUSE();
            if (clock_gettime(CLOCK_MONOTONIC, &b) != 0) return 0.0;
            double ns = ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / count;
            if (r == 0 || ns < best) best = ns;
        }
        return best;
    }
    #if defined(__clang__)
    #define CE_COMPILER "clang " __clang_version__
    #elif defined(__GNUC__)
    #define CE_COMPILER "gcc " __VERSION__
    #else
    #define CE_COMPILER "unknown"
    #endif
    """
    int ce_openmp_enabled()
    int ce_openmp_version()
    int ce_is_amd()
    int ce_cpu_family()
    int ce_has_avx2()
    int ce_has_avx512()
    double ce_pause_ns(int count, int rounds) nogil
    const char* CE_COMPILER


def cpu_supports():
    """The ISA levels this CPU can run, best last."""
    levels = ["baseline"]
    if ce_has_avx2():
        levels.append("avx2")
    if ce_has_avx512():
        levels.append("avx512")
    return levels


def is_amd():
    """Whether the CPU is AMD's: some kernel paths are chosen by the maker, as measured on each."""
    return bool(ce_is_amd())


def family():
    """The CPU's x86 family (with the extended family added: 0x19 AMD Zen 3 and 4, 0x1A Zen 5, 6 Intel's cores), 0
    off x86. AMD's Zen 4 runs AVX-512 on 256-bit halves and Zen 5 on full 512-bit units, so some choices differ."""
    return ce_cpu_family()


def pause_ns(count=1000, rounds=5):
    """Nanoseconds per x86 pause instruction, the unit of libgomp's GOMP_SPINCOUNT (best of `rounds` runs of
    `count`; about 10 ns on recent Xeons and EPYCs, 40 on Skylake-era Xeons). 0.0 where it cannot be measured."""
    if count < 1 or rounds < 1:
        raise ValueError(f"count and rounds must be >= 1, got {count} and {rounds}")
    return ce_pause_ns(count, rounds)


def openmp():
    """(enabled, version as yyyymm or 0)."""
    return bool(ce_openmp_enabled()), ce_openmp_version()


def compiler():
    return CE_COMPILER.decode()
