# Optimizer updates (SGD with momentum, Nesterov and weight decay; Adam) over every parameter of a model in one
# call and one parallel block, instead of a few NumPy temporaries per parameter. Each parameter, its gradient and
# its slots are 1-D contiguous arrays of one dtype; the parameters are cut into chunks of OPTIM_CHUNK values and the
# chunks of all of them are shared out over the team. Every value is updated on its own (no sums), so the result
# does not depend on the thread count. The hyper-parameters come as an array of the parameters' dtype, rounded
# there once (as NumPy rounds a Python float multiplied into a float32 array).

from libc.math cimport sqrtf

cdef Py_ssize_t OPTIM_CHUNK = 1 << 14


cdef inline floating root(floating v) noexcept nogil:
    if floating is float:
        return sqrtf(v)
    else:
        return sqrt(v)


cdef void sgd_span(floating* w, const floating* g, floating* v, Py_ssize_t n, floating lr, floating momentum,
                   floating weight_decay, bint nesterov) noexcept nogil:
    """g' = g + weight_decay * w; v = momentum * v + g'; w -= lr * (g' + momentum * v if nesterov else v), or
    w -= lr * g' without a momentum slot (v NULL)."""
    cdef Py_ssize_t j
    cdef floating gj, vj
    if v == NULL:
        for j in range(n):
            gj = g[j] + w[j] * weight_decay
            w[j] = w[j] - gj * lr
    elif nesterov:
        for j in range(n):
            gj = g[j] + w[j] * weight_decay
            vj = v[j] * momentum + gj
            v[j] = vj
            w[j] = w[j] - (gj + vj * momentum) * lr
    else:
        for j in range(n):
            gj = g[j] + w[j] * weight_decay
            vj = v[j] * momentum + gj
            v[j] = vj
            w[j] = w[j] - vj * lr


cdef void adam_span(floating* w, const floating* g, floating* m, floating* v, Py_ssize_t n,
                    const floating* h) noexcept nogil:
    """h = (lr / correction1, beta1, 1 - beta1, beta2, 1 - beta2, sqrt(correction2), eps, weight_decay):
    g' = g + weight_decay * w; m = beta1 m + (1 - beta1) g'; v = beta2 v + (1 - beta2) g'^2;
    w -= m / (sqrt(v) / sqrt(correction2) + eps) * lr / correction1."""
    cdef Py_ssize_t j
    cdef floating gj, mj, vj
    cdef floating step = h[0], b1 = h[1], c1 = h[2], b2 = h[3], c2 = h[4], root2 = h[5], eps = h[6], wd = h[7]
    for j in range(n):
        gj = g[j] + w[j] * wd
        mj = m[j] * b1 + gj * c1
        vj = v[j] * b2 + gj * gj * c2
        m[j] = mj
        v[j] = vj
        w[j] = w[j] - mj / (root(vj) / root2 + eps) * step


cdef int gather_arrays(list arrays, Py_ssize_t count, floating** ptrs, Py_ssize_t* sizes, floating dummy) except -1:
    """ptrs[i] = the data of arrays[i] (1-D, contiguous, writable, of the call's dtype); sizes[i] its length, or
    checked against sizes[i] when that is >= 0."""
    cdef floating[::1] view
    cdef Py_ssize_t i
    if len(arrays) != count:
        raise ValueError(f"optimizer kernel: expected {count} arrays, got {len(arrays)}")
    for i in range(count):
        view = arrays[i]
        if sizes[i] >= 0 and view.shape[0] != sizes[i]:
            raise ValueError(f"optimizer kernel: array {i} has {view.shape[0]} values, its parameter {sizes[i]}")
        sizes[i] = view.shape[0]
        ptrs[i] = &view[0] if view.shape[0] > 0 else NULL
    return 0


