"""What Trainer.fit takes: class labels or targets shaped like the output (the article's target vectors, regression
values), validation_split, the last batch (folded or dropped), seeded augmentation; and convengine.num_threads."""
import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import losses, metrics, optim
from convengine.augment import Compose, RandomCrop, RandomFlip
from convengine.model import Sequential
from convengine.trainer import Callback, Trainer

from conftest import assert_same_weights, stripes, weights


def small_cnn(outputs=2, extra=()):
    convengine.manual_seed(0)
    return Sequential([L.Conv2d(1, 4, 3, padding=1), L.ReLU(), L.MaxPool2d(2), L.Flatten(), L.Linear(36, outputs),
                       *extra])


class BatchSizes(Callback):
    def __init__(self):
        self.sizes = []

    def on_batch_end(self, trainer, batch, logs):
        self.sizes.append(logs["size"])


def test_the_articles_target_vectors_train_exactly_as_labels_do(rng):
    """MSELoss turns labels into one-hot vectors, so fitting on the one-hot target vectors themselves must give the
    same weights bit for bit, and the same accuracy."""
    x, y = stripes(rng)
    runs = []
    for targets in (y, np.eye(2, dtype=np.float32)[y]):
        model = small_cnn()
        trainer = Trainer(model, losses.MSELoss(), optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        history = trainer.fit(x, targets, epochs=4, batch_size=16, seed=0, validation_data=(x[:20], targets[:20]),
                              verbose=0)
        runs.append((weights(model), history, trainer.evaluate(x, targets)))
    (w_labels, h_labels, e_labels), (w_vectors, h_vectors, e_vectors) = runs
    assert_same_weights(w_labels, w_vectors)
    assert h_vectors["accuracy"] == h_labels["accuracy"] and h_vectors["val_accuracy"] == h_labels["val_accuracy"]
    assert h_vectors["loss"][-1] < 0.6 * h_vectors["loss"][0]
    assert e_vectors == e_labels and e_vectors["accuracy"] > 0.8


def test_sigmoid_outputs_with_point_one_point_nine_targets_report_accuracy(rng):
    x, y = stripes(rng)
    targets = np.where(np.eye(2)[y] == 1, 0.9, 0.1).astype(np.float32)
    model = small_cnn(extra=[L.Sigmoid()])
    trainer = Trainer(model, losses.MSELoss(), optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    history = trainer.fit(x, targets, epochs=6, batch_size=16, seed=0, verbose=0)
    result = trainer.evaluate(x, targets)
    assert result["accuracy"] == metrics.accuracy(y, model.predict(x)) > 0.8
    assert history["loss"][-1] < history["loss"][0]


def test_regression_targets_train_without_an_accuracy(rng, capsys):
    """Two outputs regressed onto the image's mean and its top row's mean: no classes, so no accuracy anywhere."""
    x = rng.normal(0, 1, (128, 1, 6, 6)).astype(np.float32)
    targets = np.stack([x.mean(axis=(1, 2, 3)), x[:, 0, 0, :].mean(axis=1)], axis=1).astype(np.float32)
    convengine.manual_seed(0)
    model = Sequential([L.Flatten(), L.Linear(36, 2, init="glorot")])
    trainer = Trainer(model, losses.MSELoss(), optim.Adam(model.parameters(), lr=0.01))
    before = trainer.evaluate(x, targets)
    history = trainer.fit(x, targets, epochs=30, batch_size=16, seed=0, validation_split=0.25, verbose=2)
    after = trainer.evaluate(x, targets)
    assert set(before) == {"loss"} and "accuracy" not in history and "val_accuracy" not in history
    assert "val_loss" in history
    assert after["loss"] < 0.02 * before["loss"]
    out = capsys.readouterr().out
    assert "acc=" not in out and "val_loss=" in out


@pytest.mark.parametrize("targets, error, match", [
    (lambda y: np.eye(3, dtype=np.float32)[y], ValueError, r"shaped like the model output, \(32, 2\)"),
    (lambda y: np.eye(2, dtype=np.int64)[y], TypeError, "must be float"),
    (lambda y: np.where(np.eye(2)[y] > 0, np.nan, 0.0), ValueError, "NaN"),
    (lambda y: y.astype(np.float32), TypeError, "integer"),
])
def test_bad_targets_fail_before_training(targets, error, match, rng):
    x, y = stripes(rng, 32)
    model = small_cnn()
    trainer = Trainer(model, losses.MSELoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(error, match=match):
        trainer.fit(x, targets(y), epochs=1, batch_size=8, verbose=0)
    assert trainer.optimizer.steps == 0


def test_validation_split_holds_out_the_last_samples(rng):
    x, y = stripes(rng, 40)
    histories = []
    for kwargs in (dict(validation_split=0.25), dict(validation_data=(x[30:], y[30:]))):
        model = small_cnn()
        trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
        xs, ys = (x, y) if "validation_split" in kwargs else (x[:30], y[:30])
        histories.append(trainer.fit(xs, ys, epochs=2, batch_size=8, seed=1, verbose=0, **kwargs).history)
    timing = ("time", "images_per_second")
    assert {k: v for k, v in histories[0].items() if k not in timing} == \
        {k: v for k, v in histories[1].items() if k not in timing}
    assert "val_accuracy" in histories[0]
    model = small_cnn()
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not both"):
        trainer.fit(x, y, 1, 8, validation_data=(x, y), validation_split=0.2, verbose=0)
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), ("0.2", TypeError), (0.99, ValueError)):
        with pytest.raises(error, match="validation_split"):
            trainer.fit(x, y, 1, 8, validation_split=bad, verbose=0)


def bn_model():
    """BatchNorm2d on 1x1 maps: a batch of one sample gives it a single value per channel."""
    convengine.manual_seed(0)
    return Sequential([L.Conv2d(1, 4, 6), L.BatchNorm2d(4), L.ReLU(), L.Flatten(), L.Linear(4, 2)])


@pytest.mark.parametrize("n, drop_last, sizes", [
    (33, False, [16, 17]),          # the lone last sample joins the batch before it
    (33, True, [16, 16]),
    (35, False, [16, 16, 3]),
    (35, True, [16, 16]),
    (32, False, [16, 16]),
])
def test_last_batch_is_folded_or_dropped(n, drop_last, sizes, rng):
    x, y = stripes(rng, n)
    model = bn_model()
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    seen = BatchSizes()
    history = trainer.fit(x, y, epochs=1, batch_size=16, seed=0, drop_last=drop_last, callbacks=[seen], verbose=0)
    assert seen.sizes == sizes and trainer.optimizer.steps == len(sizes)
    assert np.isfinite(history["loss"][0])


def test_a_single_sample_batch_still_explains_itself(rng):
    x, y = stripes(rng, 1)
    model = bn_model()
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\).*more than one value per channel"):
        trainer.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with pytest.raises(ValueError, match="leaves no batch"):
        trainer.fit(x, y, epochs=1, batch_size=16, drop_last=True, verbose=0)


