"""Frozen models (`Sequential.freeze()`, convengine.frozen) and the conv epilogue they run on: every rewrite the plan
makes against the model run layer by layer and against the NumPy reference, in float32 and float64; results that
do not depend on the thread count; concurrent calls; weights taken at freeze time and never stale in predict.
"""
import copy
import pickle
import threading

import numpy as np
import pytest

import convengine
from convengine import frozen as frozen_module
from convengine import reference as R
from convengine._args import conv2d_args, conv2d_geometry
from convengine._threads import every_call_threaded
from convengine._kernels import engine
from convengine.functional import _conv_params
from convengine.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                               ReLU, Sigmoid)

from conftest import assert_bitwise_equal, randn

DTYPES = {"float32": np.float32, "float64": np.float64}
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def restore_threads():
    before = convengine.get_num_threads()
    yield
    convengine.set_num_threads(before)
    engine.force_conv_path("auto")


def randomise_batch_norms(model, rng):
    """Running statistics and affine parameters away from their initial 0/1, so that folding them matters."""
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            c = layer.num_features
            layer.running_mean[:] = rng.standard_normal(c)
            layer.running_var[:] = rng.random(c) + 0.5
            layer.weight.data[:] = rng.random(c) + 0.5
            layer.bias.data[:] = rng.standard_normal(c)
        for p in layer.parameters():
            if p.name.endswith("bias") and not isinstance(layer, BatchNorm2d):
                p.data[:] = rng.standard_normal(p.data.shape) * 0.1
    return model


def reference_forward(model, x):
    """The model's inference forward computed with convengine.reference, layer by layer, in float64."""
    def f64(a):
        return None if a is None else np.asarray(a, np.float64)

    x = f64(x)
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            x = R.conv2d(x, f64(layer.weight.data), f64(layer.bias and layer.bias.data), **layer._hyper())
        elif isinstance(layer, BatchNorm2d):
            x = R.batch_norm2d(x, f64(layer.weight.data), f64(layer.bias.data), f64(layer.running_mean),
                               f64(layer.running_var), layer.eps)
        elif isinstance(layer, ReLU):
            x = R.relu(x)
        elif isinstance(layer, MaxPool2d):
            x = R.max_pool2d(x, **layer._hyper())
        elif isinstance(layer, AvgPool2d):
            x = R.avg_pool2d(x, count_include_pad=layer.count_include_pad, **layer._hyper())
        elif isinstance(layer, Linear):
            x = R.linear(x, f64(layer.weight.data), f64(layer.bias and layer.bias.data))
        elif isinstance(layer, Sigmoid):
            x = 1 / (1 + np.exp(-x))
        else:                                   # Flatten, GlobalAvgPool2d, Dropout: plain NumPy already
            x = layer.forward(x, training=False)
    return x


