"""The public ops, on the compiled kernels.

Each function validates and normalises its arguments (shared with `reference.py` through `_args.py`), allocates
the outputs, makes the inputs C-contiguous (a copy only when they are not already), and calls one kernel of the
ISA level picked at import. No loops over data live here. Signatures and semantics: DESIGN.md; the plain-NumPy
twin of every function is in `convengine.reference`.
"""
import numpy as np

from . import _args, _threads, _workspace
from ._kernels import engine as _engine
from ._threads import get_num_threads

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "global_avg_pool2d", "relu", "relu_backward", "linear", "linear_backward", "batch_norm2d", "batch_norm2d_training",
           "batch_norm2d_backward"]


# Below these sizes a call runs on one thread: waking the OpenMP team costs tens of microseconds, more than such a
# call takes (a small CNN's training step makes dozens of them). Results do not depend on the thread count.
_SERIAL_FLOPS = 4_000_000
_SERIAL_ELEMENTS = 1 << 16


def _threads_for(work, serial_below):
    # _threads.every_call_threaded() (for tests) turns the threshold off.
    return 1 if work < serial_below and _threads._serial_small_calls else get_num_threads()


def _contiguous(a):
    """a as a C-contiguous, aligned array: a copy only when it is not one already. (An array viewed from a byte
    buffer can be C-contiguous yet misaligned, and its strides then not multiples of the item size.)"""
    flags = a.flags
    if flags.c_contiguous and flags.aligned:
        return a
    return np.require(a, requirements=["C", "A"])


def _aligned(a):
    """a with aligned data and strides (whole items), any layout: what the strided GEMM reads."""
    return np.require(a, requirements=["A"])


def _conv_params(g):
    return (g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dilation_h, g.dilation_w, g.groups, g.out_h, g.out_w)


def _pool_params(g):
    return (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.out_h, g.out_w)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation, as in PyTorch) of x (N, C, H, W) with weight (K, C/groups, KH, KW)."""
    return _conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, relu=False, winograd=False):
    """conv2d; relu: relu(conv2d(...)), the ReLU applied as each output tile is stored; winograd: by Winograd
    F(2x2, 3x3) where the conv is one it takes (_winograd_weights), else as conv2d."""
    geom = _args.conv2d_args(x, weight, bias, stride, padding, dilation, groups)
    out = _workspace.empty(geom.out_shape, dtype=x.dtype)
    if geom.batch == 0:
        return out
    x, weight, params = _contiguous(x), _contiguous(weight), _conv_params(geom)
    packed = _winograd_weights(x.shape, weight, params) if winograd else None
    _engine.conv2d_forward(x, weight, None if bias is None else _contiguous(bias), out, params,
                           _threads_for(_args.flops_conv2d(geom), _SERIAL_FLOPS), relu=relu, packed=packed)
    return out


def _winograd_weights(x_shape, weight, params):
    """weight (C-contiguous) packed for Winograd F(2x2, 3x3), as conv2d_forward's `packed` for input x_shape and
    params; None where the engine does not take that conv by Winograd (engine.winograd_takes: float32, 3x3, stride
    1, dilation 1, one group, 32 or more input channels, 16 or more output channels). Packed on every call: the
    weights of a training step are new each step (a 64 -> 128-channel conv: 0.07 ms against the 0.9 ms it saves of
    8x8 planes at batch 64, 2 threads, Zen 4)."""
    if not _engine.winograd_takes(x_shape, weight.shape, params, weight.itemsize):
        return None
    return _packed_weights(x_shape, weight, params, _engine.WINOGRAD_PATH)


def _packed_weights(x_shape, weight, params, path):
    """weight (C-contiguous) packed once by engine.conv2d_pack for `path` (AUTO_PATH: the path the shape takes), as
    conv2d_forward's `packed`; None where that path packs no weights (engine.conv2d_pack_length)."""
    length = _engine.conv2d_pack_length(x_shape, weight.shape, params, weight.itemsize, path)
    if not length:
        return None
    buffer = np.empty(length, weight.dtype)
    return _engine.conv2d_pack(x_shape, weight, params, buffer, path), buffer


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1, need_input_grad=True):
    """Gradients of conv2d: (grad_x or None when need_input_grad is False, grad_weight, grad_bias)."""
    return _conv2d_backward(grad_out, x, weight, stride, padding, dilation, groups, need_input_grad)


