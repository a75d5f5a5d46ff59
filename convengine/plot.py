"""Pictures of what a network learned, drawn as the CNN primers draw them: the filters of a conv layer, the
feature maps one image produces, the loss and accuracy per epoch, and the input region one unit sees.

Every drawing function returns a matplotlib Figure and, given `path`, also writes it there (a PNG, unless the
path's suffix names another format matplotlib writes). matplotlib is an optional dependency
(`pip install 'convengine[plot]'`); this module imports without it and each drawing function raises ImportError
saying so. `receptive_field_region` is arithmetic on the layers' geometry and needs no matplotlib. Models are
Sequential or graph models; a layer is named by its index in model.layers (as model.summary() numbers them).

The figures need no display: unless the program already uses `matplotlib.pyplot`, they are made without it (a
standalone Figure, rendered by Agg), so they open no window and never touch a GUI backend, whatever $DISPLAY says;
in Jupyter a returned figure shows itself. A program that has imported pyplot gets pyplot figures, which
`plt.show()` shows (pyplot itself falls back to Agg where there is no usable display).
"""
import math
import os
import sys
from typing import NamedTuple

import numpy as np

__all__ = ["filters", "feature_maps", "history", "receptive_field", "receptive_field_region", "Region", "DPI"]

DPI = 100  # pixels per inch of every figure and PNG: a figure of w x h inches is a PNG of 100w x 100h pixels
_INSTALL = "pip install 'convengine[plot]'"


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"convengine.plot needs matplotlib, which is not installed: {_INSTALL}") from None
    return matplotlib


def _figure(width, height):
    """A figure of width x height inches: pyplot's when the program uses pyplot, else a standalone one."""
    _matplotlib()
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        return plt.figure(figsize=(width, height), dpi=DPI)
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI)


def _check_path(path):
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _finish(fig, path):
    if path is not None:
        # Exactly the path given: without a suffix matplotlib would add ".png" to the name.
        fig.savefig(path, dpi=DPI, format=None if os.path.splitext(os.fspath(path))[1] else "png")
    return fig


def _model_layers(model):
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"model must be a convengine.Sequential or a convengine.graph.Graph, got "
                        f"{type(model).__name__}")
    return layers


def _wiring(model, layers):
    """Per layer the indices of the tensors it reads (-1: the model input): a graph model's own wiring, else each
    layer reading the one before."""
    wiring = getattr(model, "inputs", None)
    if wiring is None:
        return [[i - 1] for i in range(len(layers))]
    return [list(srcs) for srcs in wiring]


def _is_merge(layer, srcs):
    from .graph import _Merge
    return isinstance(layer, _Merge) or len(srcs) > 1


def _ancestors(wiring, index):
    """The layers whose outputs layer `index` depends on, itself included, in index (topological) order."""
    needed, stack = set(), [index]
    while stack:
        i = stack.pop()
        if i >= 0 and i not in needed:
            needed.add(i)
            stack.extend(wiring[i])
    return sorted(needed)


def _tensor_shapes(layers, wiring, input_shape, index):
    """{tensor index: one sample's shape} for the model input (-1) and every layer that layer `index` depends on."""
    shapes = {-1: tuple(input_shape)}
    for i in _ancestors(wiring, index):
        ins = [shapes[j] for j in wiring[i]]
        try:
            shapes[i] = tuple(layers[i].output_shape(ins if _is_merge(layers[i], wiring[i]) else ins[0]))
        except ValueError as e:
            raise ValueError(f"an image of shape {tuple(input_shape)} does not fit layer {i} "
                             f"({type(layers[i]).__name__}): {e}") from None
    return shapes


