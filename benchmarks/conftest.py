"""pytest-benchmark setup for `python -m pytest benchmarks/` (run and compare commands: README.md here).

The modules here are named bench_*.py so that the test run (`testpaths = ["tests"]` in pyproject.toml) never
collects them; the hook below collects them when benchmarks/ is named on the command line. Every implementation
runs at convengine's thread count: PyTorch through torch.set_num_threads, numpy's BLAS (which the reference
uses) through threadpoolctl. The shapes and calls come from `convengine.bench.cases`, shared with
`python -m convengine bench`. CONVENGINE_BENCH_SMOKE=1 swaps the default shapes for tiny ones, so that a smoke run
(`--benchmark-disable`) takes seconds.
"""
import os

import pytest

import convengine
from convengine.bench import cases, machine, timing

SMOKE = os.environ.get("CONVENGINE_BENCH_SMOKE", "") not in ("", "0")
CONV_CASES = cases.TINY_CONV_CASES if SMOKE else cases.CONV_CASES
POOL_CASES = cases.TINY_POOL_CASES if SMOKE else cases.POOL_CASES
# The reference takes up to a few tenths of a second per call on the big shapes: a fixed 3 rounds there.
REFERENCE_ROUNDS_BIG = 3


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs (--benchmark-save) carry what --benchmark-compare needs to tell builds and machines apart."""
    info = machine.machine_info(convengine.get_num_threads())
    machine_info["convengine"] = info["convengine"]
    machine_info["numpy"] = info["numpy"]
    machine_info["torch"] = info["torch"]
    machine_info["processor_model"] = info["processor"]


@pytest.fixture(scope="session", autouse=True)
def same_threads():
    """Reference (numpy's BLAS), engine and PyTorch at one thread count for the whole session."""
    with timing.SameThreads(convengine.get_num_threads()) as threads:
        yield threads.n


IMPL_PARAMS = [
    "reference",
    "engine",
    pytest.param("torch", marks=pytest.mark.skipif(timing.torch_module() is None, reason="PyTorch not installed")),
]


@pytest.fixture(params=IMPL_PARAMS)
def impl(request):
    return request.param


def pytest_generate_tests(metafunc):
    """`conv_case` and `pool_case` run over the default shapes (the tiny ones in smoke mode)."""
    if "conv_case" in metafunc.fixturenames:
        metafunc.parametrize("conv_case", CONV_CASES, ids=[c.name for c in CONV_CASES])
    if "pool_case" in metafunc.fixturenames:
        metafunc.parametrize("pool_case", POOL_CASES, ids=[f"{c.op}:{c.name}" for c in POOL_CASES])


@pytest.fixture
def timed(benchmark, impl):
    """timed(case, call, group, work, unit): time `call` alone under `group`, with the work per call (GFLOP or GB)
    saved beside the timings. The reference on a big shape gets a fixed few rounds instead of pytest-benchmark's
    calibration, which would spend seconds per test on it."""
    def run(case, call, group, work, unit):
        benchmark.group = group
        benchmark.extra_info[unit] = work
        benchmark.extra_info["shape"] = case.name
        if impl == "reference" and case.big:
            benchmark.pedantic(call, rounds=REFERENCE_ROUNDS_BIG, iterations=1, warmup_rounds=1)
        else:
            benchmark(call)
    return run
