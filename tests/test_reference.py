"""The NumPy reference against PyTorch (when installed).

The reference is the oracle every other test trusts, so it is checked here against an independent implementation:
PyTorch's forward ops and autograd, over grids of the hyper-parameters. Without torch these tests skip; each
backward is still checked against central differences of its forward in float64 (test_gradients.py).
"""
import itertools

import numpy as np
import pytest

from convengine import reference as R

from conftest import DTYPE_IDS, DTYPES, as_layout, assert_close, conv_params_ok, randn


pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def tensor(torch, a, grad=False):
    return torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def numpy(t):
    return t.detach().numpy()


def tf_same_pads(size, kernel, stride, dilation):
    """TensorFlow's 'SAME' padding (before, after), written out from its documentation: out = ceil(size / stride)."""
    out = (size + stride - 1) // stride
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


# ---------------------------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------------------------

CONV_GRID = list(itertools.product(
    [1, 2, 3],                               # stride
    [0, 1, (2, 1), 3, "valid", "same"],      # padding (3 is more than half the 3x2 kernel)
    [1, 2, (1, 2)],                          # dilation
    ["1", "2", "depthwise"],                 # groups
))


def conv_case(groups, dtype, rng, x_hw=(9, 8), k_hw=(3, 2), batch=2):
    C = 4
    G = {"1": 1, "2": 2, "depthwise": C}[groups]
    K = 6 if G != C else 2 * C
    x = randn(rng, (batch, C, *x_hw), dtype)
    w = randn(rng, (K, C // G, *k_hw), dtype)
    b = randn(rng, K, dtype)
    return x, w, b, G


def torch_conv(torch, x, w, b, stride, padding, dilation, groups, grad_out=None):
    """PyTorch's conv2d (and autograd gradients when grad_out is given); TF-style 'same' as explicit pads."""
    F = torch.nn.functional
    xt, wt = tensor(torch, x, True), tensor(torch, w, True)
    bt = tensor(torch, b, True) if b is not None else None
    s = stride if isinstance(stride, tuple) else (stride, stride)
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    inp = xt
    if padding == "same" and s != (1, 1):
        top, bottom = tf_same_pads(x.shape[2], w.shape[2], s[0], d[0])
        left, right = tf_same_pads(x.shape[3], w.shape[3], s[1], d[1])
        inp = F.pad(xt, (left, right, top, bottom))
        padding = 0
    y = F.conv2d(inp, wt, bt, stride=s, padding=padding, dilation=d, groups=groups)
    if grad_out is None:
        return numpy(y)
    y.backward(tensor(torch, grad_out))
    gb = numpy(bt.grad) if bt is not None else None
    return numpy(y), numpy(xt.grad), numpy(wt.grad), gb


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_GRID)
def test_conv2d_matches_torch(torch, rng, stride, padding, dilation, groups, bias, dtype):
    x, w, b, G = conv_case(groups, dtype, rng)
    if not bias:
        b = None
    if not conv_params_ok(x.shape, w.shape, stride, padding, dilation, G):
        pytest.skip("empty output")
    y = R.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=G)
    go = randn(rng, y.shape, dtype)
    ty, tgx, tgw, tgb = torch_conv(torch, x, w, b, stride, padding, dilation, G, grad_out=go)
    assert_close(y, ty, "y")
    gx, gw, gb = R.conv2d_backward(go, x, w, stride=stride, padding=padding, dilation=dilation, groups=G)
    assert_close(gx, tgx, "grad_x")
    assert_close(gw, tgw, "grad_weight")
    assert_close(gb, tgb if tgb is not None else go.sum(axis=(0, 2, 3)), "grad_bias")


@pytest.mark.parametrize("x_hw,k_hw,padding", [
    ((1, 1), (1, 1), 0),
    ((1, 1), (3, 3), 1),
    ((1, 7), (1, 3), "same"),
    ((13, 11), (7, 7), 3),
    ((7, 7), (7, 7), 0),
    ((5, 6), (4, 4), "same"),            # even kernel: the extra padding row/column goes bottom/right
    ((6, 5), (2, 5), (0, 2)),
])
def test_conv2d_odd_sizes_match_torch(torch, rng, x_hw, k_hw, padding):
    x, w, b, G = conv_case("1", np.float64, rng, x_hw=x_hw, k_hw=k_hw, batch=3)
    y = R.conv2d(x, w, b, padding=padding)
    go = randn(rng, y.shape)
    ty, tgx, tgw, tgb = torch_conv(torch, x, w, b, 1, padding, 1, 1, grad_out=go)
    assert_close(y, ty, "y")
    gx, gw, gb = R.conv2d_backward(go, x, w, padding=padding)
    assert_close(gx, tgx, "grad_x")
    assert_close(gw, tgw, "grad_weight")
    assert_close(gb, tgb, "grad_bias")


