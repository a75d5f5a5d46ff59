"""Ctrl-C during Trainer.fit: the last checkpoint stays loadable, and the model is exactly the state after the last
completed batch (what trainer.py documents), usable at once and resumable from the checkpoint.

The expected state comes from a twin run with the same seeds, stopped at the same batch: every kernel is bitwise
deterministic, so "the state after batch b of epoch e" is one set of arrays, compared bit for bit (parameters and
BatchNorm running statistics).
"""
import os
import signal
import threading
import time

import numpy as np
import pytest

import convengine
from convengine.layers import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from convengine.losses import CrossEntropyLoss
from convengine.optim import SGD
from convengine.trainer import Callback, ModelCheckpoint

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signals are delivered to the main thread")

SEED = 5
BATCH = 8
_rng = np.random.default_rng(0)
X = _rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
Y = _rng.integers(0, 3, 64)
BATCHES = len(X) // BATCH


def make_run():
    convengine.manual_seed(SEED)
    model = convengine.Sequential([Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(),
                                   Dropout(0.25), Linear(64, 3)], input_shape=(1, 8, 8))
    trainer = convengine.Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, trainer


def state(model):
    out = {p.name: p.data.copy() for p in model.parameters()}
    out.update({f"buffer {k}": a.copy() for k, a in model.buffers().items()})
    return out


def assert_state(model, expected, what):
    got = state(model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(got[k], expected[k]), f"{what}: {k} differs"


class At(Callback):
    """Run action(trainer) at the end of batch `batch` of epoch `epoch` (0-based)."""

    def __init__(self, epoch, batch, action):
        self.epoch, self.batch, self.action = epoch, batch, action

    def on_batch_end(self, trainer, batch, logs):
        if trainer.epoch == self.epoch and batch == self.batch:
            self.action(trainer)


class _Stop(Exception):
    pass


_reference_cache = {}


def reference_state(epoch, batch):
    """The state of an uninterrupted run right after batch `batch` of epoch `epoch` (0-based)."""
    key = (epoch, batch, SGD.fused)
    if key not in _reference_cache:
        model, trainer = make_run()

        def grab(tr):
            _reference_cache[key] = state(tr.model)
            raise _Stop

        with pytest.raises(_Stop):
            trainer.fit(X, Y, epochs=epoch + 1, batch_size=BATCH, seed=SEED, callbacks=[At(epoch, batch, grab)],
                        verbose=0)
    return _reference_cache[key]


def check_usable(model):
    """The model predicts at once, with finite weights and outputs."""
    for p in model.parameters():
        assert np.all(np.isfinite(p.data)), p.name
    y = model.predict(X[:5])
    assert y.shape == (5, 3) and np.all(np.isfinite(y))


def send_sigint(trainer=None):
    """A real Ctrl-C: SIGINT to this process; the sleep lets Python run the handler here and now."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    before = signal.getsignal(signal.SIGINT)
    yield
    assert signal.getsignal(signal.SIGINT) is before, "fit left its SIGINT handler installed"


def test_ctrl_c_finishes_the_batch_and_leaves_a_loadable_checkpoint(tmp_path):
    model, trainer = make_run()
    ckpt = tmp_path / "last.npz"
    history = trainer.fit(X, Y, epochs=5, batch_size=BATCH, seed=SEED, verbose=0,
                          callbacks=[ModelCheckpoint(ckpt), At(2, 3, send_sigint)])
    assert history.interrupted and not history.stopped_early
    assert len(history) == 2 and trainer.epoch == 2
    assert history.partial_epoch["batches"] == 4
    # The model is the state after the batch during which Ctrl-C came, and works.
    assert_state(model, reference_state(2, 3), "model after Ctrl-C")
    check_usable(model)
    # The last checkpoint is the end of epoch 2 (index 1), whole and loadable.
    assert_state(convengine.load(ckpt), reference_state(1, BATCHES - 1), "checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"], "temporary files left behind"


def test_training_resumed_from_the_checkpoint_is_the_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "last.npz"
    model, trainer = make_run()
    trainer.fit(X, Y, epochs=4, batch_size=BATCH, seed=SEED, verbose=0,
                callbacks=[ModelCheckpoint(ckpt), At(2, 5, send_sigint)])
    model2, trainer2 = make_run()
    convengine.manual_seed(SEED + 1)  # the checkpoint, not this, must decide the dropout masks
    trainer2.load_checkpoint(ckpt)
    assert trainer2.epoch == 2
    trainer2.fit(X, Y, epochs=2, batch_size=BATCH, seed=SEED, verbose=0)
    assert_state(model2, reference_state(3, BATCHES - 1), "resumed run after 4 epochs")


@pytest.mark.parametrize("where", ["first-layer-forward", "last-layer-backward"])
def test_keyboard_interrupt_inside_a_batch(where):
    """A KeyboardInterrupt raised inside a batch (a second Ctrl-C, or fit off the main thread): the batch counts
    for nothing, the model is the state after the previous batch."""
    model, trainer = make_run()
    layer = model.layers[0] if where == "first-layer-forward" else model.layers[-1]
    method = "forward" if where == "first-layer-forward" else "backward"
    original = getattr(layer, method)
    calls = {"n": 0}
    target = BATCHES + 5  # batch 5 of epoch 1

    def interrupting(*args, **kwargs):
        if method == "backward" or kwargs.get("training", args[1] if len(args) > 1 else False):
            calls["n"] += 1
            if calls["n"] == target + 1:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    setattr(layer, method, interrupting)
    history = trainer.fit(X, Y, epochs=3, batch_size=BATCH, seed=SEED, verbose=0)
    setattr(layer, method, original)
    assert history.interrupted and len(history) == 1 and trainer.epoch == 1
    assert_state(model, reference_state(1, 4), f"model after a KeyboardInterrupt in {where}")
    check_usable(model)


def test_second_ctrl_c_inside_the_optimizer_step(monkeypatch):
    """Two Ctrl-C in a row, the second landing while the optimizer updates the parameters one by one (its NumPy
    rules; the compiled step is one call, which a signal cannot split): the model must not be left half-updated
    (some parameters after the batch, others before it)."""
    monkeypatch.setattr(SGD, "fused", False)
    model, trainer = make_run()
    opt = trainer.optimizer
    original = opt._update
    target_step = BATCHES + 6  # steps counts from 1: the step of batch 5 of epoch 1

    def update(i, p):
        if opt.steps == target_step and i == 2:
            send_sigint()
            send_sigint()
        return original(i, p)

    opt._update = update
    history = trainer.fit(X, Y, epochs=3, batch_size=BATCH, seed=SEED, verbose=0)
    del opt._update
    assert history.interrupted
    before, after = reference_state(1, 4), reference_state(1, 5)
    got = state(model)
    params = [p.name for p in model.parameters()]
    whole = [k for k, ref in (("before", before), ("after", after))
             if all(np.array_equal(got[n], ref[n]) for n in params)]
    mixed = {n: "after" if np.array_equal(got[n], after[n]) else "before" if np.array_equal(got[n], before[n])
             else "neither" for n in params}
    assert whole, f"parameters left half-updated by the interrupted step: {mixed}"
    check_usable(model)


def test_ctrl_c_while_the_checkpoint_is_written(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of writing a checkpoint leaves the previous checkpoint whole."""
    ckpt = tmp_path / "last.npz"
    model, trainer = make_run()
    real_savez = np.savez
    calls = {"n": 0}

    def savez(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    history = trainer.fit(X, Y, epochs=4, batch_size=BATCH, seed=SEED, verbose=0, callbacks=[ModelCheckpoint(ckpt)])
    monkeypatch.undo()
    assert history.interrupted and trainer.epoch == 2
    assert_state(convengine.load(ckpt), reference_state(0, BATCHES - 1), "the previous checkpoint")
    assert_state(model, reference_state(1, BATCHES - 1), "model after epoch 2")
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"], "temporary files left behind"
    check_usable(model)


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.07])
def test_ctrl_c_at_an_arbitrary_moment(delay):
    """SIGINT from another thread at an arbitrary moment (inside a kernel, between batches, at an epoch's end):
    fit stops after the batch it was in, and the model is exactly the state after that batch."""
    model, trainer = make_run()
    started = []

    class Timer(Callback):
        def on_epoch_begin(self, trainer, epoch):
            if not started:
                t = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
                started.append(t)
                t.start()

    try:
        history = trainer.fit(X, Y, epochs=200, batch_size=BATCH, seed=SEED, verbose=0, callbacks=[Timer()])
    except KeyboardInterrupt:
        pytest.fail("the SIGINT arrived outside fit's handler")
    started[0].join()
    assert history.interrupted and len(history) < 200
    if history.partial_epoch is not None:
        epoch, batch = len(history), history.partial_epoch["batches"] - 1
    else:
        epoch, batch = len(history) - 1, BATCHES - 1
    assert trainer.epoch == len(history)
    assert_state(model, reference_state(epoch, batch), f"model stopped at epoch {epoch} batch {batch}")
    check_usable(model)


