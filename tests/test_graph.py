"""Graph models (convengine.graph): residual Add and channel Concat against finite differences and a hand-wired
computation, training with Trainer, save/load in format version 2 (version-1 Sequential files still load), bad
graph files, checkpoint/resume, thread-count invariance, summary and construction errors."""
import json

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, optim
from convengine.data import load_digits
from convengine.graph import Add, Concat, Graph, Input
from convengine.model import Sequential, load
from convengine._threads import every_call_threaded
from convengine.trainer import ModelCheckpoint, Trainer

from conftest import assert_same_weights, numerical_gradient, weights


@pytest.fixture(autouse=True)
def restore_threads():
    n = convengine.get_num_threads()
    yield
    convengine.set_num_threads(n)


def branchy(c=1, hw=8, width=8, classes=10, dtype="float32"):
    """A residual block with a strided 1x1 shortcut, then a two-branch concat, then a classifier."""
    x = Input((c, hw, hw))
    h = L.ReLU()(L.BatchNorm2d(width, dtype=dtype)(L.Conv2d(c, width, 3, padding=1, dtype=dtype)(x)))
    r = L.Conv2d(width, width, 3, stride=2, padding=1, dtype=dtype)(h)
    r = L.Conv2d(width, width, 3, padding=1, dtype=dtype)(L.ReLU()(r))
    s = L.Conv2d(width, width, 1, stride=2, dtype=dtype)(h)
    h = L.ReLU()(Add()([r, s]))
    a = L.Conv2d(width, width // 2, 1, dtype=dtype)(h)
    b = L.MaxPool2d(3, stride=1, padding=1)(h)
    h = Concat()([a, b, h])
    y = L.Linear(width * 5 // 2, classes, dtype=dtype)(L.Flatten()(L.GlobalAvgPool2d()(h)))
    return Graph(x, y)


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = load_digits()
    return x[:192], y[:192]


def test_forward_matches_the_layers_wired_by_hand(rng):
    convengine.manual_seed(0)
    model = branchy()
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    ly = model.layers
    # The depth-first order: stem 0-2, residual branch 3-5, shortcut 6, Add 7, ReLU 8, concat branches 9-10.
    h = ly[2](ly[1](ly[0](x)))
    r = ly[5](ly[4](ly[3](h)))
    h = np.maximum(r + ly[6](h), 0)
    h = np.concatenate([ly[9](h), ly[10](h), h], axis=1)
    expected = ly[14](h.mean(axis=(2, 3)))
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert [type(layer).__name__ for layer in ly[6:12]] == ["Conv2d", "Add", "ReLU", "Conv2d", "MaxPool2d", "Concat"]


def test_gradients_match_finite_differences(rng):
    convengine.manual_seed(1)
    model = branchy(dtype="float64", width=4, hw=6)
    model.need_input_grad = True
    x = rng.standard_normal((2, 1, 6, 6))
    v = rng.standard_normal((2, 10))

    def loss():
        return float(np.sum(model.forward(x, training=True) * v))

    for p in model.parameters():
        p.grad[...] = 0
    model.forward(x, training=True)
    gx = model.backward(v)
    np.testing.assert_allclose(gx, numerical_gradient(loss, x), rtol=1e-5, atol=1e-7)
    # The weights of the residual branch, the shortcut and the concat branch: each gradient sums several paths.
    for p in model.parameters():
        if p.name.split(".")[0] in ("0", "4", "6", "9") and p.name.endswith("weight"):
            analytic = p.grad.copy()
            np.testing.assert_allclose(analytic, numerical_gradient(loss, p.data), rtol=1e-5, atol=1e-7,
                                       err_msg=p.name)
    model.need_input_grad = False
    model.forward(x, training=True)
    assert model.backward(v) is None


def test_trains_with_trainer_and_round_trips_through_a_version_2_file(digits, tmp_path):
    x, y = digits
    convengine.manual_seed(0)
    model = branchy(width=16)
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    history = trainer.fit(x, y, epochs=5, batch_size=16, seed=0, verbose=0)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    model.metadata["note"] = "residual"
    model.save(tmp_path / "g.npz")
    loaded = load(tmp_path / "g.npz")
    assert isinstance(loaded, Graph)
    assert loaded.description() == model.description()
    assert loaded.description()["version"] == 2 and loaded.metadata == {"note": "residual"}
    assert loaded.predict(x).tobytes() == model.predict(x).tobytes()
    assert [p.name for p in loaded.parameters()] == [p.name for p in model.parameters()]
    # A Sequential model is still written as version 1 and loads as a Sequential.
    seq = Sequential([L.Conv2d(1, 2, 3), L.Flatten(), L.Linear(72, 3)], input_shape=(1, 8, 8))
    seq.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert json.loads(f["__convengine__"].tobytes())["version"] == 1
    assert isinstance(load(tmp_path / "s.npz"), Sequential)


def _rewrite(src, dst, edit):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    desc = json.loads(arrays["__convengine__"].tobytes())
    edit(desc)
    arrays["__convengine__"] = np.frombuffer(json.dumps(desc).encode(), np.uint8)
    np.savez(dst, **arrays)
    return dst


def _inputs(i, value):
    def edit(d):
        d["layers"][i]["inputs"] = value
    return edit


BAD_GRAPHS = {
    "cycle (reads a later layer)": (_inputs(3, [5]), "earlier layer"),
    "reads itself": (_inputs(3, [3]), "earlier layer"),
    "dangling input": (_inputs(3, [99]), "earlier layer"),
    "inputs not a list": (_inputs(3, "2"), "non-empty list"),
    "inputs missing": (lambda d: d["layers"][3].pop("inputs"), "non-empty list"),
    "index a bool": (_inputs(3, [True]), "earlier layer"),
    "merge with one input": (_inputs(7, [5]), "at least two"),
    "two inputs to a conv": (_inputs(3, [1, 2]), "reads one tensor"),
    "output out of range": (lambda d: d.__setitem__("output", 40), "output must be"),
    "output a string": (lambda d: d.__setitem__("output", "14"), "output must be"),
    "dead layer": (lambda d: d.__setitem__("output", 13), "do not contribute"),
    "shapes do not fit": (_inputs(7, [5, 6, 2]), "Add needs inputs of one shape"),
    "unknown layer type": (lambda d: d["layers"][7].__setitem__("type", "Subtract"), "unknown type"),
    "graph as version 1": (lambda d: d.__setitem__("version", 1), "needs format version 2"),
    "version 3": (lambda d: d.__setitem__("version", 3), "not supported"),
}


@pytest.mark.parametrize("kind", list(BAD_GRAPHS))
def test_bad_graph_files_raise_value_error_naming_the_file(kind, tmp_path):
    convengine.manual_seed(0)
    model = branchy()
    model.save(tmp_path / "good.npz")
    edit, message = BAD_GRAPHS[kind]
    bad = _rewrite(tmp_path / "good.npz", tmp_path / "bad.npz", edit)
    with pytest.raises(ValueError, match=message) as info:
        load(bad)
    assert str(bad) in str(info.value)


def make_trainer(model, lr=0.05):
    return Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=lr, momentum=0.9))


