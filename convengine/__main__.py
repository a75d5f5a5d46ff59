"""Command line: `python -m convengine {train,evaluate,predict,export,info,show,bench}` (also installed as the
`convengine` script).

`train` with no options trains the LeNet-style digits net on the embedded 8x8 digits with a fixed seed and prints
per-epoch progress and the held-out test accuracy. Started by `mpiexec -n N`, it trains data-parallel over the N
ranks (convengine.distributed); only rank 0 prints and writes files.
"""
import argparse
import json
import math
import platform
import sys

import numpy as np

from . import __version__, data
from ._outputs import check_output_path
from ._random import manual_seed
from ._threads import get_num_threads, set_num_threads

TRAIN_DEFAULTS = dict(dataset="digits", epochs=20, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4,
                      optimizer="sgd", schedule="cosine", seed=0)


class CommandError(Exception):
    """A problem with the command's input, reported as one line and exit status 1."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _field_spec(text):
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected LAYER,Y,X (three integers), got {text!r}")
    return tuple(_non_negative_int(p.strip()) for p in parts)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says its default, or there is none to say
    (None, or False for a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="convengine",
        description="convengine: a compiled convolution engine for CPUs. Train and evaluate small CNNs, inspect "
                    "the build, time the kernels.",
        epilog="Run 'convengine COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"convengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = _HelpFormatter

    train = sub.add_parser(
        "train", formatter_class=fmt, help="train a LeNet-style CNN and report its test accuracy",
        description="Train a LeNet-style CNN (sized for the images) with SGD and a cosine learning-rate schedule, "
                    "printing per-epoch loss and accuracy (training, and on the held-out test split) and the "
                    "final test accuracy. The defaults train on the embedded 8x8 digits with a fixed seed.")
    train.add_argument("--dataset", choices=data.DATASETS, default=TRAIN_DEFAULTS["dataset"],
                       help="data set: the embedded digits, or mnist / fashion-mnist (IDX files) / cifar10 "
                            "(python batches) from --data")
    train.add_argument("--data", metavar="PATH",
                       help="directory holding the files of mnist, fashion-mnist (train-images-idx3-ubyte[.gz] "
                            "etc.) or cifar10 (data_batch_1..5, test_batch); CIFAR-10's pickles are read with a "
                            "restricted unpickler")
    train.add_argument("--epochs", type=_non_negative_int, default=TRAIN_DEFAULTS["epochs"], help="training epochs")
    train.add_argument("--batch-size", type=_positive_int, default=TRAIN_DEFAULTS["batch_size"],
                       help="images per mini-batch")
    train.add_argument("--lr", type=_non_negative_float, default=None,
                       help="peak learning rate (default: 0.05 for sgd, 0.001 for adam)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default=TRAIN_DEFAULTS["optimizer"], help="optimizer")
    train.add_argument("--momentum", type=_non_negative_float, default=TRAIN_DEFAULTS["momentum"],
                       help="SGD momentum")
    train.add_argument("--weight-decay", type=_non_negative_float, default=TRAIN_DEFAULTS["weight_decay"],
                       help="L2 weight decay")
    train.add_argument("--schedule", choices=("cosine", "constant"), default=TRAIN_DEFAULTS["schedule"],
                       help="learning rate over the epochs: cosine decay from --lr to 0, or constant")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="kernel threads (default: OMP_NUM_THREADS, else the usable cores)")
    train.add_argument("--seed", type=_non_negative_int, default=TRAIN_DEFAULTS["seed"],
                       help="seed of initialisation, dropout and shuffling: one seed gives one model")
    train.add_argument("--shards", type=_positive_int, default=None,
                       help="split each batch into this many fixed micro-batches whose gradients are summed in "
                            "order, so the weights are the same for any number of MPI ranks up to it (default: "
                            "the rank count under mpiexec, else whole batches)")
    train.add_argument("--save", metavar="PATH", help="write the trained model here (.npz)")
    train.add_argument("--plot", metavar="PATH", help="write loss and accuracy curves as a PNG (needs matplotlib)")
    train.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                       help="0: final result only, 1: a progress bar per epoch, 2: one line per epoch "
                            "(default: 1 on a terminal, else 2)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", formatter_class=fmt, help="accuracy and confusion matrix of a saved model on a test split",
        description="Load a model saved by 'train --save' and print its accuracy and confusion matrix on the test "
                    "split of a data set (by default the one it was trained on).")
    evaluate.add_argument("model", metavar="MODEL", help="model file written by 'convengine train --save', or an "
                                                         "ONNX file (.onnx, needs the onnx package)")
    evaluate.add_argument("--dataset", choices=data.DATASETS, default=None,
                          help="data set (default: the one recorded in the model, else digits)")
    evaluate.add_argument("--data", metavar="PATH", help="directory of the data set's files (see train --help)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, help="images per inference batch")
    evaluate.add_argument("--threads", type=_positive_int, default=None, help="kernel threads")
    _add_winograd_flag(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser(
        "predict", formatter_class=fmt, help="classes and probabilities a saved model gives images in a .npy file",
        description="Load a model saved by 'train --save' (or an .onnx file) and print, for each image in INPUT, "
                    "the predicted class and its probability (the softmax of the model's scores), with the next "
                    "likeliest classes by --top. Images are NCHW like the model's training data: one image "
                    "(C, H, W) or (H, W), or a batch (N, C, H, W).")
    predict.add_argument("model", metavar="MODEL", help="model file written by 'convengine train --save', or .onnx")
    predict.add_argument("input", metavar="INPUT", help="images saved with numpy.save (.npy), scaled as the "
                                                       "training images were (the built-in data sets: 0..1)")
    predict.add_argument("--top", type=_positive_int, default=1, help="classes to print per image, likeliest first")
    predict.add_argument("--channels-last", action="store_true",
                         help="INPUT holds channels-last images, (H, W, C) or (N, H, W, C)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")
    predict.add_argument("--batch-size", type=_positive_int, default=256, help="images per inference batch")
    predict.add_argument("--threads", type=_positive_int, default=None, help="kernel threads")
    _add_winograd_flag(predict)
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export", formatter_class=fmt, help="write a saved model as an ONNX file",
        description="Write a model file (from 'train --save') as an ONNX model (opset 13, free batch size) that "
                    "ONNX Runtime and other runtimes read. Needs the onnx package: pip install 'convengine[onnx]'.")
    export.add_argument("model", metavar="MODEL", help="model file written by 'convengine train --save'")
    export.add_argument("output", metavar="OUTPUT", help="ONNX file to write (.onnx)")
    export.set_defaults(func=cmd_export)

    info = sub.add_parser("info", formatter_class=fmt, help="build information and thread count",
                          description="Print how the kernels were built (compiler, flags, OpenMP, SIMD level in "
                                      "use) and the thread count.")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    show = sub.add_parser(
        "show", formatter_class=fmt, help="draw a saved model's filters, feature maps and receptive fields",
        description="Print a saved model's layers and draw what it learned (needs matplotlib): the filters of "
                    "its first conv layer, the feature maps one image produces, the input region one unit sees. "
                    "Output paths are checked before any work.")
    show.add_argument("model", metavar="MODEL", help="model file written by 'convengine train --save'")
    show.add_argument("--filters", metavar="PNG", help="write the first conv layer's filters as a grid here")
    show.add_argument("--image", metavar="NPY", help="one input image saved with numpy.save: (C, H, W), (H, W) "
                                                     "for one channel, or (H, W, C)")
    show.add_argument("--maps", metavar="PNG", help="write the feature maps --image produces after --layer here")
    show.add_argument("--layer", type=_non_negative_int, default=None,
                      help="layer index (as the printed table numbers them) whose output --maps draws "
                           "(default: the first conv layer)")
    show.add_argument("--receptive-field", metavar="LAYER,Y,X", type=_field_spec, default=None,
                      help="print the input region that unit (Y, X) of layer LAYER's output sees")
    show.add_argument("--field-plot", metavar="PNG",
                      help="draw that region here, on --image when given, else on a blank input")
    show.set_defaults(func=cmd_show)

    # `bench` hands every argument after it to convengine.bench (its own --help lists them), so argparse only
    # names it here; main() dispatches it before parsing.
    sub.add_parser("bench", add_help=False,
                   help="speed report: conv2d and pooling vs the NumPy reference and PyTorch "
                        "(options: convengine bench --help)")
    return parser


def main(argv=None):
    """Entry point of `python -m convengine` and the `convengine` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from . import bench
        status = bench.main(argv[1:])
        return 0 if status is None else status
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"convengine {args.command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"convengine {args.command}: error: out of memory{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 1


def _load_data(name, path, source=None):
    """The data set `name`; `source` says where the name came from when the user did not pass --dataset."""
    if name != "digits" and path is None:
        if source is not None:
            raise CommandError(f"{source} was trained on {name}: pass --data PATH, the directory holding its "
                               f"files (or --dataset for another data set)")
        raise CommandError(f"--dataset {name} needs --data PATH, the directory holding its files")
    if name == "digits" and path is not None:
        raise CommandError("the digits are embedded; --data is for mnist, fashion-mnist and cifar10")
    return data.load_dataset(name, path)


def _check_outputs(args, *names):
    """Check the output paths among args' options `names` before any work (see convengine._outputs)."""
    for name in names:
        check_output_path(getattr(args, name), f"--{name.replace('_', '-')}")


def _check_plot(path, option="--plot"):
    """convengine.plot, after checking that matplotlib is installed and that `path` can be written as an image,
    so that a bad path fails before any work. None when path is None."""
    if path is None:
        return None
    try:
        import matplotlib  # noqa: F401  (first: a blocked or missing matplotlib fails here)
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CommandError(f"{option} needs matplotlib, which is not installed: pip install 'convengine[plot]'") \
            from None
    _check_output(path, option, FigureCanvasBase.get_supported_filetypes())
    from . import plot
    return plot


def _check_output(path, option, formats):
    """Refuse, naming the user's path, an output file that cannot be written (a directory, a missing or read-only
    folder, a read-only file: convengine._outputs) or whose suffix matplotlib cannot write."""
    import os
    try:
        check_output_path(path, option)
    except ValueError as e:
        raise CommandError(str(e)) from None
    suffix = os.path.splitext(path)[1][1:].lower()
    if suffix and suffix not in formats:
        raise CommandError(f"{option} {path}: matplotlib cannot write .{suffix} files (use .png)")


def cmd_train(args):
    from . import distributed

    comm = distributed.world()
    with distributed.abort_on_error(comm):
        return _train(args, comm)


def _train(args, comm):
    from .losses import CrossEntropyLoss
    from .model import lenet
    from .optim import SGD, Adam
    from .trainer import LearningRateScheduler, Trainer

    root = comm is None or comm.Get_rank() == 0
    say = print if root else (lambda *a, **k: None)
    if root:
        _check_outputs(args, "save")
    plot = _check_plot(args.plot) if root else None
    if args.threads is not None:
        set_num_threads(args.threads)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stderr.isatty() else 2)
    if comm is not None and args.shards is not None and args.shards < comm.Get_size():
        raise CommandError(f"--shards {args.shards} is fewer than the {comm.Get_size()} ranks; every rank needs "
                           "a shard")
    (x_train, y_train), (x_test, y_test) = _load_data(args.dataset, args.data)
    num_classes = len(data.CLASS_NAMES[args.dataset])

    manual_seed(args.seed)
    model = lenet(x_train.shape[1:], num_classes)
    model.metadata = {"dataset": args.dataset, "classes": data.CLASS_NAMES[args.dataset], "seed": args.seed}
    if args.optimizer == "sgd":
        lr = TRAIN_DEFAULTS["lr"] if args.lr is None else args.lr
        optimizer = SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        lr = 1e-3 if args.lr is None else args.lr
        optimizer = Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    callbacks = []
    if args.schedule == "cosine" and args.epochs > 0:
        epochs = args.epochs
        callbacks.append(LearningRateScheduler(lambda e, _: lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs))))
    trainer = Trainer(model, CrossEntropyLoss(), optimizer, comm=comm, shards=args.shards)

    trainer.validation_label = "test"  # the held-out split is the test split: named so throughout
    n_params = sum(p.data.size for p in model.parameters())
    header = say if verbose else (lambda *a, **k: None)  # --verbose 0: the final result only
    if trainer.parallel is not None:
        header(f"data-parallel: {trainer.parallel.size} ranks, {trainer.parallel.shards} shards of each batch of "
            f"{args.batch_size}", flush=True)
    header(f"{args.dataset}: {len(x_train)} training and {len(x_test)} test images of shape {x_train.shape[1:]}; "
          f"lenet with {n_params:,} parameters; {args.optimizer} lr {lr:g}, {args.schedule} schedule, "
          f"batch {args.batch_size}, seed {args.seed}, {get_num_threads()} threads", flush=True)
    history = trainer.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                          validation_data=(x_test, y_test), seed=args.seed, callbacks=callbacks, verbose=verbose)
    result = trainer.evaluate(x_test, y_test)
    correct = int(round(result["accuracy"] * len(x_test)))
    seconds = sum(history["time"]) if len(history) else 0.0
    say(f"test accuracy: {100 * result['accuracy']:.2f}% ({correct}/{len(x_test)}), test loss "
          f"{result['loss']:.4f}, after {_count(len(history), 'epoch')} ({seconds:.1f} s of training)", flush=True)
    if args.save and root:
        model.save(args.save)
        say(f"saved the model to {args.save}")
    if plot is not None and len(history):
        plot.history(history, args.plot, title=f"lenet on {args.dataset} (validation: the test split)")
        say(f"wrote the curves to {args.plot}")
    if history.interrupted:
        say("stopped by Ctrl-C", file=sys.stderr)
        return 130
    return 0


