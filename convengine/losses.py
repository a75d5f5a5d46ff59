"""Losses: called as loss(pred, target) -> float; loss.backward() then returns d loss / d pred for the model.

Targets are integer class labels of shape (N,), or, for either loss, an array shaped like pred (one-hot or soft
labels). With reduction='mean' the loss is averaged over the batch (not over classes), so the learning rate does
not depend on the batch size.
"""
import numpy as np

from . import _args

__all__ = ["Loss", "MSELoss", "CrossEntropyLoss"]

_REDUCTIONS = ("mean", "sum")


class Loss:
    def __init__(self, reduction="mean"):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._grad = None

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def backward(self):
        """d loss / d pred of the last call."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a call loss(pred, target) first")
        return self._grad

    def _targets(self, pred, target):
        """pred checked as (N, K) floats; target as a float array of pred's shape and dtype."""
        _args.check_array(pred, "pred", 2)
        n, k = pred.shape
        if not isinstance(target, np.ndarray):
            raise TypeError(f"target must be a numpy.ndarray, got {type(target).__name__}")
        if target.ndim == 1:
            labels = _args.check_labels(target, n, k, "target")
            one_hot = np.zeros_like(pred)
            one_hot[np.arange(n), labels] = 1
            return one_hot, labels
        if target.shape != pred.shape:
            raise ValueError(f"target must be labels of shape ({n},) or an array of pred's shape {pred.shape}, "
                             f"got shape {target.shape}")
        if not np.issubdtype(target.dtype, np.floating):
            raise TypeError(f"a target shaped like pred must be float, got dtype {target.dtype}")
        return target.astype(pred.dtype, copy=False), None

    def _scale(self, n):
        return 1.0 / n if self.reduction == "mean" and n > 0 else 1.0

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class MSELoss(Loss):
    """The article's squared error E = sum 1/2 (target - output)^2 over the classes of each sample (integer labels
    become one-hot targets), then averaged over the batch. Unlike torch.nn.MSELoss it keeps the 1/2 and does not
    average over the classes."""

    def forward(self, pred, target):
        t, _ = self._targets(pred, target)
        diff = pred - t
        scale = self._scale(pred.shape[0])
        self._grad = diff * pred.dtype.type(scale)
        return float(0.5 * np.sum(diff * diff, dtype=np.float64) * scale)


class CrossEntropyLoss(Loss):
    """Cross-entropy of softmax(pred) against the target, from raw scores (logits). The log-softmax subtracts each
    row's maximum first, so large logits neither overflow nor lose the small probabilities."""

    def forward(self, pred, target):
        t, labels = self._targets(pred, target)
        n = pred.shape[0]
        scale = self._scale(n)
        if n == 0:
            self._grad = np.zeros_like(pred)
            return 0.0
        shifted = pred - pred.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        sum_e = e.sum(axis=1, keepdims=True)
        log_p = shifted - np.log(sum_e)
        if labels is not None:
            total = -np.sum(log_p[np.arange(n), labels], dtype=np.float64)
        else:
            total = -np.sum(t * log_p, dtype=np.float64)
        # d/dz of -sum t log softmax(z) is softmax(z) * sum(t) - t; sum(t) is 1 for labels and one-hot targets.
        self._grad = (e / sum_e * t.sum(axis=1, keepdims=True) - t) * pred.dtype.type(scale)
        return float(total * scale)
