"""Divergence is never silent: a NaN or infinite loss stops Trainer.fit with an error naming the epoch and batch
(or warns, when asked), non-finite hyper-parameters are refused wherever they enter (optimizer constructors, the lr
setter a scheduler uses, a checkpoint's JSON), and the command line exits non-zero without saving the model."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, optim
from convengine.model import Sequential
from convengine.trainer import LearningRateScheduler, Trainer

from conftest import stripes, weights

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(convengine.__file__)))


def make_trainer(lr=0.05, momentum=0.9):
    convengine.manual_seed(0)
    model = Sequential([L.Conv2d(1, 4, 3, padding=1), L.BatchNorm2d(4), L.ReLU(), L.MaxPool2d(2), L.Flatten(),
                        L.Linear(36, 2)])
    return Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=lr, momentum=momentum))


def test_one_nan_pixel_stops_fit_at_its_batch_and_undoes_it(rng):
    x, y = stripes(rng, 64)
    x[37, 0, 2, 3] = np.nan  # batch 3 of 4 (batch size 16, no shuffle) in the second epoch
    trainer = make_trainer()
    trainer.fit(x[:32], y[:32], epochs=1, batch_size=16, shuffle=False, verbose=0)
    before = weights(trainer.model)
    with pytest.raises(FloatingPointError, match=r"epoch 2, batch 3 of 4.*learning rate.*this batch holds 1\)") as info:
        trainer.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert "nan" in str(info.value)
    after = weights(trainer.model)
    assert all(np.isfinite(a).all() for a in after)
    # Batches 1 and 2 of the epoch were applied, the third was undone (BatchNorm's running statistics included).
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert trainer.epoch == 1


def test_a_huge_learning_rate_stops_fit_instead_of_training_on_nan(rng):
    x, y = stripes(rng, 64)
    trainer = make_trainer(lr=1e30)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch \d+ of 4: training diverged"):
        trainer.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert trainer.epoch == 0


def test_warn_mode_warns_once_and_carries_on(rng):
    x, y = stripes(rng, 64)
    x[20, 0, 0, 0] = np.inf
    trainer = make_trainer()
    trainer.on_nonfinite_loss = "warn"
    with pytest.warns(RuntimeWarning, match="epoch 1, batch 2 of 4: training diverged") as record:
        history = trainer.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert len([w for w in record if "diverged" in str(w.message)]) == 1
    assert len(history) == 2 and not np.isfinite(history["loss"][-1])
    trainer.on_nonfinite_loss = "ignore"
    with pytest.raises(ValueError, match="on_nonfinite_loss"):
        trainer.fit(x, y, epochs=1, batch_size=16, verbose=0)


def params():
    return Sequential([L.Linear(3, 2)]).parameters()


@pytest.mark.parametrize("make", [
    lambda: optim.SGD(params(), lr=float("inf")),
    lambda: optim.SGD(params(), lr=float("nan")),
    lambda: optim.SGD(params(), lr=10 ** 400),
    lambda: optim.SGD(params(), lr=0.1, momentum=float("inf")),
    lambda: optim.SGD(params(), lr=0.1, weight_decay=float("inf")),
    lambda: optim.Adam(params(), eps=float("inf")),
    lambda: optim.Adam(params(), lr=float("inf")),
    lambda: optim.Adam(params(), weight_decay=float("inf")),
], ids=["sgd-lr-inf", "sgd-lr-nan", "sgd-lr-10^400", "sgd-momentum-inf", "sgd-weight-decay-inf", "adam-eps-inf",
        "adam-lr-inf", "adam-weight-decay-inf"])
def test_non_finite_hyper_parameters_are_refused(make):
    with pytest.raises(ValueError, match="finite"):
        make()


def test_lr_setter_and_a_schedule_returning_inf_are_refused(rng):
    opt = optim.SGD(params(), lr=0.1)
    with pytest.raises(ValueError, match="finite"):
        opt.lr = float("inf")
    assert opt.lr == 0.1
    x, y = stripes(rng, 64)
    trainer = make_trainer()
    with pytest.raises(ValueError, match="schedule returned inf for epoch 0"):
        trainer.fit(x, y, epochs=1, batch_size=16, verbose=0,
                    callbacks=[LearningRateScheduler(lambda e, lr: float("inf"))])


def rewrite_training(path, change):
    """Rewrite a checkpoint's JSON description with change(desc) applied (Infinity allowed, as json.dumps writes)."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    desc = json.loads(np.load(io.BytesIO(entries["__convengine__.npy"])).tobytes())
    change(desc)
    bio = io.BytesIO()
    np.save(bio, np.frombuffer(json.dumps(desc).encode(), np.uint8))
    entries["__convengine__.npy"] = bio.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)


@pytest.mark.parametrize("key, value", [("lr", float("inf")), ("momentum", float("inf")),
                                        ("weight_decay", float("nan"))])
def test_a_checkpoint_with_a_non_finite_hyper_parameter_is_refused(key, value, rng, tmp_path):
    x, y = stripes(rng, 64)
    trainer = make_trainer()
    trainer.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = tmp_path / "ckpt.npz"
    trainer.save_checkpoint(path)
    rewrite_training(path, lambda d: d["training"]["optimizer"]["hyperparameters"].__setitem__(key, value))
    fresh = make_trainer()
    with pytest.raises(ValueError, match=f"{key} must be a finite number") as info:
        fresh.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert fresh.optimizer.lr == 0.05 and fresh.epoch == 0


def test_the_cli_exits_non_zero_and_saves_nothing_when_training_diverges(tmp_path):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "model.npz"
    result = subprocess.run([sys.executable, "-m", "convengine", "train", "--lr", "1e30", "--epochs", "2",
                             "--threads", "1", "--save", str(out), "--verbose", "0"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "diverged" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