def _count(n, noun):
    """"1 epoch", "2 epochs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _load_model(path):
    """A model file: convengine's own (.npz), or an ONNX file (.onnx) read by convengine.onnx."""
    if str(path).lower().endswith(".onnx"):
        from . import onnx as onnx_io
        try:
            return onnx_io.load(path)
        except ImportError as e:
            raise CommandError(str(e)) from None
    from .model import load
    return load(path)


def cmd_export(args):
    from . import onnx as onnx_io

    model = _load_model(args.model)
    try:
        onnx_io.export(model, args.output)
    except ImportError as e:
        raise CommandError(str(e)) from None
    n_params = sum(p.data.size for p in model.parameters())
    print(f"wrote {args.output}: {len(model.layers)} layers, {n_params:,} parameters, input (N, "
          f"{', '.join(map(str, model.input_shape))})")
    return 0


def _add_winograd_flag(parser):
    parser.add_argument("--winograd", action="store_true",
                        help="run the float32 3x3 stride-1 convs of 32+ input and 16+ output channels by "
                             "Winograd F(2x2, 3x3): faster, rounds differently, and a NaN or infinite pixel spreads "
                             "over its 2x2 output tile (Sequential.freeze(winograd=True))")


def _scores(model, x, args):
    """The model's outputs for x, through the opt-in Winograd plan where --winograd asks for it."""
    if not args.winograd:
        return model.predict(x, args.batch_size)
    if not hasattr(model, "freeze"):
        raise CommandError(f"--winograd needs a Sequential model; {args.model} is a graph model")
    return model.freeze(winograd=True).predict(x, args.batch_size)


