"""Whole models drawn at random: the plans and fusions that Sequential and freeze() make of a stack of layers,
checked on stacks nobody wrote down. test_frozen and test_fusion pin each rewrite on a few fixed nets; here
hypothesis draws the layers (convs of the geometries the engine takes: strides, dilations, padding, groups,
depthwise, with and without bias, 1 to 48 channels; batch norms before and after convs; ReLU; max and average
pooling with padding and ceil_mode; a head of global pooling or flattening and linears), the input's shape, the
batch and the dtype, and checks that

- a frozen model gives the layer-by-layer forward within float rounding, and the float64 reference's values;
- a frozen model gives the same bits on 2 and 3 threads as on 1, every step split (every call threaded, the split
  programs forced on): channel slices at batch 1, image slices above, one image at a time on one thread; and for
  inputs in any memory layout, in batches of any size, through the model's own predict, and from four Python
  threads at once;
- one training step of a model that fuses (conv + ReLU, batch norm + ReLU, batch norm + ReLU + 2x2 max pooling)
  gives the bits of the same model run layer by layer: output, input gradient, every parameter gradient (and its
  inference forward too); and the same bits on 2 threads as on 1;
- an exported model runs in ONNX Runtime with the engine's values and loads back with its bits, and a graph
  model (Add, Concat) keeps its bits across thread counts, its own file format and ONNX;
- training resumed from a checkpoint (SGD with momentum or Adam, plain or sharded batches) ends with the weights
  and buffers of the uninterrupted run, bit for bit.

Example counts follow the hypothesis profile (conftest: "ci" by default, HYPOTHESIS_PROFILE=long for more).
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import convengine
from convengine import frozen as frozen_module
from convengine import fusion
from convengine._args import conv_output_size
from convengine._threads import every_call_threaded
from convengine.layers import (AvgPool2d, BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                               ReLU)

from conftest import LAYOUTS, as_layout, assert_bitwise_equal, randn
from test_frozen import RTOL, assert_concurrent_calls_match_serial, randomise_batch_norms, reference_forward
from test_fusion import step         # one training step: (output, input gradient, parameter gradients)

fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def restore_threads():
    before = convengine.get_num_threads()
    yield
    convengine.set_num_threads(before)


# A net is drawn as specs, plain tuples (hypothesis prints them for a failing example), and built afresh from them
# for each model a test compares, with the same weights (manual_seed, then randomise_batch_norms).
#   ("conv", in, out, kernel, stride, padding, dilation, groups, bias)   ("bn", channels)   ("relu",)
#   ("max", kernel, stride, padding, ceil_mode)   ("avg", kernel, stride, padding, ceil_mode, count_include_pad)
#   ("gap",)   ("flatten",)   ("linear", in, out)

@st.composite
def conv_spec(draw, c, h, w, winograd=False):
    """A conv of c channels of h x w and its output shape, or None where the drawn geometry has no output.
    winograd: mostly the geometry Winograd F(2x2, 3x3) takes (3x3, stride 1, dilation 1, one group)."""
    if winograd and draw(st.integers(0, 3)):
        kernel, stride, dilation, groups = 3, 1, 1, 1
        padding = draw(st.integers(0, 2))
    else:
        kernel = draw(st.integers(1, 5))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.sampled_from([1, 1, 1, 2]))
        padding = draw(st.integers(0, (kernel - 1) * dilation // 2 + 1))
        groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    if groups == c and draw(st.booleans()):
        out = c                                                  # depthwise
    else:
        # up to 48 channels: the row-vector, pixel, pointwise and first-layer kernels, their tile edges
        out = groups * draw(st.sampled_from([1, 2, 3, 5, 8, 16, 24]))
        out = min(out, max(groups, 48 // groups * groups))
    oh = conv_output_size(h, kernel, stride, padding, padding, dilation)
    ow = conv_output_size(w, kernel, stride, padding, padding, dilation)
    if oh < 1 or ow < 1:
        return None
    return ("conv", c, out, kernel, stride, padding, dilation, groups, draw(st.booleans())), (out, oh, ow)


@st.composite
def pool_spec(draw, c, h, w):
    kind = draw(st.sampled_from(["max", "avg"]))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, kernel // 2))
    ceil = draw(st.booleans())
    oh = conv_output_size(h, kernel, stride, padding, padding, 1, ceil)
    ow = conv_output_size(w, kernel, stride, padding, padding, 1, ceil)
    if oh < 1 or ow < 1:
        return None
    spec = ("max", kernel, stride, padding, ceil) if kind == "max" else (
        "avg", kernel, stride, padding, ceil, draw(st.booleans()))
    return spec, (c, oh, ow)


@st.composite
def nets(draw, head=True, winograd=False):
    """(specs, per-sample input shape, dtype): 1-5 body blocks, then (where `head`) a head. winograd: float32, its
    convs mostly of Winograd's geometry (conv_spec)."""
    dtype = "float32" if winograd else draw(st.sampled_from(["float32", "float64"]))
    input_shape = (draw(st.integers(1, 6)), draw(st.integers(3, 20)), draw(st.integers(3, 20)))
    specs, shape = [], input_shape
    for block in draw(st.lists(st.sampled_from(["conv", "conv-relu", "conv-bn-relu", "bn", "relu", "pool",
                                                "bn-relu-pool"]),
                               min_size=1, max_size=5)):
        c, h, w = shape
        if block in ("conv", "conv-relu", "conv-bn-relu"):
            drawn = draw(conv_spec(c, h, w, winograd))
            if drawn is None:
                continue
            specs.append(drawn[0])
            shape = drawn[1]
            if block == "conv-relu":
                specs.append(("relu",))
            elif block == "conv-bn-relu":
                specs += [("bn", shape[0]), ("relu",)]
        elif block == "bn":
            specs.append(("bn", c))
        elif block == "relu":
            specs.append(("relu",))
        elif block == "pool":
            drawn = draw(pool_spec(c, h, w))
            if drawn is not None:
                specs.append(drawn[0])
                shape = drawn[1]
        elif h >= 2 and w >= 2:                                  # the pooling the training fusion takes
            specs += [("bn", c), ("relu",), ("max", 2, 2, 0, False)]
            shape = (c, h // 2, w // 2)
    if head and draw(st.booleans()):
        features = shape[0]
        if draw(st.booleans()):
            specs.append(("gap",))
        else:
            specs.append(("flatten",))
            features = int(np.prod(shape))
        for _ in range(draw(st.integers(0, 2))):
            width = draw(st.sampled_from([3, 10, 17, 40]))
            specs.append(("linear", features, width))
            if draw(st.booleans()):
                specs.append(("relu",))
            features = width
    if not specs:
        specs.append(("relu",))
    return specs, input_shape, dtype


def layer_of(spec, dtype):
    kind, *a = spec
    if kind == "conv":
        c, out, kernel, stride, padding, dilation, groups, bias = a
        return Conv2d(c, out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                      dtype=dtype)
    if kind == "bn":
        return BatchNorm2d(a[0], dtype=dtype)
    if kind == "relu":
        return ReLU()
    if kind == "max":
        return MaxPool2d(a[0], a[1], padding=a[2], ceil_mode=a[3])
    if kind == "avg":
        return AvgPool2d(a[0], a[1], padding=a[2], ceil_mode=a[3], count_include_pad=a[4])
    if kind == "gap":
        return GlobalAvgPool2d()
    if kind == "flatten":
        return Flatten()
    return Linear(a[0], a[1], dtype=dtype)


def build(net, fuse=True):
    """A fresh model of the drawn net, always with the same weights."""
    specs, input_shape, dtype = net
    convengine.manual_seed(11)
    model = convengine.Sequential([layer_of(spec, dtype) for spec in specs], input_shape=input_shape)
    model.fuse = fuse
    return randomise_batch_norms(model, np.random.default_rng(12))


def scale(a):
    return float(np.max(np.abs(a), initial=0.0)) + 1.0


@fuzz
@given(net=nets(), batch=st.integers(1, 4), layout=st.sampled_from(LAYOUTS), chunk=st.integers(1, 3))
# found by this test: a depthwise conv of 2 channels cut into slices of one, which the kernels take for a dense
# conv and sum in another order (frozen._Conv.channel_slices), and a conv of two 2-channel groups whose slice of
# one group has no packed length of its own (conv2d_pack_length)
@example(net=([("conv", 2, 2, 2, 1, 0, 1, 2, False), ("bn", 2), ("relu",)], (2, 3, 3), "float32"), batch=1,
         layout="contiguous", chunk=1)
@example(net=([("conv", 4, 2, 2, 1, 0, 1, 2, False)], (4, 3, 17), "float32"), batch=1,
         layout="contiguous", chunk=1)
def test_a_frozen_model_gives_the_layers_values_on_any_thread_count(net, batch, layout, chunk, monkeypatch_split):
    specs, input_shape, _ = net
    model = build(net)
    dtype = model.dtype                   # float32 where no layer has weights
    note(f"{specs}, input {input_shape}, batch {batch}, {dtype}")
    x = randn(np.random.default_rng(13), (batch,) + input_shape, dtype)
    looped = model.forward(x, training=False)
    frozen = model.freeze()
    convengine.set_num_threads(1)
    want = frozen(x)
    assert want.shape == looped.shape and want.dtype == looped.dtype
    tol = RTOL[np.dtype(dtype).type] * 10
    assert np.max(np.abs(want - looped), initial=0) <= tol * scale(looped), "frozen vs layer by layer"
    reference = reference_forward(model, x)
    assert np.max(np.abs(want - reference), initial=0) <= max(tol, 1e-5) * scale(reference), "frozen vs reference"
    with every_call_threaded():
        for threads in (3, 2):                     # 3: slices that do not halve (odd channel and image counts)
            convengine.set_num_threads(threads)
            assert_bitwise_equal(frozen(x), want, f"{threads} threads vs 1")
        (arena,) = frozen._arenas[(input_shape, batch)]
        program = arena.compiled()
        # any memory layout, any batch_size, and the model's own predict: the same bits
        assert_bitwise_equal(frozen.predict(as_layout(x, layout), batch_size=chunk), want, f"{layout}, {chunk}")
        assert_bitwise_equal(model.predict(x, batch_size=chunk), want, "model.predict")
    # one thread, the batch in slices of one image through every step (as a batch whose activations outgrow L2)
    convengine.set_num_threads(1)
    with mock.patch.object(frozen_module, "_SLICE_ABOVE", 0), mock.patch.object(frozen_module, "_SLICE_BYTES", 1):
        assert_bitwise_equal(model.freeze()(x), want, "one image at a time")
    # what the examples reached (pytest --hypothesis-show-statistics)
    for step in frozen.steps:
        event(f"step {step.describe()}")
    if program is not None and program.slices() > program.stages():
        event("split into channel slices (batch 1)" if batch == 1 else "split into image slices")


@fuzz
@given(net=nets(winograd=True), batch=st.integers(1, 4), chunk=st.integers(1, 3))
def test_a_frozen_winograd_model_agrees_with_its_layers_and_keeps_its_bits(net, batch, chunk, monkeypatch_split):
    """freeze(winograd=True), with Winograd taken from one input channel on (the drawn nets have 1-48): every
    float32 3x3 stride-1 conv of one group runs by F(2x2, 3x3). The values agree with the layers as the default
    plan's do; the bits do not depend on the thread count (split programs: image or channel slices), the batch
    size a call is cut into, or one-image slices on one thread."""
    from convengine._kernels import engine
    specs, input_shape, _ = net
    model = build(net)
    dtype = model.dtype
    x = randn(np.random.default_rng(13), (batch,) + input_shape, dtype)
    looped = model.forward(x, training=False)
    old = engine.set_winograd_min_channels(1)
    try:
        frozen = model.freeze(winograd=True)
        convengine.set_num_threads(1)
        want = frozen(x)
        tol = RTOL[np.dtype(dtype).type] * 10
        assert np.max(np.abs(want - looped), initial=0) <= tol * scale(looped), "frozen vs layer by layer"
        with every_call_threaded():
            for threads in (3, 2):
                convengine.set_num_threads(threads)
                assert_bitwise_equal(frozen(x), want, f"{threads} threads vs 1")
            assert_bitwise_equal(frozen.predict(x, batch_size=chunk), want, f"batches of {chunk}")
        convengine.set_num_threads(1)
        with mock.patch.object(frozen_module, "_SLICE_ABOVE", 0), \
                mock.patch.object(frozen_module, "_SLICE_BYTES", 1):
            assert_bitwise_equal(model.freeze(winograd=True)(x), want, "one image at a time")
        plan = frozen.plan_for(input_shape)
        taken = sum(isinstance(step, frozen_module._Conv) and prepared[3] is not None
                    and prepared[3][0] == engine.WINOGRAD_PATH for step, prepared in zip(frozen.steps, plan.prepared))
    finally:
        engine.set_winograd_min_channels(*old)
    event(f"{taken} Winograd conv(s)" if taken < 2 else "2+ Winograd convs")


@pytest.fixture
def monkeypatch_split(monkeypatch):
    """Split programs wherever a plan compiles, however small the call (hypothesis runs every example under one
    fixture instance: the setting holds for all of them)."""
    monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "on")


