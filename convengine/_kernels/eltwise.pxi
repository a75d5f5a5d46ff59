# Elementwise ops: relu and its gradient. NaN propagates as in PyTorch: relu(NaN) = NaN, and the gradient is
# passed through wherever x is not <= 0.

cdef Py_ssize_t ELTWISE_CHUNK = 1 << 16


def relu_forward(const floating[::1] x,   # IN
                 floating[::1] out,       # OUT
                 int n_threads):
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t nchunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK
    cdef Py_ssize_t ch, i, i0, i1
    cdef floating v
    for ch in prange(nchunks, nogil=True, schedule='static', num_threads=n_threads):
        i0 = ch * ELTWISE_CHUNK
        i1 = min(n, i0 + ELTWISE_CHUNK)
        for i in range(i0, i1):
            v = x[i]
            out[i] = 0 if v <= 0 else v


def relu_backward(const floating[::1] grad_out,  # IN
                  const floating[::1] x,         # IN
                  floating[::1] out,             # OUT
                  int n_threads):
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t nchunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK
    cdef Py_ssize_t ch, i, i0, i1
    for ch in prange(nchunks, nogil=True, schedule='static', num_threads=n_threads):
        i0 = ch * ELTWISE_CHUNK
        i1 = min(n, i0 + ELTWISE_CHUNK)
        for i in range(i0, i1):
            out[i] = 0 if x[i] <= 0 else grad_out[i]
