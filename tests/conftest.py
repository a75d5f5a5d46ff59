"""Shared test helpers: tolerances per dtype, array layouts, a finite-difference gradient checker, the `impl` fixture
over the two tiers (reference and the compiled functional layer), and the hypothesis profiles.

HYPOTHESIS_PROFILE=long raises the number of drawn examples (the default profile keeps CI fast).
"""
import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]

# Two tiers summing the same products in different orders agree to about sqrt(terms) roundings of the largest
# magnitude involved; atol is relative to the largest |expected| so that long sums of big values do not fail, while
# a wrong index or a missing term (an error of the size of one product) still does.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11),
}


def assert_close(actual, expected, err_msg=""):
    """Same type, dtype and shape, NaN in the same places, values equal to the dtype's tolerance."""
    assert isinstance(actual, np.ndarray), f"{err_msg}: got {type(actual).__name__}, not an ndarray"
    assert actual.dtype == expected.dtype, f"{err_msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{err_msg}: shape {actual.shape} != {expected.shape}"
    tol = TOLERANCE[np.dtype(expected.dtype)]
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.max(np.abs(expected[finite])))) if finite.any() else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True,
                               err_msg=err_msg)


def assert_bitwise_equal(actual, expected, err_msg=""):
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{err_msg}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}"
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), \
        f"{err_msg}: not bitwise equal, max |diff| {np.max(np.abs(actual - expected), initial=0)}"


# ---------------------------------------------------------------------------------------------------------------
# Tiers and data
# ---------------------------------------------------------------------------------------------------------------

IMPLS = ["reference", "functional"]


def load_impl(name):
    """The module of one tier. No importorskip: a functional layer that fails to import must fail the tests."""
    return importlib.import_module(f"convengine.{name}")


@pytest.fixture(params=IMPLS)
def impl(request):
    return load_impl(request.param)


CONV_PATHS = ["direct", "im2col", "pixels"]


@pytest.fixture(params=CONV_PATHS)
def conv_path(request):
    """conv2d pinned to one strategy (`force_conv_path`) for the test, where the shape allows it, then back to the
    automatic choice."""
    from convengine._kernels import engine
    engine.force_conv_path(request.param)
    yield request.param
    engine.force_conv_path("auto")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so each test sees fixed data and a failure reproduces."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2 ** 32)
    return np.random.default_rng(seed)


def randn(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


LAYOUTS = ["contiguous", "noncontiguous", "negative_stride", "readonly", "fortran"]


def as_layout(a, layout):
    """The same values as `a`, held in the named memory layout."""
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "noncontiguous":
        # Every other element of a bigger buffer along each axis.
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative_stride":
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    if layout == "readonly":
        b = np.array(a)
        b.flags.writeable = False
        return b
    if layout == "fortran":
        return np.asfortranarray(a)
    raise ValueError(layout)


def conv_params_ok(x_shape, w_shape, stride, padding, dilation, groups):
    """Whether the arguments describe a valid conv2d (used to skip grid points with an empty output)."""
    from convengine._args import conv2d_geometry
    try:
        conv2d_geometry(x_shape, w_shape, stride, padding, dilation, groups)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------------------------

def numerical_gradient(loss, a, eps=1e-6):
    """d loss / d a by central differences, one element at a time (float64, tiny arrays only). `loss` reads `a`."""
    grad = np.zeros_like(a)
    flat = a.reshape(-1)  # a view: writing it perturbs a
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + eps
        up = loss()
        flat[k] = keep - eps
        down = loss()
        flat[k] = keep
        grad.reshape(-1)[k] = (up - down) / (2 * eps)
    return grad


def assert_gradient(analytic, loss, a, name):
    numeric = numerical_gradient(loss, a)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=f"gradient of {name}")


def _away_from(a, points, margin):
    """Move entries of `a` closer than margin to any of `points` (kinks of piecewise-linear ops) out of the way."""
    for p in points:
        close = np.abs(a - p) < margin
        a[close] = p + np.where(a[close] >= p, margin, -margin)
    return a


