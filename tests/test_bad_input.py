"""Bad input to every op raises ValueError or TypeError naming the argument (and the shapes), in both tiers.

Never a crash, never a silent wrong answer: each case runs the real call and checks the exception type and that the
message names what was wrong.
"""
import re

import numpy as np
import pytest

f32, f64 = np.float32, np.float64


def arr(*shape, dtype=f64):
    return np.ones(shape, dtype)


def shape_text(*shape):
    """How a shape appears in a message, as a regex."""
    return re.escape(str(tuple(shape)))


X = arr(2, 4, 6, 6)
W = arr(6, 4, 3, 3)
GO = arr(2, 6, 4, 4)              # conv2d(X, W) output shape
P = arr(2, 4, 3, 3)               # max_pool2d(X, 2) output shape
IDX = np.zeros((2, 4, 3, 3), np.int64)

# (id, call(mod), exception, regex the message must match)
CASES = [
    # conv2d: arrays
    ("conv-x-rank", lambda m: m.conv2d(arr(4, 6, 6), W), ValueError, r"x.*4-D.*" + shape_text(4, 6, 6)),
    ("conv-x-rank5", lambda m: m.conv2d(arr(1, 2, 4, 6, 6), W), ValueError, r"x.*4-D"),
    ("conv-w-rank", lambda m: m.conv2d(X, arr(6, 4, 3)), ValueError, r"weight.*4-D.*" + shape_text(6, 4, 3)),
    ("conv-channels", lambda m: m.conv2d(X, arr(6, 3, 3, 3)), ValueError,
     r"(?=.*weight)(?=.*" + shape_text(6, 3, 3, 3) + r")(?=.*" + shape_text(2, 4, 6, 6) + ")"),
    ("conv-dtypes", lambda m: m.conv2d(X, arr(6, 4, 3, 3, dtype=f32)), TypeError, r"weight.*float32"),
    ("conv-bias-dtype", lambda m: m.conv2d(X, W, arr(6, dtype=f32)), TypeError, r"bias.*float32"),
    ("conv-int-x", lambda m: m.conv2d(X.astype(np.int64), W), TypeError, r"x.*int64"),
    ("conv-int-both", lambda m: m.conv2d(X.astype(np.int32), W.astype(np.int32)), TypeError, r"x.*int32"),
    ("conv-float16", lambda m: m.conv2d(X.astype(np.float16), W.astype(np.float16)), TypeError, r"x.*float16"),
    ("conv-list-x", lambda m: m.conv2d(X.tolist(), W), TypeError, r"x.*ndarray.*list"),
    ("conv-list-w", lambda m: m.conv2d(X, W.tolist()), TypeError, r"weight.*ndarray.*list"),
    ("conv-none-x", lambda m: m.conv2d(None, W), TypeError, r"x.*ndarray"),
    ("conv-bias-shape", lambda m: m.conv2d(X, W, arr(5)), ValueError, r"bias.*" + shape_text(5)),
    ("conv-bias-rank", lambda m: m.conv2d(X, W, arr(6, 1)), ValueError, r"bias.*1-D"),
    ("conv-bias-list", lambda m: m.conv2d(X, W, [0.0] * 6), TypeError, r"bias.*ndarray"),
    # conv2d: hyper-parameters
    ("conv-groups-x", lambda m: m.conv2d(arr(2, 3, 6, 6), arr(6, 1, 3, 3), groups=2), ValueError,
     r"groups.*" + shape_text(2, 3, 6, 6)),
    ("conv-groups-k", lambda m: m.conv2d(X, arr(5, 2, 3, 3), groups=2), ValueError,
     r"groups.*" + shape_text(5, 2, 3, 3)),
    ("conv-groups-zero", lambda m: m.conv2d(X, W, groups=0), ValueError, r"groups"),
    ("conv-groups-float", lambda m: m.conv2d(X, W, groups=1.0), TypeError, r"groups"),
    ("conv-groups-channels", lambda m: m.conv2d(X, W, groups=2), ValueError, r"weight.*" + shape_text(6, 4, 3, 3)),
    ("conv-empty-output", lambda m: m.conv2d(arr(1, 4, 2, 2), W), ValueError,
     r"empty.*" + shape_text(1, 4, 2, 2)),
    ("conv-empty-dilated", lambda m: m.conv2d(X, W, dilation=3), ValueError, r"empty"),
    ("conv-empty-kernel", lambda m: m.conv2d(X, arr(6, 4, 0, 3)), ValueError, r"weight.*" + shape_text(6, 4, 0, 3)),
    ("conv-empty-out-channels", lambda m: m.conv2d(X, arr(0, 4, 3, 3)), ValueError,
     r"weight.*" + shape_text(0, 4, 3, 3)),
    ("conv-stride-zero", lambda m: m.conv2d(X, W, stride=0), ValueError, r"stride"),
    ("conv-stride-pair-zero", lambda m: m.conv2d(X, W, stride=(1, 0)), ValueError, r"stride"),
    ("conv-stride-negative", lambda m: m.conv2d(X, W, stride=-1), ValueError, r"stride"),
    ("conv-stride-triple", lambda m: m.conv2d(X, W, stride=(1, 1, 1)), ValueError, r"stride"),
    ("conv-stride-float", lambda m: m.conv2d(X, W, stride=1.5), TypeError, r"stride"),
    ("conv-padding-negative", lambda m: m.conv2d(X, W, padding=-1), ValueError, r"padding"),
    ("conv-padding-pair-negative", lambda m: m.conv2d(X, W, padding=(0, -2)), ValueError, r"padding"),
    ("conv-padding-string", lambda m: m.conv2d(X, W, padding="full"), ValueError, r"padding.*full"),
    ("conv-padding-case", lambda m: m.conv2d(X, W, padding="SAME"), ValueError, r"padding"),
    ("conv-dilation-zero", lambda m: m.conv2d(X, W, dilation=0), ValueError, r"dilation"),
    # conv2d_backward
    ("convb-grad-shape", lambda m: m.conv2d_backward(arr(2, 6, 5, 4), X, W), ValueError,
     r"grad_out.*" + shape_text(2, 6, 5, 4) + r".*" + shape_text(2, 6, 4, 4)),
    ("convb-grad-rank", lambda m: m.conv2d_backward(arr(2, 6, 16), X, W), ValueError, r"grad_out.*4-D"),
    ("convb-grad-dtype", lambda m: m.conv2d_backward(arr(2, 6, 4, 4, dtype=f32), X, W), TypeError,
     r"grad_out.*float32"),
    ("convb-grad-list", lambda m: m.conv2d_backward(GO.tolist(), X, W), TypeError, r"grad_out.*ndarray"),
    ("convb-x-rank", lambda m: m.conv2d_backward(GO, arr(4, 6, 6), W), ValueError, r"x.*4-D"),
    ("convb-channels", lambda m: m.conv2d_backward(GO, X, arr(6, 3, 3, 3)), ValueError, shape_text(6, 3, 3, 3)),
    ("convb-groups", lambda m: m.conv2d_backward(GO, X, arr(6, 2, 3, 3), groups=3), ValueError, r"groups"),
    ("convb-stride-zero", lambda m: m.conv2d_backward(GO, X, W, stride=0), ValueError, r"stride"),
    ("convb-int", lambda m: m.conv2d_backward(GO.astype(np.int64), X.astype(np.int64), W.astype(np.int64)),
     TypeError, r"int64"),
    # max_pool2d
    ("max-x-rank", lambda m: m.max_pool2d(arr(4, 6, 6), 2), ValueError, r"4-D|\(N, C, H, W\)"),
    ("max-int", lambda m: m.max_pool2d(X.astype(np.int64), 2), TypeError, r"x.*int64"),
    ("max-list", lambda m: m.max_pool2d(X.tolist(), 2), TypeError, r"x.*ndarray"),
    ("max-kernel-zero", lambda m: m.max_pool2d(X, 0), ValueError, r"kernel_size"),
    ("max-kernel-float", lambda m: m.max_pool2d(X, 2.0), TypeError, r"kernel_size"),
    ("max-stride-zero", lambda m: m.max_pool2d(X, 2, stride=0), ValueError, r"stride"),
    ("max-padding-negative", lambda m: m.max_pool2d(X, 2, padding=-1), ValueError, r"padding"),
    ("max-padding-half", lambda m: m.max_pool2d(X, 2, padding=2), ValueError, r"padding"),
    ("max-padding-string", lambda m: m.max_pool2d(X, 2, padding="same"), TypeError, r"padding"),
    ("max-empty-output", lambda m: m.max_pool2d(X, 7), ValueError, r"empty.*" + shape_text(2, 4, 6, 6)),
    ("max-ceil-mode", lambda m: m.max_pool2d(X, 2, ceil_mode="yes"), TypeError, r"ceil_mode"),
    # max_pool2d_backward
    ("maxb-index-high", lambda m: m.max_pool2d_backward(P, np.full((2, 4, 3, 3), 36, np.int64), X.shape),
     ValueError, r"indices"),
    ("maxb-index-huge", lambda m: m.max_pool2d_backward(P, np.full((2, 4, 3, 3), 2 ** 40, np.int64), X.shape),
     ValueError, r"indices"),
    ("maxb-index-negative", lambda m: m.max_pool2d_backward(P, np.full((2, 4, 3, 3), -1, np.int64), X.shape),
     ValueError, r"indices"),
    ("maxb-index-int32-high", lambda m: m.max_pool2d_backward(P, np.full((2, 4, 3, 3), 36, np.int32), X.shape),
     ValueError, r"indices"),
    ("maxb-index-uint64-huge", lambda m: m.max_pool2d_backward(P, np.full((2, 4, 3, 3), 2 ** 63 + 1, np.uint64),
                                                               X.shape), ValueError, r"indices"),
    ("maxb-one-bad-index", lambda m: m.max_pool2d_backward(P, _one_bad_index(), X.shape), ValueError, r"indices"),
    ("maxb-index-float", lambda m: m.max_pool2d_backward(P, IDX.astype(f64), X.shape), TypeError, r"indices"),
    ("maxb-index-bool", lambda m: m.max_pool2d_backward(P, IDX.astype(bool), X.shape), TypeError, r"indices"),
    ("maxb-index-list", lambda m: m.max_pool2d_backward(P, IDX.tolist(), X.shape), TypeError, r"indices"),
    ("maxb-index-shape", lambda m: m.max_pool2d_backward(P, np.zeros((2, 4, 3, 2), np.int64), X.shape),
     ValueError, r"indices.*" + shape_text(2, 4, 3, 2)),
    ("maxb-grad-rank", lambda m: m.max_pool2d_backward(arr(2, 4, 9), IDX, X.shape), ValueError, r"grad_out"),
    ("maxb-grad-list", lambda m: m.max_pool2d_backward(P.tolist(), IDX, X.shape), TypeError, r"grad_out"),
    ("maxb-grad-int", lambda m: m.max_pool2d_backward(IDX, IDX, X.shape), TypeError, r"grad_out"),
    ("maxb-grad-channels", lambda m: m.max_pool2d_backward(P, IDX, (2, 5, 6, 6)), ValueError,
     r"grad_out.*" + shape_text(2, 4, 3, 3)),
    ("maxb-shape-rank", lambda m: m.max_pool2d_backward(P, IDX, (2, 4, 36)), ValueError, r"input_shape"),
    ("maxb-shape-negative", lambda m: m.max_pool2d_backward(P, IDX, (2, 4, -6, 6)), ValueError, r"input_shape"),
    ("maxb-shape-array", lambda m: m.max_pool2d_backward(P, IDX, X), TypeError, r"input_shape"),
    # avg_pool2d and its backward
    ("avg-x-rank", lambda m: m.avg_pool2d(arr(4, 6, 6), 2), ValueError, r"4-D|\(N, C, H, W\)"),
    ("avg-int", lambda m: m.avg_pool2d(X.astype(np.int32), 2), TypeError, r"x.*int32"),
    ("avg-list", lambda m: m.avg_pool2d(X.tolist(), 2), TypeError, r"x.*ndarray"),
    ("avg-stride-zero", lambda m: m.avg_pool2d(X, 2, stride=(0, 1)), ValueError, r"stride"),
    ("avg-padding-half", lambda m: m.avg_pool2d(X, 3, padding=2), ValueError, r"padding"),
    ("avg-empty-output", lambda m: m.avg_pool2d(arr(1, 1, 1, 5), 2), ValueError, r"empty"),
    ("avgb-grad-shape", lambda m: m.avg_pool2d_backward(arr(2, 4, 2, 3), X.shape, 2), ValueError,
     r"grad_out.*" + shape_text(2, 4, 2, 3) + r".*" + shape_text(2, 4, 3, 3)),
    ("avgb-grad-list", lambda m: m.avg_pool2d_backward(P.tolist(), X.shape, 2), TypeError, r"grad_out"),
    ("avgb-grad-int", lambda m: m.avg_pool2d_backward(IDX, X.shape, 2), TypeError, r"grad_out"),
    ("avgb-shape-rank", lambda m: m.avg_pool2d_backward(P, (4, 6, 6), 2), ValueError, r"input_shape"),
    ("avgb-shape-none", lambda m: m.avg_pool2d_backward(P, None, 2), TypeError, r"input_shape"),
    ("avgb-kernel-zero", lambda m: m.avg_pool2d_backward(P, X.shape, 0), ValueError, r"kernel_size"),
    # relu
    ("relu-list", lambda m: m.relu([1.0, -1.0]), TypeError, r"x.*ndarray"),
    ("relu-int", lambda m: m.relu(np.arange(3)), TypeError, r"x.*int"),
    ("relub-shape", lambda m: m.relu_backward(arr(2, 3), arr(3, 2)), ValueError,
     r"grad_out.*" + shape_text(2, 3) + r".*" + shape_text(3, 2)),
    ("relub-dtype", lambda m: m.relu_backward(arr(2, 3, dtype=f32), arr(2, 3)), TypeError, r"grad_out.*float32"),
    ("relub-list", lambda m: m.relu_backward([1.0], arr(1)), TypeError, r"grad_out.*ndarray"),
    # linear
    ("linear-x-rank", lambda m: m.linear(arr(5), arr(3, 5)), ValueError, r"x.*2-D"),
    ("linear-w-rank", lambda m: m.linear(arr(2, 5), arr(3, 5, 1)), ValueError, r"weight.*2-D"),
    ("linear-features", lambda m: m.linear(arr(2, 5), arr(3, 4)), ValueError,
     r"(?=.*weight)(?=.*" + shape_text(3, 4) + r")(?=.*" + shape_text(2, 5) + ")"),
    ("linear-dtypes", lambda m: m.linear(arr(2, 5), arr(3, 5, dtype=f32)), TypeError, r"weight.*float32"),
    ("linear-bias-shape", lambda m: m.linear(arr(2, 5), arr(3, 5), arr(4)), ValueError, r"bias.*" + shape_text(4)),
    ("linear-int", lambda m: m.linear(np.ones((2, 5), np.int64), arr(3, 5)), TypeError, r"x.*int64"),
    ("linear-list", lambda m: m.linear([[1.0] * 5], arr(3, 5)), TypeError, r"x.*ndarray"),
    ("linearb-grad-shape", lambda m: m.linear_backward(arr(2, 4), arr(2, 5), arr(3, 5)), ValueError,
     r"grad_out.*" + shape_text(2, 4) + r".*" + shape_text(2, 3)),
    ("linearb-grad-dtype", lambda m: m.linear_backward(arr(2, 3, dtype=f32), arr(2, 5), arr(3, 5)), TypeError,
     r"grad_out.*float32"),
    # batch norm
    ("bn-x-rank", lambda m: m.batch_norm2d_training(arr(4, 6, 6), arr(4), arr(4)), ValueError, r"x.*4-D"),
    ("bn-weight-shape", lambda m: m.batch_norm2d_training(X, arr(3), arr(4)), ValueError,
     r"(?=.*weight)(?=.*" + shape_text(3) + r")(?=.*" + shape_text(2, 4, 6, 6) + ")"),
    ("bn-bias-dtype", lambda m: m.batch_norm2d_training(X, arr(4), arr(4, dtype=f32)), TypeError, r"bias.*float32"),
    ("bn-weight-rank", lambda m: m.batch_norm2d(X, arr(4, 1), arr(4), arr(4), arr(4)), ValueError, r"weight.*1-D"),
    ("bn-mean-shape", lambda m: m.batch_norm2d(X, arr(4), arr(4), arr(5), arr(4)), ValueError,
     r"mean.*" + shape_text(5)),
    ("bn-var-missing", lambda m: m.batch_norm2d(X, arr(4), arr(4), arr(4), None), TypeError, r"var.*ndarray"),
    ("bn-eps-zero", lambda m: m.batch_norm2d_training(X, arr(4), arr(4), eps=0.0), ValueError, r"eps"),
    ("bn-eps-nan", lambda m: m.batch_norm2d_training(X, arr(4), arr(4), eps=float("nan")), ValueError, r"eps"),
    ("bn-eps-str", lambda m: m.batch_norm2d_training(X, arr(4), arr(4), eps="1e-5"), TypeError, r"eps"),
    ("bn-one-value", lambda m: m.batch_norm2d_training(arr(1, 4, 1, 1), arr(4), arr(4)), ValueError,
     r"more than one value per channel.*" + shape_text(1, 4, 1, 1)),
    ("bnb-grad-shape", lambda m: m.batch_norm2d_backward(arr(2, 4, 6, 5), X, arr(4), arr(4), arr(4)), ValueError,
     r"grad_out.*" + shape_text(2, 4, 6, 5) + r".*" + shape_text(2, 4, 6, 6)),
    ("bnb-grad-dtype", lambda m: m.batch_norm2d_backward(arr(2, 4, 6, 6, dtype=f32), X, arr(4), arr(4), arr(4)),
     TypeError, r"grad_out.*float32"),
    ("bnb-var-shape", lambda m: m.batch_norm2d_backward(X, X, arr(4), arr(4), arr(2)), ValueError,
     r"var.*" + shape_text(2)),
]


