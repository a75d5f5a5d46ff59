"""Report section: inference of whole small CNNs, convengine's frozen plan (`Sequential.freeze()`) against PyTorch
(eval mode, `torch.inference_mode`) and ONNX Runtime (CPU provider, sequential execution), with convengine's
`model.predict` beside them, on the same weights and inputs at the same thread count.

The nets take 32x32 RGB images and output 10 scores:
- `cifar`: conv3x3 3->32-BN-ReLU-maxpool, conv3x3 32->64-BN-ReLU-maxpool, conv3x3 64->128-BN-ReLU, global
  average pool, linear;
- `lenet5`: conv5x5 6-ReLU-maxpool, conv5x5 16-ReLU-maxpool, linear 120-ReLU, 84-ReLU, 10;
- `separable`: a strided stem conv3x3 3->32 s2-BN-ReLU, then three depthwise-separable blocks (dw3x3-BN-ReLU,
  pw1x1-BN-ReLU; the second block's depthwise conv has stride 2), global average pool, linear;
- `vgg`: compute-bound, conv3x3 3->64 and 64->64 at 32x32, maxpool, 128 and 128 at 16x16, maxpool (each conv
  -BN-ReLU), global average pool, linear.

The batch norms get random statistics and affine parameters, so that folding them changes the weights. PyTorch
gets a layer-for-layer copy of the engine model (`to_torch`); ONNX Runtime gets the engine model written by
`convengine.onnx.export`. Before anything is timed, every implementation's output is compared with the engine's
op-by-op forward (`model.forward`): the largest difference relative to the largest output must be within
`AGREEMENT`; a row that does not agree says so (its times are still reported).

Per net, batch and thread count: the median ms of each implementation, the time ratios frozen / ONNX Runtime and
frozen / PyTorch (below 1: frozen is faster), the GFLOP/s of the convs and linears (2 x multiply-adds) and that
rate as a share of the float32 matmul rate at the same thread count. Full runs time 1 thread and the run's thread
count; --quick and the tiny run only the run's thread count (the tiny run at batch 1 and 2). PyTorch and ONNX
Runtime (with onnx, which the export needs) are optional: without them their columns are empty and the report
says why.
"""
import importlib.util
import math
import os
import tempfile

import numpy as np

from .. import _random
from ..layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU)
from ..model import Sequential
from .kernels import num
from .timing import (SameThreads, calls_for_seconds, geomean, matmul_gflops, median_ms, ratio, time_interleaved,
                     torch_module)

NAME = "inference"
TITLE = "inference of small CNNs: convengine frozen vs PyTorch and ONNX Runtime"

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
BATCHES = (1, 64)
TINY_BATCHES = (1, 2)
IMPLS = ("frozen", "winograd", "predict", "torch", "ort")
AGREEMENT = 1e-4
# Seconds of calls per implementation and case (at least the run's --repeat calls): batch-1 calls take a tenth
# of a millisecond, and a median of nine of them is mostly noise.
TARGET_SECONDS = {"full": 0.4, "quick": 0.1, "tiny": 0.0}
ORT_MISSING = "ONNX Runtime is not installed (pip install onnxruntime onnx): the ort columns are empty"
ONNX_MISSING = "onnx is not installed (pip install onnx), so no model could be exported: the ort columns are empty"


# ---------------------------------------------------------------------------------------------------------------
# The nets
# ---------------------------------------------------------------------------------------------------------------

def _conv_bn_relu(cin, cout, kernel=3, stride=1, padding=1, groups=1):
    return [Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            BatchNorm2d(cout), ReLU()]


def cifar_net():
    return [*_conv_bn_relu(3, 32), MaxPool2d(2), *_conv_bn_relu(32, 64), MaxPool2d(2), *_conv_bn_relu(64, 128),
            GlobalAvgPool2d(), Linear(128, NUM_CLASSES)]


def lenet5():
    return [Conv2d(3, 6, 5), ReLU(), MaxPool2d(2), Conv2d(6, 16, 5), ReLU(), MaxPool2d(2), Flatten(),
            Linear(16 * 5 * 5, 120), ReLU(), Linear(120, 84), ReLU(), Linear(84, NUM_CLASSES)]


def separable_net():
    layers = _conv_bn_relu(3, 32, stride=2)
    for cin, cout, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1)):
        layers += _conv_bn_relu(cin, cin, stride=stride, groups=cin)      # depthwise
        layers += _conv_bn_relu(cin, cout, kernel=1, padding=0)          # pointwise
    return layers + [GlobalAvgPool2d(), Linear(128, NUM_CLASSES)]


