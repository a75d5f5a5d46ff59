# A frozen model's steps run as one compiled loop (frozen.py builds the program; this file runs it).
#
# The Python loop over a plan's steps cost about 2.5 us per step at batch 1 (argument parsing, a memoryview per
# array, the def call), a third of LeNet-5's whole forward; and the gaps between steps were longer than the OpenMP
# workers spin, so a batch-1 call could not use a second thread. A Program holds each step of one (per-sample
# shape, batch size) as a C struct with its arrays' pointers, validated when it is built, and runs them back to back
# without the GIL, calling the same kernel cores as the Python steps with the same thread counts: the same bits.
#
# Operands are numbered: 0 the call's input, 1 and 2 the arena's two activation buffers (frozen.py's _Arena), whose
# outputs always start at the buffer's start.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS
from libc.stdlib cimport realloc

cdef enum:
    OP_CONV = 1
    OP_MAX_POOL = 2
    OP_AVG_POOL = 3
    OP_RELU = 4
    OP_GLOBAL_AVG_POOL = 5
    OP_LINEAR = 6
    OP_BATCH_NORM = 7


cdef struct Op:
    int kind
    int src, dst                    # operand numbers (above)
    int n_threads
    int relu                        # linear, batch norm: ReLU after
    int relu_threads                # linear: threads of that ReLU (frozen.py's choice for an elementwise op)
    ConvGeom conv                   # conv
    Epilogue epilogue               # conv
    PoolGeom pool                   # pools
    int count_include_pad           # avg pool
    int packed_path                 # conv: the path `packed` was packed for
    Py_ssize_t rows, cols, inner    # linear: M, N, K; relu: rows values; global avg pool: rows planes of cols
    Py_ssize_t channels             # batch norm: (rows images, channels, cols values per plane)
    double eps                      # batch norm
    const void* weight              # conv weights; linear W^T (K x N); batch norm gamma
    const void* packed              # conv: packed weights or NULL
    const void* bias                # linear bias or NULL; batch norm beta
    void* mean                      # batch norm running statistics (read only: training is False)
    void* var


cdef size_t _address(object array):
    return <size_t>array.__array_interface__["data"][0]


cdef class Program:
    """The compiled steps of one frozen plan for one batch size. Built by frozen.py, which checks every array
    (dtype, contiguity, shape) before handing it over; the program keeps a reference to each."""
    cdef Op* ops
    cdef int n_ops, capacity
    cdef bint is_double
    cdef Py_ssize_t input_size
    cdef void* operands[3]
    cdef list keep
    cdef public int team           # > 0: every op runs on this many threads (the whole call keeps the team busy)

    def __cinit__(self, bint is_double, Py_ssize_t input_size, buffers):
        self.is_double = is_double
        self.input_size = input_size
        self.keep = list(buffers)
        self.operands[0] = NULL
        self.operands[1] = <void*>_address(buffers[0])
        self.operands[2] = <void*>_address(buffers[1])
        self.ops = NULL
        self.n_ops = self.capacity = 0
        self.team = 0

    def __dealloc__(self):
        free(self.ops)

    cdef Op* _add(self, int kind, int src, int dst, int n_threads) except NULL:
        cdef Op* grown
        cdef Op* op
        if self.n_ops == self.capacity:
            grown = <Op*>realloc(self.ops, (2 * self.capacity + 8) * sizeof(Op))
            if grown == NULL:
                raise MemoryError()
            self.ops = grown
            self.capacity = 2 * self.capacity + 8
        op = &self.ops[self.n_ops]
        memset(op, 0, sizeof(Op))
        op.kind = kind
        op.src = src
        op.dst = dst
        op.n_threads = n_threads
        self.n_ops += 1
        return op

    cdef const void* _hold(self, array):
        if array is None:
            return NULL
        self.keep.append(array)
        return <const void*>_address(array)

    def conv(self, int src, int dst, int n_threads, tuple x_shape, weight, bias, tuple params, bint relu, scale,
             shift, packed):
        cdef Op* op = self._add(OP_CONV, src, dst, n_threads)
        fill_geom(&op.conv, x_shape, weight.shape[0], weight.shape[2], weight.shape[3], params)
        op.weight = self._hold(weight)
        op.epilogue.bias = self._hold(bias)
        op.epilogue.scale = self._hold(scale)
        op.epilogue.shift = self._hold(shift)
        op.epilogue.relu = relu
        op.packed_path = PATH_AUTO
        if packed is not None:
            op.packed_path = packed[0]
            op.packed = self._hold(packed[1])

    def pool(self, int src, int dst, int n_threads, bint is_max, Py_ssize_t planes, Py_ssize_t H, Py_ssize_t W,
             tuple params, bint count_include_pad):
        cdef Op* op = self._add(OP_MAX_POOL if is_max else OP_AVG_POOL, src, dst, n_threads)
        fill_pool_geom(&op.pool, planes, H, W, params)
        op.count_include_pad = count_include_pad

    def relu(self, int src, int dst, int n_threads, Py_ssize_t size):
        cdef Op* op = self._add(OP_RELU, src, dst, n_threads)
        op.rows = size

    def global_avg_pool(self, int src, int dst, int n_threads, Py_ssize_t planes, Py_ssize_t plane_size):
        cdef Op* op = self._add(OP_GLOBAL_AVG_POOL, src, dst, n_threads)
        op.rows = planes
        op.cols = plane_size

    def linear(self, int src, int dst, int n_threads, Py_ssize_t rows, weight_t, bias, bint relu, int relu_threads):
        cdef Op* op = self._add(OP_LINEAR, src, dst, n_threads)
        op.rows = rows
        op.inner = weight_t.shape[0]
        op.cols = weight_t.shape[1]
        op.weight = self._hold(weight_t)
        op.bias = self._hold(bias)
        op.relu = relu
        op.relu_threads = relu_threads

    def batch_norm(self, int src, int dst, int n_threads, Py_ssize_t images, Py_ssize_t channels,
                   Py_ssize_t plane_size, gamma, beta, mean, var, double eps, bint relu):
        cdef Op* op = self._add(OP_BATCH_NORM, src, dst, n_threads)
        op.rows = images
        op.channels = channels
        op.cols = plane_size
        op.weight = self._hold(gamma)
        op.bias = self._hold(beta)
        op.mean = <void*>self._hold(mean)
        op.var = <void*>self._hold(var)
        op.eps = eps
        op.relu = relu

    def run(self, x):
        """Run every step on x (C-contiguous, the dtype and size the program was built for)."""
        cdef Py_buffer view
        cdef fpstate fp
        cdef int rc
        cdef size_t itemsize = sizeof(double) if self.is_double else sizeof(float)
        PyObject_GetBuffer(x, &view, PyBUF_C_CONTIGUOUS)
        try:
            if <size_t>view.len != self.input_size * itemsize or <size_t>view.itemsize != itemsize:
                raise ValueError("frozen program: input of the wrong size or dtype")
            self.operands[0] = view.buf
            with nogil:
                fp = fp_enter_call()
                if self.is_double:
                    rc = run_ops(<double>0, self.ops, self.n_ops, self.operands, self.team)
                else:
                    rc = run_ops(<float>0, self.ops, self.n_ops, self.operands, self.team)
                fp_leave_call(fp)
        finally:
            self.operands[0] = NULL
            PyBuffer_Release(&view)
        if rc:
            raise MemoryError("frozen model: could not allocate kernel scratch")


