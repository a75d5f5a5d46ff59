"""Sequential, losses and optimizers: a finite-difference check of a whole network with its loss, predict and
summary, save/load round trips, and every kind of bad model file."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, optim
from convengine.model import Sequential, lenet, load

from conftest import numerical_gradient, randn


def small_net(dtype="float64"):
    return Sequential([
        L.Conv2d(2, 3, 3, padding=1, dtype=dtype), L.BatchNorm2d(3, dtype=dtype), L.ReLU(), L.MaxPool2d(2),
        L.Conv2d(3, 4, 2, dtype=dtype), L.AvgPool2d(2, stride=1), L.Flatten(), L.Linear(4, 5, dtype=dtype),
        L.ReLU(), L.Linear(5, 3, init="glorot", dtype=dtype),
    ])


@pytest.mark.parametrize("loss", [losses.CrossEntropyLoss(), losses.MSELoss(reduction="sum")], ids=repr)
def test_whole_network_gradient_matches_finite_differences(loss, rng):
    convengine.manual_seed(3)
    model = small_net()
    model.need_input_grad = True
    for p in model.parameters():
        if p.name.endswith("bias"):
            p.data[...] = randn(rng, p.data.shape) * 0.1
    x = randn(rng, (4, 2, 6, 6))
    y = np.array([0, 2, 1, 2])

    def objective():
        return loss(model.forward(x, training=True), y)

    for p in model.parameters():
        p.grad[...] = 0
    objective()
    gx = model.backward(loss.backward())
    assert gx.shape == x.shape
    np.testing.assert_allclose(gx, numerical_gradient(objective, x), rtol=1e-5, atol=1e-8, err_msg="input")
    for p in model.parameters():
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numerical_gradient(objective, p.data), rtol=1e-5, atol=1e-8,
                                   err_msg=p.name)


def test_first_layer_skips_input_gradient_by_default(rng):
    model = small_net()
    out = model.forward(randn(rng, (2, 2, 6, 6)), training=True)
    assert model.backward(np.ones_like(out)) is None
    assert model.layers[0].need_input_grad is False


def test_parameter_names_and_buffers():
    model = small_net()
    names = [p.name for p in model.parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias", "7.weight", "7.bias",
                     "9.weight", "9.bias"]
    assert sorted(model.buffers()) == ["1.running_mean", "1.running_var"]


def test_predict_is_batched_inference_without_caches(rng):
    convengine.manual_seed(0)
    model = lenet()
    x = rng.random((70, 1, 8, 8)).astype(np.float32)
    whole = model.predict(x)
    # predict runs a frozen plan (BatchNorm folded into the conv): forward's values within rounding (1e-5 of the
    # logits' scale: a logit near zero, a difference of larger terms, differs by ~1e-6 in absolute), and the
    # same bits whatever the batch size
    expected = model.forward(x, training=False)
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))
    for batch_size in (1, 7, 64, 500):
        np.testing.assert_array_equal(model.predict(x, batch_size=batch_size), whole)
    assert all(getattr(layer, "_x", None) is None for layer in model)
    before = model.layers[1].running_mean.copy()
    model.predict(x)
    np.testing.assert_array_equal(model.layers[1].running_mean, before)
    assert model.predict(x[:0]).shape == (0, 10)
    # uint8 or float64 images are converted to the model's dtype.
    assert model.predict((x * 255).astype(np.uint8)).dtype == np.float32


def test_summary_counts_parameters_and_flops():
    model = lenet()
    text = model.summary()
    n_params = sum(p.data.size for p in model.parameters())
    assert f"{n_params:,} parameters" in text
    conv0 = model.layers[0]
    assert f"{conv0.flops((1, 8, 8)):,}" in text
    assert "(10,)" in text and "BatchNorm2d" in text
    assert conv0.flops((1, 8, 8)) == 2 * 32 * 8 * 8 * 9 + 32 * 8 * 8
    with pytest.raises(ValueError, match="input shape is unknown"):
        small_net().summary()


def test_lenet_shapes():
    assert lenet((1, 8, 8)).output_shape() == (10,)
    assert lenet((1, 28, 28)).output_shape() == (10,)
    assert lenet((3, 32, 32), 7).output_shape() == (7,)
    with pytest.raises(ValueError):
        lenet((1, 3, 3))


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 9, 11), (3, 15, 13), (1, 17, 20), (2, 33, 40)], ids=str)
def test_lenet_fits_odd_image_sizes(shape):
    """The first fully connected layer takes exactly what the convolutions leave of any image size: a batch runs
    through, and its width is the flattened feature count."""
    from convengine.layers import Flatten, Linear
    model = lenet(shape, 3)
    flatten = next(i for i, layer in enumerate(model) if isinstance(layer, Flatten))
    features = Sequential(list(model)[:flatten + 1]).forward(np.zeros((2,) + shape, np.float32))
    first_linear = model[flatten + 1]
    assert isinstance(first_linear, Linear)
    assert first_linear.weight.data.shape[1] == features.shape[1]
    assert model.predict(np.zeros((2,) + shape, np.float32)).shape == (2, 3)


def test_sequential_rejects_bad_layers():
    with pytest.raises(TypeError):
        Sequential([L.ReLU(), "relu"])
    relu = L.ReLU()
    with pytest.raises(ValueError, match="twice"):
        Sequential([relu, relu])
    with pytest.raises(ValueError, match="one dtype"):
        Sequential([L.Linear(2, 2), L.Linear(2, 2, dtype="float64")])
    with pytest.raises(ValueError):
        Sequential([])


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def test_cross_entropy_value_gradient_and_stability(rng):
    z = randn(rng, (5, 4))
    y = np.array([0, 3, 1, 1, 2])
    loss = losses.CrossEntropyLoss()
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert loss(z, y) == pytest.approx(-np.mean(np.log(p[np.arange(5), y])), rel=1e-12)
    np.testing.assert_allclose(loss.backward(), (p - np.eye(4)[y]) / 5, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(), numerical_gradient(lambda: loss(z, y), z), rtol=1e-6, atol=1e-9)
    big = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], np.float32)
    value = loss(big, np.array([1, 0]))
    assert np.isfinite(value) and value == pytest.approx((1e4 + 1e4 + np.log(2)) / 2, rel=1e-6)
    assert np.all(np.isfinite(loss.backward()))
    soft = np.array([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]])
    z3 = randn(rng, (2, 3))
    logp = z3 - np.log(np.exp(z3).sum(axis=1, keepdims=True))
    assert loss(z3, soft) == pytest.approx(-np.sum(soft * logp) / 2, rel=1e-12)


def test_cross_entropy_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    z = randn(rng, (6, 5))
    y = rng.integers(0, 5, 6)
    zt = torch.from_numpy(z).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(zt, torch.from_numpy(y))
    ref.backward()
    loss = losses.CrossEntropyLoss()
    assert loss(z, y) == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(loss.backward(), zt.grad.numpy(), rtol=1e-10)


def test_mse_is_the_articles_half_sum_of_squares(rng):
    out = randn(rng, (3, 4))
    y = np.array([1, 0, 3])
    t = np.eye(4)[y]
    loss = losses.MSELoss()
    assert loss(out, y) == pytest.approx(np.sum(0.5 * (t - out) ** 2) / 3, rel=1e-12)
    np.testing.assert_allclose(loss.backward(), (out - t) / 3, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(), numerical_gradient(lambda: loss(out, y), out), rtol=1e-6)
    assert losses.MSELoss(reduction="sum")(out, t) == pytest.approx(np.sum(0.5 * (t - out) ** 2), rel=1e-12)


@pytest.mark.parametrize("target, error, match", [
    (np.array([0, 1, 4]), ValueError, "in \\[0, 4\\)"),
    (np.array([0, -1, 2]), ValueError, "in \\[0, 4\\)"),
    (np.array([0, 1]), ValueError, "3 samples"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "integer"),
    (np.zeros((3, 3)), ValueError, "shape"),
    ([0, 1, 2], TypeError, "ndarray"),
])
def test_losses_reject_bad_labels(target, error, match):
    for loss in (losses.CrossEntropyLoss(), losses.MSELoss()):
        with pytest.raises(error, match=match):
            loss(np.zeros((3, 4)), target)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------------

OPTIMIZER_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
]


@pytest.mark.parametrize("name, kwargs", OPTIMIZER_CASES, ids=lambda c: str(c))
def test_optimizers_match_pytorch(name, kwargs, rng):
    torch = pytest.importorskip("torch")
    w0 = randn(rng, (3, 4))
    grads = [randn(rng, (3, 4)) for _ in range(5)]
    p = L.Parameter("w", w0.copy())
    opt = getattr(optim, name)([p], **kwargs)
    wt = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ref = getattr(torch.optim, name)([wt], **kwargs)
    for g in grads:
        opt.zero_grad()
        p.grad += g
        opt.step()
        ref.zero_grad()
        wt.grad = torch.from_numpy(g.copy())
        ref.step()
        np.testing.assert_allclose(p.data, wt.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_plain_sgd_is_the_articles_update(rng):
    p = L.Parameter("w", randn(rng, (2, 2)))
    w = p.data.copy()
    g = randn(rng, (2, 2))
    opt = optim.SGD([p], lr=0.3)
    data_id = id(p.data)
    p.grad[...] = g
    opt.step()
    np.testing.assert_allclose(p.data, w - 0.3 * g, rtol=1e-15)
    assert id(p.data) == data_id  # updated in place: the model and the optimizer share the array
    opt.zero_grad()
    np.testing.assert_array_equal(p.grad, 0)


def test_optimizer_state_round_trip(rng):
    p = L.Parameter("w", randn(rng, (3,)))
    a = optim.Adam([p], lr=0.1)
    for _ in range(3):
        p.grad[...] = randn(rng, 3)
        a.step()
    desc, arrays = a.state_dict()
    q = L.Parameter("w", p.data.copy())
    b = optim.Adam([q], lr=0.5)
    b.load_state_dict(json.loads(json.dumps(desc)), arrays)
    assert b.lr == 0.1 and b.steps == 3
    g = randn(rng, 3)
    p.grad[...] = g
    q.grad[...] = g
    a.step()
    b.step()
    np.testing.assert_array_equal(p.data, q.data)
    with pytest.raises(ValueError, match="Adam"):
        optim.SGD([q], lr=0.1).load_state_dict(desc, arrays)


@pytest.mark.parametrize("make, error", [
    (lambda p: optim.SGD(p, lr=-1), ValueError),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), ValueError),
    (lambda p: optim.SGD([], lr=0.1), ValueError),
    (lambda p: optim.SGD([np.zeros(3)], lr=0.1), TypeError),
    (lambda p: optim.Adam(p, betas=(0.9, 1.0)), ValueError),
    (lambda p: optim.SGD(p + p, lr=0.1), ValueError),
])
def test_optimizer_bad_arguments(make, error):
    with pytest.raises(error):
        make([L.Parameter("w", np.zeros(3))])


# ---------------------------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------------------------

def trained_lenet(rng):
    convengine.manual_seed(0)
    model = lenet()
    x = rng.random((16, 1, 8, 8)).astype(np.float32)
    model.forward(x, training=True)  # moves BatchNorm's running statistics off their initial values
    return model, x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_gives_identical_predictions(dtype, tmp_path, rng):
    model, x = trained_lenet(rng)
    model.astype(dtype)
    model.metadata = {"dataset": "digits", "note": "ok"}
    path = tmp_path / "model.npz"
    model.save(path)
    convengine.manual_seed(7)
    expected_draw = convengine._random.generator().random()
    convengine.manual_seed(7)
    loaded = load(path)
    assert convengine._random.generator().random() == expected_draw  # loading draws nothing from the seed
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.predict(x).dtype == np.dtype(dtype)
    assert loaded.metadata == model.metadata
    assert loaded.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(loaded.layers[1].running_var, model.layers[1].running_var)
    assert repr(loaded) == repr(model)
    with zipfile.ZipFile(path) as z:
        assert all(not name.endswith(".pkl") for name in z.namelist())


def test_interrupted_save_keeps_the_previous_file(tmp_path, rng, monkeypatch):
    model, x = trained_lenet(rng)
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    for p in model.parameters():
        p.data += 1
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]


def rewrite(path, out, edit_json=None, edit_arrays=None):
    """Copy a model file, changing its JSON description and/or arrays."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    desc = json.loads(arrays["__convengine__"].tobytes())
    if edit_json:
        desc = edit_json(desc)
    arrays["__convengine__"] = np.frombuffer(json.dumps(desc).encode(), np.uint8)
    if edit_arrays:
        edit_arrays(arrays)
    np.savez(out, **arrays)
    return out


