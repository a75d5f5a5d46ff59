"""Layers: the building blocks of a Sequential model, each with forward(x, training) and backward(grad).

Convolution, pooling, ReLU, batch normalisation and the fully connected layer call `convengine.functional`, so
their loops run in the compiled kernels; Sigmoid, Tanh, LeakyReLU, Softmax, Dropout, Flatten and GlobalAvgPool2d
are a few vectorised NumPy expressions.
A layer keeps what its backward needs only after a training forward; inference keeps nothing.

Gradients accumulate into `Parameter.grad` (as in PyTorch) until the optimizer's zero_grad() clears them, which
lets a caller sum gradients over several batches.
"""
import contextlib
import math
import threading

import numpy as np

from . import _args, _workspace
from . import functional as F
from ._random import generator

__all__ = ["Parameter", "Layer", "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "ReLU", "Sigmoid", "Tanh",
           "LeakyReLU", "Softmax", "Flatten", "Linear", "Dropout", "BatchNorm2d", "LAYER_TYPES"]

_INITS = ("he", "glorot")
_mode = threading.local()


@contextlib.contextmanager
def shapes_only():
    """Layers built inside hold read-only placeholders of the right shapes and dtypes (no memory, no random draws)
    instead of initial values. The model loader builds a file's layers this way, so that a description declaring
    huge layers is checked against the arrays the file really holds before anything is allocated; every placeholder
    is then replaced by the file's array."""
    previous = getattr(_mode, "shapes_only", False)
    _mode.shapes_only = True
    try:
        yield
    finally:
        _mode.shapes_only = previous


def _filled(shape, dtype, value):
    if getattr(_mode, "shapes_only", False):
        return np.broadcast_to(np.array(value, dtype), shape)
    return np.full(shape, value, dtype)


class Parameter:
    """A trainable array and the gradient accumulated for it. `name` is set by the model ("0.weight")."""

    __slots__ = ("name", "data", "grad")

    def __init__(self, name, data):
        self.name = name
        self.data = data
        self.grad = data if getattr(_mode, "shapes_only", False) else np.zeros_like(data)

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"


def _dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in _args.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _init_weight(shape, fan_in, fan_out, init, dtype):
    """He (normal, std sqrt(2 / fan_in)) suits layers followed by ReLU; Glorot (uniform, limit
    sqrt(6 / (fan_in + fan_out))) suits the rest. Drawn in float64 and rounded, so both dtypes get the same values."""
    if getattr(_mode, "shapes_only", False):
        return _filled(shape, dtype, 0)
    if init == "he":
        w = generator().normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    else:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = generator().uniform(-limit, limit, size=shape)
    return w.astype(dtype)


def _check_init(init):
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    return init


def _check_float(value, name, low, high, high_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low <= value <= high) or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


class Layer:
    """Base class. Subclasses set `_params` (local name -> Parameter) and implement forward and backward.

    need_input_grad: when False (the model sets it on its first layer) backward may skip the gradient with
    respect to the input, which nobody reads there, and return None.
    """

    need_input_grad = True

    def __init__(self):
        self._params = {}

    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def __call__(self, x, training=False):
        # Called on a symbolic tensor of convengine.graph, the layer becomes a node of a graph model instead.
        if getattr(x, "_convengine_symbolic", False):
            return x._apply(self)
        return self.forward(x, training)

    def parameters(self):
        return list(self._params.values())

    def named_parameters(self):
        """(local name, Parameter) pairs: 'weight', 'bias'."""
        return list(self._params.items())

    def buffers(self):
        """Arrays that are state but not trained (BatchNorm's running statistics), by local name."""
        return {}

    def set_buffer(self, name, value):
        raise KeyError(f"{type(self).__name__} has no buffer {name!r}")

    def config(self):
        """The constructor arguments, JSON-serialisable: a saved model is rebuilt from them."""
        return {}

    def output_shape(self, input_shape):
        """Shape of one sample's output for one sample's input shape (no batch axis)."""
        return tuple(input_shape)

    def flops(self, input_shape):
        """Floating-point operations of an inference forward for one sample (a multiply-add counts 2)."""
        return 0

    def _needs_cache(self, cache, what="forward(x, training=True)"):
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a {what} first")
        return cache

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class _Weighted(Layer):
    """A layer with a 'weight' Parameter drawn by its init scheme and an optional zero 'bias' of weight.shape[0]:
    Conv2d and Linear."""

    def _init_weight_and_bias(self, shape, fan_in, fan_out, has_bias):
        self._params["weight"] = Parameter("weight", _init_weight(shape, fan_in, fan_out, self.init, self.dtype))
        if has_bias:
            self._params["bias"] = Parameter("bias", _filled(shape[0], self.dtype, 0))

    @property
    def weight(self):
        return self._params["weight"]

    @property
    def bias(self):
        return self._params.get("bias")


