"""Training benchmark: seconds per epoch of the default digits net (`convengine.model.lenet()` on the embedded 8x8
digits, batch 32, SGD with momentum and weight decay, cross-entropy), convengine against the same network, batch
and optimizer in PyTorch (when installed), at one thread count.

The epochs are defined once, in `convengine.bench.training` (which also gives `python -m convengine bench` its
training section); here pytest-benchmark times them. CONVENGINE_BENCH_SMOKE=1 trains on 256 images, so the smoke
run takes a moment.
"""
import os

import numpy as np
import pytest

import convengine
from convengine.bench import training
from convengine.bench.timing import torch_module
from convengine.model import lenet

SMOKE = os.environ.get("CONVENGINE_BENCH_SMOKE", "") not in ("", "0")


@pytest.fixture(scope="module")
def digits_train():
    return training.training_data(256 if SMOKE else None)


@pytest.mark.parametrize("impl", [
    "engine",
    pytest.param("torch", marks=pytest.mark.skipif(torch_module() is None, reason="PyTorch not installed")),
])
def test_train_epoch(benchmark, impl, digits_train):
    x, y = digits_train
    run = training.EPOCHS[impl](x, y)
    benchmark.group = f"train epoch digits lenet batch {training.BATCH_SIZE}"
    benchmark.extra_info["images"] = int(len(x))
    benchmark.extra_info["threads"] = convengine.get_num_threads()
    # One warm-up epoch: the first pays for allocations and, in PyTorch, for one-time setup.
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def test_engine_and_torch_train_the_same_network(digits_train):
    """The comparison is fair only if both sides train the same network: same parameter shapes, same output."""
    torch = pytest.importorskip("torch")
    model = lenet()
    net = training.torch_lenet(torch, (1, 8, 8), 10)
    assert [tuple(p.data.shape) for p in model.parameters()] == [tuple(p.shape) for p in net.parameters()]
    with torch.no_grad():
        for p, q in zip(model.parameters(), net.parameters()):
            q.copy_(torch.from_numpy(p.data))
    net.eval()
    x = digits_train[0][:16]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-4, atol=1e-5)