def _conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1, need_input_grad=True,
                     need_bias_grad=True, winograd=False):
    """conv2d_backward; need_bias_grad=False (a conv without bias) skips grad_bias's pass over grad_out and gives
    None for it; winograd: grad_x by Winograd F(2x2, 3x3) where its conv is one the engine takes that way
    (_winograd_grad_input), and grad_weight where engine.winograd_grad_weight_takes (many channels and tiles)."""
    geom = _args.conv2d_backward_args(grad_out, x, weight, stride, padding, dilation, groups)
    need_input_grad = _args.check_bool(need_input_grad, "need_input_grad")
    grad_out = _contiguous(grad_out)
    params = _conv_params(geom)
    n_threads = _threads_for(_args.flops_conv2d(geom), _SERIAL_FLOPS)
    grad_w = _workspace.empty(weight.shape, dtype=x.dtype)
    grad_b = _workspace.empty(weight.shape[0], dtype=x.dtype) if need_bias_grad else None
    x = _contiguous(x)
    if winograd and _engine.winograd_grad_weight_takes(x.shape, weight.shape, params, weight.itemsize):
        _engine.conv2d_grad_weight_winograd(grad_out, x, grad_w, grad_b, params, n_threads)
    else:
        _engine.conv2d_grad_weight(grad_out, x, grad_w, grad_b, params, n_threads)
    grad_x = None
    if need_input_grad:
        grad_x = _workspace.empty(x.shape, dtype=x.dtype)
        weight = _contiguous(weight)
        if not (winograd and _winograd_grad_input(grad_out, weight, params, grad_x, n_threads)):
            _engine.conv2d_grad_input(grad_out, weight, grad_x, params, n_threads)
    return grad_x, grad_w, grad_b


def _winograd_grad_input(grad_out, weight, params, grad_x, n_threads):
    """grad_x = the input gradient of a stride-1 conv, computed by Winograd F(2x2, 3x3) as the forward conv of
    grad_out with the weights' channels swapped and taps reversed, zero padded by KH-1-pad_top, KW-1-pad_left
    (its padding at the bottom and right, implied by the output size, is the conv's own); True where it did, False
    where the engine does not take that conv by Winograd (see _winograd_weights: grad_out's channels are its input
    channels) or the padding exceeds the taps."""
    kh, kw = weight.shape[2:]
    sh, sw, pt, pl, dh, dw, groups = params[:7]
    if (sh, sw, dh, dw, groups) != (1, 1, 1, 1, 1) or not (0 <= pt < kh and 0 <= pl < kw):
        return False
    transposed = (1, 1, kh - 1 - pt, kw - 1 - pl, 1, 1, 1) + grad_x.shape[2:]
    flipped_shape = (weight.shape[1], weight.shape[0], kh, kw)
    if not _engine.winograd_takes(grad_out.shape, flipped_shape, transposed, weight.itemsize):
        return False
    flipped = np.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    _engine.conv2d_forward(grad_out, flipped, None, grad_x, transposed, n_threads,
                           packed=_winograd_weights(grad_out.shape, flipped, transposed))
    return True


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, return_indices=False):
    """Max pooling over (N, C, H, W); with return_indices also the int64 flat H*W position of each maximum."""
    _args.check_array(x, "x", 4)
    geom = _args.pool2d_geometry(x.shape, kernel_size, stride, padding, ceil_mode, "max_pool2d")
    return_indices = _args.check_bool(return_indices, "return_indices")
    out = _workspace.empty(geom.out_shape, dtype=x.dtype)
    indices = _workspace.empty(geom.out_shape, dtype=np.int64) if return_indices else None
    _engine.max_pool2d_forward(_contiguous(x), out, indices, _pool_params(geom),
                               _threads_for(x.size, _SERIAL_ELEMENTS))
    return (out, indices) if return_indices else out


def max_pool2d_backward(grad_out, indices, input_shape):
    """Gradient of max_pool2d: grad_out scattered to the positions in indices, for an input of input_shape."""
    return _max_pool2d_backward(grad_out, indices, input_shape)


def _max_pool2d_relu_backward(grad_out, indices, relu_out):
    """relu_backward(max_pool2d_backward(grad_out, indices, relu_out.shape), relu_out) in one pass, bit for bit:
    the pooled input relu_out is a ReLU's output, and nothing is scattered where it is <= 0 (Sequential's
    fusion of ReLU, MaxPool2d in backward)."""
    _args.check_array(relu_out, "relu_out", 4, grad_out.dtype)
    return _max_pool2d_backward(grad_out, indices, relu_out.shape, relu_out)