class Conv2d(_Weighted):
    """2-D convolution over NCHW input, weight (out_channels, in_channels // groups, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, init="he", dtype="float32"):
        super().__init__()
        self.in_channels = _args.check_int(in_channels, "in_channels", 1)
        self.out_channels = _args.check_int(out_channels, "out_channels", 1)
        self.kernel_size = _args.pair(kernel_size, "kernel_size", 1)
        self.stride = _args.pair(stride, "stride", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
            self.padding = padding
        else:
            self.padding = _args.pair(padding, "padding", 0)
        self.dilation = _args.pair(dilation, "dilation", 1)
        self.groups = _args.check_int(groups, "groups", 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels}")
        self.init = _check_init(init)
        self.dtype = _dtype(dtype)
        has_bias = _args.check_bool(bias, "bias")
        kh, kw = self.kernel_size
        cin_g = self.in_channels // self.groups
        self._init_weight_and_bias((self.out_channels, cin_g, kh, kw), cin_g * kh * kw,
                                   self.out_channels // self.groups * kh * kw, has_bias)
        self._x = None

    def _hyper(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def forward(self, x, training=False):
        return self._forward(x, training)

    # Opt-in Winograd F(2x2, 3x3), a run-time choice not saved with the model: see the winograd property.
    _winograd = False

    @property
    def winograd(self):
        """Whether this conv runs by Winograd F(2x2, 3x3) where it can (opt-in; False by default): the forward pass
        and, in backward, the input gradient, on float32 3x3 stride-1 convs of 32 or more input and 16 or more output
        channels (0.55-0.8 of the direct kernels' time), and on AMD CPUs the weight gradient where the channels and
        the batch's 2x2 output tiles are many (engine.winograd_grad_weight_takes; 0.7-0.9; on Intel the direct
        kernels' is the faster on every shape measured). The results differ from the direct sums' by rounding, of
        the same order (tests/test_winograd.py), and stay bitwise the same whatever the thread count.
        Sequential.winograd and Graph.winograd set it on every conv of a model."""
        return self._winograd

    @winograd.setter
    def winograd(self, flag):
        self._winograd = _args.check_bool(flag, "winograd")

    def _forward(self, x, training, relu=False):
        """forward; with relu, relu(forward) in one pass (Sequential fuses a following ReLU so)."""
        bias = self.bias.data if self.bias is not None else None
        y = F._conv2d(x, self.weight.data, bias, **self._hyper(), relu=relu, winograd=self._winograd)
        self._x = x if training else None
        return y

    def backward(self, grad):
        x = self._needs_cache(self._x)
        gx, gw, gb = F._conv2d_backward(grad, x, self.weight.data, need_input_grad=self.need_input_grad,
                                        need_bias_grad=self.bias is not None, winograd=self._winograd,
                                        **self._hyper())
        self.weight.grad += gw
        _workspace.release(gw)          # the next layer's temporary may take its buffer
        if self.bias is not None:
            self.bias.grad += gb
        return gx if self.need_input_grad else None

    def _geometry(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2d needs (C, H, W) input, got {tuple(input_shape)}")
        return _args.conv2d_geometry((1,) + tuple(input_shape), self.weight.data.shape, **self._hyper())

    def output_shape(self, input_shape):
        return self._geometry(input_shape).out_shape[1:]

    def flops(self, input_shape):
        geom = self._geometry(input_shape)
        bias = math.prod(geom.out_shape) if self.bias is not None else 0
        return _args.flops_conv2d(geom) + bias

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride),
                    padding=self.padding if isinstance(self.padding, str) else list(self.padding),
                    dilation=list(self.dilation), groups=self.groups, bias=self.bias is not None, init=self.init,
                    dtype=self.dtype.name)


class _Pool(Layer):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = _args.pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _args.pair(stride, "stride", 1)
        self.padding = _args.pair(padding, "padding", 0)
        if 2 * self.padding[0] > self.kernel_size[0] or 2 * self.padding[1] > self.kernel_size[1]:
            raise ValueError(f"padding {self.padding} must be at most half of kernel_size {self.kernel_size}")
        self.ceil_mode = _args.check_bool(ceil_mode, "ceil_mode")
        self._shape = None

    def _hyper(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode)

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{type(self).__name__} needs (C, H, W) input, got {tuple(input_shape)}")
        geom = _args.pool2d_geometry((1,) + tuple(input_shape), name=type(self).__name__, **self._hyper())
        return geom.out_shape[1:]

    def flops(self, input_shape):
        kh, kw = self.kernel_size
        return math.prod(self.output_shape(input_shape)) * kh * kw

    def config(self):
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride), padding=list(self.padding),
                    ceil_mode=self.ceil_mode)


class MaxPool2d(_Pool):
    """Maximum over each window; backward routes the gradient to the (first) maximum, as PyTorch does."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self._indices = None
        self._after_pair = False

    def forward(self, x, training=False):
        self._after_pair = False
        if not training:
            self._indices = self._shape = None
            return F.max_pool2d(x, **self._hyper())
        y, self._indices = F.max_pool2d(x, return_indices=True, **self._hyper())
        self._shape = x.shape
        return y

    def backward(self, grad):
        indices = self._needs_cache(self._indices)
        return F.max_pool2d_backward(grad, indices, self._shape)

    def _backward_relu(self, grad, relu_out):
        """backward, then the ReLU before's backward, in one pass (Sequential's fusion): relu_out is that ReLU's
        output, which this pooling took as input."""
        indices = self._needs_cache(self._indices)
        return F._max_pool2d_relu_backward(grad, indices, relu_out)

    def _fused(self, indices, input_shape):
        """The batch norm and ReLU before computed this pooling in training (Sequential's fusion): what backward
        needs, and that Sequential.backward may hand the gradient to that pair without scattering it."""
        self._indices = indices
        self._shape = input_shape
        self._after_pair = True


class AvgPool2d(_Pool):
    """Mean over each window; count_include_pad as in PyTorch."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = _args.check_bool(count_include_pad, "count_include_pad")

    def forward(self, x, training=False):
        self._shape = x.shape if training else None
        return F.avg_pool2d(x, count_include_pad=self.count_include_pad, **self._hyper())

    def backward(self, grad):
        shape = self._needs_cache(self._shape)
        return F.avg_pool2d_backward(grad, shape, count_include_pad=self.count_include_pad, **self._hyper())

    def config(self):
        return dict(super().config(), count_include_pad=self.count_include_pad)


def _check_4d(x, layer):
    _args.check_array(x, "x", None)
    if x.ndim != 4:
        raise ValueError(f"{layer} needs x of shape (N, C, H, W), got shape {x.shape}")


class GlobalAvgPool2d(Layer):
    """Mean over each whole feature map: (N, C, H, W) -> (N, C)."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x, training=False):
        _check_4d(x, "GlobalAvgPool2d")
        y = F.global_avg_pool2d(x)
        self._shape = x.shape if training else None
        return y

    def backward(self, grad):
        return F._global_avg_pool2d_backward(grad, self._needs_cache(self._shape))

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"GlobalAvgPool2d needs (C, H, W) input, got {tuple(input_shape)}")
        return (input_shape[0],)

    def flops(self, input_shape):
        return math.prod(input_shape)


