"""Models with branches: layers wired as a directed acyclic graph, in the style of Keras's functional API.

    from convengine.graph import Input, Graph, Add, Concat
    x = Input((3, 32, 32))
    h = ReLU()(BatchNorm2d(16)(Conv2d(3, 16, 3, padding=1)(x)))
    r = Conv2d(16, 16, 3, padding=1)(h)
    h = ReLU()(Add()([h, r]))                          # a residual connection
    y = Linear(16, 10)(Flatten()(GlobalAvgPool2d()(h)))
    model = Graph(x, y)

Calling a layer on a symbolic tensor (from `Input`, or from another layer's call) records the call instead of
computing anything; `Graph(inputs, outputs)` collects the layers between them in a fixed topological order.
A graph model has one input and one output and the same interface as `Sequential` (forward(x, training),
backward(grad), parameters(), buffers(), predict, output_shape, summary, astype, save), so `Trainer`, checkpoints
and `convengine.load` take it as they take a Sequential. Its saved description (format version 2) lists the layers
in that order, each with the indices of the layers it reads (-1 for the model input), and the index of the output.

`Add` sums tensors of one shape; `Concat` joins tensors along an axis (1, the channel axis, by default). Where a
tensor feeds several layers, backward sums their gradients in a fixed order, so results stay bitwise identical
whatever the thread count.
"""
import math

import numpy as np

from . import _args
from . import model as _model
from .layers import LAYER_TYPES, Layer, shapes_only

__all__ = ["Input", "Graph", "Add", "Concat", "MERGE_TYPES", "GRAPH_LAYER_TYPES"]


class _Merge(Layer):
    """A layer that reads several tensors: forward(list of arrays, training) -> array, backward(grad) -> list of
    gradients, one per input."""

    def __call__(self, inputs, training=False):
        if isinstance(inputs, (list, tuple)) and inputs and all(getattr(t, "_convengine_symbolic", False)
                                                                  for t in inputs):
            return SymbolicTensor._merge(self, list(inputs))
        if getattr(inputs, "_convengine_symbolic", False):
            inputs._apply(self)  # raises: a merge layer takes a list
        return self.forward(inputs, training)

    def _arrays(self, xs):
        if not isinstance(xs, (list, tuple)) or len(xs) < 2:
            raise TypeError(f"{type(self).__name__} needs a list of at least two arrays, got {type(xs).__name__}")
        for k, x in enumerate(xs):
            _args.check_array(x, f"inputs[{k}]", None)
        if len({x.dtype for x in xs}) > 1:
            raise TypeError(f"{type(self).__name__} inputs must share one dtype, got "
                            f"{[x.dtype.name for x in xs]}")
        return list(xs)

    def _shapes(self, input_shapes):
        if not isinstance(input_shapes, (list, tuple)) or len(input_shapes) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two inputs, got {input_shapes!r}")
        return [tuple(s) for s in input_shapes]


class Add(_Merge):
    """Elementwise sum of two or more tensors of one shape (a residual connection)."""

    def __init__(self):
        super().__init__()
        self._n = None

    def forward(self, xs, training=False):
        xs = self._arrays(xs)
        if len({x.shape for x in xs}) > 1:
            raise ValueError(f"Add needs inputs of one shape, got shapes {[x.shape for x in xs]}")
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        self._n = len(xs) if training else None
        return y

    def backward(self, grad):
        n = self._needs_cache(self._n)
        # Every input receives the same gradient: hand out read-only views, so that no consumer can change the
        # array another one reads.
        view = grad.view()
        view.flags.writeable = False
        return [view] * n

    def output_shape(self, input_shapes):
        shapes = self._shapes(input_shapes)
        if len(set(shapes)) > 1:
            raise ValueError(f"Add needs inputs of one shape, got {shapes}")
        return shapes[0]

    def flops(self, input_shapes):
        shapes = self._shapes(input_shapes)
        return (len(shapes) - 1) * math.prod(shapes[0])


