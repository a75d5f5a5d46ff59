"""Subnormal numbers inside the engine: flushed to zero by default (FTZ|DAZ), IEEE when asked, and the caller's own
floating-point mode left exactly as it was, in the calling thread and in every OpenMP worker.

The inputs are big enough that every op runs on 2 threads (above functional's serial thresholds), so the worker
threads really enter and leave the mode. Allocation failures are injected through the kernels' test hook to check
that a failing scratch allocation in any thread is an error, never a silently wrong result.
"""
import threading

import numpy as np
import pytest

import convengine
from convengine import functional as F
from convengine import reference as R
from convengine._kernels import engine
from convengine.layers import Parameter
from convengine.optim import SGD, Adam

from conftest import assert_bitwise_equal, assert_close, randn

pytestmark = pytest.mark.skipif(not engine.FLUSH_SUPPORTED, reason="no flush-to-zero mode on this architecture")

TINY = {np.float32: np.float32(1e-39), np.float64: np.float64(1e-310)}   # subnormal in each dtype
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def two_threads_flushing():
    threads, flag = convengine.get_num_threads(), convengine.get_flush_denormal()
    convengine.set_num_threads(2)
    convengine.set_flush_denormal(True)
    yield
    convengine.set_num_threads(threads)
    convengine.set_flush_denormal(flag)
    engine.fail_allocation_after(-1)


def numpy_keeps_subnormals(dtype=np.float32):
    """True when NumPy in this thread computes with IEEE subnormals (the caller's mode was left alone)."""
    tiny = np.finfo(dtype).tiny
    return np.multiply(np.array([tiny], dtype), dtype(0.5))[0] != 0