def test_checkpoint_resume_continues_identically(digits, tmp_path):
    x, y = digits
    convengine.manual_seed(3)
    straight = make_trainer(branchy())
    straight.fit(x, y, epochs=2, batch_size=32, seed=5, verbose=0)

    convengine.manual_seed(3)
    first = make_trainer(branchy())
    first.fit(x, y, epochs=1, batch_size=32, seed=5, callbacks=[ModelCheckpoint(tmp_path / "ckpt.npz")], verbose=0)
    convengine.manual_seed(99)
    resumed = make_trainer(load(tmp_path / "ckpt.npz"), lr=1.0)
    resumed.load_checkpoint(tmp_path / "ckpt.npz")
    resumed.fit(x, y, epochs=1, batch_size=32, seed=5, verbose=0)
    assert_same_weights(weights(straight.model), weights(resumed.model))
    # A checkpoint of another architecture is refused.
    other = make_trainer(Sequential([L.Conv2d(1, 2, 3), L.Flatten(), L.Linear(72, 10)]))
    with pytest.raises(ValueError, match="architecture"):
        other.load_checkpoint(tmp_path / "ckpt.npz")


def test_training_is_bitwise_identical_at_one_and_two_threads(digits):
    x, y = digits

    def train(threads):
        convengine.set_num_threads(threads)
        convengine.manual_seed(7)
        trainer = make_trainer(branchy(width=32))
        trainer.fit(x, y, epochs=1, batch_size=64, seed=0, verbose=0)
        return weights(trainer.model) + [trainer.model.predict(x)]

    with every_call_threaded():          # small batches' ops really split over two threads
        one = train(1)
        two = train(2)
    assert_same_weights(one, two)


