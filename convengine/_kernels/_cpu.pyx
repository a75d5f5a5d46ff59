"""What the CPU and the build offer: ISA support, OpenMP, compiler. Built at the baseline ISA so it loads anywhere."""

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
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
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
    static int ce_has_avx2(void) { return 0; }
    static int ce_has_avx512(void) { return 0; }
    #endif
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
    int ce_has_avx2()
    int ce_has_avx512()
    const char* CE_COMPILER


def cpu_supports():
    """The ISA levels this CPU can run, best last."""
    levels = ["baseline"]
    if ce_has_avx2():
        levels.append("avx2")
    if ce_has_avx512():
        levels.append("avx512")
    return levels


def openmp():
    """(enabled, version as yyyymm or 0)."""
    return bool(ce_openmp_enabled()), ce_openmp_version()


def compiler():
    return CE_COMPILER.decode()
