"""Trainer: the loss falls, seeded training is bitwise reproducible at any thread count, a checkpoint resumes
exactly, callbacks, Ctrl-C, progress output, evaluate and bad labels."""
import math
import signal

import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, optim
from convengine.data import load_digits
from convengine.model import Sequential, lenet
from convengine import trainer as trainer_module
from convengine.trainer import (Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint, Trainer)

from conftest import assert_same_weights, stripes, weights


@pytest.fixture(autouse=True)
def restore_threads():
    n = convengine.get_num_threads()
    yield
    convengine.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    (x, y), (xt, yt) = load_digits()
    return x[:320], y[:320], xt[:100], yt[:100]


def small_cnn():
    return Sequential([L.Conv2d(1, 4, 3, padding=1), L.ReLU(), L.MaxPool2d(2), L.Flatten(), L.Linear(36, 2)])


def make_trainer(model=None, lr=0.05, momentum=0.9):
    model = model or lenet()
    return Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=lr, momentum=momentum))


def test_loss_falls_on_a_small_generated_problem(rng):
    x, y = stripes(rng)
    convengine.manual_seed(0)
    trainer = make_trainer(small_cnn(), lr=0.1)
    before = trainer.evaluate(x, y)
    history = trainer.fit(x, y, epochs=8, batch_size=16, seed=0, verbose=0)
    after = trainer.evaluate(x, y)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert after["loss"] < 0.3 * before["loss"]
    assert after["accuracy"] >= 0.95
    assert len(history) == 8 and history.epoch == list(range(1, 9))
    assert all(t > 0 for t in history["time"]) and all(r > 0 for r in history["images_per_second"])


def train_once(digits, threads, seed=0, epochs=2):
    convengine.set_num_threads(threads)
    convengine.manual_seed(seed)
    trainer = make_trainer()
    x, y, xt, yt = digits
    trainer.fit(x, y, epochs=epochs, batch_size=32, seed=seed, verbose=0)
    return weights(trainer.model)


def test_same_seed_gives_bitwise_identical_weights_at_one_and_two_threads(digits):
    one = train_once(digits, 1)
    assert_same_weights(one, train_once(digits, 1))
    two = train_once(digits, 2)
    assert_same_weights(two, train_once(digits, 2))
    assert_same_weights(one, two)
    other = train_once(digits, 2, seed=1)
    assert any(u.tobytes() != v.tobytes() for u, v in zip(one, other))


def test_seeded_shuffle_differs_per_epoch_and_repeats_per_run(rng):
    x, y = stripes(rng, 48)
    x[:, 0, 0, 0] = np.arange(48)  # a pixel that names the sample

    class Recording(L.Flatten):
        def forward(self, x, training=False):
            if training:
                seen.append(tuple(x[:, 0, 0, 0].astype(int)))
            return super().forward(x, training)

    def orders(seed):
        seen.clear()
        model = Sequential([Recording(), L.Linear(36, 2)])
        make_trainer(model).fit(x, y, epochs=3, batch_size=48, seed=seed, verbose=0)
        return list(seen)

    seen = []
    first = orders(7)
    assert len(first) == 3 and len(set(first)) == 3
    assert all(sorted(o) == list(range(48)) for o in first)
    assert orders(7) == first
    assert orders(8) != first
    model = Sequential([Recording(), L.Linear(36, 2)])
    seen.clear()
    make_trainer(model).fit(x, y, epochs=1, batch_size=48, shuffle=False, verbose=0)
    assert seen == [tuple(range(48))]


@pytest.mark.parametrize("seed", [0, None], ids=["seeded", "unseeded-shuffle"])
def test_resume_from_checkpoint_continues_identically(seed, digits, tmp_path):
    x, y, xt, yt = digits
    schedule = LearningRateScheduler(lambda epoch, lr: 0.05 * 0.5 ** epoch)
    convengine.manual_seed(4)
    straight = make_trainer()
    straight.fit(x, y, epochs=4, batch_size=32, seed=seed, callbacks=[schedule], verbose=0)

    convengine.manual_seed(4)
    first = make_trainer()
    path = tmp_path / "ckpt-{epoch}.npz"
    first.fit(x, y, epochs=2, batch_size=32, seed=seed, callbacks=[schedule, ModelCheckpoint(path)], verbose=0)
    convengine.manual_seed(123)  # whatever happens in between, the checkpoint restores the random state
    resumed = make_trainer(convengine.load(tmp_path / "ckpt-2.npz"), lr=1.0, momentum=0.5)
    resumed.load_checkpoint(tmp_path / "ckpt-2.npz")
    assert resumed.epoch == 2
    history = resumed.fit(x, y, epochs=2, batch_size=32, seed=seed, callbacks=[schedule], verbose=0)
    assert history.epoch == [3, 4]
    assert_same_weights(weights(straight.model), weights(resumed.model))
    for a, b in zip(straight.optimizer.state["momentum"], resumed.optimizer.state["momentum"]):
        assert a.tobytes() == b.tobytes()


