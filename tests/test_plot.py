"""convengine.plot and `convengine show`: every figure rendered to PNG (with and without a display), the numbers
each one draws (weights, activations, curves, receptive fields) checked against values computed here
independently, and the errors (a layer that is not a conv, an image of the wrong shape, matplotlib missing)."""
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convengine
from convengine import plot, reference
from convengine.__main__ import build_parser, main
from convengine.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU)
from convengine.model import lenet

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(convengine.__file__)))


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def figure_pixels(fig):
    w, h = fig.get_size_inches() * plot.DPI
    return round(w), round(h)


def assert_png_of(fig, path):
    assert os.path.getsize(path) > 1000
    assert png_size(path) == figure_pixels(fig)


def axes_labelled(fig, label):
    found = [ax for ax in fig.axes if ax.get_label() == label]
    assert len(found) == 1, f"{len(found)} axes labelled {label!r} in {[ax.get_label() for ax in fig.axes]}"
    return found[0]


def cells(image, n, kh, kw, gap=1):
    """The n cells of a filter mosaic, read back row by row (the layout is found from the image's width)."""
    cols = (image.shape[1] + gap) // (kw + gap)
    assert cols * (kw + gap) - gap == image.shape[1]
    out = []
    for k in range(n):
        r, c = divmod(k, cols)
        out.append(image[r * (kh + gap):r * (kh + gap) + kh, c * (kw + gap):c * (kw + gap) + kw])
    return np.array(out)


@pytest.fixture(scope="module")
def mpl():
    return pytest.importorskip("matplotlib")