# Each pattern: layers for input channels c, and the steps the plan should make of them.
PATTERNS = {
    "conv-bn-relu folded": (lambda d: [Conv2d(3, 8, 3, padding=1, dtype=d), BatchNorm2d(8, dtype=d), ReLU()],
                            ["Conv2d+ReLU"]),
    "conv without bias, bn": (lambda d: [Conv2d(3, 8, 3, padding=1, bias=False, dtype=d), BatchNorm2d(8, dtype=d)],
                              ["Conv2d"]),
    "conv-relu-bn as epilogue": (lambda d: [Conv2d(3, 8, 3, dtype=d), ReLU(), BatchNorm2d(8, dtype=d)],
                                 ["Conv2d+ReLU+affine"]),
    "bn before an unpadded conv": (lambda d: [BatchNorm2d(3, dtype=d), Conv2d(3, 8, 3, stride=2, dtype=d), ReLU()],
                                   ["Conv2d+ReLU"]),
    "bn before a grouped unpadded conv": (lambda d: [BatchNorm2d(3, dtype=d), Conv2d(3, 6, 3, groups=3, dtype=d)],
                                         ["Conv2d"]),
    "bn before a padded conv stays": (lambda d: [BatchNorm2d(3, dtype=d), ReLU(), Conv2d(3, 8, 3, padding=1,
                                                                                        dtype=d)],
                                      ["BatchNorm2d+ReLU", "Conv2d"]),
    "grouped conv, bn, relu": (lambda d: [Conv2d(3, 12, 3, padding=1, groups=3, dtype=d), BatchNorm2d(12, dtype=d),
                                          ReLU()], ["Conv2d+ReLU"]),
    "depthwise with bn and relu": (lambda d: [Conv2d(3, 3, 3, padding=1, groups=3, dtype=d), BatchNorm2d(3, dtype=d),
                                              ReLU(), Conv2d(3, 8, 1, dtype=d), ReLU()],
                                   ["Conv2d+ReLU", "Conv2d+ReLU"]),
    "pools with padding and ceil_mode": (lambda d: [Conv2d(3, 8, 3, dtype=d), MaxPool2d(3, 2, padding=1,
                                                                                        ceil_mode=True),
                                                    AvgPool2d(2, ceil_mode=True, count_include_pad=False),
                                                    AvgPool2d(3, 1, padding=1)],
                                         ["Conv2d", "MaxPool2d", "AvgPool2d", "AvgPool2d"]),
    "classifier head": (lambda d: [Conv2d(3, 8, 5, stride=2, dtype=d), ReLU(), Dropout(0.5), GlobalAvgPool2d(),
                                   Linear(8, 16, dtype=d), ReLU(), Dropout(0.3), Linear(16, 4, dtype=d)],
                        ["Conv2d+ReLU", "GlobalAvgPool2d", "Linear+ReLU", "Linear"]),
    "flatten and other layers": (lambda d: [Conv2d(3, 4, 3, dtype=d), Sigmoid(), MaxPool2d(2), Flatten(),
                                            Linear(4 * 7 * 7, 5, dtype=d)],
                                 ["Conv2d", "Sigmoid", "MaxPool2d", "Flatten", "Linear"]),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_frozen_matches_layer_by_layer_and_reference(pattern, dtype, rng):
    make, steps = PATTERNS[pattern]
    convengine.manual_seed(3)
    model = randomise_batch_norms(convengine.Sequential(make(np.dtype(dtype).name)), rng)
    x = randn(rng, (5, 3, 16, 16), dtype)
    frozen = model.freeze()
    assert [step.describe() for step in frozen.steps] == steps
    got = frozen(x)
    layer_by_layer = model.forward(x, training=False)
    ref = reference_forward(model, x)
    assert got.dtype == dtype and got.shape == layer_by_layer.shape
    scale = np.max(np.abs(layer_by_layer)) + 1e-30
    assert np.max(np.abs(got - layer_by_layer)) / scale < RTOL[dtype]
    assert np.max(np.abs(got - ref)) / scale < RTOL[dtype] * 10
    np.testing.assert_array_equal(frozen.predict(x, batch_size=2), got)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_steps_give_the_bits_of_the_python_loop(pattern, dtype, batch, rng):
    """The steps compiled into one loop (_kernels/frozen.pxi) call the same kernels with the same thread counts as
    the Python loop over the steps: the same bits, on every pattern (only a layer run through its own forward, the
    Sigmoid here, keeps the whole plan in Python)."""
    make, _ = PATTERNS[pattern]
    convengine.manual_seed(5)
    model = randomise_batch_norms(convengine.Sequential(make(np.dtype(dtype).name)), rng)
    frozen = model.freeze()
    x = randn(rng, (batch, 3, 16, 16), dtype)
    compiled = frozen(x)
    (arena,) = frozen._arenas[((3, 16, 16), batch)]
    assert (arena.compiled() is None) == any(type(step).__name__ == "_Layer" for step in frozen.steps)
    frozen.compiled = False
    looped = frozen(x)
    assert_bitwise_equal(compiled, looped)
    assert np.max(np.abs(compiled - model.forward(x, training=False))) <= RTOL[dtype] * (np.max(np.abs(looped)) + 1)


def test_compiled_program_checks_its_input_and_reports_scratch_failure(rng):
    model = convengine.Sequential([Conv2d(3, 8, 3, padding=1), ReLU(), MaxPool2d(2), GlobalAvgPool2d(),
                                   Linear(8, 4)])
    frozen = model.freeze()
    x = randn(rng, (2, 3, 16, 16), np.float32)
    want = frozen(x)
    (arena,) = frozen._arenas[((3, 16, 16), 2)]
    with pytest.raises(ValueError, match="wrong size or dtype"):
        arena.compiled().run(x[:1])
    with pytest.raises(ValueError, match="wrong size or dtype"):
        arena.compiled().run(x.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        arena.compiled().run(np.asfortranarray(x))
    old = engine.fail_allocation_after(0)
    try:
        with pytest.raises(MemoryError):
            frozen(x)
    finally:
        engine.fail_allocation_after(old)
    assert_bitwise_equal(frozen(x), want)


@pytest.mark.parametrize("path", ["direct", "pixels", "im2col", "pointwise"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("relu,affine", [(False, False), (True, False), (False, True), (True, True)])
def test_conv_epilogue_on_every_path(path, dtype, relu, affine, rng):
    engine.force_conv_path(path)
    for x_shape, w_shape, stride, groups, padding in [((2, 16, 12, 12), (32, 16, 3, 3), 1, 1, 1),
                                                      ((2, 3, 20, 20), (16, 3, 3, 3), 1, 1, 1),
                                                      ((2, 16, 9, 9), (24, 8, 3, 3), 2, 2, 1),
                                                      ((2, 8, 10, 10), (8, 1, 3, 3), 1, 8, 1),
                                                      ((2, 16, 8, 8), (36, 16, 1, 1), 1, 1, 0),
                                                      ((1, 8, 30, 30), (16, 8, 1, 1), 1, 1, 0)]:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        b, sc, sh = (randn(rng, (w_shape[0],), dtype) for _ in range(3))
        geom = conv2d_args(x, w, b, stride, padding, 1, groups)
        out = np.full(geom.out_shape, np.nan, dtype)
        engine.conv2d_forward(x, w, b, out, _conv_params(geom), 2, relu, sc if affine else None,
                              sh if affine else None)
        want = R.conv2d(x, w, b, stride, padding, 1, groups)
        if relu:
            want = R.relu(want)
        if affine:
            want = want * sc[:, None, None] + sh[:, None, None]
        np.testing.assert_allclose(out, want, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10,
                                   err_msg=f"{path} {x_shape} {w_shape}")


def test_conv_epilogue_refuses_half_an_affine(rng):
    x, w = randn(rng, (1, 2, 5, 5), np.float32), randn(rng, (2, 2, 3, 3), np.float32)
    geom = conv2d_args(x, w, None, 1, 0, 1, 1)
    out = np.empty(geom.out_shape, np.float32)
    with pytest.raises(ValueError, match="scale and shift"):
        engine.conv2d_forward(x, w, None, out, _conv_params(geom), 1, False, np.ones(2, np.float32), None)
    with pytest.raises(ValueError, match="2 values"):
        engine.conv2d_forward(x, w, None, out, _conv_params(geom), 1, False, np.ones(3, np.float32),
                              np.ones(3, np.float32))


def cifar_net(dtype="float32"):
    return convengine.Sequential([
        Conv2d(3, 16, 3, padding=1, dtype=dtype), BatchNorm2d(16, dtype=dtype), ReLU(), MaxPool2d(2),
        Conv2d(16, 32, 3, padding=1, dtype=dtype), BatchNorm2d(32, dtype=dtype), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3, padding=1, dtype=dtype), BatchNorm2d(64, dtype=dtype), ReLU(), GlobalAvgPool2d(),
        Linear(64, 10, dtype=dtype)], input_shape=(3, 32, 32))


def test_frozen_results_do_not_depend_on_the_thread_count(rng):
    """Batch 16 of 32x32 images, with the one-thread threshold of small steps off: every step really splits."""
    convengine.manual_seed(0)
    frozen = randomise_batch_norms(cifar_net(), rng).freeze()
    x = randn(rng, (16, 3, 32, 32), np.float32)
    results = []
    with every_call_threaded():
        for n in (1, 2, 3):
            convengine.set_num_threads(n)
            results.append(frozen(x))
    for n, got in zip((2, 3), results[1:]):
        assert_bitwise_equal(got, results[0], f"{n} threads vs 1")


def test_compiled_steps_take_the_thread_count_of_each_call(rng, monkeypatch):
    """The compiled loop fixes its thread counts when it is built: a later set_num_threads (or the tests'
    every_call_threaded) must rebuild it, or the thread-count tests above would run one thread throughout."""
    frozen = cifar_net().freeze()
    x = randn(rng, (2, 3, 32, 32), np.float32)
    seen = []
    real = engine.Program.finish
    monkeypatch.setattr(engine, "Program", type("Recording", (engine.Program,), {
        "finish": lambda self, n_threads: (seen.append(n_threads), real(self, n_threads))[1]}))
    convengine.set_num_threads(1)
    frozen(x)
    with every_call_threaded():
        convengine.set_num_threads(2)
        frozen(x)
        frozen(x)
        convengine.set_num_threads(3)
        frozen(x)
    assert seen == [1, 2, 3]
    (arena,) = frozen._arenas[((3, 32, 32), 2)]
    assert arena.compiled().split == 3


def split_nets(dtype):
    """Nets whose steps split into several slices: dense convs of 32-64 channels (slices of whole 16-channel
    blocks, the pixel path's 64 -> 48 on 8x8 among them, whose 16-channel slice alone would take another path),
    depthwise and grouped convs, an unfolded batch norm, pools, a linear of 40 columns and the bench's nets."""
    from convengine.bench import inference
    wide = [Conv2d(3, 32, 3, padding=1, dtype=dtype), BatchNorm2d(32, dtype=dtype), ReLU(), MaxPool2d(2),
            Conv2d(32, 64, 3, padding=1, dtype=dtype), ReLU(), MaxPool2d(2),
            Conv2d(64, 48, 3, padding=1, dtype=dtype), ReLU(), BatchNorm2d(48, dtype=dtype), ReLU(),
            Conv2d(48, 48, 3, padding=1, groups=48, dtype=dtype), BatchNorm2d(48, dtype=dtype),
            Conv2d(48, 64, 1, groups=4, dtype=dtype), AvgPool2d(3, 1, padding=1), ReLU(),
            Conv2d(64, 40, 1, dtype=dtype), GlobalAvgPool2d(), Linear(40, 40, dtype=dtype), ReLU(),
            Linear(40, 10, dtype=dtype)]
    nets = {"wide": wide}
    if dtype == "float32":
        nets.update((name, make()) for name, make in inference.NETS.items() if name != "vgg")
    return nets


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_split_programs_give_the_bits_of_one_thread(dtype, rng, monkeypatch):
    """A split program (frozen.pxi run_split: each step's slices over images, or over channels at batch 1, shared
    by the caller and the pool's workers) gives the bits of the one-thread program at any thread count."""
    monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "on")
    name = np.dtype(dtype).name
    for net, layers in split_nets(name).items():
        convengine.manual_seed(7)
        model = randomise_batch_norms(convengine.Sequential(layers, input_shape=(3, 32, 32)), rng)
        frozen = model.freeze()
        for batch in (1, 2, 3):
            x = randn(rng, (batch, 3, 32, 32), dtype)
            convengine.set_num_threads(1)
            want = frozen(x)
            for n in (2, 3):
                convengine.set_num_threads(n)
                for _ in range(3):
                    assert_bitwise_equal(frozen(x), want, f"{net}, batch {batch}, {n} threads")
                (arena,) = frozen._arenas[((3, 32, 32), batch)]
                program = arena.compiled()
                assert program.split == n
                assert program.slices() > program.stages(), net      # some steps really split
            looped = model.forward(x, training=False)
            assert np.max(np.abs(want - looped)) <= RTOL[dtype] * (np.max(np.abs(looped)) + 1)


def assert_two_threads_give_the_bits_of_one(frozen, x):
    convengine.set_num_threads(1)
    want = frozen(x)
    convengine.set_num_threads(2)
    assert_bitwise_equal(frozen(x), want, "2 threads")


def test_channel_slices_of_a_first_layer_conv_keep_the_whole_convs_path(rng, monkeypatch):
    """At batch 1 a split program cuts a conv into slices of its output channels. A 4-channel 9x9 conv of 24
    output channels takes the first-layer path (smallc), whose sum over its 324 taps is one block; a slice of 16
    or 8 channels alone would take the row-vector direct kernel (rows_beat_smallc: at most 16 channels), which
    sums the taps in two blocks, other bits. The slices keep the whole conv's path: the bits of one thread."""
    monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "on")
    conv = Conv2d(4, 24, 9, padding=4)
    for channels, path in ((24, "smallc"), (16, "direct"), (8, "direct")):
        w_shape = (channels, 4, 9, 9)
        params = _conv_params(conv2d_geometry((1, 4, 32, 32), w_shape, 1, 4, 1, 1))
        assert engine.conv2d_paths((1, 4, 32, 32), w_shape, params, 4)["forward"] == path
    model = convengine.Sequential([conv, ReLU(), GlobalAvgPool2d(), Linear(24, 10)], input_shape=(4, 32, 32))
    frozen = model.freeze()
    assert_two_threads_give_the_bits_of_one(frozen, randn(rng, (1, 4, 32, 32), np.float32))
    (arena,) = frozen._arenas[((4, 32, 32), 1)]
    assert arena.compiled().slices() > arena.compiled().stages()     # the conv really split


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_one_thread_programs_in_image_slices_give_the_bits_of_whole_steps(dtype, rng, monkeypatch):
    """On one thread a batch whose largest activation exceeds _SLICE_ABOVE runs in slices of images, each through
    every step in the same place (frozen._Arena._images_per_slice): the bits of the program of whole steps."""
    convengine.set_num_threads(1)
    monkeypatch.setattr(frozen_module, "_SLICE_BYTES", 64 * 1024)
    monkeypatch.setattr(frozen_module, "_SLICE_ABOVE", 128 * 1024)
    name = np.dtype(dtype).name
    for net, layers in split_nets(name).items():
        convengine.manual_seed(7)
        model = randomise_batch_norms(convengine.Sequential(layers, input_shape=(3, 32, 32)), rng)
        frozen = model.freeze()
        x = randn(rng, (9, 3, 32, 32), dtype)
        got = frozen(x)
        program = frozen._arenas[((3, 32, 32), 9)][0].compiled()
        assert program.split == 0 and program.slices() >= 3, net     # one thread, several slices
        monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "off")
        whole = model.freeze()
        want = whole(x)
        assert whole._arenas[((3, 32, 32), 9)][0].compiled().slices() == 1
        monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "auto")
        assert_bitwise_equal(got, want, net)
        assert_bitwise_equal(frozen(x[:1]), want[:1], net)              # batch 1 stays whole