cdef int run_ops(floating dummy, const Op* ops, int n_ops, void** operands, int team) noexcept nogil:
    """Each op in turn (on `team` threads each, if positive); nonzero as soon as one fails (scratch allocation)."""
    cdef int i, rc = 0, nt
    cdef const Op* op
    cdef const floating* x
    cdef floating* y
    cdef Py_ssize_t r, j
    for i in range(n_ops):
        op = &ops[i]
        x = <const floating*>operands[op.src]
        y = <floating*>operands[op.dst]
        nt = team if team > 0 else op.n_threads
        if op.kind == OP_CONV:
            rc = conv2d_forward_core(x, <const floating*>op.weight, &op.epilogue, y, &op.conv, nt,
                                     <const floating*>op.packed, op.packed_path)
        elif op.kind == OP_MAX_POOL:
            rc = max_pool2d_forward_core(x, y, NULL, &op.pool, nt)
        elif op.kind == OP_AVG_POOL:
            avg_pool2d_forward_core(x, y, &op.pool, op.count_include_pad, nt)
        elif op.kind == OP_RELU:
            relu_core(x, y, op.rows, nt)
        elif op.kind == OP_GLOBAL_AVG_POOL:
            global_avg_pool2d_core(x, y, op.rows, op.cols, nt)
        elif op.kind == OP_LINEAR:
            rc = gemm_strided(op.rows, op.cols, op.inner, x, op.inner, 1, <const floating*>op.weight, op.cols, 1,
                              y, op.cols, nt)
            if rc == 0 and op.bias != NULL:
                for r in range(op.rows):
                    for j in range(op.cols):
                        y[r * op.cols + j] = y[r * op.cols + j] + (<const floating*>op.bias)[j]
            if rc == 0 and op.relu:
                relu_core(y, y, op.rows * op.cols, (team if team > 0 else op.relu_threads))
        elif op.kind == OP_BATCH_NORM:
            rc = batch_norm2d_forward_core(x, y, op.rows, op.channels, op.cols, <const floating*>op.weight,
                                           <const floating*>op.bias, <floating*>op.mean, <floating*>op.var, False,
                                           <floating>op.eps, op.relu, nt)
        if rc:
            return rc
    return 0
