"""Sizes: element counts past 2^31 (and past 2^63) are handled or refused with a clear error, never wrapped.

The refusal paths are checked without allocating: inputs are zero-stride views (np.broadcast_to) of huge logical
shapes, whose outputs or contiguous copies would need more bytes than the x86-64 address space (>= 2^48), so that
even with memory overcommit no allocation of that size can succeed and be written to. Element counts past
_args.MAX_ELEMENTS are refused by check_size before any allocation is even attempted (tracemalloc sees NumPy's
requests); below that, some ops leave the refusal to NumPy's allocator (MemoryError).

Hyper-parameters are Python ints of any size while the kernels compute in Py_ssize_t: strides, paddings, dilations
and kernel sizes near 2^63 on tiny images must give the right answer or a ValueError, never a wrapped product (a
wrong answer or a crash, which runs in a subprocess here).

CONVENGINE_BIG_TESTS=1 also runs pooling on a real float32 image of more than 2^31 elements (about 9 GB of RAM).
"""
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import convengine
from convengine import _args
from convengine import functional as F

f32 = np.float32
BIG = 1 << 48  # bytes: past the 47-bit user address space of x86-64, so no allocation of it can succeed


def huge(shape, dtype=f32, value=1.0):
    """A read-only zero-stride view of `shape`: any logical size, a few bytes of memory."""
    return np.broadcast_to(np.asarray(value, dtype=dtype), shape)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def refused(call, exceptions, attempt=True):
    """Run call(), expecting one of `exceptions`, and return the exception. The resident memory must not grow on
    the way. With attempt=False not even an attempt to allocate more than 64 MiB may happen: NumPy reports every
    buffer it asks for to tracemalloc, granted or not, so the peak tells whether the refusal came first."""
    before = rss_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(exceptions) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rss_bytes() - before < 64 << 20, "the resident memory grew on the way to the refusal"
    if not attempt:
        assert peak < 64 << 20, f"an allocation of {peak} bytes was attempted before the refusal"
    return info.value


def test_max_elements_is_below_what_int64_indexing_needs():
    """MAX_ELEMENTS leaves room for 8-byte elements and index arithmetic (i*stride + offset) within int64."""
    assert 0 < _args.MAX_ELEMENTS * 16 <= np.iinfo(np.intp).max
    with pytest.raises(ValueError, match="out"):
        _args.check_size((_args.MAX_ELEMENTS + 1,), "out")
    _args.check_size((_args.MAX_ELEMENTS,), "out")


