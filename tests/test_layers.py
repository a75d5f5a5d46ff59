"""Layers: forward against the NumPy reference, backward against float64 finite differences (and PyTorch for
BatchNorm when installed), initialisation, dropout, gradient accumulation, caches, bad arguments."""
import math

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import reference as R

from conftest import assert_close, numerical_gradient, randn


def check_layer_gradients(layer, x, rng, training=True, rtol=1e-6, atol=1e-8):
    """Backward of sum(layer(x) * v) against central differences, for x and every parameter."""
    v = randn(rng, layer.forward(x, training=training).shape)
    for p in layer.parameters():
        p.grad[...] = 0
    layer.need_input_grad = True
    layer.forward(x, training=True)
    gx = layer.backward(v)

    def loss():
        return float(np.sum(layer.forward(x, training=True) * v))

    np.testing.assert_allclose(gx, numerical_gradient(loss, x), rtol=rtol, atol=atol, err_msg="input gradient")
    for p in layer.parameters():
        np.testing.assert_allclose(p.grad, numerical_gradient(loss, p.data), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {p.name}")


CONV_CASES = [
    dict(args=(3, 4, 3), x=(2, 3, 5, 6)),
    dict(args=(4, 6, (3, 2)), kw=dict(stride=2, padding=1, groups=2), x=(2, 4, 7, 6)),
    dict(args=(2, 3, 3), kw=dict(padding="same", dilation=2, bias=False), x=(1, 2, 6, 5)),
    dict(args=(2, 2, 2), kw=dict(stride=(2, 1), padding="valid", init="glorot"), x=(2, 2, 5, 4)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: str(c.get("kw", {})))
def test_conv2d_forward_matches_reference_and_gradients_match_finite_differences(case, rng):
    layer = L.Conv2d(*case["args"], dtype="float64", **case.get("kw", {}))
    x = randn(rng, case["x"])
    if layer.bias is not None:
        layer.bias.data[...] = randn(rng, layer.bias.data.shape)
    hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    bias = None if layer.bias is None else layer.bias.data
    assert_close(layer.forward(x), R.conv2d(x, layer.weight.data, bias, **hyper), "Conv2d forward")
    assert layer.output_shape(x.shape[1:]) == layer.forward(x).shape[1:]
    check_layer_gradients(layer, x, rng)


def test_conv2d_as_first_layer_skips_the_input_gradient(rng):
    layer = L.Conv2d(3, 4, 3, dtype="float64")
    x = randn(rng, (2, 3, 6, 6))
    g = randn(rng, (2, 4, 4, 4))
    layer.forward(x, training=True)
    gx = layer.backward(g)
    full_w = layer.weight.grad.copy()
    layer.weight.grad[...] = 0
    layer.need_input_grad = False
    assert layer.backward(g) is None
    np.testing.assert_array_equal(layer.weight.grad, full_w)
    assert gx.shape == x.shape


def test_linear_forward_and_gradients(rng):
    layer = L.Linear(5, 3, dtype=np.float64)
    layer.bias.data[...] = randn(rng, 3)
    x = randn(rng, (4, 5))
    assert_close(layer.forward(x), x @ layer.weight.data.T + layer.bias.data, "Linear forward")
    check_layer_gradients(layer, x, rng)


@pytest.mark.parametrize("layer", [L.MaxPool2d(2), L.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                                   L.AvgPool2d(2), L.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                                   L.GlobalAvgPool2d(), L.ReLU(), L.Flatten()], ids=repr)
def test_parameterless_layers_gradients(layer, rng):
    # Distinct values far apart, away from 0: no max-pool tie and no ReLU kink moves under a nudge of eps.
    x = (rng.permutation(2 * 3 * 5 * 6).reshape(2, 3, 5, 6) - 90.5) * 0.1
    check_layer_gradients(layer, x, rng)
    assert layer.output_shape(x.shape[1:]) == layer.forward(x).shape[1:]


def test_pool_layers_match_reference(rng):
    x = randn(rng, (2, 3, 7, 6), np.float32)
    np.testing.assert_array_equal(L.MaxPool2d(3, 2, 1).forward(x), R.max_pool2d(x, 3, 2, 1))
    assert_close(L.AvgPool2d(2, ceil_mode=True).forward(x), R.avg_pool2d(x, 2, ceil_mode=True), "AvgPool2d")
    assert_close(L.GlobalAvgPool2d().forward(x), x.mean(axis=(2, 3)), "GlobalAvgPool2d")


def test_batchnorm_gradients_in_training_mode(rng):
    layer = L.BatchNorm2d(3, dtype="float64")
    layer.weight.data[...] = randn(rng, 3)
    layer.bias.data[...] = randn(rng, 3)
    check_layer_gradients(layer, randn(rng, (3, 3, 4, 2)) * 2 + 1, rng, rtol=1e-5, atol=1e-8)


def test_batchnorm_matches_pytorch_training_and_inference(rng):
    torch = pytest.importorskip("torch")
    layer = L.BatchNorm2d(4, momentum=0.2, dtype="float64")
    ref = torch.nn.BatchNorm2d(4, momentum=0.2, dtype=torch.float64)
    gamma, beta = randn(rng, 4), randn(rng, 4)
    layer.weight.data[...] = gamma
    layer.bias.data[...] = beta
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    for _ in range(3):
        x = randn(rng, (5, 4, 3, 3)) * 3 + 2
        g = randn(rng, x.shape)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = ref(xt)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(layer.forward(x, training=True), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-12)
    ref.eval()
    x = randn(rng, (2, 4, 3, 3))
    with torch.no_grad():
        np.testing.assert_allclose(layer.forward(x), ref(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_batchnorm_inference_uses_running_statistics_and_leaves_them(rng):
    layer = L.BatchNorm2d(2, dtype="float64")
    layer.running_mean[...] = [1.0, -2.0]
    layer.running_var[...] = [4.0, 0.25]
    x = randn(rng, (3, 2, 2, 2))
    expected = (x - layer.running_mean[:, None, None]) / np.sqrt(layer.running_var[:, None, None] + layer.eps)
    np.testing.assert_allclose(layer.forward(x, training=False), expected, rtol=1e-12)
    np.testing.assert_array_equal(layer.running_mean, [1.0, -2.0])
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer.forward(randn(rng, (1, 2, 1, 1)), training=True)


def test_dropout_training_and_inference(rng):
    x = np.ones((200, 50), np.float32)
    layer = L.Dropout(0.3)
    assert layer.forward(x, training=False) is x
    convengine.manual_seed(5)
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    g = randn(rng, x.shape, np.float32)
    np.testing.assert_array_equal(layer.backward(g), g * y)  # x is ones: y is the scaled mask
    convengine.manual_seed(5)
    np.testing.assert_array_equal(L.Dropout(0.3).forward(x, training=True), y)
    assert L.Dropout(0.0).forward(x, training=True) is x


def test_initialisation_is_seeded_and_scaled():
    convengine.manual_seed(1)
    a = L.Conv2d(16, 64, 3)
    convengine.manual_seed(1)
    b = L.Conv2d(16, 64, 3)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.data.dtype == np.float32
    assert abs(a.weight.data.std() - math.sqrt(2 / (16 * 9))) < 0.01
    np.testing.assert_array_equal(a.bias.data, 0)
    g = L.Linear(100, 50, init="glorot").weight.data
    limit = math.sqrt(6 / 150)
    assert g.max() <= limit and g.min() >= -limit and g.max() > 0.9 * limit
    c = L.Conv2d(16, 64, 3, dtype="float64")
    assert c.weight.data.dtype == np.float64


def test_gradients_accumulate_until_cleared(rng):
    layer = L.Linear(3, 2, dtype="float64")
    x = randn(rng, (4, 3))
    g = randn(rng, (4, 2))
    layer.forward(x, training=True)
    layer.backward(g)
    once = layer.weight.grad.copy()
    layer.backward(g)
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-15)


@pytest.mark.parametrize("layer", [L.Conv2d(1, 1, 1), L.MaxPool2d(2), L.AvgPool2d(2), L.ReLU(), L.Flatten(),
                                   L.GlobalAvgPool2d(), L.BatchNorm2d(1), L.Dropout(0.5), L.Linear(4, 2)], ids=repr)
def test_inference_keeps_nothing_for_backward(layer):
    x = np.ones((2, 1, 2, 2) if not isinstance(layer, L.Linear) else (2, 4), np.float32)
    layer.forward(x, training=True)
    layer.forward(x, training=False)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones_like(layer.forward(x)))


@pytest.mark.parametrize("make, error", [
    (lambda: L.Conv2d(0, 4, 3), ValueError),
    (lambda: L.Conv2d(3, 4, "3"), TypeError),
    (lambda: L.Conv2d(3, 4, 3, padding="full"), ValueError),
    (lambda: L.Conv2d(3, 4, 3, groups=2), ValueError),
    (lambda: L.Conv2d(3, 4, 3, init="zeros"), ValueError),
    (lambda: L.Conv2d(3, 4, 3, dtype="int32"), TypeError),
    (lambda: L.Linear(3, 0), ValueError),
    (lambda: L.Dropout(1.0), ValueError),
    (lambda: L.Dropout("0.5"), TypeError),
    (lambda: L.BatchNorm2d(2, eps=0), ValueError),
    (lambda: L.MaxPool2d(2, padding=2), ValueError),
    (lambda: L.AvgPool2d(2, ceil_mode=1), TypeError),
])
def test_bad_arguments(make, error):
    with pytest.raises(error):
        make()


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="channels"):
        L.BatchNorm2d(3).forward(np.ones((2, 2, 3, 3), np.float32), training=True)
    with pytest.raises(TypeError, match="dtype"):
        L.BatchNorm2d(2).forward(np.ones((2, 2, 3, 3)), training=True)
    with pytest.raises(ValueError, match="input features"):
        L.Linear(3, 2).forward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="N, C, H, W"):
        L.GlobalAvgPool2d().forward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError):
        L.Linear(3, 2).output_shape((4,))


def test_flops_count_multiply_adds_twice():
    conv = L.Conv2d(3, 8, 3, padding=1, bias=False)
    assert conv.flops((3, 10, 10)) == 2 * 8 * 10 * 10 * 3 * 9
    assert L.Linear(4, 5, bias=False).flops((4,)) == 2 * 20
    assert L.MaxPool2d(2).flops((3, 4, 4)) == 3 * 2 * 2 * 4


def test_shapes_only_layers_allocate_nothing_and_draw_nothing():
    convengine.manual_seed(2)
    expected = convengine._random.generator().random()
    convengine.manual_seed(2)
    with L.shapes_only():
        big = L.Linear(10 ** 6, 10 ** 6, dtype="float64")  # 8 TB if it were allocated
        bn = L.BatchNorm2d(10 ** 9)
    assert convengine._random.generator().random() == expected
    assert big.weight.data.shape == (10 ** 6, 10 ** 6) and big.weight.data.dtype == np.float64
    assert not big.weight.data.flags.writeable and big.weight.data.strides == (0, 0)
    assert bn.running_var.shape == (10 ** 9,) and bn.running_var[123] == 1.0
    # Outside the context, layers are real again.
    assert L.Linear(2, 2).weight.data.flags.writeable
