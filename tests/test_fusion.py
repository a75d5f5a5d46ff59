"""Layer fusion in Sequential (convengine.fusion): Conv2d + ReLU and BatchNorm2d + ReLU run as one pass each, with
the values of the layers run one by one, bit for bit, forward and backward; gradients against finite differences
in float64; the same bits on any thread count; the same weights after a few SGD steps; training outputs in buffers
reused across steps, never one the model returns."""
import numpy as np
import pytest

import convengine
from convengine import fusion
from convengine import functional as F
from convengine import _workspace
from convengine import layers as L
from convengine._threads import every_call_threaded
from convengine.losses import CrossEntropyLoss
from convengine.model import Sequential
from convengine.optim import SGD

from conftest import assert_bitwise_equal, assert_gradient, randn

DTYPES = [np.float32, np.float64]


def conv_relu_net(dtype):
    return [L.Conv2d(3, 6, 3, padding=1, dtype=dtype), L.ReLU(), L.MaxPool2d(2),
            L.Conv2d(6, 4, 3, stride=2, padding=1, bias=False, dtype=dtype), L.ReLU(),
            L.Flatten(), L.Linear(4 * 2 * 2, 5, dtype=dtype)]


def bn_relu_net(dtype):
    return [L.Conv2d(3, 6, 3, padding=1, dtype=dtype), L.BatchNorm2d(6, dtype=dtype), L.ReLU(), L.MaxPool2d(2),
            L.Conv2d(6, 4, 3, padding=1, groups=2, dtype=dtype), L.BatchNorm2d(4, dtype=dtype), L.ReLU(),
            L.GlobalAvgPool2d(), L.Linear(4, 5, dtype=dtype)]


NETS = {"conv_relu": conv_relu_net, "bn_relu": bn_relu_net}


def model_of(net, dtype, fuse, seed=0):
    convengine.manual_seed(seed)
    model = Sequential(NETS[net](dtype))
    model.fuse = fuse
    # batch norm with weights and biases away from 1 and 0, some of the weights negative
    for layer in model:
        if isinstance(layer, L.BatchNorm2d):
            rng = np.random.default_rng(seed + 1)
            layer.weight.data[...] = rng.uniform(-1.5, 1.5, layer.num_features)
            layer.bias.data[...] = rng.uniform(-0.5, 0.5, layer.num_features)
    return model


def step(model, x, gy, training=True):
    """(output, input gradient, parameter gradients) of one forward and backward."""
    model.need_input_grad = True
    for p in model.parameters():
        p.grad[...] = 0
    y = model.forward(x, training=training)
    gx = model.backward(gy)
    return [y, gx] + [p.grad.copy() for p in model.parameters()]


def data(dtype, batch=3, seed=5):
    rng = np.random.default_rng(seed)
    return randn(rng, (batch, 3, 8, 8), dtype), randn(rng, (batch, 5), dtype)


def test_the_patterns_recognised():
    assert fusion.pairs(bn_relu_net(np.float32)) == {1, 5}
    assert fusion.pairs(conv_relu_net(np.float32)) == {0, 3}
    assert fusion.pairs([L.Conv2d(1, 2, 3), L.BatchNorm2d(2), L.ReLU(), L.ReLU()]) == {1}
    assert fusion.pairs([L.ReLU(), L.Conv2d(1, 2, 3), L.MaxPool2d(2), L.ReLU()]) == set()

    class MyConv(L.Conv2d):
        pass
    assert fusion.pairs([MyConv(1, 2, 3), L.ReLU(), L.Linear(2, 2)]) == set()   # a subclass may change forward
    # the pooling after a batch norm pair: 2x2 windows of stride 2, unpadded, floor mode
    assert fusion.pool_follows(bn_relu_net(np.float32), 1) and not fusion.pool_follows(bn_relu_net(np.float32), 5)
    for pool in (L.MaxPool2d(3, 2), L.MaxPool2d(2, 1), L.MaxPool2d(2, padding=1), L.MaxPool2d(2, ceil_mode=True),
                 L.AvgPool2d(2)):
        assert not fusion.pool_follows([L.BatchNorm2d(2), L.ReLU(), pool], 0), pool
    layers = [L.BatchNorm2d(2), L.ReLU(), L.MaxPool2d(2)]
    assert fusion.pools_fused(layers, 0, (4, 2, 8, 6), True)
    assert not fusion.pools_fused(layers, 0, (4, 2, 8, 6), False)     # inference: the pair, then the pooling
    assert not fusion.pools_fused(layers, 0, (4, 2, 7, 6), True)      # rows that do not pair up
    assert not fusion.pools_fused(layers, 0, (4, 2, 2, 6), True)      # planes below 16 values