@pytest.mark.parametrize("size,kernel,stride,dilation", [
    (7, 3, 2, 1), (8, 3, 2, 1), (8, 4, 3, 1), (9, 2, 2, 2), (5, 5, 3, 1), (1, 3, 2, 1), (10, 1, 3, 1), (6, 3, 4, 2),
])
def test_conv2d_same_strided_is_asymmetric_padding(rng, size, kernel, stride, dilation):
    """TensorFlow's 'same' for stride > 1: output ceil(in / stride), the odd padding row/column at bottom/right."""
    x = randn(rng, (2, 3, size, size + 1))
    w = randn(rng, (4, 3, kernel, kernel))
    y = R.conv2d(x, w, stride=stride, padding="same", dilation=dilation)
    assert y.shape == (2, 4, -(-size // stride), -(-(size + 1) // stride))
    top, bottom = tf_same_pads(size, kernel, stride, dilation)
    left, right = tf_same_pads(size + 1, kernel, stride, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    assert_close(y, R.conv2d(xp, w, stride=stride, padding="valid", dilation=dilation), "y")

    go = randn(rng, y.shape)
    gx, gw, gb = R.conv2d_backward(go, x, w, stride=stride, padding="same", dilation=dilation)
    gxp, gwp, gbp = R.conv2d_backward(go, xp, w, stride=stride, padding="valid", dilation=dilation)
    assert_close(gx, gxp[:, :, top:top + size, left:left + size + 1], "grad_x")
    assert_close(gw, gwp, "grad_weight")
    assert_close(gb, gbp, "grad_bias")


def test_tf_same_padding_known_values():
    # Values from TensorFlow's padding documentation: in 7, k 3, s 2 pads 1+1; in 8 pads 0+1.
    assert tf_same_pads(7, 3, 2, 1) == (1, 1)
    assert tf_same_pads(8, 3, 2, 1) == (0, 1)
    x = np.arange(64.0).reshape(1, 1, 8, 8)
    w = np.ones((1, 1, 3, 3))
    y = R.conv2d(x, w, stride=2, padding="same")
    # First output pixel: window rows 0..2, cols 0..2 of x (no top/left padding for in 8).
    assert y[0, 0, 0, 0] == x[0, 0, 0:3, 0:3].sum()
    # Last one: rows 6..8 and cols 6..8, the 9th row/column being the bottom/right padding.
    assert y[0, 0, 3, 3] == x[0, 0, 6:8, 6:8].sum()


def test_conv2d_article_example():
    """The article's numbers: a 32x32x3 image and a 5x5x3 filter give a 28x28 feature map, each pixel the sum of
    the elementwise products of the filter and the 5x5x3 patch under it."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 3, 32, 32)).astype(np.float64)
    filters = rng.standard_normal((2, 3, 5, 5))
    y = R.conv2d(image, filters)
    assert y.shape == (1, 2, 28, 28)
    for f, r, c in [(0, 0, 0), (1, 27, 27), (0, 13, 4), (1, 5, 20)]:
        np.testing.assert_allclose(y[0, f, r, c], np.sum(image[0, :, r:r + 5, c:c + 5] * filters[f]), rtol=1e-12)


@pytest.mark.parametrize("layout", ["noncontiguous", "negative_stride", "readonly", "fortran"])
def test_conv2d_layouts(rng, layout):
    x, w, b, G = conv_case("2", np.float64, rng)
    expected = R.conv2d(x, w, b, stride=2, padding=1, groups=G)
    go = randn(rng, expected.shape)
    got = R.conv2d(as_layout(x, layout), as_layout(w, layout), as_layout(b, layout), stride=2, padding=1, groups=G)
    assert_close(got, expected, "y")
    want = R.conv2d_backward(go, x, w, stride=2, padding=1, groups=G)
    got = R.conv2d_backward(as_layout(go, layout), as_layout(x, layout), as_layout(w, layout), stride=2, padding=1,
                            groups=G)
    for name, a, e in zip(["grad_x", "grad_weight", "grad_bias"], got, want):
        assert_close(a, e, name)


def test_conv2d_empty_batch(torch, rng):
    x = randn(rng, (0, 4, 6, 6), np.float32)
    w = randn(rng, (6, 2, 3, 3), np.float32)
    b = randn(rng, 6, np.float32)
    y = R.conv2d(x, w, b, padding=1, groups=2)
    assert_close(y, torch_conv(torch, x, w, b, 1, 1, 1, 2), "y")
    gx, gw, gb = R.conv2d_backward(y, x, w, padding=1, groups=2)
    assert_close(gx, np.zeros_like(x), "grad_x")
    assert_close(gw, np.zeros_like(w), "grad_weight")
    assert_close(gb, np.zeros_like(b), "grad_bias")


def test_conv2d_need_input_grad_false(rng):
    x, w, b, G = conv_case("2", np.float64, rng)
    go = randn(rng, R.conv2d(x, w, groups=G).shape)
    gx, gw, gb = R.conv2d_backward(go, x, w, groups=G, need_input_grad=False)
    assert gx is None
    _, gw_full, gb_full = R.conv2d_backward(go, x, w, groups=G)
    assert_close(gw, gw_full, "grad_weight")
    assert_close(gb, gb_full, "grad_bias")


# ---------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------

def pool_ok(kernel_size, padding):
    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    return 2 * padding <= min(k)


POOL_GRID = [(k, s, p, c) for k, s, p, c in itertools.product(
    [2, 3, (3, 2), 1],              # kernel_size
    [None, 1, 2, (2, 3)],           # stride
    [0, 1],                         # padding
    [False, True],                  # ceil_mode
) if pool_ok(k, p)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size,stride,padding,ceil_mode", POOL_GRID)
def test_max_pool2d_matches_torch(torch, rng, kernel_size, stride, padding, ceil_mode, dtype):
    x = randn(rng, (2, 3, 7, 6), dtype)
    y, idx = R.max_pool2d(x, kernel_size, stride, padding, ceil_mode, return_indices=True)
    xt = tensor(torch, x, True)
    ty, tidx = torch.nn.functional.max_pool2d(xt, kernel_size, stride, padding, ceil_mode=ceil_mode,
                                              return_indices=True)
    np.testing.assert_array_equal(y, numpy(ty))
    assert y.dtype == dtype
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, tidx.numpy())
    assert_close(R.max_pool2d(x, kernel_size, stride, padding, ceil_mode), numpy(ty), "y without indices")

    go = randn(rng, y.shape, dtype)
    ty.backward(tensor(torch, go))
    assert_close(R.max_pool2d_backward(go, idx, x.shape), numpy(xt.grad), "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incpad", "nopad"])
@pytest.mark.parametrize("kernel_size,stride,padding,ceil_mode", POOL_GRID)
def test_avg_pool2d_matches_torch(torch, rng, kernel_size, stride, padding, ceil_mode, count_include_pad, dtype):
    x = randn(rng, (2, 3, 7, 6), dtype)
    y = R.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    xt = tensor(torch, x, True)
    ty = torch.nn.functional.avg_pool2d(xt, kernel_size, stride, padding, ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad)
    assert_close(y, numpy(ty), "y")
    go = randn(rng, y.shape, dtype)
    ty.backward(tensor(torch, go))
    gx = R.avg_pool2d_backward(go, x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad)
    assert_close(gx, numpy(xt.grad), "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_global_avg_pool2d_matches_torch(torch, rng, dtype):
    x = randn(rng, (3, 4, 7, 5), dtype)
    assert_close(R.global_avg_pool2d(x), numpy(torch.nn.functional.adaptive_avg_pool2d(tensor(torch, x), 1))[:, :, 0, 0],
                 "global_avg_pool2d")


@pytest.mark.parametrize("x_hw,kernel_size,stride,padding", [
    ((1, 1), 1, None, 0),
    ((1, 1), 2, 1, 1),
    ((1, 5), (1, 2), None, 0),
    ((9, 9), 7, 2, 3),
    ((5, 4), 2, 3, 1),
])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pools_odd_sizes_match_torch(torch, rng, x_hw, kernel_size, stride, padding, ceil_mode):
    x = randn(rng, (2, 2, *x_hw))
    F = torch.nn.functional
    y, idx = R.max_pool2d(x, kernel_size, stride, padding, ceil_mode, return_indices=True)
    ty, tidx = F.max_pool2d(tensor(torch, x), kernel_size, stride, padding, ceil_mode=ceil_mode,
                            return_indices=True)
    np.testing.assert_array_equal(y, numpy(ty))
    np.testing.assert_array_equal(idx, tidx.numpy())
    for cip in (True, False):
        assert_close(R.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, cip),
                     numpy(F.avg_pool2d(tensor(torch, x), kernel_size, stride, padding, ceil_mode=ceil_mode,
                                        count_include_pad=cip)), f"avg count_include_pad={cip}")


def test_max_pool2d_ties_match_torch(torch, rng):
    """Many equal values: the first maximum in row-major window order wins, with overlapping windows too."""
    x = rng.integers(0, 3, (3, 4, 9, 8)).astype(np.float32)
    for kernel_size, stride, padding in [(2, None, 0), (3, 1, 1), (3, 2, 1), ((2, 3), 1, 0)]:
        y, idx = R.max_pool2d(x, kernel_size, stride, padding, ceil_mode=True, return_indices=True)
        ty, tidx = torch.nn.functional.max_pool2d(tensor(torch, x), kernel_size, stride, padding, ceil_mode=True,
                                                  return_indices=True)
        np.testing.assert_array_equal(y, numpy(ty))
        np.testing.assert_array_equal(idx, tidx.numpy())


def test_max_pool2d_ties_first_in_window_order():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 0] = x[0, 0, 0, 1] = 5.0       # same window: (0, 1) comes first row by row
    y, idx = R.max_pool2d(x, 2, return_indices=True)
    assert y[0, 0, 0, 0] == 5.0
    assert idx[0, 0, 0, 0] == 1
    # An all-zero window points at its first pixel.
    assert idx[0, 0, 1, 1] == 2 * 4 + 2


def test_max_pool2d_nan_and_inf_match_torch(torch, rng):
    x = randn(rng, (2, 3, 8, 7), np.float32)
    x[0, 0, 0, 0] = np.nan                      # a single NaN
    x[0, 1, 2:4, 2:4] = np.nan                  # several NaN in one window
    x[1, 0, 1, 1] = np.nan
    x[1, 0, 2, 2] = np.nan                      # NaN shared by overlapping windows
    x[1, 2] = -np.inf                           # a plane of -inf: indices still point at real pixels
    x[1, 1, 4:6, 4:6] = np.inf
    for kernel_size, stride, padding, ceil_mode in [(2, None, 0, False), (3, 1, 1, True), (3, 2, 1, True)]:
        y, idx = R.max_pool2d(x, kernel_size, stride, padding, ceil_mode, return_indices=True)
        ty, tidx = torch.nn.functional.max_pool2d(tensor(torch, x), kernel_size, stride, padding,
                                                  ceil_mode=ceil_mode, return_indices=True)
        np.testing.assert_array_equal(y, numpy(ty))
        np.testing.assert_array_equal(idx, tidx.numpy())
        assert np.isnan(y[0, 0, 0, 0])


def test_max_pool2d_empty_batch():
    x = np.zeros((0, 3, 5, 5), np.float32)
    y, idx = R.max_pool2d(x, 2, return_indices=True)
    assert y.shape == idx.shape == (0, 3, 2, 2) and y.dtype == np.float32 and idx.dtype == np.int64
    gx = R.max_pool2d_backward(y, idx, x.shape)
    assert gx.shape == x.shape and gx.dtype == np.float32
    assert R.avg_pool2d(x, 2).shape == (0, 3, 2, 2)
    assert R.avg_pool2d_backward(y, x.shape, 2).shape == x.shape


def test_max_pool2d_backward_accumulates_shared_maxima():
    """Overlapping windows with the same maximum both send their gradient to it."""
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0
    y, idx = R.max_pool2d(x, 2, stride=1, return_indices=True)
    go = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    gx = R.max_pool2d_backward(go, idx, x.shape)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(gx, expected)


@pytest.mark.parametrize("layout", ["noncontiguous", "negative_stride", "readonly", "fortran"])
def test_pools_layouts(rng, layout):
    x = randn(rng, (2, 3, 7, 6))
    y, idx = R.max_pool2d(x, 3, 2, 1, True, return_indices=True)
    y2, idx2 = R.max_pool2d(as_layout(x, layout), 3, 2, 1, True, return_indices=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(idx2, idx)
    go = randn(rng, y.shape)
    assert_close(R.max_pool2d_backward(as_layout(go, layout), as_layout(idx, layout), x.shape),
                 R.max_pool2d_backward(go, idx, x.shape), "max grad_x")
    assert_close(R.avg_pool2d(as_layout(x, layout), 3, 2, 1, True), R.avg_pool2d(x, 3, 2, 1, True), "avg y")
    assert_close(R.avg_pool2d_backward(as_layout(go, layout), x.shape, 3, 2, 1, True),
                 R.avg_pool2d_backward(go, x.shape, 3, 2, 1, True), "avg grad_x")


# ---------------------------------------------------------------------------------------------------------------
# relu and linear
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7, 11), (0, 3), (5,)])
def test_relu_matches_torch(torch, rng, shape, dtype):
    x = randn(rng, shape, dtype)
    if x.size:
        x.reshape(-1)[0] = np.nan
        x.reshape(-1)[-1] = 0.0
    xt = tensor(torch, x, True)
    ty = torch.relu(xt)
    y = R.relu(x)
    assert_close(y, numpy(ty), "y")
    go = randn(rng, shape, dtype)
    ty.backward(tensor(torch, go))
    assert_close(R.relu_backward(go, x), numpy(xt.grad), "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,fin,fout", [(4, 7, 3), (1, 1, 1), (0, 5, 2), (33, 17, 10)])
def test_linear_matches_torch(torch, rng, n, fin, fout, bias, dtype):
    x = randn(rng, (n, fin), dtype)
    w = randn(rng, (fout, fin), dtype)
    b = randn(rng, fout, dtype) if bias else None
    xt, wt = tensor(torch, x, True), tensor(torch, w, True)
    bt = tensor(torch, b, True) if bias else None
    ty = torch.nn.functional.linear(xt, wt, bt)
    assert_close(R.linear(x, w, b), numpy(ty), "y")
    go = randn(rng, (n, fout), dtype)
    ty.backward(tensor(torch, go))
    gx, gw, gb = R.linear_backward(go, x, w)
    assert_close(gx, numpy(xt.grad), "grad_x")
    assert_close(gw, numpy(wt.grad), "grad_weight")
    assert_close(gb, numpy(bt.grad) if bias else go.sum(axis=0), "grad_bias")


@pytest.mark.parametrize("layout", ["noncontiguous", "negative_stride", "readonly", "fortran"])
def test_relu_linear_layouts(rng, layout):
    x = randn(rng, (4, 6))
    w = randn(rng, (3, 6))
    go = randn(rng, (4, 3))
    assert_close(R.relu(as_layout(x, layout)), R.relu(x), "relu")
    assert_close(R.relu_backward(as_layout(x, layout), as_layout(x, layout)), R.relu_backward(x, x), "relu grad")
    assert_close(R.linear(as_layout(x, layout), as_layout(w, layout)), R.linear(x, w), "linear")
    for a, e in zip(R.linear_backward(as_layout(go, layout), as_layout(x, layout), as_layout(w, layout)),
                    R.linear_backward(go, x, w)):
        assert_close(a, e, "linear grads")


# ---------------------------------------------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 1, 1), (1, 2, 7, 3)], ids=str)
def test_batch_norm2d_vs_torch(torch, rng, shape, dtype):
    x = randn(rng, shape, dtype) * 2 + 0.5
    w, b, go = randn(rng, shape[1], dtype), randn(rng, shape[1], dtype), randn(rng, shape, dtype)
    y, mean, var = R.batch_norm2d_training(x, w, b, eps=1e-3)
    xt, wt, bt = tensor(torch, x, True), tensor(torch, w, True), tensor(torch, b, True)
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-3)
    yt.backward(tensor(torch, go))
    assert_close(y, numpy(yt), "batch_norm2d_training y")
    assert_close(mean, numpy(xt.mean(dim=(0, 2, 3))), "batch_norm2d_training mean")
    assert_close(var, numpy(xt.var(dim=(0, 2, 3), unbiased=False)), "batch_norm2d_training var")
    got = R.batch_norm2d_backward(go, x, w, mean, var, eps=1e-3)
    for name, g, t in zip(["grad_x", "grad_weight", "grad_bias"], got, [xt, wt, bt]):
        assert_close(g, numpy(t.grad), f"batch_norm2d_backward {name}")
    rm, rv = randn(rng, shape[1], dtype), np.abs(randn(rng, shape[1], dtype)) + 0.1
    want = torch.nn.functional.batch_norm(tensor(torch, x), tensor(torch, rm), tensor(torch, rv), tensor(torch, w),
                                          tensor(torch, b), training=False, eps=1e-3)
    assert_close(R.batch_norm2d(x, w, b, rm, rv, eps=1e-3), numpy(want), "batch_norm2d y")