def _max_pool2d_backward(grad_out, indices, input_shape, relu_out=None):
    _args.check_array(grad_out, "grad_out", 4)
    input_shape = _args.check_max_pool_backward(grad_out, indices, input_shape)
    grad_x = _workspace.empty(input_shape, dtype=grad_out.dtype)
    planes = input_shape[0] * input_shape[1]
    hw = input_shape[2] * input_shape[3]
    bad = _engine.max_pool2d_backward(_contiguous(grad_out).reshape(-1),
                                      _contiguous(indices.astype(np.int64, copy=False)).reshape(-1),
                                      grad_x.reshape(-1), planes, hw, _threads_for(grad_x.size, _SERIAL_ELEMENTS),
                                      None if relu_out is None else _contiguous(relu_out).reshape(-1),
                                      grad_out.shape[3], input_shape[3])
    if bad:
        raise ValueError(f"indices has {bad} values outside [0, {hw}) for input_shape {input_shape}")
    return grad_x


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Average pooling over (N, C, H, W)."""
    _args.check_array(x, "x", 4)
    geom = _args.pool2d_geometry(x.shape, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    count_include_pad = _args.check_bool(count_include_pad, "count_include_pad")
    out = _workspace.empty(geom.out_shape, dtype=x.dtype)
    _engine.avg_pool2d_forward(_contiguous(x), out, _pool_params(geom), count_include_pad,
                               _threads_for(x.size, _SERIAL_ELEMENTS))
    return out


def avg_pool2d_backward(grad_out, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of avg_pool2d for an input of input_shape."""
    _args.check_array(grad_out, "grad_out", 4)
    input_shape = _args.input_shape_arg(input_shape)
    geom = _args.pool2d_geometry(input_shape, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    count_include_pad = _args.check_bool(count_include_pad, "count_include_pad")
    if grad_out.shape != geom.out_shape:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match the avg_pool2d output shape "
                         f"{geom.out_shape} for input_shape {input_shape}")
    grad_x = _workspace.empty(input_shape, dtype=grad_out.dtype)
    _engine.avg_pool2d_backward(_contiguous(grad_out), grad_x, _pool_params(geom), count_include_pad,
                                _threads_for(grad_x.size, _SERIAL_ELEMENTS))
    return grad_x


def global_avg_pool2d(x):
    """The mean of each feature map: (N, C, H, W) -> (N, C), for non-empty maps."""
    _args.check_array(x, "x", 4)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"global_avg_pool2d needs non-empty feature maps, got x shape {x.shape}")
    out = _workspace.empty(x.shape[:2], dtype=x.dtype)
    _engine.global_avg_pool2d_forward(np.ascontiguousarray(x), out, _threads_for(x.size, _SERIAL_ELEMENTS))
    return out


def _global_avg_pool2d_backward(grad_out, input_shape):
    """The gradient of global_avg_pool2d: each (N, C) value of grad_out spread evenly over its H x W map."""
    _args.check_array(grad_out, "grad_out", 2)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or shape[:2] != grad_out.shape or shape[2] * shape[3] == 0:
        raise ValueError(f"global_avg_pool2d_backward: grad_out of shape {grad_out.shape} does not match an input "
                         f"of shape {shape}")
    grad_x = _workspace.empty(shape, dtype=grad_out.dtype)
    _engine.global_avg_pool2d_backward(_contiguous(grad_out), grad_x, _threads_for(grad_x.size, _SERIAL_ELEMENTS))
    return grad_x


def relu(x):
    """max(x, 0) elementwise; NaN stays NaN."""
    _args.check_array(x, "x")
    out = _workspace.empty(x.shape, dtype=x.dtype)
    _engine.relu_forward(_contiguous(x).reshape(-1), out.reshape(-1), _threads_for(x.size, _SERIAL_ELEMENTS))
    return out


def relu_backward(grad_out, x):
    """grad_out where x > 0 (or x is NaN), else 0."""
    _args.check_array(x, "x")
    _args.check_array(grad_out, "grad_out", x.ndim, x.dtype)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {grad_out.shape} does not match x shape {x.shape}")
    out = _workspace.empty(x.shape, dtype=x.dtype)
    _engine.relu_backward(_contiguous(grad_out).reshape(-1), _contiguous(x).reshape(-1), out.reshape(-1),
                          _threads_for(x.size, _SERIAL_ELEMENTS))
    return out


