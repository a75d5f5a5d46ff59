"""Property fuzzing: the compiled engine against the NumPy reference on drawn shapes, parameters, values and memory
layouts, and clean refusals of drawn invalid arguments.

Valid draws cover every op forward and backward in float32 and float64, including the degenerate geometries that
break index arithmetic: 1-pixel images, a kernel exactly as large as the padded input, strides larger than the
kernel, groups equal to the channels, empty batches, images with no pixels but padding, NaN and infinities, ties.
Arrays arrive in any layout the contract accepts: non-contiguous, negative strides, read-only, Fortran order,
misaligned, and views into structured arrays (strides that are not a multiple of the item size).

Invalid draws corrupt one argument of a valid call and expect ValueError or TypeError whose message names that
argument, from both tiers alike.

Profiles: by default each test draws the examples of the loaded hypothesis profile (conftest's "ci", a few dozen);
CONVENGINE_FUZZ_LONG=1 (or HYPOTHESIS_PROFILE=long) draws 10,000 examples per test (CONVENGINE_FUZZ_EXAMPLES=n to
choose another number). See tests/README.md. Counterexamples hypothesis found stay below as @example cases.
"""
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st

from convengine import _args
from convengine import functional as F
from convengine import reference as R
from convengine._kernels import engine as _engine

from conftest import as_layout, assert_close
from test_functional import assert_grad_input_by_phases, assert_grad_weight_by_pixels

LONG = os.environ.get("CONVENGINE_FUZZ_LONG") == "1" or os.environ.get("HYPOTHESIS_PROFILE") == "long"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
if LONG:
    fuzz = settings(max_examples=int(os.environ.get("CONVENGINE_FUZZ_EXAMPLES", "10000")), deadline=None,
                    suppress_health_check=_SUPPRESS)
else:
    fuzz = settings(deadline=None, suppress_health_check=_SUPPRESS)

DTYPES = [np.float32, np.float64]

# NaN and infinities drawn on purpose make the reference's NumPy expressions warn.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# ---------------------------------------------------------------------------------------------------------------
# Values and layouts
# ---------------------------------------------------------------------------------------------------------------

# Memory layouts an array argument may arrive in. Module-level so that a one-off run can narrow it.
ARRAY_LAYOUTS = ["contiguous", "noncontiguous", "negative_stride", "readonly", "fortran", "misaligned", "field"]


def in_layout(a, layout):
    """The values of `a` held in the named memory layout (always an ndarray, whatever a's rank)."""
    a = np.asarray(a)
    if layout == "contiguous" or a.ndim == 0 and layout not in ("readonly", "misaligned", "field"):
        return np.array(a, order="C")  # not ascontiguousarray, which turns a 0-d array into a 1-d one
    if layout == "misaligned":
        # C-contiguous but one byte off the dtype's alignment.
        buf = np.empty(a.nbytes + 1, dtype=np.uint8)[1:]
        b = buf.view(a.dtype).reshape(a.shape)
        b[...] = a
        assert not b.flags.aligned or a.size == 0
        return b
    if layout == "field":
        # One field of a packed record: strides of itemsize + 1 bytes, misaligned.
        rec = np.zeros(a.shape, dtype=np.dtype([("tag", np.uint8), ("value", a.dtype)]))
        rec["value"] = a
        return rec["value"]
    return as_layout(a, layout)