# Each case: an op whose output (or a needed copy) is far past 2^31 elements, built from zero-stride views.
# 'index': refused by check_size (the element count itself is past what the kernels index), the others by the
# allocator (more bytes than the address space); either way before any allocation of that size.
REFUSALS = [
    ("conv2d-output-past-max-elements", "index",
     lambda: F.conv2d(huge((2 ** 20, 1, 2 ** 10, 2 ** 10)), huge((2 ** 20, 1, 1, 1)))),
    ("conv2d-output-past-2^63", "index",
     lambda: F.conv2d(huge((2 ** 30, 1, 2 ** 15, 2 ** 15)), huge((2 ** 30, 1, 1, 1)))),
    ("conv2d-padding-past-2^63", "index", lambda: F.conv2d(huge((1, 1, 1, 1)), huge((1, 1, 1, 1)), padding=2 ** 62)),
    ("conv2d-output-2^46", "alloc", lambda: F.conv2d(huge((2 ** 22, 1, 2 ** 12, 2 ** 12)), huge((1, 1, 2, 2)))),
    ("conv2d-output-2^49", "alloc",
     lambda: F.conv2d(huge((1, 1, 2 ** 2, 2 ** 2)), huge((2 ** 44, 1, 1, 1)), padding=(2 ** 1, 0))),
    ("conv2d_backward-past-max-elements", "index",
     lambda: F.conv2d_backward(huge((2 ** 30, 1, 2 ** 15, 2 ** 15)), huge((2 ** 30, 1, 2 ** 15, 2 ** 15)),
                               huge((1, 1, 1, 1)))),
    ("conv2d_backward-grad_out-copy", "alloc",
     lambda: F.conv2d_backward(huge((2 ** 22, 1, 2 ** 12, 2 ** 12)), huge((2 ** 22, 1, 2 ** 12, 2 ** 12)),
                               huge((1, 1, 1, 1)))),
    ("max_pool2d-past-max-elements", "index", lambda: F.max_pool2d(huge((2 ** 20, 2 ** 20, 2 ** 10, 2 ** 10)), 1)),
    ("max_pool2d-output-2^46", "alloc", lambda: F.max_pool2d(huge((2 ** 23, 2 ** 23, 2 ** 4, 2 ** 4)), 16)),
    ("avg_pool2d-past-max-elements", "index",
     lambda: F.avg_pool2d(huge((2 ** 20, 2 ** 20, 2 ** 10, 2 ** 10)), 1, count_include_pad=False)),
    ("max_pool2d_backward-input_shape-past-max-elements", "index",
     lambda: F.max_pool2d_backward(huge((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.int64), (1, 1, 2 ** 31, 2 ** 31))),
    ("max_pool2d_backward-input_shape-2^48", "alloc",
     lambda: F.max_pool2d_backward(huge((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.int64), (1, 1, 2 ** 24, 2 ** 24))),
    ("max_pool2d_backward-many-planes", "alloc",
     lambda: F.max_pool2d_backward(huge((2 ** 24, 2 ** 24, 1, 1)), huge((2 ** 24, 2 ** 24, 1, 1), np.int64, 0),
                                   (2 ** 24, 2 ** 24, 1, 1))),
    ("avg_pool2d_backward-input_shape-past-2^63", "any",
     lambda: F.avg_pool2d_backward(huge((1, 1, 1, 1)), (1, 1, 2 ** 31, 2 ** 31), 2 ** 31)),
    ("avg_pool2d_backward-input_shape-2^48", "alloc",
     lambda: F.avg_pool2d_backward(huge((1, 1, 1, 1)), (1, 1, 2 ** 24, 2 ** 24), 2 ** 24)),
    ("relu-2^46", "alloc", lambda: F.relu(huge((2 ** 46,)))),
    ("relu_backward-2^46", "alloc", lambda: F.relu_backward(huge((2 ** 46,)), huge((2 ** 46,)))),
    ("linear-output-2^50", "alloc", lambda: F.linear(huge((2 ** 40, 2 ** 10)), huge((2 ** 10, 2 ** 10)))),
    ("linear-output-past-2^63", "any", lambda: F.linear(huge((2 ** 40, 1)), huge((2 ** 30, 1)))),
    ("linear_backward-grad_x-2^50", "alloc",
     lambda: F.linear_backward(huge((2 ** 40, 4)), huge((2 ** 40, 2 ** 10)), huge((4, 2 ** 10)))),
]


@pytest.mark.parametrize("kind,call", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_huge_shapes_are_refused_before_allocating(kind, call):
    error = refused(call, ValueError if kind == "index" else (ValueError, MemoryError), attempt=kind != "index")
    if kind == "index":
        assert "more than this build can index" in str(error)
    # The process is fine afterwards.
    np.testing.assert_array_equal(F.relu(np.array([-1.0, 2.0], f32)), [0.0, 2.0])


def test_refusal_names_the_shape():
    error = refused(lambda: F.conv2d(huge((2 ** 20, 1, 2 ** 10, 2 ** 10)), huge((2 ** 20, 1, 1, 1))), ValueError,
                    attempt=False)
    assert "conv2d output" in str(error) and str((2 ** 20, 2 ** 20, 2 ** 10, 2 ** 10)) in str(error)


def test_zero_stride_inputs_past_2_31_are_handled():
    """A logical input past 2^31 elements that needs no copy: linear reads x through its strides."""
    if "-fsanitize" in convengine.build_info()["cflags"]:
        pytest.skip("2^32 multiply-adds take a minute in the sanitizer build")
    row = np.arange(1, 257, dtype=f32) / 256
    n = 2 ** 23 + 8
    x = np.broadcast_to(row, (n, 256))  # 2^31 + 2048 elements, 1 KiB of memory
    w = np.ones((2, 256), f32)
    w[1] = -0.5
    y = F.linear(x, w)
    assert y.shape == (n, 2)
    want = np.array([row.sum(dtype=np.float64), -0.5 * row.sum(dtype=np.float64)])
    assert np.all(y == y[0]), "rows of identical inputs differ"
    np.testing.assert_allclose(y[-1], want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameters near 2^63 on tiny images: the right answer or a ValueError, never a wrapped product
# ---------------------------------------------------------------------------------------------------------------

def run_isolated(code, timeout=120):
    """Run `code` in a fresh interpreter that imports this very convengine; (exit code, output)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(convengine.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    prelude = "import numpy as np, convengine\nfrom convengine import functional as F\n"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def answer_or_value_error(expr, expected):
    """In a subprocess: `expr` evaluates to an array equal to `expected`, or raises ValueError."""
    rc, out = run_isolated(f"""
        try:
            got = {expr}
        except ValueError as e:
            print("REFUSED", e)
        except Exception as e:
            print("RAISED", type(e).__name__, e)
        else:
            got = [np.asarray(a).ravel().tolist() for a in (got if isinstance(got, tuple) else (got,))]
            print("RESULT", got)
    """)
    assert rc == 0, f"{expr}: the process died with exit code {rc}:\n{out[-3000:]}"
    line = out.strip().splitlines()[-1]
    assert not line.startswith("RAISED"), f"{expr}: {line} (neither the answer nor a ValueError)"
    if line.startswith("RESULT"):
        got = eval(line[len("RESULT"):])  # a list of lists of floats, printed above
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=0, err_msg=f"{expr}: a wrapped product?")
    else:
        assert line.startswith("REFUSED"), out[-3000:]


# A 1x1 image of 2 under a 3x3 kernel of ones dilated by d with padding d: only the centre tap meets the pixel, so
# the output is 2 for any d; the products (kernel - 1) * d pass 2^63 for d >= 2^62.
X1 = "np.full((1, 1, 1, 1), 2.0, np.float32)"
W3 = "np.ones((1, 1, 3, 3), np.float32)"
GO1 = "np.ones((1, 1, 1, 1), np.float32)"


@pytest.mark.parametrize("log2", [40, 60, 61, 62])
def test_conv2d_huge_dilation_and_padding(log2):
    d = 2 ** log2
    answer_or_value_error(f"F.conv2d({X1}, {W3}, dilation={d}, padding={d})", [[2.0]])
    answer_or_value_error(f"F.conv2d({X1}, {W3}, dilation=(1, {d}), padding=(1, {d}))", [[2.0]])
    grad_w = [0.0] * 4 + [2.0] + [0.0] * 4
    answer_or_value_error(f"F.conv2d_backward({GO1}, {X1}, {W3}, dilation={d}, padding={d})",
                          [[1.0], grad_w, [1.0]])


@pytest.mark.parametrize("log2", [31, 32, 62, 63])
def test_huge_strides(log2):
    """A stride larger than the image: one output pixel, the first window."""
    s = 2 ** log2
    answer_or_value_error(f"F.conv2d({X1}, np.ones((1, 1, 1, 1), np.float32), stride={s})", [[2.0]])
    answer_or_value_error(f"F.max_pool2d({X1}, 1, stride={s})", [[2.0]])
    answer_or_value_error(f"F.avg_pool2d({X1}, 1, stride={s})", [[2.0]])
    answer_or_value_error(f"F.avg_pool2d_backward({GO1}, (1, 1, 1, 1), 1, stride={s})", [[1.0]])


@pytest.mark.parametrize("log2", [16, 31, 32, 62])
def test_avg_pool2d_huge_window_divisor(log2):
    """A window of 2^k x 2^k over a padded 1x1 image: with count_include_pad the divisor is 2^(2k), past 2^63 for
    k >= 32. The mean is 3 / 2^(2k), not 0 and not garbage; without count_include_pad it is 3."""
    k, p = 2 ** log2, 2 ** (log2 - 1)
    x = "np.full((1, 1, 1, 1), 3.0, np.float64)"
    answer_or_value_error(f"F.avg_pool2d({x}, {k}, padding={p})", [[3.0 / float(k) ** 2]])
    answer_or_value_error(f"F.avg_pool2d({x}, {k}, padding={p}, count_include_pad=False)", [[3.0]])
    answer_or_value_error(f"F.avg_pool2d_backward({x}, (1, 1, 1, 1), {k}, padding={p})", [[3.0 / float(k) ** 2]])
    answer_or_value_error(f"F.max_pool2d({x}, {k}, padding={p})", [[3.0]])


# ---------------------------------------------------------------------------------------------------------------
# Thread counts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [10 ** 5, 2 ** 31], ids=["1e5", "2^31"])
def test_thread_counts_beyond_the_system(n):
    """set_num_threads(n) for an n the system cannot run: refused with ValueError, or every op still works (with
    fewer threads). Never a crash, never an OverflowError at each later call."""
    rc, out = run_isolated(f"""
        try:
            convengine.set_num_threads({n})
        except ValueError as e:
            print("REFUSED", e)
            raise SystemExit(0)
        x = np.ones((4, 3, 8, 8), np.float32)
        y = F.conv2d(x, np.ones((2, 3, 3, 3), np.float32))
        assert y.shape == (4, 2, 6, 6) and np.all(y == 27), y
        assert np.all(F.relu(-x) == 0)
        assert F.max_pool2d(x, 2).shape == (4, 3, 4, 4)
        print("RAN")
    """)
    assert rc == 0, f"set_num_threads({n}) then an op: exit code {rc}\n{out[-3000:]}"


# ---------------------------------------------------------------------------------------------------------------
# Real arrays past 2^31 elements (opt-in: about 9 GB)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("CONVENGINE_BIG_TESTS") != "1",
                    reason="allocates a 9 GB image; set CONVENGINE_BIG_TESTS=1 to run")
def test_pooling_an_image_past_2_31_elements():
    H, W = 2 ** 16, 2 ** 15 + 64  # 2^31 + 2^22 float32 elements in one plane
    x = np.zeros((1, 1, H, W), f32)
    # Marks past element 2^31 of the plane, where a 32-bit index would have wrapped.
    # (Rows from 65409 on start past 2^31; windows of 1024 cover columns below 32768, in distinct windows here.)
    marks = [(H - 1, 2 ** 15 - 1, 5.0), (H - 100, 100, 7.0), (H - 116, 20000, 3.0)]
    for h, w, v in marks:
        assert h * W + w > 2 ** 31
        x[0, 0, h, w] = v
    k = 2 ** 10
    y, idx = F.max_pool2d(x, k, return_indices=True)
    for h, w, v in marks:
        assert y[0, 0, h // k, w // k] == v
        assert idx[0, 0, h // k, w // k] == h * W + w
    a = F.avg_pool2d(x, k)
    for h, w, v in marks:
        np.testing.assert_allclose(a[0, 0, h // k, w // k], v / k ** 2, rtol=1e-6)
    assert F.avg_pool2d(x, k).sum() == pytest.approx(sum(v for *_, v in marks) / k ** 2, rel=1e-5)