class Concat(_Merge):
    """Join tensors along `axis` (counted with the batch axis; 1, the channel axis, by default). The other axes
    must agree."""

    def __init__(self, axis=1):
        super().__init__()
        self.axis = _args.check_int(axis, "axis", 1)
        self._sizes = None

    def _check(self, shapes):
        """shapes: per-sample shapes (no batch axis)."""
        a = self.axis - 1
        if any(len(s) <= a for s in shapes):
            raise ValueError(f"Concat(axis={self.axis}) needs inputs with more than {self.axis} axes (batch axis "
                             f"included), got per-sample shapes {shapes}")
        rest = {s[:a] + s[a + 1:] for s in shapes}
        if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
            raise ValueError(f"Concat(axis={self.axis}) needs inputs that agree on every other axis, got per-sample "
                             f"shapes {shapes}")

    def forward(self, xs, training=False):
        xs = self._arrays(xs)
        if len({x.shape[0] if x.ndim else None for x in xs}) > 1:
            raise ValueError(f"Concat needs inputs with one batch size, got shapes {[x.shape for x in xs]}")
        self._check([x.shape[1:] for x in xs])
        self._sizes = [x.shape[self.axis] for x in xs] if training else None
        return np.concatenate(xs, axis=self.axis)

    def backward(self, grad):
        sizes = self._needs_cache(self._sizes)
        return np.split(grad, np.cumsum(sizes)[:-1], axis=self.axis)

    def output_shape(self, input_shapes):
        shapes = self._shapes(input_shapes)
        self._check(shapes)
        a = self.axis - 1
        s = list(shapes[0])
        s[a] = sum(t[a] for t in shapes)
        return tuple(s)

    def config(self):
        return dict(axis=self.axis)


MERGE_TYPES = {cls.__name__: cls for cls in (Add, Concat)}
# The classes a saved graph model may name.
GRAPH_LAYER_TYPES = {**LAYER_TYPES, **MERGE_TYPES}


class SymbolicTensor:
    """The result of calling a layer on an `Input` (or on another symbolic tensor): it records the call and the
    per-sample shape it would have; no data. Build a `Graph` from an Input and a symbolic tensor."""

    _convengine_symbolic = True

    def __init__(self, layer, inputs, shape):
        self.layer = layer              # None for an Input
        self.inputs = inputs            # the SymbolicTensors the layer reads
        self.shape = tuple(shape)       # per-sample shape, no batch axis

    def _apply(self, layer):
        if isinstance(layer, _Merge):
            raise TypeError(f"{type(layer).__name__} takes a list of tensors, e.g. {type(layer).__name__}()([a, b])")
        try:
            shape = layer.output_shape(self.shape)
        except ValueError as e:
            raise ValueError(f"{layer!r} cannot take input of shape {self.shape}: {e}") from None
        return SymbolicTensor(layer, [self], shape)

    @staticmethod
    def _merge(layer, inputs):
        try:
            shape = layer.output_shape([t.shape for t in inputs])
        except ValueError as e:
            raise ValueError(f"{layer!r} cannot take inputs of shapes {[t.shape for t in inputs]}: {e}") from None
        return SymbolicTensor(layer, inputs, shape)

    def __repr__(self):
        what = "Input" if self.layer is None else type(self.layer).__name__
        return f"<SymbolicTensor from {what}, shape {self.shape}>"


def Input(shape):
    """The input of a graph model: one sample's shape, without the batch axis, e.g. (3, 32, 32)."""
    return SymbolicTensor(None, [], _model.Sequential._shape(shape))