def small_model(cin=1, seed=0):
    convengine.manual_seed(seed)
    return convengine.Sequential([Conv2d(cin, 6, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(6, 4, 3),
                                  BatchNorm2d(4), ReLU(), Flatten(), Linear(4 * 2 * 2, 3)], input_shape=(cin, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------------------------

def test_filters_grid_holds_the_first_layers_weights(mpl, tmp_path):
    model = small_model()
    w = model[0].weight.data
    fig = plot.filters(model, path=tmp_path / "f.png")
    assert_png_of(fig, tmp_path / "f.png")
    shown = axes_labelled(fig, "filters").images[0]
    image = np.ma.filled(shown.get_array().astype(np.float64), np.nan)
    np.testing.assert_array_equal(cells(image, 6, 3, 3), w[:, 0].astype(np.float64))
    assert np.isnan(image).sum() == image.size - w.size  # everything else is the gap between cells
    m = float(np.abs(w).max())
    assert shown.get_clim() == pytest.approx((-m, m))  # one symmetric scale for the whole grid
    assert len(fig.axes) == 2 and "weight" in fig.axes[1].get_ylabel()  # and a colour bar saying so


def test_filters_of_three_channels_are_rgb_on_one_stated_scale(mpl, tmp_path):
    convengine.manual_seed(1)
    model = convengine.Sequential([Conv2d(3, 5, 5)], input_shape=(3, 32, 32))
    w = model[0].weight.data.astype(np.float64)
    fig = plot.filters(model, path=tmp_path / "rgb.png")
    assert_png_of(fig, tmp_path / "rgb.png")
    ax = axes_labelled(fig, "filters")
    image = np.asarray(ax.images[0].get_array())
    assert image.ndim == 3 and image.shape[2] == 4
    m = np.abs(w).max()
    expected = 0.5 + w.transpose(0, 2, 3, 1) / (2 * m)
    got = cells(image, 5, 5, 5)
    np.testing.assert_allclose(got[..., :3], expected, rtol=1e-12)
    assert (got[..., 3] == 1).all() and image[..., 3].sum() == 5 * 25  # gaps transparent
    assert f"{m:.3g}" in ax.get_xlabel() and "grey = 0" in ax.get_xlabel()


def test_filters_of_a_later_layer_show_every_channel_pair(mpl, tmp_path):
    model = small_model()
    w = model[3].weight.data  # 4 x 6 x 3 x 3
    fig = plot.filters(model, layer=3, path=tmp_path / "f3.png")
    assert_png_of(fig, tmp_path / "f3.png")
    image = np.ma.filled(axes_labelled(fig, "filters").images[0].get_array().astype(np.float64), np.nan)
    assert image.shape == (4 * 4 - 1, 6 * 4 - 1)  # row k: output channel k, one cell per input channel
    np.testing.assert_array_equal(cells(image, 24, 3, 3), w.reshape(24, 3, 3).astype(np.float64))


def test_filters_refuse_a_layer_that_is_not_a_conv(mpl):
    model = small_model()
    with pytest.raises(ValueError, match=r"layer 1 is ReLU, not a Conv2d \(the conv layers are 0, 3\)"):
        plot.filters(model, layer=1)
    with pytest.raises(ValueError, match="out of range"):
        plot.filters(model, layer=8)
    with pytest.raises(TypeError, match="layer must be an int"):
        plot.filters(model, layer="0")
    with pytest.raises(ValueError, match="no Conv2d layer"):
        plot.filters(convengine.Sequential([Flatten(), Linear(4, 2)]))
    with pytest.raises(TypeError, match="model must be"):
        plot.filters(np.zeros(3))
    with pytest.raises(TypeError, match="path must be"):
        plot.filters(model, path=3)


# ---------------------------------------------------------------------------------------------------------------
# feature maps
# ---------------------------------------------------------------------------------------------------------------

def conv_reference(layer, x):
    return reference.conv2d(x, layer.weight.data, layer.bias.data, stride=layer.stride, padding=layer.padding)


def shown_maps(fig, n):
    return np.array([np.asarray(axes_labelled(fig, f"map {k}").images[0].get_array()) for k in range(n)])


def test_feature_maps_are_the_models_activations(mpl, tmp_path):
    model = small_model()
    image = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    fig = plot.feature_maps(model, image, path=tmp_path / "m.png")  # after the first conv by default
    assert_png_of(fig, tmp_path / "m.png")
    conv = conv_reference(model[0], image[None])[0]
    np.testing.assert_allclose(shown_maps(fig, 6), conv, rtol=1e-5, atol=1e-5)
    values = np.concatenate([ax.images[0].get_clim() for ax in fig.axes if ax.get_label().startswith("map")])
    m = np.abs(conv).max()
    assert np.allclose(values, np.tile([-m, m], 6), rtol=1e-6)  # signed maps: one symmetric scale for all
    np.testing.assert_array_equal(np.asarray(axes_labelled(fig, "input").images[0].get_array()), image[0])

    fig = plot.feature_maps(model, image, layer=2)  # after Conv -> ReLU -> MaxPool
    pooled = reference.max_pool2d(reference.relu(conv[None]), 2)[0]
    np.testing.assert_allclose(shown_maps(fig, 6), pooled, rtol=1e-5, atol=1e-5)
    assert axes_labelled(fig, "map 0").images[0].get_clim() == pytest.approx((0, pooled.max()))
    assert len([ax for ax in fig.axes if ax.get_label().startswith("map")]) == 6


def test_feature_maps_take_the_image_in_every_stated_layout(mpl):
    convengine.manual_seed(2)
    model = convengine.Sequential([Conv2d(3, 2, 3)], input_shape=(3, 6, 5))
    chw = np.random.default_rng(1).random((3, 6, 5)).astype(np.float32)
    expected = conv_reference(model[0], chw[None])[0]
    for image in (chw, chw[None], chw.transpose(1, 2, 0), (chw * 255).astype(np.float64) / 255):
        np.testing.assert_allclose(shown_maps(plot.feature_maps(model, image), 2), expected, rtol=1e-5, atol=1e-6)
    gray = lenet((1, 8, 8))
    plot.feature_maps(gray, np.zeros((8, 8), np.uint8))  # (H, W) for one channel, any number type


def test_feature_maps_refuse_a_wrong_image_or_layer(mpl):
    model = small_model()
    for bad in (np.zeros((2, 8, 8)), np.zeros((1, 8, 9)), np.zeros((2, 1, 8, 8)), np.zeros(8)):
        with pytest.raises(ValueError, match=r"image .*shape"):
            plot.feature_maps(model, bad)
    with pytest.raises(TypeError, match="image must be a numpy.ndarray"):
        plot.feature_maps(model, [[0.0] * 8] * 8)
    with pytest.raises(TypeError, match="image must hold numbers"):
        plot.feature_maps(model, np.zeros((1, 8, 8), dtype=object))
    with pytest.raises(ValueError, match=r"layer 6 \(Flatten\) outputs shape \(16,\), not feature maps"):
        plot.feature_maps(model, np.zeros((1, 8, 8)), layer=6)
    free = convengine.Sequential([Conv2d(1, 2, 3)])  # input shape unknown: the channels are still checked
    with pytest.raises(ValueError, match="takes 1 channels"):
        plot.feature_maps(free, np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="does not fit layer 0"):
        plot.feature_maps(free, np.zeros((1, 2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------------------------

def test_history_draws_every_recorded_curve(mpl, tmp_path):
    convengine.manual_seed(0)
    model = convengine.Sequential([Flatten(), Linear(64, 10)])
    (x, y), (xt, yt) = convengine.data.load_digits()
    trainer = convengine.Trainer(model, convengine.losses.CrossEntropyLoss(),
                                 convengine.optim.SGD(model.parameters(), lr=0.1))
    history = trainer.fit(x[:200], y[:200], epochs=3, batch_size=50, validation_data=(xt[:50], yt[:50]),
                          verbose=0)
    fig = plot.history(history, path=tmp_path / "h.png", title="digits")
    assert png_size(tmp_path / "h.png") == (1000, 400)
    for key in ("loss", "accuracy"):
        train, val = axes_labelled(fig, key).get_lines()
        assert train.get_label() == "training" and val.get_label() == "validation"
        np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3])
        np.testing.assert_array_equal(train.get_ydata(), history[key])
        np.testing.assert_array_equal(val.get_ydata(), history["val_" + key])

    fig = plot.history({"loss": [3.0, 2.0]}, path=tmp_path / "loss.png")  # a dict; loss alone: one panel
    assert png_size(tmp_path / "loss.png") == (500, 400)
    (line,) = axes_labelled(fig, "loss").get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [3.0, 2.0])


def test_history_refuses_what_is_not_a_history(mpl):
    with pytest.raises(ValueError, match="no epochs"):
        plot.history({"loss": []})
    with pytest.raises(ValueError, match="has no 'loss'"):
        plot.history({"accuracy": [0.5]})
    with pytest.raises(ValueError, match=r"history\['val_loss'\] has 1 values for 2 epochs"):
        plot.history({"loss": [1.0, 0.5], "val_loss": [1.0]})
    with pytest.raises(TypeError, match="history must be"):
        plot.history([1.0, 0.5])


# ---------------------------------------------------------------------------------------------------------------
# receptive field
# ---------------------------------------------------------------------------------------------------------------

def test_receptive_field_of_two_3x3_convs_and_a_pool_is_6x6():
    model = convengine.Sequential([Conv2d(1, 2, 3), ReLU(), Conv2d(2, 2, 3), MaxPool2d(2)], input_shape=(1, 16, 16))
    for y, x in [(0, 0), (2, 3), (5, 5)]:
        region = plot.receptive_field_region(model, 3, (y, x))
        assert region.size == (6, 6)  # 1 + 2 + 2 + 1: each 3x3 adds 2, the 2x2 pool of stride 2 adds 1
        assert (region.rows, region.cols) == (slice(2 * y, 2 * y + 6), slice(2 * x, 2 * x + 6))
    assert plot.receptive_field_region(model, 0, (4, 7)).size == (3, 3)
    assert plot.receptive_field_region(model, 2, (4, 7)).rows == slice(4, 9)


def input_gradient_support(layers, input_shape, layer, position):
    """Pixels (rows, cols) whose value changes unit `position` of layer `layer` (any channel), found by
    back-propagating a one-hot gradient through the layers themselves: positive weights and inputs make every
    path add, so a pixel's gradient is non-zero exactly when the unit depends on it."""
    rng = np.random.default_rng(0)
    for l in layers:
        for p in l.parameters():
            p.data[...] = rng.uniform(0.1, 1.0, p.data.shape)
    x = rng.uniform(0.1, 1.0, (1,) + input_shape)
    for l in layers[:layer + 1]:
        x = l.forward(x, training=True)
    grad = np.zeros_like(x)
    grad[0, :, position[0], position[1]] = 1.0
    for l in reversed(layers[:layer + 1]):
        grad = l.backward(grad)
    nonzero = np.abs(grad[0]).sum(axis=0) != 0
    return nonzero


def stack(name):
    """Layer stacks in float64 (ReLU included; BatchNorm and Dropout, which map each pixel to itself, are left out
    of the gradient check: in training a batch norm couples every pixel of a channel through its mean)."""
    f64 = dict(dtype="float64")
    if name == "3x3/3x3/pool":
        return [Conv2d(1, 2, 3, **f64), ReLU(), Conv2d(2, 2, 3, **f64), AvgPool2d(2)], (1, 14, 14)
    if name == "padded":
        return [Conv2d(1, 2, 3, padding=1, **f64), ReLU(), AvgPool2d(2), Conv2d(2, 3, 5, padding=2, **f64),
                AvgPool2d(3, stride=2, padding=1)], (1, 12, 12)
    if name == "strided 'same'":
        return [Conv2d(1, 2, 4, stride=2, padding="same", **f64),
                Conv2d(2, 2, (3, 1), stride=(1, 3), padding=(2, 0), **f64)], (1, 11, 13)
    assert name == "dilated"
    return [Conv2d(1, 2, 3, dilation=2, padding=1, **f64), AvgPool2d((1, 2)),
            Conv2d(2, 1, 2, dilation=(1, 3), **f64)], (1, 12, 16)


@pytest.mark.parametrize("name", ["3x3/3x3/pool", "padded", "strided 'same'", "dilated"])
def test_receptive_field_is_what_the_gradient_reaches(name):
    layers, input_shape = stack(name)
    model = convengine.Sequential(layers, input_shape=input_shape)
    model.need_input_grad = True
    shapes = [input_shape]
    for l in layers:
        shapes.append(l.output_shape(shapes[-1]))
    checked = holes = 0
    for index in range(len(layers)):
        _, h, w = shapes[index + 1]
        for y, x in sorted({(0, 0), (h - 1, w - 1), (h // 2, w // 3), (0, w - 1)}):
            region = plot.receptive_field_region(model, index, (y, x))
            support = input_gradient_support(layers, input_shape, index, (y, x))
            rows, cols = np.nonzero(support)
            assert (rows.min(), rows.max() + 1) == (region.rows.start, region.rows.stop), (index, y, x)
            assert (cols.min(), cols.max() + 1) == (region.cols.start, region.cols.stop), (index, y, x)
            np.testing.assert_array_equal(region.seen, support, err_msg=str((index, y, x)))
            if name != "dilated":  # without holes the unit sees every pixel of its bounding rectangle
                assert support[region.rows, region.cols].all(), (index, y, x)
            else:
                holes += not support[region.rows, region.cols].all()
            checked += 1
    assert checked >= 2 * len(layers)
    assert holes > 0 if name == "dilated" else holes == 0


def crossing_branches():
    """A graph model: a 3x1 and a 1x3 conv side by side, added (each unit sees a plus sign), a 1x1 conv of the sum
    concatenated to it, then a 2x2 average pool (each unit sees four overlapping plus signs)."""
    from convengine.graph import Add, Concat, Graph, Input
    f64 = dict(dtype="float64")
    x = Input((1, 9, 10))
    h = Add()([Conv2d(1, 2, (3, 1), padding=(1, 0), **f64)(x), Conv2d(1, 2, (1, 3), padding=(0, 1), **f64)(x)])
    h = Concat()([h, Conv2d(2, 2, 1, **f64)(h)])
    return Graph(x, AvgPool2d(2)(h))


@pytest.mark.parametrize("y, x, pixels", [(0, 0, 8), (2, 3, 12), (3, 4, 10)])
def test_receptive_field_of_a_graph_model_follows_every_branch(y, x, pixels):
    model = crossing_branches()
    model.need_input_grad = True
    region = plot.receptive_field_region(model, len(model.layers) - 1, (y, x))
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = rng.uniform(0.1, 1.0, p.data.shape)
    out = model.forward(rng.uniform(0.1, 1.0, (1, 1, 9, 10)), training=True)
    grad = np.zeros_like(out)
    grad[0, :, y, x] = 1.0
    support = np.abs(model.backward(grad)[0]).sum(axis=0) != 0
    np.testing.assert_array_equal(region.seen, support)
    assert region.size == (4, 4) and not support[region.rows, region.cols].all()  # corners of the box unseen
    # four plus signs of 5 pixels fill a 4 x 4 box but its corners (12 pixels); at (0, 0) the box is clipped to
    # 3 x 3 (8), in the last column to 4 x 3 (10)
    assert support.sum() == pixels


def test_feature_maps_and_filters_of_a_graph_model(mpl):
    from convengine.graph import Add
    model = crossing_branches()
    image = np.random.default_rng(4).random((1, 9, 10))
    add = next(i for i, l in enumerate(model.layers) if isinstance(l, Add))
    a, b = (l for l in model.layers[:add] if isinstance(l, Conv2d))
    expected = conv_reference(a, image[None]) + conv_reference(b, image[None])
    np.testing.assert_allclose(shown_maps(plot.feature_maps(model, image, layer=add), 2), expected[0], rtol=1e-12)
    fig = plot.filters(model, layer=1)
    image = np.ma.filled(axes_labelled(fig, "filters").images[0].get_array().astype(np.float64), np.nan)
    assert image.shape == (1, 3 * 2 + 1) and np.array_equal(image[0, 3], np.nan, equal_nan=True)
    np.testing.assert_array_equal(image[0, [0, 1, 2, 4, 5, 6]], model.layers[1].weight.data.ravel())


def test_receptive_field_refuses_what_has_no_position():
    model = small_model()
    with pytest.raises(ValueError, match=r"layer 6 \(Flatten\) outputs shape \(16,\): its units have no position"):
        plot.receptive_field_region(model, 6, (0, 0))
    with pytest.raises(ValueError, match=r"position \(4, 0\) is outside layer 2's output of 4 x 4"):
        plot.receptive_field_region(model, 2, (4, 0))
    with pytest.raises(TypeError, match="position must be a"):
        plot.receptive_field_region(model, 2, (1.0, 0))
    with pytest.raises(ValueError, match="input shape is unknown"):
        plot.receptive_field_region(convengine.Sequential([Conv2d(1, 1, 3)]), 0, (0, 0))


def test_receptive_field_figure_marks_the_region(mpl, tmp_path):
    model = small_model()
    image = np.random.default_rng(3).random((1, 8, 8)).astype(np.float32)
    fig = plot.receptive_field(model, 3, (0, 1), path=tmp_path / "rf.png", image=image)
    assert_png_of(fig, tmp_path / "rf.png")
    region = plot.receptive_field_region(model, 3, (0, 1))
    assert region.size == (8, 8) and region.top == -1  # 3x3 padded conv, 2x2 pool, 3x3 conv: 8 x 8, from -1
    ax = axes_labelled(fig, "receptive field")
    patches = {p.get_label(): p for p in ax.patches}
    box = patches["region"]
    assert (box.get_x(), box.get_y()) == (region.cols.start - 0.5, region.rows.start - 0.5)
    assert (box.get_width(), box.get_height()) == (region.cols.stop - region.cols.start,
                                                   region.rows.stop - region.rows.start)
    extent = patches["extent (padding)"]  # the part in the padding, dashed
    assert (extent.get_x(), extent.get_y(), extent.get_width(), extent.get_height()) == (0.5, -1.5, 8, 8)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), image[0])
    np.testing.assert_array_equal(np.asarray(ax.images[1].get_array())[..., 3] > 0, region.seen)  # the tint
    assert "rows 0..6" in ax.get_title() and "receptive field 8 x 8" in ax.get_title()

    fig = plot.receptive_field(model, 0, (4, 4), path=tmp_path / "blank.png")  # no image: a blank input
    assert_png_of(fig, tmp_path / "blank.png")
    assert {p.get_label() for p in axes_labelled(fig, "receptive field").patches} == {"region"}  # inside the image
    with pytest.raises(ValueError, match="Linear"):
        plot.receptive_field(model, 7, (0, 0))
    with pytest.raises(ValueError, match="pass image"):
        plot.receptive_field(convengine.Sequential([Conv2d(1, 1, 3)]), 0, (0, 0))


# ---------------------------------------------------------------------------------------------------------------
# no display, no matplotlib
# ---------------------------------------------------------------------------------------------------------------

DRAW_ALL = textwrap.dedent("""
    import struct, sys
    import numpy as np
    if sys.argv[2] == "pyplot":
        import matplotlib.pyplot as plt
    import convengine
    from convengine import plot
    from convengine.model import lenet
    out = sys.argv[1]
    convengine.manual_seed(0)
    model = lenet((1, 8, 8))
    image = np.random.default_rng(0).random((1, 8, 8))
    figs = {"filters": plot.filters(model, path=out + "/filters.png"),
            "maps": plot.feature_maps(model, image, path=out + "/maps.png"),
            "history": plot.history({"loss": [1.0, 0.5], "accuracy": [0.5, 0.8]}, path=out + "/history.png"),
            "field": plot.receptive_field(model, 3, (1, 1), image=image, path=out + "/field.png")}
    for name, fig in figs.items():
        w, h = struct.unpack(">II", open(out + "/" + name + ".png", "rb").read()[16:24])
        expected = tuple(round(v * plot.DPI) for v in fig.get_size_inches())
        assert (w, h) == expected, (name, (w, h), expected)
        print(name, w, h)
    if sys.argv[2] == "pyplot":
        print("backend", plt.get_backend())
""")


def run_python(code, *args, env_changes=(), cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MPLBACKEND", None)
    for key, value in env_changes:
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=180, cwd=cwd)


@pytest.mark.parametrize("display", [None, ":99.7", "localhost:4711.0"], ids=["no-DISPLAY", "bogus", "remote"])
@pytest.mark.parametrize("mode", ["standalone", "pyplot"])
def test_every_figure_renders_with_and_without_a_display(mpl, tmp_path, display, mode):
    r = run_python(DRAW_ALL, str(tmp_path), mode, env_changes=[("DISPLAY", display), ("WAYLAND_DISPLAY", None)])
    assert r.returncode == 0, r.stderr
    for name in ("filters", "maps", "history", "field"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "history 1000 400" in r.stdout
    if mode == "pyplot":
        assert "backend agg" in r.stdout.lower()


BLOCK_MATPLOTLIB = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
""")


def test_without_matplotlib_the_functions_say_how_to_install_it(tmp_path):
    code = BLOCK_MATPLOTLIB + textwrap.dedent("""
        import numpy as np
        import convengine
        from convengine import plot
        from convengine.model import lenet
        model = lenet((1, 8, 8))
        print("region", plot.receptive_field_region(model, 3, (0, 0)).size)
        calls = [lambda: plot.filters(model), lambda: plot.feature_maps(model, np.zeros((1, 8, 8))),
                 lambda: plot.history({"loss": [1.0]}), lambda: plot.receptive_field(model, 3, (0, 0))]
        for call in calls:
            try:
                call()
            except ImportError as e:
                print("ImportError:", e)
    """)
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "region (4, 4)" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("ImportError")]
    assert lines == ["ImportError: convengine.plot needs matplotlib, which is not installed: "
                     "pip install 'convengine[plot]'"] * 4


def test_show_without_matplotlib_fails_before_any_work(tmp_path):
    code = BLOCK_MATPLOTLIB + "import sys\nfrom convengine.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    r = run_python(code, "show", "missing.npz", "--filters", "f.png", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == ("convengine show: error: --filters needs matplotlib, which is not installed: "
                                "pip install 'convengine[plot]'")  # not a word about the missing model file
    r = run_python(code, "show", "missing.npz", "--receptive-field", "0,0,0", cwd=tmp_path)
    assert r.returncode == 1 and "missing.npz" in r.stderr  # printing a region needs no matplotlib


# ---------------------------------------------------------------------------------------------------------------
# convengine show
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_model(tmp_path):
    convengine.manual_seed(0)
    model = lenet((1, 8, 8))
    model.save(tmp_path / "model.npz")
    image = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    return model, tmp_path


def test_show_draws_filters_maps_and_field(mpl, saved_model, capsys):
    model, d = saved_model
    status = main(["show", str(d / "model.npz"), "--filters", str(d / "f.png"), "--image", str(d / "image.npy"),
                   "--maps", str(d / "m.png"), "--layer", "2", "--receptive-field", "7,1,0",
                   "--field-plot", str(d / "rf.png")])
    out = capsys.readouterr().out
    assert status == 0
    assert "MaxPool2d" in out and "53,194 parameters" in out  # the layer table
    region = plot.receptive_field_region(model, 7, (1, 0))
    assert (f"layer 7 (MaxPool2d) unit (1, 0) sees input rows {region.rows.start}..{region.rows.stop - 1} and "
            f"columns {region.cols.start}..{region.cols.stop - 1}; its receptive field is 10 x 10 pixels") in out
    image = np.load(d / "image.npy")
    for name, fig in (("f.png", plot.filters(model)), ("m.png", plot.feature_maps(model, image, layer=2)),
                      ("rf.png", plot.receptive_field(model, 7, (1, 0), image=image))):
        assert png_size(d / name) == figure_pixels(fig), name


def test_show_checks_output_paths_before_any_work(mpl, saved_model, capsys):
    _, d = saved_model
    missing = str(d / "missing.npz")  # never opened: every refusal below comes first
    cases = [
        (["--filters", str(d / "no" / "f.png")], f"--filters {d / 'no' / 'f.png'}: the folder {d / 'no'} does not "
                                                 f"exist"),
        (["--filters", str(d)], f"--filters {d}: is a directory"),
        (["--filters", str(d / "f.xyz")], f"--filters {d / 'f.xyz'}: matplotlib cannot write .xyz files"),
        (["--image", "i.npy", "--maps", str(d / "a.png"), "--receptive-field", "0,0,0", "--field-plot",
          str(d / "a.png")], f"--maps and --field-plot both name {d / 'a.png'}"),
        (["--maps", "m.png"], "--maps needs --image NPY"),
        (["--layer", "2"], "--layer chooses the layer that --maps draws"),
        (["--field-plot", "r.png"], "--field-plot needs --receptive-field"),
        (["--image", "i.npy"], "--image is drawn by --maps or --field-plot"),
    ]
    for options, message in cases:
        assert main(["show", missing, *options]) == 1, options
        err = capsys.readouterr().err
        assert err.startswith("convengine show: error: ") and message in err, (options, err)
        assert "missing.npz" not in err
    assert not list(d.glob("*.png"))


def test_show_reports_bad_models_images_and_units(mpl, saved_model, capsys):
    _, d = saved_model
    model = str(d / "model.npz")
    np.save(d / "wrong.npy", np.zeros((3, 8, 8)))
    cases = [(["--image", str(d / "wrong.npy"), "--maps", str(d / "m.png")], "image has shape (3, 8, 8)"),
             (["--image", model, "--maps", str(d / "m.png")], "holds several arrays"),
             (["--image", str(d / "image.npy"), "--maps", str(d / "m.png"), "--layer", "9"],
              "layer 9 (Linear) outputs shape (128,), not feature maps"),
             (["--receptive-field", "3,4,0"], "position (4, 0) is outside layer 3's output of 4 x 4"),
             (["--receptive-field", "8,0,0"], "its units have no position"),
             ([], None)]
    for options, message in cases:
        status = main(["show", model, *options])
        captured = capsys.readouterr()
        if message is None:
            assert status == 0 and "Conv2d" in captured.out
            continue
        assert status == 1 and message in captured.err, (options, captured.err)
    with pytest.raises(SystemExit) as info:
        main(["show", model, "--receptive-field", "3,4"])
    assert info.value.code == 2
    assert "expected LAYER,Y,X" in capsys.readouterr().err


def test_show_help_lists_every_option(capsys):
    sub = build_parser()._subparsers._group_actions[0].choices["show"]
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text


# ---------------------------------------------------------------------------------------------------------------
# the example that walks the article
# ---------------------------------------------------------------------------------------------------------------

def test_article_example_prints_the_responses_and_saves_the_pictures(mpl, tmp_path):
    script = os.path.join(PACKAGE_ROOT, "examples", "article.py")
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out"), "--epochs", "1"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # 6 pixels of 50 and one of 20 under the 30s of the filter; nothing under them in the other image
    assert "50 x 30 + 50 x 30 + 50 x 30 + 50 x 30 + 20 x 30 + 50 x 30 + 50 x 30 = 9600" in r.stdout
    assert " = 0\n" in r.stdout and "largest response anywhere: 9600, at window (10, 12)" in r.stdout
    assert "epoch 1/1" in r.stdout and "test accuracy" in r.stdout
    for name in ("digits_filters", "digits_maps", "digits_curves", "digits_field"):
        assert png_size(tmp_path / "out" / f"{name}.png")[0] > 300