# Each case: (op, tiny arguments). The loss is sum(op(...) * v) for a fixed random v, whose gradient is the op's
# backward applied to grad_out = v; every differentiable argument is checked against central differences.
CONV_GRAD_CASES = [
    dict(x=(2, 3, 5, 6), w=(4, 3, 3, 3), bias=True),
    dict(x=(2, 4, 5, 6), w=(4, 2, 3, 2), bias=True, stride=2, padding=1, groups=2),
    dict(x=(1, 3, 7, 6), w=(2, 3, 2, 3), bias=False, stride=(1, 2), padding="same", dilation=(2, 1)),
    dict(x=(2, 2, 6, 5), w=(3, 2, 3, 3), bias=True, stride=2, padding="same"),
    dict(x=(2, 3, 4, 4), w=(6, 1, 3, 3), bias=True, padding=(2, 0), groups=3),
    dict(x=(1, 2, 9, 8), w=(2, 2, 3, 2), bias=True, stride=3, padding=3, dilation=2),
    dict(x=(2, 3, 3, 3), w=(2, 3, 1, 1), bias=False),
]
POOL_GRAD_CASES = [
    dict(x=(2, 2, 5, 6), kernel_size=2),
    dict(x=(2, 3, 4, 6), kernel_size=2),            # even rows: the whole-window 2x2 kernels
    dict(x=(2, 2, 5, 6), kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(x=(1, 3, 7, 5), kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)),
    dict(x=(1, 2, 6, 6), kernel_size=3, stride=1, ceil_mode=True),
    dict(x=(1, 1, 5, 5), kernel_size=2, stride=3, padding=1, ceil_mode=True),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def check_conv2d_gradients(mod, case, rng):
    c = dict(case)
    x = randn(rng, c.pop("x"))
    w = randn(rng, c.pop("w"))
    b = randn(rng, w.shape[0]) if c.pop("bias") else None
    y = mod.conv2d(x, w, b, **c)
    v = randn(rng, y.shape)
    gx, gw, gb = mod.conv2d_backward(v, x, w, **c)

    def loss():
        return float(np.sum(mod.conv2d(x, w, b, **c) * v))

    assert_gradient(gx, loss, x, "conv2d x")
    assert_gradient(gw, loss, w, "conv2d weight")
    if b is not None:
        assert_gradient(gb, loss, b, "conv2d bias")
    else:
        # The bias gradient does not depend on whether the forward had one.
        np.testing.assert_allclose(gb, v.sum(axis=(0, 2, 3)), rtol=1e-12)


def check_max_pool2d_gradients(mod, case, rng):
    c = dict(case)
    shape = c.pop("x")
    # Distinct values far apart, so that a nudge of eps never changes which element is the maximum.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) * 0.1
    y, idx = mod.max_pool2d(x, return_indices=True, **c)
    v = randn(rng, y.shape)
    gx = mod.max_pool2d_backward(v, idx, x.shape)
    assert_gradient(gx, lambda: float(np.sum(mod.max_pool2d(x, **c) * v)), x, "max_pool2d x")


def check_avg_pool2d_gradients(mod, case, rng, count_include_pad):
    c = dict(case)
    x = randn(rng, c.pop("x"))
    y = mod.avg_pool2d(x, count_include_pad=count_include_pad, **c)
    v = randn(rng, y.shape)
    gx = mod.avg_pool2d_backward(v, x.shape, count_include_pad=count_include_pad, **c)
    assert_gradient(gx, lambda: float(np.sum(mod.avg_pool2d(x, count_include_pad=count_include_pad, **c) * v)),
                    x, "avg_pool2d x")


def check_relu_gradients(mod, rng):
    x = _away_from(randn(rng, (2, 3, 4, 5)), [0.0], 1e-3)
    v = randn(rng, x.shape)
    gx = mod.relu_backward(v, x)
    assert_gradient(gx, lambda: float(np.sum(mod.relu(x) * v)), x, "relu x")


BATCH_NORM_GRAD_SHAPES = [(3, 2, 2, 3), (2, 3, 1, 1), (1, 2, 4, 1)]


def check_batch_norm2d_gradients(mod, shape, rng):
    """The batch statistics depend on x: the gradient of the training-mode forward, through them, against central
    differences of the whole forward (statistics recomputed at each nudge)."""
    x = randn(rng, shape) * 2 + 0.5
    w = randn(rng, shape[1])
    b = randn(rng, shape[1])
    v = randn(rng, shape)
    _, mean, var = mod.batch_norm2d_training(x, w, b)
    gx, gw, gb = mod.batch_norm2d_backward(v, x, w, mean, var)

    def loss():
        return float(np.sum(mod.batch_norm2d_training(x, w, b)[0] * v))

    assert_gradient(gx, loss, x, "batch_norm2d x")
    assert_gradient(gw, loss, w, "batch_norm2d weight")
    assert_gradient(gb, loss, b, "batch_norm2d bias")


def check_linear_gradients(mod, rng, bias):
    x = randn(rng, (3, 5))
    w = randn(rng, (4, 5))
    b = randn(rng, 4) if bias else None
    v = randn(rng, (3, 4))
    gx, gw, gb = mod.linear_backward(v, x, w)

    def loss():
        return float(np.sum(mod.linear(x, w, b) * v))

    assert_gradient(gx, loss, x, "linear x")
    assert_gradient(gw, loss, w, "linear weight")
    if b is not None:
        assert_gradient(gb, loss, b, "linear bias")
