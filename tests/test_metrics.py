"""convengine.metrics and Sequential.predict_proba: softmax rows, accuracy, the confusion matrix, and which targets
count as classes."""
import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import metrics


def test_softmax_rows_sum_to_one_and_match_the_definition(rng):
    scores = rng.standard_normal((7, 5))
    p = metrics.softmax(scores)
    expected = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert p.dtype == np.float64
    assert metrics.softmax(scores.astype(np.float32)).dtype == np.float32


def test_softmax_is_stable_for_huge_scores():
    scores = np.array([[1000.0, 1000.0, -1000.0], [-1e30, 0.0, -1e30], [88.0, 89.0, 90.0]], np.float32)
    p = metrics.softmax(scores)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[1], [0.0, 1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[2], metrics.softmax(scores[2:].astype(np.float64) - 90)[0], rtol=1e-6)


def test_softmax_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        metrics.softmax(np.zeros(3))
    with pytest.raises(TypeError, match="float"):
        metrics.softmax(np.zeros((2, 3), np.int64))
    with pytest.raises(TypeError, match="ndarray"):
        metrics.softmax([[1.0, 2.0]])


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.1, 0.9), (-1.0, 1.0), (0.025, 0.925)])
def test_one_hot_like_targets_name_their_classes(low, high, rng):
    labels = rng.integers(0, 4, 12)
    t = np.full((12, 4), low)
    t[np.arange(12), labels] = high
    np.testing.assert_array_equal(metrics.class_targets(t), labels)


@pytest.mark.parametrize("targets", [
    np.array([[0.3, 0.7], [0.6, 0.4]]),                 # regression values (2 outputs)
    np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]),       # soft distributions
    np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),       # a row with two largest entries
    np.array([[1.0], [0.0]]),                           # one output: no classes to choose among
    np.array([[0, 1], [1, 0]]),                         # integers: labels are 1-D
    np.array([[0.0, np.nan], [1.0, 0.0]]),
])
def test_other_targets_name_no_classes(targets):
    assert metrics.class_targets(targets) is None


def test_accuracy_from_labels_scores_and_one_hot_targets():
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    assert metrics.accuracy(labels, scores) == 0.5
    assert metrics.accuracy(labels, scores.argmax(axis=1)) == 0.5
    assert metrics.accuracy(np.eye(3)[labels], scores) == 0.5
    with pytest.raises(ValueError, match="one-hot-like"):
        metrics.accuracy(np.array([[0.3, 0.7, 0.1]] * 4), scores)
    with pytest.raises(ValueError, match="entries"):
        metrics.accuracy(labels[:3], scores)


def test_confusion_matrix_counts():
    true = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 0, 2])
    counts = metrics.confusion_matrix(true, pred)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert counts.dtype == np.int64
    assert metrics.confusion_matrix(true, pred, num_classes=4).shape == (4, 4)
    np.testing.assert_array_equal(metrics.confusion_matrix(true, np.eye(3)[pred] * 5.0), counts)
    with pytest.raises(ValueError, match="y_pred must be in"):
        metrics.confusion_matrix(true, pred, num_classes=2)
    text = metrics.format_confusion_matrix(counts, ["cat", "dog", "bird"])
    assert text.splitlines()[2].split() == ["cat", "1", "1", "0"]


def test_predict_proba_is_the_softmax_of_predict(rng):
    convengine.manual_seed(0)
    model = convengine.Sequential([L.Conv2d(1, 3, 3), L.ReLU(), L.Flatten(), L.Linear(12, 4)])
    x = rng.standard_normal((9, 1, 4, 4)).astype(np.float32) * 50
    p = model.predict_proba(x, batch_size=4)
    scores = model.predict(x).astype(np.float64)
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert p.dtype == np.float32 and p.shape == (9, 4)
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(p.argmax(axis=1), scores.argmax(axis=1))
    with_softmax = convengine.Sequential(model.layers + [L.Softmax()])
    np.testing.assert_allclose(with_softmax.predict_proba(x), p, rtol=1e-6, atol=1e-7)
    conv_only = convengine.Sequential([L.Conv2d(1, 2, 3)])
    with pytest.raises(ValueError, match="outputs"):
        conv_only.predict_proba(x)
