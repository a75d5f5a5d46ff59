"""Layer fusion in a Sequential model: groups of layers that run as one pass, recognised by pattern.

    Conv2d, ReLU        the conv applies the ReLU as it stores its output (the conv's epilogue); the ReLU keeps
                        that output, whose sign is all its backward needs.
    BatchNorm2d, ReLU   one pass forward (normalise, then max(., 0) as it stores) and one backward: batch norm
                        takes the gradient through the ReLU inside its own sums and mapping (oneDNN's
                        fuse_norm_relu), and the ReLU's backward passes the gradient on untouched.

    ReLU, MaxPool2d     backward in one pass: the pooling's gradient is scattered only where the ReLU's output
                        (the pooling's input, which the ReLU keeps) is > 0, and the ReLU's pass over it (a read of
                        two arrays and a write of a third, the size of the pooling's input) is skipped. LeNet-5's
                        conv, ReLU, pool blocks.

    BatchNorm2d, ReLU, MaxPool2d(2)
                        in training, where the planes pair up (even height) and hold >= 16 values: the pair's pass
                        pools each plane from a buffer of its thread, and relu(batch_norm(x)) is never written
                        (oneDNN's post-op chains; CIFAR-shaped net at batch 64: the pair's 8 MB output and the
                        pool's pass over it). Backward in one pass too (Sequential.backward hands the pooling's
                        gradient to BatchNorm2d._backward_relu_max_pool): scattered by the pooling's indices
                        straight into the batch norm's input gradient, summed while in cache, mapped in place.

A group gives the values of its layers run one after the other, bit for bit, forward and backward
(tests/test_fusion.py); every layer keeps its public API, and Sequential.backward calls each layer's backward as
always. `Sequential.fuse = False` runs every layer on its own.
"""
from ._kernels import engine as _engine
from .layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, _THROUGH

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


_BN_RELU_POOL_KERNEL = hasattr(_engine, "batch_norm2d_relu_max_pool2x2")


def pool_follows(layers, i):
    """Whether layers[i:i + 3] are BatchNorm2d, ReLU and a 2x2 stride-2 max pooling (no padding, floor mode) that
    the pair at i may pool in its own pass (pools_fused says for which inputs)."""
    if i + 2 >= len(layers) or type(layers[i]) is not BatchNorm2d or type(layers[i + 1]) is not ReLU:
        return False
    pool = layers[i + 2]
    return (_BN_RELU_POOL_KERNEL and type(pool) is MaxPool2d and pool.kernel_size == (2, 2)
            and pool.stride == (2, 2) and pool.padding == (0, 0) and not pool.ceil_mode)


def pools_fused(layers, i, input_shape, training):
    """Whether the pair at i also runs the pooling after it (pool_follows) for a batch of input_shape (N, C, H,
    W): in training, with planes of an even height, width >= 2 and >= 16 values (the plane-by-plane batch norm)."""
    return (training and pool_follows(layers, i) and len(input_shape) == 4 and input_shape[2] % 2 == 0
            and input_shape[3] >= 2 and input_shape[2] * input_shape[3] >= 16)


def relu_pool_follows(layers, i, pairs):
    """Whether layers[i - 1:i + 1] are a ReLU and a max pooling that relu_pool_backward takes after a training
    forward (pairs: pairs(layers)): the ReLU is not the second of a batch norm pair, which keeps no output (and
    pools in its own pass where it can). From the layers alone, for what is known before a forward (footprint)."""
    return (i >= 1 and type(layers[i]) is MaxPool2d and type(layers[i - 1]) is ReLU
            and not (i - 2 in pairs and type(layers[i - 2]) is BatchNorm2d))


def relu_pool_backward(layers, i):
    """Whether layers[i - 1:i + 1] are a ReLU and a max pooling whose backward runs as one pass: the ReLU keeps
    its output (as an array of the pooling's input shape), and the pooling was not already computed by a batch
    norm pair (then that pair takes its gradient). From what the layers kept in forward (relu_pool_follows says
    it from the layers alone)."""
    if i < 1 or type(layers[i]) is not MaxPool2d or type(layers[i - 1]) is not ReLU:
        return False
    pool, relu = layers[i], layers[i - 1]
    kept = relu._cache
    return (not pool._after_pair and pool._indices is not None and kept is not None and kept is not _THROUGH
            and getattr(kept, "shape", None) == tuple(pool._shape))


def run_pair_pool(bn, relu, pool, x):
    """max_pool(relu(bn(x))) in training, in one pass (pools_fused); each layer keeps what its backward needs."""
    y, indices = bn._forward_relu_max_pool(x)
    relu._fused(_THROUGH, True)
    pool._fused(indices, x.shape)
    return y


def run_pair(first, relu, x, training):
    """The output of relu(first(x)) in one pass; each layer keeps what its backward needs."""
    y = first._forward(x, training, relu=True)
    relu._fused(_THROUGH if type(first) is BatchNorm2d else y, training)
    return y
