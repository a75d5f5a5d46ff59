# A frozen model's steps run as one compiled loop (frozen.py builds the program; this file runs it).
#
# The Python loop over a plan's steps cost about 2.5 us per step at batch 1 (argument parsing, a memoryview per
# array, the def call), a third of LeNet-5's whole forward; and the gaps between steps were longer than the OpenMP
# workers spin, so a batch-1 call could not use a second thread. A Program holds each step of one (per-sample
# shape, batch size) as a C struct with its arrays' pointers, validated when it is built, and runs them back to back
# without the GIL, calling the same kernel cores as the Python steps with the same thread counts: the same bits.
# On two or more threads it is a split program instead (run_split, at the end): each step a stage of slices over
# disjoint images or channels, each slice one kernel call on one thread, shared by the caller and the workers of
# frozen.h's pool; the same bits again, since which thread runs a slice never changes its arithmetic.
#
# On one thread a large batch may also run in slices of images (frozen.py's _SLICE_BYTES): ops placed at offsets
# into the operands and run in order by run_ops.
#
# Operands are numbered: 0 the call's input, 1 and 2 the arena's first two activation buffers (frozen.py's
# _Arena), 3 a program's own output array where it has one, 4 the arena's third buffer where it has one (batch 1);
# an op reads and writes at its offsets into them (a slice's part; 0 for whole steps).

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS
from libc.stdlib cimport realloc

cdef extern from "frozen.h":
    int stage_claim "ce_stage_claim"(int* claimed) noexcept nogil
    void stage_done "ce_stage_done"(int* done) noexcept nogil
    void stage_wait "ce_stage_wait"(int* done, int n) noexcept nogil
    int stage_failed "ce_stage_failed"(int* failed) noexcept nogil
    void stage_fail "ce_stage_fail"(int* failed) noexcept nogil
    ctypedef void (*job_fn "ce_job_fn")(void* ctx) noexcept nogil
    void pool_run "ce_pool_run"(job_fn fn, void* ctx, int workers) noexcept nogil
    void pool_set_spin "ce_pool_set_spin"(long long ns) noexcept nogil
    int pool_workers "ce_pool_workers"() noexcept nogil


def set_pool_spin(long long ns):
    """How long the split programs' idle workers spin before they sleep (frozen.h), in nanoseconds."""
    pool_set_spin(ns)


