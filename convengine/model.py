"""Sequential models: a stack of layers trained as one, saved to and loaded from a single .npz file (graph models,
convengine.graph, share the file format from version 2 on).

File format (version 1): an uncompressed .npz whose member `__convengine__` is a uint8 array holding UTF-8 JSON
(format name, version, dtype, input shape, metadata, and per layer its type and constructor arguments), next to
`param/<i>.<name>` (trained arrays), `buffer/<i>.<name>` (running statistics) and, in a training checkpoint,
`state/...` (optimizer slots). Version 2 (graph models) adds to each layer the indices of the layers it reads
("inputs", -1 for the model input) and the index of the output layer ("output"); Sequential models are still
written as version 1. It is read with allow_pickle=False and layer types are looked up in a fixed table, so opening
a file never runs code; anything that does not fit the description is a ValueError naming the file.
"""
import contextlib
import json
import os
import math
import zipfile

import numpy as np

from . import _args, _kernels
from .layers import (LAYER_TYPES, AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Layer, Linear,
                     MaxPool2d, ReLU, shapes_only)
from . import _workspace, fusion as _fusion
from ._outputs import temporary_beside

__all__ = ["Sequential", "load", "lenet", "FORMAT", "VERSION", "MAX_LAYERS"]

FORMAT = "convengine-model"
# The newest format version this convengine reads and writes. Version 2 added graph models (convengine.graph):
# layers with an "inputs" list and a top-level "output". A Sequential model needs nothing version 2 added, so its
# files are still written as version 1, which every convengine reads.
VERSION = 2
_SEQUENTIAL_VERSION = 1
_JSON_KEY = "__convengine__"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _physical_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def model_input(x, dtype):
    """x checked as a batch of model inputs and converted to the model's dtype."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have a batch axis and at least one more, got shape {x.shape}")
    if x.dtype != dtype:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"x must hold numbers, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"x must hold real numbers, got dtype {x.dtype} (its imaginary part would be "
                            f"dropped)")
        x = x.astype(dtype)
    return x


def summary_table(rows, text_columns, footer):
    """The text of summary(): rows of cells (the first row the header), the first text_columns columns
    left-aligned and the numbers right-aligned, a rule under the header and above the footer line."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if c < text_columns else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(footer)
    return "\n".join(lines)


# Layers whose forward returns an array of its own (never its input or a view of it), and those whose backward does
_FRESH_FORWARD = (Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Linear)
_FRESH_BACKWARD = (Conv2d, BatchNorm2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Linear)
# layers whose backward keeps no reference to the gradient it is given
_KEEP_NO_GRADIENT = frozenset(LAYER_TYPES.values())


