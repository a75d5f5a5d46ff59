"""Layer fusion in a Sequential model's forward: pairs of layers that run as one pass, recognised by pattern.

    Conv2d, ReLU        the conv applies the ReLU as it stores its output (the conv's epilogue); the ReLU keeps
                        that output, whose sign is all its backward needs.
    BatchNorm2d, ReLU   one pass forward (normalise, then max(., 0) as it stores) and one backward: batch norm
                        takes the gradient through the ReLU inside its own sums and mapping (oneDNN's
                        fuse_norm_relu), and the ReLU's backward passes the gradient on untouched.

A pair gives the values of its two layers run one after the other, bit for bit, forward and backward
(tests/test_fusion.py); both layers keep their public API, and Sequential.backward calls each layer's backward as
always. `Sequential.fuse = False` runs every layer on its own.
"""
from ._kernels import engine as _engine
from .layers import BatchNorm2d, Conv2d, ReLU, _THROUGH

# False only with kernels built from a source older than this module: then BatchNorm2d and ReLU run one by one
_BN_RELU_KERNEL = "relu_out" in (_engine.batch_norm2d_backward.__doc__ or "")


def pairs(layers):
    """{i, ...}: each i where layers[i] and layers[i + 1] fuse (each layer in at most one pair)."""
    found = set()
    i = 0
    while i + 1 < len(layers):
        first = type(layers[i])
        if (first is Conv2d or first is BatchNorm2d and _BN_RELU_KERNEL) and type(layers[i + 1]) is ReLU:
            found.add(i)
            i += 2
        else:
            i += 1
    return found


def run_pair(first, relu, x, training):
    """The output of relu(first(x)) in one pass; each layer keeps what its backward needs."""
    y = first._forward(x, training, relu=True)
    relu._fused(_THROUGH if type(first) is BatchNorm2d else y, training)
    return y
