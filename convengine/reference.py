"""The ops of convengine in plain NumPy: the oracle the compiled engine is tested against, and its speed baseline.

Every function has the signature and the semantics of its twin in `convengine.functional` (see DESIGN.md), which
follow PyTorch. The code is meant to be read next to a beginner's article on CNNs: a convolution slides a filter
over the image and sums elementwise products. Instead of a Python loop over every output pixel, each function loops
over the few positions (i, j) inside the filter and handles all output pixels of that position at once: the input
pixels that filter position i, j touches, for every output pixel, form one strided slice of the padded input.

Arrays are NCHW: N images, C channels, H rows, W columns.
"""
import numpy as np

from ._args import (batch_norm2d_args, check_array, check_bool, check_max_pool_backward, conv2d_args,
                    conv2d_backward_args, input_shape_arg, linear_args, linear_backward_args, pool2d_geometry,
                    pool_window)

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "relu", "relu_backward", "linear", "linear_backward", "batch_norm2d", "batch_norm2d_training",
           "batch_norm2d_backward"]


def _window_slice(offset, dilation, stride, count):
    """Rows (or columns) of the padded input that filter position `offset` meets, one per output position."""
    start = offset * dilation
    return slice(start, start + stride * (count - 1) + 1, stride)


# ---------------------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------------------