# What a ReLU fused into the layer before it keeps when that layer takes the gradient through the ReLU itself.
_THROUGH = object()


class ReLU(Layer):
    """max(x, 0); the gradient passes where x > 0. Training keeps the output, not the input: y = relu(x) is > 0 (or
    NaN) exactly where x is, so the gradient is the same, and the input can be freed."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x, training=False):
        y = F.relu(x)
        self._cache = y if training else None
        return y

    def _fused(self, y, training):
        """The layer before computed this ReLU's output y (Sequential's fusion); y _THROUGH when that layer also
        takes the gradient through it in its own backward."""
        self._cache = y if training else None

    def backward(self, grad):
        y = self._needs_cache(self._cache)
        if y is _THROUGH:
            return grad
        return F.relu_backward(grad, y)

    def flops(self, input_shape):
        return math.prod(input_shape)


class _Elementwise(Layer):
    """An activation computed by NumPy expressions on the whole array; backward reads the cached output (or
    input), so only a training forward keeps it."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x, training=False):
        _args.check_array(x, "x", None)
        y = self._forward(x)
        self._cache = (x, y) if training else None
        return y

    def backward(self, grad):
        x, y = self._needs_cache(self._cache)
        _args.check_array(grad, "grad", None, x.dtype)
        if grad.shape != x.shape:
            raise ValueError(f"grad shape {grad.shape} does not match the forward input's shape {x.shape}")
        return self._backward(grad, x, y)

    def flops(self, input_shape):
        return math.prod(input_shape)


