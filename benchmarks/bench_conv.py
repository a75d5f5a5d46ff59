"""conv2d benchmarks: forward, grad_weight (weight and bias gradients: `conv2d_backward(...,
need_input_grad=False)`, PyTorch's convolution_backward with output_mask [False, True, True]) and backward (all
gradients). The engine has no call for the input gradient alone; it is backward minus grad_weight. One group per
op, direction and shape, so that reference, engine and PyTorch stand side by side."""
import numpy as np
import pytest

from convengine.bench import cases


@pytest.mark.parametrize("direction", cases.CONV_TIMED)
def test_conv2d(timed, impl, conv_case, direction):
    call = cases.conv_calls(impl, conv_case, np.random.default_rng(0))[direction]
    timed(conv_case, call, f"conv2d {direction} {conv_case.name}", conv_case.flops(direction) / 1e9, "gflop")