def cmd_evaluate(args):
    if args.threads is not None:
        set_num_threads(args.threads)
    model = _load_model(args.model)
    name = args.dataset or model.metadata.get("dataset") or "digits"
    if name not in data.DATASETS:
        raise CommandError(f"the model names data set {name!r}; pass --dataset")
    _, (x_test, y_test) = _load_data(name, args.data, source=None if args.dataset else args.model)
    try:
        out_shape = model.output_shape(x_test.shape[1:])
    except ValueError as e:
        raise CommandError(f"{args.model} does not fit {name} images of shape {x_test.shape[1:]}: {e}") from None
    names = data.CLASS_NAMES[name]
    if out_shape != (len(names),):
        raise CommandError(f"{args.model} outputs shape {out_shape}, but {name} has {len(names)} classes")
    from . import metrics

    scores = _scores(model, x_test, args)
    accuracy = metrics.accuracy(y_test, scores)
    counts = metrics.confusion_matrix(y_test, scores, len(names))
    print(f"{args.model} on the {name} test split: accuracy {100 * accuracy:.2f}% "
          f"({int(np.trace(counts))}/{len(y_test)})")
    print(metrics.format_confusion_matrix(counts, names))
    return 0


def _load_images(path, input_shape, channels_last):
    """INPUT of `predict` as an (N, C, H, W)-like batch: one image gains a batch axis, (H, W) a channel axis."""
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise CommandError(f"{path}: not a .npy file of numbers ({e})") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise CommandError(f"{path}: holds several arrays; save the images as one array with numpy.save")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise CommandError(f"{path}: holds {x.dtype} values, not real numbers")
    if channels_last:
        if x.ndim not in (3, 4):
            raise CommandError(f"--channels-last needs (H, W, C) or (N, H, W, C) images, got shape {x.shape}")
        x = np.moveaxis(x, -1, -3)
    rank = len(input_shape) if input_shape is not None else 3
    if x.ndim == rank:
        x = x[None]
    elif x.ndim == rank - 1 and rank == 3 and input_shape is not None and input_shape[0] == 1:
        x = x[None, None]
    if input_shape is not None and x.ndim == rank + 1 and tuple(x.shape[1:]) != tuple(input_shape):
        hint = ""
        if not channels_last and x.ndim == 4 and tuple(np.moveaxis(x, -1, 1).shape[1:]) == tuple(input_shape):
            hint = "; these look like channels-last images: add --channels-last"
        raise CommandError(f"{path}: images of shape {tuple(x.shape[1:])}, but the model takes "
                           f"{tuple(input_shape)}{hint}")
    return x


