"""ONNX in and out (convengine.onnx): PyTorch -> ONNX -> convengine and convengine -> ONNX -> ONNX Runtime for
LeNet-5, a CIFAR-shaped BN net, a depthwise-separable net, ResNet-8 and a two-branch concat net; training an imported
ResNet-8 and exporting it again; hostile files; the error without the onnx package."""
import json
import os
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, optim
from convengine.graph import Add, Concat, Graph, Input
from convengine.model import Sequential
from convengine.trainer import Trainer

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

cx = pytest.importorskip("convengine.onnx")

NET_NAMES = ["lenet5", "cifar_bn", "depthwise_separable", "resnet8", "two_branch"]
# The ops each PyTorch net must have put in its file, so that every supported op is really read.
NET_OPS = {
    "lenet5": {"Conv", "Relu", "MaxPool", "AveragePool", "Flatten", "Gemm"},
    "cifar_bn": {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "Flatten", "Gemm"},
    "depthwise_separable": {"Conv", "BatchNormalization", "GlobalAveragePool", "Flatten", "Gemm"},
    "resnet8": {"Conv", "BatchNormalization", "Add", "GlobalAveragePool", "Shape", "Gather", "Reshape", "Gemm"},
    "two_branch": {"Conv", "Concat", "MaxPool", "Flatten", "Gemm"},
}


