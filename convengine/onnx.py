"""ONNX in and out: `export(model, path)` writes a Sequential or graph model as an ONNX file that ONNX Runtime (or
any ONNX runtime) runs; `load(path)` reads an ONNX CNN, e.g. one written by `torch.onnx.export`, into a trainable
convengine model (its initializers become parameters).

Supported ONNX ops (default domain): Conv (strides, pads, dilations, group, auto_pad), BatchNormalization
(inference), Relu, MaxPool (pads, ceil_mode), AveragePool (pads, ceil_mode, count_include_pad), GlobalAveragePool,
ReduceMean over the two spatial axes (as PyTorch's exporter writes a global average pool), Flatten (axis 1),
Reshape to (N, -1), Gemm, MatMul (with a following Add of a bias vector), Add of two tensors,
Concat, Dropout and Identity (removed: inference), Constant (for a Reshape's shape or a bias), and the activations
Sigmoid, Tanh, LeakyRelu and Softmax (along axis 1). Shape, Gather,
Unsqueeze and Concat of integers are evaluated where they compute a Reshape's target from the batch size (PyTorch's
`x.view(x.size(0), -1)` with a dynamic batch). Any other op is refused with an error naming its type and node.

The loader is as careful as the .npz model loader: it parses the protobuf and nothing else (no custom ops, no
functions, no code), reads external data only from regular files inside the model's folder, checks every declared
size against the bytes really there before converting anything, and refuses duplicate names, dangling inputs and
cycles. Every complaint is a ValueError naming the file (and the node).

`onnx` is an optional dependency (`pip install 'convengine[onnx]'`), imported by this module alone, when used.
"""
import contextlib
import heapq
import json
import math
import os
import stat

import numpy as np

from . import _args
from .graph import Add, Concat, Graph, _Merge
from .layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, LeakyReLU, Linear, MaxPool2d,
                     ReLU, Sigmoid, Softmax, Tanh, shapes_only)
from .model import MAX_LAYERS, Sequential
from ._outputs import temporary_beside

__all__ = ["export", "load", "SUPPORTED_OPS", "OPSET"]

SUPPORTED_OPS = ("Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
                 "Reshape", "Gemm", "MatMul", "Add", "Concat", "Dropout", "Identity", "Constant", "Shape", "Gather",
                 "Unsqueeze", "ReduceMean", "Sigmoid", "Tanh", "LeakyRelu", "Softmax")
# The opset export writes: every op above has its current meaning there, and ONNX Runtime reads it.
OPSET = 13
_IR_VERSION = 7

# Per-sample inputs larger than this are no image; the bound keeps a hostile file's declared shapes in reason.
_MAX_SAMPLE_ELEMENTS = 1 << 31
_MAX_PROTO_BYTES = (2 << 30) - 1
_MAX_RANK = 8
# Nodes per file: a layer per computing node, bounded like the layers of a .npz model file (shape arithmetic,
# Identity and Constant nodes take a few more).
_MAX_NODES = 4 * MAX_LAYERS
_METADATA_KEY = "convengine.metadata"
_MAX_METADATA_BYTES = 1 << 20


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("convengine.onnx needs the 'onnx' package: pip install 'convengine[onnx]' "
                          "(or pip install onnx)") from None
    return onnx


# -------------------------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------------------------

def _wiring(model):
    """(layers, inputs per layer, output index) of a Sequential or a Graph."""
    if isinstance(model, Graph):
        return model.layers, model.inputs, model.output
    if isinstance(model, Sequential):
        return model.layers, [[i - 1] for i in range(len(model.layers))], len(model.layers) - 1
    raise TypeError(f"model must be a convengine Sequential or Graph, got {type(model).__name__}")