@pytest.mark.parametrize("hw,pooled", [((8, 8), True), ((8, 7), True), ((7, 8), False), ((2, 6), False)])
def test_batch_norm_relu_pool_runs_as_one_pass(hw, pooled, monkeypatch):
    """In training the pair before a 2x2 max pooling pools its own output (no max_pool2d call of its own) where
    the planes pair up and hold >= 16 values, and the pooling runs on its own elsewhere; the same bits either
    way (test_fused_forward_and_backward_are_the_unfused_bits runs the net below on 8x8 images)."""
    rng = np.random.default_rng(0)
    x, gy = randn(rng, (3, 3) + hw, np.float32), randn(rng, (3, 5), np.float32)
    calls, back = [], []
    real, real_back = F.max_pool2d, F.max_pool2d_backward
    monkeypatch.setattr(F, "max_pool2d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(F, "max_pool2d_backward", lambda *a: back.append(a[0].shape) or real_back(*a))
    model = model_of("bn_relu", np.float32, True)
    fused = step(model, x, gy)
    assert (len(calls) == 0) == pooled, calls
    assert (len(back) == 0) == pooled, back                     # nor a scatter of the pooling's gradient
    assert (model.layers[1]._cache[3] is None) == pooled        # the pair's output never written
    plain = step(model_of("bn_relu", np.float32, False), x, gy)
    for k, (a, b) in enumerate(zip(fused, plain)):
        assert_bitwise_equal(a, b, f"{hw}: result {k}")


@pytest.mark.parametrize("net", list(NETS))
def test_a_fused_model_runs_no_relu_pass_of_its_own(net, monkeypatch):
    x, gy = data(np.float32)
    model = model_of(net, np.float32, True)
    calls = []
    monkeypatch.setattr(F, "relu", lambda a: calls.append(a) or np.maximum(a, 0))
    monkeypatch.setattr(F, "relu_backward", lambda g, a: calls.append(a) or np.where(a > 0, g, 0))
    step(model, x, gy)
    # the ReLU after the second conv still takes its gradient (from the output's sign); the first one's goes
    # through the max pooling after it
    ran_backward = 1 if net == "conv_relu" else 0
    assert len(calls) == ran_backward
    model.fuse = False
    step(model, x, gy)
    assert len(calls) == ran_backward + 4


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("net", list(NETS))
def test_fused_forward_and_backward_are_the_unfused_bits(net, dtype):
    x, gy = data(dtype)
    fused = step(model_of(net, dtype, True), x, gy)
    plain = step(model_of(net, dtype, False), x, gy)
    for k, (a, b) in enumerate(zip(fused, plain)):
        assert_bitwise_equal(a, b, f"{net}: result {k}")
    assert np.count_nonzero(fused[1]) > 0.3 * fused[1].size
    # inference too
    assert_bitwise_equal(model_of(net, dtype, True).forward(x), model_of(net, dtype, False).forward(x), net)


@pytest.mark.parametrize("net", list(NETS))
def test_fused_gradients_match_finite_differences(net):
    x, gy = data(np.float64, batch=2)
    model = model_of(net, np.float64, True)
    _, gx, *grads = step(model, x, gy)

    def loss():
        return float(np.sum(model.forward(x, training=True) * gy))
    assert_gradient(gx, loss, x, f"{net}: input")
    for p, g in zip(model.parameters(), grads):
        if p.data.size <= 64:
            assert_gradient(g, loss, p.data, f"{net}: {p.name}")


@pytest.mark.parametrize("net", list(NETS))
def test_fused_results_are_the_same_bits_on_any_thread_count(net):
    x, gy = data(np.float32, batch=16)
    results = []
    with every_call_threaded():
        for n in (1, 2, 3):
            with convengine.num_threads(n):
                results.append(step(model_of(net, np.float32, True), x, gy))
    for other in results[1:]:
        for k, (a, b) in enumerate(zip(other, results[0])):
            assert_bitwise_equal(a, b, f"{net}: result {k}")


@pytest.mark.parametrize("net", list(NETS))
def test_fused_and_unfused_training_give_the_same_weights(net):
    rng = np.random.default_rng(3)
    x = randn(rng, (8, 3, 8, 8), np.float32)
    y = rng.integers(0, 5, 8)
    weights = []
    for fuse in (True, False):
        model = model_of(net, np.float32, fuse)
        opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        loss = CrossEntropyLoss()
        for _ in range(4):
            loss(model.forward(x, training=True), y)
            opt.zero_grad()
            model.backward(loss.backward())
            opt.step()
        weights.append([p.data.copy() for p in model.parameters()] + list(model.buffers().values()))
    start = [p.data for p in model_of(net, np.float32, True).parameters()]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(np.abs(a - s).max() > 1e-3 for a, s in zip(weights[0], start))


def assert_bits_nan_as_nan(actual, expected, what):
    """assert_bitwise_equal, but any NaN equal to any NaN: a NaN's sign and payload come from which operand an
    instruction propagates, which the compiler may order differently in two inlined copies of one expression
    (the sanitizer build's -O1 gave the fused backward's NaN channel 0xffc00000 where the two calls gave
    0x7fc00000)."""
    nan = np.isnan(actual)
    np.testing.assert_array_equal(nan, np.isnan(expected), err_msg=f"{what}: NaN positions")
    assert_bitwise_equal(np.where(nan, 0, actual), np.where(nan, 0, expected), what)


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 2, 8, 8), (2, 3, 16, 33), (3, 4, 2, 8), (2, 3, 4, 40)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_batch_norm_relu_max_pool_kernel_is_the_three_ops_in_a_row(rng, shape, dtype):
    """_batch_norm2d_relu_max_pool_training against _batch_norm2d_relu_training then max_pool2d(2): pooled values,
    indices, mean and variance bit for bit, ties among the ReLU's zeros and a NaN channel included (the pooling's
    first maximum, NaN winning; NaN as NaN); its refusals."""
    x = randn(rng, shape, dtype) * 2 + 0.3
    x[0, 0, 0, 1] = np.nan
    w, b = randn(rng, shape[1], dtype), randn(rng, shape[1], dtype)
    b[-1] = -2                                  # the last channel mostly below 0: whole windows of the ReLU's 0
    got = F._batch_norm2d_relu_max_pool_training(x, w, b)
    y, mean, var = F._batch_norm2d_relu_training(x, w, b)
    want = F.max_pool2d(y, 2, return_indices=True)
    for name, a, e in zip(["pooled", "indices", "mean", "var"], got, want + (mean, var)):
        assert_bits_nan_as_nan(a, e, f"{shape} {name}")
    assert np.count_nonzero(got[0][:, -1] == 0) > 0               # windows of the ReLU's zeros: ties
    assert np.isnan(got[0][:, 0]).all() and not np.isnan(got[0][:, 1:]).any()
    # backward: the pooling's scatter and the pair's backward in a row, bit for bit
    go = randn(rng, got[0].shape, dtype)
    back = F._batch_norm2d_relu_max_pool_backward(go, got[1], x, w, b, mean, var)
    want = F._batch_norm2d_relu_backward(F.max_pool2d_backward(go, got[1], x.shape), x, y, w, mean, var, bias=b)
    for name, a, e in zip(["grad_x", "grad_weight", "grad_bias"], back, want):
        assert_bits_nan_as_nan(a, e, f"{shape} backward {name}")
    bad = got[1].copy()
    bad[0, 0, 0, 0] = x.shape[2] * x.shape[3]
    with pytest.raises(ValueError, match="outside"):
        F._batch_norm2d_relu_max_pool_backward(go, bad, x, w, b, mean, var)
    with pytest.raises(ValueError, match="even height"):
        F._batch_norm2d_relu_max_pool_training(x[:, :, :-1], w, b)
    with pytest.raises(ValueError, match="even height"):
        F._batch_norm2d_relu_max_pool_training(x[:, :, :2, :2], w, b)


