"""Report section: subnormal inputs. Per op, the time with normal inputs, with 1% and with 100% of the inputs
subnormal (float32 magnitudes between 1e-40 and 1e-38), with the engine's flush-to-zero mode on (the default) and
off (`convengine.set_flush_denormal(False)`: IEEE gradual underflow), and each as a ratio to the normal inputs'
time at the same setting (1.0: no penalty). Plus a training step (forward, cross-entropy, backward, SGD with
momentum) of a small conv net whose weights and data are scaled by 1e-39 into the subnormal range, against the
same step at normal scale.

Ops (float32): conv2d forward and backward (32, 64, 16, 16) -> 64, 3x3, padding 1 (backward: grad_out and x
subnormal), and forward with x and w scaled by 1e-19 ("products": normal inputs whose products are subnormal);
max and average pooling 2x2; relu; batch norm forward (batch statistics) and backward; linear (256 x 1024) @
(1024 x 1024). All variants of one op are timed in the same rounds, in rotating order, so that load on the machine
affects them alike, and ordered so that no call directly follows one on the same data (which would find its
input in cache and read faster). The tiny run uses small shapes.

How much a subnormal costs depends on the CPU: on Intel cores an arithmetic instruction that meets one takes a
microcode assist of a hundred cycles or more; AMD Zen cores pay far less. The report states what it measured.
"""
import numpy as np

from .. import _random
from .. import functional as F
from .._fpmode import get_flush_denormal, set_flush_denormal
from .._kernels import engine as _engine
from ..layers import Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from ..losses import CrossEntropyLoss
from ..model import Sequential
from ..optim import SGD
from .kernels import num
from .timing import calls_for_seconds, median_ms, ratio, time_interleaved

NAME = "subnormal"
TITLE = "subnormal inputs: time per op with 1% and 100% subnormal inputs, flushing on and off"

VARIANTS = ("normal", "1%", "100%", "products")
FRACTIONS = {"normal": 0.0, "1%": 0.01, "100%": 1.0}
SUBNORMAL_LOW, SUBNORMAL_HIGH = 1e-40, 1e-38     # float32 subnormals: below 1.18e-38
PRODUCT_SCALE = np.float32(1e-19)                  # normal inputs, subnormal products (1e-19 * 1e-19 = 1e-38)
TRAIN_SCALE = np.float32(1e-39)
# Seconds of calls per op, variant and setting (at least the run's --repeat calls).
TARGET_SECONDS = {"full": 0.3, "quick": 0.05, "tiny": 0.0}

FULL_SHAPES = dict(conv=(32, 64, 16, 16, 64), pool=(32, 64, 32, 32), eltwise=(32, 64, 32, 32),
                   linear=(256, 1024, 1024), train=(32, 3, 32, 32))
TINY_SHAPES = dict(conv=(4, 16, 8, 8, 16), pool=(4, 8, 12, 12), eltwise=(4, 8, 12, 12), linear=(16, 64, 64),
                   train=(4, 3, 8, 8))


def with_subnormals(a, fraction, rng):
    """A copy of float32 `a` with `fraction` of its elements (chosen at random; all for 1.0) replaced by
    subnormal numbers of random sign and magnitude in [SUBNORMAL_LOW, SUBNORMAL_HIGH)."""
    out = np.array(a, np.float32)
    if fraction <= 0:
        return out
    flat = out.reshape(-1)
    count = flat.size if fraction >= 1 else max(1, round(fraction * flat.size))
    where = np.arange(flat.size) if count == flat.size else rng.choice(flat.size, count, replace=False)
    tiny = rng.uniform(SUBNORMAL_LOW, SUBNORMAL_HIGH, count) * rng.choice((-1.0, 1.0), count)
    flat[where] = tiny.astype(np.float32)
    return out


