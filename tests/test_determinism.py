"""The engine's results are bitwise identical whatever the thread count, forward and backward (DESIGN.md).

Shapes are big enough that 2 and 3 threads really split the work (over the batch, the channels and the output
rows), and odd enough (3 threads over 8 images, 13 channels) that the chunks are uneven. Calls below a size threshold
normally run on one thread (functional.py); every test here runs with that threshold off
(`_threads.every_call_threaded`), so each thread count really runs on that many threads.
"""
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import convengine
from convengine import _threads
from convengine import functional as F
from convengine._threads import every_call_threaded

from conftest import DTYPE_IDS, DTYPES, assert_bitwise_equal, randn

THREADS = [1, 2, 3]


@pytest.fixture(autouse=True)
def restore_threads():
    before = convengine.get_num_threads()
    with every_call_threaded():
        yield
    convengine.set_num_threads(before)


def results_per_thread_count(compute):
    """compute() under each thread count; the arrays it returns, flattened into one list, per count."""
    results = []
    for n in THREADS:
        convengine.set_num_threads(n)
        assert convengine.get_num_threads() == n
        out = compute()
        results.append([a for a in (out if isinstance(out, tuple) else (out,)) if a is not None])
    return results


def assert_same_for_all_thread_counts(compute, what):
    results = results_per_thread_count(compute)
    for n, arrays in zip(THREADS[1:], results[1:]):
        assert len(arrays) == len(results[0])
        for k, (a, b) in enumerate(zip(arrays, results[0])):
            assert_bitwise_equal(a, b, f"{what}, output {k}: {n} threads vs 1")


