"""The memory a Sequential model's training step holds, from the layer shapes alone (nothing is allocated).

Counted, in bytes, for a batch of `batch` samples:
    parameters   the trained arrays and their accumulated gradients
    activations  what forward keeps for backward: the output of each layer that makes one (a fused pair makes one,
                 and none where it pools too, see convengine.fusion), max pooling's int64 argmax indices, dropout's
                 mask; the input batch
    gradients    the buffers of the layers' input gradients: the step's are kept for the next step, and one
                 that the next layer down has read is taken again by a later gradient of its shape
                 (convengine._workspace, replayed here as Sequential.backward runs it); the weight-gradient
                 temporaries; the gradient of the model's output
Not counted: the optimizer's slots (momentum, Adam's moments: one or two more times the parameters), the
kernels' scratch (packing buffers, a few MB at most; `engine.conv2d_scratch_bytes` reports it per conv) and what
the loss keeps (a batch of scores).
"""
import collections
import math

from . import _workspace, fusion
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU

# the layers whose input gradient is an array of the backward arena (the others' are NumPy's own or views)
_ARENA_GRADIENT = (Conv2d, BatchNorm2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Linear, ReLU)


def training_memory(model, batch, input_shape):
    """{'parameters', 'activations', 'gradients', 'total'}: bytes (see the module's docstring)."""
    itemsize = model.dtype.itemsize
    layers = model.layers
    pairs = fusion.pairs(layers) if model.fuse else set()
    params = sum(2 * p.data.size for p in model.parameters()) * itemsize
    shape = tuple(input_shape)
    activations = batch * math.prod(shape)          # the input batch
    weight_temporaries = 0
    shapes = []
    unwritten = set()       # ReLUs whose output the pair before pools in its own pass and never writes
    for i, layer in enumerate(layers):
        out_shape = tuple(layer.output_shape(shape))
        shapes.append(shape)
        n_out = batch * math.prod(out_shape)
        if i in pairs and fusion.pools_fused(layers, i, (batch,) + shape, True):
            unwritten.add(i + 1)
        if i in pairs or i in unwritten:
            pass                                    # its output is the pair's: counted with the ReLU (or none)
        elif isinstance(layer, Flatten):
            pass                                    # a view
        elif isinstance(layer, Dropout):
            activations += 2 * n_out if layer.p > 0 else 0
        else:
            activations += n_out
        if isinstance(layer, MaxPool2d):
            activations += n_out * 8 // itemsize     # int64 indices
        weight_temporaries = max(weight_temporaries, sum(p.data.size for p in layer.parameters()))
        shape = out_shape
    gradients = batch * math.prod(shape) + weight_temporaries + _input_gradients(model, batch, shapes, pairs)
    out = {"parameters": params, "activations": activations * itemsize, "gradients": gradients * itemsize}
    out["total"] = sum(out.values())
    return out


def _input_gradients(model, batch, shapes, pairs):
    """Values in the buffers of the layers' input gradients, Sequential.backward's order of taking and handing
    back buffers replayed (shapes[i]: layer i's input shape per sample)."""
    from .model import _FRESH_BACKWARD, _KEEP_NO_GRADIENT
    layers = model.layers
    itemsize = model.dtype.itemsize
    first = min((k for k, layer in enumerate(layers) if type(layer) in _FRESH_BACKWARD), default=len(layers))
    free = collections.Counter()        # arena buffers handed back, by shape
    total = 0
    holder = None                       # the shape of the arena buffer holding the gradient being passed down
    i = len(layers) - 1
    while i >= 0:
        layer = layers[i]
        i -= 1
        if i == -1 and not model.need_input_grad and not layer.parameters():
            break
        if i - 1 in pairs and fusion.pools_fused(layers, i - 1, (batch,) + shapes[i - 1], True):
            # a pooling computed by its batch norm + ReLU pair: the three take one backward pass, which makes
            # the batch norm's input gradient only
            i -= 2
            layer = layers[i + 1]
        through = i in pairs and isinstance(layer, ReLU) and isinstance(layers[i], BatchNorm2d)
        if isinstance(layer, Flatten) or through:
            continue                    # the gradient passes on (a view, or the same array)
        if i == -1 and not model.need_input_grad:
            break
        # a max pooling after a ReLU that keeps its output: one pass makes the ReLU's input gradient
        # (fusion.relu_pool_backward), in the arena where the ReLU's own would be
        relu_pool = model.fuse and fusion.relu_pool_follows(layers, i + 1, pairs)
        n = batch * math.prod(shapes[i + 1])
        arena = (i if relu_pool else i + 1) > first and isinstance(layer, _ARENA_GRADIENT) \
            and n * itemsize >= _workspace.MIN_BYTES
        if arena and free[shapes[i + 1]]:
            free[shapes[i + 1]] -= 1
        else:
            total += n
        if holder is not None and type(layer) in _KEEP_NO_GRADIENT:
            free[holder] += 1
        holder = shapes[i + 1] if arena else None
        if relu_pool:
            i -= 1                      # the ReLU's backward ran with the pooling's
    return total