def cmd_predict(args):
    if args.threads is not None:
        set_num_threads(args.threads)
    model = _load_model(args.model)
    x = _load_images(args.input, model.input_shape, args.channels_last)
    scores = _scores(model, x, args)
    if scores.ndim != 2:
        raise CommandError(f"{args.model} outputs per-image shape {scores.shape[1:]}, not class scores")
    probabilities = model._probabilities(scores)
    classes = model.metadata.get("classes") if isinstance(getattr(model, "metadata", None), dict) else None
    k = scores.shape[1]
    names = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == k else \
        [str(i) for i in range(k)]
    top = min(args.top, k)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    if args.json:
        rows = [{"index": i, "class": int(order[i, 0]), "name": names[order[i, 0]],
                 "probability": float(probabilities[i, order[i, 0]]),
                 "top": [{"class": int(c), "name": names[c], "probability": float(probabilities[i, c])}
                         for c in order[i]]} for i in range(len(x))]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model} on {args.input}: {_count(len(x), 'image')} of shape {tuple(x.shape[1:])}")
    width = max(len(n) for n in names)
    for i in range(len(x)):
        picks = ", ".join(f"{names[c].rjust(width)} {probabilities[i, c]:.4f}" for c in order[i])
        print(f"{i}: {picks}")
    return 0


