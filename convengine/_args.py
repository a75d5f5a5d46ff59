"""Argument checking and output-size arithmetic shared by every tier.

`reference.py` and `functional.py` both call these helpers, so the two tiers agree on what is valid input, on the
error messages, and on output sizes: the arithmetic lives here once (as Chainer's `get_conv_outsize`), never
re-derived per op.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Kernels index with Py_ssize_t; anything bigger than this is refused before allocation.
MAX_ELEMENTS = np.iinfo(np.intp).max // 16
# Largest spatial extent (padded input side, dilated kernel side, stride, padding). Products of two such values
# fit in 64 bits, so the kernels' index arithmetic cannot wrap; no real image comes near it.
MAX_EXTENT = 2 ** 31 - 1


def check_array(a, name, ndim=None, dtype=None):
    """Return `a` if it is a float32/float64 ndarray of rank `ndim` (and of `dtype` when given), else raise."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but x has dtype {dtype}; all arrays must share one dtype")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def check_bool(value, name):
    """A bool (or NumPy bool): a flag given as 1 or "False" is refused, never taken for its truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_pixels(shape, name):
    """Refuse an image with no rows or no columns (as PyTorch does): padding alone would make every window empty."""
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{name} shape {tuple(shape)} has no pixels (H or W is 0)")


def check_int(value, name, minimum):
    """An integer (not bool) >= minimum."""
    if type(value) is int and value >= minimum:       # the common case, without the ABC checks (1 us a call)
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def pair(value, name, minimum, maximum=MAX_EXTENT):
    """An int or an (h, w) pair of ints, each in [minimum, maximum], as a tuple of two ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (check_int(value[0], name, minimum), check_int(value[1], name, minimum))
    else:
        v = check_int(value, name, minimum)
        out = (v, v)
    if max(out) > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}: more than this build can index")
    return out


def check_extent(name, *extents):
    """Refuse a padded input or dilated kernel side past MAX_EXTENT (see there)."""
    if max(extents) > MAX_EXTENT:
        raise ValueError(f"{name} {extents} exceeds {MAX_EXTENT}: more than this build can index")


def check_size(shape, name):
    n = 1
    for s in shape:
        n *= int(s)
    if n > MAX_ELEMENTS:
        raise ValueError(f"{name} of shape {tuple(shape)} has {n} elements, more than this build can index")


def conv_output_size(size, kernel, stride, pad_before, pad_after, dilation=1, ceil_mode=False):
    """Output length along one axis: floor((size + pads - dilation*(kernel-1) - 1) / stride) + 1.

    With ceil_mode (pooling) the division rounds up, but, as in PyTorch, the last window must start inside the
    input or the left padding.
    """
    span = size + pad_before + pad_after - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    if ceil_mode:
        out = ceil_div(span, stride) + 1
        if (out - 1) * stride >= size + pad_before:
            out -= 1
        return out
    return span // stride + 1


def same_padding(size, kernel, stride, dilation):
    """'same' padding along one axis: (before, after) so that output = ceil(size / stride).

    For stride 1 this is PyTorch's rule; for stride > 1, TensorFlow's. The odd extra pixel goes after.
    """
    out = ceil_div(size, stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


class ConvGeometry(NamedTuple):
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    groups: int
    out_h: int
    out_w: int

    @property
    def out_shape(self):
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def in_shape(self):
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)


_PLAIN = (int, str, bool, type(None))


def _plain_key(value):
    """value with the type of every leaf, when it is built only of ints, strs, bools, None and tuples of them
    (so True and 1 are different keys); None otherwise (a list, a NumPy scalar: not cached)."""
    if type(value) is tuple:
        parts = tuple(_plain_key(v) for v in value)
        return None if None in parts else (tuple, parts)
    return (type(value), value) if type(value) in _PLAIN else None


def _memoized(function):
    """function, remembering the results of its successful calls on plain arguments: a training step validates
    the same few geometries every batch. Calls that raise are never remembered, so bad input always raises."""
    cache = {}

    def wrapper(*args, **kwargs):
        key = _plain_key(args + tuple(sorted(kwargs.items())))
        if key is None:
            return function(*args, **kwargs)
        result = cache.get(key)
        if result is None:
            result = function(*args, **kwargs)
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = result
        return result
    wrapper.__doc__ = function.__doc__
    wrapper.__name__ = function.__name__
    wrapper.cache = cache
    return wrapper