def split_workers():
    """Workers of the split programs' pool started so far (they start with the first split program run)."""
    return pool_workers()


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
    Py_ssize_t src_off, dst_off     # where the op's input and output start in them (elements): a slice's part
    int n_threads
    int relu                        # linear, batch norm: ReLU after
    int relu_threads                # linear: threads of that ReLU (frozen.py's choice for an elementwise op)
    ConvGeom conv                   # conv
    Epilogue epilogue               # conv
    PoolGeom pool                   # pools
    int count_include_pad           # avg pool
    int packed_path                 # conv: the path `packed` was packed for
    int forced                      # conv: take packed_path (a plan's packed conv, any batch) or, unpacked, smallc (a slice)
    Py_ssize_t rows, cols, inner    # linear: M, N, K; relu: rows values; global avg pool: rows planes of cols
    Py_ssize_t col0, ld             # linear: the slice's first column of the whole product, and its row length
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
    cdef void* operands[5]
    cdef public object result      # operand 3, where a program of image slices leaves its output (else None)
    cdef list keep
    cdef public int split          # > 1: a split program (run_split) on this many threads
    cdef list slice_bounds         # a split program's slices: ops[slice_bounds[j]:slice_bounds[j + 1]]
    cdef list bounds               # and its stages: slices bounds[s] to bounds[s + 1]
    cdef int* stage_start
    cdef int* slice_start
    cdef int* counters             # per stage: slices claimed, slices done
    cdef int n_stages

    def __cinit__(self, bint is_double, Py_ssize_t input_size, buffers):
        self.is_double = is_double
        self.input_size = input_size
        self.keep = list(buffers)
        self.operands[0] = NULL
        self.operands[1] = <void*>_address(buffers[0])
        self.operands[2] = <void*>_address(buffers[1])
        self.operands[3] = NULL
        self.operands[4] = <void*>_address(buffers[2]) if len(buffers) > 2 else NULL
        self.result = None
        self.ops = NULL
        self.n_ops = self.capacity = 0
        self.split = 0
        self.bounds = [0]
        self.slice_bounds = [0]
        self.stage_start = NULL
        self.slice_start = NULL
        self.counters = NULL
        self.n_stages = 0

    def __dealloc__(self):
        free(self.ops)
        free(self.stage_start)
        free(self.slice_start)
        free(self.counters)

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

    def end_slice(self):
        """Close a split program's slice: the ops added since the last one run in order on one thread."""
        if self.n_ops > self.slice_bounds[len(self.slice_bounds) - 1]:
            self.slice_bounds.append(self.n_ops)

    def end_stage(self):
        """Close a split program's stage: its slices may run at once, and the next stage starts when they are all
        done."""
        self.end_slice()
        if len(self.slice_bounds) - 1 > self.bounds[len(self.bounds) - 1]:
            self.bounds.append(len(self.slice_bounds) - 1)

    def set_result(self, array):
        """Operand 3: an array of its own for the output (C-contiguous, of the program's dtype), held here."""
        self.result = array
        self.operands[3] = <void*>_address(array)

    def place(self, Py_ssize_t src_off, Py_ssize_t dst_off):
        """The last op's input and output start src_off and dst_off elements into its operands."""
        if self.n_ops == 0 or src_off < 0 or dst_off < 0:
            raise ValueError("frozen program: place() needs an op and offsets >= 0")
        self.ops[self.n_ops - 1].src_off = src_off
        self.ops[self.n_ops - 1].dst_off = dst_off

    def finish(self, int n_threads):
        """Run as a split program on n_threads (> 1): every stage's slices shared among them; else op by op."""
        cdef int i, n, m
        self.end_stage()
        if n_threads <= 1:
            self.split = 0
            return
        n = len(self.bounds)
        m = len(self.slice_bounds)
        free(self.stage_start)
        free(self.slice_start)
        free(self.counters)
        self.stage_start = <int*>malloc(n * sizeof(int))
        self.slice_start = <int*>malloc(m * sizeof(int))
        self.counters = <int*>malloc(2 * n * sizeof(int))
        if self.stage_start == NULL or self.slice_start == NULL or self.counters == NULL:
            raise MemoryError()
        for i in range(n):
            self.stage_start[i] = self.bounds[i]
        for i in range(m):
            self.slice_start[i] = self.slice_bounds[i]
        self.n_stages = n - 1
        self.split = n_threads

    def stages(self):
        """Steps of a split program (after finish)."""
        return len(self.bounds) - 1

    def slices(self):
        """Slices of a split program (after finish)."""
        return len(self.slice_bounds) - 1

    def conv(self, int src, int dst, int n_threads, tuple x_shape, weight, bias, tuple params, bint relu, scale,
             shift, packed, bint forced=False):
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
        op.forced = forced

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

    def linear(self, int src, int dst, int n_threads, Py_ssize_t rows, weight_t, bias, bint relu, int relu_threads,
               Py_ssize_t col0=0, Py_ssize_t cols=-1):
        """y = x @ weight_t (+ bias, ReLU); a slice computes columns col0 to col0 + cols of each row only."""
        cdef Op* op = self._add(OP_LINEAR, src, dst, n_threads)
        op.rows = rows
        op.inner = weight_t.shape[0]
        op.ld = weight_t.shape[1]
        op.cols = op.ld if cols < 0 else cols
        op.col0 = col0
        if col0 < 0 or col0 + op.cols > op.ld:
            raise ValueError("frozen program: linear columns out of range")
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
                if self.split > 1:
                    if self.is_double:
                        rc = run_split(<double>0, self.ops, self.stage_start, self.slice_start, self.n_stages, self.operands,
                                       self.split, self.counters)
                    else:
                        rc = run_split(<float>0, self.ops, self.stage_start, self.slice_start, self.n_stages, self.operands,
                                       self.split, self.counters)
                elif self.is_double:
                    rc = run_ops(<double>0, self.ops, self.n_ops, self.operands)
                else:
                    rc = run_ops(<float>0, self.ops, self.n_ops, self.operands)
                fp_leave_call(fp)
        finally:
            self.operands[0] = NULL
            PyBuffer_Release(&view)
        if rc:
            raise MemoryError("frozen model: could not allocate kernel scratch")