def rel_err(got, expected):
    """max |got - expected| relative to the largest |expected|."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def torch_nets(tmp_path_factory):
    """{name: (torch module in eval mode, per-sample input shape, path of its ONNX export)} with a dynamic batch."""
    torch = pytest.importorskip("torch")
    from onnx_nets import NETS
    folder = tmp_path_factory.mktemp("torch_onnx")
    # One PyTorch thread: its OpenMP team would otherwise spin beside convengine's on a small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {}
    for name in NET_NAMES:
        net, shape = NETS[name]()
        with torch.no_grad():  # running statistics far from 0 and 1, so that BatchNorm's inference path matters
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        net.eval()
        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(2, *shape),), str(path), dynamo=False, do_constant_folding=False,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        out[name] = (net, shape, path)
    yield out
    torch.set_num_threads(threads)


def torch_output(net, x):
    import torch
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", NET_NAMES)
def test_pytorch_models_load_and_match_pytorch(name, torch_nets, rng):
    net, shape, path = torch_nets[name]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert NET_OPS[name] <= ops, f"the export lacks {NET_OPS[name] - ops}"
    model = cx.load(path)
    assert isinstance(model, Graph if name in ("resnet8", "two_branch") else Sequential)
    x = rng.standard_normal((3,) + shape).astype(np.float32)  # another batch size than the export's
    assert rel_err(model.predict(x), torch_output(net, x)) < 1e-5
    # Every trained tensor became a parameter (BatchNorm's running statistics are buffers).
    n_torch = sum(p.numel() for p in net.parameters())
    assert sum(p.data.size for p in model.parameters()) == n_torch
    assert model.input_shape == shape


@pytest.mark.parametrize("name", NET_NAMES)
def test_exported_models_run_in_onnxruntime_like_convengine(name, torch_nets, rng, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, shape, path = torch_nets[name]
    model = cx.load(path)
    out = tmp_path / f"{name}.onnx"
    cx.export(model, out)
    x = rng.standard_normal((5,) + shape).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ours = model.predict(x)
    assert rel_err(session.run(None, {"input": x})[0], ours) < 1e-5
    # Back into convengine: the same layers and the same numbers.
    again = cx.load(out)
    assert again.predict(x).tobytes() == ours.tobytes()


def native_graph():
    """Layers and settings PyTorch's exporter does not produce: 'same' padding with stride 2, GlobalAvgPool2d,
    Dropout, a three-way Add, Concat of a pooled branch."""
    x = Input((3, 12, 12))
    h = L.ReLU()(L.BatchNorm2d(6)(L.Conv2d(3, 6, 3, stride=2, padding="same")(x)))
    a = L.Conv2d(6, 6, 3, padding=1)(h)
    b = L.Conv2d(6, 6, 1)(h)
    h = L.ReLU()(Add()([a, b, h]))
    h = Concat()([h, L.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)(h)])
    h = L.Dropout(0.5)(L.Flatten()(L.GlobalAvgPool2d()(h)))
    return Graph(x, L.Linear(12, 4)(h))


def test_native_graph_runs_in_onnxruntime_and_round_trips(tmp_path, rng):
    ort = pytest.importorskip("onnxruntime")
    convengine.manual_seed(0)
    model = native_graph()
    for p in model.parameters():  # no all-zero biases
        p.data += rng.uniform(-0.1, 0.1, p.data.shape).astype(p.data.dtype)
    model.layers[1].running_var[:] = rng.uniform(0.5, 2, 6)
    model.metadata = {"dataset": "digits", "classes": 4}
    path = tmp_path / "native.onnx"
    cx.export(model, path)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    ours = model.predict(x)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert rel_err(theirs, ours) < 1e-5
    back = cx.load(path)
    assert back.metadata == model.metadata
    assert rel_err(back.predict(x), ours) < 1e-6


def test_imported_resnet8_trains_and_exports_again(torch_nets, rng, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net, shape, path = torch_nets["resnet8"]
    model = cx.load(path)
    x = rng.standard_normal((16,) + shape).astype(np.float32)
    y = rng.integers(0, 10, 16)
    before = [p.data.copy() for p in model.parameters()]
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    history = trainer.fit(x, y, epochs=3, batch_size=8, seed=0, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    assert all(not np.array_equal(p.data, b) for p, b in zip(model.parameters(), before))
    out = tmp_path / "trained.onnx"
    cx.export(model, out)
    ours = model.predict(x[:4])
    assert rel_err(ort.InferenceSession(str(out)).run(None, {"input": x[:4]})[0], ours) < 1e-5
    assert rel_err(torch_output(net, x[:4]), ours) > 1e-3  # it did move away from the PyTorch weights


def test_pytorch_default_exporter_output_loads(rng, tmp_path):
    """torch.onnx.export's default (dynamo) exporter, with a dynamic batch: BatchNorm folded into the convs, the
    global average pool as ReduceMean."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from onnx_nets import resnet8
    torch.manual_seed(1)
    net, shape = resnet8()
    net.eval()
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros((2,) + shape),), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("N")},))
    assert {"ReduceMean", "Add", "Gemm"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    model = cx.load(path)
    x = rng.standard_normal((3,) + shape).astype(np.float32)
    assert rel_err(model.predict(x), torch_output(net, x)) < 1e-5


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _hand_model(case, rng):
    """(nodes, initializers, input shape, output shape) of a small hand-written ONNX graph using op forms
    PyTorch's exporters do not write."""
    T = numpy_helper.from_array
    if case == "matmul_add":
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
                 helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
                 helper.make_node("Constant", [], ["b2"], value=T(_f32(rng, 1, 3))),
                 helper.make_node("Add", ["b2", "m2"], ["y"])]
        inits = [T(_f32(rng, 12, 6), "w1"), T(_f32(rng, 6), "b1"), T(_f32(rng, 6, 3), "w2")]
        return nodes, inits, [12], [3]
    if case == "gemm_alpha_beta":
        nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=0)]
        return nodes, [T(_f32(rng, 5, 4), "w"), T(_f32(rng, 4), "c")], [5], [4]
    if case == "conv_auto_pad":
        nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], auto_pad="SAME_UPPER"),
                 helper.make_node("Relu", ["c1"], ["r1"]),
                 helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], auto_pad="SAME_UPPER"),
                 helper.make_node("Conv", ["c2", "w3"], ["c3"], auto_pad="VALID"),
                 helper.make_node("ReduceMean", ["c3"], ["y"], axes=[-2, -1], keepdims=0)]
        inits = [T(_f32(rng, 3, 2, 3, 3), "w1"), T(_f32(rng, 3, 3, 2, 2), "w2"), T(_f32(rng, 3), "b2"),
                 T(_f32(rng, 4, 3, 2, 2), "w3")]
        return nodes, inits, [2, 7, 7], [4]
    if case == "pool_pads":
        nodes = [helper.make_node("MaxPool", ["x"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                 helper.make_node("AveragePool", ["p1"], ["p2"], kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1], count_include_pad=1),
                 helper.make_node("AveragePool", ["p2"], ["p3"], kernel_shape=[2, 2]),
                 helper.make_node("GlobalAveragePool", ["p3"], ["g"]),
                 helper.make_node("Constant", [], ["shape"], value=T(np.array([0, -1], np.int64))),
                 helper.make_node("Reshape", ["g", "shape"], ["y"])]
        return nodes, [], [3, 12, 12], [3]
    if case == "pool_ceil_mode":
        # The last window would start in the padding: dropped, as PyTorch and ONNX Runtime do.
        nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                                  ceil_mode=1),
                 helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                  pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=0)]
        return nodes, [], [2, 5, 5], [2, 2, 2]
    if case == "grouped_dilated":
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=2, dilations=[2, 2], pads=[2, 2, 2, 2]),
                 helper.make_node("Identity", ["c"], ["i"]), helper.make_node("Dropout", ["i"], ["d"]),
                 helper.make_node("Flatten", ["d"], ["y"], axis=1)]
        return nodes, [T(_f32(rng, 4, 2, 3, 3), "w")], [4, 5, 5], [4 * 5 * 5]
    if case == "activations":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
                 helper.make_node("LeakyRelu", ["g"], ["l"], alpha=0.2), helper.make_node("Tanh", ["l"], ["t"]),
                 helper.make_node("Sigmoid", ["t"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=1)]
        return nodes, [T(_f32(rng, 6, 5), "w")], [5], [6]
    if case == "concat_add":
        nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["x", "wb"], ["b"]),
                 helper.make_node("Add", ["a", "b"], ["s"]),
                 helper.make_node("Concat", ["s", "x", "a"], ["y"], axis=-3)]
        return nodes, [T(_f32(rng, 2, 3, 3, 3), "wa"), T(_f32(rng, 2, 3, 1, 1), "wb")], [3, 4, 4], [7, 4, 4]
    raise KeyError(case)