CONV_CASES = [
    # (x shape, weight shape, params)
    ((8, 16, 20, 20), (32, 16, 3, 3), dict(padding=1)),
    ((8, 16, 15, 15), (16, 4, 3, 3), dict(padding=1, groups=4)),
    ((6, 13, 21, 19), (13, 1, 3, 3), dict(padding=1, groups=13)),
    ((8, 12, 23, 22), (24, 12, 3, 3), dict(stride=2, padding="same", dilation=2)),
    ((16, 1, 28, 28), (32, 1, 5, 5), dict(padding=2)),
    ((5, 3, 32, 32), (16, 3, 7, 7), dict(stride=3, padding=3)),
    ((4, 64, 9, 9), (96, 64, 1, 1), dict()),
    # float32: a strided RGB stem, grad_weight by the first-layer kernel over slices of the images
    ((40, 3, 32, 32), (32, 3, 3, 3), dict(stride=2, padding=1)),
    # float32: dY's channels in the lanes, grad_input over images, grad_weight over 2 slices of 24 images
    ((48, 6, 14, 14), (16, 6, 5, 5), dict()),
    # float32: the pixel path skipping padding taps (1,536 output pixels of 8x8 planes), forward and grad_input
    ((24, 32, 8, 8), (48, 32, 3, 3), dict(padding=1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,w_shape,params", CONV_CASES, ids=[f"{x}-{w}-{p}" for x, w, p in CONV_CASES])
def test_conv2d_thread_count_invariant(rng, x_shape, w_shape, params, dtype):
    x = randn(rng, x_shape, dtype)
    w = randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[0], dtype)
    y = F.conv2d(x, w, b, **params)
    go = randn(rng, y.shape, dtype)
    assert_same_for_all_thread_counts(lambda: F.conv2d(x, w, b, **params), "conv2d")
    assert_same_for_all_thread_counts(lambda: F.conv2d_backward(go, x, w, **params), "conv2d_backward")
    assert_same_for_all_thread_counts(lambda: F.conv2d_backward(go, x, w, need_input_grad=False, **params),
                                      "conv2d_backward without grad_x")


@st.composite
def conv_geometries(draw):
    """(x shape, weight shape, params, dtype) of a conv the engine takes: 1-24 images of 1-40 channels of up to
    34 x 34, kernels of 1-5 with strides 1-3, dilation 1-2, padding up to the kernel's half, groups (depthwise
    among them): every path and its thread split (images, rows, channel blocks) on uneven counts."""
    groups = draw(st.sampled_from([1, 1, 1, 2, 3, 4]))
    c = groups * draw(st.integers(1, 40 // groups))
    depthwise = groups > 1 and draw(st.booleans())
    if depthwise:
        groups = c
    k = c if depthwise else groups * draw(st.integers(1, 48 // groups))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride, dilation = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.integers(0, min(kh, kw) // 2 * dilation))
    h = draw(st.integers(max(1, dilation * (kh - 1) + 1 - 2 * padding), 34))
    w = draw(st.integers(max(1, dilation * (kw - 1) + 1 - 2 * padding), 34))
    x_shape = (draw(st.integers(1, 24)), c, h, w)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x_shape, (k, c // groups, kh, kw), params, draw(st.sampled_from(DTYPES))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=conv_geometries())
def test_drawn_convs_give_the_same_bits_on_any_thread_count(case):
    """conv2d forward and backward of drawn geometries on 2 and 3 threads against 1 (the cases above are fixed;
    each path's blocking across threads — balanced rows, channel panels, image slices — has edges only drawn
    shapes reach)."""
    x_shape, w_shape, params, dtype = case
    note(f"x {x_shape}, w {w_shape}, {params}, {np.dtype(dtype).name}")
    rng = np.random.default_rng(31)
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    go = randn(rng, F.conv2d(x, w, b, **params).shape, dtype)
    assert_same_for_all_thread_counts(lambda: (F.conv2d(x, w, b, **params),)
                                      + tuple(F.conv2d_backward(go, x, w, **params)), "conv2d forward, backward")


# The depthwise whole-plane kernels (float32, AVX-512: depthwise.h) in every direction, 13 channels over 3
# threads; grad_weight is a channel's sum over all images on one thread, in the kernel's own order.
DW_SMALL_CASES = [
    ((8, 13, 16, 16), 1, "depthwise 3x3s1 w16"),
    ((8, 13, 16, 16), 2, "depthwise 3x3s2 w16"),
    ((8, 13, 8, 8), 1, "depthwise 3x3s1 w8"),
    ((6, 13, 9, 8), 1, "depthwise 3x3s1 w8"),
    ((6, 13, 11, 16), 2, "depthwise 3x3s2 w16"),
]


@pytest.mark.parametrize("x_shape,stride,kernel", DW_SMALL_CASES, ids=[f"{x}-s{s}" for x, s, _ in DW_SMALL_CASES])
def test_depthwise_whole_plane_kernels_thread_count_invariant(rng, x_shape, stride, kernel):
    from convengine import _args
    from convengine._kernels import engine as _engine
    C = x_shape[1]
    x, w, b = (randn(rng, s, np.float32) for s in (x_shape, (C, 1, 3, 3), C))
    params = dict(stride=stride, padding=1, groups=C)
    geom = _args.conv2d_args(x, w, None, stride, 1, 1, C)
    paths = _engine.conv2d_paths(x.shape, w.shape, F._conv_params(geom), 4)
    if convengine.build_info()["simd"] == "avx512":
        assert paths["forward"] == paths["grad_weight"] == kernel
    go = randn(rng, geom.out_shape, np.float32)
    assert_same_for_all_thread_counts(lambda: F.conv2d(x, w, b, **params), "conv2d")
    assert_same_for_all_thread_counts(lambda: F.conv2d_backward(go, x, w, **params), "conv2d_backward")


# Shapes where each pinned strategy splits the work several ways: the pixel path's tasks of several small images
# and its grad_weight chunks, the direct path's row blocks, im2col's column blocks.
PATH_CASES = [
    ((20, 32, 4, 4), (64, 32, 3, 3), dict(padding=1)),
    ((5, 40, 13, 11), (48, 40, 3, 3), dict(stride=2, padding=1)),
    ((3, 16, 40, 36), (32, 16, 3, 3), dict(padding=1)),
    ((3, 3, 40, 32), (16, 3, 3, 3), dict(padding=1)),        # smallc: rows per task depend on the thread count
    ((3, 3, 32, 32), (32, 3, 3, 3), dict(stride=2, padding=1)),  # smallc, 16-pixel rows
    ((1, 32, 8, 8), (72, 32, 1, 1), dict()),                  # pointwise: batch 1 splits channels by thread count
    ((2, 16, 30, 30), (24, 16, 1, 1), dict()),                # pointwise: several column blocks per plane
    ((9, 36, 16, 17), (22, 36, 1, 1), dict()),                # pointwise grad_weight: chunks, partial tiles
    ((1, 16, 20, 20), (48, 16, 3, 3), dict(padding=1)),       # batch 1: direct and pixel paths split channels
    ((1, 32, 8, 8), (64, 32, 3, 3), dict(padding=1)),
    ((6, 24, 10, 32), (40, 24, 3, 3), dict(padding=1)),     # direct, rows of whole vectors: blocks across images
    ((1, 32, 16, 16), (64, 32, 3, 3), dict(padding=1)),     # the same at batch 1: channels split
    ((9, 16, 8, 8), (40, 16, 3, 3), dict(padding=1)),       # direct, shifted rows: two blocks, one mid-image
    ((2, 64, 8, 8), (96, 64, 3, 3), dict(padding=1)),       # the same in one block: channels split
    ((7, 6, 14, 14), (16, 6, 5, 5), dict()),                # grad_input with dY's channels in the lanes: images
    ((2, 200, 4, 4), (260, 200, 3, 3), dict(padding=1)),    # pixel grad_weight: one chunk, channel blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,w_shape,params", PATH_CASES, ids=[f"{x}-{w}-{p}" for x, w, p in PATH_CASES])
def test_conv2d_every_path_thread_count_invariant(rng, conv_path, x_shape, w_shape, params, dtype):
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    go = randn(rng, F.conv2d(x, w, b, **params).shape, dtype)
    assert_same_for_all_thread_counts(lambda: F.conv2d(x, w, b, **params), f"conv2d ({conv_path})")
    assert_same_for_all_thread_counts(lambda: F.conv2d_backward(go, x, w, **params), f"conv2d_backward ({conv_path})")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(32, 13, 16, 16), (7, 64, 12, 13)], ids=str)  # over the serial threshold
def test_batch_norm2d_thread_count_invariant(rng, shape, dtype):
    x, go = randn(rng, shape, dtype), randn(rng, shape, dtype)
    w, b = randn(rng, shape[1], dtype), randn(rng, shape[1], dtype)
    _, mean, var = F.batch_norm2d_training(x, w, b)
    assert_same_for_all_thread_counts(lambda: F.batch_norm2d_training(x, w, b), "batch_norm2d_training")
    assert_same_for_all_thread_counts(lambda: F.batch_norm2d(x, w, b, mean, var), "batch_norm2d")
    assert_same_for_all_thread_counts(lambda: F.batch_norm2d_backward(go, x, w, mean, var), "batch_norm2d_backward")


POOL_CASES = [
    ((8, 16, 20, 20), dict(kernel_size=2)),
    ((6, 13, 21, 19), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((8, 16, 20, 20), dict(kernel_size=3, stride=1, padding=1)),
    # 2x2 windows on 7-window rows (pool.h on AVX-512: two rows a vector), blocks of rows that start inside planes
    ((16, 24, 14, 15), dict(kernel_size=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,params", POOL_CASES, ids=[f"{x}-{p}" for x, p in POOL_CASES])
def test_pools_thread_count_invariant(rng, x_shape, params, dtype):
    x = randn(rng, x_shape, dtype)
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    go = randn(rng, y.shape, dtype)
    assert_same_for_all_thread_counts(lambda: F.max_pool2d(x, return_indices=True, **params), "max_pool2d")
    # Overlapping windows (stride < kernel) send several gradients to one pixel: the order they add up in counts.
    assert_same_for_all_thread_counts(lambda: F.max_pool2d_backward(go, idx, x.shape), "max_pool2d_backward")
    for cip in (True, False):
        assert_same_for_all_thread_counts(lambda: F.avg_pool2d(x, count_include_pad=cip, **params), "avg_pool2d")
        assert_same_for_all_thread_counts(
            lambda: F.avg_pool2d_backward(go, x.shape, count_include_pad=cip, **params), "avg_pool2d_backward")
    assert_same_for_all_thread_counts(lambda: F.global_avg_pool2d(x), "global_avg_pool2d")
    assert_same_for_all_thread_counts(lambda: F._global_avg_pool2d_backward(go[:, :, 0, 0], x.shape),
                                      "global_avg_pool2d backward")


@st.composite
def planes(draw):
    """(x shape, pooling params, dtype): 1-24 images of 1-40 planes up to 34 x 34, a pooling that fits them."""
    kernel = draw(st.integers(1, 4))
    stride, padding = draw(st.integers(1, 4)), draw(st.integers(0, kernel // 2))
    x_shape = (draw(st.integers(1, 24)), draw(st.integers(1, 40)),
               draw(st.integers(max(1, kernel - 2 * padding), 34)), draw(st.integers(max(1, kernel - 2 * padding), 34)))
    return x_shape, dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=draw(st.booleans())), \
        draw(st.sampled_from(DTYPES))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=planes())
def test_drawn_pools_and_batch_norms_give_the_same_bits_on_any_thread_count(case):
    """Poolings (max with its backward's scatter, average both ways) and batch norm (training statistics, forward,
    backward, the fused ReLU and 2x2 pooling where the planes take them) of drawn shapes on 2 and 3 threads
    against 1."""
    x_shape, params, dtype = case
    note(f"x {x_shape}, {params}, {np.dtype(dtype).name}")
    rng = np.random.default_rng(32)
    x = randn(rng, x_shape, dtype)
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    go = randn(rng, y.shape, dtype)
    assert_same_for_all_thread_counts(lambda: F.max_pool2d(x, return_indices=True, **params)
                                      + (F.max_pool2d_backward(go, idx, x.shape),
                                         F.avg_pool2d(x, **params), F.avg_pool2d_backward(go, x.shape, **params)),
                                      "pools")
    n, c, h, w_ = x_shape
    if n * h * w_ == 1:                       # batch statistics need two values per channel
        return
    w, b, gx = randn(rng, c, dtype), randn(rng, c, dtype), randn(rng, x_shape, dtype)
    y, mean, var = F.batch_norm2d_training(x, w, b)
    relu_out = np.maximum(y, 0)
    assert_same_for_all_thread_counts(lambda: F.batch_norm2d_training(x, w, b)
                                      + tuple(F.batch_norm2d_backward(gx, x, w, mean, var))
                                      + tuple(F._batch_norm2d_relu_backward(gx, x, relu_out, w, mean, var)),
                                      "batch norm")
    if h % 2 == 0 and w_ >= 2 and h * w_ >= 16:                 # fusion.pools_fused
        pooled, indices, mean, var = F._batch_norm2d_relu_max_pool_training(x, w, b)
        gp = randn(rng, pooled.shape, dtype)
        assert_same_for_all_thread_counts(
            lambda: F._batch_norm2d_relu_max_pool_training(x, w, b)
            + tuple(F._batch_norm2d_relu_max_pool_backward(gp, indices, x, w, b, mean, var)),
            "batch norm + ReLU + max pool")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_linear_thread_count_invariant(rng, dtype):
    x = randn(rng, (8, 16, 20, 20), dtype)
    go = randn(rng, x.shape, dtype)
    assert_same_for_all_thread_counts(lambda: F.relu(x), "relu")
    assert_same_for_all_thread_counts(lambda: F.relu_backward(go, x), "relu_backward")
    a = randn(rng, (64, 300), dtype)
    w = randn(rng, (10, 300), dtype)
    b = randn(rng, 10, dtype)
    g = randn(rng, (64, 10), dtype)
    assert_same_for_all_thread_counts(lambda: F.linear(a, w, b), "linear")
    assert_same_for_all_thread_counts(lambda: F.linear_backward(g, a, w), "linear_backward")


@pytest.mark.parametrize("m,k,n", [(120, 64, 400), (64, 400, 120), (5, 700, 1000), (64, 128, 10), (200, 30, 50)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matmul_blocks_never_change_bits(rng, dtype, m, k, n):
    """The dense layers' GEMM cuts C into blocks by thread count (strided_blocks: 120 x 400 was 96 + 24 rows at one
    thread, 64 + 56 at two, more blocks where there are fewer than threads); every element still reduces over all
    of k in one order: the same bits on 1-3 threads, the product within rounding of float64's. A transposed view
    as the left operand (a layer's weight gradient reads grad_out.T)."""
    from convengine._kernels import engine
    a, b = randn(rng, (k, m), dtype).T, randn(rng, (k, n), dtype)
    want = a.astype(np.float64) @ b.astype(np.float64)

    def product():
        out = np.empty((m, n), dtype)
        engine.matmul(a, b, out, convengine.get_num_threads())
        return out
    assert_same_for_all_thread_counts(product, f"matmul {m}x{k}x{n}")
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for n_threads in THREADS:
        convengine.set_num_threads(n_threads)
        np.testing.assert_allclose(product(), want, rtol=tol, atol=tol * np.sqrt(k))


def test_thread_count_is_restored_and_validated():
    before = convengine.get_num_threads()
    with pytest.raises(ValueError, match="n"):
        convengine.set_num_threads(0)
    assert convengine.get_num_threads() == before


def test_the_threshold_hook_runs_small_calls_on_every_thread(monkeypatch):
    """Outside every_call_threaded a call below the threshold runs on one thread; inside, on get_num_threads()."""
    seen = []
    real = F._engine.relu_forward
    monkeypatch.setattr(F, "_engine", types.SimpleNamespace(
        relu_forward=lambda x, out, n: (seen.append(n), real(x, out, n))))
    monkeypatch.setattr(_threads, "_serial_small_calls", True)  # as outside this file's fixture
    convengine.set_num_threads(3)
    x = np.ones((1, 1, 4, 4))
    F.relu(x)
    with every_call_threaded():
        F.relu(x)
    F.relu(x)
    assert seen == [1, 3, 1]