class Sequential:
    """Layers applied in order. The first layer skips the gradient with respect to the model input unless
    `need_input_grad` is set (e.g. for saliency maps)."""

    def __init__(self, layers, input_shape=None):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} must be a convengine.layers.Layer, got {type(layer).__name__}")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("a layer instance appears twice; create one instance per position")
        dtypes = {p.data.dtype for layer in layers for p in layer.parameters()}
        if len(dtypes) > 1:
            raise ValueError(f"all layers must share one dtype, got {sorted(d.name for d in dtypes)}")
        self.layers = layers
        self.input_shape = None if input_shape is None else self._shape(input_shape)
        self.metadata = {}
        for i, layer in enumerate(layers):
            for local, p in layer.named_parameters():
                p.name = f"{i}.{local}"
        self.need_input_grad = False
        if self.input_shape is not None:
            # The layers must fit together for this input: a Linear(100, 4) after a conv giving 1,176 features is
            # refused here, not at the first batch.
            self.output_shape(self.input_shape)

    @staticmethod
    def _shape(shape):
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise TypeError(f"input_shape must be a tuple of ints (one sample, no batch axis), got {shape!r}")
        return tuple(_args.check_int(s, "input_shape", 1) for s in shape)

    @property
    def need_input_grad(self):
        return self.layers[0].need_input_grad

    @need_input_grad.setter
    def need_input_grad(self, value):
        self.layers[0].need_input_grad = bool(value)

    @property
    def winograd(self):
        """Whether every Conv2d layer runs by Winograd F(2x2, 3x3) where it can (Conv2d.winograd; False for a model
        without one). Setting it sets every Conv2d's: an opt-in for training, whose forward pass and gradients of
        float32 3x3 stride-1 convs of 32 or more input and 16 or more output channels then take 0.55-0.8 of the time
        and round differently (see Conv2d.winograd). Not saved with the model; predict() and freeze() keep the
        direct kernels unless freeze(winograd=True)."""
        convs = [layer for layer in self.layers if isinstance(layer, Conv2d)]
        return bool(convs) and all(conv.winograd for conv in convs)

    @winograd.setter
    def winograd(self, flag):
        flag = _args.check_bool(flag, "winograd")
        for layer in self.layers:
            if isinstance(layer, Conv2d):
                layer.winograd = flag

    @property
    def dtype(self):
        """The dtype of the parameters (float32 for a model without any)."""
        for p in self.parameters():
            return p.data.dtype
        return np.dtype(np.float32)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def _input(self, x):
        return model_input(x, self.dtype)

    # Conv2d or BatchNorm2d followed by ReLU run as one pass in forward, a ReLU followed by MaxPool2d in backward
    # (see convengine.fusion); False runs every layer on its own (the same values).
    fuse = True
    # Reuse the big arrays of a training step in the next step of the same batch shape (convengine._workspace):
    # the outputs of forward that a later layer reads and replaces by an array of its own, the gradients of
    # backward that an earlier layer does; never an array the model returns or a view of one.
    reuse_buffers = True

    def _arenas(self):
        arenas = getattr(self, "_workspaces", None)
        if arenas is None:
            arenas = self._workspaces = (_workspace.Arena(), _workspace.Arena())
        return arenas

    def forward(self, x, training=False):
        """The model output for a batch. training=True keeps what backward needs and updates BatchNorm's running
        statistics; inference (training=False) keeps nothing."""
        x = self._input(x)
        model_input = x.shape
        pairs = _fusion.pairs(self.layers) if self.fuse else set()
        arena = None
        if training and self.reuse_buffers:
            arena = self._arenas()[0]
            arena.begin((x.shape, x.dtype.str))
            # the last layer whose output is an array of its own: it and those after it take none of the arena's
            last = max((k for k, layer in enumerate(self.layers) if type(layer) in _FRESH_FORWARD), default=-1)
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            step = 2 if i in pairs else 1
            if step == 2 and _fusion.pools_fused(self.layers, i, getattr(x, "shape", ()), training):
                step = 3
            try:
                with _workspace.using(arena if arena is not None and i + step - 1 < last else None):
                    if step == 3:
                        x = _fusion.run_pair_pool(layer, self.layers[i + 1], self.layers[i + 2], x)
                    elif step == 2:
                        x = _fusion.run_pair(layer, self.layers[i + 1], x, training)
                    else:
                        x = layer.forward(x, training)
            except (ValueError, TypeError) as e:
                raise type(e)(self._layer_error(i, x.shape, e, model_input)) from e
            i += step
        if self.input_shape is None:
            self.input_shape = model_input[1:]
        return x

    __call__ = forward

    def _layer_error(self, i, shape, error, model_input=None, what="input"):
        """The message for `error`, raised by layer i on an input (or, in backward, a gradient) of `shape`: the
        layer's index and type, the input the model takes, and a hint for channels-last images."""
        text = f"layer {i} ({type(self.layers[i]).__name__}) cannot take {what} of shape {tuple(shape)}: {error}"
        if self.input_shape is not None:
            text += f"; the model takes input of shape (N, {', '.join(map(str, self.input_shape))})"
            if model_input is not None and tuple(model_input[1:]) != self.input_shape:
                text += f", got {tuple(model_input)}"
        if model_input is not None and len(model_input) == 4 and model_input[3] in (1, 3, 4) \
                and model_input[1] not in (1, 3, 4):
            text += (". Images are NCHW (channels first) here: convert channels-last (N, H, W, C) images with "
                     "x.transpose(0, 3, 1, 2)")
        return text

    def backward(self, grad):
        """Back-propagate d loss / d output, accumulating every parameter's .grad. Returns d loss / d input, or
        None when the first layer skipped it (need_input_grad False)."""
        arena = None
        if self.reuse_buffers:
            arena = self._arenas()[1]
            arena.begin((getattr(grad, "shape", None), len(self.layers)))
            # the first layer whose input gradient is an array of its own: it and those before it take none of the
            # arena's
            first = min((k for k, layer in enumerate(self.layers) if type(layer) in _FRESH_BACKWARD),
                        default=len(self.layers))
        i = len(self.layers) - 1
        while i >= 0:
            layer = self.layers[i]
            if i == 0 and not layer.need_input_grad and not layer.parameters():
                return None
            # a pooling that its batch norm + ReLU pair computed in forward (convengine.fusion) hands them its
            # gradient unscattered: the three backward passes in one
            step = 3 if i >= 2 and getattr(layer, "_after_pair", False) and _fusion.pool_follows(self.layers,
                                                                                                  i - 2) else 1
            # a max pooling after a ReLU takes the gradient through that ReLU too (convengine.fusion)
            if step == 1 and self.fuse and _fusion.relu_pool_backward(self.layers, i):
                step = 2
            try:
                with _workspace.using(arena if arena is not None and i - step + 1 > first else None):
                    if step == 3:
                        new = self.layers[i - 2]._backward_relu_max_pool(grad, layer)
                    elif step == 2:
                        new = layer._backward_relu(grad, self.layers[i - 1]._cache)
                    else:
                        new = layer.backward(grad)
            except (ValueError, TypeError) as e:
                shape = getattr(grad, "shape", ())
                raise type(e)(self._layer_error(i, shape, e, what="gradient")) from e
            # the gradient layer i read is dead once it returned one of its own (the library's layers keep none)
            if arena is not None and type(layer) in _KEEP_NO_GRADIENT and isinstance(grad, np.ndarray) \
                    and not (isinstance(new, np.ndarray) and np.may_share_memory(new, grad)):
                arena.release(grad if grad.base is None else grad.base)
            grad = new
            i -= step
        return grad

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def training_memory_bytes(self, batch, input_shape=None, detail=False):
        """Bytes a training step on `batch` samples holds: parameters and their gradients, what forward keeps for
        backward, the gradients of backward (see convengine.footprint for what is and is not counted). Computed
        from the layer shapes, nothing allocated. detail=True: a dict by part ('parameters', 'activations',
        'gradients', 'total')."""
        from .footprint import training_memory
        batch = _args.check_int(batch, "batch", 1)
        parts = training_memory(self, batch, self._known_input_shape(input_shape))
        return parts if detail else parts["total"]

    def buffers(self):
        """Non-trained state arrays (BatchNorm running statistics) by qualified name."""
        return {f"{i}.{name}": a for i, layer in enumerate(self.layers) for name, a in layer.buffers().items()}

    _SETTINGS = (bool, int, float, str, tuple)      # the layer attributes that are its configuration

    def __getstate__(self):
        # predict's cached frozen plan is keyed by the ids of this model's arrays: a copy builds its own
        state = dict(self.__dict__)
        state.pop("_frozen_for_predict", None)
        return state

    def _predict_plan(self):
        """(frozen plan, input shapes and batch sizes checked to fit in memory) that predict uses, kept between
        calls while the model is unchanged: a checksum of every parameter's and buffer's bytes (in-place edits count
        too, as do training steps and load; _kernels/checksum.h) and the layers' configurations decide. Freezing
        costs about as much as a batch-1 forward; the checksum a few microseconds."""
        # one pass over the layers: their arrays, and their settings in attribute order (an attribute deleted and
        # set again reorders them: a new key, a plan rebuilt, never a stale one). Sorting the settings and naming
        # the buffers took most of a batch-1 call (LeNet-5: 69 us, 31 of them the frozen plan)
        arrays, settings = [], []
        for layer in self.layers:
            arrays += [p.data for p in layer.parameters()]
            arrays += layer.buffers().values()
            settings.append((id(layer), tuple([(k, v) for k, v in vars(layer).items()
                                               if isinstance(v, Sequential._SETTINGS)])))
        crc = _kernels.engine.checksum([np.ascontiguousarray(a) for a in arrays])
        key = (crc, tuple([(id(a), a.shape, a.dtype.str) for a in arrays]), tuple(settings))
        cached = self.__dict__.get("_frozen_for_predict")
        if cached is not None and cached[0] == key:
            return cached[1:]
        self._frozen_for_predict = (key, self.freeze(), set())
        return self._frozen_for_predict[1:]

    def freeze(self, winograd=False):
        """An inference plan of this model (a convengine.frozen.FrozenModel): BatchNorm folded into the convs,
        bias, ReLU and unfolded batch norms applied as each conv's output is stored, activations in buffers reused
        across calls. `frozen(x)` and `frozen.predict(x, batch_size)` give what predict(x) gives. The weights are
        taken now: later training, `load` or edits of the parameters do not reach the frozen model.

        winograd=True opts in to Winograd F(2x2, 3x3) for the float32 3x3, stride-1 convs of 32+ input channels and
        16+ output channels (faster; rounds differently, and a non-finite input spreads over its 2x2 output tile:
        see FrozenModel)."""
        from .frozen import FrozenModel
        return FrozenModel(self, winograd=_args.check_bool(winograd, "winograd"))

    def predict(self, x, batch_size=256):
        """Model outputs for x, computed batch by batch in inference mode, so memory stays bounded by one batch's
        activations. For a classifier, outputs.argmax(axis=1) are the predicted classes. It runs a frozen plan of
        the model as it is now (see freeze(); rebuilt whenever a parameter, buffer or layer setting changed): the
        same as forward(x) within float rounding (BatchNorm folded into the convs: about 1e-6 relative in
        float32), the same bits for any batch_size and thread count. For many calls on small batches, freeze once
        and call the frozen model: it skips the check for changed weights."""
        batch_size = _args.check_int(batch_size, "batch_size", 1)
        x = self._input(x)
        n = x.shape[0]
        if n == 0:
            return np.empty((0,) + self.output_shape(x.shape[1:]), self.dtype)
        if not isinstance(self, Sequential):       # graph models share this method and have no frozen plan yet
            self._check_activations_fit(x.shape[1:], min(n, batch_size))
            out = None
            for start in range(0, n, batch_size):
                y = self.forward(x[start:start + batch_size], training=False)
                if out is None:
                    out = np.empty((n,) + y.shape[1:], y.dtype)
                out[start:start + y.shape[0]] = y
            return out
        # through a plan of the weights as they are now (see freeze): fused and in reused buffers, never stale
        frozen, checked = self._predict_plan()
        if (x.shape[1:], min(n, batch_size)) not in checked:
            self._check_activations_fit(x.shape[1:], min(n, batch_size))
            checked.add((x.shape[1:], min(n, batch_size)))
        try:
            frozen.plan_for(tuple(x.shape[1:]))
        except ValueError:
            self.forward(x[:batch_size], training=False)   # raises the failing layer's error, naming it and the input
            raise
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])
        return frozen.predict(x, batch_size)

    def _check_activations_fit(self, sample_shape, batch):
        """Refuse, before anything is allocated, a batch whose activations at some layer could not fit in this
        machine's memory (a configuration such as padding=2000 on small images), with a ValueError naming the
        layer rather than a MemoryError deep inside an op."""
        limit = _physical_memory()
        if limit is None:
            return
        shape = tuple(sample_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = tuple(layer.output_shape(shape))
            except ValueError:
                return  # a layer that does not fit: forward reports it, naming the layer and the model's input
            nbytes = batch * math.prod(shape) * self.dtype.itemsize
            if nbytes > limit:
                raise ValueError(f"layer {i} ({type(layer).__name__}) would output {batch} x {shape} values "
                                 f"({nbytes / 2 ** 30:,.1f} GiB), more than this machine's {limit / 2 ** 30:,.1f} "
                                 f"GiB of memory: check the layer's configuration, or use a smaller batch_size")

    def predict_proba(self, x, batch_size=256):
        """Class probabilities for x: the softmax of each row of predict(x) (rows sum to 1; each row's maximum is
        subtracted first, so large scores do not overflow). A model whose last layer is Softmax already outputs
        probabilities, which are returned as they are."""
        return self._probabilities(self.predict(x, batch_size))

    def _probabilities(self, out):
        """predict_proba's answer from outputs already computed (out = predict(x), or a frozen plan's): their
        softmax rows, or out itself where the last layer is Softmax."""
        from .layers import Softmax
        from .metrics import softmax
        if out.ndim != 2:
            raise ValueError(f"predict_proba needs a model that outputs (N, classes) scores, but it gives "
                             f"per-sample shape {out.shape[1:]}")
        return out if isinstance(self.layers[-1], Softmax) else softmax(out)

    def output_shape(self, input_shape=None):
        """The output shape of one sample (no batch axis) for one sample's input shape. A layer that does not fit
        what the one before it gives raises ValueError naming the layer (index and type)."""
        shape = self._known_input_shape(input_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except ValueError as e:
                source = "the model input" if i == 0 else "the output of the layers before it"
                raise ValueError(f"layer {i} ({type(layer).__name__}) does not fit {source}, of per-sample shape "
                                 f"{tuple(shape)}: {e}") from e
        return tuple(shape)

    def _known_input_shape(self, input_shape):
        if input_shape is not None:
            return self._shape(input_shape)
        if self.input_shape is None:
            raise ValueError("the input shape is unknown: pass input_shape, or run one forward first")
        return self.input_shape

    def summary(self, input_shape=None):
        """A table of the layers with each one's output shape, parameter count and inference FLOPs per image."""
        shape = self._known_input_shape(input_shape)
        self.output_shape(shape)
        rows = [("#", "layer", "output shape", "params", "FLOPs")]
        total_params = total_flops = 0
        for i, layer in enumerate(self.layers):
            flops = layer.flops(shape)
            shape = layer.output_shape(shape)
            n_params = sum(p.data.size for p in layer.parameters())
            total_params += n_params
            total_flops += flops
            rows.append((str(i), type(layer).__name__, str(tuple(shape)), f"{n_params:,}", f"{flops:,}"))
        return summary_table(rows, 3, f"input {self._known_input_shape(input_shape)}, {self.dtype.name}: "
                                      f"{total_params:,} parameters, {total_flops:,} FLOPs per image")

    def astype(self, dtype):
        """Convert parameters and buffers to dtype (float32 or float64), in place; returns the model. Create the
        optimizer afterwards: its slots keep the old dtype."""
        dtype = np.dtype(dtype)
        if dtype not in _args.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        for layer in self.layers:
            for p in layer.parameters():
                p.data = p.data.astype(dtype)
                p.grad = np.zeros_like(p.data)
            for name, a in layer.buffers().items():
                layer.set_buffer(name, a.astype(dtype))
            if hasattr(layer, "dtype"):
                layer.dtype = dtype
        return self

    def save(self, path):
        """Write the model to path (an .npz). The file is written beside path and renamed over it, so an
        interrupted save leaves any previous file whole."""
        _save(self, path)

    def description(self):
        """The JSON-serialisable part of a saved model."""
        return {
            "format": FORMAT,
            "version": _SEQUENTIAL_VERSION,
            "dtype": self.dtype.name,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "metadata": self.metadata,
            "layers": [{"type": type(layer).__name__, "config": layer.config()} for layer in self.layers],
        }


def _save(model, path, training=None, state_arrays=None):
    """Write model (and, for a training checkpoint, the trainer's JSON state and its arrays) atomically."""
    desc = model.description()
    if isinstance(desc.get("layers"), list) and len(desc["layers"]) > MAX_LAYERS:
        raise ValueError(f"a model file holds at most {MAX_LAYERS:,} layers, this model has {len(desc['layers']):,}")
    if training is not None:
        desc["training"] = training
    try:
        text = json.dumps(desc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model metadata must be JSON-serialisable: {e}") from None
    arrays = {_JSON_KEY: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)}
    for i, layer in enumerate(model.layers):
        for local, p in layer.named_parameters():
            arrays[f"param/{i}.{local}"] = p.data
        for local, a in layer.buffers().items():
            arrays[f"buffer/{i}.{local}"] = a
    for key, a in (state_arrays or {}).items():
        arrays[f"state/{key}"] = a
    _atomic_savez(path, arrays)


def _atomic_savez(path, arrays):
    path = os.fspath(path)
    mode = _FILE_MODE
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode & 0o777
    fd, tmp = temporary_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _FileError(ValueError):
    """A complaint about a model file, already naming it."""


# No model needs more layers than this; the bound keeps a small description from building millions of them.
MAX_LAYERS = 10_000
# Python objects in a description this large are no model; the bound keeps a hostile file from claiming gigabytes.
_MAX_DESCRIPTION_BYTES = 16 << 20


class _Reader:
    """Reads one file against the format, member by member through zipfile and numpy's .npy header parser, so that
    every declared size is checked against the architecture before any data is read or allocated. Every complaint
    is a ValueError that names the file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.zip = None
        self.members = {}

    def fail(self, message):
        raise _FileError(f"{self.path}: {message}")

    @contextlib.contextmanager
    def damage(self, what):
        # zipfile and the .npy parser report a damaged file with many exception types (BadZipFile, NotImplementedError
        # for an unknown compression method, RuntimeError for encryption, struct.error, zlib.error, EOFError,
        # OverflowError, ...). At this boundary each of them means one thing: the file is damaged.
        try:
            yield
        except (_FileError, MemoryError):
            raise
        except Exception as e:
            self.fail(f"{what}: damaged or truncated file ({type(e).__name__}: {e})")

    def open(self):
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
            raise
        except Exception as e:
            self.fail(f"not a convengine model file (an .npz archive is expected; pickles are refused): {e}")
        with self.damage("reading the archive's directory"):
            infos = self.zip.infolist()
        for info in infos:
            name = info.filename
            # The format is an uncompressed .npz: a stored member is as large in the file as it is in memory, so
            # the file's size bounds what loading it can allocate. A compressed one could inflate a thousandfold.
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                self.fail(f"member {name!r} is compressed (method {info.compress_type}); model files are "
                          f"uncompressed .npz archives (numpy.savez, not savez_compressed)")
            if not name.endswith(".npy"):
                self.fail(f"unexpected member {name!r}: a model file holds only .npy arrays")
            key = name[:-len(".npy")]
            if key in self.members:
                self.fail(f"member {name!r} appears twice")
            self.members[key] = info

    def close(self):
        if self.zip is not None:
            self.zip.close()

    def array(self, key, shape, dtype, max_elements=None, read=True):
        """The member `key` as a C-contiguous array, after checking its .npy header declares `shape` (None: any
        1-D shape of at most max_elements) and `dtype`; the data is read only if the header fits, and only with
        read (else None: the header alone is checked)."""
        info = self.members.get(key)
        if info is None:
            self.fail(f"array {key!r} is missing")
        with self.damage(f"array {key!r}"), self.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                self.fail(f"array {key!r} has .npy format version {version}, expected 1.0 or 2.0")
            if got_dtype.hasobject:
                self.fail(f"array {key!r} holds Python objects (a pickle), which are refused")
            if shape is None:
                ok_shape = len(got_shape) == 1 and got_shape[0] <= max_elements
            else:
                ok_shape = tuple(got_shape) == tuple(shape)
            if not ok_shape or got_dtype != dtype:
                need = f"shape {tuple(shape)}" if shape is not None else f"1-D, at most {max_elements} elements"
                self.fail(f"array {key!r} has shape {got_shape} and dtype {got_dtype}, the architecture needs "
                          f"{need} and dtype {np.dtype(dtype)}")
            nbytes = math.prod(got_shape) * got_dtype.itemsize
            if info.file_size != f.tell() + nbytes:
                self.fail(f"array {key!r}: its size in the archive ({info.file_size} bytes) does not match its "
                          f".npy header ({f.tell() + nbytes} bytes)")
            if not read:
                return None
            data = f.read(nbytes)
            # Reading to the end makes zipfile check the member's CRC.
            if len(data) != nbytes or f.read(1):
                self.fail(f"array {key!r} is truncated or has trailing bytes")
        a = np.frombuffer(data, dtype=got_dtype).reshape(got_shape, order="F" if fortran else "C")
        return np.array(a, order="C")

    def description(self):
        raw = self.array(_JSON_KEY, None, np.dtype(np.uint8), _MAX_DESCRIPTION_BYTES)
        try:
            desc = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self.fail(f"the description is not valid JSON: {e}")
        if not isinstance(desc, dict):
            self.fail(f"the description must be a JSON object, got {type(desc).__name__}")
        if desc.get("format") != FORMAT:
            self.fail(f"format is {desc.get('format')!r}, expected {FORMAT!r}")
        version = desc.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            self.fail(f"version must be an integer, got {version!r}")
        if not 1 <= version <= VERSION:
            self.fail(f"format version {version} is not supported (this convengine reads versions 1 to {VERSION})")
        return desc

    def layers(self, desc, types=LAYER_TYPES):
        specs = desc.get("layers")
        if not isinstance(specs, list) or not specs:
            self.fail(f"'layers' must be a non-empty list, got {type(specs).__name__}")
        if len(specs) > MAX_LAYERS:
            self.fail(f"the description declares {len(specs):,} layers, more than the {MAX_LAYERS:,} a model "
                      f"file may hold")
        layers = []
        # Placeholders only: a description may declare layers of any size, and the file's arrays, checked against
        # these shapes next, decide whether it is honest before anything is allocated.
        with shapes_only():
            for i, spec in enumerate(specs):
                if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                    self.fail(f"layer {i} must be an object with a 'type' string, got {spec!r}")
                cls = types.get(spec["type"])
                if cls is None:
                    self.fail(f"layer {i} has unknown type {spec['type']!r} (known: {', '.join(types)})")
                config = spec.get("config", {})
                if not isinstance(config, dict):
                    self.fail(f"layer {i} config must be an object, got {type(config).__name__}")
                try:
                    layers.append(cls(**config))
                except (TypeError, ValueError, OverflowError) as e:
                    self.fail(f"layer {i} ({spec['type']}) has a bad config {config!r}: {e}")
        return layers

    def model(self, desc):
        if "output" in desc:
            if desc["version"] < 2:
                self.fail(f"a graph model (with an 'output') needs format version 2, the file says {desc['version']}")
            from .graph import _from_description
            return _from_description(self, desc)
        layers = self.layers(desc)
        try:
            model = Sequential(layers, input_shape=desc.get("input_shape"))
        except (TypeError, ValueError) as e:
            self.fail(f"bad model description: {e}")
        return self.fill(model, desc)

    def fill(self, model, desc):
        """Check the description's dtype and metadata, then replace every placeholder parameter and buffer of the
        model's layers by the file's array, after checking the file holds exactly the arrays they need."""
        layers = model.layers
        if desc.get("dtype") != model.dtype.name:
            self.fail(f"dtype {desc.get('dtype')!r} does not match the layers' dtype {model.dtype.name}")
        metadata = desc.get("metadata", {})
        if not isinstance(metadata, dict):
            self.fail(f"metadata must be an object, got {type(metadata).__name__}")
        model.metadata = metadata
        expected = {}
        for i, layer in enumerate(layers):
            for local, p in layer.named_parameters():
                expected[f"param/{i}.{local}"] = p.data
            for local, a in layer.buffers().items():
                expected[f"buffer/{i}.{local}"] = a
        unexpected = sorted(k for k in self.members if k not in expected and k != _JSON_KEY
                            and not k.startswith("state/"))
        if unexpected:
            self.fail(f"unexpected arrays {unexpected} for this architecture")
        missing = sorted(k for k in expected if k not in self.members)
        if missing:
            self.fail(f"arrays {missing} are missing")
        for i, layer in enumerate(layers):
            for local, p in layer.named_parameters():
                p.data = self.array(f"param/{i}.{local}", p.data.shape, p.data.dtype)
                p.grad = np.zeros_like(p.data)
            for local, a in layer.buffers().items():
                layer.set_buffer(local, self.array(f"buffer/{i}.{local}", a.shape, a.dtype))
        return model

    def state(self, model, read):
        """A checkpoint's optimizer slots: each `state/optimizer/<slot>/<i>` shaped like parameter i. Names and
        headers are always checked, the data read only with read."""
        params = model.parameters()
        state = {}
        for key in sorted(k for k in self.members if k.startswith("state/")):
            parts = key.split("/")
            if len(parts) != 4 or parts[1] != "optimizer" or not parts[3].isdigit() or int(parts[3]) >= len(params):
                self.fail(f"unexpected checkpoint array {key!r}")
            p = params[int(parts[3])]
            state[key[len("state/"):]] = self.array(key, p.data.shape, p.data.dtype, read=read)
        return state if read else {}


def _read(path, with_state=False):
    """(model, training description or None, {key: array} of a checkpoint's state arrays, read only with_state)."""
    reader = _Reader(path)
    try:
        reader.open()
        desc = reader.description()
        model = reader.model(desc)
        training = desc.get("training")
        if training is not None and not isinstance(training, dict):
            reader.fail(f"'training' must be an object, got {type(training).__name__}")
        state = reader.state(model, read=with_state)
    finally:
        reader.close()
    return model, training, state


def load(path):
    """Load a model written by Sequential.save or Graph.save (a Sequential or a convengine.graph.Graph; also a
    training checkpoint, whose optimizer state is ignored).
    Raises ValueError, naming the file, for a file that is corrupt, truncated, of another format version, holds
    pickled data, or declares arrays that do not fit its architecture."""
    return _read(path)[0]


def lenet(input_shape=(1, 8, 8), num_classes=10):
    """A LeNet-style classifier (LeCun et al., 1998) sized for the input: two conv -> ReLU -> pool stages, then
    fully connected layers.

    Below 16x16 (the 8x8 digits) the convolutions are 3x3 with 'same' padding, 32 and 64 maps with batch norm,
    so that two 2x2 pools still leave 2x2 maps, then 128 hidden units with dropout 0.25. From 16x16 up it is
    LeNet-5's layout: 5x5 convolutions with 6 and 16 maps (the first padded by 2 below 32x32, as MNIST's 28x28 is
    LeNet-5's 32x32 without its border), 120 and 84 hidden units."""
    c, h, w = Sequential._shape(input_shape)
    num_classes = _args.check_int(num_classes, "num_classes", 1)
    if min(h, w) < 16:
        if min(h, w) < 4:
            raise ValueError(f"lenet needs images of at least 4x4, got input_shape {(c, h, w)}")
        features = [Conv2d(c, 32, 3, padding=1), BatchNorm2d(32), ReLU(), MaxPool2d(2),
                    Conv2d(32, 64, 3, padding=1), BatchNorm2d(64), ReLU(), MaxPool2d(2), Flatten()]
        n = Sequential(features).output_shape((c, h, w))[0]
        head = [Linear(n, 128), ReLU(), Dropout(0.25), Linear(128, num_classes, init="glorot")]
    else:
        features = [Conv2d(c, 6, 5, padding=2 if min(h, w) < 32 else 0), ReLU(), MaxPool2d(2),
                    Conv2d(6, 16, 5), ReLU(), MaxPool2d(2), Flatten()]
        n = Sequential(features).output_shape((c, h, w))[0]
        head = [Linear(n, 120), ReLU(), Linear(120, 84), ReLU(), Linear(84, num_classes, init="glorot")]
    return Sequential(features + head, input_shape=(c, h, w))
