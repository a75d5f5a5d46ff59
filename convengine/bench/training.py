"""Report section: seconds per training epoch of the default digits net (`convengine.model.lenet()` on the
embedded 8x8 digits, batch 32, SGD with momentum and weight decay, cross-entropy), the engine against the same
network, batch and optimizer in PyTorch (when installed), at one thread count. Full runs only.

One call is one epoch over the 1,438 training images, shuffled, in training mode (batch norm statistics, dropout)
with an optimizer step per batch: `Trainer.fit(epochs=1)` for the engine, the equivalent loop for PyTorch. The
pytest-benchmark suite (`benchmarks/bench_train.py`) times the same two epochs.
"""
import statistics

from .. import _random
from ..data import load_digits
from ..losses import CrossEntropyLoss
from ..model import lenet
from ..optim import SGD
from ..trainer import Trainer
from .kernels import num
from .timing import SameThreads, time_interleaved, torch_module

NAME = "training"
TITLE = "training epoch of the default digits net"
BATCH_SIZE = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


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


def wanted(ctx):
    if ctx.opts.quick or ctx.tiny:
        return "full runs only (not --quick or the tiny shapes)"
    return True


def measure(ctx):
    return epoch_seconds(ctx.threads, use_torch="torch" in ctx.impls)


def summary(result, ctx):
    return [f"training, default digits net, median s/epoch: engine {num(result['engine_s'])}, "
            f"PyTorch {num(result['torch_s'])}, x_torch {num(result['speedup'], '{:.3g}')}"]


def comparisons(result):
    return [dict(key="train_vs_torch", label="training epoch, speedup vs PyTorch", value=result["speedup"],
                 unit="x")]