@fuzz
@given(net=nets(), batches=st.lists(st.integers(1, 4), min_size=4, max_size=4))
def test_a_frozen_model_called_from_four_threads_at_once_gives_each_call_its_bits(net, batches,
                                                                                  monkeypatch_split):
    """Four Python threads call one frozen model of a drawn net at once, with batches of their own (arenas of
    several batch sizes, the pool's workers shared), on 2 engine threads with split programs: each gets the
    serial call's bits."""
    specs, input_shape, _ = net
    model = build(net)
    dtype = model.dtype
    note(f"{specs}, input {input_shape}, batches {batches}, {dtype}")
    rng = np.random.default_rng(16)
    inputs = [randn(rng, (n,) + input_shape, dtype) for n in batches]
    frozen = model.freeze()
    convengine.set_num_threads(2)
    with every_call_threaded():
        assert_concurrent_calls_match_serial(frozen, inputs, 3)


@fuzz
@given(net=nets(), batch=st.integers(2, 4))
def test_a_fused_training_step_gives_the_bits_of_the_layers_on_any_thread_count(net, batch):
    specs, input_shape, _ = net
    dtype = build(net).dtype
    note(f"{specs}, input {input_shape}, batch {batch}, {dtype}")
    rng = np.random.default_rng(14)
    x = randn(rng, (batch,) + input_shape, dtype)
    y_shape = build(net).forward(x, training=False).shape
    gy = randn(rng, y_shape, dtype)
    convengine.set_num_threads(1)
    fused = step(build(net, fuse=True), x, gy)
    plain = step(build(net, fuse=False), x, gy)
    for k, (a, b) in enumerate(zip(fused, plain)):
        assert_bitwise_equal(a, b, f"fused vs layer by layer, result {k}")
    assert_bitwise_equal(build(net, fuse=True).forward(x, training=False),
                         build(net, fuse=False).forward(x, training=False), "inference forward, fused vs not")
    with every_call_threaded():
        convengine.set_num_threads(2)
        threaded = step(build(net, fuse=True), x, gy)
    for k, (a, b) in enumerate(zip(threaded, fused)):
        assert_bitwise_equal(a, b, f"2 threads vs 1, result {k}")
    # what the examples reached (pytest --hypothesis-show-statistics)
    model, shape = build(net), input_shape
    for i, layer in enumerate(model.layers):
        if i in fusion.pairs(model.layers):
            pooled = fusion.pools_fused(model.layers, i, (batch,) + shape, True)
            event(f"fused {type(layer).__name__} + ReLU" + (" + MaxPool2d" if pooled else ""))
        shape = layer.output_shape(shape)


