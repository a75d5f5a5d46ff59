"""Pooling benchmarks: max_pool2d (forward with indices, as training needs them) and avg_pool2d, forward and
backward. One group per op, direction and shape."""
import numpy as np
import pytest

from convengine.bench import cases


@pytest.mark.parametrize("direction", cases.POOL_DIRECTIONS)
def test_pool2d(timed, impl, pool_case, direction):
    call = cases.pool_calls(impl, pool_case, np.random.default_rng(0))[direction]
    timed(pool_case, call, f"{pool_case.op_name} {direction} {pool_case.name}", pool_case.bytes(direction) / 1e9,
          "gbyte")