def test_summary_lists_inputs_shapes_and_totals():
    convengine.manual_seed(0)
    model = branchy()
    text = model.summary()
    lines = text.splitlines()
    add = next(line for line in lines if " Add " in line)
    assert "(5), (6)" in add and "(8, 4, 4)" in add
    concat = next(line for line in lines if " Concat " in line)
    assert "(9), (10), (8)" in concat and "(20, 4, 4)" in concat
    total = sum(p.data.size for p in model.parameters())
    assert f"{total:,} parameters" in lines[-1]
    assert model.output_shape() == (10,)


def test_construction_errors_are_clear():
    x = Input((3, 8, 8))
    a = L.Conv2d(3, 4, 3)(x)
    b = L.Conv2d(3, 4, 3, padding=1)(x)
    with pytest.raises(ValueError, match="Add needs inputs of one shape"):
        Add()([a, b])
    with pytest.raises(ValueError, match="cannot take input"):
        L.Linear(5, 2)(a)
    with pytest.raises(TypeError, match="list of tensors"):
        Add()(a)
    conv = L.Conv2d(4, 4, 3, padding=1)
    twice = conv(conv(a))
    with pytest.raises(ValueError, match="called twice"):
        Graph(x, twice)
    with pytest.raises(ValueError, match="other than inputs"):
        Graph(x, Add()([a, L.Conv2d(3, 4, 3)(Input((3, 8, 8)))]))
    with pytest.raises(ValueError, match="at least one layer"):
        Graph(x, x)
    with pytest.raises(TypeError, match="symbolic tensor"):
        Graph(x, np.zeros(3))
    with pytest.raises(ValueError, match="exactly one input"):
        Graph([x, x], a)
    model = Graph([x], [L.ReLU()(Concat()([a, L.Conv2d(3, 2, 3)(x)]))])
    assert model.output_shape() == (6, 6, 6)
    with pytest.raises(TypeError, match="Graph"):
        Trainer(object(), losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))


def test_predict_proba_and_the_memory_check_before_predict(rng):
    from convengine.model import _physical_memory
    if _physical_memory() is None:
        pytest.skip("this machine's memory size is unknown")
    convengine.manual_seed(0)
    x = Input((2, 8, 8))
    h = L.Conv2d(2, 4, 3, padding=2000)(x)  # outputs (4, 4006, 4006): 256 MB per image
    model = Graph(x, L.Linear(8, 3)(L.Flatten()(L.GlobalAvgPool2d()(Concat()([h, h])))))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\) would output 4096 x"):
        model.predict(np.zeros((4096, 2, 8, 8), np.float32), batch_size=4096)
    small = branchy()
    images = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    p = small.predict_proba(images)
    scores = small.predict(images).astype(np.float64)
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)