@pytest.mark.parametrize("case", ["matmul_add", "gemm_alpha_beta", "conv_auto_pad", "pool_pads", "pool_ceil_mode",
                                  "grouped_dilated", "activations", "concat_add"])
def test_hand_written_op_forms_match_onnxruntime(case, rng, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    nodes, inits, in_shape, out_shape = _hand_model(case, rng)
    graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"] + out_shape)],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(proto)
    path = save(proto, tmp_path / f"{case}.onnx")
    x = rng.standard_normal([3] + in_shape).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = cx.load(path)
    assert rel_err(model.predict(x), expected) < 1e-5
    # and back out through the exporter
    cx.export(model, tmp_path / "again.onnx")
    again = ort.InferenceSession(str(tmp_path / "again.onnx"), providers=["CPUExecutionProvider"])
    assert rel_err(again.run(None, {"input": x})[0], expected) < 1e-5


# -------------------------------------------------------------------------------------------------------------------
# Hostile and unsupported files
# -------------------------------------------------------------------------------------------------------------------

def small_proto(tmp_path):
    """The ModelProto of a small exported convengine model."""
    convengine.manual_seed(0)
    model = Sequential([L.Conv2d(1, 2, 3), L.ReLU(), L.Flatten(), L.Linear(2 * 4 * 4, 3)], input_shape=(1, 6, 6))
    cx.export(model, tmp_path / "good.onnx")
    return onnx.load(str(tmp_path / "good.onnx"))


def save(proto, path):
    path.write_bytes(proto.SerializeToString())
    return path


def node(proto, op):
    return next(n for n in proto.graph.node if n.op_type == op)


def init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _external(location, offset=0, length=None, data=None):
    def edit(p, folder):
        t = init(p, "0.weight")
        nbytes = len(t.raw_data)
        if data is not None:
            (folder / "weights.bin").write_bytes(data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset), "length": str(nbytes if length is None else length)}
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, v
    return edit