cdef int optimizer_step(int kind, list params, list grads, list slot1, list slot2, const floating* h,
                        bint nesterov, int n_threads) except -1:
    """kind 0: SGD (slot1 the momentum buffers or None, h = lr, momentum, weight_decay); kind 1: Adam (slot1, slot2
    the first and second moments, h as adam_span's)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t count = len(params)
    cdef Py_ssize_t i, ip, t, nchunks = 0, j0, n
    cdef floating** ptrs = NULL
    cdef Py_ssize_t* sizes = NULL
    cdef Py_ssize_t* first = NULL
    cdef floating* w
    cdef int nslots = (1 if slot1 is not None else 0) + (1 if slot2 is not None else 0)
    if count == 0:
        return 0
    try:
        ptrs = <floating**>calloc((2 + nslots) * count, sizeof(floating*))
        sizes = <Py_ssize_t*>malloc(count * sizeof(Py_ssize_t))
        first = <Py_ssize_t*>malloc((count + 1) * sizeof(Py_ssize_t))
        if ptrs == NULL or sizes == NULL or first == NULL:
            raise MemoryError("optimizer step: could not allocate the parameter table")
        for i in range(count):
            sizes[i] = -1
        gather_arrays(params, count, ptrs, sizes, h[0])
        gather_arrays(grads, count, ptrs + count, sizes, h[0])
        if slot1 is not None:
            gather_arrays(slot1, count, ptrs + 2 * count, sizes, h[0])
        if slot2 is not None:
            gather_arrays(slot2, count, ptrs + 3 * count, sizes, h[0])
        # first[i]: index of parameter i's first chunk; chunk t belongs to the parameter with first[i] <= t < first[i+1]
        for i in range(count):
            first[i] = nchunks
            nchunks += (sizes[i] + OPTIM_CHUNK - 1) // OPTIM_CHUNK
        first[count] = nchunks
        with nogil:
            fps = fp_suspend()
            with parallel(num_threads=n_threads):
                fp = fp_enter()
                for t in prange(nchunks, schedule='static'):
                    # the owning parameter, by binary search over first[] (a few dozen parameters)
                    ip = owner_of(first, count, t)
                    j0 = (t - first[ip]) * OPTIM_CHUNK
                    n = min(OPTIM_CHUNK, sizes[ip] - j0)
                    w = ptrs[ip] + j0
                    if kind == 0:
                        sgd_span(w, ptrs[count + ip] + j0, ptrs[2 * count + ip] + j0 if nslots else NULL, n, h[0],
                                 h[1], h[2], nesterov)
                    else:
                        adam_span(w, ptrs[count + ip] + j0, ptrs[2 * count + ip] + j0, ptrs[3 * count + ip] + j0,
                                  n, h)
                fp_leave(fp)
            fp_resume(fps)
    finally:
        free(ptrs)
        free(sizes)
        free(first)
    return 0


cdef inline Py_ssize_t owner_of(const Py_ssize_t* first, Py_ssize_t count, Py_ssize_t t) noexcept nogil:
    """The i with first[i] <= t < first[i + 1] and a non-empty range."""
    cdef Py_ssize_t lo = 0, hi = count, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if first[mid] <= t:
            lo = mid
        else:
            hi = mid
    return lo


def sgd_step(list params,                   # IN/OUT 1-D arrays, one per parameter
             list grads,                    # IN     same sizes
             momentum_buffers,              # IN/OUT list of the same sizes, or None (no momentum)
             const floating[::1] hyper,     # IN     (lr, momentum, weight_decay) in the parameters' dtype
             bint nesterov, int n_threads):
    """One SGD step over every parameter (see sgd_span), in one parallel pass."""
    if hyper.shape[0] != 3:
        raise ValueError("sgd_step: hyper must hold lr, momentum, weight_decay")
    optimizer_step(0, params, grads, momentum_buffers, None, &hyper[0], nesterov, n_threads)


def adam_step(list params,                  # IN/OUT 1-D arrays, one per parameter
              list grads,                   # IN     same sizes
              list exp_avg,                 # IN/OUT first moments
              list exp_avg_sq,              # IN/OUT second moments
              const floating[::1] hyper,    # IN     see adam_span, in the parameters' dtype
              int n_threads):
    """One Adam step over every parameter (see adam_span), in one parallel pass."""
    if hyper.shape[0] != 8:
        raise ValueError("adam_step: hyper must hold 8 values (see adam_span)")
    optimizer_step(1, params, grads, exp_avg, exp_avg_sq, &hyper[0], False, n_threads)