@pytest.mark.parametrize("policy,spin", [("GOMP_SPINCOUNT=500", 200_000), ("passive", 0), (" Passive", 0),
                                         ("active", 10 ** 9), ("GOMP_SPINCOUNT=20000", 10 ** 9)])
def test_split_workers_spin_after_the_wait_policy(policy, spin):
    assert frozen_module._pool_spin_ns(policy) == spin


@pytest.mark.parametrize("spin", ["spinning", "sleeping"])
def test_split_programs_run_on_a_busy_pool_and_report_scratch_failure(spin, rng, monkeypatch, request):
    """Calls from several Python threads share one pool: a call finding it busy runs its program alone, with the
    same bits; an allocation failure in any slice is a MemoryError, and the next call is whole again. Workers
    that sleep at once (the passive policy) join each call late, or after it is over: the same bits."""
    monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "on")
    if spin == "sleeping":
        engine.set_pool_spin(0)
        request.addfinalizer(lambda: engine.set_pool_spin(frozen_module._pool_spin_ns(frozen_module._WAIT_POLICY)))
    convengine.manual_seed(8)
    frozen = randomise_batch_norms(convengine.Sequential(split_nets("float32")["wide"], input_shape=(3, 32, 32)),
                                   rng).freeze()
    inputs = [randn(rng, (n, 3, 32, 32), np.float32) for n in (1, 2, 1, 5)]
    convengine.set_num_threads(1)
    want = [frozen(x) for x in inputs]
    convengine.set_num_threads(2)
    got = [[None] * 20 for _ in inputs]

    def work(i):
        for k in range(20):
            got[i][k] = frozen(inputs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, results in enumerate(got):
        for result in results:
            assert_bitwise_equal(result, want[i])
    previous = engine.fail_allocation_after(3)
    try:
        with pytest.raises(MemoryError, match="scratch"):
            frozen(inputs[1])
    finally:
        engine.fail_allocation_after(previous)
    assert_bitwise_equal(frozen(inputs[1]), want[1])
    assert engine.split_workers() >= 1


@pytest.mark.parametrize("policy,spins", [("GOMP_SPINCOUNT=500", False), ("passive", False), ("active", True),
                                          ("ACTIVE", True), ("GOMP_SPINCOUNT=20000", True),
                                          ("GOMP_SPINCOUNT=infinite", True), ("GOMP_SPINCOUNT=4999", False)])
def test_wait_policies_that_keep_workers_spinning(policy, spins):
    assert frozen_module._workers_keep_spinning(policy) is spins


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_models_and_frozen_models_copy_and_pickle_after_use(how, rng):
    """predict caches a frozen plan on the model, and a frozen plan keeps buffers, compiled loops pointing into
    them, and a lock: none of that may stop a copy or a pickle, and a copy computes on buffers of its own."""
    clone = copy.deepcopy if how == "deepcopy" else (lambda obj: pickle.loads(pickle.dumps(obj)))
    model = randomise_batch_norms(cifar_net(), rng)
    x = randn(rng, (3, 3, 32, 32), np.float32)
    want = model.predict(x)
    frozen = model.freeze()
    got = frozen(x)
    model_copy, frozen_copy = clone(model), clone(frozen)
    assert_bitwise_equal(model_copy.predict(x), want)
    assert_bitwise_equal(frozen_copy(x), got)
    other = randn(rng, x.shape, np.float32)
    frozen_copy(other)                              # its own buffers: the original's result stays as it was
    assert_bitwise_equal(frozen(x), got)


def assert_concurrent_calls_match_serial(frozen, inputs, rounds):
    """One Python thread per input, started together, each calling frozen(its input) `rounds` times: every result
    the serial call's bits (and no thread's exception lost)."""
    serial = [frozen(x) for x in inputs]
    outputs = [[None] * rounds for _ in inputs]
    errors = []
    start = threading.Barrier(len(inputs))

    def work(k):
        try:
            start.wait()
            for r in range(rounds):
                outputs[k][r] = frozen(inputs[k])
        except Exception as e:     # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, want in enumerate(serial):
        for got in outputs[k]:
            assert_bitwise_equal(got, want, f"thread {k}")


def test_concurrent_calls_from_four_threads_match_serial_results(rng):
    convengine.manual_seed(0)
    frozen = randomise_batch_norms(cifar_net(), rng).freeze()
    inputs = [randn(rng, (n, 3, 32, 32), np.float32) for n in (3, 8, 8, 1)]
    with every_call_threaded():                 # each call's steps on an OpenMP team of its own
        assert_concurrent_calls_match_serial(frozen, inputs, 10)


def test_weights_are_taken_at_freeze_time_and_predict_is_never_stale(rng):
    convengine.manual_seed(0)
    model = randomise_batch_norms(cifar_net(), rng)
    x = randn(rng, (4, 3, 32, 32), np.float32)
    frozen = model.freeze()
    before = frozen(x)
    for p in model.parameters():
        p.data *= 1.5
    model.layers[1].running_mean += 1
    assert_bitwise_equal(frozen(x), before, "a frozen model saw later edits of the weights")
    after = model.predict(x)
    assert np.max(np.abs(after - before)) > 1e-3, "predict served the weights of an earlier freeze"
    np.testing.assert_array_equal(after, model.freeze()(x))


def test_the_weights_checksum_sees_any_one_changed_value(rng):
    """predict's test for changed weights (_kernels/checksum.h): any one element changed, at any position of arrays
    of any length (whole 64-byte blocks, tails, empty arrays between), changes the sum; equal bytes, equal sums."""
    for length in (1, 2, 15, 16, 17, 31, 100, 1000):
        arrays = [randn(rng, (length,), np.float32), np.zeros(0, np.float32), randn(rng, (3, length), np.float64)]
        base = engine.checksum(arrays)
        assert engine.checksum([a.copy() for a in arrays]) == base
        assert engine.checksum(arrays[::-1]) != base
        for a in (arrays[0], arrays[2].reshape(-1)):
            for i in {0, a.size // 2, a.size - 1}:
                old = a[i]
                a[i] = np.nextafter(old, np.inf)
                assert engine.checksum(arrays) != base, (length, i)
                a[i] = old
        assert engine.checksum(arrays) == base
    with pytest.raises(ValueError):
        engine.checksum([np.zeros((4, 4), np.float32)[:, ::2]])


def test_predict_after_training_and_load_uses_the_new_weights(tmp_path, rng):
    from convengine.losses import CrossEntropyLoss
    from convengine.optim import SGD
    convengine.manual_seed(0)
    model = cifar_net()
    x = randn(rng, (8, 3, 32, 32), np.float32)
    y = rng.integers(0, 10, 8)
    first = model.predict(x)
    trainer = convengine.Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    trainer.fit(x, y, epochs=1, batch_size=4, verbose=0)
    trained = model.predict(x)
    assert np.max(np.abs(trained - first)) > 1e-4
    np.testing.assert_allclose(trained, model.forward(x), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "m.npz")
    loaded = convengine.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.predict(x), trained)


def test_buffers_are_reused_and_reported(rng):
    convengine.manual_seed(0)
    frozen = cifar_net().freeze()
    x = randn(rng, (8, 3, 32, 32), np.float32)
    first = frozen(x)
    arena = frozen._arenas[((3, 32, 32), 8)][0]
    second = frozen(x)
    assert frozen._arenas[((3, 32, 32), 8)] == [arena], "a second call allocated new buffers"
    assert first is not second and not any(np.shares_memory(first, b) for b in arena.buffers)
    largest = 16 * 32 * 32                          # the first conv's output per image
    weights = sum(p.data.nbytes for p in cifar_net().parameters()) - 2 * 4 * (16 + 32 + 64)   # BN folded away
    # and the convs' weights as packed for their kernels (at least as large as the weights)
    plan = frozen.plan_for((3, 32, 32))
    packed = [prepared[3][1].nbytes for prepared in plan.prepared
              if isinstance(prepared, tuple) and len(prepared) == 4 and prepared[3] is not None]
    assert [n >= 4 * 9 * k * c for n, (k, c) in zip(packed, ((16, 3), (32, 16), (64, 32)))] == [True] * 3
    weights += sum(packed)
    assert frozen.memory_bytes(8) == weights + 2 * 8 * largest * 4
    # batch 1 keeps a third buffer (frozen._buffer_count), counted too
    frozen(x[:1])
    (single,) = frozen._arenas[((3, 32, 32), 1)]
    assert len(single.buffers) == 3 and frozen.memory_bytes(1) == weights + sum(b.nbytes for b in single.buffers)


def test_batch_one_split_programs_continue_channelwise_steps_in_the_stage_before(rng, monkeypatch):
    """At batch 1 a split program cuts steps into channel slices; with three buffers a pool, depthwise conv or
    global average pool after a dense conv writes into one that neither has touched, so its slices continue the
    conv's in one stage (no wait between them): the bench's CIFAR-shaped net is one stage per dense conv and one
    for its linear, with the bits of one thread."""
    from convengine.bench import inference
    monkeypatch.setattr(frozen_module, "_SPLIT_MODE", "on")
    convengine.manual_seed(3)
    model = randomise_batch_norms(convengine.Sequential(inference.cifar_net(), input_shape=(3, 32, 32)), rng)
    frozen = model.freeze()
    assert_two_threads_give_the_bits_of_one(frozen, randn(rng, (1, 3, 32, 32), np.float32))
    program = frozen._arenas[((3, 32, 32), 1)][0].compiled()
    assert program.stages() == 4 and program.slices() == 7


def test_frozen_input_errors_name_the_problem(rng):
    convengine.manual_seed(0)
    frozen = cifar_net().freeze()
    with pytest.raises(ValueError, match=r"takes input of shape \(N, 3, 32, 32\)"):
        frozen(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        frozen([[1.0]])
    with pytest.raises(TypeError, match="real numbers"):
        frozen(np.zeros((2, 3, 32, 32), np.complex64))
    free = convengine.Sequential([Conv2d(3, 4, 3), Flatten(), Linear(4 * 30 * 30, 2)]).freeze()
    with pytest.raises(ValueError, match=r"layer 2 \(Linear\)"):
        free(np.zeros((1, 3, 16, 16), np.float32))
    assert free(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 2)
    assert free.predict(np.ones((3, 3, 32, 32), np.uint8)).dtype == np.float32


def test_predict_keeps_its_plan_until_any_weight_changes(rng):
    """predict reuses one frozen plan (and its buffers) while nothing changed, and builds a new one after an edit
    of a single value in place, a training step's update, or new running statistics."""
    convengine.manual_seed(0)
    model = randomise_batch_norms(cifar_net(), rng)
    x = randn(rng, (2, 3, 32, 32), np.float32)
    first = model.predict(x)
    plan = model._frozen_for_predict[1]
    np.testing.assert_array_equal(model.predict(x), first)
    assert model._frozen_for_predict[1] is plan
    for edit in (lambda: model.layers[0].weight.data.__setitem__((0, 0, 0, 0), 5.0),
                 lambda: model.layers[5].running_var.__setitem__(3, 9.0),
                 lambda: model.layers[-1].bias.data.__iadd__(1.0)):
        edit()
        again = model.predict(x)
        assert model._frozen_for_predict[1] is not plan, "an in-place edit did not reach predict"
        assert not np.array_equal(again, first)
        np.testing.assert_allclose(again, model.forward(x), rtol=1e-5, atol=1e-5)
        plan, first = model._frozen_for_predict[1], again


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m,k,n", [(1, 400, 120), (3, 84, 10), (8, 1000, 333), (5, 7, 49), (1, 5000, 48), (9, 30, 20)])
def test_matmul_of_a_few_rows_reads_contiguous_operands_in_place_with_the_same_bits(m, k, n, dtype, rng):
    """A frozen Linear keeps W^T contiguous, so that at batch 1-8 the GEMM reads A's and B's rows without packing
    them: each element must still be the same sum in the same order as the packed path's (functional.linear
    passes W.T as a strided view, which is packed)."""
    a, w = randn(rng, (m, k), dtype), randn(rng, (n, k), dtype)
    packed, in_place = np.empty((m, n), dtype), np.empty((m, n), dtype)
    engine.matmul(a, w.T, packed, 2)
    engine.matmul(a, np.ascontiguousarray(w.T), in_place, 2)
    assert_bitwise_equal(in_place, packed, f"{m}x{k} @ {k}x{n}")
    np.testing.assert_allclose(in_place, a.astype(np.float64) @ w.T.astype(np.float64), rtol=RTOL[dtype] * 100,
                               atol=RTOL[dtype] * 100)


def test_a_subclass_of_a_known_layer_runs_its_own_forward(rng):
    """Rewrites match exact layer types: a Conv2d subclass that computes something else is not folded or fused."""
    class DoubledConv(Conv2d):
        def forward(self, x, training=False):
            return 2 * super().forward(x, training)

    convengine.manual_seed(0)
    model = randomise_batch_norms(convengine.Sequential([DoubledConv(3, 4, 3), BatchNorm2d(4), ReLU()]), rng)
    frozen = model.freeze()
    assert [step.describe() for step in frozen.steps] == ["DoubledConv", "BatchNorm2d+ReLU"]
    x = randn(rng, (2, 3, 8, 8), np.float32)
    np.testing.assert_allclose(frozen(x), model.forward(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["direct", "pixels", "im2col", "pointwise"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_weights_packed_once_give_the_same_bits_as_packing_per_call(path, dtype, rng):
    """A frozen conv packs its weights once (conv2d_pack) for the path its shape takes; the forward with them must
    be the very same computation as packing on each call, and weights packed for another path are not used."""
    for x_shape, w_shape, padding, groups in [((3, 16, 12, 12), (24, 16, 3, 3), 1, 1),
                                              ((2, 32, 8, 8), (36, 16, 3, 3), 1, 2),
                                              ((2, 24, 8, 8), (40, 24, 1, 1), 0, 1)]:
        x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, (w_shape[0],), dtype)
        geom = conv2d_args(x, w, b, 1, padding, 1, groups)
        params = _conv_params(geom)
        engine.force_conv_path(path)
        try:
            length = engine.conv2d_pack_length((1,) + x_shape[1:], w_shape, params, x.itemsize)
            assert length > 0
            buffer = np.full(length, np.nan, dtype)
            packed = (engine.conv2d_pack((1,) + x_shape[1:], w, params, buffer), buffer)
            assert not np.isnan(buffer).any(), "conv2d_pack left part of its buffer unwritten"
            want, got = np.empty(geom.out_shape, dtype), np.empty(geom.out_shape, dtype)
            engine.conv2d_forward(x, w, b, want, params, 2, True)
            engine.conv2d_forward(x, w, b, got, params, 2, True, None, None, packed)
            assert_bitwise_equal(got, want, f"{path} {x_shape} {w_shape}")
            # and they are what the kernel reads: zero weights leave relu(bias)
            engine.conv2d_forward(x, w, b, got, params, 2, True, None, None, (packed[0], np.zeros_like(buffer)))
            np.testing.assert_array_equal(got, np.broadcast_to(np.maximum(b, 0)[:, None, None], got.shape[1:])[None]
                                          .repeat(got.shape[0], 0))
            # packed for this path, used under another: ignored, not misread
            engine.force_conv_path("im2col" if path != "im2col" else "direct")
            engine.conv2d_forward(x, w, b, want, params, 2, True)
            engine.conv2d_forward(x, w, b, got, params, 2, True, None, None, packed)
            assert_bitwise_equal(got, want, f"{path} weights under another path, {x_shape} {w_shape}")
        finally:
            engine.force_conv_path("auto")
        with pytest.raises(ValueError, match="another geometry"):
            engine.conv2d_forward(x, w, b, got, params, 2, True, None, None, (packed[0], buffer[:-1]))