def test_second_ctrl_c_during_validation_keeps_the_finished_epoch(tmp_path):
    """Ctrl-C in the last batch of epoch 2, then a second one during that epoch's validation: all its batches were
    applied, so the epoch counts (trainer.epoch, history, the checkpoint), with NaN validation metrics, and a
    resume does not repeat it."""
    ckpt = tmp_path / "last.npz"
    model, trainer = make_run()
    evaluate = trainer.evaluate
    calls = {"n": 0}

    def interrupted_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            send_sigint()
        return evaluate(*args, **kwargs)

    trainer.evaluate = interrupted_evaluate
    history = trainer.fit(X, Y, epochs=4, batch_size=BATCH, seed=SEED, verbose=0, validation_data=(X[:16], Y[:16]),
                          callbacks=[ModelCheckpoint(ckpt), At(1, BATCHES - 1, send_sigint)])
    assert history.interrupted and history.partial_epoch is None
    assert trainer.epoch == 2 and history.epoch == [1, 2]
    assert np.isfinite(history["val_loss"][0]) and np.isnan(history["val_loss"][1])
    assert_state(model, reference_state(1, BATCHES - 1), "model after epoch 2")
    assert_state(convengine.load(ckpt), reference_state(1, BATCHES - 1), "checkpoint of epoch 2")
    model2, trainer2 = make_run()
    trainer2.load_checkpoint(ckpt)
    assert trainer2.epoch == 2
    trainer2.fit(X, Y, epochs=2, batch_size=BATCH, seed=SEED, verbose=0)
    assert_state(model2, reference_state(3, BATCHES - 1), "resumed run after 4 epochs")