def _cycle(p, folder):
    relu = node(p, "Relu")
    conv = node(p, "Conv")
    conv.input[0] = relu.output[0]


def _dangling(p, folder):
    node(p, "Relu").input[0] = "nowhere"


def _duplicate_output(p, folder):
    node(p, "Flatten").output[0] = node(p, "Relu").output[0]


def _duplicate_initializer(p, folder):
    p.graph.initializer.append(init(p, "0.bias"))


def _duplicate_node_name(p, folder):
    node(p, "Relu").name = node(p, "Conv").name


def _unsupported(p, folder):
    node(p, "Relu").op_type = "Erf"


def _huge_dims(p, folder):
    t = init(p, "3.weight")
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20])


def _shape_mismatch(p, folder):
    t = init(p, "3.weight")
    del t.dims[:]
    t.dims.extend([3, 16])
    t.raw_data = t.raw_data[:3 * 16 * 4]


def _huge_input(p, folder):
    dims = p.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = 1 << 40


def _custom_domain(p, folder):
    node(p, "Relu").domain = "com.example"


def _truncated_raw(p, folder):
    t = init(p, "0.weight")
    t.raw_data = t.raw_data[:-4]


HOSTILE = {
    # name: (edit of the proto, or bytes; the message; the node that must be named, or None)
    "empty": (b"", "empty file", None),
    "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "not an ONNX model",
                     None),
    "truncated": ("truncate", "not an ONNX model", None),
    "npz file": ("npz", "not an ONNX model", None),
    "unsupported op": (_unsupported, "op Erf is not supported", "1.ReLU"),
    "custom domain": (_custom_domain, "com.example:Relu is not supported", "1.ReLU"),
    "external data outside the folder": (_external("../outside.bin"), "outside the model's folder", None),
    "external data absolute path": (_external("/etc/passwd"), "relative path", None),
    "external data too short": (_external("weights.bin", data=b"\0" * 20), "holds 20 bytes", None),
    "external data length lies": (_external("weights.bin", length=8, data=b"\0" * 100), "do not fit", None),
    "external data missing": (_external("nothing-here.bin"), "cannot read external data", None),
    "external data a fifo": (_external("fifo"), "not a regular file", None),
    "rank far too high": (lambda p, folder: init(p, "0.bias").dims.extend([1] * 100000), "rank up to", None),
    "declared dims far beyond the data": (_huge_dims, "declares dims", None),
    "raw data truncated": (_truncated_raw, "holds 68 bytes", None),
    "weight shape does not fit": (_shape_mismatch, "does not fit", "3.Linear"),
    "cycle": (_cycle, "cycle", "0.Conv2d"),
    "dangling input": (_dangling, "dangling", "1.ReLU"),
    "duplicate output name": (_duplicate_output, "already used", "2.Flatten"),
    "duplicate initializer": (_duplicate_initializer, "duplicate initializer name '0.bias'", None),
    "duplicate node name": (_duplicate_node_name, "duplicate node name", "0.Conv2d"),
    "impossible input shape": (_huge_input, "more than", None),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_files_raise_value_error_naming_file_and_node(kind, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo")
    elif kind == "external data a fifo":
        pytest.skip("no FIFOs here")
    proto = small_proto(folder)
    edit, message, node_name = HOSTILE[kind]
    bad = folder / "bad.onnx"
    if isinstance(edit, bytes):
        bad.write_bytes(edit)
    elif edit == "truncate":
        data = proto.SerializeToString()
        bad.write_bytes(data[:len(data) * 2 // 3])
    elif edit == "npz":
        Sequential([L.Flatten(), L.Linear(4, 2)], input_shape=(4,)).save(folder / "m.npz")
        bad = folder / "m.npz"
    else:
        edit(proto, folder)
        save(proto, bad)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message) as info:
            cx.load(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(bad) in str(info.value)
    if node_name is not None:
        assert repr(node_name) in str(info.value)
    assert peak < 16 << 20  # no allocation of what a declared shape claims


def test_external_data_inside_the_folder_loads(tmp_path):
    proto = small_proto(tmp_path)
    good = cx.load(tmp_path / "good.onnx")
    raw = init(proto, "0.weight").raw_data
    _external("sub/weights.bin", offset=16)(proto, tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"x" * 16 + raw + b"tail")
    save(proto, tmp_path / "external.onnx")
    model = cx.load(tmp_path / "external.onnx")
    assert model.parameters()[0].data.tobytes() == good.parameters()[0].data.tobytes()


def test_unsupported_attributes_and_ops_are_named(tmp_path):
    proto = small_proto(tmp_path)
    node(proto, "Conv").attribute.append(helper.make_attribute("mystery", 1))
    save(proto, tmp_path / "attr.onnx")
    with pytest.raises(ValueError, match="attribute 'mystery' is not supported for Conv") as info:
        cx.load(tmp_path / "attr.onnx")
    assert "'0.Conv2d'" in str(info.value)
    proto = small_proto(tmp_path)
    conv = node(proto, "Conv")
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("pads", [0, 0, 1, 1]), helper.make_attribute("kernel_shape", [3, 3])])
    save(proto, tmp_path / "pads.onnx")
    with pytest.raises(ValueError, match="asymmetric padding"):
        cx.load(tmp_path / "pads.onnx")


def test_export_refuses_a_model_without_input_shape_and_loads_need_onnx(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="input shape is unknown"):
        cx.export(Sequential([L.Flatten(), L.Linear(4, 2)]), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="Sequential or Graph"):
        cx.export(object(), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"convengine\[onnx\]"):
        cx.load(tmp_path / "m.onnx")


def test_export_write_is_atomic_and_valid(tmp_path):
    model = Sequential([L.Flatten(), L.Linear(4, 2)], input_shape=(4,))
    path = tmp_path / "m.onnx"
    cx.export(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [cx.OPSET]
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert json.loads(json.dumps(model.metadata)) == {}


def test_cli_exports_and_evaluates_onnx_files(tmp_path, capsys, monkeypatch):
    from convengine.__main__ import main
    from convengine.data import load_digits
    from convengine.model import lenet
    (x, y), _ = load_digits()
    convengine.manual_seed(0)
    model = lenet()
    Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.05, momentum=0.9)).fit(
        x[:256], y[:256], epochs=2, batch_size=32, seed=0, verbose=0)
    model.metadata["dataset"] = "digits"
    model.save(tmp_path / "m.npz")
    assert main(["export", str(tmp_path / "m.npz"), str(tmp_path / "m.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "m.npz")]) == 0
    from_npz = capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "m.onnx")]) == 0
    from_onnx = capsys.readouterr().out
    # The same accuracy and confusion matrix (the dataset comes from the metadata the ONNX file carries).
    assert from_npz.replace("m.npz", "m.onnx") == from_onnx
    assert "accuracy" in from_onnx and float(from_onnx.split("accuracy ")[1].split("%")[0]) > 30
    # predict reads .onnx files too, with the same numbers.
    np.save(tmp_path / "images.npy", x[:5])
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "images.npy"), "--json"]) == 0
    rows_npz = json.loads(capsys.readouterr().out)
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "images.npy"), "--json"]) == 0
    rows_onnx = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in rows_onnx] == [r["class"] for r in rows_npz] == list(model.predict(x[:5]).argmax(1))
    np.testing.assert_allclose([r["probability"] for r in rows_onnx], [r["probability"] for r in rows_npz],
                               rtol=1e-6)
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["evaluate", str(tmp_path / "bad.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convengine evaluate: error:") and "bad.onnx" in err and len(err.splitlines()) == 1
    assert main(["export", str(tmp_path / "m.npz"), str(tmp_path / "no-such-dir" / "m.onnx")]) == 1
    assert "convengine export: error:" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(tmp_path / "m.npz"), str(tmp_path / "again.onnx")]) == 1
    assert "pip install 'convengine[onnx]'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "m.onnx")]) == 1
    assert "pip install 'convengine[onnx]'" in capsys.readouterr().err


