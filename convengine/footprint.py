"""The memory a Sequential model's training step holds, from the layer shapes alone (nothing is allocated).

Counted, in bytes, for a batch of `batch` samples:
    parameters   the trained arrays and their accumulated gradients
    activations  what forward keeps for backward: the output of each layer that makes one (a fused pair makes one,
                 see convengine.fusion), max pooling's int64 argmax indices, dropout's mask; the input batch
    gradients    the input gradient of each layer that makes one, all held at once (the step's buffers are kept
                 for the next step, see convengine._workspace), weight-gradient temporaries, the gradient of the
                 model's output
Not counted: the optimizer's slots (momentum, Adam's moments: one or two more times the parameters), the
kernels' scratch (packing buffers, a few MB at most; `engine.conv2d_scratch_bytes` reports it per conv) and what
the loss keeps (a batch of scores).
"""
import math

from . import fusion
from .layers import BatchNorm2d, Dropout, Flatten, MaxPool2d, ReLU


def training_memory(model, batch, input_shape):
    """{'parameters', 'activations', 'gradients', 'total'}: bytes (see the module's docstring)."""
    itemsize = model.dtype.itemsize
    layers = model.layers
    pairs = fusion.pairs(layers) if model.fuse else set()
    params = sum(2 * p.data.size for p in model.parameters()) * itemsize
    shape = tuple(input_shape)
    activations = batch * math.prod(shape)          # the input batch
    gradients = 0
    weight_temporaries = 0
    for i, layer in enumerate(layers):
        out_shape = tuple(layer.output_shape(shape))
        n_in, n_out = batch * math.prod(shape), batch * math.prod(out_shape)
        if i in pairs:
            pass                                    # its output is the pair's: counted with the ReLU
        elif isinstance(layer, Flatten):
            pass                                    # a view
        elif isinstance(layer, Dropout):
            activations += 2 * n_out if layer.p > 0 else 0
        else:
            activations += n_out
        if isinstance(layer, MaxPool2d):
            activations += n_out * 8 // itemsize     # int64 indices
        # the input gradient
        through = i - 1 in pairs and isinstance(layer, ReLU) and isinstance(layers[i - 1], BatchNorm2d)
        if not (isinstance(layer, Flatten) or through or (i == 0 and not model.need_input_grad)):
            gradients += n_in
        weight_temporaries = max(weight_temporaries, sum(p.data.size for p in layer.parameters()))
        shape = out_shape
    gradients += batch * math.prod(shape) + weight_temporaries
    out = {"parameters": params, "activations": activations * itemsize, "gradients": gradients * itemsize}
    out["total"] = sum(out.values())
    return out