def _pad_input(x, g):
    """x with g's zero padding around each image (top/bottom and left/right may differ for 'same')."""
    return np.pad(x, ((0, 0), (0, 0), (g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right)))


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation, as in every CNN library) of x (N, C, H, W) with weight
    (K, C // groups, KH, KW), plus bias (K,). Returns y (N, K, OH, OW).

    With groups > 1 the channels are split into `groups` independent slices: output channels of group g only see
    input channels of group g (groups == C is a depthwise convolution).
    """
    g = conv2d_args(x, weight, bias, stride, padding, dilation, groups)
    G = g.groups
    xp = _pad_input(x, g)
    # Split the channel axes by group: x -> (N, G, C/G, H, W), weight -> (G, K/G, C/G, KH, KW).
    xp = xp.reshape(g.batch, G, g.in_channels // G, xp.shape[2], xp.shape[3])
    w = weight.reshape(G, g.out_channels // G, g.in_channels // G, g.kernel_h, g.kernel_w)

    y = np.zeros((g.batch, G, g.out_channels // G, g.out_h, g.out_w), dtype=x.dtype)
    for i in range(g.kernel_h):
        rows = _window_slice(i, g.dilation_h, g.stride_h, g.out_h)
        for j in range(g.kernel_w):
            cols = _window_slice(j, g.dilation_w, g.stride_w, g.out_w)
            # The pixel under filter tap (i, j) for every output position: (N, G, C/G, OH, OW).
            patch = xp[:, :, :, rows, cols]
            # Multiply by the tap's weights and sum over the input channels of the group.
            y += np.einsum("ngchw,gkc->ngkhw", patch, w[:, :, :, i, j], optimize=True)

    y = y.reshape(g.out_shape)
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1, need_input_grad=True):
    """Gradients of conv2d given grad_out = dL/dy (N, K, OH, OW).

    Returns (grad_x or None when need_input_grad is false, grad_weight, grad_bias). Each output pixel y was a sum of
    weight * input products, so its gradient flows back to the weight through the input pixel it multiplied and to
    the input pixel through the weight: the forward pass read backwards, one filter tap at a time.
    """
    g = conv2d_backward_args(grad_out, x, weight, stride, padding, dilation, groups)
    need_input_grad = check_bool(need_input_grad, "need_input_grad")
    G = g.groups
    xp = _pad_input(x, g)
    padded_shape = xp.shape
    xp = xp.reshape(g.batch, G, g.in_channels // G, padded_shape[2], padded_shape[3])
    w = weight.reshape(G, g.out_channels // G, g.in_channels // G, g.kernel_h, g.kernel_w)
    gy = grad_out.reshape(g.batch, G, g.out_channels // G, g.out_h, g.out_w)

    grad_bias = grad_out.sum(axis=(0, 2, 3))
    grad_w = np.zeros(w.shape, dtype=x.dtype)
    grad_xp = np.zeros(xp.shape, dtype=x.dtype) if need_input_grad else None
    for i in range(g.kernel_h):
        rows = _window_slice(i, g.dilation_h, g.stride_h, g.out_h)
        for j in range(g.kernel_w):
            cols = _window_slice(j, g.dilation_w, g.stride_w, g.out_w)
            patch = xp[:, :, :, rows, cols]
            # dL/dw[k, c, i, j] = sum over images and output pixels of grad_out * the input pixel under tap (i, j).
            grad_w[:, :, :, i, j] = np.einsum("ngkhw,ngchw->gkc", gy, patch, optimize=True)
            if need_input_grad:
                # dL/dx[pixel] collects grad_out * w[k, c, i, j] from every output pixel whose tap (i, j) it was.
                grad_xp[:, :, :, rows, cols] += np.einsum("ngkhw,gkc->ngchw", gy, w[:, :, :, i, j], optimize=True)

    grad_x = None
    if need_input_grad:
        # Gradients that landed on the zero padding belong to no input pixel: crop them away.
        grad_x = grad_xp.reshape(padded_shape)[:, :, g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]
        grad_x = np.ascontiguousarray(grad_x)
    return grad_x, grad_w.reshape(weight.shape), grad_bias


# ---------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------

def _pool_padding(g):
    """(before, after) padding per spatial axis so that every window, ceil_mode's last one included, lies inside."""
    extra_h = max((g.out_h - 1) * g.stride_h + g.kernel_h - g.height - g.pad_h, 0)
    extra_w = max((g.out_w - 1) * g.stride_w + g.kernel_w - g.width - g.pad_w, 0)
    return (g.pad_h, extra_h), (g.pad_w, extra_w)


def _window_starts(g):
    """Flat index (row * W + column) of the first input pixel of every window, an (OH, OW) array."""
    first_row = np.array([pool_window(o, g.stride_h, g.pad_h, g.kernel_h, g.height)[0] for o in range(g.out_h)])
    first_col = np.array([pool_window(o, g.stride_w, g.pad_w, g.kernel_w, g.width)[0] for o in range(g.out_w)])
    return first_row[:, None] * g.width + first_col[None, :]


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, return_indices=False):
    """The largest value in each kernel_size window of every channel. stride defaults to kernel_size.

    Padding never wins (it counts as -inf). Of equal maxima the first in the window (row by row) wins; a NaN in the
    window wins over any number, as in PyTorch. With return_indices, also returns where each maximum was: an int64
    array of flat positions (row * W + column) within the input's H x W plane.
    """
    check_array(x, "x", 4)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, ceil_mode, "max_pool2d")
    return_indices = check_bool(return_indices, "return_indices")
    pad_h, pad_w = _pool_padding(g)
    xp = np.pad(x, ((0, 0), (0, 0), pad_h, pad_w), constant_values=-np.inf)
    # Where each padded pixel came from in the original plane (-1 for padding, which can never be picked).
    positions = np.arange(g.height * g.width, dtype=np.int64).reshape(g.height, g.width)
    positions = np.pad(positions, (pad_h, pad_w), constant_values=-1)

    best = np.full(g.out_shape, -np.inf, dtype=x.dtype)
    # A window of -inf pixels still points at a real pixel: its first one, as PyTorch does.
    best_index = np.broadcast_to(_window_starts(g), g.out_shape).copy()
    for i in range(g.kernel_h):
        rows = _window_slice(i, 1, g.stride_h, g.out_h)
        for j in range(g.kernel_w):
            cols = _window_slice(j, 1, g.stride_w, g.out_w)
            value = xp[:, :, rows, cols]
            # Strictly greater keeps the first of equal maxima; any NaN takes over, like PyTorch's CPU kernel.
            take = (value > best) | np.isnan(value)
            best = np.where(take, value, best)
            best_index = np.where(take, positions[rows, cols], best_index)

    if return_indices:
        return best, best_index
    return best