def _layer_index(layers, layer):
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int (an index into model.layers), got {layer!r}")
    index = int(layer)
    if not -len(layers) <= index < len(layers):
        raise ValueError(f"layer {index} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    return index % len(layers)


def _conv_indices(layers):
    from .layers import Conv2d
    return [i for i, l in enumerate(layers) if isinstance(l, Conv2d)]


def _conv_layer(layers, layer):
    """The index of a Conv2d: `layer`, or the first one when None."""
    convs = _conv_indices(layers)
    if layer is None:
        if not convs:
            raise ValueError("the model has no Conv2d layer: " + _layer_list(layers))
        return convs[0]
    index = _layer_index(layers, layer)
    if index not in convs:
        where = f"the conv layers are {', '.join(map(str, convs))}" if convs else "the model has none"
        raise ValueError(f"layer {index} is {type(layers[index]).__name__}, not a Conv2d ({where})")
    return index


def _layer_list(layers):
    return "layers " + ", ".join(f"{i} {type(l).__name__}" for i, l in enumerate(layers))


def _grid_shape(n):
    """(rows, cols) for n cells: the fewest empty cells, then the squarest, with at least as many columns as
    rows (32 -> 4 x 8, 6 -> 2 x 3, 64 -> 8 x 8)."""
    low = max(1, math.ceil(math.sqrt(n)))
    best = None
    for cols in range(low, min(n, 2 * low) + 1):
        rows = math.ceil(n / cols)
        key = (rows * cols - n, cols - rows)
        if best is None or key < best[0]:
            best = (key, rows, cols)
    return best[1], best[2]


def _mosaic(cells, rows, cols, gap=1):
    """Cells (n, h, w[, c]) laid out row by row with `gap` pixels of NaN between them."""
    n, h, w = cells.shape[:3]
    extra = cells.shape[3:]
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap) + extra, np.nan)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = cells[k]
    return out


