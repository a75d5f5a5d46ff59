# What every kernel shares at run time (runtime.h says why each exists): scratch allocation through
# ce_malloc/ce_calloc and ce_free, so that the tests can make any one allocation fail and weigh what a call holds;
# the flush-to-zero mode entered at each def entry (fp_enter_call) and in each parallel block (fp_enter, inside
# fp_suspend/fp_resume), and left exactly as found; flag_failure for failures inside parallel blocks.
# The def functions below are the Python face of these: the setting, and the hooks the tests read and drive.

from cython.parallel cimport prange, parallel, threadid

cdef extern from "runtime.h":
    ctypedef unsigned long long fpstate "ce_fpstate"
    void* malloc "ce_malloc"(size_t n) nogil
    void* calloc "ce_calloc"(size_t n, size_t size) nogil
    fpstate fp_enter "ce_fp_enter"() noexcept nogil
    void fp_leave "ce_fp_leave"(fpstate old) noexcept nogil
    fpstate fp_enter_call "ce_fp_enter_call"() noexcept nogil
    void fp_leave_call "ce_fp_leave_call"(fpstate old) noexcept nogil
    fpstate fp_suspend "ce_fp_suspend"() noexcept nogil
    void fp_resume "ce_fp_resume"(fpstate now) noexcept nogil
    bint fp_flushing "ce_fp_flushing"() noexcept nogil
    void flag_failure "ce_flag_failure"(int* failed) noexcept nogil
    int flush_denormal_flag "ce_flush_denormal"
    long alloc_countdown "ce_alloc_countdown"
    void free "ce_free"(void* p) nogil
    long long alloc_restart "ce_alloc_restart"(int on) nogil
    long long alloc_misaligned "ce_alloc_misaligned"
    enum: CE_ALIGN
    enum: CE_FLUSH_SUPPORTED

FLUSH_SUPPORTED = bool(CE_FLUSH_SUPPORTED)


def set_flush_denormal(bint flag):
    """Run the kernels with flush-to-zero and denormals-are-zero (True, the default) or with IEEE subnormals."""
    global flush_denormal_flag
    flush_denormal_flag = flag


def get_flush_denormal():
    return bool(flush_denormal_flag)


def thread_is_flushing():
    """Whether the calling thread's floating-point mode flushes subnormals now (outside a call: the caller's own)."""
    return bool(fp_flushing())


def team_flushing(int n_threads, bint entered):
    """What each thread of an OpenMP team of n_threads sees: its mode inside a parallel block that entered the
    engine's mode (entered) or that did not (the mode a previous call left behind). A test hook."""
    cdef int* seen = <int*>calloc(n_threads, sizeof(int))
    cdef int i
    cdef fpstate fp
    if seen == NULL:
        raise MemoryError()
    with nogil, parallel(num_threads=n_threads):
        if entered:
            fp = fp_enter()
        for i in prange(n_threads, schedule='static', chunksize=1):
            seen[threadid()] = 1 + fp_flushing()
        if entered:
            fp_leave(fp)
    result = [seen[i] - 1 for i in range(n_threads)]
    free(seen)
    return result


def count_allocated_bytes(bint on):
    """Test hook: start (on) or stop following the kernels' scratch allocations, over all threads. Returns the
    most bytes they held at once since the previous call (-1: more allocations were live at once than it can
    follow)."""
    return alloc_restart(on)


def misaligned_allocations():
    """Test hook: how many of the scratch allocations followed since count_allocated_bytes(True) did not start on
    a SCRATCH_ALIGN-byte boundary (ce_malloc and ce_calloc promise it)."""
    return alloc_misaligned


SCRATCH_ALIGN = CE_ALIGN


def fail_allocation_after(long n):
    """Test hook: the kernels' scratch allocation n allocations from now returns NULL (counted over all threads);
    -1 turns failures off. Returns the countdown that was set before."""
    global alloc_countdown
    cdef long old = alloc_countdown
    alloc_countdown = n
    return old