class Sigmoid(_Elementwise):
    """1 / (1 + exp(-x)), the article's squashing function; the gradient is y (1 - y). Computed from exp(-|x|), so
    no input overflows."""

    def _forward(self, x):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def _backward(self, grad, x, y):
        return grad * y * (1 - y)


class Tanh(_Elementwise):
    """tanh(x); the gradient is 1 - y^2."""

    def _forward(self, x):
        return np.tanh(x)

    def _backward(self, grad, x, y):
        return grad * (1 - y * y)


class LeakyReLU(_Elementwise):
    """x where x > 0, negative_slope * x elsewhere (PyTorch's default slope 0.01); the gradient is 1 where x > 0,
    negative_slope elsewhere (at 0 too, as in PyTorch)."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = _check_float(negative_slope, "negative_slope", 0.0, math.inf)

    def _forward(self, x):
        return np.where(x > 0, x, x * x.dtype.type(self.negative_slope))

    def _backward(self, grad, x, y):
        return np.where(x > 0, grad, grad * grad.dtype.type(self.negative_slope))

    def config(self):
        return dict(negative_slope=self.negative_slope)


class Softmax(_Elementwise):
    """exp(x) / sum exp(x) over axis 1 (the classes of (N, K) scores, or the channels of NCHW maps), each slice's
    maximum subtracted first so that large scores do not overflow. Pair it with MSELoss (the article's target
    vectors); CrossEntropyLoss takes raw scores and applies the softmax itself."""

    def _forward(self, x):
        if x.ndim < 2:
            raise ValueError(f"Softmax needs x with a batch axis and a class axis, got shape {x.shape}")
        if x.shape[1] == 0:
            return x.copy()
        y = x - x.max(axis=1, keepdims=True)
        np.exp(y, out=y)
        y /= y.sum(axis=1, keepdims=True)
        return y

    def _backward(self, grad, x, y):
        return y * (grad - np.sum(grad * y, axis=1, keepdims=True))

    def flops(self, input_shape):
        return 3 * math.prod(input_shape)


class Flatten(Layer):
    """(N, ...) -> (N, features), the bridge from feature maps to a fully connected layer."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x, training=False):
        _args.check_array(x, "x", None)
        if x.ndim < 2:
            raise ValueError(f"Flatten needs x with a batch axis and at least one more, got shape {x.shape}")
        self._shape = x.shape if training else None
        return x.reshape(x.shape[0], -1)

    def backward(self, grad):
        return grad.reshape(self._needs_cache(self._shape))

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)