def max_pool2d_backward(grad_out, indices, input_shape):
    """Gradient of max_pool2d: each window's gradient goes to the one input pixel that was its maximum.

    `indices` is what max_pool2d(..., return_indices=True) returned; input_shape is x.shape.
    """
    check_array(grad_out, "grad_out", 4)
    N, C, H, W = input_shape = check_max_pool_backward(grad_out, indices, input_shape)
    if indices.size and (indices.min() < 0 or indices.max() >= H * W):
        raise ValueError(f"indices must lie in [0, {H * W}) for input_shape {input_shape}, got values in "
                         f"[{indices.min()}, {indices.max()}]")

    grad_x = np.zeros((N, C, H * W), dtype=grad_out.dtype)
    n = np.arange(N)[:, None, None]
    c = np.arange(C)[None, :, None]
    windows = grad_out.shape[2] * grad_out.shape[3]
    # add.at, not fancy-index +=, because overlapping windows can pick the same pixel and both gradients count.
    np.add.at(grad_x, (n, c, indices.reshape(N, C, windows)), grad_out.reshape(N, C, windows))
    return grad_x.reshape(input_shape)


def _avg_divisors(g, count_include_pad, dtype):
    """What each window's sum is divided by, an (OH, OW) array (as PyTorch: see _args.pool_window)."""
    def per_axis(out, stride, pad, kernel, size):
        counts = []
        for o in range(out):
            start, end, padded_len = pool_window(o, stride, pad, kernel, size)
            counts.append(padded_len if count_include_pad else end - start)
        return np.array(counts, dtype=dtype)

    rows = per_axis(g.out_h, g.stride_h, g.pad_h, g.kernel_h, g.height)
    cols = per_axis(g.out_w, g.stride_w, g.pad_w, g.kernel_w, g.width)
    return rows[:, None] * cols[None, :]


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """The mean of each kernel_size window of every channel. stride defaults to kernel_size.

    With count_include_pad the zero padding counts towards the mean; otherwise only real pixels do.
    """
    check_array(x, "x", 4)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    count_include_pad = check_bool(count_include_pad, "count_include_pad")
    pad_h, pad_w = _pool_padding(g)
    xp = np.pad(x, ((0, 0), (0, 0), pad_h, pad_w))

    total = np.zeros(g.out_shape, dtype=x.dtype)
    for i in range(g.kernel_h):
        rows = _window_slice(i, 1, g.stride_h, g.out_h)
        for j in range(g.kernel_w):
            cols = _window_slice(j, 1, g.stride_w, g.out_w)
            total += xp[:, :, rows, cols]
    return total / _avg_divisors(g, count_include_pad, x.dtype)