def _symmetric_limit(values):
    m = float(np.max(np.abs(values))) if values.size else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def filters(model, layer=None, path=None):
    """The kernels of conv layer `layer` (an index into model.layers; the first Conv2d when None) as a grid of
    small images, one colour scale for the whole grid, stated on the figure.

    With 3 input channels (per group) each filter is one RGB image: every channel maps a weight w to
    0.5 + w / (2 m), m the largest |weight| of the layer, so grey is 0. With 1 input channel each filter is one
    image in a diverging colour map from -m (blue) to +m (red), with a colour bar. With any other count, row k
    holds output channel k's kernels, one per input channel, in that colour map. The grid is one image: cell k
    (row by row, 1 pixel of background between cells) holds filter k."""
    path = _check_path(path)
    layers = _model_layers(model)
    index = _conv_layer(layers, layer)
    _matplotlib()
    conv = layers[index]
    w = np.asarray(conv.weight.data, dtype=np.float64)
    k, cg, kh, kw = w.shape
    m = _symmetric_limit(w)
    if cg == 3:
        rows, cols = _grid_shape(k)
        rgb = 0.5 + w.transpose(0, 2, 3, 1) / (2 * m)
        cells = np.concatenate([rgb, np.ones((k, kh, kw, 1))], axis=3)
        image = np.nan_to_num(_mosaic(cells, rows, cols), nan=0.0)  # gaps: alpha 0, the figure's background
        scale = f"RGB: weight w of each channel drawn as 0.5 + w / (2 x {m:.3g}), grey = 0"
    elif cg == 1:
        rows, cols = _grid_shape(k)
        image = _mosaic(w[:, 0], rows, cols)
        scale = None
    else:
        rows, cols = k, cg
        image = _mosaic(w.reshape(k * cg, kh, kw), rows, cols)
        scale = None
    side = 0.09 if cg > 3 else 0.3  # inches per kernel pixel
    img_w = min(max(image.shape[1] * side, 2.5), 12.0)
    img_h = img_w * image.shape[0] / image.shape[1]
    if img_h > 12.0:
        img_w, img_h = img_w * 12.0 / img_h, 12.0
    fig = _figure(round(img_w + (0.4 if scale else 1.6), 2), round(img_h + (1.3 if scale else 1.0), 2))
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    ax.set_label("filters")
    shape = f"{k} x {cg} x {kh} x {kw}"
    if scale is not None:
        ax.imshow(image, interpolation="nearest")
        ax.set_xlabel(scale, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        cmap = _cmap("RdBu_r")
        shown = ax.imshow(image, cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.08, pad=0.04, label="weight (one scale for all)")
        if cg == 1:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xlabel("input channel")
            ax.set_ylabel("output channel")
            ax.set_xticks(_cell_ticks(cg, kw))
            ax.set_xticklabels([str(i) for i in _tick_labels(cg)], fontsize=7)
            ax.set_yticks(_cell_ticks(k, kh))
            ax.set_yticklabels([str(i) for i in _tick_labels(k)], fontsize=7)
    order = "filters row by row" if cg in (1, 3) else "one kernel per (output, input) channel pair"
    ax.set_title(f"layer {index}: Conv2d weights {shape}\n{order}", fontsize=10)
    return _finish(fig, path)


def _tick_labels(n):
    step = max(1, math.ceil(n / 16))
    return list(range(0, n, step))


def _cell_ticks(n, size, gap=1):
    return [i * (size + gap) + (size - 1) / 2 for i in _tick_labels(n)]


def _cmap(name):
    import matplotlib
    return matplotlib.colormaps[name].with_extremes(bad="white")


def _image_chw(model, layers, image):
    """The image as (C, H, W) in the model's dtype, from (C, H, W), (1, C, H, W), (H, W) for one channel, or
    (H, W, C) where the model's input shape says so."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
        raise TypeError(f"image must hold numbers, got dtype {image.dtype}")
    expected = getattr(model, "input_shape", None)
    if expected is None:
        first = layers[0]
        channels = getattr(first, "in_channels", None)
    else:
        expected = tuple(expected)
        channels = expected[0]
    shape = image.shape
    if image.ndim == 4 and shape[0] == 1:
        chw = image[0]
    elif image.ndim == 3:
        if expected is not None and shape != expected and shape == expected[1:] + expected[:1]:
            chw = image.transpose(2, 0, 1)  # H x W x C, as images are usually stored
        else:
            chw = image
    elif image.ndim == 2 and channels in (1, None):
        chw = image[None]
    else:
        want = f"{expected}" if expected is not None else f"({channels}, H, W)"
        raise ValueError(f"image must be one image of shape {want} (or with a batch axis of 1), got shape {shape}")
    if expected is not None and chw.shape != expected:
        raise ValueError(f"image has shape {shape}, but the model takes images of shape {expected}")
    if expected is None and channels is not None and chw.shape[0] != channels:
        raise ValueError(f"image has shape {shape}, but the model's first layer takes {channels} channels")
    if 0 in chw.shape:
        raise ValueError(f"image shape {shape} has no pixels")
    dtype = model.dtype if hasattr(model, "dtype") else np.float32
    return np.ascontiguousarray(chw, dtype=dtype)


def _activations(layers, wiring, chw, index):
    values = {-1: chw[None]}
    for i in _ancestors(wiring, index):
        ins = [values[j] for j in wiring[i]]
        values[i] = layers[i].forward(ins if _is_merge(layers[i], wiring[i]) else ins[0], False)
    return values[index][0]


def _draw_input(ax, chw, title="input"):
    """The input image: grey for one channel, RGB for three (scaled to [0, 1] from [0, 1], [0, 255] or its own
    range), the channels' mean otherwise."""
    c = chw.shape[0]
    values = np.asarray(chw, dtype=np.float64)
    if c == 3:
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            rgb = values
        elif low >= 0 and high <= 255:
            rgb = values / 255.0
        else:
            rgb = (values - low) / (high - low or 1.0)
        ax.imshow(rgb.transpose(1, 2, 0), interpolation="nearest")
    else:
        ax.imshow(values.mean(axis=0), cmap="gray", interpolation="nearest")
        if c > 1:
            title += f" (mean of {c} channels)"
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def feature_maps(model, image, layer=None, path=None):
    """The maps one image produces after layer `layer` (an index into model.layers; the first Conv2d when None),
    in inference mode: a grid of maps with the input beside it, all maps in one colour scale (stated by the colour
    bar: 0 to the largest value when none is negative, else symmetric about 0 in a diverging map).

    image: one image of the model's input shape (C, H, W), also accepted with a batch axis of 1, as (H, W) for
    one channel, or as (H, W, C) (how images are usually stored) where that cannot be mistaken for (C, H, W).
    The axes of map k is labelled "map k" (ax.get_label())."""
    path = _check_path(path)
    layers = _model_layers(model)
    index = _conv_layer(layers, None) if layer is None else _layer_index(layers, layer)
    chw = _image_chw(model, layers, image)
    wiring = _wiring(model, layers)
    shape = _tensor_shapes(layers, wiring, chw.shape, index)[index]
    if len(shape) != 3:
        raise ValueError(f"layer {index} ({type(layers[index]).__name__}) outputs shape {shape}, not feature maps "
                         f"(C, H, W); pick a layer before Flatten (" + _layer_list(layers) + ")")
    _matplotlib()
    maps = _activations(layers, wiring, chw, index)
    n, h, w = maps.shape
    rows, cols = _grid_shape(n)
    cell = min(1.2, max(0.45, 9.0 / cols))
    side = min(max(1.6, rows * 0.75), 4.0)  # the input's column, in map widths
    width, height = (cols + side) * cell + 1.4, rows * cell * h / w + 1.0
    height = max(height, 2.6)
    fig = _figure(round(width, 2), round(height, 2))
    values = np.asarray(maps, dtype=np.float64)
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    if low >= 0:
        cmap, vmin, vmax = _cmap("magma"), 0.0, float(np.nanmax(values)) or 1.0
    else:
        cmap, vmin = _cmap("RdBu_r"), -_symmetric_limit(values[np.isfinite(values)])
        vmax = -vmin
    grid = fig.add_gridspec(rows, cols + 2, width_ratios=[side] + [1] * cols + [0.12], left=0.02,
                            right=1 - 0.9 / width, top=1 - 0.55 / height, bottom=0.05, wspace=0.08, hspace=0.25)
    ax_in = fig.add_subplot(grid[:, 0])
    ax_in.set_label("input")
    _draw_input(ax_in, chw, f"input\n{tuple(chw.shape)}")
    shown = None
    for k in range(n):
        r, c = divmod(k, cols)
        ax = fig.add_subplot(grid[r, c + 1])
        ax.set_label(f"map {k}")
        shown = ax.imshow(values[k], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if rows * cols <= 64:
            ax.set_title(str(k), fontsize=7, pad=2)
    cax = fig.add_subplot(grid[:, cols + 1])
    fig.colorbar(shown, cax=cax, label="activation (one scale for all maps)")
    fig.suptitle(f"feature maps after layer {index} ({type(layers[index]).__name__}): {n} maps of {h} x {w}",
                 fontsize=10)
    return _finish(fig, path)


def _history_series(history):
    """(epochs, {key: values}) from a Trainer History or a dict of per-epoch lists."""
    if hasattr(history, "history") and hasattr(history, "epoch"):
        records, epochs = history.history, list(history.epoch)
    elif isinstance(history, dict):
        records, epochs = history, None
    else:
        raise TypeError(f"history must be the History returned by Trainer.fit or a dict of per-epoch lists, "
                        f"got {type(history).__name__}")
    if "loss" not in records:
        raise ValueError(f"history has no 'loss' (keys: {sorted(records)})")
    n = len(records["loss"])
    if n == 0:
        raise ValueError("history has no epochs to draw")
    if epochs is None:
        epochs = list(range(1, n + 1))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in records and len(records[key]) != len(epochs):
            raise ValueError(f"history[{key!r}] has {len(records[key])} values for {len(epochs)} epochs")
    return epochs, records


def history(history, path=None, title=None):
    """Loss and accuracy per epoch, training and (when recorded) validation, from the History that Trainer.fit
    returns (or a dict of lists with 'loss' and optionally 'accuracy', 'val_loss', 'val_accuracy'). Two panels,
    10 x 4 inches (one, 5 x 4, without accuracy); the lines are labelled 'training' and 'validation'."""
    path = _check_path(path)
    epochs, records = _history_series(history)
    _matplotlib()
    from matplotlib.ticker import MaxNLocator
    panels = [("loss", "loss")] + ([("accuracy", "accuracy")] if "accuracy" in records else [])
    fig = _figure(5.0 * len(panels), 4.0)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_label(key)
        ax.plot(epochs, records[key], marker="o", label="training")
        if "val_" + key in records:
            ax.plot(epochs, records["val_" + key], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


class Region(NamedTuple):
    """The input pixels one unit sees. `seen` is the (H, W) boolean mask of exactly those pixels (a dilated kernel
    leaves holes); `rows` and `cols` are the slices of the rectangle that bounds them, so image[..., rows, cols]
    is the region. `size` (height, width) is the extent the layers' geometry gives before clipping to the image
    (padding included): the textbook receptive field size. `top`, `left` are that extent's first row and column,
    negative where it reaches into the padding."""
    rows: slice
    cols: slice
    size: tuple
    top: int
    left: int
    seen: np.ndarray


def _axis_geometry(layer, in_shape):
    """Per axis (kernel, stride, padding before, dilation) of a layer, None for one that maps each pixel to itself
    (ReLU, BatchNorm2d, Dropout, Add, Concat of channels), False for one that cannot be traced."""
    from . import _args
    from .graph import Add, Concat
    from .layers import BatchNorm2d, Conv2d, Dropout, ReLU, _Pool
    if isinstance(layer, (ReLU, BatchNorm2d, Dropout, Add)) or (isinstance(layer, Concat) and layer.axis == 1):
        return None
    if isinstance(layer, Conv2d):
        k, s, d = layer.kernel_size, layer.stride, layer.dilation
        if layer.padding == "same":
            p = (_args.same_padding(in_shape[1], k[0], s[0], d[0])[0],
                 _args.same_padding(in_shape[2], k[1], s[1], d[1])[0])
        elif layer.padding == "valid":
            p = (0, 0)
        else:
            p = layer.padding
        return [(k[a], s[a], p[a], d[a]) for a in range(2)]
    if isinstance(layer, _Pool):
        return [(layer.kernel_size[a], layer.stride[a], layer.padding[a], 1) for a in range(2)]
    return False


def _taps(k, s, p, d, in_size, out_size):
    """The (in_size, out_size) matrix with 1 where output position o reads input position i along one axis."""
    o = np.repeat(np.arange(out_size), k)
    i = o * s - p + np.tile(np.arange(k) * d, out_size)
    keep = (i >= 0) & (i < in_size)
    a = np.zeros((in_size, out_size))
    a[i[keep], o[keep]] = 1.0
    return a


def receptive_field_region(model, layer, position, input_shape=None):
    """The region of the input that unit `position` = (y, x) of layer `layer`'s output sees (any of its
    channels): a Region. It is traced back through each layer's kernel, stride, padding and dilation (and through
    every branch of a graph model), pixel by pixel. input_shape: one image's (C, H, W), by default the model's."""
    layers = _model_layers(model)
    index = _layer_index(layers, layer)
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("the model's input shape is unknown: pass input_shape (or an image)")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    wiring = _wiring(model, layers)
    shapes = _tensor_shapes(layers, wiring, input_shape, index)
    out = shapes[index]
    if len(out) != 3:
        raise ValueError(f"layer {index} ({type(layers[index]).__name__}) outputs shape {out}: its units have no "
                         f"position in the image")
    if (not isinstance(position, (tuple, list)) or len(position) != 2
            or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in position)):
        raise TypeError(f"position must be a (y, x) pair of ints, got {position!r}")
    y, x = int(position[0]), int(position[1])
    if not (0 <= y < out[1] and 0 <= x < out[2]):
        raise ValueError(f"position {(y, x)} is outside layer {index}'s output of {out[1]} x {out[2]} "
                         f"(shape {out})")
    seen = np.zeros(out[1:])
    seen[y, x] = 1.0
    masks = {index: seen}  # per tensor: the positions the unit depends on
    extents = {index: [[y, y], [x, x]]}  # per tensor and axis: the extent, padding included
    for i in range(index, -1, -1):
        if i not in masks:
            continue
        mask, extent = masks.pop(i), extents.pop(i)
        in_shape = shapes[wiring[i][0]]
        geometry = _axis_geometry(layers[i], in_shape)
        if geometry is False:
            raise ValueError(f"cannot trace a receptive field through layer {i} ({type(layers[i]).__name__})")
        if geometry is not None:
            rows, cols = (_taps(*g, in_shape[1 + a], mask.shape[a]) for a, g in enumerate(geometry))
            mask = (rows @ mask @ cols.T > 0).astype(np.float64)
            extent = [[lo * s - p, hi * s - p + (k - 1) * d] for (lo, hi), (k, s, p, d) in zip(extent, geometry)]
        for j in wiring[i]:
            if j in masks:
                masks[j] = np.maximum(masks[j], mask)
                extents[j] = [[min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(extents[j], extent)]
            else:
                masks[j], extents[j] = mask, extent
    seen = masks[-1] > 0
    full = extents[-1]
    bounds = []
    for axis in (1, 0):
        hit = np.flatnonzero(seen.any(axis=axis))
        bounds.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    size = (full[0][1] - full[0][0] + 1, full[1][1] - full[1][0] + 1)
    return Region(bounds[0], bounds[1], size, full[0][0], full[1][0], seen)


def receptive_field(model, layer, position, path=None, image=None):
    """The input region that unit `position` = (y, x) of layer `layer`'s output sees (receptive_field_region),
    drawn as a rectangle on `image` (one input image, as feature_maps takes it), or on a blank input of the model's
    input shape. A solid rectangle marks the pixels inside the image; a dashed one the whole extent the geometry
    gives where it reaches into the padding; the pixels seen are tinted red. The title states rows, columns and
    size."""
    path = _check_path(path)
    layers = _model_layers(model)
    index = _layer_index(layers, layer)
    if image is not None:
        chw = _image_chw(model, layers, image)
    else:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ValueError("the model's input shape is unknown: pass image")
        chw = None
    input_shape = tuple(chw.shape) if chw is not None else tuple(shape)
    region = receptive_field_region(model, index, position, input_shape)
    _matplotlib()
    from matplotlib.patches import Rectangle
    _, h, w = input_shape
    side = 5.0
    fig = _figure(side * max(w / h, 0.6) + 0.6, side + 1.0)
    ax = fig.add_subplot()
    ax.set_label("receptive field")
    if chw is not None:
        _draw_input(ax, chw, "")
    else:
        ax.imshow(np.zeros((h, w)), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    tint = np.zeros((h, w, 4))
    tint[region.seen] = (1.0, 0.15, 0.1, 0.35)  # exactly the pixels seen (a dilated kernel leaves holes)
    ax.imshow(tint, interpolation="nearest")
    r, c = region.rows, region.cols
    full_h, full_w = region.size
    if (region.top, region.left, full_h, full_w) != (r.start, c.start, r.stop - r.start, c.stop - c.start):
        ax.add_patch(Rectangle((region.left - 0.5, region.top - 0.5), full_w, full_h, fill=False,
                               edgecolor="tab:orange", linestyle="--", linewidth=1.5, label="extent (padding)"))
        ax.set_xlim(min(-0.5, region.left - 1), max(w - 0.5, region.left + full_w))
        ax.set_ylim(max(h - 0.5, region.top + full_h), min(-0.5, region.top - 1))
        ax.set_facecolor("#e4e4e4")
        ax.set_xlabel("dashed: the extent reaching into the zero padding (grey)", fontsize=8)
    ax.add_patch(Rectangle((c.start - 0.5, r.start - 0.5), c.stop - c.start, r.stop - r.start, fill=False,
                           edgecolor="tab:red", linewidth=2.5, label="region"))
    y, x = position
    kind = type(layers[index]).__name__
    ax.set_title(f"layer {index} ({kind}) unit ({y}, {x}) sees input rows {r.start}..{r.stop - 1}, columns "
                 f"{c.start}..{c.stop - 1}\nreceptive field {full_h} x {full_w} on a {h} x {w} input", fontsize=9)
    return _finish(fig, path)
