"""Report section: training speed, the engine against the same networks, batches and optimizer in PyTorch (when
installed). Full runs only.

- Steps: one training step (forward in training mode, cross-entropy, backward, SGD with momentum and weight decay)
  on a fixed batch of 64 random 32x32x3 images, for the nets of the inference section (`inference.NETS`): the
  CIFAR-shaped net (3x3 convs 3->32->64->128, each with batch norm and ReLU, two max pools, global average pool,
  linear), LeNet-5 and a depthwise-separable net. Median ms per step, images/s, GFLOP/s of the step's conv and
  linear work (forward, input gradient except the first layer's, weight gradient: see `step_flops`) and its share
  of the float32 matmul rate and of the build's multiply-add peak at the same thread count, at 1 thread and at the
  run's count; MB, the engine's
  training footprint (`Sequential.training_memory_bytes`).
  The VGG-style net (`EXTRA_STEP_NETS`) is timed beside them, outside their geometric means. For the nets with
  convs the opt-in Winograd takes (`inference.WINOGRAD_NETS`), also the step with `model.winograd = True`.
- Epoch: seconds per epoch of the default digits net (`convengine.model.lenet()` on the embedded 8x8 digits, batch
  32), at the run's thread count.

One call is one epoch over the 1,438 training images, shuffled, in training mode (batch norm statistics, dropout)
with an optimizer step per batch: `Trainer.fit(epochs=1)` for the engine, the equivalent loop for PyTorch. The
pytest-benchmark suite (`benchmarks/bench_train.py`) times the same two epochs.
"""
import statistics

import numpy as np

from .. import _random
from ..data import load_digits
from ..layers import Conv2d
from ..losses import CrossEntropyLoss
from ..model import lenet
from ..optim import SGD
from ..trainer import Trainer
from . import inference
from .kernels import num
from .timing import (SameThreads, fma_peak_gflops, geomean, matmul_gflops, median_ms, ratio, time_interleaved,
                     torch_module)

NAME = "training"
TITLE = "training steps of three small CNNs (batch 64) and an epoch of the default digits net"
BATCH_SIZE = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
STEP_NETS = ("cifar", "lenet5", "separable")
# Timed too in full runs, outside the geometric means of STEP_NETS (the targets): the compute-bound
# VGG-style net, where the opt-in Winograd step (all three of its wide convs' passes) differs most.
EXTRA_STEP_NETS = ("vgg",)
STEP_BATCH = 64


def training_data(images=None):
    """The digits training split, or its first `images` images."""
    (x, y), _ = load_digits()
    return (x, y) if images is None else (x[:images], y[:images])


def engine_epoch(x, y, seed=0):
    """A callable that trains one more epoch of the engine's default digits net each time it is called."""
    _random.manual_seed(seed)
    model = lenet(x.shape[1:], 10)
    trainer = Trainer(model, CrossEntropyLoss(),
                      SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))

    def run():
        trainer.fit(x, y, epochs=1, batch_size=BATCH_SIZE, seed=seed, verbose=0)
    return run


def torch_lenet(torch, input_shape, num_classes):
    """lenet() for small images, layer for layer, in PyTorch."""
    nn = torch.nn
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, num_classes))


def torch_epoch(x, y, seed=0):
    """The same epoch in PyTorch: shuffled mini-batches gathered from tensors, forward, loss, backward, step."""
    torch = torch_module()
    torch.manual_seed(seed)
    net = torch_lenet(torch, x.shape[1:], 10)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)

    def run():
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return run


EPOCHS = {"engine": engine_epoch, "torch": torch_epoch}


def epoch_seconds(n_threads, repeats=5, images=None, use_torch=True):
    """{'engine_s', 'torch_s', 'speedup' (torch_s / engine_s), 'threads'}: median seconds per epoch, the two
    interleaved epoch by epoch after one warm-up epoch each; torch_s and speedup are None without PyTorch."""
    x, y = training_data(images)
    with SameThreads(n_threads):
        calls = {"engine": engine_epoch(x, y)}
        if use_torch and torch_module() is not None:
            calls["torch"] = torch_epoch(x, y)
        times = time_interleaved(calls, {name: repeats for name in calls})
    engine_s = statistics.median(times["engine"])
    torch_s = statistics.median(times["torch"]) if "torch" in times else None
    return {"engine_s": engine_s, "torch_s": torch_s, "speedup": None if torch_s is None else torch_s / engine_s,
            "threads": n_threads, "images": int(len(x))}


