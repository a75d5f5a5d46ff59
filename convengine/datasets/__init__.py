"""Data files shipped inside the package, so the default training run needs no download and no optional extra.

digits.npz
    The 1,797 8x8 grey-level images of handwritten digits (values 0..16) with their labels 0..9: the test part
    of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998), as shipped by
    scikit-learn in `sklearn/datasets/data/digits.csv.gz` (scikit-learn is BSD-3-Clause licensed). Converted
    unchanged to uint8 arrays `images` (1797, 8, 8) and `labels` (1797,), compressed with numpy.savez_compressed.
    `convengine.data.load_digits()` reads it.
"""
import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def path(name):
    """Absolute path of a data file shipped in this package."""
    return os.path.join(DIRECTORY, name)
