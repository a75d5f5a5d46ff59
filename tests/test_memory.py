"""Memory: after a warm-up, 10,000 calls of each op and 1,000 training steps grow the process by less than 1 MB.

A kernel that forgets to free a packing buffer, or a wrapper that keeps a reference to an array, leaks at least
hundreds of bytes per call: 10,000 calls make that megabytes. Two measures, each held under 1 MB:
- the resident set (/proc/self/statm) after gc.collect() and malloc_trim(0), so that memory freed but kept by the
  C allocator does not count: it sees what the kernels malloc and never free;
- the bytes traced by tracemalloc, to which Python and NumPy report every allocation: it sees leaked Python objects
  and arrays even where the allocator reuses memory that is already resident.
Each measure is itself checked to see a leak of 200 bytes per call. The long loops run the kernels on one OpenMP
thread: on a busy machine a team of two waits for its second thread at every call, and the code paths (a parallel
region with per-thread scratch) are the same; a shorter loop checks two threads, with the one-thread threshold for
small calls off (`_threads.every_call_threaded`).
"""
import ctypes
import ctypes.util
import gc
import os
import tracemalloc

import numpy as np
import pytest

import convengine
from convengine import functional as F
from convengine._threads import every_call_threaded

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")

CALLS = 10_000
STEPS = 1_000
LIMIT = 1 << 20  # bytes

_libc = None
if ctypes.util.find_library("c"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        _libc.malloc_trim
    except (OSError, AttributeError):
        _libc = None


def resident_bytes():
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def traced_bytes():
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def growth(step, n, warmup=500):
    """(resident, traced) bytes grown by n calls of step() after `warmup` calls."""
    for _ in range(warmup):
        step()
    before = resident_bytes()
    for _ in range(n):
        step()
    resident = resident_bytes() - before
    tracemalloc.start()
    try:
        for _ in range(warmup):
            step()
        before = traced_bytes()
        for _ in range(n):
            step()
        traced = traced_bytes() - before
    finally:
        tracemalloc.stop()
    return resident, traced


@pytest.fixture
def threads():
    """Set the engine's thread count for one test, then restore it."""
    before = convengine.get_num_threads()
    yield convengine.set_num_threads
    convengine.set_num_threads(before)


def test_the_traced_measure_sees_a_small_leak():
    kept = []
    _, traced = growth(lambda: kept.append(bytes(200)), CALLS)
    assert traced >= LIMIT, f"a leak of 200 bytes per call grew the traced memory by only {traced} bytes"


@pytest.mark.skipif(_libc is None, reason="needs the C library's malloc")
def test_the_resident_measure_sees_a_small_malloc_leak():
    """What a kernel that forgets free() does: malloc'd and written, never freed."""
    _libc.malloc.restype = ctypes.c_void_p

    def leak():
        ctypes.memset(_libc.malloc(200), 1, 200)

    # the warm-up leaks first into the free chunks that earlier tests left inside resident heap pages (which
    # malloc_trim cannot return): measured alone, the leak then grows the heap, as a kernel's would in a loop
    resident, _ = growth(leak, CALLS, warmup=CALLS)
    assert resident >= LIMIT, f"a malloc leak of 200 bytes per call grew the resident set by only {resident} bytes"


rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
b = rng.standard_normal(4).astype(np.float32)
go_conv = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
y_pool, idx = F.max_pool2d(x, 2, return_indices=True)
go_pool = rng.standard_normal(y_pool.shape).astype(np.float32)
a = rng.standard_normal((4, 20)).astype(np.float32)
lw = rng.standard_normal((5, 20)).astype(np.float32)
lb = rng.standard_normal(5).astype(np.float32)
go_lin = rng.standard_normal((4, 5)).astype(np.float32)
xd = x.astype(np.float64)[:, :, ::2]  # float64, non-contiguous: the copying paths

OPS = {
    "conv2d": lambda: F.conv2d(x, w, b, stride=2, padding=1),
    "conv2d-same-dilated": lambda: F.conv2d(x, w, padding="same", dilation=2),
    "conv2d-depthwise": lambda: F.conv2d(x, w[:3, :1], groups=3, padding=1),
    "conv2d_backward": lambda: F.conv2d_backward(go_conv, x, w, stride=2, padding=1),
    "conv2d-f64-strided": lambda: F.conv2d(xd, w.astype(np.float64), padding=1),
    "max_pool2d": lambda: F.max_pool2d(x, 2, return_indices=True),
    "max_pool2d_backward": lambda: F.max_pool2d_backward(go_pool, idx, x.shape),
    "avg_pool2d": lambda: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    "avg_pool2d_backward": lambda: F.avg_pool2d_backward(go_pool, x.shape, 2),
    "relu": lambda: F.relu(x),
    "relu_backward": lambda: F.relu_backward(x, x),
    "linear": lambda: F.linear(a, lw, lb),
    "linear_backward": lambda: F.linear_backward(go_lin, a, lw),
    "refused-call": lambda: _refused(),
}


def _refused():
    """The error path: a refused call must not leak either."""
    try:
        F.max_pool2d_backward(go_pool, np.full(idx.shape, 10 ** 6, np.int64), x.shape)
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


@pytest.mark.parametrize("op", list(OPS))
def test_ten_thousand_calls_do_not_grow_memory(op, threads):
    threads(1)
    resident, traced = growth(OPS[op], CALLS)
    assert resident < LIMIT, f"{CALLS} calls of {op} grew the resident set by {resident} bytes"
    assert traced < LIMIT, f"{CALLS} calls of {op} grew the traced memory by {traced} bytes"


@pytest.mark.parametrize("op", ["conv2d_backward", "max_pool2d", "linear_backward"])
def test_calls_on_two_threads_do_not_grow_memory(op, threads):
    threads(2)
    n = CALLS // 20
    with every_call_threaded():  # these small calls would otherwise run on one thread
        resident, traced = growth(OPS[op], n, warmup=100)
    assert resident < LIMIT, f"{n} calls of {op} on 2 threads grew the resident set by {resident} bytes"
    assert traced < LIMIT, f"{n} calls of {op} on 2 threads grew the traced memory by {traced} bytes"


def test_thousand_training_steps_do_not_grow_memory(threads):
    from convengine.layers import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
    from convengine.losses import CrossEntropyLoss
    from convengine.optim import Adam

    convengine.manual_seed(0)
    model = convengine.Sequential([Conv2d(1, 8, 3, padding=1), BatchNorm2d(8), ReLU(), MaxPool2d(2),
                                   Conv2d(8, 8, 3, padding=1), ReLU(), Flatten(), Dropout(0.2), Linear(128, 10)])
    trainer = convengine.Trainer(model, CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3))
    data = np.random.default_rng(1).standard_normal((32, 1, 8, 8)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 10, 32)
    steps_per_epoch = 4

    def train(steps):
        history = trainer.fit(data, labels, epochs=steps // steps_per_epoch, batch_size=8, seed=0, verbose=0)
        assert len(history) == steps // steps_per_epoch

    threads(1)
    train(200)
    before = resident_bytes()
    train(STEPS)
    resident = resident_bytes() - before
    tracemalloc.start()
    try:
        train(200)
        before = traced_bytes()
        train(STEPS)
        traced = traced_bytes() - before
    finally:
        tracemalloc.stop()
    # A History of 250 epochs is returned and dropped each time: nothing of it may stay.
    assert resident < LIMIT, f"{STEPS} training steps grew the resident set by {resident} bytes"
    assert traced < LIMIT, f"{STEPS} training steps grew the traced memory by {traced} bytes"
    assert all(np.all(np.isfinite(p.data)) for p in model.parameters())
