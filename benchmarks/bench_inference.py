"""Inference benchmark: whole small CNNs (the CIFAR-shaped net, LeNet-5, a depthwise-separable net and a VGG-style
compute-bound net, 32x32x3 input) through convengine's frozen plan and `model.predict`, PyTorch (eval mode,
inference_mode) and ONNX Runtime (CPU provider, sequential execution, intra-op threads = convengine's thread
count), at batch 1 and 64, same weights.

The nets, the PyTorch copy and the ONNX export are defined once, in `convengine.bench.inference` (which also gives
`python -m convengine bench` its inference section); here pytest-benchmark times them. PyTorch and ONNX Runtime
(with onnx) are optional: their benchmarks are skipped without them. CONVENGINE_BENCH_SMOKE=1 runs batch 1 and 2.
"""
import os

import numpy as np
import pytest

import convengine
from convengine.bench import inference
from convengine.bench.timing import torch_module

SMOKE = os.environ.get("CONVENGINE_BENCH_SMOKE", "") not in ("", "0")
BATCHES = inference.TINY_BATCHES if SMOKE else inference.BATCHES
ORT, ORT_MISSING = inference.ort_module()

IMPLS = [
    "frozen",
    "predict",
    pytest.param("torch", marks=pytest.mark.skipif(torch_module() is None, reason="PyTorch not installed")),
    pytest.param("ort", marks=pytest.mark.skipif(ORT is None, reason=ORT_MISSING or "")),
]


@pytest.fixture(scope="module")
def nets():
    """name -> (engine model, frozen plan, frozen plan with winograd=True on inference.WINOGRAD_NETS, else None);
    the PyTorch copies and ONNX sessions are made when first asked for."""
    return {name: (model, model.freeze(), model.freeze(winograd=True) if name in inference.WINOGRAD_NETS else None)
            for name, model in ((n, inference.build(n)) for n in inference.NETS)}


@pytest.fixture(scope="module")
def twins(nets):
    made = {}

    def get(impl, name):
        key = (impl, name)
        if key not in made:
            model = nets[name][0]
            if impl == "torch":
                made[key] = inference.to_torch(model, torch_module())
            else:
                made[key] = inference.ort_session(ORT, inference.onnx_bytes(model), convengine.get_num_threads())
        return made[key]
    return get


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(inference.NETS))
@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, nets, twins, impl, name, batch):
    model, frozen, _ = nets[name]
    x = np.random.default_rng(batch).standard_normal((batch,) + inference.INPUT_SHAPE, dtype=np.float32)
    calls = inference.calls_for(model, frozen, x, twins("torch", name) if impl == "torch" else None,
                                twins("ort", name) if impl == "ort" else None)
    _time(benchmark, model, calls[impl], x, name, batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(inference.WINOGRAD_NETS))
def test_inference_winograd(benchmark, nets, name, batch):
    """The opt-in plan, freeze(winograd=True), on the nets where it differs from the default one."""
    model, frozen, winograd = nets[name]
    x = np.random.default_rng(batch).standard_normal((batch,) + inference.INPUT_SHAPE, dtype=np.float32)
    _time(benchmark, model, inference.calls_for(model, frozen, x, winograd=winograd)["winograd"], x, name, batch)


def _time(benchmark, model, call, x, name, batch):
    expected = np.asarray(model.forward(x, training=False), np.float64)
    assert inference.relative_errors({"call": call}, expected)["call"] <= inference.AGREEMENT
    benchmark.group = f"inference {name} batch {batch}"
    benchmark.extra_info["gflop"] = inference.flops(model) * batch / 1e9
    benchmark.extra_info["threads"] = convengine.get_num_threads()
    benchmark(call)