def op_calls(shapes, rng):
    """op -> variant -> zero-argument callable, the data of each built beforehand."""
    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def variants(make):
        """variant -> call for the three input fractions; make(fraction) returns the call."""
        return {v: make(f) for v, f in FRACTIONS.items()}

    n, c, h, w, k = shapes["conv"]
    x, wc, gy = randn(n, c, h, w), randn(k, c, 3, 3) * np.float32(0.1), randn(n, k, h, w)

    def conv_forward(f):
        xs = with_subnormals(x, f, rng)
        return lambda: F.conv2d(xs, wc, padding=1)

    def conv_backward(f):
        xs, gs = with_subnormals(x, f, rng), with_subnormals(gy, f, rng)
        return lambda: F.conv2d_backward(gs, xs, wc, padding=1)

    xp, wp = x * PRODUCT_SCALE, wc * PRODUCT_SCALE
    ops = {"conv2d forward": {**variants(conv_forward), "products": lambda: F.conv2d(xp, wp, padding=1)},
           "conv2d backward": variants(conv_backward)}

    xpool = randn(*shapes["pool"])

    def pool(kind, f):
        xs = with_subnormals(xpool, f, rng)
        if kind == "max":
            return lambda: F.max_pool2d(xs, 2, return_indices=True)
        return lambda: F.avg_pool2d(xs, 2)
    ops["max_pool2d forward"] = variants(lambda f: pool("max", f))
    ops["avg_pool2d forward"] = variants(lambda f: pool("avg", f))

    xe = randn(*shapes["eltwise"])
    ge = randn(*shapes["eltwise"])

    def relu(f):
        xs = with_subnormals(xe, f, rng)
        return lambda: F.relu(xs)
    ops["relu forward"] = variants(relu)

    ch = shapes["eltwise"][1]
    gamma, beta = rng.uniform(0.5, 1.5, ch).astype(np.float32), rng.normal(0, 0.1, ch).astype(np.float32)

    def bn_forward(f):
        xs = with_subnormals(xe, f, rng)
        return lambda: F.batch_norm2d_training(xs, gamma, beta)

    def bn_backward(f):
        xs, gs = with_subnormals(xe, f, rng), with_subnormals(ge, f, rng)
        _, mean, var = F.batch_norm2d_training(xs, gamma, beta)
        return lambda: F.batch_norm2d_backward(gs, xs, gamma, mean, var)
    ops["batch_norm2d forward"] = variants(bn_forward)
    ops["batch_norm2d backward"] = variants(bn_backward)

    m, fin, fout = shapes["linear"]
    xl, wl, bl = randn(m, fin), randn(fout, fin) * np.float32(fin ** -0.5), randn(fout)

    def linear(f):
        xs = with_subnormals(xl, f, rng)
        return lambda: F.linear(xs, wl, bl)
    ops["linear forward"] = {**variants(linear),
                             "products": lambda: F.linear(xl * PRODUCT_SCALE, wl * PRODUCT_SCALE)}
    return ops