def calls(dtype, rng, randn=randn):
    """One call of every compiled op on inputs large enough for 2 threads, each as name -> callable; randn(rng,
    shape, dtype) makes the float inputs."""
    x = randn(rng, (4, 16, 32, 34), dtype)
    w = randn(rng, (16, 16, 3, 3), dtype) * dtype(0.1)
    w1 = randn(rng, (16, 1, 3, 3), dtype)
    gy = randn(rng, (4, 16, 32, 34), dtype)
    xl = randn(rng, (256, 256), dtype)
    wl = randn(rng, (128, 256), dtype)
    gl = randn(rng, (256, 128), dtype)
    ones = np.ones(16, dtype)
    zeros = np.zeros(16, dtype)
    _, mean, var = F.batch_norm2d_training(x, ones, zeros)
    y, idx = F.max_pool2d(x, 2, return_indices=True)

    def optimizer_step(make, steps=2):
        """A fresh optimizer over copies of (xl, w), `steps` steps with gradients taken from xl and gy."""
        params = [Parameter("a", xl.copy()), Parameter("b", w.copy())]
        opt = make(params)
        for _ in range(steps):
            params[0].grad[...] = xl[::-1]
            params[1].grad[...] = gy.reshape(-1)[:w.size].reshape(w.shape)
            opt.step()
        return tuple(p.data for p in params) + tuple(a for slot in opt.state.values() for a in slot)
    return {
        "conv2d": lambda: F.conv2d(x, w, padding=1),
        "conv2d_backward": lambda: F.conv2d_backward(gy, x, w, padding=1),
        "conv2d_depthwise": lambda: F.conv2d(x, w1, padding=1, groups=16),
        "conv2d_depthwise_backward": lambda: F.conv2d_backward(gy, x, w1, padding=1, groups=16),
        "conv2d_strided": lambda: F.conv2d(x, w, stride=2, padding=1),
        "conv2d_strided_backward": lambda: F.conv2d_backward(gy[:, :, :16, :17], x, w, stride=2, padding=1),
        "conv2d_first_layer": lambda: F.conv2d(x[:, :3, :, :32], w[:, :3], padding=1),        # smallc
        "conv2d_first_layer_backward": lambda: F.conv2d_backward(gy, x[:, :3], w[:, :3], padding=1),
        "max_pool2d": lambda: F.max_pool2d(x, 3, stride=2, padding=1),
        "max_pool2d_2x2": lambda: F.max_pool2d(x, 2),
        "max_pool2d_backward": lambda: F.max_pool2d_backward(y, idx, x.shape),
        "avg_pool2d": lambda: F.avg_pool2d(x, 3, stride=1, padding=1),
        "avg_pool2d_backward": lambda: F.avg_pool2d_backward(gy, x.shape, 3, stride=1, padding=1),
        "relu": lambda: F.relu(x),
        "relu_backward": lambda: F.relu_backward(gy, x),
        "linear": lambda: F.linear(xl, wl),
        "linear_backward": lambda: F.linear_backward(gl, xl, wl),
        "batch_norm2d": lambda: F.batch_norm2d(x, ones, zeros, mean, var),
        "batch_norm2d_training": lambda: F.batch_norm2d_training(x, ones, zeros),
        "batch_norm2d_backward": lambda: F.batch_norm2d_backward(gy, x, ones, mean, var),
        "conv2d_relu": lambda: F._conv2d(x, w, padding=1, relu=True),
        "batch_norm2d_relu": lambda: F._batch_norm2d_relu(x, ones, zeros, mean, var),
        "batch_norm2d_relu_training": lambda: F._batch_norm2d_relu_training(x, ones, zeros),
        "batch_norm2d_relu_backward": lambda: F._batch_norm2d_relu_backward(gy, x, F.relu(x), ones, mean, var),
        "sgd_step": lambda: optimizer_step(lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        "adam_step": lambda: optimizer_step(lambda ps: Adam(ps, lr=0.01, weight_decay=0.01)),
    }


OPS = list(calls(np.float32, np.random.default_rng(0)))


def test_flush_is_the_default_and_reported():
    assert convengine.get_flush_denormal() is True
    assert convengine.build_info()["flush_denormal"] is True
    convengine.set_flush_denormal(False)
    assert convengine.get_flush_denormal() is False
    assert convengine.build_info()["flush_denormal"] is False


@pytest.mark.parametrize("bad", [1, 0, "yes", None, np.float32(1)])
def test_set_flush_denormal_takes_only_a_bool(bad):
    with pytest.raises(TypeError, match="flag"):
        convengine.set_flush_denormal(bad)
    assert convengine.get_flush_denormal() is True


def test_the_mode_is_on_inside_a_parallel_block_and_off_again_after():
    assert engine.team_flushing(2, True) == [1, 1]
    assert engine.team_flushing(2, False) == [0, 0]
    convengine.set_flush_denormal(False)
    assert engine.team_flushing(2, True) == [0, 0]


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("op", OPS)
def test_every_op_restores_the_mode_of_the_caller_and_the_workers(op, flag, rng):
    convengine.set_flush_denormal(flag)
    calls(np.float32, rng)[op]()
    assert not engine.thread_is_flushing()
    assert numpy_keeps_subnormals(np.float32) and numpy_keeps_subnormals(np.float64)
    assert engine.team_flushing(2, False) == [0, 0], "an OpenMP worker kept the engine's mode"


@pytest.mark.parametrize("op", ["conv2d", "max_pool2d", "batch_norm2d_backward", "linear"])
def test_the_mode_is_restored_after_a_failed_call(op, rng):
    run = calls(np.float32, rng)[op]
    engine.fail_allocation_after(0)
    with pytest.raises(MemoryError):
        run()
    engine.fail_allocation_after(-1)
    assert not engine.thread_is_flushing()
    assert engine.team_flushing(2, False) == [0, 0]


def test_a_thread_that_flushes_on_its_own_keeps_its_mode(rng):
    """The engine restores what it found, which is not always IEEE: a thread that already flushes keeps flushing
    after a call made with the setting off."""
    torch = pytest.importorskip("torch")
    convengine.set_flush_denormal(False)
    seen = {}

    def worker():
        torch.set_flush_denormal(True)
        try:
            before = engine.thread_is_flushing()
            calls(np.float32, np.random.default_rng(1))["conv2d"]()
            seen["kept"] = before and engine.thread_is_flushing()
        finally:
            torch.set_flush_denormal(False)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["kept"]
    assert not engine.thread_is_flushing()


def test_other_python_threads_keep_ieee_while_the_engine_runs(rng):
    """A thread doing NumPy arithmetic beside engine calls in another thread sees subnormals throughout."""
    run = calls(np.float32, rng)["conv2d"]
    stop = threading.Event()
    ok = []

    def numpy_user():
        while not stop.is_set():
            ok.append(numpy_keeps_subnormals())

    t = threading.Thread(target=numpy_user)
    t.start()
    for _ in range(20):
        run()
    stop.set()
    t.join()
    assert ok and all(ok)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_flushed_answers(dtype, rng):
    """Subnormal inputs read as zero and subnormal results become zero; with the setting off the engine agrees with
    the NumPy reference, which keeps them."""
    tiny = TINY[dtype]
    x = np.full((4, 16, 32, 34), tiny, dtype)
    w = np.ones((16, 16, 3, 3), dtype)
    flushed = {
        "conv2d": F.conv2d(x, w, padding=1),
        "avg_pool2d": F.avg_pool2d(x, 2),
        "relu": F.relu(x),
        "linear": F.linear(x.reshape(64, -1)[:, :256], np.ones((128, 256), dtype)),
    }
    for name, out in flushed.items():
        assert np.all(out == 0), f"{name}: subnormal input not flushed"
    # normal inputs whose products are subnormal
    small = np.full((4, 16, 32, 34), np.sqrt(np.finfo(dtype).tiny) * dtype(0.5), dtype)
    assert np.all(F.conv2d(small, np.full((16, 16, 3, 3), np.sqrt(np.finfo(dtype).tiny) * dtype(0.01), dtype)) == 0)

    convengine.set_flush_denormal(False)
    ieee = {
        "conv2d": (F.conv2d(x, w, padding=1), R.conv2d(x, w, padding=1)),
        "avg_pool2d": (F.avg_pool2d(x, 2), R.avg_pool2d(x, 2)),
        "relu": (F.relu(x), R.relu(x)),
    }
    for name, (got, want) in ieee.items():
        assert np.any(got != 0), f"{name}: subnormals flushed with the setting off"
        assert_close(got, want, name)


@pytest.mark.parametrize("op", OPS)
def test_subnormal_inputs_give_the_same_bits_on_any_thread_count(op):
    """Half the inputs subnormal: flushing happens per thread, so it must not make results depend on the team."""
    results = []
    for n in (1, 2):
        convengine.set_num_threads(n)
        rng = np.random.default_rng(7)
        out = calls(np.float32, rng, half_subnormal)[op]()
        results.append([a for a in (out if isinstance(out, tuple) else (out,)) if a is not None])
    for a, b in zip(*results):
        assert_bitwise_equal(a, b, f"{op}: 2 threads vs 1")


def half_subnormal(rng, shape, dtype=np.float64):
    """randn with half the values, at random positions, scaled into the subnormal range."""
    a = randn(rng, shape, dtype)
    a[rng.random(shape) < 0.5] *= TINY[dtype]
    return a


@pytest.mark.parametrize("op", OPS)
def test_a_failed_scratch_allocation_in_any_thread_is_an_error(op, rng):
    """The k-th scratch allocation of a 2-thread call fails, for every k the call makes: the call raises
    MemoryError or, where the op needs no scratch at that point, returns the right answer; never stale output."""
    run = calls(np.float32, rng)[op]
    expected = run()
    raised = 0
    for k in range(40):
        engine.fail_allocation_after(k)
        try:
            out = run()
        except MemoryError:
            raised += 1
            continue
        finally:
            left = engine.fail_allocation_after(-1)
        for a, b in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else
                        (expected,)):
            if a is not None:
                assert_bitwise_equal(a, b, f"{op}: allocation {k} failed silently")
        if left >= 0:
            break      # the countdown outlived the call: every allocation it makes has been failed once
    assert engine.thread_is_flushing() is False
