"""The compiled engine (`convengine.functional`) against the NumPy reference.

Grids walk the hyper-parameters (stride, padding, dilation, groups, bias, dtype, memory layout, odd and tiny sizes,
channel counts that do not fill a GEMM tile); hypothesis draws further shapes and parameters. Max pooling must
agree bit for bit, indices included. (Finite differences of every backward, both tiers: test_gradients.py.)
"""
import itertools
import re
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convengine
from convengine import _args
from convengine import functional as F
from convengine import reference as R
from convengine._kernels import engine as _engine
from convengine._threads import every_call_threaded

from conftest import CONV_PATHS, DTYPE_IDS, DTYPES, LAYOUTS, as_layout, assert_bitwise_equal, assert_close, randn


def check_conv2d(x, w, b, go=None, need_input_grad=True, **params):
    """Engine vs reference for conv2d forward and, with go, backward. Returns nothing; asserts."""
    label = f"x{x.shape} w{w.shape} bias={b is not None} {params}"
    assert_close(F.conv2d(x, w, b, **params), R.conv2d(x, w, b, **params), f"conv2d y, {label}")
    if go is None:
        return
    got = F.conv2d_backward(go, x, w, need_input_grad=need_input_grad, **params)
    want = R.conv2d_backward(go, x, w, need_input_grad=need_input_grad, **params)
    assert isinstance(got, tuple) and len(got) == 3
    if need_input_grad:
        assert_close(got[0], want[0], f"conv2d grad_x, {label}")
    else:
        assert got[0] is None
    assert_close(got[1], want[1], f"conv2d grad_weight, {label}")
    assert_close(got[2], want[2], f"conv2d grad_bias, {label}")


def check_max_pool2d(x, go_seed=0, **params):
    label = f"x{x.shape} {params}"
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    y_ref, idx_ref = R.max_pool2d(x, return_indices=True, **params)
    # Max pooling picks an element: nothing to round, so the engine must agree exactly, indices included.
    assert y.dtype == y_ref.dtype and idx.dtype == np.int64, label
    np.testing.assert_array_equal(y, y_ref, err_msg=f"max_pool2d y, {label}")
    np.testing.assert_array_equal(idx, idx_ref, err_msg=f"max_pool2d indices, {label}")
    np.testing.assert_array_equal(F.max_pool2d(x, **params), y_ref, err_msg=f"max_pool2d y w/o indices, {label}")
    go = randn(np.random.default_rng(go_seed), y.shape, x.dtype)
    assert_close(F.max_pool2d_backward(go, idx, x.shape), R.max_pool2d_backward(go, idx_ref, x.shape),
                 f"max_pool2d grad_x, {label}")


def check_avg_pool2d(x, go_seed=0, **params):
    label = f"x{x.shape} {params}"
    y = R.avg_pool2d(x, **params)
    assert_close(F.avg_pool2d(x, **params), y, f"avg_pool2d y, {label}")
    go = randn(np.random.default_rng(go_seed), y.shape, x.dtype)
    assert_close(F.avg_pool2d_backward(go, x.shape, **params), R.avg_pool2d_backward(go, x.shape, **params),
                 f"avg_pool2d grad_x, {label}")


# ---------------------------------------------------------------------------------------------------------------
# conv2d grids
# ---------------------------------------------------------------------------------------------------------------