def vgg_net():
    return [*_conv_bn_relu(3, 64), *_conv_bn_relu(64, 64), MaxPool2d(2), *_conv_bn_relu(64, 128),
            *_conv_bn_relu(128, 128), MaxPool2d(2), GlobalAvgPool2d(), Linear(128, NUM_CLASSES)]


NETS = {"cifar": cifar_net, "lenet5": lenet5, "separable": separable_net, "vgg": vgg_net}
# The nets with 3x3 stride-1 convs of 32+ input (and 16+ output) channels, where the opt-in Winograd plan differs
# from the default one (freeze(winograd=True)); its column is timed on these only.
WINOGRAD_NETS = ("cifar", "vgg")


def build(name, seed=0):
    """The engine model `name` of NETS with seeded weights and random batch norm statistics."""
    _random.manual_seed(seed)
    model = Sequential(NETS[name](), input_shape=INPUT_SHAPE)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            c = layer.num_features
            layer.weight.data[...] = rng.uniform(0.5, 1.5, c)
            layer.bias.data[...] = rng.normal(0, 0.2, c)
            layer.running_mean[...] = rng.normal(0, 0.2, c)
            layer.running_var[...] = rng.uniform(0.5, 2.0, c)
    return model


def flops(model, input_shape=INPUT_SHAPE):
    """Floating-point operations per sample of the convs and linears (2 x multiply-adds): the GEMM work that a
    matmul rate compares with."""
    total, shape = 0, tuple(input_shape)
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            total += layer.flops(shape) - (math.prod(layer.output_shape(shape)) if layer.bias is not None else 0)
        elif isinstance(layer, Linear):
            total += 2 * layer.weight.data.size
        shape = tuple(layer.output_shape(shape))
    return total


def to_torch(model, torch):
    """A PyTorch nn.Sequential computing what the engine Sequential `model` computes, its weights copied, in eval
    mode. ValueError for a layer type it does not know."""
    nn = torch.nn
    mods = []
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias=layer.bias is not None)
        elif isinstance(layer, BatchNorm2d):
            m = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        elif isinstance(layer, Linear):
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, MaxPool2d):
            m = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
        elif isinstance(layer, AvgPool2d):
            m = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode,
                             count_include_pad=layer.count_include_pad)
        elif isinstance(layer, GlobalAvgPool2d):
            m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        elif isinstance(layer, Dropout):
            m = nn.Dropout(layer.p)
        else:
            raise ValueError(f"to_torch: no PyTorch counterpart for layer {type(layer).__name__}")
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                getattr(m, pname).copy_(torch.from_numpy(p.data))
            if isinstance(layer, BatchNorm2d):
                m.running_mean.copy_(torch.from_numpy(layer.running_mean))
                m.running_var.copy_(torch.from_numpy(layer.running_var))
        mods.append(m)
    return nn.Sequential(*mods).to(getattr(torch, model.dtype.name)).eval()


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------

def ort_module():
    """(onnxruntime, None) when ONNX Runtime and onnx (for the export) are installed, else (None, why)."""
    try:
        import onnxruntime
    except ImportError:
        return None, ORT_MISSING
    if importlib.util.find_spec("onnx") is None:       # convengine.onnx.export writes through it
        return None, ONNX_MISSING
    return onnxruntime, None


def onnx_bytes(model):
    """The engine model as an ONNX file's bytes (convengine.onnx.export into a temporary folder)."""
    from .. import onnx as ce_onnx
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        ce_onnx.export(model, path)
        with open(path, "rb") as f:
            return f.read()