@fuzz
@given(net=nets(), batch=st.integers(1, 3))
def test_an_exported_model_runs_in_onnx_runtime_and_loads_back_the_same(net, batch, tmp_path_factory):
    """convengine.onnx.export of the drawn net: ONNX Runtime's values within float rounding (float32: its CPU
    provider has no float64 Conv), and the file loaded back (convengine.onnx.load) a model of the same values, bit
    for bit."""
    onnx_module = pytest.importorskip("convengine.onnx")
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    specs, input_shape, _ = net
    model = build(net)
    dtype = model.dtype
    note(f"{specs}, input {input_shape}, batch {batch}, {dtype}")
    x = randn(np.random.default_rng(15), (batch,) + input_shape, dtype)
    ours = model.predict(x)
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    try:
        onnx_module.export(model, path)
    except ValueError as e:                   # a ceil_mode pooling ONNX cannot say (onnx._onnx_pool_pads)
        assert "ONNX cannot write" in str(e)
        event("refused: ceil_mode pooling ONNX cannot write")
        return
    if dtype == np.float32:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert theirs.shape == ours.shape and theirs.dtype == ours.dtype
        assert np.max(np.abs(theirs - ours), initial=0) <= 1e-4 * scale(ours), "ONNX Runtime vs convengine"
    assert_bitwise_equal(onnx_module.load(path).predict(x), ours, "loaded back")