CONV_GRID = list(itertools.product(
    [1, 2, 3],                               # stride
    [0, 1, 3, (2, 0), "valid", "same"],      # padding; 3 is more than half of the 3x3 kernel
    [1, 2],                                  # dilation
    ["1", "2", "depthwise"],                 # groups
))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_GRID)
def test_conv2d_grid(rng, stride, padding, dilation, groups, bias, dtype):
    C = 6
    G = {"1": 1, "2": 2, "depthwise": C}[groups]
    K = 8 if G != C else 2 * C
    x = randn(rng, (2, C, 11, 10), dtype)
    w = randn(rng, (K, C // G, 3, 3), dtype)
    b = randn(rng, K, dtype) if bias else None
    y = R.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=G)
    check_conv2d(x, w, b, randn(rng, y.shape, dtype), stride=stride, padding=padding, dilation=dilation, groups=G)


# Channel counts and sizes around the edges of register tiles and packing panels, big and 1x1 / 7x7 kernels,
# 1-pixel images and outputs, and the shapes of the benchmarks.
CONV_SHAPES = [
    # (x shape, weight shape, params)
    ((3, 1, 28, 28), (32, 1, 5, 5), dict(padding=2)),
    ((2, 3, 13, 11), (7, 3, 7, 7), dict(padding=3, stride=2)),
    ((2, 3, 7, 7), (5, 3, 7, 7), dict()),
    ((2, 17, 9, 10), (33, 17, 3, 3), dict(padding=1)),
    ((2, 16, 5, 5), (16, 16, 1, 1), dict()),
    ((2, 5, 1, 1), (1, 5, 1, 1), dict()),
    ((3, 2, 1, 1), (3, 2, 3, 3), dict(padding=1)),
    ((2, 3, 1, 9), (4, 3, 1, 7), dict(padding="same")),
    ((2, 3, 9, 1), (4, 3, 7, 1), dict(padding="same", stride=2)),
    ((2, 8, 16, 16), (64, 8, 3, 3), dict(padding=1)),
    ((2, 32, 8, 8), (8, 32, 3, 3), dict(padding=1, stride=2)),
    ((2, 4, 12, 7), (6, 4, 5, 3), dict(padding="same", stride=3)),
    ((1, 64, 6, 6), (64, 64, 3, 3), dict(padding=1)),
    ((4, 32, 16, 16), (64, 32, 3, 3), dict(padding=1)),
    ((2, 3, 20, 21), (13, 3, 2, 2), dict(stride=2)),
    ((1, 2, 5, 5), (3, 2, 1, 1), dict(stride=3, padding=2)),
    ((2, 12, 9, 9), (12, 1, 3, 3), dict(padding=1, groups=12)),
    ((2, 12, 9, 9), (24, 1, 5, 5), dict(padding=2, groups=12, stride=2)),
    ((2, 9, 8, 8), (6, 3, 3, 3), dict(padding=2, dilation=2, groups=3)),
    ((1, 5, 14, 9), (7, 5, 3, 3), dict(padding=(4, 0), dilation=(3, 1), stride=(1, 2))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,w_shape,params", CONV_SHAPES, ids=[f"{x}-{w}-{p}" for x, w, p in CONV_SHAPES])
def test_conv2d_shapes(rng, x_shape, w_shape, params, dtype):
    x = randn(rng, x_shape, dtype)
    w = randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[0], dtype)
    y = R.conv2d(x, w, b, **params)
    check_conv2d(x, w, b, randn(rng, y.shape, dtype), **params)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv2d_layouts(rng, layout, dtype):
    x = randn(rng, (3, 6, 9, 8), dtype)
    w = randn(rng, (4, 3, 3, 2), dtype)
    b = randn(rng, 4, dtype)
    params = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    y = R.conv2d(x, w, b, **params)
    go = randn(rng, y.shape, dtype)
    check_conv2d(as_layout(x, layout), as_layout(w, layout), as_layout(b, layout), as_layout(go, layout), **params)
    # The layout must not change the answer: compare with the contiguous reference too.
    assert_close(F.conv2d(as_layout(x, layout), as_layout(w, layout), as_layout(b, layout), **params), y, "y")


# ---------------------------------------------------------------------------------------------------------------
# Every conv2d strategy (direct, im2col, pixels, smallc, pointwise), pinned in turn, on shapes each can take
# ---------------------------------------------------------------------------------------------------------------

# Channel counts that the pixel path takes (>= 8 input channels per group, output channels filling most of a
# register tile) and some that it declines, with strides, dilations, groups, paddings wider than the kernel
# reaches, images split into several row blocks and batches split into several tasks.
PATH_SHAPES = [
    ((2, 32, 4, 4), (64, 32, 3, 3), dict(padding=1)),
    ((3, 16, 5, 7), (24, 16, 3, 3), dict(padding=1)),
    ((2, 16, 9, 9), (16, 16, 3, 3), dict(stride=2, padding=1)),
    ((1, 8, 6, 5), (40, 8, 2, 2), dict(dilation=2)),
    ((2, 32, 7, 7), (48, 16, 3, 3), dict(padding=2, groups=2)),
    ((2, 16, 11, 3), (32, 16, 1, 3), dict(stride=(2, 1), padding=(0, 1))),
    ((3, 64, 8, 8), (128, 64, 3, 3), dict(padding=1)),
    ((2, 16, 30, 30), (32, 16, 3, 3), dict(padding=1)),
    ((1, 16, 70, 3), (16, 16, 3, 3), dict(padding=(0, 5))),
    ((2, 8, 5, 5), (16, 8, 3, 3), dict(padding=4)),
    ((2, 24, 6, 6), (32, 24, 3, 3), dict(padding="same", dilation=2)),
    ((1, 8, 1, 1), (16, 8, 1, 1), dict()),
    ((2, 40, 5, 6), (40, 40, 3, 3), dict(padding=1)),
    ((2, 33, 5, 6), (35, 33, 3, 3), dict(padding=1, stride=(1, 2))),
    ((20, 32, 4, 4), (32, 32, 3, 3), dict(padding=1)),
    ((1, 8, 40, 40), (8, 8, 5, 5), dict(stride=3, padding=2)),
    ((2, 16, 20, 24), (16, 16, 3, 3), dict(padding=1)),
    ((1, 24, 12, 40), (32, 24, 5, 3), dict(padding=(2, 1))),
    # rows of whole vectors (OW a multiple of 16), the float32 direct path's row-vector kernel: blocks of rows
    # across images starting mid-image, a partial channel panel, one-vector tails, dilation, groups
    ((5, 8, 10, 16), (20, 8, 3, 3), dict(padding=1)),
    ((2, 8, 5, 32), (16, 8, 3, 3), dict(padding=1)),
    ((2, 32, 6, 16), (16, 32, 3, 3), dict(padding=1)),
    ((2, 8, 9, 16), (8, 8, 3, 3), dict(padding=2, dilation=2)),
    ((2, 16, 6, 16), (24, 8, 3, 3), dict(padding=1, groups=2)),
    # output planes of whole vectors with shorter rows: the row-vector kernel on KW shifted copies of the rows
    # (vectors run across output rows), blocks starting mid-image, 5-wide kernels, padding past the kernel's reach
    ((6, 8, 10, 8), (16, 8, 3, 3), dict(padding=1)),
    ((3, 16, 12, 12), (20, 16, 3, 3), dict(padding=1)),
    ((2, 8, 8, 12), (8, 8, 3, 3), dict(padding=2, dilation=2)),
    ((2, 8, 4, 12), (16, 8, 5, 5), dict(padding=2)),
    ((2, 8, 6, 4), (8, 8, 3, 3), dict(padding=(1, 3))),
    # first layers: 1-4 input channels, the smallc path (float32), with strides and uneven padding
    ((2, 3, 20, 32), (16, 3, 3, 3), dict(padding=1)),
    ((1, 1, 30, 28), (6, 1, 5, 5), dict(padding=2)),
    ((2, 3, 9, 90), (10, 3, 3, 3), dict(stride=2, padding=1)),
    ((2, 4, 7, 59), (9, 4, 2, 4), dict(stride=(2, 1), padding=(1, 2))),
    ((3, 2, 12, 40), (5, 2, 3, 5), dict(padding=(1, 2))),
    ((2, 3, 32, 32), (12, 3, 3, 3), dict(stride=2, padding=1)),     # 16-pixel rows: a one-vector tile on AVX-512
    # stride 2 for grad_weight too: two tap groups (3 + 2), odd sizes and padding, a kernel of even width
    ((2, 1, 17, 33), (6, 1, 5, 5), dict(stride=2, padding=2)),
    ((3, 3, 15, 14), (8, 3, 4, 4), dict(stride=2, padding=(1, 2))),
    # grad_input with dY's channels in the lanes (float32, stride 1, K a multiple of the vector length): LeNet-5's
    # second layer, channels not a multiple of the tile's 3, rows not a multiple of its pixels, uneven padding
    ((3, 6, 14, 14), (16, 6, 5, 5), dict()),
    ((2, 5, 11, 13), (16, 5, 3, 3), dict(padding=(2, 1))),
    ((2, 7, 9, 19), (16, 7, 4, 2), dict(padding=(1, 0))),
    # 1x1 kernels, the pointwise path: output channels past a whole tile, a last partial column panel, groups,
    # and a plane of several column blocks (copied) with a partial last panel
    ((2, 24, 8, 8), (36, 24, 1, 1), dict()),
    ((3, 16, 6, 7), (20, 16, 1, 1), dict()),
    ((2, 32, 12, 12), (24, 16, 1, 1), dict(groups=2)),
    ((1, 8, 30, 30), (16, 8, 1, 1), dict()),
    # wide enough that grad_weight's partial sums leave one chunk, whose output channels the pixel path splits
    # into blocks of M panels (pixel_msplit), the last one partial
    ((2, 200, 3, 3), (260, 200, 3, 3), dict(padding=1)),
]


def conv_paths(x, w, params):
    """The strategy each direction of conv2d takes for these arguments."""
    full = dict(dict(stride=1, padding=0, dilation=1, groups=1), **params)
    geom = _args.conv2d_args(x, w, None, **full)
    return _engine.conv2d_paths(x.shape, w.shape, F._conv_params(geom), x.dtype.itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,w_shape,params", PATH_SHAPES, ids=[f"{x}-{w}-{p}" for x, w, p in PATH_SHAPES])
def test_conv2d_every_path(rng, conv_path, x_shape, w_shape, params, dtype):
    x = randn(rng, x_shape, dtype)
    w = randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[0], dtype)
    y = R.conv2d(x, w, b, **params)
    check_conv2d(x, w, b, randn(rng, y.shape, dtype), **params)
    check_conv2d(x, w, None, randn(rng, y.shape, dtype), need_input_grad=False, **params)


def test_every_path_is_exercised():
    """The pinned-path tests above really run each strategy in each direction on several shapes (a path that
    cannot take a shape falls back silently, which would leave it untested)."""
    taken = {}
    try:
        for path in CONV_PATHS:
            _engine.force_conv_path(path)
            for x_shape, w_shape, params in PATH_SHAPES:
                x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
                for direction, name in conv_paths(x, w, params).items():
                    taken.setdefault((direction, name), 0)
                    taken[(direction, name)] += 1
    finally:
        _engine.force_conv_path("auto")
    for direction in ["forward", "grad_weight"]:
        for path in CONV_PATHS:
            assert taken.get((direction, path), 0) >= 3, (direction, path, taken)
    for name in ["col2im", "transposed direct", "transposed pixels", "transposed pointwise", "lanes"]:
        assert taken.get(("grad_input", name), 0) >= 3, (name, taken)


# The pixel path skips, panel by panel, the taps that read only padding (conv2d_forward_pixels): small planes under
# 3x3 and 5x5 kernels, stride and dilation, more padding than the kernel reaches, a group
SKIP_SHAPES = [
    ((11, 16, 8, 8), (48, 16, 3, 3), dict(padding=1)),
    ((9, 8, 4, 4), (32, 8, 5, 5), dict(padding=2)),
    ((7, 24, 6, 5), (32, 24, 3, 3), dict(padding=2, dilation=2)),
    ((6, 16, 9, 9), (32, 16, 3, 3), dict(stride=2, padding=3)),
    ((5, 32, 4, 4), (64, 16, 3, 3), dict(padding=1, groups=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,w_shape,params", SKIP_SHAPES, ids=[f"{x}-{w}-{p}" for x, w, p in SKIP_SHAPES])
def test_pixel_path_sums_do_not_depend_on_the_batch(rng, x_shape, w_shape, params, dtype):
    """Each output of the pixel path is the sum over its own inside taps, whichever pixels share its panel: an
    image alone, in a batch (other images in its task, panels across images) and in a shorter batch gives the same
    bits, and the reference's values. A non-finite weight times padding is NaN in the reference: there the path
    computes every tap, and the NaN stay where the reference has them, again in any batch."""
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    try:
        _engine.force_conv_path("pixels")
        assert conv_paths(x, w, params)["forward"] == "pixels"
        for case in ("finite", "inf weight"):
            if case == "inf weight":
                w[3, 1, 0, w.shape[3] - 1] = np.inf
            y = F.conv2d(x, w, b, **params)
            with np.errstate(invalid="ignore"):                 # the reference's 0 * inf
                want = R.conv2d(x, w, b, **params)
            assert_close(y, want, f"pixels {case}")
            if case == "inf weight":
                assert np.isnan(y).any() and np.isfinite(y).any()
            for i in (0, 3, len(x) - 1):
                assert_bitwise_equal(F.conv2d(x[i:i + 1], w, b, **params), y[i:i + 1], f"{case}: image {i} alone")
            assert_bitwise_equal(F.conv2d(x[2:], w, b, **params), y[2:], f"{case}: images 2 on")
    finally:
        _engine.force_conv_path("auto")


def _cpuinfo(key):
    """The first value of `key` in /proc/cpuinfo (as the kernel reports the CPU), None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == key),
                        None)
    except OSError:
        return None


def _cpu_vendor():
    return _cpuinfo("vendor_id")


def _cpu_family():
    family = _cpuinfo("cpu family")
    return None if family is None else int(family)


@pytest.fixture
def pixels_first():
    """The engine's set_pixels_first, restored after the test."""
    before = _engine.set_pixels_first()
    yield _engine.set_pixels_first
    _engine.set_pixels_first(before)


def test_pixel_path_takes_small_planes_of_large_batches(pixels_first):
    """The automatic choice (PIXEL_SKIP_MIN_PIXELS, pixels_skip_padding, pixels_first): where the pixel path goes
    first (AMD), float32 convs whose padding taps are an eighth or more of the work, on batches of 1,024 output
    pixels or more, take it forward and as the transposed conv of grad_input; smaller batches and larger planes
    keep the row-vector direct kernel (float64 has no such kernel, and takes the pixel path on small planes at any
    batch). Elsewhere (Intel) the direct kernel keeps them all."""
    # (AVX-512 builds only: on AVX2 and SSE the direct kernel keeps them)
    avx512 = convengine.build_info()["simd"] == "avx512"
    vendor = _cpu_vendor()
    if vendor is not None:
        assert pixels_first() == (vendor == "AuthenticAMD") == convengine.build_info()["conv_pixels_first"]

    def paths(x_shape, w_shape, dtype=np.float32):
        return conv_paths(np.zeros(x_shape, dtype), np.zeros(w_shape, dtype), dict(padding=w_shape[2] // 2))
    small_planes = [((64, 128, 8, 8), (128, 128, 3, 3)), ((16, 64, 8, 8), (64, 64, 3, 3)),
                    ((64, 256, 4, 4), (256, 256, 3, 3)), ((16, 32, 10, 10), (32, 32, 3, 3)),
                    ((16, 32, 8, 8), (32, 32, 5, 5))]
    for first in (True, False):
        pixels_first(first)
        for x_shape, w_shape in small_planes:
            got = paths(x_shape, w_shape)
            if avx512 and first:
                assert (got["forward"], got["grad_input"]) == ("pixels", "transposed pixels"), (x_shape, w_shape, got)
            elif avx512:
                assert (got["forward"], got["grad_input"]) == ("direct", "transposed direct"), (x_shape, w_shape, got)
            else:   # (grad_input by col2im where AVX2's and SSE's 6-row tiles would pad 32 channels to 36)
                assert got["forward"] == "direct", (x_shape, w_shape, got)
        for x_shape, w_shape, dtype in [((15, 64, 8, 8), (64, 64, 3, 3), np.float32),
                                        ((1, 128, 8, 8), (128, 128, 3, 3), np.float32),
                                        ((64, 64, 16, 16), (64, 64, 3, 3), np.float32),
                                        ((64, 128, 12, 12), (128, 128, 3, 3), np.float32)]:
            assert paths(x_shape, w_shape, dtype)["forward"] == "direct", (x_shape, w_shape, dtype)


# float32 shapes whose grad_input and grad_weight take dY's 16 channels in the vector lanes in the automatic choice
# (conv_grad_input.pxi, conv_grad_weight.pxi): LeNet-5's second layer, kernels 2 to 5 wide, uneven padding, rows
# and channels that do not fill the tiles
LANE_SHAPES = [
    ((3, 6, 14, 14), (16, 6, 5, 5), dict()),
    ((2, 5, 11, 13), (16, 5, 3, 3), dict(padding=(2, 1))),
    ((2, 5, 9, 19), (16, 5, 4, 2), dict(padding=(1, 0))),
    ((3, 8, 6, 9), (16, 8, 2, 4), dict(padding=1)),
]


@pytest.mark.parametrize("x_shape,w_shape,params", LANE_SHAPES, ids=[f"{x}-{w}-{p}" for x, w, p in LANE_SHAPES])
def test_conv2d_backward_with_channels_in_lanes(rng, x_shape, w_shape, params):
    """grad_input and grad_weight with dY's channels in the lanes give the reference's gradients, with inf and NaN
    where the reference has them."""
    x, w, b = randn(rng, x_shape, np.float32), randn(rng, w_shape, np.float32), randn(rng, w_shape[0], np.float32)
    paths = conv_paths(x, w, params)
    assert paths["grad_weight"] == "lanes", paths
    # (grad_input's lanes on AVX-512; AVX2's and SSE's 6-row tiles are mostly full with 5 or 6 channels, and those
    # take the transposed conv)
    want = ("lanes",) if convengine.build_info()["simd"] == "avx512" else ("lanes", "transposed direct")
    assert paths["grad_input"] in want, paths
    y = R.conv2d(x, w, b, **params)
    check_conv2d(x, w, b, randn(rng, y.shape, np.float32), **params)
    check_conv2d(x, w, None, randn(rng, y.shape, np.float32), need_input_grad=False, **params)
    x[1, 2, 3, 4] = np.inf
    x[0, 0, 0, 1] = np.nan
    check_conv2d(x, w, b, randn(rng, y.shape, np.float32), **params)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv2d_first_layer_non_finite_inputs(rng, conv_path, dtype):
    """inf and NaN in a 3-channel image: the first-layer paths (whose rows have zero-padded tails) give the
    reference's inf and NaN, as every other path does."""
    x = randn(rng, (4, 3, 12, 20), dtype)
    x[1, 2, 4, 5] = np.inf
    x[3, 0, 0, 0] = np.nan
    w = randn(rng, (8, 3, 3, 3), dtype)
    check_conv2d(x, w, randn(rng, 8, dtype), randn(rng, (4, 8, 12, 20), dtype), padding=1)


@pytest.mark.parametrize("groups", ["1", "depthwise"])
def test_conv2d_backward_non_finite_inputs(rng, conv_path, groups):
    """inf and NaN in a few input planes: the gradients hold inf and NaN exactly where the reference's do, and
    the planes without them are untouched. (The fast stride-1 grad_weight kernels multiply zero-padded columns
    by the input, 0 * inf = NaN, and must send such planes to their exact loops.)"""
    C = 16
    G = C if groups == "depthwise" else 1
    x = randn(rng, (3, C, 9, 10), np.float64)
    x[1, 2, 4, 5] = np.inf
    x[2, 5, 0, 0] = -np.inf
    x[0, 7, 3, 3] = np.nan
    w = randn(rng, (C if G == C else 32, C // G, 3, 3), np.float64)
    go = randn(rng, (3, w.shape[0], 9, 10), np.float64)
    check_conv2d(x, w, None, go, padding=1, groups=G)


def test_force_conv_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown conv path"):
        _engine.force_conv_path("fastest")


def test_conv2d_does_not_modify_inputs(rng):
    x, w, b = randn(rng, (2, 4, 7, 7)), randn(rng, (6, 2, 3, 3)), randn(rng, 6)
    go = randn(rng, (2, 6, 4, 4))
    copies = [a.copy() for a in (x, w, b, go)]
    F.conv2d(x, w, b, stride=2, padding=1, groups=2)
    F.conv2d_backward(go, x, w, stride=2, padding=1, groups=2)
    for a, c in zip((x, w, b, go), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv2d_empty_batch(rng, dtype):
    x = np.zeros((0, 4, 6, 5), dtype)
    w = randn(rng, (6, 2, 3, 3), dtype)
    b = randn(rng, 6, dtype)
    y = F.conv2d(x, w, b, padding=1, groups=2)
    assert_close(y, R.conv2d(x, w, b, padding=1, groups=2), "y")
    assert y.shape == (0, 6, 6, 5)
    gx, gw, gb = F.conv2d_backward(y, x, w, padding=1, groups=2)
    assert_close(gx, np.zeros_like(x), "grad_x")
    assert_close(gw, np.zeros_like(w), "grad_weight")
    assert_close(gb, np.zeros_like(b), "grad_bias")


@pytest.mark.parametrize("groups", [1, 3], ids=["dense", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv2d_need_input_grad_false(rng, groups, dtype):
    x = randn(rng, (3, 6, 8, 8), dtype)
    w = randn(rng, (9, 6 // groups, 3, 3), dtype)
    y = R.conv2d(x, w, padding=1, groups=groups)
    check_conv2d(x, w, None, randn(rng, y.shape, dtype), need_input_grad=False, padding=1, groups=groups)


# ---------------------------------------------------------------------------------------------------------------
# Pooling grids
# ---------------------------------------------------------------------------------------------------------------

POOL_GRID = [(k, s, p, c) for k, s, p, c in itertools.product(
    [1, 2, 3, (3, 2), (2, 4)],      # kernel_size
    [None, 1, 2, 3, (2, 1)],        # stride
    [0, 1, 2],                      # padding
    [False, True],                  # ceil_mode
) if 2 * p <= min(k if isinstance(k, tuple) else (k, k))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size,stride,padding,ceil_mode", POOL_GRID)
def test_max_pool2d_grid(rng, kernel_size, stride, padding, ceil_mode, dtype):
    x = randn(rng, (2, 3, 9, 8), dtype)
    check_max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incpad", "nopad"])
@pytest.mark.parametrize("kernel_size,stride,padding,ceil_mode", POOL_GRID)
def test_avg_pool2d_grid(rng, kernel_size, stride, padding, ceil_mode, count_include_pad, dtype):
    x = randn(rng, (2, 3, 9, 8), dtype)
    check_avg_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                     count_include_pad=count_include_pad)


POOL_SHAPES = [
    ((2, 3, 1, 1), dict(kernel_size=1)),
    ((2, 3, 1, 1), dict(kernel_size=2, stride=1, padding=1)),
    ((1, 2, 1, 7), dict(kernel_size=(1, 3), stride=2, ceil_mode=True)),
    ((2, 64, 16, 16), dict(kernel_size=2)),
    ((3, 17, 13, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((1, 1, 28, 28), dict(kernel_size=7, stride=7)),
    ((2, 5, 6, 6), dict(kernel_size=6)),
    ((1, 3, 5, 5), dict(kernel_size=2, stride=3, padding=1, ceil_mode=True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,params", POOL_SHAPES, ids=[f"{x}-{p}" for x, p in POOL_SHAPES])
def test_pools_shapes(rng, x_shape, params, dtype):
    x = randn(rng, x_shape, dtype)
    check_max_pool2d(x, **params)
    for cip in (True, False):
        check_avg_pool2d(x, count_include_pad=cip, **params)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pools_layouts(rng, layout, dtype):
    x = randn(rng, (2, 3, 7, 6), dtype)
    params = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    y, idx = R.max_pool2d(x, return_indices=True, **params)
    got_y, got_idx = F.max_pool2d(as_layout(x, layout), return_indices=True, **params)
    np.testing.assert_array_equal(got_y, y)
    np.testing.assert_array_equal(got_idx, idx)
    go = randn(rng, y.shape, dtype)
    assert_close(F.max_pool2d_backward(as_layout(go, layout), as_layout(idx, layout), x.shape),
                 R.max_pool2d_backward(go, idx, x.shape), "max grad_x")
    assert_close(F.avg_pool2d(as_layout(x, layout), **params), R.avg_pool2d(x, **params), "avg y")
    assert_close(F.avg_pool2d_backward(as_layout(go, layout), x.shape, **params),
                 R.avg_pool2d_backward(go, x.shape, **params), "avg grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pools_empty_batch(dtype):
    x = np.zeros((0, 3, 5, 5), dtype)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    assert y.shape == idx.shape == (0, 3, 2, 2) and y.dtype == dtype and idx.dtype == np.int64
    gx = F.max_pool2d_backward(y, idx, x.shape)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert_close(F.avg_pool2d(x, 2), R.avg_pool2d(x, 2), "avg y")
    assert_close(F.avg_pool2d_backward(y, x.shape, 2), R.avg_pool2d_backward(y, x.shape, 2), "avg grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size,stride,padding", [(2, None, 0), (3, 1, 1), (3, 2, 1), ((2, 3), 1, 0)])
@pytest.mark.parametrize("width", [8, 19])
def test_max_pool2d_ties(rng, kernel_size, stride, padding, dtype, width):
    """Values drawn from {0, 1, 2}: nearly every window has tied maxima; the first in window order wins."""
    x = rng.integers(0, 3, (3, 4, 9, width)).astype(dtype)
    check_max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=True)


def test_max_pool2d_ties_first_in_window_order():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 0] = x[0, 0, 0, 1] = 5.0
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    assert y[0, 0, 0, 0] == 5.0 and idx[0, 0, 0, 0] == 1
    assert idx[0, 0, 1, 1] == 2 * 4 + 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size,stride,padding,ceil_mode", [(2, None, 0, False), (3, 1, 1, True),
                                                                  (3, 2, 1, True)])
@pytest.mark.parametrize("width", [7, 17], ids=["per-window", "row-vectorised"])
def test_max_pool2d_nan_and_inf(rng, kernel_size, stride, padding, ceil_mode, dtype, width):
    # rows of 8 or more outputs (width 17) take the row-vectorised kernel, shorter rows the per-window one
    x = randn(rng, (2, 3, 8, width), dtype)
    x[0, 0, 0, 0] = np.nan                      # a single NaN
    x[0, 1, 2:4, 2:4] = np.nan                  # several NaN in one window: PyTorch keeps the last
    x[1, 0, 1, 1] = np.nan
    x[1, 0, 2, 2] = np.nan                      # NaN shared by overlapping windows
    x[1, 2] = -np.inf                           # a plane of -inf: indices still point at real pixels
    x[1, 1, 4:6, 4:6] = np.inf
    check_max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    assert np.isnan(F.max_pool2d(x, kernel_size, stride, padding, ceil_mode)[0, 0, 0, 0])


# 2x2 stride-2 windows on rows of fewer outputs than a vector holds (16 floats, 8 doubles on AVX-512): one vector
# spans several output rows, read by masked loads from the batch as one tall image (pool.h); a scalar loop on
# other ISAs. Widths below 16 with W even and odd (the last column unread), and (N, C, OH) that put a
# vector across rows and planes and leave the last one partial.
SHORT_ROW_WIDTHS = [1, 2, 3, 4, 5, 7, 8, 12, 14, 15]
SHORT_ROW_PLANES = [(1, 1, 1), (2, 3, 1), (3, 5, 2), (2, 3, 3), (1, 7, 5), (4, 3, 8)]


def special_values(rng, shape, dtype):
    """Values where max pooling's rules show: ties among 1.0, among -0.0 and 0.0, +-inf, and two NaNs of
    different bits (which of several NaNs in a window won shows in the value, not only in the index)."""
    bits = np.uint32 if dtype == np.float32 else np.uint64
    other_nan = np.array([np.nan], dtype).view(bits) ^ bits(1)  # a quiet NaN with another payload
    values = np.array([0.0, -0.0, 1.0, 1.0, -1.0, np.inf, -np.inf, np.nan, np.nan], dtype)
    values[-1] = other_nan.view(dtype)[0]
    return rng.choice(values, shape)


def assert_max_pool2d_bitwise(x, **params):
    """Values (as bits: signs of zero and NaN payloads), indices, and values without indices, against the
    reference."""
    label = f"x{x.shape} {x.dtype} {params}"
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    y_ref, idx_ref = R.max_pool2d(x, return_indices=True, **params)
    np.testing.assert_array_equal(idx, idx_ref, err_msg=f"max_pool2d indices, {label}")
    assert_bitwise_equal(y, y_ref, f"max_pool2d y, {label}")
    assert_bitwise_equal(F.max_pool2d(x, **params), y_ref, f"max_pool2d y w/o indices, {label}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("odd", [False, True], ids=["W=2OW", "W=2OW+1"])
@pytest.mark.parametrize("ow", SHORT_ROW_WIDTHS)
def test_max_pool2d_2x2_short_rows(rng, ow, odd, dtype):
    for n, c, oh in SHORT_ROW_PLANES:
        shape = (n, c, 2 * oh, 2 * ow + odd)
        assert_max_pool2d_bitwise(randn(rng, shape, dtype), kernel_size=2)
        assert_max_pool2d_bitwise(special_values(rng, shape, dtype), kernel_size=2)
        assert_max_pool2d_bitwise(rng.integers(0, 2, shape).astype(dtype), kernel_size=2)  # ties everywhere


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_pool2d_2x2_short_rows_each_window_rule(dtype):
    """One window per case, placed at every position of a vector of 16 outputs (OW = 4: four output rows per
    vector, planes of two): ties go to the first in window order (a, b, c, d), -0.0 and 0.0 tie, a NaN wins over
    any number and a later NaN over an earlier one."""
    nan2 = (np.array([np.nan], dtype).view(np.uint32 if dtype == np.float32 else np.uint64) ^ 1).view(dtype)[0]
    cases = [  # a, b, c, d (top-left, top-right, bottom-left, bottom-right)
        [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [-0.0, 0.0, 0.0, -0.0],
        [0.0, -0.0, -0.0, 0.0], [-1.0, -0.0, 0.0, -1.0], [-np.inf, -np.inf, -np.inf, -np.inf],
        [np.inf, np.inf, 1.0, np.inf], [np.nan, np.inf, 1.0, 2.0], [1.0, np.inf, np.nan, np.inf],
        [np.nan, 1.0, nan2, 2.0], [1.0, nan2, 2.0, np.nan], [np.nan, nan2, np.nan, 0.0], [1.0, 2.0, 3.0, np.nan],
    ]
    for case in cases:
        for pos in range(16):
            x = np.full((2, 2, 4, 8), -5.0, dtype)  # 16 windows; the case at window `pos`
            plane, row, col = pos // 8, pos % 8 // 4, pos % 4
            x.reshape(4, 4, 8)[plane, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = np.array(case, dtype).reshape(2, 2)
            assert_max_pool2d_bitwise(x, kernel_size=2)


def test_max_pool2d_2x2_short_rows_threaded(rng):
    """Tasks of many rows that start inside planes (OH = 7, a block of rows is not a multiple of it) on 2 threads."""
    convengine_threads = convengine.get_num_threads()
    try:
        convengine.set_num_threads(2)
        with every_call_threaded():
            for dtype in DTYPES:
                assert_max_pool2d_bitwise(special_values(rng, (16, 24, 14, 15), dtype), kernel_size=2)
    finally:
        convengine.set_num_threads(convengine_threads)


@pytest.mark.parametrize("index_dtype", [np.int32, np.uint64])
def test_max_pool2d_backward_other_integer_indices(rng, index_dtype):
    """Indices of another integer dtype (e.g. from a file) mean the same positions."""
    x = randn(rng, (2, 3, 7, 6))
    y, idx = R.max_pool2d(x, 3, 2, 1, return_indices=True)
    go = randn(rng, y.shape)
    assert_close(F.max_pool2d_backward(go, idx.astype(index_dtype), x.shape), R.max_pool2d_backward(go, idx, x.shape),
                 "grad_x")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(2, 3, 6, 32), (2, 2, 6, 17), (2, 2, 8, 8)], ids=str)
def test_max_pool2d_backward_maps_2x2_windows_like_the_scatter(rng, shape, dtype):
    """Where the planes pair up as a 2x2 stride-2 pooling's (pool.h's ce_pool2x2_expand maps each window), the
    scatter's values, bit for bit (a pixel is one window's or none, so each sum is one term): a 2x2 pooling's
    indices; 3x3 windows with padding, whose indices leave the 2x2 blocks (the scatter takes the plane); a 2x2
    pooling's indices moved (another window's pixel, one pixel named twice) past the first row; the same through a
    ReLU's output (_max_pool2d_relu_backward). Rows of 8 windows a vector step (other widths are scattered)."""
    x = randn(rng, shape).astype(dtype)
    y, idx = R.max_pool2d(x, 2, return_indices=True)
    go = randn(rng, y.shape).astype(dtype)
    moved = idx.copy()
    moved[1, 1, 1, 2] = moved[1, 1, 2, 2]
    moved[0, 1, 2, -1] = 0
    y3, idx3 = R.max_pool2d(x, 3, 2, 1, return_indices=True)
    go3 = randn(rng, y3.shape).astype(dtype)
    relu_out = np.maximum(x, 0)
    for name, g, ind in [("2x2", go, idx), ("moved", go, moved), ("3x3", go3, idx3)]:
        assert g.shape[2] * 2 == shape[2]
        want = R.max_pool2d_backward(g, ind, x.shape)
        assert_bitwise_equal(F.max_pool2d_backward(g, ind, x.shape), want, f"{shape} {name}")
        assert_bitwise_equal(F._max_pool2d_relu_backward(g, ind, relu_out), np.where(relu_out > 0, want, 0),
                             f"{shape} {name} through the ReLU")


def test_avg_pool2d_nan_propagates():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 0, 0] = np.nan
    y = F.avg_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# relu and linear
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7, 11), (0, 3, 2, 2), (1,)])
def test_relu(rng, shape, dtype, layout):
    x = randn(rng, shape, dtype)
    if x.size > 2:
        x.reshape(-1)[0] = np.nan
        x.reshape(-1)[1] = 0.0
    go = randn(rng, shape, dtype)
    assert_close(F.relu(as_layout(x, layout)), R.relu(x), "relu y")
    assert_close(F.relu_backward(as_layout(go, layout), as_layout(x, layout)), R.relu_backward(go, x), "relu grad_x")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,fin,fout", [(4, 7, 3), (1, 1, 1), (0, 5, 2), (33, 65, 10)])
def test_linear(rng, n, fin, fout, bias, dtype, layout):
    x = randn(rng, (n, fin), dtype)
    w = randn(rng, (fout, fin), dtype)
    b = randn(rng, fout, dtype) if bias else None
    go = randn(rng, (n, fout), dtype)
    lb = as_layout(b, layout) if bias else None
    assert_close(F.linear(as_layout(x, layout), as_layout(w, layout), lb), R.linear(x, w, b), "linear y")
    got = F.linear_backward(as_layout(go, layout), as_layout(x, layout), as_layout(w, layout))
    for name, a, e in zip(["grad_x", "grad_weight", "grad_bias"], got, R.linear_backward(go, x, w)):
        assert_close(a, e, name)


# ---------------------------------------------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------------------------------------------

BATCH_NORM_SHAPES = [(32, 32, 8, 8), (64, 64, 4, 4), (3, 5, 7, 1), (2, 4, 1, 1), (1, 3, 5, 17), (5, 1, 3, 3),
                     (2, 16, 33, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES, ids=str)
def test_batch_norm2d(rng, shape, dtype, layout):
    # an offset and spread per channel, so that a wrong mean or variance shows
    x = randn(rng, shape, dtype) * randn(rng, (1, shape[1], 1, 1), dtype) * 3 + randn(rng, (1, shape[1], 1, 1), dtype)
    w, b, go = randn(rng, shape[1], dtype), randn(rng, shape[1], dtype), randn(rng, shape, dtype)
    got = F.batch_norm2d_training(as_layout(x, layout), as_layout(w, layout), as_layout(b, layout))
    want = R.batch_norm2d_training(x, w, b)
    for name, g, r in zip(["y", "mean", "var"], got, want):
        assert_close(g, r, f"batch_norm2d_training {name}, x{shape}")
    mean, var = want[1], want[2]
    assert_close(F.batch_norm2d(as_layout(x, layout), w, b, as_layout(mean, layout), var),
                 R.batch_norm2d(x, w, b, mean, var), f"batch_norm2d y, x{shape}")
    got = F.batch_norm2d_backward(as_layout(go, layout), as_layout(x, layout), w, mean, as_layout(var, layout))
    want = R.batch_norm2d_backward(go, x, w, mean, var)
    for name, g, r in zip(["grad_x", "grad_weight", "grad_bias"], got, want):
        assert_close(g, r, f"batch_norm2d_backward {name}, x{shape}")


@pytest.mark.parametrize("shape", [(8, 4, 16, 16), (6, 3, 7, 7), (5, 2, 4, 5), (8, 4, 3, 3)], ids=str)
def test_batch_norm2d_statistics_stay_accurate_far_from_zero(rng, shape):
    """float32 values 1000 +- 0.5: the mean of squares minus the squared mean would lose the variance to
    cancellation (x^2 ~ 1e6 carries float32 errors of ~0.06, against a variance of 0.25); the kernels' deviations
    from each plane's mean (planes of >= 16 values, some with tails) or from the channel's mean keep it to float32
    rounding of the deviations."""
    x = (1000 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
    w, b = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    _, mean, var = F.batch_norm2d_training(x, w, b)
    x64 = x.astype(np.float64)
    want_mean, want_var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-3)


def test_batch_norm2d_does_not_modify_inputs(rng):
    x, go = randn(rng, (4, 3, 5, 5)), randn(rng, (4, 3, 5, 5))
    w, b, mean, var = randn(rng, 3), randn(rng, 3), randn(rng, 3), np.abs(randn(rng, 3))
    arrays = [x, go, w, b, mean, var]
    for a in arrays:
        a.setflags(write=False)
    copies = [a.copy() for a in arrays]
    F.batch_norm2d_training(x, w, b)
    F.batch_norm2d(x, w, b, mean, var)
    F.batch_norm2d_backward(go, x, w, mean, var)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_batch_norm2d_empty_batch_with_given_statistics():
    x = np.zeros((0, 3, 4, 4), np.float32)
    v = np.ones(3, np.float32)
    assert F.batch_norm2d(x, v, v, v, v).shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: drawn shapes and parameters
# ---------------------------------------------------------------------------------------------------------------

def pairs(lo, hi):
    return st.one_of(st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi)))


def as_pair(v):
    return v if isinstance(v, tuple) else (v, v)


@st.composite
def conv_configs(draw, max_groups=3, channels=st.integers(1, 4), out_channels=st.integers(1, 5), max_kernel=5,
                 max_dilation=3, max_padding=4, min_batch=0, extra=11):
    """(x shape, weight shape, params) of a valid conv2d: per-group channel and output channel counts drawn from
    the strategies given, kernel, stride, dilation and padding up to the bounds, images up to `extra` pixels
    past the smallest that gives a non-empty output."""
    groups = draw(st.integers(1, max_groups))
    C, K = groups * draw(channels), groups * draw(out_channels)
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    stride, dilation = draw(pairs(1, 3)), draw(pairs(1, max_dilation))
    padding = draw(st.one_of(pairs(0, max_padding), st.sampled_from(["valid", "same"])))
    pads = (0, 0) if isinstance(padding, str) else as_pair(padding)
    dh, dw = as_pair(dilation)
    # Heights and widths from the smallest that gives a non-empty output, so that no draw is wasted.
    min_h = 1 if padding == "same" else max(1, dh * (kh - 1) + 1 - 2 * pads[0])
    min_w = 1 if padding == "same" else max(1, dw * (kw - 1) + 1 - 2 * pads[1])
    x_shape = (draw(st.integers(min_batch, 3)), C, draw(st.integers(min_h, min_h + extra)),
               draw(st.integers(min_w, min_w + extra)))
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x_shape, (K, C // groups, kh, kw), params


@given(config=conv_configs(), bias=st.booleans(), need_input_grad=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 32 - 1))
def test_conv2d_hypothesis(config, bias, need_input_grad, dtype, seed):
    x_shape, w_shape, params = config
    rng = np.random.default_rng(seed)
    x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[0], dtype) if bias else None
    y = R.conv2d(x, w, b, **params)
    check_conv2d(x, w, b, randn(rng, y.shape, dtype), need_input_grad=need_input_grad, **params)


# conv_configs with channel counts the pixel path takes (8+ input channels per group, output channels that fill or
# nearly fill a register tile), and sizes that split images into several row blocks
wide_conv_configs = conv_configs(max_groups=2, channels=st.integers(8, 40),
                                 out_channels=st.sampled_from([8, 16, 24, 30, 32, 40, 48, 64]), max_kernel=4,
                                 max_dilation=2, max_padding=3, min_batch=1, extra=20)


@given(config=wide_conv_configs, path=st.sampled_from(CONV_PATHS), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 32 - 1))
def test_conv2d_every_path_hypothesis(config, path, dtype, seed):
    x_shape, w_shape, params = config
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    y = R.conv2d(x, w, b, **params)
    _engine.force_conv_path(path)
    try:
        check_conv2d(x, w, b, randn(rng, y.shape, dtype), **params)
    finally:
        _engine.force_conv_path("auto")


@st.composite
def pool_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), pairs(1, 3)))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    min_h, min_w = max(1, kh - 2 * ph), max(1, kw - 2 * pw)
    x_shape = (draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.integers(min_h, min_h + 10)),
               draw(st.integers(min_w, min_w + 10)))
    params = dict(kernel_size=draw(st.sampled_from([(kh, kw), kh])) if kh == kw else (kh, kw), stride=stride,
                  padding=(ph, pw) if ph != pw else ph, ceil_mode=draw(st.booleans()))
    return x_shape, params


@given(config=pool_configs(), ties=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 32 - 1))
def test_max_pool2d_hypothesis(config, ties, dtype, seed):
    x_shape, params = config
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, x_shape).astype(dtype) if ties else randn(rng, x_shape, dtype)
    check_max_pool2d(x, go_seed=seed, **params)


@given(config=pool_configs(), count_include_pad=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 32 - 1))
def test_avg_pool2d_hypothesis(config, count_include_pad, dtype, seed):
    x_shape, params = config
    x = randn(np.random.default_rng(seed), x_shape, dtype)
    check_avg_pool2d(x, go_seed=seed, count_include_pad=count_include_pad, **params)




# ---------------------------------------------------------------------------------------------------------------
# global_avg_pool2d: the compiled mean per plane (16 lanes, a tree, then the division)

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 3, 5), (4, 8, 8, 8), (2, 5, 7, 7), (1, 3, 17, 13),
                                   (2, 2, 33, 33), (0, 3, 4, 4), (3, 0, 2, 2)])