def cmd_info(args):
    from . import build_info, distributed

    info = {"convengine": __version__, "build": build_info(), "threads": get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    mpi = distributed.mpi_info()
    if mpi is not None:
        info["mpi"] = mpi
        if mpi["rank"] != 0:
            return 0
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"convengine {info['convengine']} (python {info['python']}, numpy {info['numpy']}, {info['platform']})")
    print(f"threads: {info['threads']}")
    if mpi is not None:
        print(f"mpi: {mpi['error']}" if "error" in mpi else
              f"mpi: {mpi['vendor']} ({mpi['library']}), {mpi['ranks']} ranks, mpi4py {mpi['mpi4py']}")
    for key, value in info["build"].items():
        print(f"{key}: {value}")
    return 0


def cmd_show(args):
    import os

    from .model import load

    if args.maps is not None and args.image is None:
        raise CommandError("--maps needs --image NPY, the image whose feature maps it draws")
    if args.layer is not None and args.maps is None:
        raise CommandError("--layer chooses the layer that --maps draws; give --maps PNG")
    if args.field_plot is not None and args.receptive_field is None:
        raise CommandError("--field-plot needs --receptive-field LAYER,Y,X")
    if args.image is not None and args.maps is None and args.field_plot is None:
        raise CommandError("--image is drawn by --maps or --field-plot; give one of them")
    outputs = [(option, path) for option, path in
               (("--filters", args.filters), ("--maps", args.maps), ("--field-plot", args.field_plot)) if path]
    plot = None
    for option, path in outputs:
        plot = _check_plot(path, option)
    seen = {}
    for option, path in outputs:
        key = os.path.abspath(path)
        if key in seen:
            raise CommandError(f"{seen[key]} and {option} both name {path}")
        seen[key] = option

    model = load(args.model)
    image = None
    if args.image is not None:
        try:
            image = np.load(args.image, allow_pickle=False)
        except ValueError as e:
            raise CommandError(f"--image {args.image}: not a .npy file of numbers ({e})") from None
        if not isinstance(image, np.ndarray):
            image.close()
            raise CommandError(f"--image {args.image}: holds several arrays; save one image with numpy.save")
    region = None
    if args.receptive_field is not None:  # checked before anything is printed or drawn
        from .plot import receptive_field_region  # arithmetic only: no matplotlib needed
        layer, y, x = args.receptive_field
        shape = model.input_shape
        if shape is None and image is not None and image.ndim == 3:
            shape = image.shape
        region = receptive_field_region(model, layer, (y, x), shape)
    print(model.summary() if model.input_shape is not None else model)
    if args.filters:
        plot.filters(model, path=args.filters)
        print(f"wrote the filters to {args.filters}")
    if args.maps:
        plot.feature_maps(model, image, layer=args.layer, path=args.maps)
        print(f"wrote the feature maps to {args.maps}")
    if region is not None:
        rows, cols = region.rows, region.cols
        print(f"layer {layer} ({type(model.layers[layer]).__name__}) unit ({y}, {x}) sees input rows "
              f"{rows.start}..{rows.stop - 1} and columns {cols.start}..{cols.stop - 1}; its receptive field is "
              f"{region.size[0]} x {region.size[1]} pixels")
        if args.field_plot:
            plot.receptive_field(model, layer, (y, x), path=args.field_plot, image=image)
            print(f"wrote the receptive field to {args.field_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
