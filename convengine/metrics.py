"""Metrics for classifiers: softmax probabilities, accuracy, the confusion matrix, and the rule that says when a
target array holds classes at all.

Targets come in two forms. Integer class labels of shape (N,) are classes. An array shaped like the model output,
(N, K), holds classes when it is one-hot-like (see `class_targets`): the array takes exactly two values and every
row holds the larger one once, as one-hot vectors, the article's target vectors ([0, 0, 1, 0], or 0.1 / 0.9 for
sigmoid outputs), label-smoothed vectors and -1 / +1 codes do; the class of a row is the position of that entry.
Other targets (regression values, soft distributions) hold no classes, and accuracy means nothing for them.
"""
import numpy as np

from ._args import check_int, check_labels

__all__ = ["softmax", "class_targets", "accuracy", "confusion_matrix", "format_confusion_matrix"]


def _scores(scores, name="scores"):
    if not isinstance(scores, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, classes), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise TypeError(f"{name} must be float32 or float64, got dtype {scores.dtype}")
    return scores


def softmax(scores):
    """Row-wise softmax of (N, K) scores, in the scores' dtype: each row's maximum is subtracted before exp, so large
    scores neither overflow nor underflow to a row of zeros. Rows sum to 1."""
    scores = _scores(scores)
    shifted = scores - scores.max(axis=1, keepdims=True) if scores.shape[1] else scores.copy()
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def class_targets(targets):
    """The class index of each row of a one-hot-like (N, K) target array, or None when it is not one-hot-like.

    One-hot-like: K >= 2, the whole array holds exactly two distinct values, and every row holds the larger one
    exactly once (0/1, the article's 0.1/0.9, -1/+1, label smoothing). Such rows name a class without doubt; any
    other targets (regression values, soft distributions, ties) do not, and then accuracy is not reported."""
    if not isinstance(targets, np.ndarray) or targets.ndim != 2 or targets.shape[1] < 2:
        return None
    if not np.issubdtype(targets.dtype, np.floating) or targets.shape[0] == 0:
        return None
    values = np.unique(targets)
    if values.shape[0] != 2 or not np.all(np.isfinite(values)):
        return None
    high = targets == values[1]
    if not np.all(np.count_nonzero(high, axis=1) == 1):
        return None
    return high.argmax(axis=1).astype(np.intp)


def _true_classes(y_true, n=None, num_classes=None):
    if isinstance(y_true, np.ndarray) and y_true.ndim == 2:
        classes = class_targets(y_true)
        if classes is None:
            raise ValueError(f"y_true of shape {y_true.shape} is not one-hot-like (two values in all, the larger "
                             f"once per row), so it names no classes")
        if n is not None and classes.shape[0] != n:
            raise ValueError(f"y_true has {classes.shape[0]} rows but there are {n} predictions")
        return classes
    return check_labels(y_true, n, num_classes, "y_true")


def _predicted_classes(y_pred, num_classes=None):
    """Class indices from labels (N,) or scores (N, K) (argmax)."""
    if isinstance(y_pred, np.ndarray) and y_pred.ndim == 2:
        _scores(y_pred, "y_pred")
        if num_classes is not None and y_pred.shape[1] != num_classes:
            raise ValueError(f"y_pred has {y_pred.shape[1]} columns but there are {num_classes} classes")
        return y_pred.argmax(axis=1).astype(np.intp)
    return check_labels(y_pred, None, num_classes, "y_pred")


def accuracy(y_true, y_pred):
    """The fraction of samples whose predicted class is the true one. y_true: integer labels (N,) or one-hot-like
    targets (N, K); y_pred: integer labels (N,) or scores / probabilities (N, K), whose argmax is the prediction.
    NaN for no samples."""
    pred = _predicted_classes(y_pred)
    true = _true_classes(y_true, pred.shape[0])
    return float(np.mean(pred == true)) if pred.shape[0] else float("nan")


def confusion_matrix(y_true, y_pred, num_classes=None):
    """counts[i, j]: samples of class i predicted as class j, int64 of shape (num_classes, num_classes).
    y_true and y_pred as for `accuracy`; num_classes defaults to the score columns or the largest label + 1."""
    if num_classes is None and isinstance(y_pred, np.ndarray) and y_pred.ndim == 2:
        num_classes = y_pred.shape[1]
    if num_classes is None and isinstance(y_true, np.ndarray) and y_true.ndim == 2:
        num_classes = y_true.shape[1]
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", 1)
    pred = _predicted_classes(y_pred, num_classes)
    true = _true_classes(y_true, pred.shape[0], num_classes)
    if num_classes is None:
        num_classes = int(max(true.max(initial=-1), pred.max(initial=-1))) + 1
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true, pred), 1)
    return counts


def format_confusion_matrix(counts, names=None):
    """The matrix as text: one row per true class, one column per predicted class, headed by the class names."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square matrix, got shape {counts.shape}")
    names = [str(i) for i in range(counts.shape[0])] if names is None else [str(n) for n in names]
    if len(names) != counts.shape[0]:
        raise ValueError(f"names has {len(names)} entries for {counts.shape[0]} classes")
    width = max(5, len(str(int(counts.max(initial=0)))) + 1)
    short = [n[:width - 1] for n in names]
    label_w = max((len(n) for n in names), default=0)
    lines = ["rows: true class, columns: predicted class",
             " " * (label_w + 1) + "".join(s.rjust(width) for s in short)]
    for name, row in zip(names, counts):
        lines.append(name.rjust(label_w) + " " + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)
