"""Every backward of both tiers (the NumPy reference and the compiled functional layer) against central
differences of its own forward, in float64 on tiny arrays. This needs no other library, so it is what vouches for
the reference when PyTorch is not installed; the compiled layer is also checked on every conv2d path.
"""
import numpy as np
import pytest

from convengine import functional as F

from conftest import assert_gradient, randn


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
    dict(x=(2, 8, 8, 8), w=(12, 8, 1, 1), bias=True),                        # the pointwise path
    dict(x=(2, 4, 8, 9), w=(4, 1, 3, 3), bias=True, stride=2, padding=1, groups=4),   # depthwise, phases
    dict(x=(1, 3, 7, 10), w=(3, 1, 5, 5), bias=False, padding=2, groups=3),   # depthwise, stride 1
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


BATCH_NORM_GRAD_SHAPES = [(3, 2, 2, 3), (2, 3, 1, 1), (1, 2, 4, 1), (2, 2, 4, 4), (2, 3, 4, 5)]  # last two: plane by plane


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


# ---------------------------------------------------------------------------------------------------------------
# The tests: each case on both tiers (the `impl` fixture)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CONV_GRAD_CASES, ids=case_id)
def test_conv2d_backward_finite_differences(impl, rng, case):
    check_conv2d_gradients(impl, case, rng)


@pytest.mark.parametrize("case", [
    dict(x=(2, 8, 4, 5), w=(8, 8, 3, 3), bias=True, padding=1),
    dict(x=(1, 16, 5, 5), w=(8, 8, 3, 2), bias=True, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
], ids=case_id)
def test_conv2d_every_path_finite_differences(rng, conv_path, case):
    check_conv2d_gradients(F, case, rng)


@pytest.mark.parametrize("case", POOL_GRAD_CASES, ids=case_id)
def test_max_pool2d_backward_finite_differences(impl, rng, case):
    check_max_pool2d_gradients(impl, case, rng)


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incpad", "nopad"])
@pytest.mark.parametrize("case", POOL_GRAD_CASES, ids=case_id)
def test_avg_pool2d_backward_finite_differences(impl, rng, case, count_include_pad):
    check_avg_pool2d_gradients(impl, case, rng, count_include_pad)


def test_relu_backward_finite_differences(impl, rng):
    check_relu_gradients(impl, rng)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_backward_finite_differences(impl, rng, bias):
    check_linear_gradients(impl, rng, bias)


@pytest.mark.parametrize("shape", BATCH_NORM_GRAD_SHAPES, ids=str)
def test_batch_norm2d_backward_finite_differences(impl, rng, shape):
    check_batch_norm2d_gradients(impl, shape, rng)