# Graph models: layers wired as a DAG (convengine.graph), each node (spec, the nodes it reads: -1 the input).

@st.composite
def graphs(draw):
    """(nodes, input shape, dtype): 2-7 nodes of the body kinds above, Add of same-shaped nodes, Concat of nodes
    of one plane size, then a head; only the nodes the output depends on."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    input_shape = (draw(st.integers(1, 6)), draw(st.integers(3, 16)), draw(st.integers(3, 16)))
    nodes, shapes = [], {-1: input_shape}
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "relu", "pool", "add", "add", "concat", "concat"]))
        if kind in ("add", "concat"):
            key = (lambda j: shapes[j]) if kind == "add" else (lambda j: shapes[j][1:])
            groups = {}
            for j in shapes:
                groups.setdefault(key(j), []).append(j)
            choices = [g for g in groups.values() if len(g) >= 2]
            if not choices:
                continue
            group = draw(st.sampled_from(choices))
            srcs = draw(st.lists(st.sampled_from(group), min_size=2, max_size=3, unique=True))
            first = shapes[srcs[0]]
            shape = first if kind == "add" else (sum(shapes[j][0] for j in srcs),) + first[1:]
            nodes.append(((kind,), srcs))
        else:
            src = draw(st.sampled_from(sorted(shapes)))
            c, h, w = shapes[src]
            if kind == "conv":
                drawn = draw(conv_spec(c, h, w))
            elif kind == "pool":
                drawn = draw(pool_spec(c, h, w))
            else:
                drawn = ((("bn", c) if kind == "bn" else ("relu",)), (c, h, w))
            if drawn is None:
                continue
            nodes.append((drawn[0], [src]))
            shape = drawn[1]
        shapes[len(nodes) - 1] = shape
    if not nodes:
        nodes.append((("relu",), [-1]))
        shapes[0] = input_shape
    # the branches left open joined into the output where their planes match (else most would be pruned)
    used = {j for _, srcs in nodes for j in srcs}
    last = len(nodes) - 1
    leaves = [j for j in range(len(nodes)) if j not in used and shapes[j][1:] == shapes[last][1:]]
    if len(leaves) >= 2:
        nodes.append((("concat",), leaves))
        shapes[len(nodes) - 1] = (sum(shapes[j][0] for j in leaves),) + shapes[last][1:]
    out = len(nodes) - 1
    if draw(st.booleans()):
        nodes.append((("gap",), [out]))
        nodes.append((("linear", shapes[out][0], draw(st.sampled_from([3, 10]))), [out + 1]))
        out += 2
    # only what the output depends on, renumbered
    keep, todo = set(), [out]
    while todo:
        j = todo.pop()
        if j >= 0 and j not in keep:
            keep.add(j)
            todo += nodes[j][1]
    order = sorted(keep)
    new = {j: i for i, j in enumerate(order)} | {-1: -1}
    return [(nodes[j][0], [new[s] for s in nodes[j][1]]) for j in order], input_shape, dtype


def build_graph(net):
    from convengine.graph import Add, Concat, Graph
    nodes, input_shape, dtype = net
    convengine.manual_seed(21)
    layers = [Add() if spec[0] == "add" else Concat() if spec[0] == "concat" else layer_of(spec, dtype)
              for spec, _ in nodes]
    model = Graph.from_wiring(layers, [srcs for _, srcs in nodes], len(nodes) - 1, input_shape)
    for layer in layers:
        if isinstance(layer, BatchNorm2d):
            layer.running_mean[:] = np.linspace(-0.5, 0.5, layer.num_features)
            layer.running_var[:] = np.linspace(0.5, 1.5, layer.num_features)
    return model


@fuzz
@given(net=graphs(), batch=st.integers(2, 4))
def test_a_graph_models_training_step_and_round_trips_keep_its_bits(net, batch, tmp_path_factory):
    """A drawn graph model: one training step gives the same bits on 2 threads as on 1; saved and loaded
    (convengine's own format) it computes the same bits; exported to ONNX, ONNX Runtime gives its values (float32)
    and the file loads back as a model of the same bits."""
    nodes, input_shape, _ = net
    model = build_graph(net)
    dtype = model.dtype
    note(f"{nodes}, input {input_shape}, batch {batch}, {dtype}")
    rng = np.random.default_rng(22)
    x = randn(rng, (batch,) + input_shape, dtype)
    gy = randn(rng, model.forward(x, training=False).shape, dtype)
    convengine.set_num_threads(1)
    want = step(build_graph(net), x, gy)
    with every_call_threaded():
        convengine.set_num_threads(2)
        got = step(build_graph(net), x, gy)
    for k, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"2 threads vs 1, result {k}")
    # layer by layer both: a chain loads back from ONNX as a Sequential, whose predict runs a frozen plan
    ours = model.forward(x, training=False)
    folder = tmp_path_factory.mktemp("graph")
    model.save(folder / "model.npz")
    assert_bitwise_equal(convengine.load(folder / "model.npz").forward(x, training=False), ours, "saved, loaded")
    event(f"{sum(spec[0] in ('add', 'concat') for spec, _ in nodes)} merges")
    cx = pytest.importorskip("convengine.onnx")
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    try:
        cx.export(model, folder / "model.onnx")
    except ValueError as e:                   # a ceil_mode pooling ONNX cannot say (onnx._onnx_pool_pads)
        assert "ONNX cannot write" in str(e)
        return
    if dtype == np.float32:
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert np.max(np.abs(theirs - ours), initial=0) <= 1e-4 * scale(ours), "ONNX Runtime vs convengine"
    assert_bitwise_equal(cx.load(folder / "model.onnx").forward(x, training=False), ours, "ONNX loaded back")


@fuzz
@given(net=nets(head=False), classes=st.integers(2, 5), adam=st.booleans(), shards=st.sampled_from([None, 2]))
def test_training_resumed_from_a_checkpoint_is_the_uninterrupted_run(net, classes, adam, shards, tmp_path_factory):
    """A drawn body with a classifier head trained for two epochs, against one epoch, a checkpoint, a fresh trainer
    loading it and one more epoch: the same weights, buffers (batch norm's running statistics) and optimizer
    state, bit for bit (SGD with momentum or Adam, plain batches or fixed shards)."""
    from convengine.losses import CrossEntropyLoss
    from convengine.optim import SGD, Adam
    specs, input_shape, dtype = net
    shape = input_shape
    for spec in specs:
        shape = layer_of(spec, dtype).output_shape(shape)
    head = [("flatten",), ("linear", int(np.prod(shape)), classes)]
    net = (specs + head, input_shape, dtype)
    note(f"{net[0]}, input {input_shape}, {dtype}, {'Adam' if adam else 'SGD'}, shards {shards}")
    rng = np.random.default_rng(17)
    x = randn(rng, (12,) + input_shape, build(net).dtype)
    y = rng.integers(0, classes, 12)

    def trainer_of():
        model = build(net)
        opt = Adam(model.parameters(), lr=1e-3) if adam else SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, convengine.Trainer(model, CrossEntropyLoss(), opt, shards=shards)

    def fit(trainer, epochs):
        trainer.fit(x, y, epochs=epochs, batch_size=4, seed=18, verbose=0)

    whole, trainer = trainer_of()
    fit(trainer, 2)
    _, first = trainer_of()
    fit(first, 1)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.npz"
    first.save_checkpoint(path)
    resumed, second = trainer_of()
    convengine.manual_seed(99)                  # the checkpoint, not this, decides what follows
    second.load_checkpoint(path)
    fit(second, 1)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert_bitwise_equal(b.data, a.data, f"parameter {a.name}")
    for (name, a), b in zip(whole.buffers().items(), resumed.buffers().values()):
        assert_bitwise_equal(b, a, f"buffer {name}")