class Linear(_Weighted):
    """Fully connected: y = x @ weight.T + bias, weight (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True, init="he", dtype="float32"):
        super().__init__()
        self.in_features = _args.check_int(in_features, "in_features", 1)
        self.out_features = _args.check_int(out_features, "out_features", 1)
        self.init = _check_init(init)
        self.dtype = _dtype(dtype)
        has_bias = _args.check_bool(bias, "bias")
        self._init_weight_and_bias((self.out_features, self.in_features), self.in_features, self.out_features,
                                   has_bias)
        self._x = None

    def forward(self, x, training=False):
        bias = self.bias.data if self.bias is not None else None
        y = F.linear(x, self.weight.data, bias)
        self._x = x if training else None
        return y

    def backward(self, grad):
        x = self._needs_cache(self._x)
        gx, gw, gb = F.linear_backward(grad, x, self.weight.data)
        self.weight.grad += gw
        _workspace.release(gw)
        if self.bias is not None:
            self.bias.grad += gb
        return gx if self.need_input_grad else None

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"Linear({self.in_features}, {self.out_features}) needs input of shape "
                             f"({self.in_features},), got {tuple(input_shape)}")
        return (self.out_features,)

    def flops(self, input_shape):
        return 2 * self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    init=self.init, dtype=self.dtype.name)


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by 1 / (1 - p), so
    inference is the identity. The mask comes from the generator seeded by convengine.manual_seed."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = _check_float(p, "p", 0.0, 1.0, high_open=True)
        self._mask = None

    def forward(self, x, training=False):
        _args.check_array(x, "x", None)
        if not training or self.p == 0.0:
            self._mask = None if not training else np.ones((), x.dtype)
            return x
        keep = generator().random(x.shape, dtype=x.dtype) >= x.dtype.type(self.p)
        self._mask = keep * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, grad):
        return grad * self._needs_cache(self._mask)

    def config(self):
        return dict(p=self.p)


class BatchNorm2d(Layer):
    """Per-channel normalisation of NCHW input (Ioffe & Szegedy, 2015), with PyTorch's conventions: training
    normalises with the batch's biased variance and updates running statistics with the unbiased one
    (running = (1 - momentum) * running + momentum * batch); inference uses the running statistics."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype="float32"):
        super().__init__()
        self.num_features = _args.check_int(num_features, "num_features", 1)
        self.eps = _check_float(eps, "eps", 0.0, math.inf)
        if self.eps == 0.0:
            raise ValueError("eps must be > 0")
        self.momentum = _check_float(momentum, "momentum", 0.0, 1.0)
        self.dtype = _dtype(dtype)
        self._params["weight"] = Parameter("weight", _filled(self.num_features, self.dtype, 1))
        self._params["bias"] = Parameter("bias", _filled(self.num_features, self.dtype, 0))
        self.running_mean = _filled(self.num_features, self.dtype, 0)
        self.running_var = _filled(self.num_features, self.dtype, 1)
        self._cache = None
        self._stats_hook = None

    @property
    def weight(self):
        return self._params["weight"]

    @property
    def bias(self):
        return self._params["bias"]

    def _check(self, x):
        _check_4d(x, "BatchNorm2d")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}) got x of shape {x.shape} "
                             f"with {x.shape[1]} channels")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but BatchNorm2d has dtype {self.dtype}")

    def forward(self, x, training=False):
        return self._forward(x, training)

    def _forward(self, x, training, relu=False):
        """forward; with relu, relu(forward) in one pass, and backward then takes the gradient of that ReLU's
        output (Sequential fuses a following ReLU so)."""
        self._check(x)
        gamma = self._params["weight"].data
        beta = self._params["bias"].data
        if not training:
            self._cache = None
            if relu:
                return F._batch_norm2d_relu(x, gamma, beta, self.running_mean, self.running_var, self.eps)
            return F.batch_norm2d(x, gamma, beta, self.running_mean, self.running_var, self.eps)
        # (F refuses a batch with one value per channel)
        if relu:
            y, mean, var = F._batch_norm2d_relu_training(x, gamma, beta, self.eps)
        else:
            y, mean, var = F.batch_norm2d_training(x, gamma, beta, self.eps)
        self._running_update(mean, var, x)
        # with the fused ReLU, the bias it saw (backward recomputes the ReLU's sign from x with it)
        self._cache = (x, mean, var, y if relu else None, beta.copy() if relu else None)
        return y

    def _forward_relu_max_pool(self, x):
        """Training forward of this layer, a ReLU and 2x2 stride-2 max pooling in one pass (convengine.fusion):
        (pooled, indices); backward then takes the gradient of the ReLU's output, as after _forward(relu=True)."""
        self._check(x)
        beta = self._params["bias"].data
        y, indices, mean, var = F._batch_norm2d_relu_max_pool_training(x, self._params["weight"].data, beta,
                                                                       self.eps)
        self._running_update(mean, var, x)
        self._cache = (x, mean, var, None, beta.copy())
        return y, indices

    def _backward_relu_max_pool(self, grad, pool):
        """The backward of this layer, the ReLU after it and `pool` after _forward_relu_max_pool, from the
        gradient of the pooling's output: this layer's input gradient, its parameters' gradients accumulated."""
        x, mean, var, _, beta = self._needs_cache(self._cache)
        grad_x, grad_gamma, grad_beta = F._batch_norm2d_relu_max_pool_backward(
            grad, pool._needs_cache(pool._indices), x, self._params["weight"].data, beta, mean, var, self.eps)
        self._params["weight"].grad += grad_gamma
        self._params["bias"].grad += grad_beta
        return grad_x

    def _running_update(self, mean, var, x):
        m = x.shape[0] * x.shape[2] * x.shape[3]
        if self._stats_hook is None:
            self.update_running_stats(mean, var, m)
        else:
            self._stats_hook(mean, var, m)

    def update_running_stats(self, mean, var, count):
        """Fold one batch's per-channel mean and biased variance over `count` values into the running statistics:
        running = (1 - momentum) * running + momentum * batch, the variance made unbiased by count / (count - 1).
        Data-parallel training collects each shard's statistics (through _stats_hook) and calls this in shard
        order on every rank."""
        mom = self.dtype.type(self.momentum)
        self.running_mean *= 1 - mom
        self.running_mean += mom * mean
        self.running_var *= 1 - mom
        self.running_var += mom * var * self.dtype.type(count / (count - 1))

    def backward(self, grad):
        x, mean, var, relu_out, beta = self._needs_cache(self._cache)
        if beta is None:
            grad_x, grad_gamma, grad_beta = F.batch_norm2d_backward(grad, x, self._params["weight"].data, mean, var,
                                                                     self.eps)
        else:   # the gradient of the fused ReLU's output
            grad_x, grad_gamma, grad_beta = F._batch_norm2d_relu_backward(grad, x, relu_out,
                                                                          self._params["weight"].data, mean, var,
                                                                          self.eps, bias=beta)
        self._params["weight"].grad += grad_gamma
        self._params["bias"].grad += grad_beta
        return grad_x

    def buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def set_buffer(self, name, value):
        """Replace a buffer by an array of the same shape and dtype (loading a model or a checkpoint)."""
        if name not in ("running_mean", "running_var"):
            raise KeyError(name)
        setattr(self, name, value)

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}) needs ({self.num_features}, H, W) input, "
                             f"got {tuple(input_shape)}")
        return tuple(input_shape)

    def flops(self, input_shape):
        return 2 * math.prod(input_shape)

    def config(self):
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum, dtype=self.dtype.name)


# The only classes a saved model may name: loading never looks a class up by an arbitrary name.
LAYER_TYPES = {cls.__name__: cls for cls in (Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, ReLU, Flatten, Linear,
                                             Dropout, BatchNorm2d, Sigmoid, Tanh, LeakyReLU, Softmax)}
