"""The optimizers' compiled step (every parameter in one parallel pass) against their NumPy rules: the same weights
and slots within float rounding, the same bits whatever the thread count, and the NumPy path where the arrays do not
allow the compiled one."""
import numpy as np
import pytest

import convengine
from convengine import layers as L
from convengine import optim
from convengine._threads import every_call_threaded

from conftest import assert_bitwise_equal, randn

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
]
# several parameters, one of them larger than a chunk of the compiled pass (16,384 values) and not a multiple of it
SHAPES = [(40000,), (7, 3, 3, 3), (1,), (300, 65)]


def train(name, kwargs, dtype, fused, seed=0, steps=4, threads=None):
    rng = np.random.default_rng(seed)
    params = [L.Parameter(f"p{i}", randn(rng, s, dtype)) for i, s in enumerate(SHAPES)]
    opt = getattr(optim, name)(params, **kwargs)
    opt.fused = fused
    grads = [[randn(rng, s, dtype) for s in SHAPES] for _ in range(steps)]
    with convengine.num_threads(threads or convengine.get_num_threads()), every_call_threaded():
        for gs in grads:
            opt.zero_grad()
            for p, g in zip(params, gs):
                p.grad += g
            opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, kwargs", CASES, ids=lambda c: str(c))
def test_fused_step_matches_the_numpy_rules(name, kwargs, dtype):
    fused, opt_f = train(name, kwargs, dtype, True)
    plain, opt_p = train(name, kwargs, dtype, False)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a.data, b.data, rtol=rtol, atol=rtol * 0.1, err_msg=a.name)
        assert a.data.dtype == dtype
    for slot in opt_p.state:
        for a, b in zip(opt_f.state[slot], opt_p.state[slot]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 0.1, err_msg=slot)
    # and the weights really moved
    start, _ = train(name, kwargs, dtype, True, steps=0)
    assert all(np.abs(a.data - s.data).max() > 1e-4 for a, s in zip(fused, start))


@pytest.mark.parametrize("name, kwargs", CASES, ids=lambda c: str(c))
def test_fused_step_gives_the_same_bits_on_any_thread_count(name, kwargs):
    one, _ = train(name, kwargs, np.float32, True, threads=1)
    two, _ = train(name, kwargs, np.float32, True, threads=2)
    three, _ = train(name, kwargs, np.float32, True, threads=3)
    for a, b, c in zip(one, two, three):
        assert_bitwise_equal(b.data, a.data, a.name)
        assert_bitwise_equal(c.data, a.data, a.name)


def test_arrays_the_compiled_pass_cannot_take_fall_back_to_numpy(rng):
    """A non-contiguous parameter (a view) or a gradient of another dtype: the NumPy rules run, same result."""
    base = randn(rng, (6, 8), np.float32)
    g = randn(rng, (6, 4), np.float32)
    p = L.Parameter("w", base[:, ::2])
    q = L.Parameter("w", base[:, ::2].copy())
    for param in (p, q):
        param.grad = g.copy()
    optim.SGD([p], lr=0.1, momentum=0.9).step()
    optim.SGD([q], lr=0.1, momentum=0.9).step()
    np.testing.assert_allclose(p.data, q.data, rtol=1e-6)
    assert not p.data.flags.c_contiguous and np.array_equal(base[:, ::2], p.data)   # updated in place, in the view
    r = L.Parameter("w", q.data.copy())
    r.grad = g.astype(np.float64)
    opt = optim.SGD([r], lr=0.1)
    assert opt._flat_arrays() is None
    opt.step()
    assert r.data.dtype == np.float32


def test_the_fused_step_updates_a_models_arrays_in_place(rng):
    model = convengine.model.lenet((1, 8, 8), 10)
    opt = optim.Adam(model.parameters(), lr=0.01)
    ids = [id(p.data) for p in model.parameters()]
    before = [p.data.copy() for p in model.parameters()]
    for p in model.parameters():
        p.grad[...] = randn(rng, p.data.shape, p.data.dtype)
    assert opt._flat_arrays() is not None
    opt.step()
    assert [id(p.data) for p in model.parameters()] == ids
    assert all(not np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))


def test_a_restored_state_is_what_the_fused_step_reads(rng):
    """load_state_dict replaces the slot arrays: the compiled step must use the new ones."""
    _, opt_a = train("Adam", dict(lr=0.01), np.float32, True, steps=2)
    params, opt_b = train("Adam", dict(lr=0.01), np.float32, True, steps=0)
    for p, q in zip(params, opt_a.params):
        p.data[...] = q.data
    opt_b.load_state_dict(*opt_a.state_dict())
    for opt in (opt_a, opt_b):
        for p in opt.params:
            p.grad[...] = 1
        opt.step()
    for p, q in zip(opt_a.params, opt_b.params):
        assert_bitwise_equal(p.data, q.data, p.name)