class Graph:
    """A model whose layers form a directed acyclic graph from one input to one output (see the module docs).

    Graph(inputs, outputs): `inputs` is the tensor returned by `Input` (or a one-element list of it), `outputs` a
    symbolic tensor computed from it (or a one-element list). Every layer instance may be called once."""

    def __init__(self, inputs, outputs):
        x = _one(inputs, "inputs")
        y = _one(outputs, "outputs")
        if x.layer is not None:
            raise ValueError("inputs must be the tensor returned by convengine.graph.Input")
        if y is x:
            raise ValueError("outputs is the input itself: a graph model needs at least one layer")
        order, index = [], {id(x): -1}
        # Depth-first from the output, inputs in call order: a fixed topological order for a given graph.
        stack = [(y, False)]
        seen_layers = {}
        while stack:
            t, expanded = stack.pop()
            if id(t) in index:
                continue
            if t.layer is None:
                raise ValueError(f"outputs depends on an Input other than inputs ({t!r}); a graph model has one input")
            if expanded:
                if id(t.layer) in seen_layers and seen_layers[id(t.layer)] is not t:
                    raise ValueError(f"the layer {t.layer!r} is called twice; create one instance per call")
                seen_layers[id(t.layer)] = t
                index[id(t)] = len(order)
                order.append(t)
                continue
            stack.append((t, True))
            for src in reversed(t.inputs):
                if id(src) not in index:
                    stack.append((src, False))
        layers = [t.layer for t in order]
        wiring = [[index[id(src)] for src in t.inputs] for t in order]
        self._setup(layers, wiring, len(order) - 1, x.shape)

    @classmethod
    def from_wiring(cls, layers, inputs, output, input_shape=None):
        """A graph model from its layers in topological order: inputs[i] lists the indices of the layers layer i
        reads (-1: the model input; otherwise an index below i), output the index of the output layer."""
        model = cls.__new__(cls)
        model._setup(layers, inputs, output, input_shape)
        return model

    def _setup(self, layers, wiring, output, input_shape):
        layers = list(layers)
        if not layers:
            raise ValueError("a graph model needs at least one layer")
        if not isinstance(wiring, (list, tuple)) or len(wiring) != len(layers):
            raise ValueError(f"inputs must list the inputs of each of the {len(layers)} layers")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} must be a convengine.layers.Layer, got {type(layer).__name__}")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("a layer instance appears twice; create one instance per call")
        clean = []
        for i, (layer, srcs) in enumerate(zip(layers, wiring)):
            if not isinstance(srcs, (list, tuple)) or not srcs:
                raise ValueError(f"layer {i} must read a non-empty list of tensors, got {srcs!r}")
            for j in srcs:
                if isinstance(j, bool) or not isinstance(j, int) or not -1 <= j < i:
                    raise ValueError(f"layer {i} reads {j!r}: inputs must be -1 (the model input) or the index of "
                                     f"an earlier layer")
            merge = isinstance(layer, _Merge)
            if merge and len(srcs) < 2:
                raise ValueError(f"layer {i} ({type(layer).__name__}) must read at least two tensors, got {srcs}")
            if not merge and len(srcs) != 1:
                raise ValueError(f"layer {i} ({type(layer).__name__}) reads one tensor, got {srcs}")
            clean.append(list(srcs))
        if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < len(layers):
            raise ValueError(f"output must be the index of a layer (0 to {len(layers) - 1}), got {output!r}")
        # Every layer must contribute to the output (a dead branch would never get a gradient).
        live = {output}
        for i in range(output, -1, -1):
            if i in live:
                live.update(j for j in clean[i] if j >= 0)
        dead = [i for i in range(len(layers)) if i not in live]
        if dead:
            raise ValueError(f"layers {dead} do not contribute to the output {output}")
        dtypes = {p.data.dtype for layer in layers for p in layer.parameters()}
        if len(dtypes) > 1:
            raise ValueError(f"all layers must share one dtype, got {sorted(d.name for d in dtypes)}")
        self.layers = layers
        self.inputs = clean
        self.output = output
        self.input_shape = None if input_shape is None else _model.Sequential._shape(input_shape)
        self.metadata = {}
        for i, layer in enumerate(layers):
            for local, p in layer.named_parameters():
                p.name = f"{i}.{local}"
        # Where each tensor is read last, so that inference drops activations nobody needs any more.
        self._last_use = {}
        for i, srcs in enumerate(clean):
            for j in srcs:
                self._last_use[j] = i
        self.need_input_grad = False
        if self.input_shape is not None:
            self.output_shape(self.input_shape)

    @property
    def need_input_grad(self):
        return self._need_input_grad

    @need_input_grad.setter
    def need_input_grad(self, value):
        self._need_input_grad = bool(value)
        for layer, srcs in zip(self.layers, self.inputs):
            if srcs == [-1]:
                layer.need_input_grad = self._need_input_grad

    # Shared with Sequential: input conversion, batched prediction, dtype, parameters and buffers by layer index.
    dtype = _model.Sequential.dtype
    winograd = _model.Sequential.winograd
    _input = _model.Sequential._input
    predict = _model.Sequential.predict
    predict_proba = _model.Sequential.predict_proba
    _probabilities = _model.Sequential._probabilities
    parameters = _model.Sequential.parameters
    buffers = _model.Sequential.buffers
    astype = _model.Sequential.astype
    _known_input_shape = _model.Sequential._known_input_shape
    _shape = _model.Sequential.__dict__["_shape"]
    save = _model.Sequential.save
    __len__ = _model.Sequential.__len__
    __getitem__ = _model.Sequential.__getitem__
    __iter__ = _model.Sequential.__iter__

    def __repr__(self):
        inner = "".join(f"\n  ({i}) {layer!r} <- {_names(srcs)}" for i, (layer, srcs)
                        in enumerate(zip(self.layers, self.inputs)))
        return f"Graph({inner}\n  output: ({self.output})\n)"

    def forward(self, x, training=False):
        """The model output for a batch; training=True keeps what backward needs (see Sequential.forward)."""
        x = self._input(x)
        if self.input_shape is None:
            self.input_shape = x.shape[1:]
        values = {-1: x}
        for i, (layer, srcs) in enumerate(zip(self.layers, self.inputs)):
            if isinstance(layer, _Merge):
                values[i] = layer.forward([values[j] for j in srcs], training)
            else:
                values[i] = layer.forward(values[srcs[0]], training)
            for j in srcs:
                if self._last_use[j] == i and j in values:
                    del values[j]
        return values[self.output]

    __call__ = forward

    def backward(self, grad):
        """Back-propagate d loss / d output, accumulating every parameter's .grad. Returns d loss / d input, or
        None when need_input_grad is False."""
        grads = {self.output: grad}
        for i in range(self.output, -1, -1):
            g = grads.pop(i)
            layer, srcs = self.layers[i], self.inputs[i]
            if srcs == [-1] and not layer.need_input_grad and not layer.parameters():
                continue
            out = layer.backward(g)
            for j, gj in zip(srcs, out if isinstance(layer, _Merge) else [out]):
                if gj is None or (j == -1 and not self._need_input_grad):
                    continue
                # Out of place: a gradient may be a read-only view shared with another input.
                grads[j] = gj if j not in grads else grads[j] + gj
        return grads.get(-1)

    def _tensor_shapes(self, input_shape):
        shapes = {-1: tuple(input_shape)}
        for i, (layer, srcs) in enumerate(zip(self.layers, self.inputs)):
            ins = [shapes[j] for j in srcs]
            try:
                shapes[i] = tuple(layer.output_shape(ins if isinstance(layer, _Merge) else ins[0]))
            except ValueError as e:
                raise ValueError(f"layer {i} ({type(layer).__name__}) cannot take input of shape "
                                 f"{ins if len(ins) > 1 else ins[0]}: {e}") from None
        return shapes

    def _check_activations_fit(self, sample_shape, batch):
        """Refuse, before anything is allocated, a batch whose output at some layer could not fit in this machine's
        memory, with a ValueError naming the layer (see Sequential.predict)."""
        limit = _model._physical_memory()
        if limit is None:
            return
        try:
            shapes = self._tensor_shapes(sample_shape)
        except ValueError:
            return  # forward reports it, naming the layer
        for i, layer in enumerate(self.layers):
            nbytes = batch * math.prod(shapes[i]) * self.dtype.itemsize
            if nbytes > limit:
                raise ValueError(f"layer {i} ({type(layer).__name__}) would output {batch} x {shapes[i]} values "
                                 f"({nbytes / 2 ** 30:,.1f} GiB), more than this machine's {limit / 2 ** 30:,.1f} "
                                 f"GiB of memory: check the layer's configuration, or use a smaller batch_size")

    def output_shape(self, input_shape=None):
        """The output shape of one sample (no batch axis) for one sample's input shape."""
        return self._tensor_shapes(self._known_input_shape(input_shape))[self.output]

    def summary(self, input_shape=None):
        """A table of the layers with what each reads, its output shape, parameter count and inference FLOPs per
        image."""
        shape = self._known_input_shape(input_shape)
        shapes = self._tensor_shapes(shape)
        rows = [("#", "layer", "inputs", "output shape", "params", "FLOPs")]
        total_params = total_flops = 0
        for i, (layer, srcs) in enumerate(zip(self.layers, self.inputs)):
            ins = [shapes[j] for j in srcs]
            flops = layer.flops(ins if isinstance(layer, _Merge) else ins[0])
            n_params = sum(p.data.size for p in layer.parameters())
            total_params += n_params
            total_flops += flops
            rows.append((str(i), type(layer).__name__, _names(srcs), str(shapes[i]), f"{n_params:,}", f"{flops:,}"))
        return _model.summary_table(rows, 4, f"input {shape}, output ({self.output}) {shapes[self.output]}, "
                                             f"{self.dtype.name}: {total_params:,} parameters, {total_flops:,} "
                                             f"FLOPs per image")

    def description(self):
        """The JSON-serialisable part of a saved model (format version 2)."""
        return {
            "format": _model.FORMAT,
            "version": 2,
            "dtype": self.dtype.name,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "metadata": self.metadata,
            "layers": [{"type": type(layer).__name__, "config": layer.config(), "inputs": list(srcs)}
                       for layer, srcs in zip(self.layers, self.inputs)],
            "output": self.output,
        }


def _names(srcs):
    return ", ".join("input" if j == -1 else f"({j})" for j in srcs)


def _one(tensors, name):
    if isinstance(tensors, (list, tuple)):
        if len(tensors) != 1:
            raise ValueError(f"{name}: a graph model has exactly one input and one output, got {len(tensors)}")
        tensors = tensors[0]
    if not isinstance(tensors, SymbolicTensor):
        raise TypeError(f"{name} must be a symbolic tensor (from convengine.graph.Input or a layer called on one), "
                        f"got {type(tensors).__name__}")
    return tensors


def _from_description(reader, desc):
    """A graph model from a checked file: called by the model loader with its reader, which names the file in every
    complaint and reads each array only after checking its header against the layer's placeholder."""
    layers = reader.layers(desc, GRAPH_LAYER_TYPES)
    wiring = [spec.get("inputs") for spec in desc["layers"]]
    try:
        with shapes_only():
            model = Graph.from_wiring(layers, wiring, desc.get("output"), desc.get("input_shape"))
    except (TypeError, ValueError) as e:
        reader.fail(f"bad graph model description: {e}")
    return reader.fill(model, desc)