def _mutations(rng, data, n):
    """n damaged copies of data: a few random bytes changed, some also cut short."""
    for _ in range(n):
        d = bytearray(data)
        for _ in range(rng.integers(1, 6)):
            d[rng.integers(0, len(d))] = rng.integers(0, 256)
        yield bytes(d[:rng.integers(1, len(d))] if rng.random() < 0.2 else d)


def test_damaged_files_load_or_raise_value_error_naming_the_file(tmp_path):
    """A byte-flip fuzzer: every damaged copy either loads as a runnable model or raises ValueError naming the file
    (never another exception)."""
    rng = np.random.default_rng(12)
    convengine.manual_seed(0)
    cx.export(native_graph(), tmp_path / "native.onnx")
    data = (tmp_path / "native.onnx").read_bytes()
    bad = tmp_path / "damaged.onnx"
    loaded = 0
    for d in _mutations(rng, data, 300):
        bad.write_bytes(d)
        try:
            model = cx.load(bad)
        except ValueError as e:
            assert str(bad) in str(e)
            continue
        loaded += 1
        assert model.predict(np.zeros((1,) + model.input_shape, np.float32)).shape[0] == 1
    assert loaded < 300


def test_wild_attribute_values_raise_value_error_naming_the_node(tmp_path):
    rng = np.random.default_rng(13)
    convengine.manual_seed(0)
    cx.export(native_graph(), tmp_path / "native.onnx")
    good = onnx.load(str(tmp_path / "native.onnx"))
    values = [-(1 << 40), -1, 0, 1, 2, 3, 1 << 20, 1 << 40]
    bad = tmp_path / "wild.onnx"
    refused = 0
    for _ in range(200):
        p = onnx.ModelProto()
        p.CopyFrom(good)
        n = p.graph.node[rng.integers(0, len(p.graph.node))]
        ints = [a for a in n.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
        if not ints:
            continue
        a = ints[rng.integers(0, len(ints))]
        if a.type == onnx.AttributeProto.INT:
            a.i = int(rng.choice(values))
        elif a.ints:
            a.ints[rng.integers(0, len(a.ints))] = int(rng.choice(values))
        save(p, bad)
        try:
            cx.load(bad)
        except ValueError as e:
            # The changed node, or the first one downstream whose shapes no longer fit, is named.
            assert str(bad) in str(e) and ": node #" in str(e), str(e)
            refused += 1
    assert refused > 20


def test_node_order_and_count_do_not_make_loading_slow(tmp_path):
    """A long chain written in reverse order loads in linear time; more nodes than a model may hold are refused
    before any is converted."""
    import time
    n = 3000
    nodes = [helper.make_node("Relu", ["x" if k == 0 else f"r{k - 1}"], ["y" if k == n - 1 else f"r{k}"],
                              name=f"relu{k}") for k in range(n)]
    graph = helper.make_graph(nodes[::-1], "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "chain.onnx")
    start = time.perf_counter()
    model = cx.load(path)
    assert time.perf_counter() - start < 10
    assert len(model.layers) == n and isinstance(model, Sequential)
    x = np.array([[-1, 2, -3, 4]], np.float32)
    assert model.predict(x).tolist() == [[0, 2, 0, 4]]
    many = [helper.make_node("Identity", ["x" if k == 0 else f"i{k - 1}"], [f"i{k}"]) for k in range(cx._MAX_NODES)]
    many.append(helper.make_node("Relu", [f"i{cx._MAX_NODES - 1}"], ["y"]))
    graph = helper.make_graph(many, "many", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "many.onnx")
    with pytest.raises(ValueError, match="nodes, more than"):
        cx.load(path)


def test_float64_models_round_trip(tmp_path, rng):
    """float64 models export as DOUBLE tensors and load back as float64 (ONNX Runtime has no double Conv, so the
    check is convengine's own)."""
    convengine.manual_seed(0)
    model = native_graph().astype(np.float64)
    cx.export(model, tmp_path / "f64.onnx")
    proto = onnx.load(str(tmp_path / "f64.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    back = cx.load(tmp_path / "f64.onnx")
    assert back.dtype == np.float64
    x = rng.standard_normal((2, 3, 12, 12))
    assert rel_err(back.predict(x), model.predict(x)) < 1e-12


@pytest.mark.parametrize("pool,hw", [
    (L.MaxPool2d(2, 2, padding=1, ceil_mode=True), (5, 7)),     # rounding up drops a window on both axes
    (L.MaxPool2d(3, 3, padding=1, ceil_mode=True), (3, 20)),    # adds a row, drops a column
    (L.AvgPool2d(3, 3, padding=1, ceil_mode=True), (3, 20)),
    (L.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (6, 9)),   # adds on both
])
def test_ceil_mode_pools_export_as_onnx_runtime_counts_their_windows(pool, hw, tmp_path, rng):
    """A ceil_mode pooling drops a window that would start past the input and its left padding (as PyTorch);
    ONNX's shape inference counts it. The export writes attributes both count alike: a model whose Gemm depends on
    the pooled shape loads in ONNX Runtime, gives its values and loads back as the same layers."""
    ort = pytest.importorskip("onnxruntime")
    convengine.manual_seed(0)
    model = Sequential([L.Conv2d(2, 3, 1), pool, L.Flatten()], input_shape=(2,) + hw)
    features = int(np.prod(model.output_shape()))
    model = Sequential([L.Conv2d(2, 3, 1), pool, L.Flatten(), L.Linear(features, 4)], input_shape=(2,) + hw)
    cx.export(model, tmp_path / "pool.onnx")
    session = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, 2) + hw).astype(np.float32)
    assert rel_err(session.run(None, {"input": x})[0], model.predict(x)) < 1e-5
    back = cx.load(tmp_path / "pool.onnx")
    assert repr(back.layers[1]) == repr(pool)
    assert back.predict(x).tobytes() == model.predict(x).tobytes()


def test_a_ceil_mode_pool_onnx_cannot_write_is_refused(tmp_path):
    model = Sequential([L.MaxPool2d(2, 3, ceil_mode=True)], input_shape=(1, 7, 6))
    with pytest.raises(ValueError, match="0.MaxPool2d: ceil_mode adds a window .* ONNX cannot write"):
        cx.export(model, tmp_path / "pool.onnx")
    assert not (tmp_path / "pool.onnx").exists()


def test_global_pooling_and_float_attributes_load_back_as_written(tmp_path, rng):
    """GlobalAveragePool then Flatten (as export writes GlobalAvgPool2d) loads as GlobalAvgPool2d, whose sums a
    whole-plane AvgPool2d orders otherwise; float attributes, 32-bit in ONNX, load as the decimals written (a
    float64 batch norm's eps of 1e-5, its momentum of 0.1): the same bits after the round trip."""
    convengine.manual_seed(0)
    model = Sequential([L.BatchNorm2d(3, eps=1e-3, momentum=0.2, dtype="float64"), L.GlobalAvgPool2d(),
                        L.Linear(3, 2, dtype="float64")], input_shape=(3, 5, 7))
    model.layers[0].running_var[:] = rng.random(3) + 0.5
    cx.export(model, tmp_path / "gap.onnx")
    back = cx.load(tmp_path / "gap.onnx")
    assert [type(layer).__name__ for layer in back.layers] == ["BatchNorm2d", "GlobalAvgPool2d", "Linear"]
    assert (back.layers[0].eps, back.layers[0].momentum) == (1e-3, 0.2)
    x = rng.standard_normal((4, 3, 5, 7))
    assert back.predict(x).tobytes() == model.predict(x).tobytes()
