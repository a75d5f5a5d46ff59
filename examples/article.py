"""The beginner's CNN article, step by step, with convengine: a curve-detector filter built by hand, its response
to an image with a matching curve and to one without, then a small CNN trained on handwritten digits and pictures
of what it learned (its first layer's filters, the feature maps of one digit, its learning curves, the input
region one unit sees).

    python examples/article.py [--out FOLDER] [--epochs N]

Needs matplotlib for the pictures (pip install 'convengine[plot]'); the curve detector needs only NumPy.
"""
import argparse
import os

import numpy as np

import convengine
from convengine import functional as F

# Where the 7x7 curve lies, (row, column): a rounded stroke like the back of the mouse in the article's drawing.
CURVE = [(1, 5), (1, 6), (2, 4), (3, 3), (4, 2), (5, 2), (6, 1)]


def curve_detector():
    """The article's filter: 30 along the curve, 0 elsewhere, as an (out=1, in=1, 7, 7) weight."""
    w = np.zeros((1, 1, 7, 7), np.float32)
    for r, c in CURVE:
        w[0, 0, r, c] = 30
    return w


def drawing(with_curve):
    """A 32 x 32 black image (0) with strokes of brightness 50 at rows 10..16, columns 12..18: the filter's curve
    (one of its pixels fainter, 20), or for the image without it a corner of two straight strokes."""
    image = np.zeros((32, 32), np.float32)
    if with_curve:
        for r, c in CURVE:
            image[10 + r, 12 + c] = 50
        image[10 + 4, 12 + 2] = 20
    else:
        image[10, 12:19] = 50  # a straight top edge ...
        image[10:17, 12] = 50  # ... and a straight left edge
    return image


def curve_demo():
    w = curve_detector()
    print("The curve detector (7x7, 30 along the curve):")
    print(w[0, 0].astype(int))
    for with_curve in (True, False):
        image = drawing(with_curve)
        response = F.conv2d(image[None, None], w)[0, 0]  # (32 - 7 + 1) = 26 x 26 feature map
        here = float(response[10, 12])  # the window over rows 10..16, columns 12..18
        products = image[10:17, 12:19][w[0, 0] != 0]
        terms = " + ".join(f"{p:g} x 30" for p in products)
        name = "with the curve" if with_curve else "without it"
        peak = tuple(int(i) for i in np.unravel_index(response.argmax(), response.shape))
        print(f"\nImage {name}: the window at rows 10..16, columns 12..18 sums {terms} = {here:g}")
        print(f"  largest response anywhere: {response.max():g}, at window {peak}")
    print("\nA large number where the image has the filter's curve, zero where it has not: the feature map marks"
          " where the curve is (strokes that follow part of it give values in between).")


def train_digits(epochs):
    from convengine.data import load_digits
    from convengine.losses import CrossEntropyLoss
    from convengine.model import lenet
    from convengine.optim import SGD

    convengine.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load_digits()
    model = lenet((1, 8, 8))
    print(f"\nTraining a LeNet-style CNN on {len(x_train)} 8x8 digits:\n{model.summary()}")
    trainer = convengine.Trainer(model, CrossEntropyLoss(),
                                 SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    history = trainer.fit(x_train, y_train, epochs=epochs, batch_size=32, validation_data=(x_test, y_test),
                          seed=0, verbose=2)
    print(f"test accuracy: {100 * trainer.evaluate(x_test, y_test)['accuracy']:.2f}%")
    return model, history, x_test


def draw(model, history, x_test, out):
    from convengine import plot

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in
             ("digits_filters.png", "digits_maps.png", "digits_curves.png", "digits_field.png")}
    plot.filters(model, path=paths["digits_filters.png"])
    plot.feature_maps(model, x_test[0], layer=2, path=paths["digits_maps.png"])  # after Conv -> BatchNorm -> ReLU
    plot.history(history, path=paths["digits_curves.png"], title="lenet on the digits")
    plot.receptive_field(model, 7, (1, 1), image=x_test[0], path=paths["digits_field.png"])
    for path in paths.values():
        print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="article_figures", help="folder for the pictures")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the digits net")
    args = parser.parse_args()
    curve_demo()
    model, history, x_test = train_digits(args.epochs)
    draw(model, history, x_test, args.out)


if __name__ == "__main__":
    main()
