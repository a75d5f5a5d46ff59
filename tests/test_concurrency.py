"""Concurrency: the kernels release the GIL, so Python threads run them at once; that must change nothing.

- Four Python threads calling every op at the same time get exactly (bitwise) what one thread gets alone, each on
  its own inputs, so any state shared between calls would show as cross-talk.
- A process forked (multiprocessing 'fork') after the engine has run its OpenMP team can still run every op, and
  gets the parent's results; it must not hang (GNU libgomp's thread pool does not survive fork).
- set_num_threads() from one thread while another computes is safe, and results stay bitwise equal.
Every test runs with the one-thread threshold for small calls off (`_threads.every_call_threaded`), so that the
engine's thread count is the one each call really uses, and the parent of the fork test really starts its team.
"""
import multiprocessing
import threading

import numpy as np
import pytest

import convengine
from convengine import functional as F
from convengine._threads import every_call_threaded

from conftest import assert_bitwise_equal

N_THREADS = 4
ROUNDS = 8


@pytest.fixture(autouse=True)
def restore_threads():
    before = convengine.get_num_threads()
    with every_call_threaded():
        yield
    convengine.set_num_threads(before)


def make_inputs(seed, dtype):
    """Inputs of every op, big enough that one call takes a while and splits over the OpenMP team."""
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x = randn(4, 8, 20, 20)
    return dict(x=x, w=randn(16, 8, 3, 3), b=randn(16), go_conv=randn(4, 16, 10, 10),
                go_pool=randn(4, 8, 10, 10), go_relu=randn(4, 8, 20, 20),
                a=randn(32, 150), lw=randn(20, 150), lb=randn(20), go_lin=randn(32, 20))


def run_all_ops(d):
    """Every op, forward and backward, on one input set; the results as a flat list of arrays."""
    out = [F.conv2d(d["x"], d["w"], d["b"], stride=2, padding=1)]
    out += [g for g in F.conv2d_backward(d["go_conv"], d["x"], d["w"], stride=2, padding=1)]
    y, idx = F.max_pool2d(d["x"], 3, stride=2, padding=1, return_indices=True)
    out += [y, idx, F.max_pool2d_backward(d["go_pool"], idx, d["x"].shape)]
    out.append(F.avg_pool2d(d["x"], 3, stride=2, padding=1, count_include_pad=False))
    out.append(F.avg_pool2d_backward(d["go_pool"], d["x"].shape, 3, stride=2, padding=1, count_include_pad=False))
    out += [F.relu(d["x"]), F.relu_backward(d["go_relu"], d["x"])]
    out.append(F.linear(d["a"], d["lw"], d["lb"]))
    out += list(F.linear_backward(d["go_lin"], d["a"], d["lw"]))
    return out


def assert_same_results(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert_bitwise_equal(g, w, f"{what}, result {k}")


def run_in_threads(target, n):
    """Run target(i) in n threads started together; re-raise the first exception a thread hit."""
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait(timeout=30)
            target(i)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("engine_threads", [1, 2], ids=["omp1", "omp2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_python_threads_get_serial_results(dtype, engine_threads):
    convengine.set_num_threads(engine_threads)
    inputs = [make_inputs(i, dtype) for i in range(N_THREADS)]
    serial = [run_all_ops(d) for d in inputs]
    results = [[] for _ in range(N_THREADS)]

    def work(i):
        for _ in range(ROUNDS):
            results[i].append(run_all_ops(inputs[i]))

    run_in_threads(work, N_THREADS)
    for i in range(N_THREADS):
        assert len(results[i]) == ROUNDS
        for r, got in enumerate(results[i]):
            assert_same_results(got, serial[i], f"thread {i}, round {r}")


def test_threads_sharing_one_input_get_serial_results():
    """The same read-only arrays read by every thread at once (no thread may write to an input)."""
    d = make_inputs(7, np.float32)
    for a in d.values():
        a.flags.writeable = False
    serial = run_all_ops(d)
    results = [None] * N_THREADS

    def work(i):
        results[i] = [run_all_ops(d) for _ in range(ROUNDS)]

    run_in_threads(work, N_THREADS)
    for i in range(N_THREADS):
        for r, got in enumerate(results[i]):
            assert_same_results(got, serial, f"thread {i}, round {r}")


def test_set_num_threads_while_computing():
    d = make_inputs(3, np.float64)
    convengine.set_num_threads(1)
    serial = run_all_ops(d)
    stop = threading.Event()
    computed = []

    def compute(i):
        if i == 0:
            # The switcher: change the process-wide thread count as fast as it can while the others compute.
            counts = [1, 2, 3, 4]
            k = 0
            while not stop.is_set():
                convengine.set_num_threads(counts[k % len(counts)])
                k += 1
            return
        try:
            for _ in range(ROUNDS):
                computed.append(run_all_ops(d))
        finally:
            stop.set()

    run_in_threads(compute, 3)
    assert len(computed) >= ROUNDS
    for r, got in enumerate(computed):
        assert_same_results(got, serial, f"result {r} while the thread count changed")
    assert convengine.get_num_threads() in (1, 2, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# fork
# ---------------------------------------------------------------------------------------------------------------

FORK_TIMEOUT = 15


def _child(conn, threads):
    try:
        if threads is not None:
            convengine.set_num_threads(threads)
        conn.send(("ok", run_all_ops(make_inputs(11, np.float32))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def run_forked(threads):
    """Run every op in a forked child; (its results, None) or (None, why it failed)."""
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child_conn, threads), daemon=True)
    p.start()
    child_conn.close()
    got = None
    if parent_conn.poll(FORK_TIMEOUT):
        got = parent_conn.recv()
    p.join(timeout=5)
    if p.is_alive():
        p.kill()
        p.join()
        return None, f"the forked child hung (killed after {FORK_TIMEOUT} s), {threads or 'inherited'} threads"
    if got is None:
        return None, f"the forked child died with exit code {p.exitcode}"
    if got[0] != "ok":
        return None, f"the forked child raised {got[1]}"
    return got[1], None


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
@pytest.mark.parametrize("child_threads", [None, 1], ids=["inherited", "child1"])
def test_fork_after_openmp_team(child_threads):
    """The parent runs the OpenMP team (2 threads, even on one core), then forks; the child computes with the
    thread count it inherited (2) or with 1."""
    convengine.set_num_threads(2)
    d = make_inputs(11, np.float32)
    parent = run_all_ops(d)
    got, why = run_forked(child_threads)
    assert why is None, why
    assert_same_results(got, parent, "forked child")
    # And the parent is still fine afterwards.
    assert_same_results(run_all_ops(d), parent, "parent after fork")
