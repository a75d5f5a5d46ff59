"""Errors a user meets first: a layer that fails inside a model is named (index, type) with the input the model
takes, channels-last images get an NCHW hint, layers that do not fit together are refused when the model is built,
and a checkout whose kernels were never compiled says what to run."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine.model import Sequential, lenet


def cifar_lenet():
    convengine.manual_seed(0)
    return lenet((3, 32, 32), 10)


def test_a_smaller_image_names_the_layer_and_the_input_the_model_takes():
    model = cifar_lenet()
    x = np.zeros((2, 3, 28, 28), np.float32)
    with pytest.raises(ValueError) as e:
        model.predict(x)
    text = str(e.value)
    assert "layer 7 (Linear)" in text and "400 input features" in text
    assert "the model takes input of shape (N, 3, 32, 32), got (2, 3, 28, 28)" in text


def test_channels_last_images_get_an_nchw_hint():
    model = cifar_lenet()
    x = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError) as e:
        model.forward(x)
    text = str(e.value)
    assert text.startswith("layer 0 (Conv2d)") and "x.transpose(0, 3, 1, 2)" in text and "NCHW" in text
    # NCHW input of the wrong channel count gets no such hint
    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((2, 1, 32, 32), np.float32))
    assert "transpose" not in str(e.value)


def test_backward_errors_name_the_layer(rng):
    model = Sequential([L.Flatten(), L.Linear(4, 3), L.ReLU(), L.Linear(3, 2)])
    model.forward(rng.standard_normal((2, 1, 2, 2)).astype(np.float32), training=True)
    with pytest.raises(ValueError, match=r"layer 3 \(Linear\) cannot take gradient of shape \(2, 5\)"):
        model.backward(np.zeros((2, 5), np.float32))


def test_layers_that_do_not_fit_are_refused_when_the_model_is_built():
    layers = [L.Conv2d(3, 6, 5), L.ReLU(), L.MaxPool2d(2), L.Flatten(), L.Linear(100, 4)]
    with pytest.raises(ValueError, match=r"layer 4 \(Linear\) does not fit .* \(1176,\)"):
        Sequential(layers, input_shape=(3, 32, 32))
    Sequential(layers[:4] + [L.Linear(1176, 4)], input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\) does not fit the model input"):
        Sequential([L.Conv2d(3, 6, 5)], input_shape=(1, 32, 32))
    Sequential(layers)  # without an input shape nothing can be checked yet


def test_trainer_reports_the_layer_for_data_that_does_not_fit(rng):
    from convengine import losses, optim
    from convengine.trainer import Trainer
    model = cifar_lenet()
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"does not fit the model: layer 7 \(Linear\)"):
        trainer.fit(np.zeros((4, 3, 28, 28), np.float32), np.zeros(4, np.int64), 1, 2, verbose=0)


def test_unbuilt_checkout_says_what_to_run(tmp_path):
    package = os.path.dirname(convengine.__file__)
    shutil.copytree(package, tmp_path / "convengine",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__", "build"))
    r = subprocess.run([sys.executable, "-c", "import convengine"], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: convengine's compiled kernels are not built")
    assert "pip install -e ." in last and "python setup.py build_ext --inplace" in last
    assert "circular import" not in r.stderr