def test_load_checkpoint_refuses_other_architectures_and_plain_models(digits, tmp_path):
    x, y, _, _ = digits
    trainer = make_trainer()
    trainer.fit(x[:64], y[:64], epochs=1, batch_size=32, verbose=0)
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    trainer.model.save(tmp_path / "plain.npz")
    other = make_trainer(lenet(num_classes=5))
    before = weights(other.model)
    with pytest.raises(ValueError, match="architecture"):
        other.load_checkpoint(tmp_path / "ckpt.npz")
    assert_same_weights(before, weights(other.model))
    with pytest.raises(ValueError, match="without training state"):
        make_trainer().load_checkpoint(tmp_path / "plain.npz")
    model = lenet()
    with pytest.raises(ValueError, match="SGD"):
        Trainer(model, losses.CrossEntropyLoss(), optim.Adam(model.parameters())).load_checkpoint(
            tmp_path / "ckpt.npz")


def test_early_stopping_restores_best_weights(rng):
    x, y = stripes(rng, 64)
    xv, yv = stripes(rng, 32)
    convengine.manual_seed(0)
    trainer = make_trainer(small_cnn(), lr=0.1)
    best = {}

    class Record(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            best[epoch] = (logs["val_loss"], weights(trainer.model))

    stop = EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    # A learning rate that blows up after the second epoch makes val_loss worse from then on.
    blow_up = LearningRateScheduler(lambda epoch, lr: 0.1 if epoch < 2 else 50.0)
    history = trainer.fit(x, y, epochs=20, batch_size=16, validation_data=(xv, yv), seed=0,
                          callbacks=[blow_up, Record(), stop], verbose=0)
    assert history.stopped_early and len(history) < 20
    best_epoch = min(best, key=lambda e: best[e][0])
    assert stop.best == best[best_epoch][0]
    assert_same_weights(weights(trainer.model), best[best_epoch][1])
    with pytest.raises(ValueError, match="validation_data"):
        make_trainer(small_cnn()).fit(x, y, epochs=1, batch_size=16, callbacks=[EarlyStopping()], verbose=0)


def test_model_checkpoint_best_only_and_scheduler_history(rng, tmp_path):
    x, y = stripes(rng, 64)
    convengine.manual_seed(0)
    trainer = make_trainer(small_cnn(), lr=0.1)
    ckpt = ModelCheckpoint(tmp_path / "best.npz", monitor="loss", save_best_only=True)
    per_epoch = []

    class Spy(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            per_epoch.append(weights(trainer.model))

    # lr 0 from the third epoch on: the weights stop moving while the measured loss varies, so the best epoch
    # and the saved file must agree exactly.
    sched = LearningRateScheduler(lambda epoch, lr: 0.1 / (1 + epoch) if epoch < 2 else 0.0)
    history = trainer.fit(x, y, epochs=4, batch_size=16, seed=0, callbacks=[sched, ckpt, Spy()], verbose=0)
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.0, 0.0])
    assert trainer.optimizer.lr == 0.0
    best_epoch = int(np.argmin(history["loss"]))
    assert_same_weights(weights(convengine.load(tmp_path / "best.npz")), per_epoch[best_epoch])
    with pytest.raises(ValueError):
        LearningRateScheduler(lambda epoch, lr: -1.0).on_epoch_begin(trainer, 0)


def test_ctrl_c_stops_after_the_current_batch(rng):
    x, y = stripes(rng, 160)
    trainer = make_trainer(small_cnn(), lr=0.1)

    class CtrlC(Callback):
        def on_batch_end(self, trainer, batch, logs):
            if trainer.epoch == 1 and batch == 2:
                signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    history = trainer.fit(x, y, epochs=5, batch_size=16, seed=0, callbacks=[CtrlC()], verbose=0)
    assert history.interrupted and not history.stopped_early
    assert len(history) == 1 and trainer.epoch == 1
    assert history.partial_epoch["batches"] == 3
    assert trainer.optimizer.steps == 10 + 3  # one whole epoch of 10 batches, then three: no step cut short
    assert signal.getsignal(signal.SIGINT) is handler
    out = trainer.predict(x)
    assert np.all(np.isfinite(out))
    assert trainer.fit(x, y, epochs=1, batch_size=16, verbose=0).epoch == [2]  # still trainable


