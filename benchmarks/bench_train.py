"""Training benchmark: seconds per epoch of the default digits net (`convengine.model.lenet()` on the embedded 8x8
digits, batch 32, SGD with momentum and weight decay, cross-entropy), convengine against the same network, batch
and optimizer in PyTorch (when installed), at one thread count.

One call is one epoch over the 1,438 training images, shuffled, in training mode (batch norm statistics, dropout)
with an optimizer step per batch: `Trainer.fit(epochs=1)` for the engine, the equivalent loop for PyTorch.
`epoch_seconds(n_threads)` gives the same comparison to `python -m convengine bench` (median of interleaved
epochs). CONVENGINE_BENCH_SMOKE=1 trains on 256 images, so the smoke run takes a moment.
"""
import os
import statistics

import numpy as np
import pytest

import convengine
from convengine import _bench
from convengine.data import load_digits
from convengine.losses import CrossEntropyLoss
from convengine.model import lenet
from convengine.optim import SGD
from convengine.trainer import Trainer

SMOKE = os.environ.get("CONVENGINE_BENCH_SMOKE", "") not in ("", "0")
BATCH_SIZE = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def training_data():
    (x, y), _ = load_digits()
    if SMOKE:
        x, y = x[:256], y[:256]
    return x, y


def engine_epoch(x, y, seed=0):
    """A callable that trains one more epoch of the engine's default digits net each time it is called."""
    convengine.manual_seed(seed)
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
    torch = _bench.torch_module()
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


def epoch_seconds(n_threads, repeats=5):
    """{'engine_s', 'torch_s', 'speedup' (torch_s / engine_s), 'threads'}: median seconds per epoch, the two
    interleaved epoch by epoch after one warm-up epoch each; torch_s and speedup are None without PyTorch."""
    x, y = training_data()
    with _bench.SameThreads(n_threads):
        calls = {"engine": engine_epoch(x, y)}
        if _bench.torch_module() is not None:
            calls["torch"] = torch_epoch(x, y)
        times = _bench.time_interleaved(calls, {name: repeats for name in calls})
    engine_s = statistics.median(times["engine"])
    torch_s = statistics.median(times["torch"]) if "torch" in times else None
    return {"engine_s": engine_s, "torch_s": torch_s, "speedup": None if torch_s is None else torch_s / engine_s,
            "threads": n_threads}


@pytest.fixture(scope="module")
def digits_train():
    return training_data()


@pytest.mark.parametrize("impl", [
    "engine",
    pytest.param("torch", marks=pytest.mark.skipif(_bench.torch_module() is None, reason="PyTorch not installed")),
])
def test_train_epoch(benchmark, impl, digits_train):
    x, y = digits_train
    run = EPOCHS[impl](x, y)
    benchmark.group = f"train epoch digits lenet batch {BATCH_SIZE}"
    benchmark.extra_info["images"] = int(len(x))
    benchmark.extra_info["threads"] = convengine.get_num_threads()
    # One warm-up epoch: the first pays for allocations and, in PyTorch, for one-time setup.
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def test_engine_and_torch_train_the_same_network(digits_train):
    """The comparison is fair only if both sides train the same network: same parameter shapes, same output."""
    torch = pytest.importorskip("torch")
    model = lenet()
    net = torch_lenet(torch, (1, 8, 8), 10)
    assert [tuple(p.data.shape) for p in model.parameters()] == [tuple(p.shape) for p in net.parameters()]
    with torch.no_grad():
        for p, q in zip(model.parameters(), net.parameters()):
            q.copy_(torch.from_numpy(p.data))
    net.eval()
    x = digits_train[0][:16]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-4, atol=1e-5)