@pytest.mark.parametrize("shape", [(2, 3, 4, 32), (3, 2, 6, 17), (2, 2, 4, 12)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_batch_norm_relu_max_pool_backward_takes_any_indices(rng, shape, dtype):
    """The fused backward maps each 2x2 window's gradient to the pixel its index names (pool.h's
    ce_pool2x2_expand, 8 windows a step; rows of other widths are scattered); indices that are not each in their
    own window (another window's pixel, one pixel named twice) make that plane take the scatter: in every case the
    bits of max_pool2d_backward's scatter then the pair's backward."""
    x = randn(rng, shape, dtype) * 2 + 0.3
    w, b = randn(rng, shape[1], dtype), randn(rng, shape[1], dtype)
    pooled, idx, mean, var = F._batch_norm2d_relu_max_pool_training(x, w, b)
    y = F._batch_norm2d_relu_training(x, w, b)[0]
    go = randn(rng, pooled.shape, dtype)
    W = shape[3]
    odd = idx.copy()
    odd[0, 1, 0, 2] = odd[0, 1, 1, 2]                 # a pixel of the next row's window: named twice
    odd[1, 0, 1, -1] = 0                              # the plane's first pixel, from a row's last window
    odd[1, 1, 0, 0] += 2 * W                          # the pixel below its window
    for name, ind in [("own windows", idx), ("elsewhere", odd)]:
        got = F._batch_norm2d_relu_max_pool_backward(go, ind, x, w, b, mean, var)
        want = F._batch_norm2d_relu_backward(F.max_pool2d_backward(go, ind, x.shape), x, y, w, mean, var, bias=b)
        for what, a, e in zip(["grad_x", "grad_weight", "grad_bias"], got, want):
            assert_bitwise_equal(a, e, f"{shape} {name} {what}")
    assert not np.array_equal(F._batch_norm2d_relu_max_pool_backward(go, odd, x, w, b, mean, var)[0],
                              F._batch_norm2d_relu_max_pool_backward(go, idx, x, w, b, mean, var)[0])


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 5, 3, 3)], ids=["planes", "positions"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_batch_norm_relu_kernels_are_the_two_ops_in_a_row(rng, shape, dtype):
    """The fused kernels give the bits of batch norm then ReLU; the backward also when it takes the ReLU's sign
    from x and the forward's bias (planes of 16 values and more) instead of the stored output."""
    x = randn(rng, shape, dtype)
    g = randn(rng, x.shape, dtype)
    w, b = randn(rng, (5,), dtype), randn(rng, (5,), dtype)
    y, mean, var = F.batch_norm2d_training(x, w, b)
    fy, fmean, fvar = F._batch_norm2d_relu_training(x, w, b)
    assert_bitwise_equal(fy, F.relu(y))
    assert_bitwise_equal(fmean, mean)
    assert_bitwise_equal(fvar, var)
    assert 0 < np.count_nonzero(fy) < fy.size
    expected = F.batch_norm2d_backward(F.relu_backward(g, fy), x, w, mean, var)
    for a, e in zip(F._batch_norm2d_relu_backward(g, x, fy, w, mean, var), expected):
        assert_bitwise_equal(a, e)
    for a, e in zip(F._batch_norm2d_relu_backward(g, x, fy, w, mean, var, bias=b), expected):
        assert_bitwise_equal(a, e)
    with pytest.raises(ValueError, match="relu_bias"):
        F._batch_norm2d_relu_backward(g, x, fy, w, mean, var, bias=b[:3])
    assert_bitwise_equal(F._batch_norm2d_relu(x, w, b, mean, var), F.relu(F.batch_norm2d(x, w, b, mean, var)))
    with pytest.raises(ValueError, match="relu_out"):
        F._batch_norm2d_relu_backward(g, x, fy[:2], w, mean, var)


@pytest.mark.parametrize("pool", [(2, 2), (3, 2), (2, 1)], ids=["2s2", "3s2", "2s1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_max_pool_relu_backward_kernel_is_the_two_ops_in_a_row(rng, pool, dtype):
    """_max_pool2d_relu_backward against max_pool2d_backward then relu_backward, bit for bit: windows that
    overlap (several gradients summed at one position), the ReLU's zeros (ties, whole windows of them), a NaN
    (its gradient passes, as through relu_backward); bad indices refused."""
    x = randn(rng, (3, 4, 9, 8), dtype) + 0.2
    x[:, 1] -= 3                                   # a channel mostly below 0: windows of zeros only
    y = F.relu(x)
    y[0, 0, 2, 3] = np.nan
    k, s = pool
    pooled, indices = F.max_pool2d(y, k, s, return_indices=True)
    g = randn(rng, pooled.shape, dtype)
    got = F._max_pool2d_relu_backward(g, indices, y)
    want = F.relu_backward(F.max_pool2d_backward(g, indices, y.shape), y)
    assert_bitwise_equal(got, want, f"{pool}")
    assert 0 < np.count_nonzero(got) < np.count_nonzero(F.max_pool2d_backward(g, indices, y.shape))
    assert not np.isnan(got).any() and got[0, 0, 2, 3] != 0
    bad = indices.copy()
    bad[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="outside"):
        F._max_pool2d_relu_backward(g, bad, y)
    with pytest.raises(ValueError):
        F._max_pool2d_relu_backward(g, indices, y[:, :2])


def test_relu_pool_backward_pattern():
    """Sequential runs a ReLU and a max pooling after it as one backward pass only when the ReLU kept its output
    with the pooling's input shape and no batch norm pair pooled already (fuse=False runs them one by one:
    test_a_fused_model_runs_no_relu_pass_of_its_own); relu_pool_follows says the same from the layers alone."""
    rng = np.random.default_rng(1)
    x, gy = randn(rng, (2, 3, 8, 8), np.float32), randn(rng, (2, 5), np.float32)
    model = model_of("conv_relu", np.float32, True)
    assert not fusion.relu_pool_backward(model.layers, 2)          # nothing kept before a forward
    model.forward(x, training=True)
    assert fusion.relu_pool_backward(model.layers, 2)
    assert not any(fusion.relu_pool_backward(model.layers, i) for i in (0, 1, 3, 4, 5, 6))
    model.forward(x)                                                # inference keeps nothing
    assert not fusion.relu_pool_backward(model.layers, 2)
    bn = model_of("bn_relu", np.float32, True)
    bn.forward(x, training=True)
    assert not fusion.relu_pool_backward(bn.layers, 3)             # the batch norm pair took the pooling
    for net, fused in ((model, {2}), (bn, set())):
        net.forward(x, training=True)
        assert {i for i in range(len(net.layers)) if fusion.relu_pool_backward(net.layers, i)} == fused
        assert {i for i in range(len(net.layers))
                if fusion.relu_pool_follows(net.layers, i, fusion.pairs(net.layers))} == fused


def test_conv_relu_kernel_is_the_two_ops_in_a_row(rng):
    x = randn(rng, (2, 4, 9, 9), np.float32)
    w = randn(rng, (6, 4, 3, 3), np.float32)
    b = randn(rng, (6,), np.float32)
    assert_bitwise_equal(F._conv2d(x, w, b, stride=2, padding=1, relu=True),
                         F.relu(F.conv2d(x, w, b, stride=2, padding=1)))


def test_training_buffers_are_reused_across_steps_and_never_returned():
    """A second step of the same batch shape allocates no new big arrays: the layers' outputs and gradients are
    the previous step's buffers; the model's output and input gradient are new arrays each time."""
    convengine.manual_seed(0)
    model = Sequential([L.Conv2d(3, 16, 3, padding=1), L.BatchNorm2d(16), L.ReLU(), L.MaxPool2d(2),
                        L.Conv2d(16, 16, 3, padding=1), L.ReLU(), L.Flatten(), L.Linear(16 * 8 * 8, 5)])
    model.need_input_grad = True
    rng = np.random.default_rng(0)
    x, gy = randn(rng, (16, 3, 16, 16), np.float32), randn(rng, (16, 5), np.float32)   # arrays of >= 64 KB
    outs, grads, cached = [], [], []
    for _ in range(3):
        outs.append(model.forward(x, training=True))
        grads.append(model.backward(gy))
        cached.append((model.layers[1]._cache[3], model.layers[3]._indices, model.layers[5]._cache))
    forward_arena, backward_arena = model._workspaces
    assert forward_arena.nbytes() >= 8 * 16 * 16 * 16 * 4 * 2 and backward_arena.nbytes() >= 8 * 16 * 16 * 16 * 4
    for a, b in zip(cached[1], cached[2]):
        assert a is b                                           # the same buffers, step after step
    assert not np.shares_memory(outs[1], outs[2]) and not np.shares_memory(grads[1], grads[2])
    assert_bitwise_equal(outs[1], outs[2])
    assert_bitwise_equal(grads[1], grads[2])
    # the same values as without buffers
    plain = Sequential([L.Conv2d(3, 16, 3, padding=1), L.BatchNorm2d(16), L.ReLU(), L.MaxPool2d(2),
                        L.Conv2d(16, 16, 3, padding=1), L.ReLU(), L.Flatten(), L.Linear(16 * 8 * 8, 5)])
    plain.reuse_buffers = False
    for p, q in zip(plain.parameters(), model.parameters()):
        p.data[...] = q.data
    plain.layers[1].running_mean[...] = 0
    plain.need_input_grad = True
    assert_bitwise_equal(plain.forward(x, training=True), outs[2])
    assert_bitwise_equal(plain.backward(gy), grads[2])
    assert getattr(plain, "_workspaces", None) is None
    # a smaller last batch gets buffers of its own; the full batch keeps its own
    model.forward(x[:3], training=True)
    model.forward(x, training=True)
    assert model.layers[1]._cache[3] is cached[2][0]


class KeepsGradient(L.Layer):
    """An identity layer of the user's own that keeps every gradient it is given (the library's layers keep
    none): the gradient buffer it read must not be handed back within the step."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def forward(self, x, training=False):
        return x.copy()

    def backward(self, grad):
        self.kept.append((grad, grad.copy()))
        return grad.copy()

    def output_shape(self, input_shape):
        return tuple(input_shape)


def depthwise_separable_layers():
    return [L.Conv2d(3, 8, 3, padding=1), L.BatchNorm2d(8), L.ReLU(),
            L.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), L.BatchNorm2d(8), L.ReLU(),
            L.Conv2d(8, 8, 1, bias=False), L.BatchNorm2d(8), L.ReLU(),
            L.Conv2d(8, 8, 3, padding=1, groups=8), L.ReLU(), L.Conv2d(8, 8, 1), L.ReLU(),
            L.GlobalAvgPool2d(), L.Linear(8, 5)]


def test_backward_hands_gradient_buffers_back_within_a_step():
    """A gradient that the next layer down has read is dead: backward hands its buffer back, and the next gradient
    of its shape takes it. A net of same-shaped layers then holds two gradient buffers of that shape, not one per
    layer, with the values of a model without buffers, step after step; the footprint counts what is held; a
    layer of the user's own keeps what it was given (test_training_memory_bytes_is_what_a_step_holds: the
    footprint counts what is held)."""
    convengine.manual_seed(0)
    model = Sequential(depthwise_separable_layers())
    rng = np.random.default_rng(0)
    x, gy = randn(rng, (16, 3, 16, 16), np.float32), randn(rng, (16, 5), np.float32)   # 128 KiB per gradient
    plain = Sequential(depthwise_separable_layers())
    plain.reuse_buffers = False
    for p, q in zip(plain.parameters(), model.parameters()):
        p.data[...] = q.data
    for step in range(3):
        assert_bitwise_equal(model.forward(x, training=True), plain.forward(x, training=True))
        model.backward(gy)
        plain.backward(gy)
        for p, q in zip(model.parameters(), plain.parameters()):
            assert_bitwise_equal(p.grad, q.grad)
    _, backward_arena = model._workspaces
    planes = [a for arrays in backward_arena._passes.values() for a in arrays if a.shape == (16, 8, 16, 16)]
    assert len(planes) == 2                          # 9 layers' gradients of that shape
    # a layer that keeps its gradient: what it kept stays as it was
    keeper = KeepsGradient()
    layers = depthwise_separable_layers()
    kept_model = Sequential(layers[:6] + [keeper] + layers[6:])
    for _ in range(2):
        keeper.kept.clear()
        kept_model.forward(x, training=True)
        kept_model.backward(gy)
        assert len(keeper.kept) == 1
        for kept, copy in keeper.kept:
            assert_bitwise_equal(kept, copy)


def test_buffers_start_on_a_cache_line():
    """Every array of MIN_BYTES or more that the ops allocate, a training step's buffers and the arrays a call
    returns outside a step, starts on an ALIGN-byte line (NumPy's big arrays start 16 bytes past one); an arena
    takes a buffer back whether it is handed back as itself, as a view of it or as the memory under it, and
    ignores any other array."""
    assert _workspace.ALIGN == 64
    convengine.manual_seed(0)
    model = Sequential(depthwise_separable_layers())
    rng = np.random.default_rng(0)
    x, gy = randn(rng, (16, 3, 16, 16), np.float32), randn(rng, (16, 5), np.float32)
    for _ in range(2):
        model.forward(x, training=True)
        model.backward(gy)
    held = [a for arena in model._workspaces for arrays in arena._passes.values() for a in arrays]
    assert len(held) >= 4
    assert all(a.ctypes.data % 64 == 0 for a in held), sorted({a.ctypes.data % 64 for a in held})
    y = F.conv2d(randn(rng, (8, 16, 16, 16), np.float32), randn(rng, (16, 16, 3, 3), np.float32), padding=1)
    assert y.nbytes >= _workspace.MIN_BYTES and y.ctypes.data % 64 == 0
    for shape, dtype in (((3, 5, 7, 11), np.float64), ((1,), np.float32), ((0, 4), np.float32)):
        a = _workspace.aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.size == 0 or a.ctypes.data % 64 == 0
    arena = _workspace.Arena()
    for handed_back in (lambda a: a, lambda a: a.reshape(-1), lambda a: a.base):
        arena.begin("key")
        a = arena.take((64, 256), np.float32)
        arena.release(np.empty((64, 256), np.float32))      # not the arena's: ignored
        b = arena.take((64, 256), np.float32)
        assert b is not a
        arena.release(handed_back(a))
        assert arena.take((64, 256), np.float32) is a


@pytest.mark.parametrize("layers", [
    lambda: [L.Conv2d(3, 2, 3), L.ReLU(), L.Flatten()],
    lambda: [L.Conv2d(3, 2, 3), L.BatchNorm2d(2), L.ReLU(), L.Flatten(), L.Dropout(0.0)],
    lambda: [L.Flatten(), L.Linear(3 * 8 * 8, 4), L.ReLU()],
])
def test_what_the_model_returns_is_never_a_buffer(layers):
    convengine.manual_seed(0)
    model = Sequential(layers())
    model.need_input_grad = True
    x, _ = data(np.float32, batch=16)
    a = model.forward(x, training=True)
    ga = model.backward(np.ones_like(a))
    b = model.forward(x, training=True)
    gb = model.backward(np.ones_like(b))
    assert not np.shares_memory(a, b) and not np.shares_memory(ga, gb)
    assert_bitwise_equal(a, b)
    assert_bitwise_equal(ga, gb)


def pooled_layers():
    return [L.Conv2d(3, 16, 3, padding=1), L.BatchNorm2d(16), L.ReLU(), L.MaxPool2d(2),
            L.Conv2d(16, 32, 3, padding=1), L.ReLU(), L.GlobalAvgPool2d(), L.Linear(32, 5)]


def lenet_layers():
    return [L.Conv2d(3, 6, 5), L.ReLU(), L.MaxPool2d(2), L.Conv2d(6, 16, 5), L.ReLU(), L.MaxPool2d(2), L.Flatten(),
            L.Linear(16 * 5 * 5, 5)]


@pytest.mark.parametrize("net", [pooled_layers, depthwise_separable_layers, lenet_layers])
@pytest.mark.parametrize("fuse", [True, False])
def test_training_memory_bytes_is_what_a_step_holds(fuse, net):
    """The footprint computed from the shapes against the memory NumPy reports (tracemalloc) at the peak of a
    steady-state step, parameters added (they exist before the step); fusion makes it smaller. The separable
    net's gradients share buffers (test_backward_hands_gradient_buffers_back_within_a_step)."""
    import tracemalloc
    convengine.manual_seed(0)
    model = Sequential(net(), input_shape=(3, 32, 32))
    model.fuse = fuse
    rng = np.random.default_rng(0)
    x, y = randn(rng, (16, 3, 32, 32), np.float32), rng.integers(0, 5, 16)
    loss = CrossEntropyLoss()

    def step():
        loss(model.forward(x, training=True), y)
        model.backward(loss.backward())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        step()
        step()
        tracemalloc.reset_peak()
        step()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    parts = model.training_memory_bytes(16, detail=True)
    measured = peak + parts["parameters"] + x.nbytes
    assert 0.85 * measured <= parts["total"] <= 1.15 * measured, (parts, measured)
    assert parts["total"] == model.training_memory_bytes(16)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    unfused = Sequential(model.layers)
    unfused.fuse = False
    assert (parts["total"] < unfused.training_memory_bytes(16, (3, 32, 32))) == fuse
    with pytest.raises(ValueError, match="batch"):
        model.training_memory_bytes(0)