# ---------------------------------------------------------------------------------------------------------------
# Training steps of the inference section's nets
# ---------------------------------------------------------------------------------------------------------------

def step_flops(model, batch):
    """Floating-point operations of one training step's convs and linears: 3x the forward's (forward, input
    gradient, weight gradient), less the first layer's input gradient, which neither side computes."""
    forward = inference.flops(model)
    first = model.layers[0]
    skipped = inference.flops(type(model)([first], input_shape=inference.INPUT_SHAPE)) if isinstance(first, Conv2d) \
        else 0
    return batch * (3 * forward - skipped)


def step_data(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + inference.INPUT_SHAPE, dtype=np.float32)
    return x, rng.integers(0, inference.NUM_CLASSES, batch)


def engine_step(name, batch=STEP_BATCH, seed=0, winograd=False):
    """A callable running one training step of net `name` on a fixed batch, and the model (with winograd, its
    convs opted in to Winograd F(2x2, 3x3): Sequential.winograd)."""
    model = inference.build(name, seed)
    model.winograd = winograd
    opt = SGD(model.parameters(), lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss = CrossEntropyLoss()
    x, y = step_data(batch, seed)

    def run():
        loss(model.forward(x, training=True), y)
        opt.zero_grad()
        model.backward(loss.backward())
        opt.step()
    return run, model


def torch_step(model, batch=STEP_BATCH, seed=0):
    """The same step in PyTorch, on a copy of the engine model `model`."""
    torch = torch_module()
    net = inference.to_torch(model, torch).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = step_data(batch, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def run():
        opt.zero_grad()
        loss_fn(net(xt), yt).backward()
        opt.step()
    return run


def step_rows(threads, repeats=9, batch=STEP_BATCH, nets=STEP_NETS, use_torch=True, matmul_rate=None,
              peak_rate=None):
    """Per net at `threads` threads: median ms per step of the engine and of PyTorch, their ratio (engine /
    PyTorch, below 1 is faster), images/s and GFLOP/s of the engine, and its % of the float32 matmul rate and of
    the build's multiply-add peak (each measured here at the same thread count unless given); for the nets with
    convs Winograd takes (inference.WINOGRAD_NETS), also the step with Sequential.winograd set (opt-in) and its
    ratio to PyTorch."""
    rows = []
    with SameThreads(threads):
        if matmul_rate is None:
            matmul_rate = max(matmul_gflops(use_torch=use_torch).values())
        if peak_rate is None:
            peak_rate = fma_peak_gflops()
        for name in nets:
            run, model = engine_step(name, batch)
            calls = {"engine": run}
            if name in inference.WINOGRAD_NETS:
                calls["winograd"] = engine_step(name, batch, winograd=True)[0]
            if use_torch and torch_module() is not None:
                calls["torch"] = torch_step(model, batch)
            times = time_interleaved(calls, {c: repeats for c in calls}, warmup=2, rounds=3)
            engine_ms = median_ms(times["engine"])
            torch_ms = median_ms(times["torch"]) if "torch" in times else None
            wino_ms = median_ms(times["winograd"]) if "winograd" in times else None
            gflops = step_flops(model, batch) / (engine_ms * 1e6)
            rows.append({"net": name, "threads": threads, "batch": batch, "engine_ms": engine_ms,
                         "torch_ms": torch_ms, "ratio": ratio(engine_ms, torch_ms), "wino_ms": wino_ms,
                         "wino_ratio": ratio(wino_ms, torch_ms),
                         "images_per_s": batch / engine_ms * 1e3, "gflops": gflops,
                         "matmul_pct": 100 * gflops / matmul_rate, "matmul_gflops": matmul_rate,
                         "peak_pct": 100 * gflops / peak_rate, "peak_gflops": peak_rate,
                         "memory_mb": model.training_memory_bytes(batch) / 1e6})
    return rows


STEP_HEADER = ("net", "thr", "engine_ms", "torch_ms", "eng/torch", "img/s", "GFLOP/s", "%matmul", "%peak", "MB",
               "wino_ms", "w/torch")
STEP_WIDTHS = (10, 3, 10, 10, 9, 7, 8, 8, 6, 6, 10, 8)


def format_step_row(r):
    cells = (r["net"], str(r["threads"]), num(r["engine_ms"]), num(r["torch_ms"]), num(r["ratio"], "{:.3g}"),
             num(r["images_per_s"], "{:.0f}"), num(r["gflops"], "{:.1f}"), num(r["matmul_pct"], "{:.0f}%"),
             num(r["peak_pct"], "{:.0f}%"),
             num(r["memory_mb"], "{:.0f}"), num(r.get("wino_ms")), num(r.get("wino_ratio"), "{:.3g}"))
    return "  ".join(c.rjust(w) for c, w in zip(cells, STEP_WIDTHS))


def wanted(ctx):
    if ctx.opts.quick or ctx.tiny:
        return "full runs only (not --quick or the tiny shapes)"
    return True


def measure(ctx):
    use_torch = "torch" in ctx.impls
    counts = sorted({1, ctx.threads})
    ctx.say(f"training steps, batch {STEP_BATCH} of 32x32x3 images, SGD with momentum:")
    ctx.say("  ".join(h.rjust(w) for h, w in zip(STEP_HEADER, STEP_WIDTHS)))
    steps = []
    for n in counts:
        rows = step_rows(n, repeats=ctx.opts.repeat or 9, nets=STEP_NETS + EXTRA_STEP_NETS, use_torch=use_torch,
                         matmul_rate=ctx.matmul_gflops if n == ctx.threads else None,
                         peak_rate=ctx.peak_gflops if n == ctx.threads else None)
        for r in rows:
            ctx.say(format_step_row(r))
        steps += rows
    result = epoch_seconds(ctx.threads, use_torch=use_torch)
    result["steps"] = steps
    return result


def summary(result, ctx):
    lines = [f"training, default digits net, median s/epoch: engine {num(result['engine_s'])}, "
             f"PyTorch {num(result['torch_s'])}, x_torch {num(result['speedup'], '{:.3g}')}"]
    for n in sorted({r["threads"] for r in result.get("steps", ())}):
        every = [r for r in result["steps"] if r["threads"] == n]
        rows = [r for r in every if r["net"] in STEP_NETS]
        lines.append(f"training steps at {n} thread(s), engine/PyTorch step time: "
                     + ", ".join(f"{r['net']} {num(r['ratio'], '{:.3g}')}" for r in rows)
                     + f" (geomean {num(geomean([r['ratio'] for r in rows]), '{:.3g}')}); "
                     + ", ".join(f"{r['net']} {r['matmul_pct']:.0f}%" for r in rows) + " of the matmul rate, "
                     + ", ".join(f"{r['net']} {r['peak_pct']:.0f}%" for r in rows)
                     + " of the multiply-add peak")
        extra = [r for r in every if r["net"] not in STEP_NETS]
        if extra:
            lines.append("  also " + ", ".join(f"{r['net']} {num(r['ratio'], '{:.3g}')}" for r in extra)
                         + " (outside the geomean)")
        wino = [r for r in every if r.get("wino_ms") is not None]
        if wino:
            lines.append("  winograd=True (" + ", ".join(r["net"] for r in wino) + "): step time / default "
                         + ", ".join(f"{r['net']} {num(ratio(r['wino_ms'], r['engine_ms']), '{:.3g}')}" for r in wino)
                         + ", / PyTorch "
                         + ", ".join(f"{r['net']} {num(r['wino_ratio'], '{:.3g}')}" for r in wino))
    return lines


def comparisons(result):
    out = [dict(key="train_vs_torch", label="training epoch, speedup vs PyTorch", value=result["speedup"],
                unit="x")]
    steps = result.get("steps", ())
    for n in sorted({r["threads"] for r in steps}):
        rows = [r for r in steps if r["threads"] == n and r["net"] in STEP_NETS]
        ratios = [r["ratio"] for r in rows]
        out.append(dict(key=f"train_step_speedup_{n}t", label=f"training steps at {n} thread(s), speedup vs "
                        f"PyTorch (geomean)", value=None if None in ratios else 1 / geomean(ratios), unit="x"))
    return out
