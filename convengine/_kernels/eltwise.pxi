# Elementwise ops: relu and its gradient. NaN propagates as in PyTorch: relu(NaN) = NaN, and the gradient is
# passed through wherever x is not <= 0.

cdef Py_ssize_t ELTWISE_CHUNK = 1 << 16


cdef void relu_span(const floating* x, floating* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v
    for i in range(n):
        v = x[i]
        out[i] = 0 if v <= 0 else v


cdef void relu_core(const floating* x, floating* out, Py_ssize_t n, int n_threads) noexcept nogil:
    """out = relu(x) over n values, in chunks of ELTWISE_CHUNK (x == out allowed)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t nchunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK
    cdef Py_ssize_t ch, i0
    if n == 0:
        return
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for ch in prange(nchunks, schedule='static'):
            i0 = ch * ELTWISE_CHUNK
            relu_span(x + i0, out + i0, min(n, i0 + ELTWISE_CHUNK) - i0)
        fp_leave(fp)
    fp_resume(fps)


def relu_forward(const floating[::1] x,   # IN
                 floating[::1] out,       # OUT
                 int n_threads):
    if x.shape[0] == 0:
        return
    with nogil:
        relu_core(&x[0], &out[0], x.shape[0], n_threads)


cdef void relu_backward_span(const floating* g, const floating* x, floating* out, Py_ssize_t n) noexcept nogil:
    # both operands loaded unconditionally, on raw pointers: the choice is then a vector blend, not a branch that
    # random signs mispredict half the time (12x slower)
    cdef Py_ssize_t i
    cdef floating gv, xv
    for i in range(n):
        gv = g[i]
        xv = x[i]
        out[i] = 0 if xv <= 0 else gv


def relu_backward(const floating[::1] grad_out,  # IN
                  const floating[::1] x,         # IN
                  floating[::1] out,             # OUT
                  int n_threads):
    cdef fpstate fp, fps
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t nchunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK
    cdef Py_ssize_t ch, i0
    if n == 0:
        return
    fps = fp_suspend()
    with nogil, parallel(num_threads=n_threads):
        fp = fp_enter()
        for ch in prange(nchunks, schedule='static'):
            i0 = ch * ELTWISE_CHUNK
            relu_backward_span(&grad_out[0] + i0, &x[0] + i0, &out[0] + i0, min(n, i0 + ELTWISE_CHUNK) - i0)
        fp_leave(fp)
    fp_resume(fps)