def _one_bad_index():
    """Valid indices but one, deep inside the array, so that a check of the first or last element is not enough."""
    idx = np.zeros((2, 4, 3, 3), np.int64)
    idx[1, 2, 1, 1] = 36
    return idx


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(impl, call, exc, match):
    with pytest.raises(exc, match=match):
        call(impl)


def test_bad_indices_write_nothing(impl):
    """A refused max_pool2d_backward leaves its inputs as they were (no stray write before the check)."""
    go = np.arange(72, dtype=f64).reshape(2, 4, 3, 3)
    idx = _one_bad_index()
    go_copy, idx_copy = go.copy(), idx.copy()
    with pytest.raises(ValueError, match="indices"):
        impl.max_pool2d_backward(go, idx, X.shape)
    np.testing.assert_array_equal(go, go_copy)
    np.testing.assert_array_equal(idx, idx_copy)


def test_valid_calls_of_the_cases_succeed(impl):
    """The fixtures the bad cases start from are themselves valid, so each case fails for the reason it names."""
    y = impl.conv2d(X, W)
    assert y.shape == GO.shape
    impl.conv2d_backward(GO, X, W)
    p, idx = impl.max_pool2d(X, 2, return_indices=True)
    assert p.shape == P.shape and idx.shape == IDX.shape
    impl.max_pool2d_backward(P, IDX, X.shape)
    assert impl.avg_pool2d(X, 2).shape == P.shape
    impl.avg_pool2d_backward(P, X.shape, 2)
    impl.linear_backward(arr(2, 3), arr(2, 5), arr(3, 5))
    impl.relu_backward(arr(2, 3), arr(2, 3))
    y, mean, var = impl.batch_norm2d_training(X, arr(4), arr(4))
    assert y.shape == X.shape and mean.shape == var.shape == (4,)
    assert impl.batch_norm2d(X, arr(4), arr(4), mean, var).shape == X.shape
    assert impl.batch_norm2d_backward(X, X, arr(4), mean, var)[0].shape == X.shape


def test_bad_input_raises_after_the_same_call_succeeded(impl):
    """Geometries are remembered between calls: a bad argument equal to a good one (True == 1) must still be
    refused after the good call, and a good call after a refused one must still succeed."""
    impl.conv2d(X, W, stride=1)
    with pytest.raises(TypeError, match="stride"):
        impl.conv2d(X, W, stride=True)
    impl.max_pool2d(X, 2, ceil_mode=False)
    with pytest.raises(TypeError, match="ceil_mode"):
        impl.max_pool2d(X, 2, ceil_mode=0)
    with pytest.raises(ValueError, match="padding"):
        impl.max_pool2d(X, 2, padding=2)
    assert impl.max_pool2d(X, 2, padding=1).shape == (2, 4, 4, 4)
    assert impl.conv2d(X, W, stride=np.int64(2)).shape == (2, 6, 2, 2)