def _set(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


def _layer0(key, value):
    def edit(d):
        d["layers"][0][key] = value
        return d
    return edit


class Boom:
    """Pickling this runs a command on unpickling; the marker file tells whether anything ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write(path, data):
    path.write_bytes(data)
    return path


def save_npy(path, a):
    with open(path, "wb") as f:
        np.save(f, a)
    return path


BAD_FILES = {
    "empty": lambda src, dst, marker: write(dst, b""),
    "random bytes": lambda src, dst, marker: write(dst, os.urandom(300)),
    "truncated": lambda src, dst, marker: write(dst, src.read_bytes()[: len(src.read_bytes()) // 2]),
    "flipped bytes": lambda src, dst, marker: write(
        dst, src.read_bytes()[:200] + bytes(b ^ 0xFF for b in src.read_bytes()[200:2000]) + src.read_bytes()[2000:]),
    "pickle": lambda src, dst, marker: write(dst, pickle.dumps(Boom(str(marker)))),
    "object array": lambda src, dst, marker: rewrite(
        src, dst, edit_arrays=lambda a: a.__setitem__("param/0.weight", np.array([Boom(str(marker))], object))),
    "npy not npz": lambda src, dst, marker: save_npy(dst, np.zeros(3)),
    "no description": lambda src, dst, marker: np.savez(dst, x=np.zeros(3)) or dst,
    "description not json": lambda src, dst, marker: np.savez(
        dst, __convengine__=np.frombuffer(b"{not json", np.uint8)) or dst,
    "description a list": lambda src, dst, marker: rewrite(src, dst, edit_json=lambda d: [d]),
    "wrong format": lambda src, dst, marker: rewrite(src, dst, _set("format", "other")),
    "wrong version": lambda src, dst, marker: rewrite(src, dst, _set("version", 99)),
    "version a string": lambda src, dst, marker: rewrite(src, dst, _set("version", "1")),
    "layers not a list": lambda src, dst, marker: rewrite(src, dst, _set("layers", {"0": "Conv2d"})),
    "unknown layer type": lambda src, dst, marker: rewrite(src, dst, _layer0("type", "os.system")),
    "config a string": lambda src, dst, marker: rewrite(src, dst, _layer0("config", "rm -rf /")),
    "config wrong type": lambda src, dst, marker: rewrite(
        src, dst, lambda d: (d["layers"][0]["config"].__setitem__("kernel_size", "3"), d)[1]),
    "config unknown key": lambda src, dst, marker: rewrite(
        src, dst, lambda d: (d["layers"][0]["config"].__setitem__("evil", 1), d)[1]),
    "wrong shape": lambda src, dst, marker: rewrite(
        src, dst, edit_arrays=lambda a: a.__setitem__("param/0.weight", np.zeros((2, 2), np.float32))),
    "wrong dtype": lambda src, dst, marker: rewrite(
        src, dst, edit_arrays=lambda a: a.__setitem__("param/0.weight", a["param/0.weight"].astype(np.float64))),
    "missing array": lambda src, dst, marker: rewrite(src, dst, edit_arrays=lambda a: a.pop("buffer/1.running_var")),
    "extra array": lambda src, dst, marker: rewrite(
        src, dst, edit_arrays=lambda a: a.__setitem__("param/99.weight", np.zeros(3, np.float32))),
    "metadata a list": lambda src, dst, marker: rewrite(src, dst, _set("metadata", [1])),
    "dtype mismatch": lambda src, dst, marker: rewrite(src, dst, _set("dtype", "float64")),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_model_files_raise_a_clear_error_and_run_nothing(kind, tmp_path, rng):
    model, _ = trained_lenet(rng)
    src = tmp_path / "good.npz"
    model.save(src)
    marker = tmp_path / "code-ran"
    bad = BAD_FILES[kind](src, tmp_path / "bad.npz", marker)
    with pytest.raises(ValueError) as info:
        load(bad)
    assert str(bad) in str(info.value)
    assert not marker.exists()


def test_missing_model_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.npz")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_input_is_refused_not_truncated(dtype):
    model = convengine.Sequential([convengine.layers.Flatten(), convengine.layers.Linear(4, 2)])
    x = (np.ones((3, 1, 2, 2)) + 1j).astype(dtype)
    for call in (model.predict, model.forward):
        with pytest.raises(TypeError, match="real numbers.*complex"):
            call(x)