def ort_session(ort, model_bytes, threads):
    """An ONNX Runtime CPU session at `threads` intra-op threads, sequential execution, all graph
    optimisations (its defaults otherwise, as a user would run it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------------
# One net at one batch size: the calls, the agreement check, the timing
# ---------------------------------------------------------------------------------------------------------------

def calls_for(model, frozen, x, torch_net=None, session=None, winograd=None):
    """impl -> zero-argument callable returning the outputs for x (a numpy array each). winograd: the model frozen
    with winograd=True (the opt-in plan), timed as its own implementation."""
    batch = x.shape[0]
    calls = {"frozen": lambda: frozen(x), "predict": lambda: model.predict(x, batch_size=batch)}
    if winograd is not None:
        calls["winograd"] = lambda: winograd(x)
    if torch_net is not None:
        torch = torch_module()
        xt = torch.from_numpy(x)

        def torch_call():
            with torch.inference_mode():
                return torch_net(xt)
        calls["torch"] = lambda: torch_call().numpy()
    if session is not None:
        feed = {session.get_inputs()[0].name: x}
        calls["ort"] = lambda: session.run(None, feed)[0]
    return calls


def relative_errors(calls, expected):
    """impl -> largest |output - expected| over the largest |expected|."""
    scale = float(np.max(np.abs(expected))) or 1.0
    return {impl: float(np.max(np.abs(np.asarray(call(), np.float64) - expected))) / scale
            for impl, call in calls.items()}


def measure_case(name, batch, threads, model, frozen, torch_net, session, matmul_rate, repeat, seconds,
                 park=None, winograd=None):
    """One row: net `name` (`model`, its `frozen` plan and, when given, its PyTorch and ONNX Runtime twins) at
    `batch` samples and `threads` threads (already in force), each implementation timed over at least `repeat`
    calls and about `seconds`. winograd: the model frozen with winograd=True, where the run times it."""
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch,) + INPUT_SHAPE, dtype=np.float32)
    calls = calls_for(model, frozen, x, torch_net, session, winograd)
    expected = np.asarray(model.forward(x, training=False), np.float64)
    errors = relative_errors(calls, expected)
    repeats = calls_for_seconds(calls, repeat, seconds)
    times = time_interleaved(calls, repeats, warmup=1, park=park, rounds=3)
    ms = {impl: median_ms(times[impl]) if impl in times else None for impl in IMPLS}
    work = flops(model) * batch / 1e9
    rate = {impl: (work / (v / 1e3) if v else None) for impl, v in ms.items()}
    return {
        "net": name, "batch": batch, "threads": threads, "ms": ms, "calls": repeats, "gflop": work,
        "rate": rate, "pct_matmul": {impl: (100 * r / matmul_rate if r else None) for impl, r in rate.items()},
        "frozen_vs_ort": ratio(ms["frozen"], ms["ort"]), "frozen_vs_torch": ratio(ms["frozen"], ms["torch"]),
        "winograd_vs_ort": ratio(ms["winograd"], ms["ort"]),
        "winograd_vs_torch": ratio(ms["winograd"], ms["torch"]),
        "max_rel_err": errors, "agree": all(e <= AGREEMENT for e in errors.values()),
        "memory_mb": frozen.memory_bytes(batch) / 2 ** 20,
    }


# ---------------------------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------------------------

HEADER = ("net", "batch", "thr", "frozen_ms", "wino_ms", "predict_ms", "torch_ms", "ort_ms", "f/ort", "f/torch",
          "w/torch", "frozen_GF/s", "f_%mm", "ort_%mm", "MB")
WIDTHS = (10, 5, 3, 10, 10, 10, 10, 10, 6, 7, 7, 11, 6, 7, 6)


def _line(cells):
    first = [f"{c:<{w}}" for c, w in zip(cells[:1], WIDTHS[:1])]
    rest = [f"{c:>{w}}" for c, w in zip(cells[1:], WIDTHS[1:])]
    return " ".join(first + rest).rstrip()


def format_row(r):
    ms, pct = r["ms"], r["pct_matmul"]
    line = _line([r["net"], r["batch"], r["threads"], *(num(ms[i]) for i in IMPLS), num(r["frozen_vs_ort"], "{:.2f}"),
                  num(r["frozen_vs_torch"], "{:.2f}"), num(r["winograd_vs_torch"], "{:.2f}"),
                  num(r["rate"]["frozen"], "{:.1f}"),
                  num(pct["frozen"], "{:.0f}"), num(pct["ort"], "{:.0f}"), f"{r['memory_mb']:.1f}"])
    if not r["agree"]:
        worst = max(r["max_rel_err"], key=r["max_rel_err"].get)
        line += f"  DISAGREES: {worst} max rel err {r['max_rel_err'][worst]:.2g}"
    return line


def thread_counts(ctx):
    if ctx.opts.quick or ctx.tiny:
        return (ctx.threads,)
    return tuple(sorted({1, ctx.threads}))


def wanted(ctx):
    return True


def measure(ctx):
    mode = "tiny" if ctx.tiny else ("quick" if ctx.opts.quick else "full")
    notes = []
    ort, why = ort_module()
    if why:
        notes.append(why)
    torch = torch_module() if "torch" in ctx.impls else None
    if torch is None:
        notes.append("PyTorch is left out or not installed: the torch columns are empty")
    models, winograds = {}, {}
    for name in NETS:
        model = build(name)
        models[name] = (model, model.freeze())
        if name in WINOGRAD_NETS:
            winograds[name] = model.freeze(winograd=True)
    torch_nets = {name: to_torch(m, torch) for name, (m, _) in models.items()} if torch else {}
    onnx_files = {name: onnx_bytes(m) for name, (m, _) in models.items()} if ort else {}
    batches = TINY_BATCHES if ctx.tiny else BATCHES
    park = 0.01 if ctx.tiny else None
    for line in notes:
        ctx.say(line)
    ctx.say("times: median ms per call; f/ort, f/torch: frozen time / other time (below 1 frozen is faster); "
            "wino: frozen with winograd=True (opt-in; nets with 3x3 convs of 32+ channels), w/torch its time / "
            "PyTorch's; GF/s and %mm (share of the float32 matmul rate at that thread count) count the convs' and "
            "linears' 2 x multiply-adds; MB: the frozen plan's weights and buffers")
    ctx.say(_line(HEADER))
    rows, rates = [], {}
    for threads in thread_counts(ctx):
        with SameThreads(threads):
            if threads == ctx.threads:
                rates[threads] = ctx.matmul_gflops
            else:
                rates[threads] = max(matmul_gflops(repeat=3, use_torch=torch is not None).values())
            sessions = {name: ort_session(ort, data, threads) for name, data in onnx_files.items()}
            for name in NETS:
                for batch in batches:
                    row = measure_case(name, batch, threads, *models[name], torch_nets.get(name),
                                       sessions.get(name), rates[threads], ctx.opts.repeat, TARGET_SECONDS[mode],
                                       park, winograds.get(name))
                    rows.append(row)
                    ctx.say(format_row(row))
    return {"rows": rows, "notes": notes, "matmul_gflops": {str(k): v for k, v in rates.items()},
            "threads": ctx.threads, "agreement": AGREEMENT, "summary": summarise(rows, ctx.threads)}


def summarise(rows, threads):
    """Per thread count: geomean and worst of frozen / ORT and frozen / PyTorch (time ratios), and of the
    Winograd plan's ratios over the nets it is timed on."""
    out = {}
    for n in sorted({r["threads"] for r in rows}):
        sel = [r for r in rows if r["threads"] == n]
        entry = {}
        for key in ("frozen_vs_ort", "frozen_vs_torch", "winograd_vs_ort", "winograd_vs_torch"):
            values = [r[key] for r in sel if r[key] is not None]
            entry[key] = {"geomean": geomean(values), "worst": max(values) if values else None}
        out[str(n)] = entry
    return out