def _same_pads(size, kernel, stride, dilation):
    """(begin, end) padding of 'same' (ONNX's SAME_UPPER: the extra row or column at the end)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def export(model, path):
    """Write `model` (a Sequential or a Graph whose input shape is known: set at construction or by one forward)
    to `path` as an ONNX model (opset 13) with one input "input" of shape (N, ...) and one output "output"; the
    batch size N is free. Dropout is written as Identity (inference). The file is written beside path and renamed
    over it."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    layers, wiring, output = _wiring(model)
    if model.input_shape is None:
        raise ValueError("the model's input shape is unknown: pass input_shape when building it, or run one forward")
    dtype = model.dtype
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}[dtype]
    shapes = {-1: tuple(model.input_shape)}
    for i, (layer, srcs) in enumerate(zip(layers, wiring)):
        ins = [shapes[j] for j in srcs]
        shapes[i] = tuple(layer.output_shape(ins if isinstance(layer, _Merge) else ins[0]))

    nodes, inits = [], []

    def name_of(j):
        return "input" if j == -1 else ("output" if j == output else f"t{j}")

    def const(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a, dtype=dtype), name))
        return name

    for i, (layer, srcs) in enumerate(zip(layers, wiring)):
        x = [name_of(j) for j in srcs]
        y = name_of(i)
        node_name = f"{i}.{type(layer).__name__}"
        params = dict(layer.named_parameters())
        in_shape = shapes[srcs[0]]
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            sh, sw = layer.stride
            dh, dw = layer.dilation
            if layer.padding == "same":
                (pt, pb), (pl, pr) = (_same_pads(in_shape[1], kh, sh, dh), _same_pads(in_shape[2], kw, sw, dw))
            elif layer.padding == "valid":
                pt = pb = pl = pr = 0
            else:
                (pt, pl), (pb, pr) = layer.padding, layer.padding
            inputs = x + [const(f"{i}.weight", params["weight"].data)]
            if "bias" in params:
                inputs.append(const(f"{i}.bias", params["bias"].data))
            nodes.append(helper.make_node("Conv", inputs, [y], name=node_name, kernel_shape=[kh, kw],
                                          strides=[sh, sw], pads=[pt, pl, pb, pr], dilations=[dh, dw],
                                          group=layer.groups))
        elif isinstance(layer, BatchNorm2d):
            inputs = x + [const(f"{i}.weight", params["weight"].data), const(f"{i}.bias", params["bias"].data),
                          const(f"{i}.running_mean", layer.running_mean),
                          const(f"{i}.running_var", layer.running_var)]
            nodes.append(helper.make_node("BatchNormalization", inputs, [y], name=node_name, epsilon=layer.eps,
                                          momentum=1.0 - layer.momentum))
        elif isinstance(layer, ReLU):
            nodes.append(helper.make_node("Relu", x, [y], name=node_name))
        elif isinstance(layer, (Sigmoid, Tanh)):
            nodes.append(helper.make_node(type(layer).__name__, x, [y], name=node_name))
        elif isinstance(layer, LeakyReLU):
            nodes.append(helper.make_node("LeakyRelu", x, [y], name=node_name, alpha=layer.negative_slope))
        elif isinstance(layer, Softmax):
            nodes.append(helper.make_node("Softmax", x, [y], name=node_name, axis=1))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            pads, ceil_mode = _onnx_pool_pads(layer, in_shape, node_name)
            attrs = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=pads,
                         ceil_mode=ceil_mode)
            if isinstance(layer, AvgPool2d):
                attrs["count_include_pad"] = int(layer.count_include_pad)
            op = "MaxPool" if isinstance(layer, MaxPool2d) else "AveragePool"
            nodes.append(helper.make_node(op, x, [y], name=node_name, **attrs))
        elif isinstance(layer, GlobalAvgPool2d):
            nodes.append(helper.make_node("GlobalAveragePool", x, [f"{y}.pooled"], name=node_name))
            nodes.append(helper.make_node("Flatten", [f"{y}.pooled"], [y], name=f"{node_name}.flatten", axis=1))
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", x, [y], name=node_name, axis=1))
        elif isinstance(layer, Linear):
            inputs = x + [const(f"{i}.weight", params["weight"].data)]
            if "bias" in params:
                inputs.append(const(f"{i}.bias", params["bias"].data))
            nodes.append(helper.make_node("Gemm", inputs, [y], name=node_name, transB=1))
        elif isinstance(layer, Dropout):
            nodes.append(helper.make_node("Identity", x, [y], name=node_name))
        elif isinstance(layer, Add):
            acc = x[0]
            for k, other in enumerate(x[1:]):
                out = y if k == len(x) - 2 else f"{y}.sum{k}"
                nodes.append(helper.make_node("Add", [acc, other], [out], name=node_name if k == 0 else
                                              f"{node_name}.{k}"))
                acc = out
        elif isinstance(layer, Concat):
            nodes.append(helper.make_node("Concat", x, [y], name=node_name, axis=layer.axis))
        else:
            raise ValueError(f"layer {i} ({type(layer).__name__}) has no ONNX equivalent in this exporter")

    graph = helper.make_graph(
        nodes, "convengine",
        [helper.make_tensor_value_info("input", elem, ["N", *model.input_shape])],
        [helper.make_tensor_value_info("output", elem, ["N", *shapes[output]])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="convengine",
                              ir_version=_IR_VERSION)
    if model.metadata:
        helper.set_model_props(proto, {_METADATA_KEY: json.dumps(model.metadata, allow_nan=False)})
    onnx.checker.check_model(proto)
    _atomic_write(path, proto.SerializeToString())


def _onnx_pool_pads(layer, in_shape, node_name):
    """(pads, ceil_mode) to write for a pooling layer on per-sample input in_shape. Where rounding up would add a
    window that starts past the input and its left padding, the layer (as PyTorch) drops it; ONNX Runtime's kernels
    drop it too, but ONNX's shape inference counts it, and a model whose next layers depend on that shape (a
    Flatten into a Gemm) failed to load. So an axis where it would count a dropped window gets its end padding cut
    by the remainder that made it round up: the same windows, counted alike by both (the loader reads it back as
    the symmetric padding, _ceil_pads). Where the end padding is shorter than that remainder (a kernel smaller than
    its stride) the floor is written instead if it is the same output, else the layer is refused: no ONNX
    attributes say it."""
    (ph, pw) = layer.padding
    if not layer.ceil_mode:
        return [ph, pw, ph, pw], 0
    pads = [ph, pw, ph, pw]
    adds, short = False, None
    for axis, (size, k, s, p) in enumerate(zip(in_shape[1:], layer.kernel_size, layer.stride, layer.padding)):
        ours = _args.conv_output_size(size, k, s, p, p, 1, True)
        floor = _args.conv_output_size(size, k, s, p, p, 1, False)
        remainder = (size + 2 * p - k) % s
        if ours > floor:
            adds = True
        elif remainder > p:
            short = axis
        elif remainder:
            pads[2 + axis] -= remainder
    if short is None:
        return pads, 1
    if not adds:
        return [ph, pw, ph, pw], 0
    raise ValueError(f"{node_name}: ceil_mode adds a window along one axis and drops one that would start past the "
                     f"input along {'HW'[short]} (input {tuple(in_shape)}), which ONNX cannot write for a kernel "
                     "smaller than its stride: use ceil_mode=False")


def _ceil_pads(pads, in_hw, kernel, strides):
    """pads as written by _onnx_pool_pads for a ceil_mode pooling: an axis whose end padding is short of its
    begin by the remainder that rounding up would count back as the symmetric padding (the same output size and
    windows); any other pads as they are."""
    pads = list(pads)
    for axis, (size, k, s) in enumerate(zip(in_hw, kernel, strides)):
        begin, end = pads[axis], pads[2 + axis]
        if 0 <= end < begin and (size + begin + end - k) % s == 0 and (
                _args.conv_output_size(size, k, s, begin, begin, 1, True) == (size + begin + end - k) // s + 1):
            pads[2 + axis] = begin
    return pads


def _atomic_write(path, data):
    path = os.fspath(path)
    fd, tmp = temporary_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------------------------------------------------------
# Import
# -------------------------------------------------------------------------------------------------------------------

class _Fail(ValueError):
    pass


# ONNX TensorProto data types this loader converts: code -> (numpy dtype, the repeated field of typed data).
_ELEM = {1: (np.dtype("<f4"), "float_data"), 11: (np.dtype("<f8"), "double_data"), 7: (np.dtype("<i8"), "int64_data")}


class _Loader:
    def __init__(self, path):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))

    def fail(self, message, node=None):
        where = f"node {node}: " if node is not None else ""
        raise _Fail(f"{self.path}: {where}{message}")

    # --- the file ---------------------------------------------------------------------------------------------

    def parse(self):
        onnx = _onnx()
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_PROTO_BYTES:
                self.fail(f"{size} bytes: more than protobuf's 2 GB limit for one ModelProto (large weights belong "
                          f"in external data files)")
            data = f.read()
        if not data:
            self.fail("empty file: not an ONNX model")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError and friends: the bytes are no ModelProto
            self.fail(f"not an ONNX model (damaged, truncated or another format): {type(e).__name__}: {e}")
        if not proto.HasField("graph") or not proto.graph.node:
            self.fail("not an ONNX model (no graph with nodes; damaged, truncated or another format)")
        if len(proto.graph.node) > _MAX_NODES:
            self.fail(f"{len(proto.graph.node):,} nodes, more than the {_MAX_NODES:,} a convengine model may hold")
        if proto.ir_version <= 0:
            self.fail(f"not an ONNX model (ir_version {proto.ir_version})")
        self.proto = proto
        return proto

    def opset(self):
        versions = {}
        for op in self.proto.opset_import:
            if op.domain in versions:
                self.fail(f"opset_import lists domain {op.domain!r} twice")
            versions[op.domain] = op.version
        version = versions.get("", versions.get("ai.onnx"))
        if version is None or version < 7:
            self.fail(f"the default ONNX opset is missing or older than 7 (opset_import: {versions})")
        if self.proto.functions:
            self.fail(f"model-local functions are not supported ({self.proto.functions[0].name!r})")
        return version

    # --- tensors ----------------------------------------------------------------------------------------------

    def tensor(self, t, what):
        """A TensorProto as a NumPy array, after checking its declared dims against the bytes really present."""
        if t.data_type not in _ELEM:
            self.fail(f"{what} has data type {t.data_type}; only float32, float64 and int64 tensors are supported")
        dtype, field = _ELEM[t.data_type]
        dims = list(t.dims)
        if len(dims) > _MAX_RANK:
            self.fail(f"{what} declares {len(dims)} dimensions; tensors of rank up to {_MAX_RANK} are supported")
        if any(d < 0 for d in dims):
            self.fail(f"{what} declares negative dimensions {dims}")
        count = math.prod(dims)
        nbytes = count * dtype.itemsize
        if t.data_location == 1:  # EXTERNAL
            raw = self.external(t, what, nbytes)
        elif t.HasField("raw_data"):
            raw = t.raw_data
            if len(raw) != nbytes:
                self.fail(f"{what} declares dims {dims} ({nbytes} bytes) but holds {len(raw)} bytes")
        else:
            values = getattr(t, field)
            if len(values) != count:
                self.fail(f"{what} declares dims {dims} ({count} values) but holds {len(values)} values")
            return np.array(values, dtype=dtype.newbyteorder("=")).reshape(dims)
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(dims)

    def external(self, t, what, nbytes):
        info = {}
        for entry in t.external_data:
            if entry.key in info:
                self.fail(f"{what}: external data key {entry.key!r} appears twice")
            info[entry.key] = entry.value
        location = info.get("location")
        if not location:
            self.fail(f"{what}: external data without a location")
        if os.path.isabs(location) or "\\" in location or location.startswith("~") or "\0" in location:
            self.fail(f"{what}: external data location {location!r} must be a relative path inside the model's "
                      f"folder")
        full = os.path.realpath(os.path.join(self.folder, location))
        folder = os.path.realpath(self.folder)
        if os.path.commonpath([full, folder]) != folder or full == folder:
            self.fail(f"{what}: external data location {location!r} lies outside the model's folder {folder}")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            self.fail(f"{what}: external data offset/length must be integers, got {info}")
        if offset < 0 or (length is not None and length != nbytes):
            self.fail(f"{what}: external data offset {offset} / length {length} do not fit its dims "
                      f"{list(t.dims)} ({nbytes} bytes)")
        try:
            # Non-blocking, so that a FIFO placed in the folder cannot stall the loader; then regular files only.
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    self.fail(f"{what}: external data {location!r} is not a regular file")
                if offset + nbytes > st.st_size:
                    self.fail(f"{what}: external data {location!r} holds {st.st_size} bytes, the tensor needs "
                              f"{nbytes} at offset {offset}")
                f.seek(offset)
                raw = f.read(nbytes)
        except OSError as e:
            self.fail(f"{what}: cannot read external data {location!r}: {e}")
        if len(raw) != nbytes:
            self.fail(f"{what}: external data {location!r} is truncated")
        return raw

    # --- the graph --------------------------------------------------------------------------------------------

    def check_graph(self):
        """Names, inputs, outputs, topological order; returns (input name, its dims, elem type, output name,
        {initializer name: TensorProto}, live nodes in topological order)."""
        g = self.proto.graph
        if g.sparse_initializer:
            self.fail("sparse initializers are not supported")
        inits = {}
        for t in g.initializer:
            if not t.name:
                self.fail("an initializer has no name")
            if t.name in inits:
                self.fail(f"duplicate initializer name {t.name!r}")
            inits[t.name] = t
        inputs = [v for v in g.input if v.name not in inits]
        if len({v.name for v in g.input}) != len(g.input):
            self.fail("duplicate graph input names")
        if len(inputs) != 1:
            self.fail(f"a model with exactly one input is supported, got {[v.name for v in inputs]}")
        if len(g.output) != 1:
            self.fail(f"a model with exactly one output is supported, got {[v.name for v in g.output]}")
        x = inputs[0]
        tt = x.type.tensor_type if x.type.HasField("tensor_type") else None
        if tt is None or tt.elem_type not in (1, 11):
            self.fail(f"input {x.name!r} must be a float32 or float64 tensor")
        if not tt.HasField("shape") or len(tt.shape.dim) < 2:
            self.fail(f"input {x.name!r} must declare a shape (N, ...) of rank 2 or more")
        dims = []
        for k, d in enumerate(tt.shape.dim):
            v = d.dim_value if d.HasField("dim_value") else None
            if k > 0 and (v is None or v < 1):
                self.fail(f"input {x.name!r}: every axis but the batch axis needs a fixed size >= 1, got "
                          f"{[dd.dim_value if dd.HasField('dim_value') else dd.dim_param for dd in tt.shape.dim]}")
            dims.append(v)
        if math.prod(dims[1:]) > _MAX_SAMPLE_ELEMENTS:
            self.fail(f"input {x.name!r} declares samples of shape {dims[1:]}, more than {_MAX_SAMPLE_ELEMENTS} "
                      f"elements")
        known = set(inits) | {x.name}
        producers = {}
        names = set()
        for k, node in enumerate(g.node):
            label = self.label(k, node)
            if node.name:
                if node.name in names:
                    self.fail(f"duplicate node name {node.name!r}", label)
                names.add(node.name)
            if node.domain not in ("", "ai.onnx"):
                self.fail(f"op {node.domain}:{node.op_type} is not supported (supported: {', '.join(SUPPORTED_OPS)})",
                          label)
            if node.op_type not in SUPPORTED_OPS:
                self.fail(f"op {node.op_type} is not supported (supported: {', '.join(SUPPORTED_OPS)})", label)
            for out in node.output:
                if not out:
                    continue
                if out in producers or out in known:
                    self.fail(f"output name {out!r} is already used by another node, an initializer or the input",
                              label)
                producers[out] = k
        for k, node in enumerate(g.node):
            for name in node.input:
                if name and name not in known and name not in producers:
                    self.fail(f"input {name!r} is produced by no node, initializer or graph input (dangling)",
                              self.label(k, node))
        y = g.output[0].name
        if y not in producers:
            self.fail(f"the graph output {y!r} is produced by no node")
        # Kahn's algorithm, taking the first ready node in file order (linear in the graph's size, whatever the
        # file's order); whatever never becomes ready sits on a cycle.
        waiting = [0] * len(g.node)
        readers = {}
        for k, node in enumerate(g.node):
            for name in set(n for n in node.input if n and n not in known):
                waiting[k] += 1
                readers.setdefault(name, []).append(k)
        ready = [k for k in range(len(g.node)) if waiting[k] == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            k = heapq.heappop(ready)
            order.append(k)
            for out in g.node[k].output:
                for r in readers.get(out, ()) if out else ():
                    waiting[r] -= 1
                    if waiting[r] == 0:
                        heapq.heappush(ready, r)
        if len(order) != len(g.node):
            k = min(set(range(len(g.node))) - set(order))
            self.fail("the graph has a cycle through this node", self.label(k, g.node[k]))
        # Only what the output depends on.
        live, need = set(), {y}
        for k in reversed(order):
            if any(o in need for o in g.node[k].output):
                live.add(k)
                need.update(n for n in g.node[k].input if n)
        return x.name, dims, tt.elem_type, y, inits, [k for k in order if k in live]

    @staticmethod
    def label(k, node):
        return f"#{k} {node.name!r} ({node.op_type})" if node.name else f"#{k} ({node.op_type})"


def _float32_decimal(value):
    """The shortest decimal that rounds to float32 `value`, as a float: ONNX keeps float attributes in 32 bits, so
    a batch norm's epsilon of 1e-5 arrives as 9.99999974738e-06; taken as written, a float64 model exported and
    loaded back computed other bits. Every float32 a writer meant as a short decimal (1e-5, 1e-3, 0.1, 0.01) comes
    back as that decimal; any other comes back as itself."""
    return float(str(np.float32(value)))


def _attrs(loader, node, label, allowed):
    """{name: value} of a node's attributes, refusing any not in `allowed` (name -> kind: i, f, ints, s, t)."""
    out = {}
    for a in node.attribute:
        kind = allowed.get(a.name)
        if kind is None:
            loader.fail(f"attribute {a.name!r} is not supported for {node.op_type} (supported: "
                        f"{', '.join(allowed) or 'none'})", label)
        if a.name in out:
            loader.fail(f"attribute {a.name!r} appears twice", label)
        if kind == "i":
            out[a.name] = int(a.i)
        elif kind == "f":
            out[a.name] = _float32_decimal(a.f)
        elif kind == "ints":
            out[a.name] = [int(v) for v in a.ints]
        elif kind == "s":
            out[a.name] = a.s.decode("utf-8", "replace")
        elif kind == "t":
            out[a.name] = a.t
    return out


class _Builder:
    """Converts the checked, live nodes into layers wired as a graph."""

    def __init__(self, loader, input_name, dims, elem, inits):
        self.loader = loader
        self.dtype = np.dtype(np.float32 if elem == 1 else np.float64)
        self.batch = dims[0]
        self.layers, self.wiring = [], []
        # tensor name -> ("value", layer index or -1, full shape with batch axis None) or ("const", array)
        self.tensors = {input_name: ("value", -1, (None,) + tuple(dims[1:]))}
        self.inits = inits
        self.input_name = input_name

    def get(self, name, label):
        entry = self.tensors.get(name)
        if entry is None:
            t = self.inits.get(name)
            if t is None:
                self.loader.fail(f"input {name!r} is not available", label)
            entry = ("const", self.loader.tensor(t, f"initializer {name!r}"))
            self.tensors[name] = entry
        return entry

    def value(self, name, label, rank=None):
        entry = self.get(name, label)
        if entry[0] != "value":
            self.loader.fail(f"input {name!r} is a constant; this op is supported only on computed tensors", label)
        if rank is not None and len(entry[2]) != rank:
            self.loader.fail(f"input {name!r} has shape {_show(entry[2])}, this op needs rank {rank}", label)
        return entry

    def const(self, name, label, shape=None, float_=True):
        entry = self.get(name, label)
        if entry[0] != "const":
            self.loader.fail(f"input {name!r} must be a constant (an initializer), it is computed", label)
        a = entry[1]
        if float_ and a.dtype != self.dtype:
            self.loader.fail(f"constant {name!r} has dtype {a.dtype}, the model's input is {self.dtype}", label)
        if shape is not None and tuple(a.shape) != tuple(shape):
            self.loader.fail(f"constant {name!r} has shape {a.shape}, expected {tuple(shape)}", label)
        return a

    def ints(self, name, label):
        """An integer tensor of rank 0 or 1 known at load time, as (values, is_scalar); None stands for the batch
        size."""
        entry = self.get(name, label)
        if entry[0] == "ints":
            return entry[1], entry[2]
        if entry[0] == "const" and entry[1].dtype == np.int64 and entry[1].ndim <= 1:
            return [int(v) for v in entry[1].reshape(-1)], entry[1].ndim == 0
        self.loader.fail(f"input {name!r} must be a rank-0 or rank-1 int64 tensor known at load time (a shape)",
                         label)

    def add(self, layer, srcs, label, out_name, params=None, buffers=None):
        ins = [self.tensors[s][2][1:] for s in srcs]
        try:
            shape = layer.output_shape(ins if isinstance(layer, _Merge) else ins[0])
        except ValueError as e:
            self.loader.fail(f"input shapes {[_show((None,) + tuple(s)) for s in ins]} do not fit: {e}", label)
        for local, a in (params or {}).items():
            p = dict(layer.named_parameters())[local]
            if a.shape != p.data.shape:
                self.loader.fail(f"parameter {local} has shape {a.shape}, the layer needs {p.data.shape}", label)
            p.data = np.array(a, dtype=self.dtype, order="C")
            p.grad = np.zeros_like(p.data)
        for local, a in (buffers or {}).items():
            layer.set_buffer(local, np.array(a, dtype=self.dtype, order="C"))
        self.layers.append(layer)
        self.wiring.append([self.tensors[s][1] for s in srcs])
        self.tensors[out_name] = ("value", len(self.layers) - 1, (None,) + tuple(shape))


def _show(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _pads2d(loader, label, attrs, in_hw, kernel, strides, dilations):
    """Symmetric (h, w) padding, or 'same' for ONNX's SAME_UPPER (and explicit pads equal to it)."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return (0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations):
            b, e = _same_pads(size, k, s, d)
            pads.append((b, e) if auto == "SAME_UPPER" else (e, b))
        (pt, pb), (pl, pr) = pads
    elif auto == "NOTSET":
        p = attrs.get("pads", [0, 0, 0, 0])
        if len(p) != 4 or any(v < 0 for v in p):
            loader.fail(f"pads must be 4 values >= 0, got {p}", label)
        pt, pl, pb, pr = p
    else:
        loader.fail(f"auto_pad {auto!r} is not supported", label)
    if (pt, pl) == (pb, pr):
        return (pt, pl)
    upper = [_same_pads(size, k, s, d) for size, k, s, d in zip(in_hw, kernel, strides, dilations)]
    if [(pt, pb), (pl, pr)] == upper:
        return "same"
    loader.fail(f"asymmetric padding (top, left, bottom, right) = {(pt, pl, pb, pr)} is not supported", label)


def _pair_attr(loader, label, attrs, name, default):
    v = attrs.get(name, default)
    if len(v) != 2 or any(x < 1 for x in v):
        loader.fail(f"{name} must be 2 values >= 1 (2-D ops only), got {v}", label)
    return tuple(v)


def _flattens_per_sample(node):
    """Whether `node` is a Flatten that keeps the batch axis (axis 1, or -3 of a 4-D input)."""
    if node.op_type != "Flatten" or len(node.input) != 1:
        return False
    axis = [a.i for a in node.attribute if a.name == "axis"]
    return len(node.attribute) == len(axis) and axis in ([], [1], [-3])


def _unused(loader, label, node, consumers, first=1):
    for out in node.output[first:]:
        if out and consumers.get(out):
            loader.fail(f"its output {out!r} (beyond the first) is used; only the first output is supported", label)


def load(path):
    """Read an ONNX model file into a convengine model: a Sequential when its layers form a chain, else a Graph.
    The initializers become trainable parameters (and BatchNorm running statistics). Raises ValueError naming the
    file (and the node) for anything unsupported, damaged or inconsistent."""
    loader = _Loader(path)
    loader.parse()
    opset = loader.opset()
    input_name, dims, elem, output_name, inits, order = loader.check_graph()
    g = loader.proto.graph
    b = _Builder(loader, input_name, dims, elem, inits)
    consumers = {}
    for k in order:
        for name in g.node[k].input:
            if name:
                consumers.setdefault(name, []).append(k)
    absorbed = {}  # node index -> True: an Add folded into the MatMul before it, a Flatten into a global pooling
    constants = {o: g.node[k] for k in order if g.node[k].op_type == "Constant" for o in g.node[k].output}
    for k in order:
        node = g.node[k]
        label = loader.label(k, node)
        op = node.op_type
        ins = list(node.input)
        out = node.output[0] if node.output else ""
        if not out:
            loader.fail("the node has no output", label)

        def need_inputs(low, high=None):
            present = [n for n in ins if n]
            if not low <= len(ins) <= (high or low) or len(present) < low:
                loader.fail(f"expects {low}{'' if high in (None, low) else f' to {high}'} inputs, got {ins}", label)

        if op == "Constant":
            a = _attrs(loader, node, label, {"value": "t"})
            if "value" not in a:
                loader.fail("only Constant with a 'value' tensor is supported", label)
            b.tensors[out] = ("const", loader.tensor(a["value"], f"the value of node {label}"))
        elif op in ("Identity", "Dropout"):
            if op == "Identity":
                need_inputs(1)
                _attrs(loader, node, label, {})
            else:
                need_inputs(1, 3)
                _attrs(loader, node, label, {"ratio": "f", "seed": "i", "is_test": "i"})
                _unused(loader, label, node, consumers)
            b.tensors[out] = b.get(ins[0], label)
        elif op == "Shape":
            need_inputs(1)
            a = _attrs(loader, node, label, {"start": "i", "end": "i"})
            _, _, shape = b.value(ins[0], label)
            full = list(shape)
            b.tensors[out] = ("ints", full[a.get("start", 0):a.get("end", len(full))], False)
        elif op == "Gather":
            need_inputs(2)
            a = _attrs(loader, node, label, {"axis": "i"})
            values, scalar = b.ints(ins[0], label)
            index, index_scalar = b.ints(ins[1], label)
            if scalar or a.get("axis", 0) != 0 or any(i is None or not -len(values) <= i < len(values)
                                                      for i in index):
                loader.fail(f"only Gather of a shape's entries is supported (got {values} [{index}])", label)
            b.tensors[out] = ("ints", [values[i] for i in index], index_scalar)
        elif op == "Unsqueeze":
            need_inputs(1, 2)
            a = _attrs(loader, node, label, {"axes": "ints"})
            values, scalar = b.ints(ins[0], label)
            axes = a.get("axes") if len(ins) == 1 else b.ints(ins[1], label)[0]
            if not scalar or list(axes) != [0]:
                loader.fail("only Unsqueeze of an integer scalar along axis 0 is supported", label)
            b.tensors[out] = ("ints", values, False)
        elif op in ("Relu", "Sigmoid", "Tanh"):
            need_inputs(1)
            _attrs(loader, node, label, {})
            b.value(ins[0], label)
            b.add({"Relu": ReLU, "Sigmoid": Sigmoid, "Tanh": Tanh}[op](), [ins[0]], label, out)
        elif op == "LeakyRelu":
            need_inputs(1)
            a = _attrs(loader, node, label, {"alpha": "f"})
            b.value(ins[0], label)
            try:
                layer = LeakyReLU(a.get("alpha", 0.01))
            except (TypeError, ValueError) as e:
                loader.fail(f"unsupported LeakyRelu: {e}", label)
            b.add(layer, [ins[0]], label, out)
        elif op == "Softmax":
            need_inputs(1)
            a = _attrs(loader, node, label, {"axis": "i"})
            _, _, shape = b.value(ins[0], label)
            axis = a.get("axis", -1 if opset >= 13 else 1)
            axis += len(shape) if axis < 0 else 0
            # Before opset 13 Softmax flattened the axes from `axis` on: the same as ours only on (N, K) input.
            if axis != 1 or (opset < 13 and len(shape) != 2):
                loader.fail(f"Softmax along axis {a.get('axis')} of {_show(shape)} (opset {opset}) is not supported: "
                            f"only along axis 1", label)
            b.add(Softmax(), [ins[0]], label, out)
        elif op == "Conv":
            need_inputs(2, 3)
            a = _attrs(loader, node, label, {"auto_pad": "s", "dilations": "ints", "group": "i",
                                             "kernel_shape": "ints", "pads": "ints", "strides": "ints"})
            _, _, shape = b.value(ins[0], label, rank=4)
            w = b.const(ins[1], label)
            if w.ndim != 4:
                loader.fail(f"weight {ins[1]!r} has shape {w.shape}; 2-D convolutions (4-D weights) are supported",
                            label)
            kernel = tuple(w.shape[2:])
            if "kernel_shape" in a and tuple(a["kernel_shape"]) != kernel:
                loader.fail(f"kernel_shape {a['kernel_shape']} does not match the weight's shape {w.shape}", label)
            strides = _pair_attr(loader, label, a, "strides", [1, 1])
            dilations = _pair_attr(loader, label, a, "dilations", [1, 1])
            group = a.get("group", 1)
            if group < 1:
                loader.fail(f"group must be >= 1, got {group}", label)
            padding = _pads2d(loader, label, a, shape[2:], kernel, strides, dilations)
            bias = b.const(ins[2], label, shape=(w.shape[0],)) if len(ins) > 2 and ins[2] else None
            try:
                with shapes_only():
                    layer = Conv2d(w.shape[1] * group, w.shape[0], kernel, stride=strides, padding=padding,
                                   dilation=dilations, groups=group, bias=bias is not None, dtype=b.dtype)
            except (TypeError, ValueError) as e:
                loader.fail(f"unsupported convolution: {e}", label)
            params = {"weight": w} if bias is None else {"weight": w, "bias": bias}
            b.add(layer, [ins[0]], label, out, params)
        elif op == "BatchNormalization":
            need_inputs(5)
            a = _attrs(loader, node, label, {"epsilon": "f", "momentum": "f", "training_mode": "i", "spatial": "i",
                                             "is_test": "i"})
            if a.get("training_mode", 0) != 0 or a.get("spatial", 1) != 1:
                loader.fail("only inference-mode, spatial batch normalization is supported", label)
            _unused(loader, label, node, consumers)
            _, _, shape = b.value(ins[0], label, rank=4)
            c = shape[1]
            scale, bias, mean, var = (b.const(n, label, shape=(c,)) for n in ins[1:5])
            eps = a.get("epsilon", 1e-5)
            momentum = min(max(_float32_decimal(1.0 - a.get("momentum", 0.9)), 0.0), 1.0)
            try:
                with shapes_only():
                    layer = BatchNorm2d(c, eps=eps, momentum=momentum, dtype=b.dtype)
            except (TypeError, ValueError) as e:
                loader.fail(f"unsupported batch normalization: {e}", label)
            b.add(layer, [ins[0]], label, out, {"weight": scale, "bias": bias},
                  {"running_mean": mean, "running_var": var})
        elif op in ("MaxPool", "AveragePool"):
            need_inputs(1)
            allowed = {"auto_pad": "s", "ceil_mode": "i", "kernel_shape": "ints", "pads": "ints", "strides": "ints",
                       "dilations": "ints"}
            if op == "MaxPool":
                allowed["storage_order"] = "i"
                _unused(loader, label, node, consumers)
            else:
                allowed["count_include_pad"] = "i"
            a = _attrs(loader, node, label, allowed)
            _, _, shape = b.value(ins[0], label, rank=4)
            if "kernel_shape" not in a:
                loader.fail("kernel_shape is required", label)
            kernel = _pair_attr(loader, label, a, "kernel_shape", None)
            strides = _pair_attr(loader, label, a, "strides", [1, 1])
            if tuple(a.get("dilations", [1, 1])) != (1, 1):
                loader.fail(f"pooling dilations {a['dilations']} are not supported", label)
            if a.get("ceil_mode", 0) and len(a.get("pads", [])) == 4:
                a["pads"] = _ceil_pads(a["pads"], shape[2:], kernel, strides)
            padding = _pads2d(loader, label, a, shape[2:], kernel, strides, (1, 1))
            if padding == "same":
                loader.fail("asymmetric pooling padding is not supported", label)
            try:
                if op == "MaxPool":
                    layer = MaxPool2d(kernel, strides, padding, ceil_mode=bool(a.get("ceil_mode", 0)))
                else:
                    layer = AvgPool2d(kernel, strides, padding, ceil_mode=bool(a.get("ceil_mode", 0)),
                                      count_include_pad=bool(a.get("count_include_pad", 0)))
            except (TypeError, ValueError) as e:
                loader.fail(f"unsupported pooling: {e}", label)
            b.add(layer, [ins[0]], label, out)
        elif op == "GlobalAveragePool":
            need_inputs(1)
            _attrs(loader, node, label, {})
            _, _, shape = b.value(ins[0], label, rank=4)
            users = consumers.get(out, [])
            if len(users) == 1 and out != output_name and _flattens_per_sample(g.node[users[0]]):
                # pooling then flattening (as export writes GlobalAvgPool2d): GlobalAvgPool2d, whose sums are
                # another order than a whole-plane AvgPool2d's; the Flatten then passes its (N, C) through
                b.add(GlobalAvgPool2d(), [ins[0]], label, out)
                absorbed[users[0]] = True
            else:
                b.add(AvgPool2d(shape[2:], shape[2:]), [ins[0]], label, out)
        elif op == "ReduceMean":
            need_inputs(1, 2)
            a = _attrs(loader, node, label, {"axes": "ints", "keepdims": "i", "noop_with_empty_axes": "i"})
            _, _, shape = b.value(ins[0], label, rank=4)
            axes = a.get("axes") if len(ins) == 1 else b.ints(ins[1], label)[0]
            if axes is None or sorted(v + 4 if v is not None and v < 0 else v for v in axes) != [2, 3]:
                loader.fail(f"ReduceMean is supported only over the two spatial axes (2, 3), got axes {axes}", label)
            if a.get("keepdims", 1):
                b.add(AvgPool2d(shape[2:], shape[2:]), [ins[0]], label, out)
            else:
                b.add(GlobalAvgPool2d(), [ins[0]], label, out)
        elif op == "Flatten":
            need_inputs(1)
            a = _attrs(loader, node, label, {"axis": "i"})
            if k in absorbed:
                b.tensors[out] = b.get(ins[0], label)
                continue
            _, _, shape = b.value(ins[0], label)
            axis = a.get("axis", 1)
            if axis < 0:
                axis += len(shape)
            if axis != 1:
                loader.fail(f"Flatten with axis {a.get('axis')} is not supported (only axis 1: keep the batch axis)",
                            label)
            b.add(Flatten(), [ins[0]], label, out)
        elif op == "Reshape":
            need_inputs(2)
            a = _attrs(loader, node, label, {"allowzero": "i"})
            _, _, shape = b.value(ins[0], label)
            t, scalar = b.ints(ins[1], label)
            features = math.prod(shape[1:])
            zero_ok = a.get("allowzero", 0) == 0
            ok = not scalar and len(t) == 2 and (
                (t[0] == -1 and t[1] == features)
                or (t[0] is None or (t[0] == 0 and zero_ok) or (b.batch is not None and t[0] == b.batch))
                and (t[1] in (-1, features) or (t[1] == 0 and zero_ok and len(shape) == 2)))
            if not ok:
                loader.fail(f"Reshape of {_show(shape)} to {t} is not supported: only to (N, -1), which flattens "
                            f"each sample", label)
            b.add(Flatten(), [ins[0]], label, out)
        elif op == "Gemm":
            need_inputs(2, 3)
            a = _attrs(loader, node, label, {"alpha": "f", "beta": "f", "transA": "i", "transB": "i"})
            if a.get("transA", 0):
                loader.fail("Gemm with transA is not supported", label)
            _, _, shape = b.value(ins[0], label, rank=2)
            w = b.const(ins[1], label)
            if w.ndim != 2:
                loader.fail(f"weight {ins[1]!r} must be 2-D, got shape {w.shape}", label)
            w = w if a.get("transB", 0) else w.T
            w = w * w.dtype.type(a.get("alpha", 1.0))
            out_features = w.shape[0]
            bias = None
            if len(ins) > 2 and ins[2]:
                c = b.const(ins[2], label)
                if c.size not in (1, out_features) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
                    loader.fail(f"bias {ins[2]!r} of shape {c.shape} does not broadcast to ({out_features},)", label)
                bias = np.broadcast_to(c.reshape(-1), (out_features,)) * c.dtype.type(a.get("beta", 1.0))
            _linear(b, loader, label, ins[0], shape, w, bias, out)
        elif op == "MatMul":
            need_inputs(2)
            _attrs(loader, node, label, {})
            _, _, shape = b.value(ins[0], label, rank=2)
            w = b.const(ins[1], label)
            if w.ndim != 2:
                loader.fail(f"weight {ins[1]!r} must be 2-D, got shape {w.shape}", label)
            bias = None
            users = consumers.get(out, [])
            if len(users) == 1 and out != output_name and g.node[users[0]].op_type == "Add":
                add = g.node[users[0]]
                other = [n for n in add.input if n != out]
                constant = constants.get(other[0]) if len(other) == 1 else None
                if constant is not None and other[0] not in b.tensors:
                    value = _attrs(loader, constant, label, {"value": "t"}).get("value")
                    if value is not None:
                        b.tensors[other[0]] = ("const", loader.tensor(value, f"the value of {other[0]!r}"))
                if len(add.input) == 2 and len(other) == 1 and (
                        other[0] in inits and other[0] not in b.tensors
                        or b.tensors.get(other[0], ("",))[0] == "const"):
                    c = b.const(other[0], loader.label(users[0], add))
                    if c.shape in ((w.shape[1],), (1, w.shape[1])):
                        bias = c.reshape(-1)
                        absorbed[users[0]] = True
            _linear(b, loader, label, ins[0], shape, w.T, bias, out)
        elif op == "Add":
            need_inputs(2)
            _attrs(loader, node, label, {})
            if k in absorbed:
                src = [n for n in ins if b.tensors.get(n, ("",))[0] == "value"]
                b.tensors[out] = b.tensors[src[0]]
                continue
            for n in ins:
                if b.get(n, label)[0] != "value":
                    loader.fail(f"Add of the constant {n!r} is supported only as the bias of a MatMul", label)
            b.add(Add(), ins, label, out)
        elif op == "Concat":
            a = _attrs(loader, node, label, {"axis": "i"})
            if len(ins) < 2 or not all(ins):
                loader.fail(f"Concat needs at least two inputs, got {ins}", label)
            if any(b.get(n, label)[0] != "value" for n in ins):
                parts = [b.ints(n, label) for n in ins]
                if a.get("axis") not in (0, -1) or any(scalar for _, scalar in parts):
                    loader.fail("Concat of integers is supported only for 1-D shapes along axis 0", label)
                b.tensors[out] = ("ints", [v for values, _ in parts for v in values], False)
                continue
            shapes = [b.value(n, label)[2] for n in ins]
            if "axis" not in a:
                loader.fail("Concat needs an axis", label)
            axis = a["axis"] + (len(shapes[0]) if a["axis"] < 0 else 0)
            if axis < 1 or axis >= len(shapes[0]):
                loader.fail(f"Concat along axis {a['axis']} is not supported (only axes after the batch axis)", label)
            b.add(Concat(axis), ins, label, out)
        else:  # check_graph refused it already
            loader.fail(f"op {op} is not supported", label)
    entry = b.tensors.get(output_name)
    if entry is None or entry[0] != "value" or entry[1] == -1:
        loader.fail(f"the graph output {output_name!r} is not computed by any supported layer")
    return _model_of(loader, b, entry[1], dims)


def _linear(b, loader, label, src, shape, weight, bias, out):
    if weight.shape[1] != shape[1]:
        loader.fail(f"weight of shape {weight.shape} (as (out, in)) does not fit input {_show(shape)}", label)
    try:
        with shapes_only():
            layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=b.dtype)
    except (TypeError, ValueError) as e:
        loader.fail(f"unsupported fully connected layer: {e}", label)
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    b.add(layer, [src], label, out, params)


def _model_of(loader, b, output, dims):
    # Only the layers the output needs (a Dropout mask, say, may have left a branch unused).
    live = {output}
    for i in range(output, -1, -1):
        if i in live:
            live.update(j for j in b.wiring[i] if j >= 0)
    keep = sorted(live)
    new = {old: k for k, old in enumerate(keep)}
    new[-1] = -1
    layers = [b.layers[i] for i in keep]
    wiring = [[new[j] for j in b.wiring[i]] for i in keep]
    input_shape = tuple(dims[1:])
    try:
        if all(srcs == [k - 1] for k, srcs in enumerate(wiring)):
            model = Sequential(layers, input_shape=input_shape)
        else:
            model = Graph.from_wiring(layers, wiring, new[output], input_shape)
    except (TypeError, ValueError) as e:
        loader.fail(f"cannot build the model: {e}")
    for prop in loader.proto.metadata_props:
        if prop.key == _METADATA_KEY and len(prop.value) <= _MAX_METADATA_BYTES:
            try:
                meta = json.loads(prop.value)
            except (ValueError, RecursionError):
                meta = None
            if isinstance(meta, dict):
                model.metadata = meta
    return model

