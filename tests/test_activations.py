"""Sigmoid, Tanh, LeakyReLU and Softmax layers: forward against their definitions (and PyTorch when installed),
backward against float64 finite differences, extreme inputs, dtypes, and a saved model that holds them."""
import numpy as np
import pytest

import convengine
from convengine import layers as L

from conftest import numerical_gradient, randn

ACTIVATIONS = [L.Sigmoid(), L.Tanh(), L.LeakyReLU(), L.LeakyReLU(0.2), L.Softmax()]


def definition(layer, x):
    if isinstance(layer, L.Sigmoid):
        return 1.0 / (1.0 + np.exp(-x))
    if isinstance(layer, L.Tanh):
        return (np.exp(x) - np.exp(-x)) / (np.exp(x) + np.exp(-x))
    if isinstance(layer, L.LeakyReLU):
        return np.where(x > 0, x, layer.negative_slope * x)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("layer", ACTIVATIONS, ids=repr)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4, 2)])
def test_forward_matches_the_definition_and_backward_finite_differences(layer, shape, rng):
    # Away from LeakyReLU's kink at 0, so no nudge of eps crosses it.
    x = randn(rng, shape) * 2
    x[np.abs(x) < 1e-3] = 0.5
    y = layer.forward(x, training=True)
    np.testing.assert_allclose(y, definition(layer, x), rtol=1e-12, atol=1e-15)
    assert layer.output_shape(shape[1:]) == y.shape[1:]
    v = randn(rng, shape)
    gx = layer.backward(v)

    def loss():
        return float(np.sum(layer.forward(x) * v))

    np.testing.assert_allclose(gx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layer", ACTIVATIONS, ids=repr)
def test_float32_in_float32_out_and_no_overflow(layer):
    x = np.array([[-1000.0, -88.0, 0.0, 88.0, 1000.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        y = layer.forward(x, training=True)
        g = layer.backward(np.ones_like(x))
    assert y.dtype == np.float32 and g.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    if isinstance(layer, L.Sigmoid):
        np.testing.assert_array_equal(y[0, [0, 2, 4]], [0.0, 0.5, 1.0])
    if isinstance(layer, L.Softmax):
        np.testing.assert_allclose(y.sum(), 1.0, rtol=1e-6)
        assert y[0, 4] == 1.0


def test_leaky_relu_gradient_at_zero_is_the_slope_as_in_pytorch():
    layer = L.LeakyReLU(0.1)
    layer.forward(np.zeros((1, 3)), training=True)
    np.testing.assert_array_equal(layer.backward(np.ones((1, 3))), [[0.1, 0.1, 0.1]])
    with pytest.raises(ValueError, match="negative_slope"):
        L.LeakyReLU(-0.5)


def test_activations_match_pytorch(rng):
    torch = pytest.importorskip("torch")
    pairs = [(L.Sigmoid(), torch.nn.Sigmoid()), (L.Tanh(), torch.nn.Tanh()),
             (L.LeakyReLU(0.3), torch.nn.LeakyReLU(0.3)), (L.Softmax(), torch.nn.Softmax(dim=1))]
    x = randn(rng, (4, 3, 2, 2)) * 3
    g = randn(rng, x.shape)
    for ours, theirs in pairs:
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = theirs(xt)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(ours.forward(x, training=True), yt.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_backward_needs_a_training_forward_and_a_matching_gradient():
    layer = L.Tanh()
    layer.forward(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="training=True"):
        layer.backward(np.zeros((2, 3)))
    layer.forward(np.zeros((2, 3)), training=True)
    with pytest.raises(ValueError, match="grad shape"):
        layer.backward(np.zeros((2, 4)))
    with pytest.raises(TypeError):
        L.Sigmoid().forward(np.zeros((2, 3), np.int64))


def test_a_model_with_every_activation_saves_and_loads(tmp_path, rng):
    convengine.manual_seed(0)
    model = convengine.Sequential([L.Conv2d(1, 3, 3), L.LeakyReLU(0.05), L.Flatten(), L.Linear(12, 6), L.Tanh(),
                                   L.Linear(6, 4), L.Sigmoid(), L.Linear(4, 3), L.Softmax()],
                                  input_shape=(1, 4, 4))
    x = randn(rng, (5, 1, 4, 4), np.float32)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = convengine.load(path)
    assert [type(layer) for layer in loaded] == [type(layer) for layer in model]
    assert loaded[1].negative_slope == 0.05
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    np.testing.assert_allclose(loaded.predict(x).sum(axis=1), 1.0, rtol=1e-6)
    assert "Softmax" in loaded.summary()