cdef int run_op(floating dummy, const Op* op, void** operands, int nt, int relu_nt) noexcept nogil:
    """One op on nt threads (a linear's ReLU on relu_nt); nonzero where it failed (scratch allocation)."""
    cdef int rc = 0
    cdef const floating* x = <const floating*>operands[op.src] + op.src_off
    cdef floating* y = <floating*>operands[op.dst] + op.dst_off
    cdef floating* yr
    cdef const floating* bias
    cdef Py_ssize_t r, j
    if op.kind == OP_CONV:
        rc = conv2d_forward_core(x, <const floating*>op.weight, &op.epilogue, y, &op.conv, nt,
                                 <const floating*>op.packed, op.packed_path, op.forced)
    elif op.kind == OP_MAX_POOL:
        rc = max_pool2d_forward_core(x, y, NULL, &op.pool, nt)
    elif op.kind == OP_AVG_POOL:
        avg_pool2d_forward_core(x, y, &op.pool, op.count_include_pad, nt)
    elif op.kind == OP_RELU:
        relu_core(x, y, op.rows, nt)
    elif op.kind == OP_GLOBAL_AVG_POOL:
        global_avg_pool2d_core(x, y, op.rows, op.cols, nt)
    elif op.kind == OP_LINEAR:
        y = y + op.col0
        rc = gemm_strided(op.rows, op.cols, op.inner, x, op.inner, 1, <const floating*>op.weight + op.col0, op.ld, 1,
                          y, op.ld, nt)
        if rc == 0 and op.bias != NULL:
            bias = <const floating*>op.bias + op.col0
            for r in range(op.rows):
                yr = y + r * op.ld
                for j in range(op.cols):
                    yr[j] = yr[j] + bias[j]
        if rc == 0 and op.relu:
            if op.cols == op.ld:
                relu_core(y, y, op.rows * op.cols, relu_nt)
            else:
                for r in range(op.rows):
                    relu_core(y + r * op.ld, y + r * op.ld, op.cols, 1)
    elif op.kind == OP_BATCH_NORM:
        rc = batch_norm2d_forward_core(x, y, op.rows, op.channels, op.cols, <const floating*>op.weight,
                                       <const floating*>op.bias, <floating*>op.mean, <floating*>op.var, False,
                                       <floating>op.eps, op.relu, nt)
    return rc


cdef int run_ops(floating dummy, const Op* ops, int n_ops, void** operands) noexcept nogil:
    """Each op in turn on its own thread count; nonzero as soon as one fails (scratch allocation)."""
    cdef int i, rc
    cdef const Op* op
    for i in range(n_ops):
        op = &ops[i]
        rc = run_op(dummy, op, operands, op.n_threads, op.relu_threads)
        if rc:
            return rc
    return 0


cdef struct SplitJob:
    const Op* ops
    const int* stage_start          # stage s: slices stage_start[s] to stage_start[s + 1]
    const int* slice_start          # slice j: ops slice_start[j] to slice_start[j + 1], in order
    int n_stages
    void** operands
    int* counters
    int failed


cdef void run_stages(floating dummy, SplitJob* job) noexcept nogil:
    """The calling thread's share of a split program: in each stage, slices claimed one at a time until none is
    left (a slice's ops run in order), then a wait until the others' are done. After a failure the remaining
    slices are claimed and skipped."""
    cdef int s, k, n, j, i
    cdef fpstate fp = fp_enter()
    for s in range(job.n_stages):
        n = job.stage_start[s + 1] - job.stage_start[s]
        while True:
            k = stage_claim(&job.counters[2 * s])
            if k >= n:
                break
            j = job.stage_start[s] + k
            for i in range(job.slice_start[j], job.slice_start[j + 1]):
                if stage_failed(&job.failed):
                    break
                if run_op(dummy, &job.ops[i], job.operands, 1, 1):
                    stage_fail(&job.failed)
            stage_done(&job.counters[2 * s + 1])
        stage_wait(&job.counters[2 * s + 1], n)
    fp_leave(fp)


cdef void run_stages_float(void* job) noexcept nogil:
    run_stages(<float>0, <SplitJob*>job)


cdef void run_stages_double(void* job) noexcept nogil:
    run_stages(<double>0, <SplitJob*>job)


cdef int run_split(floating dummy, const Op* ops, const int* stage_start, const int* slice_start, int n_stages,
                   void** operands, int n_threads, int* counters) noexcept nogil:
    """A split program: every stage's slices (runs of steps over disjoint images or channels, each op a whole
    kernel call on one thread) shared between the caller and n_threads - 1 workers of frozen.h's pool. Which
    thread runs a slice never changes its bits; the caller alone runs whatever no worker took."""
    cdef SplitJob job
    cdef fpstate fps
    job.ops = ops
    job.stage_start = stage_start
    job.slice_start = slice_start
    job.n_stages = n_stages
    job.operands = operands
    job.counters = counters
    job.failed = 0
    memset(counters, 0, 2 * n_stages * sizeof(int))
    fps = fp_suspend()
    if floating is float:
        pool_run(run_stages_float, &job, n_threads - 1)
    else:
        pool_run(run_stages_double, &job, n_threads - 1)
    fp_resume(fps)
    return job.failed


cdef extern from "checksum.h":
    unsigned long long c_checksum "ce_checksum"(const unsigned char* p, size_t n, unsigned long long seed) nogil


def checksum(arrays):
    """A 64-bit checksum of the bytes of every array in `arrays`, in order (checksum.h): Sequential.predict's test
    that no weight changed since its frozen plan was built. Each must be C-contiguous."""
    cdef unsigned long long h = 0
    cdef Py_buffer view
    for a in arrays:
        PyObject_GetBuffer(a, &view, PyBUF_C_CONTIGUOUS)
        try:
            with nogil:
                h = c_checksum(<const unsigned char*>view.buf, <size_t>view.len, h)
        finally:
            PyBuffer_Release(&view)
    return h
