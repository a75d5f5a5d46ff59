"""Data augmentation for image batches in the trainer's data path: `Trainer.fit(..., augment=...)`.

Each transform is called as transform(x, rng) on an NCHW batch and returns a new batch of the same shape and dtype;
rng is a numpy Generator, which Trainer.fit seeds from (seed, epoch), so an augmented run repeats bitwise and a run
resumed from a checkpoint sees the same augmented batches. The input batch is never modified.

    from convengine.augment import Compose, RandomCrop, RandomFlip
    trainer.fit(x, y, epochs=10, batch_size=64, seed=0, augment=Compose([RandomCrop(4), RandomFlip()]))
"""
import numpy as np

from . import _args

__all__ = ["RandomCrop", "RandomFlip", "Compose"]


def _check_batch(x, who):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{who} needs x as a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{who} needs an NCHW batch (N, C, H, W), got shape {x.shape}")


def _check_rng(rng, who):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{who} needs rng as a numpy.random.Generator, got {type(rng).__name__}")


class RandomCrop:
    """Pad each image by `padding` pixels of `fill` on every side, then cut out a window of the original size at a
    random offset, drawn per image (as in the usual CIFAR-10 recipe: padding 4 on 32x32 images)."""

    def __init__(self, padding, fill=0.0):
        self.padding = _args.check_int(padding, "padding", 0)
        if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, (int, float, np.integer, np.floating)):
            raise TypeError(f"fill must be a number, got {fill!r}")
        self.fill = float(fill)

    def __call__(self, x, rng):
        _check_batch(x, "RandomCrop")
        _check_rng(rng, "RandomCrop")
        n, c, h, w = x.shape
        p = self.padding
        if p == 0 or n == 0:
            return x.copy()
        padded = np.full((n, c, h + 2 * p, w + 2 * p), self.fill, dtype=x.dtype)
        padded[:, :, p:p + h, p:p + w] = x
        top = rng.integers(0, 2 * p + 1, size=n)
        left = rng.integers(0, 2 * p + 1, size=n)
        rows = top[:, None] + np.arange(h)
        cols = left[:, None] + np.arange(w)
        return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]

    def __repr__(self):
        return f"RandomCrop(padding={self.padding}, fill={self.fill:g})"


class RandomFlip:
    """Mirror each image left to right with probability p, drawn per image."""

    def __init__(self, p=0.5):
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"p must be a number in [0, 1], got {p!r}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x, rng):
        _check_batch(x, "RandomFlip")
        _check_rng(rng, "RandomFlip")
        out = x.copy()
        flip = rng.random(x.shape[0]) < self.p
        out[flip] = x[flip][..., ::-1]
        return out

    def __repr__(self):
        return f"RandomFlip(p={self.p:g})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"transforms must be callable as t(x, rng), got {t!r}")

    def __call__(self, x, rng):
        for t in self.transforms:
            x = t(x, rng)
        return x

    def __repr__(self):
        return f"Compose([{', '.join(map(repr, self.transforms))}])"