def test_global_avg_pool2d_matches_reference(rng, shape, dtype):
    x = randn(rng, shape, dtype) + 3          # an offset, so that a sum in the wrong order or count shows
    got = F.global_avg_pool2d(x)
    assert got.dtype == dtype and got.shape == shape[:2]
    assert_close(got, R.global_avg_pool2d(x), "global_avg_pool2d")


def test_global_avg_pool2d_takes_any_layout_and_keeps_nan_and_inf(rng):
    x = randn(rng, (2, 3, 6, 5), np.float64)
    view = np.asfortranarray(x)
    assert_close(F.global_avg_pool2d(view), R.global_avg_pool2d(x), "global_avg_pool2d of a Fortran-ordered array")
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 0, 0] = np.inf
    got = F.global_avg_pool2d(x)
    assert np.isnan(got[0, 1]) and got[1, 2] == np.inf
    assert np.isfinite(np.delete(got.reshape(-1), [1, 5])).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (4, 8, 8, 8), (2, 5, 7, 7), (1, 3, 17, 13), (0, 3, 4, 4)])
def test_global_avg_pool2d_backward_spreads_each_gradient_evenly(rng, shape, dtype):
    """Each plane of the input gradient holds its output gradient over the plane's size, the derivative of the
    mean (test_gradients checks the layer by finite differences)."""
    go = randn(rng, shape[:2], dtype)
    got = F._global_avg_pool2d_backward(go, shape)
    assert got.dtype == dtype and got.shape == shape
    assert_close(got, np.broadcast_to(go[:, :, None, None] / (shape[2] * shape[3]), shape),
                 "global_avg_pool2d backward")
    with pytest.raises(ValueError, match="does not match"):
        F._global_avg_pool2d_backward(go, (shape[0], shape[1] + 1, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        F._global_avg_pool2d_backward(go, (shape[0], shape[1], 0, 2))


def test_global_avg_pool2d_refuses_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        F.global_avg_pool2d(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        F.global_avg_pool2d(np.zeros((2, 3, 0, 4), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        F.global_avg_pool2d(np.zeros((2, 3, 4, 4), np.int32))


# ---------------------------------------------------------------------------------------------------------------
# depthwise convs (groups == in == out channels: depthwise.pxi): stride 1 sweeps, stride 2 through the column
# phases (rows split and merged by vector permutes on AVX-512), odd and even sizes, every padding side, rows of
# several vectors

DEPTHWISE_CASES = [
    ((2, 5, 16, 16), 3, dict(stride=2, padding=1)),
    ((2, 5, 17, 15), 3, dict(stride=2, padding=1)),
    ((1, 3, 16, 16), 3, dict(stride=2, padding=0)),
    ((2, 4, 9, 40), 3, dict(stride=2, padding=(1, 2))),
    ((1, 4, 12, 70), 5, dict(stride=2, padding=2)),
    ((2, 3, 8, 8), 2, dict(stride=2, padding=(0, 1))),
    ((2, 3, 7, 33), 3, dict(stride=2, padding=(2, 0))),
    ((2, 6, 8, 8), 3, dict(padding=1)),
    ((1, 4, 16, 37), 5, dict(padding=2)),
    ((2, 3, 11, 10), 3, dict(padding="same", dilation=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_shape,k,params", DEPTHWISE_CASES, ids=[f"{x}-{k}-{p}" for x, k, p in DEPTHWISE_CASES])
def test_depthwise_conv2d_matches_reference(rng, x_shape, k, params, dtype):
    C = x_shape[1]
    x, w, b = randn(rng, x_shape, dtype), randn(rng, (C, 1, k, k), dtype), randn(rng, C, dtype)
    assert conv_paths(x, w, dict(params, groups=C))["forward"].startswith("depthwise")
    y = R.conv2d(x, w, b, groups=C, **params)
    check_conv2d(x, w, b, randn(rng, y.shape, dtype), groups=C, **params)


# the whole-plane register kernels (depthwise.h: float32 on AVX-512 builds; other builds take the general sweep for
# the same shapes): 3x3, padding 1, 8 or 16 wide at stride 1, 16 -> 8 wide at stride 2; odd heights (a half-empty
# last vector), one row, batch 1 and more. grad_input at stride 1 is the same kernel on the transposed geometry.
DW_SMALL_CASES = [
    ((2, 6, 8, 8), 1, "depthwise 3x3s1 w8"),
    ((1, 3, 7, 8), 1, "depthwise 3x3s1 w8"),
    ((3, 2, 1, 8), 1, "depthwise 3x3s1 w8"),
    ((2, 2, 2, 8), 1, "depthwise 3x3s1 w8"),
    ((1, 4, 16, 16), 1, "depthwise 3x3s1 w16"),
    ((2, 3, 5, 16), 1, "depthwise 3x3s1 w16"),
    ((2, 2, 1, 16), 1, "depthwise 3x3s1 w16"),
    ((2, 5, 16, 16), 2, "depthwise 3x3s2 w16"),
    ((1, 3, 17, 16), 2, "depthwise 3x3s2 w16"),
    ((2, 2, 6, 16), 2, "depthwise 3x3s2 w16"),
    ((2, 2, 3, 16), 2, "depthwise 3x3s2 w16"),
    ((1, 2, 1, 16), 2, "depthwise 3x3s2 w16"),
]
DW_SMALL_IDS = [f"{x}-s{s}" for x, s, _ in DW_SMALL_CASES]


# The float32 direct path's row-vector kernel (OW or OH*OW a multiple of 16, or planes that fill 7/8 of their
# vectors; conv_forward.pxi ukernel_rows_f) applies the epilogue from registers with its last k block: each
# epilogue, with and without bias, against the reference, with a partial channel panel and one-vector tails, on one
# k block and on two (32 input channels: 288 > KC rows; a 1x1 kernel with padding, not the pointwise path, over 300
# input channels), and on planes whose last vector is partial (10x10, 14x14 and 11x11 outputs: blocks of whole
# images, the last vector's pixels only written, also when a second k block adds to them).
ROWS_CASES = [
    ((3, 8, 7, 16), (20, 8, 3, 3)),
    ((2, 32, 5, 32), (24, 32, 3, 3)),
    ((1, 16, 16, 16), (64, 16, 3, 3)),
    ((3, 16, 8, 8), (40, 16, 3, 3)),      # shifted rows (8-pixel rows, 64-pixel planes)
    ((2, 32, 4, 4), (24, 32, 3, 3)),
    ((1, 300, 14, 14), (24, 300, 1, 1)),  # 16-pixel rows, KC = 150
    ((3, 6, 10, 10), (16, 6, 3, 3)),      # partial last vectors: 100-pixel planes
    ((2, 32, 14, 14), (20, 32, 3, 3)),    # 196-pixel planes, two k blocks
    ((5, 6, 11, 11), (24, 6, 3, 3)),      # 121-pixel planes: one pixel in the last vector
]


@pytest.mark.parametrize("relu,affine", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "relu", "affine", "relu-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape,w_shape", ROWS_CASES, ids=[f"{x}-{w}" for x, w in ROWS_CASES])
def test_direct_row_vector_kernel_epilogues(rng, x_shape, w_shape, bias, relu, affine):
    x, w = randn(rng, x_shape, np.float32), randn(rng, w_shape, np.float32)
    K = w_shape[0]
    b = randn(rng, K, np.float32) if bias else None
    sc, sh = (randn(rng, K, np.float32) if affine else None for _ in range(2))
    assert conv_paths(x, w, dict(padding=1))["forward"] == "direct"
    want = R.conv2d(x, w, b, padding=1)
    if relu:
        want = R.relu(want)
    if affine:
        want = want * sc[:, None, None] + sh[:, None, None]
    for n_threads in (1, 2):
        geom = _args.conv2d_args(x, w, b, 1, 1, 1, 1)
        out = np.full(geom.out_shape, np.nan, np.float32)
        _engine.conv2d_forward(x, w, b, out, F._conv_params(geom), n_threads, relu, sc, sh)
        assert_close(out, want, f"direct rows {x_shape} relu={relu} affine={affine} threads={n_threads}")


STRIDED_ROWS_CASES = [
    ((3, 16, 32, 32), (24, 16, 3, 3), dict(stride=2, padding=1)),    # 16-pixel output rows, two k blocks
    ((2, 8, 15, 17), (20, 8, 3, 3), dict(stride=2, padding=1)),      # odd sizes: 8x9 output, edge columns
    ((2, 8, 17, 16), (16, 8, 3, 3), dict(stride=2)),                 # no padding: the last input row unread
    ((2, 6, 16, 17), (12, 6, 5, 5), dict(stride=(2, 1), padding=2)),  # row stride only
    ((2, 6, 16, 33), (12, 6, 3, 3), dict(stride=(1, 2), padding=1)),  # column stride only
    ((2, 4, 19, 20), (8, 4, 3, 3), dict(stride=2, padding=2, dilation=2)),
    ((1, 32, 16, 16), (64, 32, 3, 3), dict(stride=2, padding=1)),    # one 8x8 plane, split by channels
    ((4, 8, 20, 20), (16, 8, 3, 3), dict(stride=2, padding=1)),      # 10x10 planes end in a partial vector
    ((2, 3, 32, 32), (16, 3, 3, 3), dict(stride=2, padding=1)),      # an RGB stem: rows_beat_smallc
    ((2, 3, 60, 60), (32, 3, 3, 3), dict(stride=2, padding=1)),      # 30-pixel rows: smallc's tiles pad them
    # a wider left padding, an odd width whose last output reads the padding on the right, 19-pixel rows (a
    # vector and 3 columns); padding on the rows only
    ((2, 8, 13, 35), (8, 8, 3, 3), dict(stride=2, padding=2)),
    ((2, 8, 14, 36), (8, 8, 3, 3), dict(stride=2, padding=(1, 0))),
]


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("x_shape,w_shape,params", STRIDED_ROWS_CASES,
                         ids=[f"{x}-{w}-{p}" for x, w, p in STRIDED_ROWS_CASES])
def test_strided_row_vector_kernel(rng, x_shape, w_shape, params, relu):
    """Strides of 2 on the row-vector kernel (every sw-th column of each row phase copied, fill_shifted_rows):
    the reference's result with bias and ReLU from registers, the same bits at 1, 2 and 3 threads (blocks and
    channel splits follow the thread count, balanced_rows), and the same bits again when the second call finds
    the first one's scratch."""
    x, w = randn(rng, x_shape, np.float32), randn(rng, w_shape, np.float32)
    b = randn(rng, w_shape[0], np.float32)
    assert conv_paths(x, w, params)["forward"] == "direct"
    want = R.conv2d(x, w, b, **params)
    if relu:
        want = R.relu(want)
    full = dict(dict(stride=1, padding=0, dilation=1, groups=1), **params)
    geom = _args.conv2d_args(x, w, b, **full)
    outs = []
    for n_threads in (1, 2, 3, 2):
        out = np.full(geom.out_shape, np.nan, np.float32)
        _engine.conv2d_forward(x, w, b, out, F._conv_params(geom), n_threads, relu, None, None)
        assert_close(out, want, f"strided rows {x_shape} {params} threads={n_threads}")
        outs.append(out)
    for n_threads, out in zip((2, 3, 2), outs[1:]):
        assert_bitwise_equal(out, outs[0], f"strided rows {x_shape} {params}: {n_threads} threads vs 1")


PHASE_CASES = [
    ((3, 16, 32, 32), (24, 16, 3, 3), 1, 1),
    ((2, 16, 15, 17), (16, 16, 3, 3), 1, 1),   # odd sizes: the phases differ in rows and columns
    ((2, 16, 16, 16), (16, 16, 3, 3), 0, 1),   # padding 0: the even phases pad below and right only
    ((2, 16, 17, 16), (12, 16, 5, 5), 2, 1),
    ((2, 16, 12, 12), (16, 16, 4, 4), 1, 1),   # even kernel: 2x2 taps in every phase
    ((2, 16, 9, 9), (16, 16, 1, 1), 0, 1),     # 1x1: three phases without taps, zero
    ((2, 32, 8, 8), (32, 16, 3, 3), 1, 2),     # groups
    ((1, 16, 3, 2), (16, 16, 3, 3), 1, 1),     # one-pixel phases
    # phase rows of 12 pixels or more on AVX-512 (phase_rows_in_place: the taps read in place, a vector per 16
    # pixels of a row; the cases above go as phase convs there), in batches that make tasks of several images
    # at 1 thread (PhasePlan.nimg: B // 2), the last one shorter, and of one image at 2 and 3 threads: the same
    # bits whichever images a task holds
    ((7, 16, 6, 32), (16, 16, 3, 3), 1, 1),
    ((5, 16, 7, 25), (16, 16, 3, 3), 1, 1),    # odd: 13- and 12-pixel phase rows
    ((5, 16, 5, 48), (16, 16, 3, 3), 1, 1),    # 24-pixel phase rows: a whole vector and a partial one
    ((4, 16, 6, 32), (16, 16, 3, 3), 0, 1),
    ((3, 16, 9, 26), (12, 16, 5, 5), 2, 1),
    ((3, 16, 8, 24), (16, 16, 4, 4), 1, 1),
    ((6, 32, 4, 32), (32, 16, 3, 3), 1, 2),
    ((6, 16, 5, 31), (16, 16, 1, 1), 0, 1),
    # and on the phase convs, batches of several images and (at 1 thread, phase_images 8) of two rounds
    ((7, 16, 16, 16), (16, 16, 3, 3), 1, 1),
    ((6, 32, 8, 8), (32, 16, 3, 3), 1, 2),
    ((9, 64, 22, 22), (16, 64, 3, 3), 1, 1),
]


@pytest.mark.parametrize("x_shape,w_shape,pad,groups", PHASE_CASES, ids=[str(c) for c in PHASE_CASES])
def test_stride_two_grad_input_by_phases(rng, x_shape, w_shape, pad, groups):
    """grad_input of a float32 stride-2 conv as four stride-1 convs, one per parity of the input pixels
    (conv2d_grad_input_phases): the reference's gradient, and the same bits at 1, 2 and 3 threads."""
    x, w = randn(rng, x_shape, np.float32), randn(rng, w_shape, np.float32)
    geom = _args.conv2d_args(x, w, None, stride=2, padding=pad, dilation=1, groups=groups)
    params = F._conv_params(geom)
    assert _engine.conv2d_paths(x.shape, w.shape, params, 4)["grad_input"] == "phases"
    assert_grad_input_by_phases(x, w, randn(rng, geom.out_shape, np.float32), params, pad, groups,
                                f"phases {x_shape} {w_shape} pad={pad}")


def assert_grad_input_by_phases(x, w, dy, params, pad, groups, what):
    """The float32 grad_input of a stride-2 conv on 1, 2 and 3 threads: the float64 reference's gradient, and the
    same bits on each (test_fuzz's drawn geometries call it too)."""
    want = R.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), stride=2,
                             padding=pad, groups=groups)[0].astype(np.float32)
    outs = []
    for n_threads in (1, 2, 3):
        gx = np.full(x.shape, np.nan, np.float32)
        _engine.conv2d_grad_input(dy, w, gx, params, n_threads)
        assert_close(gx, want, f"{what} threads={n_threads}")
        outs.append(gx)
    for n_threads, gx in zip((2, 3), outs[1:]):
        assert_bitwise_equal(gx, outs[0], f"{what}: {n_threads} threads vs 1")


def assert_grad_weight_by_pixels(x, w_shape, dy, params, stride, pad, groups, what):
    """grad_weight and grad_bias on 1, 2 and 3 threads: the float64 reference's gradients, and the same bits on
    each (test_fuzz's drawn pixel-path geometries call it)."""
    f64 = np.float64
    _, want_w, want_b = R.conv2d_backward(dy.astype(f64), x.astype(f64), np.zeros(w_shape, f64), stride=stride,
                                          padding=pad, groups=groups, need_input_grad=False)
    outs = []
    for n_threads in (1, 2, 3):
        gw, gb = np.full(w_shape, np.nan, x.dtype), np.full(w_shape[0], np.nan, x.dtype)
        _engine.conv2d_grad_weight(dy, x, gw, gb, params, n_threads)
        assert_close(gw, want_w.astype(x.dtype), f"{what} grad_weight threads={n_threads}")
        assert_close(gb, want_b.astype(x.dtype), f"{what} grad_bias threads={n_threads}")
        outs.append((gw, gb))
    for n_threads, (gw, gb) in zip((2, 3), outs[1:]):
        assert_bitwise_equal(gw, outs[0][0], f"{what} grad_weight: {n_threads} threads vs 1")
        assert_bitwise_equal(gb, outs[0][1], f"{what} grad_bias: {n_threads} threads vs 1")


# (x shape, w shape, stride, padding, groups): at least one shape for every path of every direction (SCRATCH_PATHS)
SCRATCH_CASES = [
    ((8, 32, 16, 16), (64, 32, 3, 3), 1, 1, 1),     # direct (rows), transposed direct, pixels
    ((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),     # direct on larger planes
    ((8, 32, 32, 32), (64, 32, 3, 3), 2, 1, 1),     # strided rows, phases (read in place)
    ((4, 32, 14, 14), (32, 32, 3, 3), 2, 1, 1),     # phases as phase convs (7-pixel phase rows)
    ((8, 64, 8, 8), (128, 64, 1, 1), 1, 0, 1),      # pointwise, transposed pointwise
    ((4, 64, 32, 32), (64, 64, 1, 1), 1, 0, 1),     # pointwise grad_weight
    ((8, 3, 32, 32), (32, 3, 3, 3), 1, 1, 1),       # smallc (dY read in place on AVX-512 and AVX2), col2im
    ((8, 3, 30, 30), (30, 3, 3, 3), 1, 1, 1),       # smallc, dY copied
    ((2, 1, 28, 28), (32, 1, 5, 5), 1, 2, 1),       # one input channel
    ((8, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1),       # lanes
    ((4, 16, 9, 9), (8, 4, 3, 3), 2, 1, 4),         # groups: im2col
    ((4, 16, 13, 13), (24, 16, 3, 3), 2, 0, 1),     # pixels
    ((4, 16, 15, 15), (8, 16, 3, 3), 1, 0, 1),      # direct grad_weight
    ((4, 32, 7, 7), (32, 32, 3, 3), 1, 1, 1),       # transposed pixels
    ((8, 32, 16, 16), (32, 1, 3, 3), 1, 1, 32),     # depthwise
    ((8, 32, 32, 32), (32, 1, 3, 3), 2, 1, 32),
    ((4, 8, 12, 12), (8, 1, 5, 5), 2, 2, 8),
]
SCRATCH_PATHS = {"forward": {"direct", "im2col", "pixels", "pointwise", "smallc", "depthwise"},
                 "grad_input": {"col2im", "lanes", "phases", "transposed direct", "transposed pixels",
                                "transposed pointwise", "depthwise"},
                 "grad_weight": {"direct", "im2col", "lanes", "pixels", "pointwise", "smallc", "depthwise"}}


def test_scratch_report_is_what_the_kernels_hold():
    """conv2d_scratch_bytes, computed from the shapes, against the most bytes the kernels' scratch allocations
    held at once during a call (count_allocated_bytes follows every ce_malloc and ce_free), for every path of
    every direction, both dtypes and 1 to 3 threads: equal, so the report stays true as kernels change. And every
    one of those allocations starts on a SCRATCH_ALIGN-byte line (misaligned_allocations)."""
    rng = np.random.default_rng(0)
    covered = {direction: set() for direction in SCRATCH_PATHS}
    for dtype, (x_shape, w_shape, stride, pad, groups), n_threads in itertools.product(
            DTYPES, SCRATCH_CASES, (1, 2, 3)):
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        geom = _args.conv2d_args(x, w, None, stride, pad, 1, groups)
        params = F._conv_params(geom)
        dy = randn(rng, geom.out_shape, dtype)
        report = _engine.conv2d_scratch_bytes(x_shape, w_shape, params, x.itemsize, n_threads)
        paths = _engine.conv2d_paths(x_shape, w_shape, params, x.itemsize)
        calls = {"forward": lambda: _engine.conv2d_forward(x, w, None, np.empty(geom.out_shape, dtype), params,
                                                           n_threads),
                 "grad_input": lambda: _engine.conv2d_grad_input(dy, w, np.empty_like(x), params, n_threads),
                 "grad_weight": lambda: _engine.conv2d_grad_weight(dy, x, np.empty_like(w),
                                                                   np.empty(w_shape[0], dtype), params, n_threads)}
        for direction, call in calls.items():
            _engine.count_allocated_bytes(True)
            try:
                call()
                misaligned = _engine.misaligned_allocations()
            finally:
                held = _engine.count_allocated_bytes(False)
            assert held == report[direction], (direction, paths[direction], dtype.__name__, x_shape, w_shape,
                                               n_threads, held, report[direction])
            if sys.platform != "win32":     # no posix_memalign there: plain malloc
                assert misaligned == 0, (direction, paths[direction], dtype.__name__, x_shape, misaligned)
            covered[direction].add(paths[direction].split(" 3x3")[0])
    for direction, want in SCRATCH_PATHS.items():
        if convengine.build_info()["simd"] != "avx512" and direction == "grad_input":
            want = want - {"lanes", "transposed pixels"}     # the narrower builds take other paths there
        assert want <= covered[direction], (direction, want - covered[direction])


def dw_small_expected(kernel):
    """The path conv2d_paths should report for a whole-plane case in this build."""
    return kernel if convengine.build_info()["simd"] == "avx512" else "depthwise"


@pytest.mark.parametrize("x_shape,stride,kernel", DW_SMALL_CASES, ids=DW_SMALL_IDS)
def test_depthwise_whole_plane_kernels_need_no_scratch(rng, x_shape, stride, kernel):
    """The whole-plane kernels read x and write y directly: with every scratch allocation failing they still run
    (forward, grad_weight, and grad_input at stride 2; at stride 1 it reverses the taps into one buffer), and the
    scratch report says so."""
    if dw_small_expected(kernel) == "depthwise":
        pytest.skip("the whole-plane kernels are AVX-512 builds' only")
    C = x_shape[1]
    x, w = randn(rng, x_shape, np.float32), randn(rng, (C, 1, 3, 3), np.float32)
    geom = _args.conv2d_args(x, w, None, stride, 1, 1, C)
    params = F._conv_params(geom)
    go = randn(rng, geom.out_shape, np.float32)
    report = _engine.conv2d_scratch_bytes(x.shape, w.shape, params, 4, 2)
    assert report["forward"] == report["grad_weight"] == 0
    assert report["grad_input"] == (0 if stride == 2 else C * 9 * 4)
    want_y = F.conv2d(x, w, None, stride=stride, padding=1, groups=C)
    want = F.conv2d_backward(go, x, w, stride=stride, padding=1, groups=C)
    previous = _engine.fail_allocation_after(0)
    try:
        y = np.empty(geom.out_shape, np.float32)
        _engine.conv2d_forward(x, w, None, y, params, 1)
        gw, gb = np.empty_like(w), np.empty(C, np.float32)
        _engine.conv2d_grad_weight(go, x, gw, gb, params, 1)
        if stride == 2:
            gx = np.empty_like(x)
            _engine.conv2d_grad_input(go, w, gx, params, 1)
    finally:
        _engine.fail_allocation_after(previous)
    assert_bitwise_equal(y, want_y)
    assert_bitwise_equal(gw, want[1])
    if stride == 2:
        assert_bitwise_equal(gx, want[0])


def dw_forward(x, w, b, stride, relu, scale, shift, padding=1):
    """The engine's conv2d forward with an epilogue (as fused and frozen models call it), 1 thread."""
    geom = _args.conv2d_args(x, w, b, stride, padding, 1, x.shape[1])
    out = np.full(geom.out_shape, np.nan, x.dtype)
    _engine.conv2d_forward(x, w, b, out, F._conv_params(geom), 1, relu, scale, shift)
    return out


@pytest.mark.parametrize("relu,affine", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "relu", "affine", "relu-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape,stride,kernel", DW_SMALL_CASES, ids=DW_SMALL_IDS)
def test_depthwise_whole_plane_kernels(rng, x_shape, stride, kernel, bias, relu, affine):
    C = x_shape[1]
    x, w = randn(rng, x_shape, np.float32), randn(rng, (C, 1, 3, 3), np.float32)
    b = randn(rng, C, np.float32) if bias else None
    sc, sh = (randn(rng, C, np.float32) if affine else None for _ in range(2))
    paths = conv_paths(x, w, dict(stride=stride, padding=1, groups=C))
    assert paths["forward"] == dw_small_expected(kernel)
    want = R.conv2d(x, w, b, stride=stride, padding=1, groups=C)
    if relu:
        want = R.relu(want)
    if affine:
        want = want * sc[:, None, None] + sh[:, None, None]
    assert_close(dw_forward(x, w, b, stride, relu, sc, sh), want, f"{kernel} {x_shape} relu={relu} affine={affine}")
    if not relu and not affine:
        # backward: grad_weight on the same kernels' geometry, grad_input at stride 2 too (stride 1: transposed)
        assert paths["grad_weight"] == dw_small_expected(kernel)
        if stride == 1:
            assert paths["grad_input"] == "transposed " + dw_small_expected(kernel)
        else:
            assert paths["grad_input"] == dw_small_expected(kernel)
        check_conv2d(x, w, b, randn(rng, want.shape, np.float32), stride=stride, padding=1, groups=C)


def dw_small_grad_weight_order(go, x, stride):
    """(grad_weight, grad_bias) of a 3x3 pad-1 depthwise conv summed in the whole-plane kernels' order
    (depthwise.h), float32 rounding emulated step by step: per channel and tap 16 lanes, lane j holding the output
    pixels (oh, ow) with (oh % R) * OW + ow == j (R = 16 // OW output rows per vector), added as fma(dY, input,
    lane) image by image, vector by vector (oh // R) from zero; then ((0 + lane 0) + lane 1) + ... + lane 15.
    The bias the same with plain adds of dY. fma is a float64 product (exact for float32 operands) plus the
    lane, rounded to float32 (a double rounding that differs from fma's single one about once in 2**29)."""
    B, C, H, W = x.shape
    OH, OW = go.shape[2:]
    R = 16 // OW
    nvec = -(-OH // R)
    lane = np.arange(16)
    xp = np.zeros((B, C, nvec * R * stride + 3, W + 2), np.float32)
    xp[:, :, 1:H + 1, 1:W + 1] = x
    lw = np.zeros((C, 9, 16), np.float32)
    lb = np.zeros((C, 16), np.float32)
    for b in range(B):
        for v in range(nvec):
            oh, ow = v * R + lane // OW, lane % OW
            live = oh < OH
            g = go[b][:, np.minimum(oh, OH - 1), ow]                              # (C, 16)
            for k in range(9):
                op = xp[b][:, oh * stride + k // 3, ow * stride + k % 3]
                fma = (g.astype(np.float64) * op + lw[:, k]).astype(np.float32)
                lw[:, k] = np.where(live, fma, lw[:, k])
            lb = np.where(live, lb + g, lb)
    dw, db = np.zeros((C, 9), np.float32), np.zeros(C, np.float32)
    for j in range(16):
        dw, db = dw + lw[..., j], db + lb[..., j]
    return dw.reshape(C, 1, 3, 3), db


@pytest.mark.parametrize("x_shape,stride,kernel", DW_SMALL_CASES, ids=DW_SMALL_IDS)
def test_depthwise_whole_plane_grad_weight_order(rng, x_shape, stride, kernel):
    """The whole-plane kernels' grad_weight sums in its own fixed order, not the general path's (so its bits
    differ from that path's by rounding): bitwise the emulation of that order, grad_bias included (which is
    grad_bias's usual order); every call, fused or plain, 1 thread or several, gives these bits. Batch 1 and
    several images, odd heights (a half-empty last vector, whose lanes past the plane are masked off: with inf in
    x's last row a product there with the zero dY would make NaN)."""
    if convengine.build_info()["simd"] != "avx512":
        pytest.skip("the whole-plane kernels are AVX-512 only; other builds sum in the general path's order")
    C = x_shape[1]
    x, w = randn(rng, x_shape, np.float32), randn(rng, (C, 1, 3, 3), np.float32)
    go = randn(rng, R.conv2d(x, w, stride=stride, padding=1, groups=C).shape, np.float32)
    _, got_w, got_b = F.conv2d_backward(go, x, w, stride=stride, padding=1, groups=C, need_input_grad=False)
    want_w, want_b = dw_small_grad_weight_order(go, x, stride)
    assert_bitwise_equal(got_w, want_w, f"{kernel} {x_shape} grad_weight")
    assert_bitwise_equal(got_b, want_b, f"{kernel} {x_shape} grad_bias")
    # x's last row inf: the top taps (kh = 0) read it only at output rows past the plane (the masked lanes of a
    # half-empty last vector), so they stay finite and keep their bits
    x[:, :, -1, :] = np.inf
    _, got_w, _ = F.conv2d_backward(go, x, w, stride=stride, padding=1, groups=C, need_input_grad=False)
    with np.errstate(invalid="ignore"):
        want_w, _ = dw_small_grad_weight_order(go, x, stride)
    assert np.isfinite(want_w[:, :, 0]).all()
    assert_bitwise_equal(got_w[:, :, 0], want_w[:, :, 0], f"{kernel} {x_shape} kh=0 taps, inf in x's last row")


# The general depthwise paths compute w * x + sum in C and rely on gcc contracting it into one FMA, as it does at -O2
# and above (the release build, -O3): there the whole-plane kernels (explicit FMAs) agree with them bit for bit. The
# debug and sanitizer builds (-O1) round the product and the sum apart, so there they agree to rounding only.
GENERAL_PATHS_FUSE = re.search(r"(^|\s)-O[01](\s|$)", convengine.build_info()["cflags"]) is None


def assert_same_as_general_path(got, want, message):
    if GENERAL_PATHS_FUSE:
        assert_bitwise_equal(got, want, message)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=message)


@pytest.mark.parametrize("x_shape,stride,kernel", [c for c in DW_SMALL_CASES if c[1] == 2],
                         ids=[i for i, c in zip(DW_SMALL_IDS, DW_SMALL_CASES) if c[1] == 2])
def test_depthwise_whole_plane_grad_input_matches_the_phased_path_bitwise(rng, x_shape, stride, kernel):
    """The stride-2 whole-plane grad_input adds the phased path's products in its order (depthwise.h): bitwise
    equal, signed zeros, infinities and NaN included. The phased path is reached by one more input column (width
    17, 9 output columns): dY's extra column zero, it adds only zero products, and dx's extra column is dropped."""
    C = x_shape[1]
    x, w = randn(rng, x_shape, np.float32), randn(rng, (C, 1, 3, 3), np.float32)
    w[0, 0, 1, 1] = -0.0
    go = randn(rng, R.conv2d(x, w, stride=2, padding=1, groups=C).shape, np.float32)
    go[..., 0, :3] = -0.0
    if go.size > 40:
        go.reshape(-1)[[5, 17, 33]] = [np.inf, -np.inf, np.nan]
    wide = np.concatenate([x, np.zeros(x.shape[:3] + (1,), np.float32)], axis=3)
    go_wide = np.concatenate([go, np.zeros(go.shape[:3] + (1,), np.float32)], axis=3)
    assert conv_paths(wide, w, dict(stride=2, padding=1, groups=C))["grad_input"] == "depthwise"
    got = F.conv2d_backward(go, x, w, stride=2, padding=1, groups=C)[0]
    want = F.conv2d_backward(go_wide, wide, w, stride=2, padding=1, groups=C)[0][..., :16]
    assert_same_as_general_path(got, want, f"{kernel} {x_shape} grad_input")


@pytest.mark.parametrize("x_shape,stride,kernel", DW_SMALL_CASES, ids=DW_SMALL_IDS)
def test_depthwise_whole_plane_kernels_match_the_sweep_bitwise(rng, x_shape, stride, kernel):
    """The whole-plane kernels add the same products in the same order as the general sweep, padding taps
    included, so they agree bit for bit (fused, frozen and plain calls stay bitwise equal to each other): the
    general sweep is reached by one more zero column on the right (width 9 or 17, whose extra output column is
    dropped). Inputs hold signed zeros, infinities and NaN."""
    C = x_shape[1]
    x, w = randn(rng, x_shape, np.float32), randn(rng, (C, 1, 3, 3), np.float32)
    b, sc, sh = (randn(rng, C, np.float32) for _ in range(3))
    x[..., 0, :3] = -0.0
    w[0, 0, 1, 1] = -0.0
    if x.size > 40:
        x.reshape(-1)[[5, 17, 33]] = [np.inf, -np.inf, np.nan]
    wide = np.concatenate([x, np.zeros(x.shape[:3] + (1,), np.float32)], axis=3)
    assert conv_paths(wide, w, dict(stride=stride, padding=1, groups=C))["forward"] == "depthwise"
    for relu, scale, shift in [(False, None, None), (True, None, None), (True, sc, sh)]:
        got = dw_forward(x, w, b, stride, relu, scale, shift)
        want = dw_forward(wide, w, b, stride, relu, scale, shift)[..., :got.shape[3]]
        assert_same_as_general_path(got, want, f"{kernel} {x_shape} relu={relu}")
        if not GENERAL_PATHS_FUSE:
            continue
        number = ~np.isnan(want)
        np.testing.assert_array_equal(np.signbit(got[number]), np.signbit(want[number]),
                                      err_msg=f"{kernel} signed zeros")


@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d_backward_skips_the_bias_gradient_of_a_conv_without_bias(rng, groups):
    """A Conv2d without bias does not pay grad_bias's pass over grad_out (functional._conv2d_backward with
    need_bias_grad=False): None for it, and the other gradients bit for bit those of conv2d_backward."""
    x = randn(rng, (5, 8, 9, 9), np.float32)
    w = randn(rng, (16, 8 // groups, 3, 3), np.float32)
    go = randn(rng, (5, 16, 9, 9), np.float32)
    want = F.conv2d_backward(go, x, w, padding=1, groups=groups)
    got = F._conv2d_backward(go, x, w, padding=1, groups=groups, need_bias_grad=False)
    assert got[2] is None
    assert_bitwise_equal(got[0], want[0], "grad_x")
    assert_bitwise_equal(got[1], want[1], "grad_w")
    layer = convengine.layers.Conv2d(8, 16, 3, padding=1, groups=groups, bias=False)
    layer.weight.data[...] = w
    layer.forward(x, training=True)
    layer.weight.grad[...] = 0
    assert_bitwise_equal(layer.backward(go), want[0], "layer grad_x")
    assert_bitwise_equal(layer.weight.grad, want[1], "layer grad_w")
    with pytest.raises(ValueError, match="one value per output channel"):
        _engine.conv2d_grad_weight(go, x, np.empty_like(w), np.empty(3, np.float32),
                                   (1, 1, 1, 1, 1, 1, groups, 9, 9), 1)
