# The forward's epilogue: what is applied to each output value as the GEMM's (or a direct kernel's) result is
# stored, described once and read by every forward path (oneDNN's post-ops, MLAS's kernel flags).


cdef struct Epilogue:
    # What the forward applies to each value v of output channel k as it stores the GEMM's result, while that is
    # still in cache, in order: v + bias[k]; then with relu, 0 where v <= 0 (NaN stays NaN, as in relu); then
    # v * scale[k] + shift[k] (an inference-time batch norm that could not be folded into the weights). Pointers
    # are to the call's dtype, NULL where absent (scale and shift go together). One descriptor read by every
    # forward path, not a kernel per pattern.
    const void* bias
    const void* scale
    const void* shift
    bint relu


cdef inline void store_span(const floating* src, Py_ssize_t stride, floating* dst, Py_ssize_t n, const Epilogue* e,
                            Py_ssize_t k) noexcept nogil:
    """dst[t] = the epilogue of channel k applied to src[t * stride], t < n."""
    cdef const floating* bias = <const floating*>e.bias
    cdef floating bval = bias[k] if bias != NULL else 0
    cdef floating sc = (<const floating*>e.scale)[k] if e.scale != NULL else 1
    cdef floating sh = (<const floating*>e.shift)[k] if e.scale != NULL else 0
    cdef floating v
    cdef Py_ssize_t t
    if e.scale == NULL and not e.relu:
        for t in range(n):
            dst[t] = src[t * stride] + bval
    elif e.scale == NULL:
        for t in range(n):
            v = src[t * stride] + bval
            dst[t] = 0 if v <= 0 else v
    elif not e.relu:
        for t in range(n):
            dst[t] = (src[t * stride] + bval) * sc + sh
    else:
        for t in range(n):
            v = src[t * stride] + bval
            v = 0 if v <= 0 else v
            dst[t] = v * sc + sh


cdef inline void store_gather(const floating* src, Py_ssize_t stride, floating* dst, const Py_ssize_t* at,
                              Py_ssize_t n, const Epilogue* e, Py_ssize_t k) noexcept nogil:
    """dst[at[t]] = the epilogue of channel k applied to src[t * stride], t < n: store_span for values that are
    not in output order (the pixel path's panels of pixels grouped by the taps they read)."""
    cdef const floating* bias = <const floating*>e.bias
    cdef floating bval = bias[k] if bias != NULL else 0
    cdef floating sc = (<const floating*>e.scale)[k] if e.scale != NULL else 1
    cdef floating sh = (<const floating*>e.shift)[k] if e.scale != NULL else 0
    cdef floating v
    cdef Py_ssize_t t
    if e.scale == NULL and not e.relu:
        for t in range(n):
            dst[at[t]] = src[t * stride] + bval
    elif e.scale == NULL:
        for t in range(n):
            v = src[t * stride] + bval
            dst[at[t]] = 0 if v <= 0 else v
    elif not e.relu:
        for t in range(n):
            dst[at[t]] = (src[t * stride] + bval) * sc + sh
    else:
        for t in range(n):
            v = src[t * stride] + bval
            v = 0 if v <= 0 else v
            dst[at[t]] = v * sc + sh


cdef inline void store_rows(const floating* cbuf, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t n, const Epilogue* e,
                            Py_ssize_t k0, floating* y, Py_ssize_t ldy) noexcept nogil:
    """Row i < rows of y (stride ldy) = the epilogue of channel k0 + i applied to row i of cbuf (stride ldc)."""
    cdef Py_ssize_t i
    for i in range(rows):
        store_span(cbuf + i * ldc, 1, y + i * ldy, n, e, k0 + i)