@_memoized
def conv2d_geometry(x_shape, w_shape, stride, padding, dilation, groups):
    """Validate conv2d hyper-parameters against the input and weight shapes; return a ConvGeometry."""
    B, C, H, W = x_shape
    K, Cg, KH, KW = w_shape
    check_pixels(x_shape, "x")
    sh, sw = pair(stride, "stride", 1)
    dh, dw = pair(dilation, "dilation", 1)
    groups = check_int(groups, "groups", 1)
    if C % groups or K % groups:
        raise ValueError(f"groups={groups} must divide in_channels (x shape {tuple(x_shape)}) and out_channels "
                         f"(weight shape {tuple(w_shape)})")
    if Cg * groups != C:
        raise ValueError(f"weight shape {tuple(w_shape)} expects {Cg * groups} input channels with groups={groups}, "
                         f"but x shape {tuple(x_shape)} has {C}")
    if KH < 1 or KW < 1 or K < 1 or Cg < 1:
        raise ValueError(f"weight shape {tuple(w_shape)} must have non-zero out_channels, in_channels and kernel "
                         f"size")
    if isinstance(padding, str):
        if padding == "valid":
            pt = pb = pl = pr = 0
        elif padding == "same":
            pt, pb = same_padding(H, KH, sh, dh)
            pl, pr = same_padding(W, KW, sw, dw)
        else:
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        pt, pl = pair(padding, "padding", 0)
        pb, pr = pt, pl
    check_extent("padded input size", H + pt + pb, W + pl + pr)
    check_extent("dilated kernel size", dh * (KH - 1) + 1, dw * (KW - 1) + 1)
    OH = conv_output_size(H, KH, sh, pt, pb, dh)
    OW = conv_output_size(W, KW, sw, pl, pr, dw)
    if OH < 1 or OW < 1:
        raise ValueError(f"conv2d output would be empty: x shape {tuple(x_shape)}, weight shape {tuple(w_shape)}, "
                         f"stride {(sh, sw)}, padding {(pt, pl, pb, pr)}, dilation {(dh, dw)}")
    check_size((B, K, OH, OW), "conv2d output")
    return ConvGeometry(B, C, H, W, K, KH, KW, sh, sw, pt, pl, pb, pr, dh, dw, groups, OH, OW)


def conv2d_args(x, weight, bias, stride, padding, dilation, groups):
    """Check the arrays of a conv2d call and return its ConvGeometry."""
    check_array(x, "x", 4)
    check_array(weight, "weight", 4, x.dtype)
    if bias is not None:
        check_array(bias, "bias", 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias shape {bias.shape} does not match weight shape {weight.shape} (out_channels)")
    return conv2d_geometry(x.shape, weight.shape, stride, padding, dilation, groups)


def conv2d_backward_args(grad_out, x, weight, stride, padding, dilation, groups):
    geom = conv2d_args(x, weight, None, stride, padding, dilation, groups)
    check_array(grad_out, "grad_out", 4, x.dtype)
    if grad_out.shape != geom.out_shape:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match the conv2d output shape {geom.out_shape} "
                         f"for x shape {x.shape} and weight shape {weight.shape}")
    return geom


class PoolGeometry(NamedTuple):
    batch: int
    channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    out_h: int
    out_w: int

    @property
    def out_shape(self):
        return (self.batch, self.channels, self.out_h, self.out_w)