def training_step(shape, scale, seed=0):
    """A zero-argument callable: one training step of a small conv net (conv3x3 16-ReLU-maxpool-conv3x3 32-ReLU,
    global average pool, linear 10; cross-entropy; SGD with momentum) whose weights and data are multiplied by
    `scale`, from the same starting weights and optimizer state each time. The callable's `model` and `x` are the
    net and the batch."""
    n, c, h, w = shape
    _random.manual_seed(seed)
    model = Sequential([Conv2d(c, 16, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(16, 32, 3, padding=1), ReLU(),
                        GlobalAvgPool2d(), Linear(32, 10)], input_shape=(c, h, w))
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = (p.data if p.data.any() else rng.standard_normal(p.data.shape)) * scale
    x = rng.standard_normal(shape, dtype=np.float32) * scale
    y = rng.integers(0, 10, n)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = CrossEntropyLoss()
    start = [p.data.copy() for p in model.parameters()]

    def step():
        for p, s in zip(model.parameters(), start):
            np.copyto(p.data, s)
        for v in opt.state["momentum"]:
            v[...] = 0
        opt.zero_grad()
        loss(model.forward(x, training=True), y)
        model.backward(loss.backward())
        opt.step()
    step.model, step.x = model, x
    return step


def flushing(flag, call):
    def run():
        set_flush_denormal(flag)
        return call()
    return run


def wanted(ctx):
    if not _engine.FLUSH_SUPPORTED:
        return "this architecture has no flush-to-zero mode"
    return True


def measure(ctx):
    shapes = TINY_SHAPES if ctx.tiny else FULL_SHAPES
    seconds = TARGET_SECONDS["tiny" if ctx.tiny else ("quick" if ctx.opts.quick else "full")]
    rng = np.random.default_rng(0)
    before = get_flush_denormal()
    rows = []
    ctx.say("median ms per call with normal inputs, 1% and 100% subnormal inputs (and, for conv2d forward and "
            "linear, normal inputs whose products are subnormal); x: ratio to normal inputs at the same setting")
    ctx.say(_line(HEADER))
    try:
        ops = op_calls(shapes, rng)
        ops["training step"] = {"normal": training_step(shapes["train"], np.float32(1)),
                                "100%": training_step(shapes["train"], TRAIN_SCALE)}
        for op, variants in ops.items():
            # flag-major order: no call directly follows one on the same data, which would find it in cache
            calls = {(op, v, flag): flushing(flag, call) for flag in (True, False) for v, call in variants.items()}
            repeats = calls_for_seconds(calls, ctx.opts.repeat, seconds)
            # every variant gets as many calls as the slowest needs: the rounds stay interleaved to the end
            times = time_interleaved(calls, dict.fromkeys(calls, min(repeats.values())), warmup=0, park=0)
            for flag in (True, False):
                ms = {v: median_ms(times[(op, v, flag)]) if (op, v, flag) in times else None for v in VARIANTS}
                row = {"op": op, "flush": flag, "ms": ms,
                       "vs_normal": {v: ratio(ms[v], ms["normal"]) for v in VARIANTS if v != "normal"}}
                rows.append(row)
                ctx.say(format_row(row))
    finally:
        set_flush_denormal(before)
    return {"rows": rows, "summary": summarise(rows)}


HEADER = ("op", "flush", "normal_ms", "1%_ms", "100%_ms", "prod_ms", "x1%", "x100%", "xprod")
WIDTHS = (22, 5, 10, 10, 10, 10, 7, 7, 7)


def _line(cells):
    return " ".join([f"{cells[0]:<{WIDTHS[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], WIDTHS[1:])]).rstrip()


def format_row(r):
    ms, x = r["ms"], r["vs_normal"]
    return _line([r["op"], "on" if r["flush"] else "off", *(num(ms[v]) for v in VARIANTS),
                  *(num(x[v], "{:.2f}") for v in VARIANTS[1:])])


def summarise(rows):
    """Per flush setting: the largest ratio to normal inputs over the ops (the training step apart), and the
    training step's ratio."""
    out = {}
    for flag in (True, False):
        sel = [r for r in rows if r["flush"] == flag]
        ops = [r for r in sel if r["op"] != "training step"]
        worst = max(((v, r["op"], k) for r in ops for k, v in r["vs_normal"].items() if v is not None),
                    default=(None, None, None))
        train = next((r["vs_normal"]["100%"] for r in sel if r["op"] == "training step"), None)
        out["on" if flag else "off"] = {"worst": worst[0], "worst_op": worst[1], "worst_variant": worst[2],
                                        "training_step": train}
    return out


def summary(result, ctx):
    lines = ["subnormal inputs, time / time with normal inputs (1.0: no penalty)"]
    for setting, s in result["summary"].items():
        lines.append(f"  flushing {setting}: worst op {num(s['worst'], '{:.2f}')} ({s['worst_op']}, "
                     f"{s['worst_variant']}), training step with subnormal weights and data "
                     f"{num(s['training_step'], '{:.2f}')}")
    return lines


def comparisons(result):
    """Slowdowns (above 1x: slower than with normal inputs)."""
    s = result["summary"]
    return [dict(key="subnormal_worst_flush_on", label="subnormal inputs, worst op slowdown, flushing on",
                 value=s["on"]["worst"], unit="x"),
            dict(key="subnormal_train_flush_on", label="subnormal training step slowdown, flushing on",
                 value=s["on"]["training_step"], unit="x"),
            dict(key="subnormal_worst_flush_off", label="subnormal inputs, worst op slowdown, flushing off",
                 value=s["off"]["worst"], unit="x")]
