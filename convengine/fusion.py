"""Layer fusion in a Sequential model's forward: pairs of layers that run as one pass, recognised by pattern.

    Conv2d, ReLU        the conv applies the ReLU as it stores its output (the conv's epilogue); the ReLU keeps
                        that output, whose sign is all its backward needs.
    BatchNorm2d, ReLU   one pass forward (normalise, then max(., 0) as it stores) and one backward: batch norm
                        takes the gradient through the ReLU inside its own sums and mapping (oneDNN's
                        fuse_norm_relu), and the ReLU's backward passes the gradient on untouched.

A pair gives the values of its two layers run one after the other, bit for bit, forward and backward
(tests/test_fusion.py); both layers keep their public API, and Sequential.backward calls each layer's backward as
always. `Sequential.fuse = False` runs every layer on its own.

In training, the output of a pair is written into a buffer the model keeps and reuses at the next step of the same
batch size (no fresh multi-megabyte array, and its page faults, per step). Only outputs that some later layer reads
and replaces by an array of its own are buffered, never one the model returns (or a view of it): by the time a
later step overwrites the buffer, the backward of the step that read it is done.
"""
from ._kernels import engine as _engine
from .layers import (AvgPool2d, BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, _THROUGH)

# False only with kernels built from a source older than this module: then BatchNorm2d and ReLU run one by one
_BN_RELU_KERNEL = "relu_out" in (_engine.batch_norm2d_backward.__doc__ or "")

# Layers whose forward returns a new array (never its input, nor a view of it)
_FRESH_OUTPUT = (Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Linear)


def pairs(layers):
    """{i: buffered} for each i where layers[i] and layers[i + 1] fuse (each layer in at most one pair); buffered
    says whether the pair's training output may live in a reused buffer."""
    found = {}
    i = 0
    while i + 1 < len(layers):
        first = type(layers[i])
        if (first is Conv2d or first is BatchNorm2d and _BN_RELU_KERNEL) and type(layers[i + 1]) is ReLU:
            found[i] = any(type(layer) in _FRESH_OUTPUT for layer in layers[i + 2:])
            i += 2
        else:
            i += 1
    return found


def run_pair(first, relu, x, training, out=None):
    """The output of relu(first(x)) in one pass; each layer keeps what its backward needs."""
    y = first._forward(x, training, relu=True, out=out)
    relu._fused(_THROUGH if type(first) is BatchNorm2d else y, training)
    return y


class ActivationBuffers:
    """The training outputs of a model's fused pairs, by (layer index, batch shape), reused from step to step."""

    def __init__(self):
        self._arrays = {}

    def get(self, i, x):
        return self._arrays.get((i, x.shape[0]))

    def keep(self, i, x, y):
        if len(self._arrays) > 64:       # many batch sizes: keep the memory bounded
            self._arrays.clear()
        self._arrays[(i, x.shape[0])] = y

    def clear(self):
        self._arrays.clear()

    def nbytes(self):
        return sum(a.nbytes for a in self._arrays.values())