def linear(x, weight, bias=None):
    """x (N, in) @ weight.T (weight: (out, in)) + bias."""
    _args.linear_args(x, weight, bias)
    out = _workspace.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    _engine.matmul(_aligned(x), _aligned(weight).T, out, _threads_for(2 * x.shape[0] * weight.size, _SERIAL_FLOPS))
    if bias is not None:
        out += bias
    return out


def linear_backward(grad_out, x, weight):
    """Gradients of linear: (grad_x, grad_weight, grad_bias)."""
    _args.linear_backward_args(grad_out, x, weight)
    n_threads = _threads_for(4 * x.shape[0] * weight.size, _SERIAL_FLOPS)
    grad_x = _workspace.empty(x.shape, dtype=x.dtype)
    grad_w = _workspace.empty(weight.shape, dtype=x.dtype)
    grad_out = _aligned(grad_out)
    _engine.matmul(grad_out, _aligned(weight), grad_x, n_threads)
    _engine.matmul(grad_out.T, _aligned(x), grad_w, n_threads)
    return grad_x, grad_w, grad_out.sum(axis=0)


def batch_norm2d(x, weight, bias, mean, var, eps=1e-5):
    """Per-channel (x - mean) * weight / sqrt(var + eps) + bias over (N, C, H, W), with given statistics (C,)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias, mean=mean, var=var))
    out = _workspace.empty(x.shape, dtype=x.dtype)
    # the kernel's mean and var are outputs in training mode, so it takes them writable: copies (C values each)
    _engine.batch_norm2d_forward(_contiguous(x), _contiguous(weight), _contiguous(bias),
                                 np.array(mean, dtype=x.dtype), np.array(var, dtype=x.dtype), False, eps, out,
                                 _threads_for(x.size, _SERIAL_ELEMENTS))
    return out


def batch_norm2d_training(x, weight, bias, eps=1e-5):
    """batch_norm2d with the batch's own statistics: (y, mean, var), var biased (divided by N*H*W)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias), training=True)
    out = _workspace.empty(x.shape, dtype=x.dtype)
    mean = np.empty(x.shape[1], dtype=x.dtype)
    var = np.empty(x.shape[1], dtype=x.dtype)
    _engine.batch_norm2d_forward(_contiguous(x), _contiguous(weight), _contiguous(bias), mean, var, True, eps, out,
                                 _threads_for(x.size, _SERIAL_ELEMENTS))
    return out, mean, var


def batch_norm2d_backward(grad_out, x, weight, mean, var, eps=1e-5):
    """Gradients of batch_norm2d_training, given the mean and var it returned: (grad_x, grad_weight, grad_bias)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, mean=mean, var=var), training=True,
                                       grad_out=grad_out)
    grad_x = _workspace.empty(x.shape, dtype=x.dtype)
    grad_w = _workspace.empty(x.shape[1], dtype=x.dtype)
    grad_b = _workspace.empty(x.shape[1], dtype=x.dtype)
    _engine.batch_norm2d_backward(_contiguous(grad_out), _contiguous(x), _contiguous(weight), _contiguous(mean),
                                  _contiguous(var), eps, grad_x, grad_w, grad_b,
                                  _threads_for(x.size, _SERIAL_ELEMENTS))
    return grad_x, grad_w, grad_b


# Fused forms of two ops in a row, for the layers that Sequential fuses (convengine.fusion); not public API. Each
# gives the values of the two ops one after the other, bit for bit, in one pass. (Conv2d + ReLU: _conv2d(relu=True).)

def _batch_norm2d_relu(x, weight, bias, mean, var, eps=1e-5):
    """relu(batch_norm2d(...)) with given statistics."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias, mean=mean, var=var))
    out = _workspace.empty(x.shape, x.dtype)
    _engine.batch_norm2d_forward(_contiguous(x), _contiguous(weight), _contiguous(bias),
                                 np.array(mean, dtype=x.dtype), np.array(var, dtype=x.dtype), False, eps, out,
                                 _threads_for(x.size, _SERIAL_ELEMENTS), relu=True)
    return out