def test_random_crop_cuts_windows_of_the_padded_image(rng):
    x = rng.standard_normal((6, 2, 5, 7)).astype(np.float32)
    out = RandomCrop(2)(x, np.random.default_rng(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    offsets = []
    for i in range(6):
        found = [(t, l) for t in range(5) for l in range(5)
                 if np.array_equal(padded[i, :, t:t + 5, l:l + 7], out[i])]
        assert found, f"image {i} is no window of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 1
    np.testing.assert_array_equal(RandomCrop(2)(x, np.random.default_rng(3)), out)
    np.testing.assert_array_equal(RandomCrop(0)(x, np.random.default_rng(3)), x)


def test_random_flip_mirrors_some_images(rng):
    x = rng.standard_normal((40, 1, 3, 4))
    keep = x.copy()
    out = RandomFlip()(x, np.random.default_rng(0))
    flipped = [np.array_equal(out[i], x[i, :, :, ::-1]) for i in range(40)]
    same = [np.array_equal(out[i], x[i]) for i in range(40)]
    assert all(f or s for f, s in zip(flipped, same)) and 5 < sum(flipped) < 35
    np.testing.assert_array_equal(x, keep)
    np.testing.assert_array_equal(RandomFlip(1.0)(x, np.random.default_rng(0)), x[..., ::-1])
    np.testing.assert_array_equal(RandomFlip(0.0)(x, np.random.default_rng(0)), x)
    with pytest.raises(ValueError, match="NCHW"):
        RandomFlip()(x[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="p must be"):
        RandomFlip(1.5)


def test_augmented_training_is_seeded_and_reproducible(rng):
    x, y = stripes(rng, 48)
    calls = []

    def fit(seed, augment):
        model = small_cnn()
        trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
        trainer.fit(x, y, epochs=2, batch_size=16, seed=seed, augment=augment, validation_data=(x, y), verbose=0)
        return weights(model)

    def counting(xb, rng):
        calls.append(xb.shape[0])
        return Compose([RandomCrop(1), RandomFlip()])(xb, rng)

    a = fit(0, counting)
    assert calls == [16, 16, 16] * 2            # training batches only, never the validation data
    assert_same_weights(a, fit(0, Compose([RandomCrop(1), RandomFlip()])))
    assert not all(u.tobytes() == v.tobytes() for u, v in zip(a, fit(1, Compose([RandomCrop(1), RandomFlip()]))))
    plain = fit(0, None)
    assert not all(u.tobytes() == v.tobytes() for u, v in zip(a, plain))
    model = small_cnn()
    trainer = Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="augment"):
        trainer.fit(x, y, 1, 16, augment="flip", verbose=0)
    with pytest.raises(ValueError, match="augment must return"):
        trainer.fit(x, y, 1, 16, augment=lambda xb, r: xb[:1], verbose=0)


def test_num_threads_context_manager_restores_the_count():
    before = convengine.get_num_threads()
    with convengine.num_threads(1):
        assert convengine.get_num_threads() == 1
        with convengine.num_threads(3):
            assert convengine.get_num_threads() == 3
        assert convengine.get_num_threads() == 1
    assert convengine.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with convengine.num_threads(2):
            raise RuntimeError("inside")
    assert convengine.get_num_threads() == before
    with pytest.raises(ValueError):
        convengine.num_threads(0)
    with pytest.raises(TypeError):
        convengine.num_threads(1.5)
