"""Buffers reused from one training step to the next, for the arrays the ops allocate.

A training step allocates the same big arrays in the same order every time: each layer's output in forward, each
layer's input gradient and weight-gradient temporaries in backward. Fresh, they cost more than the arithmetic that
fills them: an 8 MB array freed and allocated again is mapped afresh by malloc, and its first writes page-fault
(a batch norm + ReLU backward of 64x32x32x32 took 7.6 ms with fresh arrays, 3.3 ms in the same memory).

An `Arena` holds such buffers: while one is in use (`using`, per thread), the ops of `convengine.functional` take
their outputs of at least MIN_BYTES from it (`empty`). A pass (`begin(key)`) finds every buffer of its key free
again, and each request takes a free buffer of its shape and dtype, else a new one: the same requests in the same
order get the same buffers pass after pass. Sequential uses one arena for forward and one for backward, keyed by
the batch's shape, and only for arrays that nobody outside the step can hold (see Sequential.forward and
backward): an array from an arena is overwritten by the next pass of the same key.

Within a pass, `release(a)` hands a buffer back as soon as its last reader is done, and the next request of its
shape takes the most recently released one (still in cache): backward's gradients then live in two buffers per
shape, one being read while the next is written, instead of one per layer, and the weight gradients' temporaries
in one per shape (the separable benchmark net's step at batch 64: 61 -> 50 MB, against a 32 MB L3 cache).

Arrays of MIN_BYTES and more, from an arena or not, start on a 64-byte cache line (`aligned_empty`): NumPy's big
arrays start 16 bytes past one, so each 64-byte vector that the kernels load or store along a row of 16 floats
straddled two lines (Intel Xeon, family 6 model 207, batch 64, 2 threads, the input gradient of a 64x32x32x32 -> 64
3x3 stride-2 conv: 105 -> 123 GFLOP/s with its arrays aligned, interleaved; other shapes within 2%).
"""
import contextlib
import math
import threading

import numpy as np

MIN_BYTES = 1 << 16       # smaller arrays come from malloc's own free lists cheaply
MAX_KEYS = 4              # batch shapes kept (a full batch and a last, smaller one; more are dropped)
ALIGN = 64                # bytes: a cache line, one AVX-512 vector

_local = threading.local()


class Arena:
    def __init__(self):
        self._passes = {}     # key -> every buffer of that key, in the order they were made
        self._all = None      # the current pass's
        self._free = None     # its free buffers, taken from the end

    def begin(self, key):
        if key not in self._passes and len(self._passes) >= MAX_KEYS:
            self._passes.clear()
        self._all = self._passes.setdefault(key, [])
        self._free = self._all[::-1]

    def take(self, shape, dtype):
        for k in range(len(self._free) - 1, -1, -1):
            a = self._free[k]
            if a.shape == shape and a.dtype == dtype:
                del self._free[k]
                return a
        a = aligned_empty(shape, dtype)
        self._all.append(a)
        return a

    def release(self, a):
        """Hand back `a` (an array this pass took, a view of one or the memory under one; anything else is
        ignored): no one reads it any more."""
        if self._all is None:
            return
        owner = _owner(a)
        for b in self._all:
            if _owner(b) is owner:
                if not any(b is f for f in self._free):
                    self._free.append(b)
                return

    def nbytes(self):
        """Bytes held in all the buffers."""
        return sum(a.nbytes for arrays in self._passes.values() for a in arrays)

    def clear(self):
        self._passes.clear()
        self._all = self._free = None


@contextlib.contextmanager
def using(arena):
    """Within the `with`, `empty` in this thread takes from `arena` (None: from malloc); the previous arena after.
    `arena.begin(key)` starts a pass."""
    previous = getattr(_local, "arena", None)
    _local.arena = arena
    try:
        yield
    finally:
        _local.arena = previous


def _owner(a):
    """The object that owns the memory under array `a` (NumPy collapses chains of views to it)."""
    return a if a.base is None else a.base


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) starting on an ALIGN-byte boundary: a view into a byte buffer of its own."""
    dtype = np.dtype(dtype)
    n = dtype.itemsize * math.prod(shape)
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def empty(shape, dtype):
    """np.empty(shape, dtype), or a buffer of the arena in use, for arrays of MIN_BYTES and more 64-byte aligned
    (aligned_empty)."""
    arena = getattr(_local, "arena", None)
    shape = tuple(int(s) for s in shape) if not isinstance(shape, int) else (int(shape),)
    dtype = np.dtype(dtype)
    if dtype.itemsize * math.prod(shape) < MIN_BYTES:
        return np.empty(shape, dtype)
    if arena is None or arena._all is None:
        return aligned_empty(shape, dtype)
    return arena.take(shape, dtype)


def release(a):
    """Hand `a` back to the arena in use, if it took it there: its last reader is done with it."""
    arena = getattr(_local, "arena", None)
    if arena is not None and a is not None:
        arena.release(a)