def _batch_norm2d_relu_training(x, weight, bias, eps=1e-5):
    """(relu(y), mean, var) for (y, mean, var) = batch_norm2d_training(...)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias), training=True)
    out = _workspace.empty(x.shape, x.dtype)
    mean = np.empty(x.shape[1], dtype=x.dtype)
    var = np.empty(x.shape[1], dtype=x.dtype)
    _engine.batch_norm2d_forward(_contiguous(x), _contiguous(weight), _contiguous(bias), mean, var, True, eps, out,
                                 _threads_for(x.size, _SERIAL_ELEMENTS), relu=True)
    return out, mean, var


def _batch_norm2d_relu_max_pool_training(x, weight, bias, eps=1e-5):
    """(max_pool2d(relu(y), 2, return_indices=True), mean, var) for (y, mean, var) = batch_norm2d_training(...),
    as (pooled, indices, mean, var), in one pass that never writes relu(y) out; for x of even height, width >= 2
    and planes of >= 16 values (convengine.fusion.pools_fused)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias), training=True)
    B, C, H, W = x.shape
    out = _workspace.empty((B, C, H // 2, W // 2), x.dtype)
    indices = _workspace.empty((B, C, H // 2, W // 2), np.int64)
    mean = np.empty(C, dtype=x.dtype)
    var = np.empty(C, dtype=x.dtype)
    _engine.batch_norm2d_relu_max_pool2x2(_contiguous(x), _contiguous(weight), _contiguous(bias), mean, var, eps,
                                          out, indices, _threads_for(x.size, _SERIAL_ELEMENTS))
    return out, indices, mean, var


def _batch_norm2d_relu_max_pool_backward(grad_out, indices, x, weight, bias, mean, var, eps=1e-5):
    """_batch_norm2d_relu_backward(max_pool2d_backward(grad_out, indices, x.shape), x, None, ..., bias=bias) for
    the outputs of _batch_norm2d_relu_max_pool_training, in one pass that never writes the pooling's gradient:
    (grad_x, grad_weight, grad_bias), the same bits."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, bias=bias, mean=mean, var=var), training=True)
    _args.check_array(grad_out, "grad_out", 4, x.dtype)
    grad_x = _workspace.empty(x.shape, dtype=x.dtype)
    grad_w = _workspace.empty(x.shape[1], dtype=x.dtype)
    grad_b = _workspace.empty(x.shape[1], dtype=x.dtype)
    bad = _engine.batch_norm2d_relu_max_pool2x2_backward(
        _contiguous(grad_out), _contiguous(indices.astype(np.int64, copy=False)), _contiguous(x),
        _contiguous(weight), _contiguous(bias), _contiguous(mean), _contiguous(var), eps, grad_x, grad_w, grad_b,
        _threads_for(x.size, _SERIAL_ELEMENTS))
    if bad:
        raise ValueError(f"indices has {bad} values outside [0, {x.shape[2] * x.shape[3]}) for x of shape {x.shape}")
    return grad_x, grad_w, grad_b


def _batch_norm2d_relu_backward(grad_out, x, relu_out, weight, mean, var, eps=1e-5, bias=None):
    """batch_norm2d_backward(relu_backward(grad_out, relu_out), x, ...) for relu_out the output of
    _batch_norm2d_relu_training: the gradient taken through the ReLU inside the batch norm's own passes. With the
    forward's bias, the ReLU's sign is recomputed from x (as the forward computed it: the same bits) instead of
    read from relu_out, one array fewer streamed twice; relu_out may then be None where planes hold >= 16 values
    (after _batch_norm2d_relu_max_pool_training, which never wrote it)."""
    eps = _args.batch_norm2d_args(x, eps, dict(weight=weight, mean=mean, var=var), training=True,
                                  grad_out=grad_out)
    if relu_out is not None or bias is None:
        _args.check_array(relu_out, "relu_out", 4, x.dtype)
        if relu_out.shape != x.shape:
            raise ValueError(f"relu_out shape {relu_out.shape} does not match x shape {x.shape}")
    grad_x = _workspace.empty(x.shape, dtype=x.dtype)
    grad_w = _workspace.empty(x.shape[1], dtype=x.dtype)
    grad_b = _workspace.empty(x.shape[1], dtype=x.dtype)
    _engine.batch_norm2d_backward(_contiguous(grad_out), _contiguous(x), _contiguous(weight), _contiguous(mean),
                                  _contiguous(var), eps, grad_x, grad_w, grad_b,
                                  _threads_for(x.size, _SERIAL_ELEMENTS),
                                  relu_out=None if relu_out is None else _contiguous(relu_out),
                                  relu_bias=None if bias is None else _contiguous(bias))
    return grad_x, grad_w, grad_b
