"""Buffers reused from one training step to the next, for the arrays the ops allocate.

A training step allocates the same big arrays in the same order every time: each layer's output in forward, each
layer's input gradient and weight-gradient temporaries in backward. Fresh, they cost more than the arithmetic that
fills them: an 8 MB array freed and allocated again is mapped afresh by malloc, and its first writes page-fault
(a batch norm + ReLU backward of 64x32x32x32 took 7.6 ms with fresh arrays, 3.3 ms in the same memory).

An `Arena` holds such buffers by position: while one is in use (`using`, per thread), the ops of
`convengine.functional` take their outputs of at least MIN_BYTES from it (`empty`), the k-th such request of a pass
getting the buffer of the k-th request of the previous pass of the same key, when its shape and dtype are the same.
Sequential uses one arena for forward and one for backward, keyed by the batch's shape, and only for arrays that
nobody outside the step can hold (see Sequential.forward and backward): an array from an arena is overwritten by
the next pass of the same key.
"""
import contextlib
import threading

import numpy as np

MIN_BYTES = 1 << 16       # smaller arrays come from malloc's own free lists cheaply
MAX_KEYS = 4              # batch shapes kept (a full batch and a last, smaller one; more are dropped)

_local = threading.local()


class Arena:
    def __init__(self):
        self._passes = {}     # key -> list of arrays, in the order the pass asked for them
        self._list = None
        self._next = 0

    def begin(self, key):
        if key not in self._passes and len(self._passes) >= MAX_KEYS:
            self._passes.clear()
        self._list = self._passes.setdefault(key, [])
        self._next = 0

    def take(self, shape, dtype):
        k = self._next
        self._next += 1
        if k < len(self._list):
            a = self._list[k]
            if a.shape == shape and a.dtype == dtype:
                return a
            a = self._list[k] = np.empty(shape, dtype)
            return a
        a = np.empty(shape, dtype)
        self._list.append(a)
        return a

    def nbytes(self):
        """Bytes held in all the buffers."""
        return sum(a.nbytes for arrays in self._passes.values() for a in arrays)

    def clear(self):
        self._passes.clear()
        self._list = None


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


def empty(shape, dtype):
    """np.empty(shape, dtype), or a buffer of the arena in use for arrays of MIN_BYTES and more."""
    arena = getattr(_local, "arena", None)
    shape = tuple(int(s) for s in shape) if not isinstance(shape, int) else (int(shape),)
    dtype = np.dtype(dtype)
    if arena is None or arena._list is None:
        return np.empty(shape, dtype)
    n = dtype.itemsize
    for s in shape:
        n *= s
    if n < MIN_BYTES:
        return np.empty(shape, dtype)
    return arena.take(shape, dtype)