@_memoized
def pool2d_geometry(x_shape, kernel_size, stride, padding, ceil_mode, name="pool2d"):
    """Validate pooling hyper-parameters for an input of shape x_shape; return a PoolGeometry."""
    if len(x_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {tuple(x_shape)}")
    B, C, H, W = (check_int(s, "input_shape", 0) for s in x_shape)
    check_pixels(x_shape, "input")
    check_size(x_shape, f"{name} input")
    kh, kw = pair(kernel_size, "kernel_size", 1)
    sh, sw = (kh, kw) if stride is None else pair(stride, "stride", 1)
    ph, pw = pair(padding, "padding", 0)
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding {(ph, pw)} must be at most half of kernel_size {(kh, kw)}")
    check_extent("padded input size", H + 2 * ph, W + 2 * pw)
    ceil_mode = check_bool(ceil_mode, "ceil_mode")
    OH = conv_output_size(H, kh, sh, ph, ph, 1, ceil_mode)
    OW = conv_output_size(W, kw, sw, pw, pw, 1, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError(f"{name} output would be empty: input shape {tuple(x_shape)}, kernel_size {(kh, kw)}, "
                         f"stride {(sh, sw)}, padding {(ph, pw)}")
    check_size((B, C, OH, OW), f"{name} output")
    return PoolGeometry(B, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)


def pool_window(o, stride, pad, kernel, size):
    """The clipped input range [start, end) of output position o along one axis, and the unclipped window length
    counted against the padded input (what count_include_pad divides by)."""
    start = o * stride - pad
    end = min(start + kernel, size + pad)
    padded_len = end - start
    return max(start, 0), min(end, size), padded_len


def input_shape_arg(input_shape):
    if isinstance(input_shape, np.ndarray) or not isinstance(input_shape, (tuple, list)):
        raise TypeError(f"input_shape must be a tuple (N, C, H, W), got {input_shape!r}")
    return tuple(check_int(s, "input_shape", 0) for s in input_shape)


def linear_args(x, weight, bias):
    check_array(x, "x", 2)
    check_array(weight, "weight", 2, x.dtype)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight shape {weight.shape} expects {weight.shape[1]} input features, "
                         f"but x shape {x.shape} has {x.shape[1]}")
    if bias is not None:
        check_array(bias, "bias", 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias shape {bias.shape} does not match weight shape {weight.shape} (out_features)")
    check_size((x.shape[0], weight.shape[0]), "linear output")


def linear_backward_args(grad_out, x, weight):
    linear_args(x, weight, None)
    check_array(grad_out, "grad_out", 2, x.dtype)
    if grad_out.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_out shape {grad_out.shape} does not match the linear output shape "
                         f"{(x.shape[0], weight.shape[0])}")


def batch_norm2d_args(x, eps, vectors, training=False, grad_out=None):
    """Check the arrays of a batch_norm2d call: vectors ({name: array}: weight, bias, mean, var as the op takes
    them) must be per-channel vectors of x's dtype. Return eps as a float (finite, > 0). Batch statistics
    (training) need more than one value per channel."""
    check_array(x, "x", 4)
    channels = x.shape[1]
    for name, a in vectors.items():
        check_array(a, name, 1, x.dtype)
        if a.shape[0] != channels:
            raise ValueError(f"{name} shape {a.shape} does not match the {channels} channels of x shape {x.shape}")
    if grad_out is not None:
        check_array(grad_out, "grad_out", 4, x.dtype)
        if grad_out.shape != x.shape:
            raise ValueError(f"grad_out shape {grad_out.shape} does not match x shape {x.shape}")
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {eps!r}")
    eps = float(eps)
    if not (0 < eps < math.inf):
        raise ValueError(f"eps must be > 0 and finite, got {eps}")
    if training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"batch statistics need more than one value per channel, got x shape {x.shape}")
    return eps


def ceil_div(a, b):
    """ceil(a / b) for integers, exactly (no float rounding)."""
    return -(-a // b)


def check_labels(labels, n=None, num_classes=None, name="labels"):
    """Return labels as an intp array after checking: 1-D integers, n of them, each in [0, num_classes)."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of integer class labels, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must be integer class labels, got dtype {labels.dtype}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {n} samples")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{name} must be in {bound}, found values from {low} to {high}")
    return labels.astype(np.intp, copy=False)


def flops_conv2d(geom):
    """Multiply-adds x 2 of one conv2d forward."""
    return 2 * math.prod(geom.out_shape) * (geom.in_channels // geom.groups) * geom.kernel_h * geom.kernel_w


def check_max_pool_backward(grad_out, indices, input_shape):
    """Check max_pool2d_backward's indices and input_shape against grad_out; return input_shape as a tuple.
    (Index values are range-checked where they are used.)"""
    input_shape = input_shape_arg(input_shape)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape}")
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices must be a numpy.ndarray, got {type(indices).__name__}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if indices.shape != grad_out.shape:
        raise ValueError(f"indices shape {indices.shape} does not match grad_out shape {grad_out.shape}")
    if tuple(grad_out.shape[:2]) != input_shape[:2]:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match input_shape {input_shape} in (N, C)")
    check_size(input_shape, "input_shape")
    return input_shape
