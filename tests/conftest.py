"""Shared test helpers: tolerances per dtype, array layouts, a finite-difference gradient checker, the `impl` fixture
over the two tiers (reference and the compiled functional layer), and the hypothesis profiles.

HYPOTHESIS_PROFILE=long raises the number of drawn examples (the default profile keeps CI fast).
"""
import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The run's closing section: skipped tests grouped by what they need, with the command that enables them.
from skip_summary import pytest_terminal_summary  # noqa: F401

# The long tests, marked `slow` here in one place: `python -m pytest -m "not slow"` is the quick run for
# development, while the plain `python -m pytest` (CI, the README) runs everything. A whole file or one test
# (all its parametrizations). test_markers.py checks that every entry names a real test.
SLOW = {
    "test_fuzz.py": "property fuzzing of every op",
    "test_memory.py": "10,000 calls of each op and 1,000 training steps",
    "test_bench_smoke.py": "runs the speed report and the benchmark suite",
    "test_cli.py::test_default_training_reaches_97_percent": "20 epochs of the default training",
    "test_trainer.py::test_same_seed_gives_bitwise_identical_weights_at_one_and_two_threads": "trains four times",
    "test_trainer.py::test_resume_from_checkpoint_continues_identically": "trains twice, with a checkpoint",
    "test_sizes.py::test_zero_stride_inputs_past_2_31_are_handled": "element counts past 2^31",
    "test_sizes.py::test_avg_pool2d_huge_window_divisor": "huge windows, in subprocesses",
    "test_sizes.py::test_huge_strides": "huge strides, in subprocesses",
    "test_sizes.py::test_conv2d_huge_dilation_and_padding": "huge dilation and padding, in subprocesses",
    "test_model_files.py::test_members_inflating_to_hundreds_of_megabytes": "inflates hundreds of megabytes",
    "test_build.py::test_a_module_is_reused_only_when_nothing_changed": "compiles a module five times",
    "test_distributed.py::test_a_drawn_model_trains_to_the_same_bits_on_any_rank_count": "20 mpiexec jobs",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        name = getattr(item, "originalname", None) or item.name
        if file in SLOW or f"{file}::{name}" in SLOW:
            item.add_marker(pytest.mark.slow)

settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]

# Two tiers summing the same products in different orders agree to about sqrt(terms) roundings of the largest
# magnitude involved; atol is relative to the largest |expected| so that long sums of big values do not fail, while
# a wrong index or a missing term (an error of the size of one product) still does.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11),
}


def assert_close(actual, expected, err_msg=""):
    """Same type, dtype and shape, NaN in the same places, values equal to the dtype's tolerance."""
    assert isinstance(actual, np.ndarray), f"{err_msg}: got {type(actual).__name__}, not an ndarray"
    assert actual.dtype == expected.dtype, f"{err_msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{err_msg}: shape {actual.shape} != {expected.shape}"
    tol = TOLERANCE[np.dtype(expected.dtype)]
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.max(np.abs(expected[finite])))) if finite.any() else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True,
                               err_msg=err_msg)


def assert_bitwise_equal(actual, expected, err_msg=""):
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{err_msg}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}"
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), \
        f"{err_msg}: not bitwise equal, max |diff| {np.max(np.abs(actual - expected), initial=0)}"


# ---------------------------------------------------------------------------------------------------------------
# Tiers and data
# ---------------------------------------------------------------------------------------------------------------

IMPLS = ["reference", "functional"]


def load_impl(name):
    """The module of one tier. No importorskip: a functional layer that fails to import must fail the tests."""
    return importlib.import_module(f"convengine.{name}")


@pytest.fixture(params=IMPLS)
def impl(request):
    return load_impl(request.param)


# smallc: forward of 1-4 channel float32 inputs; pointwise: forward of 1x1 kernels at stride 1 without padding
CONV_PATHS = ["direct", "im2col", "pixels", "smallc", "pointwise"]


@pytest.fixture(params=CONV_PATHS)
def conv_path(request):
    """conv2d pinned to one strategy (`force_conv_path`) for the test, where the shape allows it, then back to the
    automatic choice."""
    from convengine._kernels import engine
    engine.force_conv_path(request.param)
    yield request.param
    engine.force_conv_path("auto")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so each test sees fixed data and a failure reproduces."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2 ** 32)
    return np.random.default_rng(seed)


def randn(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


LAYOUTS = ["contiguous", "noncontiguous", "negative_stride", "readonly", "fortran"]


def as_layout(a, layout):
    """The same values as `a`, held in the named memory layout."""
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "noncontiguous":
        # Every other element of a bigger buffer along each axis.
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative_stride":
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    if layout == "readonly":
        b = np.array(a)
        b.flags.writeable = False
        return b
    if layout == "fortran":
        return np.asfortranarray(a)
    raise ValueError(layout)


def conv_params_ok(x_shape, w_shape, stride, padding, dilation, groups):
    """Whether the arguments describe a valid conv2d (used to skip grid points with an empty output)."""
    from convengine._args import conv2d_geometry
    try:
        conv2d_geometry(x_shape, w_shape, stride, padding, dilation, groups)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------------------------

def numerical_gradient(loss, a, eps=1e-6):
    """d loss / d a by central differences, one element at a time (float64, tiny arrays only). `loss` reads `a`."""
    grad = np.zeros_like(a)
    flat = a.reshape(-1)  # a view: writing it perturbs a
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + eps
        up = loss()
        flat[k] = keep - eps
        down = loss()
        flat[k] = keep
        grad.reshape(-1)[k] = (up - down) / (2 * eps)
    return grad


def assert_gradient(analytic, loss, a, name):
    numeric = numerical_gradient(loss, a)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=f"gradient of {name}")


def stripes(rng, n=96):
    """A small generated classification problem: n noisy 6x6 images (N, 1, 6, 6) with a bright row (class 0) or a
    bright column (class 1), and their labels."""
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 1, 6, 6)).astype(np.float32)
    pos = rng.integers(0, 6, n)
    x[y == 0, 0, pos[y == 0], :] += 1.5
    x[y == 1, 0, :, pos[y == 1]] += 1.5
    return x, y


def weights(model):
    """Copies of every parameter and buffer (running statistics) of a model, in a fixed order."""
    return [p.data.copy() for p in model.parameters()] + [a.copy() for a in model.buffers().values()]


def assert_same_weights(a, b):
    """Two weights() lists hold the same bits."""
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()