def avg_pool2d_backward(grad_out, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of avg_pool2d: each window's gradient, divided by its divisor, is shared by all its pixels."""
    input_shape = input_shape_arg(input_shape)
    g = pool2d_geometry(input_shape, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    count_include_pad = check_bool(count_include_pad, "count_include_pad")
    check_array(grad_out, "grad_out", 4)
    if grad_out.shape != g.out_shape:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match the avg_pool2d output shape "
                         f"{g.out_shape} for input_shape {input_shape}")
    pad_h, pad_w = _pool_padding(g)
    share = grad_out / _avg_divisors(g, count_include_pad, grad_out.dtype)

    grad_xp = np.zeros((g.batch, g.channels, g.height + sum(pad_h), g.width + sum(pad_w)), dtype=grad_out.dtype)
    for i in range(g.kernel_h):
        rows = _window_slice(i, 1, g.stride_h, g.out_h)
        for j in range(g.kernel_w):
            cols = _window_slice(j, 1, g.stride_w, g.out_w)
            grad_xp[:, :, rows, cols] += share
    return np.ascontiguousarray(grad_xp[:, :, g.pad_h:g.pad_h + g.height, g.pad_w:g.pad_w + g.width])


# ---------------------------------------------------------------------------------------------------------------
# Activation and fully connected layer
# ---------------------------------------------------------------------------------------------------------------

def global_avg_pool2d(x):
    """The mean of each feature map: (N, C, H, W) -> (N, C)."""
    return x.mean(axis=(2, 3))


def relu(x):
    """max(x, 0) elementwise, any shape. NaN stays NaN."""
    check_array(x, "x")
    return np.maximum(x, x.dtype.type(0))


def relu_backward(grad_out, x):
    """Gradient of relu: grad_out where x > 0, else 0 (PyTorch's rule, which also passes the gradient of a NaN)."""
    check_array(x, "x")
    check_array(grad_out, "grad_out", x.ndim, x.dtype)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match x shape {x.shape}")
    return np.where(x <= 0, grad_out.dtype.type(0), grad_out)


def linear(x, weight, bias=None):
    """Fully connected layer: x (N, in) times weight (out, in) transposed, plus bias (out,). Returns (N, out)."""
    linear_args(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(grad_out, x, weight):
    """Gradients of linear given grad_out (N, out): (grad_x, grad_weight, grad_bias)."""
    linear_backward_args(grad_out, x, weight)
    return grad_out @ weight, grad_out.T @ x, grad_out.sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Batch normalisation (Ioffe & Szegedy, 2015)
# ---------------------------------------------------------------------------------------------------------------

def _per_channel(v):
    """A (C,) vector shaped to broadcast over (N, C, H, W)."""
    return v[None, :, None, None]


def batch_norm2d(x, weight, bias, mean, var, eps=1e-5):
    """Normalise each channel with the given statistics, then scale and shift:
    y = (x - mean) / sqrt(var + eps) * weight + bias."""
    eps = batch_norm2d_args(x, eps, dict(weight=weight, bias=bias, mean=mean, var=var))
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    return (x - _per_channel(mean)) * _per_channel(weight * inv_std) + _per_channel(bias)


def batch_norm2d_training(x, weight, bias, eps=1e-5):
    """batch_norm2d with the statistics of the batch itself, over the images and pixels of each channel. Returns
    (y, mean, var); var is the biased variance (divided by N*H*W), the one used to normalise."""
    eps = batch_norm2d_args(x, eps, dict(weight=weight, bias=bias), training=True)
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - _per_channel(mean)) ** 2).mean(axis=(0, 2, 3))
    return batch_norm2d(x, weight, bias, mean, var, eps), mean, var


def batch_norm2d_backward(grad_out, x, weight, mean, var, eps=1e-5):
    """Gradients of batch_norm2d_training given its mean and var: (grad_x, grad_weight, grad_bias).

    With xhat = (x - mean) / sqrt(var + eps) and m = N*H*W values per channel, grad_bias = sum(g) and
    grad_weight = sum(g * xhat); since the mean and the variance are functions of the whole batch,
    grad_x = weight / sqrt(var + eps) * (g - sum(g) / m - xhat * sum(g * xhat) / m)."""
    eps = batch_norm2d_args(x, eps, dict(weight=weight, mean=mean, var=var), training=True,
                                       grad_out=grad_out)
    m = x.dtype.type(x.shape[0] * x.shape[2] * x.shape[3])
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    xhat = (x - _per_channel(mean)) * _per_channel(inv_std)
    grad_bias = grad_out.sum(axis=(0, 2, 3))
    grad_weight = (grad_out * xhat).sum(axis=(0, 2, 3))
    grad_x = _per_channel(weight * inv_std) * (grad_out - _per_channel(grad_bias / m)
                                              - xhat * _per_channel(grad_weight / m))
    return grad_x, grad_weight, grad_bias