@st.composite
def arrays(draw, shape, dtype, values=None, layout=None):
    """An array of `shape` and `dtype` in a drawn layout. values: 'normal', 'ties' (small integers, so maxima tie
    and sums are exact) or 'special' (normal with NaN, +-inf and -0.0 sprinkled in)."""
    values = values or draw(st.sampled_from(["normal", "normal", "ties", "special"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if values == "ties":
        a = rng.integers(-2, 3, size=shape).astype(dtype)
    else:
        a = rng.standard_normal(shape).astype(dtype)
    if values == "special" and a.size:
        k = draw(st.integers(1, max(1, a.size // 4)))
        where = rng.integers(0, a.size, size=k)
        a.reshape(-1)[where] = rng.choice(np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype), size=k)
    layout = layout or draw(st.sampled_from(ARRAY_LAYOUTS))
    return in_layout(a, layout)


def describe(**arrays_):
    """One line per array: shape, dtype, strides, flags (for the falsifying example's notes)."""
    for name, a in arrays_.items():
        if isinstance(a, np.ndarray):
            note(f"{name}: {a.dtype}{a.shape} strides {a.strides} C={a.flags.c_contiguous} "
                 f"aligned={a.flags.aligned} writeable={a.flags.writeable}")


def assert_exact(actual, expected, what):
    """Same dtype and shape, equal values, NaN in the same places (picked, not computed, values)."""
    assert isinstance(actual, np.ndarray), what
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}"
    np.testing.assert_array_equal(actual, expected, err_msg=what)


# ---------------------------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------------------------

def pair_or_int(a, b):
    return a if a == b else (a, b)


@st.composite
def conv_geometries(draw):
    """(x shape, weight shape, params) of a valid conv2d, of a drawn kind: general, or one of the degenerate
    geometries."""
    kind = draw(st.sampled_from(["general", "one_pixel", "kernel_fills_input", "depthwise", "stride_gt_kernel",
                                 "same"]))
    groups = draw(st.integers(1, 4))
    cg = 1 if kind == "depthwise" else draw(st.integers(1, 3))
    kg = draw(st.integers(1, 3))
    C, K = groups * cg, groups * kg
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # the dilated kernel's extent
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if kind == "stride_gt_kernel":
        sh, sw = span_h + draw(st.integers(1, 3)), span_w + draw(st.integers(1, 3))
    if kind == "same":
        padding = "same"
    elif kind in ("general", "depthwise", "stride_gt_kernel"):
        padding = draw(st.one_of(st.just("valid"), st.tuples(st.integers(0, 3), st.integers(0, 3))))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    ph, pw = (0, 0) if isinstance(padding, str) else padding
    if kind == "one_pixel":
        # A 1x1 image: the padding must reach the dilated kernel's extent, 1 + 2p >= span.
        ph, pw = max(ph, span_h // 2), max(pw, span_w // 2)
        padding = (ph, pw)
        H = W = 1
    elif kind == "kernel_fills_input":
        # The padded input is exactly the dilated kernel: one output pixel per image.
        ph, pw = min(ph, (span_h - 1) // 2), min(pw, (span_w - 1) // 2)
        padding = (ph, pw)
        H, W = span_h - 2 * ph, span_w - 2 * pw
    elif padding == "same":
        H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    else:
        min_h, min_w = max(1, span_h - 2 * ph), max(1, span_w - 2 * pw)
        H, W = draw(st.integers(min_h, min_h + 9)), draw(st.integers(min_w, min_w + 9))
    if not isinstance(padding, str):
        padding = draw(st.sampled_from([padding, pair_or_int(*padding)]))
    B = draw(st.integers(0, 3))
    params = dict(stride=pair_or_int(sh, sw), padding=padding, dilation=pair_or_int(dh, dw), groups=groups)
    return (B, C, H, W), (K, cg, kh, kw), params


@fuzz
@given(geometry=conv_geometries(), dtype=st.sampled_from(DTYPES), bias=st.booleans(), need_input_grad=st.booleans(),
       data=st.data())
@example(geometry=((1, 1, 1, 1), (1, 1, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
         dtype=np.float32, bias=True, need_input_grad=True, data=None)
@example(geometry=((2, 4, 5, 5), (4, 1, 5, 5), dict(stride=7, padding=0, dilation=1, groups=4)),
         dtype=np.float64, bias=False, need_input_grad=True, data=None)
# a stride-2 depthwise conv over 1-pixel rows without padding: its column phases read past the plane on the
# baseline build (found by test_model_fuzz.py under the sanitizers)
@example(geometry=((2, 3, 5, 1), (3, 1, 3, 1), dict(stride=2, padding=0, dilation=1, groups=3)),
         dtype=np.float64, bias=True, need_input_grad=True, data=None)
def test_conv2d_matches_reference(geometry, dtype, bias, need_input_grad, data):
    x_shape, w_shape, params = geometry
    if data is None:  # an explicit example: fixed normal values, contiguous
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
        go_layout = "contiguous"
    else:
        x = data.draw(arrays(x_shape, dtype), "x")
        w = data.draw(arrays(w_shape, dtype, values="normal"), "weight")
        b = data.draw(arrays((w_shape[0],), dtype, values="normal"), "bias") if bias else None
        go_layout = data.draw(st.sampled_from(ARRAY_LAYOUTS), "grad_out layout")
    describe(x=x, weight=w, bias=b)
    y = F.conv2d(x, w, b, **params)
    # The reference sees plain contiguous copies: whatever the layout did to the values, both tiers read the same.
    xc, wc = np.array(x), np.array(w)
    bc = None if b is None else np.array(b)
    assert_close(y, R.conv2d(xc, wc, bc, **params), "conv2d y")
    go = in_layout(np.random.default_rng(1).standard_normal(y.shape).astype(dtype), go_layout)
    gx, gw, gb = F.conv2d_backward(go, x, w, need_input_grad=need_input_grad, **params)
    rgx, rgw, rgb = R.conv2d_backward(np.array(go), xc, wc, need_input_grad=need_input_grad, **params)
    if need_input_grad:
        assert_close(gx, rgx, "conv2d grad_x")
    else:
        assert gx is None
    assert_close(gw, rgw, "conv2d grad_weight")
    assert_close(gb, rgb, "conv2d grad_bias")


@st.composite
def stride_two_geometries(draw):
    """(x shape, w shape, padding, groups) of a float32 stride-2 conv whose grad_input goes by phases: 6 to 24
    input channels per group (the MR-row tile mostly used), phase rows short (four phase convs) or of 12 pixels
    or more (read in place), batches that make tasks of several images at 1 thread. conv_geometries' few
    channels never reach that path."""
    groups = draw(st.integers(1, 2))
    cg, kg = draw(st.integers(6, 24)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    H = draw(st.integers(max(2, kh - 2 * ph), 14))
    W = draw(st.one_of(st.integers(max(2, kw - 2 * pw), 22), st.integers(23, 50)))
    return (draw(st.integers(1, 9)), groups * cg, H, W), (groups * kg, cg, kh, kw), (ph, pw), groups


@fuzz
@given(geometry=stride_two_geometries(), seed=st.integers(0, 2 ** 32 - 1))
def test_stride_two_grad_input_by_phases_matches_reference_on_any_thread_count(geometry, seed):
    """The phases path of grad_input (both routes) on drawn geometries: the float64 reference's gradient, and the
    same bits on 1, 2 and 3 threads (tasks of several images at 1 thread, of one above)."""
    x_shape, w_shape, padding, groups = geometry
    note(f"x {x_shape}, w {w_shape}, padding {padding}, groups {groups}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    geom = _args.conv2d_args(x, w, None, stride=2, padding=padding, dilation=1, groups=groups)
    params = F._conv_params(geom)
    assume(_engine.conv2d_paths(x_shape, w_shape, params, 4)["grad_input"] == "phases")
    event("rows of 23 pixels or more" if x_shape[3] >= 23 else "rows of 22 pixels or fewer")
    assert_grad_input_by_phases(x, w, rng.standard_normal(geom.out_shape).astype(np.float32), params, padding,
                                groups, "grad_input by phases")


@st.composite
def pixel_path_geometries(draw):
    """(x shape, w shape, stride, padding, groups) of a conv whose grad_weight goes by the pixel path: 8 to 72
    input channels per group and 5 to 40 output channels (both tiles mostly used), kernels 1-5 at stride 1 or 2,
    images from a few pixels (several units per step: dY copied) to 40 (one unit per step: dY read in place, and
    steps longer than one k block). conv_geometries' few channels never reach it."""
    groups = draw(st.integers(1, 2))
    cg, kg = draw(st.integers(8, 72)), draw(st.integers(5, 40))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    H = draw(st.integers(max(1, kh - 2 * ph), 40))
    W = draw(st.integers(max(1, kw - 2 * pw), 40))
    return (draw(st.integers(1, 6)), groups * cg, H, W), (groups * kg, cg, kh, kw), stride, (ph, pw), groups


@fuzz
@given(geometry=pixel_path_geometries(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_grad_weight_by_pixels_matches_reference_on_any_thread_count(geometry, dtype, seed):
    """grad_weight's pixel path on drawn geometries, with grad_bias summed chunk by chunk as dY is read: the
    float64 reference's gradients, and the same bits on 1, 2 and 3 threads."""
    x_shape, w_shape, stride, padding, groups = geometry
    note(f"x {x_shape}, w {w_shape}, stride {stride}, padding {padding}, groups {groups}, {dtype.__name__}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    geom = _args.conv2d_args(x, np.empty(w_shape, dtype), None, stride=stride, padding=padding, dilation=1,
                             groups=groups)
    params = F._conv_params(geom)
    assume(_engine.conv2d_paths(x_shape, w_shape, params, x.itemsize)["grad_weight"] == "pixels")
    # a unit is R output rows (pixel_rows), a step 256 // (R * OW) units (units_per_task): one reads dY in place
    most = max(1, min(geom.out_h, 256 // geom.out_w))
    rows = -(-geom.out_h // -(-geom.out_h // most))
    event("one unit per step: dY read in place" if 256 // (rows * geom.out_w) <= 1 else "several units: dY copied")
    assert_grad_weight_by_pixels(x, w_shape, rng.standard_normal(geom.out_shape).astype(dtype), params, stride,
                                 padding, groups, "grad_weight by pixels")


# ---------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def pool_geometries(draw):
    """(x shape, params) of a valid pooling call, general or degenerate."""
    kind = draw(st.sampled_from(["general", "one_pixel", "kernel_fills_input", "stride_gt_kernel"]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    if kind == "stride_gt_kernel":
        stride = (kh + draw(st.integers(1, 3)), kw + draw(st.integers(1, 3)))
    else:
        stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    if kind == "one_pixel":
        # 1 + 2p >= k and 2p <= k: the padding is half the kernel.
        ph, pw = kh // 2, kw // 2
        H = W = 1
    elif kind == "kernel_fills_input":
        ph, pw = min(ph, (kh - 1) // 2), min(pw, (kw - 1) // 2)
        H, W = kh - 2 * ph, kw - 2 * pw
    else:
        # Images without pixels (H or W = 0) are test_images_without_pixels' business.
        min_h, min_w = max(1, kh - 2 * ph), max(1, kw - 2 * pw)
        H, W = draw(st.integers(min_h, min_h + 9)), draw(st.integers(min_w, min_w + 9))
    x_shape = (draw(st.integers(0, 3)), draw(st.integers(1, 4)), H, W)
    params = dict(kernel_size=draw(st.sampled_from([(kh, kw), pair_or_int(kh, kw)])),
                  stride=None if stride is None else pair_or_int(*stride),
                  padding=pair_or_int(ph, pw), ceil_mode=draw(st.booleans()))
    return x_shape, params


@fuzz
@given(geometry=pool_geometries(), dtype=st.sampled_from(DTYPES), data=st.data())
@example(geometry=((1, 1, 1, 1), dict(kernel_size=3, stride=None, padding=1, ceil_mode=True)), dtype=np.float32,
         data=None)
def test_max_pool2d_matches_reference(geometry, dtype, data):
    x_shape, params = geometry
    if data is None:
        x, go_layout = np.random.default_rng(0).standard_normal(x_shape).astype(dtype), "contiguous"
    else:
        x = data.draw(arrays(x_shape, dtype), "x")
        go_layout = data.draw(st.sampled_from(ARRAY_LAYOUTS), "grad_out layout")
    describe(x=x)
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    ry, ridx = R.max_pool2d(np.array(x), return_indices=True, **params)
    # Max pooling picks values: exact agreement, indices (ties, NaN) included.
    assert_exact(y, ry, "max_pool2d y")
    assert_exact(idx, ridx, "max_pool2d indices")
    assert_exact(F.max_pool2d(x, **params), ry, "max_pool2d y without indices")
    go = in_layout(np.random.default_rng(1).standard_normal(y.shape).astype(dtype), go_layout)
    idx_in = in_layout(idx, data.draw(st.sampled_from(ARRAY_LAYOUTS), "indices layout") if data else "contiguous")
    describe(grad_out=go, indices=idx_in)
    assert_close(F.max_pool2d_backward(go, idx_in, x.shape), R.max_pool2d_backward(np.array(go), ridx, x.shape),
                 "max_pool2d grad_x")


@fuzz
@given(geometry=pool_geometries(), dtype=st.sampled_from(DTYPES), count_include_pad=st.booleans(), data=st.data())
def test_avg_pool2d_matches_reference(geometry, dtype, count_include_pad, data):
    x_shape, params = geometry
    params = dict(params, count_include_pad=count_include_pad)
    x = data.draw(arrays(x_shape, dtype), "x")
    describe(x=x)
    y = F.avg_pool2d(x, **params)
    assert_close(y, R.avg_pool2d(np.array(x), **params), "avg_pool2d y")
    go = data.draw(arrays(y.shape, dtype), "grad_out")
    describe(grad_out=go)
    assert_close(F.avg_pool2d_backward(go, x.shape, **params),
                 R.avg_pool2d_backward(np.array(go), x.shape, **params), "avg_pool2d grad_x")


# ---------------------------------------------------------------------------------------------------------------
# relu and linear
# ---------------------------------------------------------------------------------------------------------------

@fuzz
@given(shape=st.lists(st.integers(0, 7), min_size=0, max_size=5).map(tuple), dtype=st.sampled_from(DTYPES),
       data=st.data())
def test_relu_matches_reference(shape, dtype, data):
    x = data.draw(arrays(shape, dtype), "x")
    go = data.draw(arrays(shape, dtype), "grad_out")
    describe(x=x, grad_out=go)
    assert_exact(F.relu(x), R.relu(np.array(x)), "relu y")
    assert_exact(F.relu_backward(go, x), R.relu_backward(np.array(go), np.array(x)), "relu grad_x")


@st.composite
def linear_shapes(draw):
    """(N, in_features, out_features): mostly small, sometimes past the GEMM's block sizes (rows, columns, depth)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.integers(0, 200)), draw(st.integers(0, 600)), draw(st.integers(0, 120))
    return draw(st.integers(0, 6)), draw(st.integers(0, 40)), draw(st.integers(0, 30))


@fuzz
@given(shape=linear_shapes(), dtype=st.sampled_from(DTYPES), bias=st.booleans(), data=st.data())
def test_linear_matches_reference(shape, dtype, bias, data):
    n, fin, fout = shape
    x = data.draw(arrays((n, fin), dtype), "x")
    w = data.draw(arrays((fout, fin), dtype, values="normal"), "weight")
    b = data.draw(arrays((fout,), dtype, values="normal"), "bias") if bias else None
    go = data.draw(arrays((n, fout), dtype, values="normal"), "grad_out")
    describe(x=x, weight=w, bias=b, grad_out=go)
    xc, wc, goc = np.array(x), np.array(w), np.array(go)
    assert_close(F.linear(x, w, b), R.linear(xc, wc, None if b is None else np.array(b)), "linear y")
    got = F.linear_backward(go, x, w)
    want = R.linear_backward(goc, xc, wc)
    for name, g, r in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert_close(g, r, f"linear {name}")


# Strides that are not a multiple of the item size (a field of a packed record) are legal NumPy. The fuzz above
# found linear reading such arrays at the wrong addresses; this is that counterexample, kept explicit.
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_linear_field_view_operands(dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, (3, 4)).astype(dtype)
    w = rng.integers(-3, 4, (2, 4)).astype(dtype)
    go = rng.integers(-3, 4, (3, 2)).astype(dtype)
    xf, wf, gof = in_layout(x, "field"), in_layout(w, "field"), in_layout(go, "field")
    assert xf.strides[1] % xf.itemsize != 0
    np.testing.assert_array_equal(F.linear(xf, w), x @ w.T)
    np.testing.assert_array_equal(F.linear(x, wf), x @ w.T)
    gx, gw, gb = F.linear_backward(gof, xf, wf)
    np.testing.assert_array_equal(gx, go @ w)
    np.testing.assert_array_equal(gw, go.T @ x)
    np.testing.assert_array_equal(gb, go.sum(axis=0))


# ---------------------------------------------------------------------------------------------------------------
# Arbitrary arguments: either both tiers accept and agree, or both refuse alike
# ---------------------------------------------------------------------------------------------------------------

def outcome(call):
    """('ok', result) or ('error', exception). Only ValueError and TypeError count as a clean refusal."""
    try:
        return "ok", call()
    except (ValueError, TypeError) as e:
        return "error", e


small_int_or_pair = st.one_of(st.integers(-1, 4), st.tuples(st.integers(-1, 4), st.integers(-1, 4)))


@fuzz
@given(x_shape=st.tuples(*[st.integers(0, 4)] * 4), w_shape=st.tuples(*[st.integers(0, 4)] * 4),
       stride=small_int_or_pair, padding=st.one_of(small_int_or_pair, st.sampled_from(["same", "valid"])),
       dilation=small_int_or_pair, groups=st.integers(-1, 4), bias=st.booleans(), dtype=st.sampled_from(DTYPES))
@example(x_shape=(1, 0, 3, 3), w_shape=(2, 0, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=True,
         dtype=np.float64)
@example(x_shape=(1, 1, 0, 3), w_shape=(1, 1, 1, 1), stride=1, padding=1, dilation=1, groups=1, bias=False,
         dtype=np.float32)
def test_conv2d_arbitrary_shapes_agree_or_refuse(x_shape, w_shape, stride, padding, dilation, groups, bias, dtype):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    kind, want = outcome(lambda: R.conv2d(x, w, b, **params))
    got_kind, got = outcome(lambda: F.conv2d(x, w, b, **params))
    assert got_kind == kind, f"reference: {want!r}, engine: {got!r}"
    if kind == "error":
        assert type(got) is type(want) and str(got) == str(want)
        return
    assert_close(got, want, "conv2d y")
    go = rng.standard_normal(want.shape).astype(dtype)
    for g, r, name in zip(F.conv2d_backward(go, x, w, **params), R.conv2d_backward(go, x, w, **params),
                          ("grad_x", "grad_weight", "grad_bias")):
        assert_close(g, r, f"conv2d {name}")


@fuzz
@given(x_shape=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 5), st.integers(1, 5)),
       kernel_size=small_int_or_pair,
       stride=st.one_of(st.none(), small_int_or_pair), padding=small_int_or_pair, ceil_mode=st.booleans(),
       count_include_pad=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_pools_arbitrary_shapes_agree_or_refuse(x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                                 dtype):
    x = np.random.default_rng(0).standard_normal(x_shape).astype(dtype)
    params = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    kind, want = outcome(lambda: R.max_pool2d(x, return_indices=True, **params))
    got_kind, got = outcome(lambda: F.max_pool2d(x, return_indices=True, **params))
    assert got_kind == kind, f"reference: {want!r}, engine: {got!r}"
    if kind == "ok":
        assert_exact(got[0], want[0], "max_pool2d y")
        assert_exact(got[1], want[1], "max_pool2d indices")
        go = np.ones(want[0].shape, dtype)
        assert_close(F.max_pool2d_backward(go, got[1], x_shape), R.max_pool2d_backward(go, want[1], x_shape),
                     "max_pool2d grad_x")
    else:
        assert type(got) is type(want) and str(got) == str(want)
    kind, want = outcome(lambda: R.avg_pool2d(x, count_include_pad=count_include_pad, **params))
    got_kind, got = outcome(lambda: F.avg_pool2d(x, count_include_pad=count_include_pad, **params))
    assert got_kind == kind, f"reference: {want!r}, engine: {got!r}"
    if kind == "ok":
        assert_close(got, want, "avg_pool2d y")
        go = np.ones(want.shape, dtype)
        assert_close(F.avg_pool2d_backward(go, x_shape, count_include_pad=count_include_pad, **params),
                     R.avg_pool2d_backward(go, x_shape, count_include_pad=count_include_pad, **params),
                     "avg_pool2d grad_x")
    else:
        assert type(got) is type(want) and str(got) == str(want)


# Zero input channels: hypothesis found the engine answering with uninitialised memory, and the bounds-checked
# build refusing with an IndexError where it took the address of x's first element. Either both tiers refuse it
# (ValueError) or each output is its bias.
@pytest.mark.parametrize("params", [dict(), dict(padding=1, stride=2), dict(groups=2)], ids=["plain", "pad-stride",
                                                                                            "groups"])
def test_conv2d_without_input_channels(params):
    x = np.ones((2, 0, 3, 3), np.float32)
    w = np.ones((4, 0, 3, 3), np.float32)
    b = np.arange(4, dtype=np.float32)
    kind, want = outcome(lambda: R.conv2d(x, w, b, **params))
    got_kind, y = outcome(lambda: F.conv2d(x, w, b, **params))
    assert got_kind == kind, f"reference: {want!r}, engine: {y!r}"
    if kind == "error":
        assert isinstance(y, ValueError) and str(y) == str(want) and "weight" in str(y)
        return
    assert_exact(y, want, "conv2d y")
    assert np.all(y == b[None, :, None, None])
    go = np.ones(y.shape, np.float32)
    for got, want, name in zip(F.conv2d_backward(go, x, w, **params), R.conv2d_backward(go, x, w, **params),
                               ("grad_x", "grad_weight", "grad_bias")):
        assert_exact(got, want, f"conv2d {name}")


# Images with no pixels (H or W = 0) but enough padding for a window: PyTorch refuses them. The engine may refuse
# them too (ValueError from both tiers) or compute them, but then consistently: both tiers agree and max_pool2d's
# backward accepts the indices its forward returned.
ZERO_PIXEL_CALLS = [
    ("max_pool2d", dict(kernel_size=2, padding=1)),
    ("max_pool2d", dict(kernel_size=2, padding=1, ceil_mode=True)),
    ("avg_pool2d", dict(kernel_size=2, padding=1, count_include_pad=True)),
    ("avg_pool2d", dict(kernel_size=2, padding=1, count_include_pad=False)),
    ("conv2d", dict(padding=1)),
]


@pytest.mark.parametrize("x_shape", [(1, 1, 0, 3), (2, 1, 3, 0)], ids=["H0", "W0"])
@pytest.mark.parametrize("op,params", ZERO_PIXEL_CALLS, ids=["max", "max-ceil", "avg-incpad", "avg-nopad", "conv"])
def test_images_without_pixels(op, params, x_shape):
    x = np.ones(x_shape)
    args = (x, np.ones((1, 1, 1, 1))) if op == "conv2d" else (x,)
    kind, want = outcome(lambda: getattr(R, op)(*args, **params))
    got_kind, got = outcome(lambda: getattr(F, op)(*args, **params))
    assert (got_kind, kind) in (("ok", "ok"), ("error", "error")), f"reference: {want!r}, engine: {got!r}"
    if kind == "error":
        assert isinstance(got, ValueError) and isinstance(want, ValueError)
        return
    assert_close(got, want, op)
    if op == "max_pool2d":
        for mod in (R, F):
            y, idx = mod.max_pool2d(x, return_indices=True, **params)
            grad_x = mod.max_pool2d_backward(np.ones_like(y), idx, x.shape)
            assert grad_x.shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Invalid arguments: one argument of a valid call corrupted
# ---------------------------------------------------------------------------------------------------------------

def not_an_int():
    """Values that are not an int (bool included, which Python counts as one)."""
    return st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(),
                     st.just(np.float64(2.0)), st.just(2 + 0j), st.just(b"2"), st.just([[1]]))


def bad_positive():
    """What an int >= 1 (stride, dilation, kernel_size, groups) must refuse."""
    return st.one_of(st.integers(max_value=0), not_an_int().filter(lambda v: v is not None),
                     st.lists(st.integers(1, 3), min_size=0, max_size=4).filter(lambda v: len(v) != 2).map(tuple),
                     st.tuples(st.integers(max_value=0), st.integers(1, 3)),
                     st.tuples(st.integers(1, 3), not_an_int()))


def bad_padding(strings):
    refused = st.text(max_size=6).filter(lambda s: s not in ("same", "valid")) if strings else st.text(max_size=6)
    return st.one_of(st.integers(max_value=-1), refused, st.floats(), st.booleans(), st.none(),
                     st.tuples(st.integers(0, 2), st.integers(max_value=-1)),
                     st.lists(st.integers(0, 2), min_size=3, max_size=4).map(tuple))


def bad_array(ndim, dtype, other_float=True, none=True):
    """Arrays of a wrong kind for a float `dtype` argument of rank ndim, and things that are not arrays. With
    other_float, also the other float dtype (wrong where the argument must match x's dtype); with none, None."""
    shape = (2,) * ndim
    other = np.float32 if dtype == np.float64 else np.float64
    bad = [np.ones(shape, np.int64), np.ones(shape, np.int32), np.ones(shape, np.float16),
           np.ones(shape, np.complex128), np.ones(shape, bool), np.ones(shape, object),
           np.ones((2,) * (ndim + 1), dtype), np.ones((2,) * max(ndim - 1, 0), dtype), np.ones(shape, dtype).tolist(),
           1.0, "x"]
    return st.sampled_from(bad + ([np.ones(shape, other)] if other_float else []) + ([None] if none else []))


def expect_refusal(name, call_reference, call_engine):
    """Both tiers raise ValueError/TypeError whose message names `name`, the same type from each."""
    errors = []
    for tier, call in (("reference", call_reference), ("engine", call_engine)):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), f"{tier}: {name} not named in {info.value!r}"
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]), f"reference {errors[0]!r} vs engine {errors[1]!r}"


CONV_ARGS = ["x", "weight", "bias", "grad_out", "stride", "padding", "dilation", "groups"]


@fuzz
@given(target=st.sampled_from(CONV_ARGS), backward=st.booleans(), dtype=st.sampled_from(DTYPES), data=st.data())
def test_conv2d_refuses_invalid_arguments(target, backward, dtype, data):
    x_shape, w_shape, params = data.draw(conv_geometries(), "valid geometry")
    x, w = np.ones(x_shape, dtype), np.ones(w_shape, dtype)
    b = np.ones(w_shape[0], dtype)
    go = np.ones(F.conv2d(x, w, **params).shape, dtype)
    args = dict(x=x, weight=w, bias=b, grad_out=go)
    if target in ("x", "weight", "grad_out"):
        args[target] = data.draw(bad_array(4, dtype), target)
    elif target == "bias":
        args["bias"] = data.draw(st.one_of(bad_array(1, dtype, none=False),
                                           st.sampled_from([np.ones(w_shape[0] + 1, dtype),
                                                            np.ones(0, dtype)])), "bias")
    elif target == "padding":
        params["padding"] = data.draw(bad_padding(strings=True), "padding")
    elif target == "groups":
        params["groups"] = data.draw(st.one_of(st.integers(max_value=0), not_an_int(),
                                               st.integers(1, 8).filter(lambda g: g != params["groups"])), "groups")
    else:
        params[target] = data.draw(bad_positive(), target)
    name = target  # another valid-looking group count does not fit the shapes: still named as groups
    if backward:
        assume(target != "bias")
        expect_refusal(name, lambda: R.conv2d_backward(args["grad_out"], args["x"], args["weight"], **params),
                       lambda: F.conv2d_backward(args["grad_out"], args["x"], args["weight"], **params))
    else:
        assume(target != "grad_out")
        expect_refusal(name, lambda: R.conv2d(args["x"], args["weight"], args["bias"], **params),
                       lambda: F.conv2d(args["x"], args["weight"], args["bias"], **params))


POOL_ARGS = ["x", "kernel_size", "stride", "padding", "ceil_mode", "grad_out", "indices", "input_shape"]


@fuzz
@given(target=st.sampled_from(POOL_ARGS), op=st.sampled_from(["max", "avg"]), dtype=st.sampled_from(DTYPES),
       data=st.data())
def test_pools_refuse_invalid_arguments(target, op, dtype, data):
    x_shape, params = data.draw(pool_geometries(), "valid geometry")
    assume(0 not in x_shape)
    x = np.ones(x_shape, dtype)
    y, idx = F.max_pool2d(x, return_indices=True, **params)
    go = np.ones(y.shape, dtype)
    input_shape = x_shape
    if target == "x":
        x = data.draw(bad_array(4, dtype, other_float=False), "x")
    elif target == "grad_out":
        go = data.draw(st.one_of(bad_array(4, dtype, other_float=False), st.just(np.ones(y.shape[:3] + (y.shape[3] + 1,), dtype))),
                       "grad_out")
    elif target == "indices":
        assume(op == "max")
        idx = data.draw(st.one_of(
            st.sampled_from([idx.astype(np.float64), idx.astype(bool), idx.tolist(), None, idx[..., :-1]]),
            st.sampled_from([-1, x_shape[2] * x_shape[3], 2 ** 40, -2 ** 62]).map(
                lambda v: np.where(np.arange(idx.size).reshape(idx.shape) == idx.size // 2, v, idx))), "indices")
    elif target == "input_shape":
        input_shape = data.draw(st.one_of(
            st.sampled_from([None, np.array(x_shape), x_shape[:3], x_shape + (1,), "x", 4]),
            st.tuples(*[st.just(s) for s in x_shape[:2]], st.integers(max_value=-1), st.just(x_shape[3])),
            st.just((x_shape[0], x_shape[1], float(x_shape[2]), x_shape[3]))), "input_shape")
    elif target == "padding":
        kh, kw = params["kernel_size"] if isinstance(params["kernel_size"], tuple) else (params["kernel_size"],) * 2
        params["padding"] = data.draw(st.one_of(bad_padding(strings=False),
                                                st.just(kh // 2 + 1) if kh == kw else st.just((kh // 2 + 1, 0))),
                                      "padding")
    elif target == "ceil_mode":
        params["ceil_mode"] = data.draw(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats()),
                                        "ceil_mode")
    else:
        params[target] = data.draw(bad_positive(), target)
    forward_args = ("x", "kernel_size", "stride", "padding", "ceil_mode")
    if op == "max" and target in forward_args:
        expect_refusal(target, lambda: R.max_pool2d(x, return_indices=True, **params),
                       lambda: F.max_pool2d(x, return_indices=True, **params))
    elif op == "max":
        expect_refusal(target, lambda: R.max_pool2d_backward(go, idx, input_shape),
                       lambda: F.max_pool2d_backward(go, idx, input_shape))
    elif target in forward_args:
        expect_refusal(target, lambda: R.avg_pool2d(x, **params), lambda: F.avg_pool2d(x, **params))
    if op == "avg" and target != "x":
        expect_refusal(target, lambda: R.avg_pool2d_backward(go, input_shape, **params),
                       lambda: F.avg_pool2d_backward(go, input_shape, **params))


@fuzz
@given(target=st.sampled_from(["x", "weight", "bias", "grad_out"]), shape=linear_shapes(),
       dtype=st.sampled_from(DTYPES), data=st.data())
def test_linear_and_relu_refuse_invalid_arguments(target, shape, dtype, data):
    n, fin, fout = shape
    args = dict(x=np.ones((n, fin), dtype), weight=np.ones((fout, fin), dtype), bias=np.ones(fout, dtype),
                grad_out=np.ones((n, fout), dtype))
    ndim = 1 if target == "bias" else 2
    mismatched = {"x": (n, fin + 1), "weight": (fout, fin + 1), "bias": (fout + 1,), "grad_out": (n + 1, fout)}
    args[target] = data.draw(st.one_of(bad_array(ndim, dtype, none=target != "bias"),
                                       st.just(np.ones(mismatched[target], dtype))), target)
    name = target
    if target != "grad_out":
        expect_refusal(name, lambda: R.linear(args["x"], args["weight"], args["bias"]),
                       lambda: F.linear(args["x"], args["weight"], args["bias"]))
    if target != "bias":
        expect_refusal(name, lambda: R.linear_backward(args["grad_out"], args["x"], args["weight"]),
                       lambda: F.linear_backward(args["grad_out"], args["x"], args["weight"]))
    if target in ("x", "grad_out"):
        bad = args[target]
        good = np.ones((n, fout), dtype)
        if target == "x":
            mismatch = isinstance(bad, np.ndarray) and bad.dtype in (np.float32, np.float64)
            if not mismatch:
                expect_refusal("x", lambda: R.relu(bad), lambda: F.relu(bad))
        else:
            expect_refusal("grad_out", lambda: R.relu_backward(bad, good), lambda: F.relu_backward(bad, good))


# The contract's flags are bools; ceil_mode refuses anything else, and so should its siblings: a string "False" is
# truthy, and taking it for True is a silent wrong answer.
FLAG_CALLS = [
    ("count_include_pad", lambda m, v: m.avg_pool2d(np.ones((1, 1, 4, 4)), 3, padding=1, count_include_pad=v)),
    ("count_include_pad",
     lambda m, v: m.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (1, 1, 4, 4), 3, padding=1, count_include_pad=v)),
    ("return_indices", lambda m, v: m.max_pool2d(np.ones((1, 1, 4, 4)), 2, return_indices=v)),
    ("need_input_grad",
     lambda m, v: m.conv2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)),
                                    need_input_grad=v)),
]


@pytest.mark.parametrize("name,call", FLAG_CALLS, ids=["avg", "avg-backward", "max", "conv-backward"])
def test_bool_flags_refuse_non_bools(name, call):
    for mod in (R, F):
        for value in ("False", None, 2):
            with pytest.raises(TypeError, match=name):
                call(mod, value)