def test_keyboard_interrupt_inside_a_batch_is_caught(rng):
    x, y = stripes(rng, 64)

    class Interrupting(L.ReLU):
        calls = 0

        def forward(self, x, training=False):
            Interrupting.calls += 1
            if training and Interrupting.calls == 3:
                raise KeyboardInterrupt
            return super().forward(x, training)

    model = Sequential([L.Conv2d(1, 4, 3, padding=1), Interrupting(), L.Flatten(), L.Linear(144, 2)])
    trainer = make_trainer(model)
    history = trainer.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert history.interrupted and trainer.optimizer.steps == 2
    assert np.all(np.isfinite(trainer.predict(x)))


def test_progress_output(rng, capsys, monkeypatch):
    x, y = stripes(rng, 32)
    make_trainer(small_cnn()).fit(x, y, epochs=2, batch_size=16, verbose=0)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    make_trainer(small_cnn()).fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=2)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2: loss=") and "val_acc=" in lines[1]
    assert "img/s" in lines[0]
    # verbose=1 draws a bar only on a terminal; elsewhere (a log file, a pipe, capsys) one line per epoch.
    make_trainer(small_cnn()).fit(x, y, epochs=1, batch_size=16, verbose=1)
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("epoch 1/1: loss=") and "\r" not in out and len(out.splitlines()) == 1
    monkeypatch.setattr(trainer_module, "_on_terminal", lambda: True)
    make_trainer(small_cnn()).fit(x, y, epochs=1, batch_size=16, verbose=1)
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" in err and "img/s" in err and "acc=" in err and "\r" in err


def test_evaluate_and_predict_agree_with_the_model(rng):
    x, y = stripes(rng, 40)
    trainer = make_trainer(small_cnn())
    out = trainer.model.forward(x, training=False)
    result = trainer.evaluate(x, y, batch_size=7)
    assert result["accuracy"] == pytest.approx(np.mean(out.argmax(axis=1) == y))
    assert result["loss"] == pytest.approx(losses.CrossEntropyLoss()(out, y), rel=1e-6)
    np.testing.assert_array_equal(trainer.predict(x), out)
    summed = Trainer(trainer.model, losses.CrossEntropyLoss(reduction="sum"), trainer.optimizer)
    assert summed.evaluate(x, y)["loss"] == pytest.approx(result["loss"], rel=1e-6)


@pytest.mark.parametrize("labels, error", [
    (lambda y: np.where(y == 1, 2, y), ValueError),
    (lambda y: y[:-1], ValueError),
    (lambda y: y - 1, ValueError),
    (lambda y: y.astype(np.float32), TypeError),
    (lambda y: y.reshape(-1, 1), ValueError),
])
def test_bad_labels_fail_before_training(labels, error, rng):
    x, y = stripes(rng, 32)
    trainer = make_trainer(small_cnn())
    before = weights(trainer.model)
    with pytest.raises(error):
        trainer.fit(x, labels(y), epochs=1, batch_size=8, verbose=0)
    with pytest.raises(error):
        trainer.fit(x, y, epochs=1, batch_size=8, validation_data=(x, labels(y)), verbose=0)
    assert_same_weights(before, weights(trainer.model))
    assert trainer.optimizer.steps == 0


def test_bad_fit_arguments(rng):
    x, y = stripes(rng, 16)
    trainer = make_trainer(small_cnn())
    with pytest.raises(ValueError):
        trainer.fit(x, y, epochs=1, batch_size=0)
    with pytest.raises(ValueError):
        trainer.fit(x, y, epochs=1, batch_size=4, verbose=3)
    with pytest.raises(ValueError, match="does not fit"):
        trainer.fit(np.zeros((16, 1, 5, 5), np.float32), y, epochs=1, batch_size=4)
    with pytest.raises(TypeError):
        trainer.fit(x, y, epochs=1, batch_size=4, callbacks=[print])
    with pytest.raises(TypeError):
        Trainer(small_cnn(), "cross-entropy", trainer.optimizer)
    with pytest.raises(ValueError, match="not the model's"):
        Trainer(small_cnn(), losses.CrossEntropyLoss(), trainer.optimizer)


def test_mse_loss_trains_too(rng):
    x, y = stripes(rng)
    convengine.manual_seed(0)
    model = small_cnn()
    trainer = Trainer(model, losses.MSELoss(), optim.Adam(model.parameters(), lr=0.01))
    history = trainer.fit(x, y, epochs=6, batch_size=16, seed=0, verbose=0)
    assert history["loss"][-1] < history["loss"][0] and math.isfinite(history["loss"][-1])