def summary(result, ctx):
    lines = ["inference, frozen time / other time (below 1 frozen is faster), geomean and worst over nets x batches"]
    for n, entry in result["summary"].items():
        o, t = entry["frozen_vs_ort"], entry["frozen_vs_torch"]
        lines.append(f"  {n} thread{'s' if n != '1' else ''}: vs ONNX Runtime {num(o['geomean'], '{:.2f}')} "
                     f"(worst {num(o['worst'], '{:.2f}')}), vs PyTorch {num(t['geomean'], '{:.2f}')} "
                     f"(worst {num(t['worst'], '{:.2f}')})")
        w, wo = entry.get("winograd_vs_torch", {}), entry.get("winograd_vs_ort", {})
        if w.get("geomean") is not None or wo.get("geomean") is not None:
            lines.append(f"    winograd=True ({', '.join(WINOGRAD_NETS)}): vs ONNX Runtime "
                         f"{num(wo.get('geomean'), '{:.2f}')} (worst {num(wo.get('worst'), '{:.2f}')}), vs PyTorch "
                         f"{num(w.get('geomean'), '{:.2f}')} (worst {num(w.get('worst'), '{:.2f}')})")
    bad = [r for r in result["rows"] if not r["agree"]]
    if bad:
        lines.append("  outputs that disagree with the engine's forward: "
                     + ", ".join(f"{r['net']} batch {r['batch']}" for r in bad))
    lines += [f"  ({note})" for note in result["notes"]]
    return lines


def comparisons(result):
    """Speedups of the frozen plan at the run's thread count (above 1: frozen is faster)."""
    entry = result["summary"].get(str(result["threads"]), {})

    def inv(v):
        return 1 / v if v else None
    out = []
    for key, label in (("ort", "ONNX Runtime"), ("torch", "PyTorch")):
        e = entry.get(f"frozen_vs_{key}", {})
        out.append(dict(key=f"inference_vs_{key}", label=f"inference, frozen speedup vs {label} (geomean)",
                        value=inv(e.get("geomean")), unit="x"))
        out.append(dict(key=f"inference_vs_{key}_worst", label=f"inference, frozen speedup vs {label} (worst)",
                        value=inv(e.get("worst")), unit="x"))
    return out
