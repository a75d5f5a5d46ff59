"""What is benchmarked: conv2d and pooling shapes (`ConvCase`, `PoolCase`; the default and the tiny sets) and,
per implementation ("reference": convengine.reference, "engine": convengine.functional, "torch": PyTorch when
installed), the zero-argument calls that are timed, their data built beforehand.

Conventions:
- conv2d directions: forward; grad_weight (`conv2d_backward(..., need_input_grad=False)`: weight and bias
  gradients); backward (all three gradients). grad_input is not a call of its own in the public API, so the report
  gives it as backward minus grad_weight. PyTorch's parts are `aten.convolution_backward` with the matching
  output_mask.
- FLOPs of a conv2d direction: 2 * multiply-adds of the forward (grad_input and grad_weight cost the same; the bias
  sum is ignored); backward counts both.
- Pools are memory-bound, so their rate is GB/s of the least traffic a call needs (input read and output written,
  indices included). max_pool2d forward returns indices, as a training step needs them.
"""
import dataclasses
import math

from .. import _args, functional, reference
from .timing import random_array, torch_module

IMPLS = ("reference", "engine", "torch")
CONV_TIMED = ("forward", "grad_weight", "backward")
CONV_DIRECTIONS = ("forward", "grad_input", "grad_weight", "backward")
POOL_DIRECTIONS = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """conv2d of a (batch, channels, height, width) float32 input to out_channels maps, square kernel."""
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    big: bool = False   # the reference gets fewer rounds here, and none in --quick
    quick: bool = True  # part of the --quick subset

    @property
    def name(self):
        s = f"{self.batch}x{self.channels}x{self.height}x{self.width}->{self.out_channels},{self.kernel}x{self.kernel}"
        for tag, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("g", self.groups, 1)):
            if value != default:
                s += f",{tag}{value}"
        return s

    @property
    def x_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def w_shape(self):
        return (self.out_channels, self.channels // self.groups, self.kernel, self.kernel)

    @property
    def geometry(self):
        return _args.conv2d_geometry(self.x_shape, self.w_shape, self.stride, self.padding, 1, self.groups)

    def flops(self, direction):
        f = _args.flops_conv2d(self.geometry)
        return 2 * f if direction == "backward" else f

    @property
    def compute_bound(self):
        """Enough channels per group (32 or more) and a 3x3 window for the GEMM to dominate: the shapes whose
        rate is compared with the matmul rate. A depthwise conv has one channel per group and is not."""
        return self.channels // self.groups >= 32 and self.kernel == 3


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """max_pool2d or avg_pool2d of a (batch, channels, height, width) float32 input, square window."""
    op: str  # "max" or "avg"
    batch: int
    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int = 0
    big: bool = False
    quick: bool = True

    @property
    def name(self):
        s = f"{self.batch}x{self.channels}x{self.height}x{self.width},{self.kernel}x{self.kernel},s{self.stride}"
        return s + (f",p{self.padding}" if self.padding else "")

    @property
    def op_name(self):
        return f"{self.op}_pool2d"

    @property
    def x_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def out_shape(self):
        return _args.pool2d_geometry(self.x_shape, self.kernel, self.stride, self.padding, False).out_shape

    def bytes(self, direction):
        """Least memory traffic of one call: float32 input and output, plus the int64 indices of max pooling."""
        n_in, n_out = math.prod(self.x_shape), math.prod(self.out_shape)
        indices = 8 * n_out if self.op == "max" else 0
        return 4 * (n_in + n_out) + indices


# The default set: the layers of small CNNs (LeNet, CIFAR and ImageNet-style stems and blocks, a depthwise
# conv), and the pools between them.
CONV_CASES = (
    ConvCase(64, 3, 32, 32, 32, 5),
    ConvCase(128, 1, 28, 28, 32, 5, padding=2, quick=False),
    ConvCase(64, 32, 16, 16, 64, 3, padding=1),
    ConvCase(64, 128, 8, 8, 128, 3, padding=1),
    ConvCase(32, 256, 8, 8, 256, 3, padding=1, quick=False),     # a ResNet-style later stage
    ConvCase(32, 64, 56, 56, 64, 3, padding=1, big=True),
    ConvCase(64, 64, 32, 32, 64, 1, quick=False),
    ConvCase(64, 32, 32, 32, 64, 3, stride=2, padding=1, quick=False),
    ConvCase(32, 128, 28, 28, 128, 3, padding=1, groups=128),
)
POOL_CASES = (
    PoolCase("max", 64, 64, 32, 32, 2, 2),
    PoolCase("max", 32, 64, 56, 56, 3, 2, padding=1, big=True),
    PoolCase("avg", 64, 64, 32, 32, 2, 2),
)
# Small enough for tests and smoke runs, still covering stride, padding and groups.
TINY_CONV_CASES = (
    ConvCase(4, 3, 12, 12, 8, 5),
    ConvCase(4, 32, 10, 10, 32, 3, padding=1),
    ConvCase(4, 16, 9, 9, 16, 3, stride=2, padding=1, groups=4),
)
TINY_POOL_CASES = (
    PoolCase("max", 4, 8, 12, 12, 2, 2),
    PoolCase("max", 4, 8, 11, 11, 3, 2, padding=1),
    PoolCase("avg", 4, 8, 12, 12, 2, 2),
)


# ---------------------------------------------------------------------------------------------------------------
# The calls: one zero-argument callable per implementation, case and direction, its data built beforehand
# ---------------------------------------------------------------------------------------------------------------

def conv_calls(impl, case, rng):
    """direction -> callable running that conv2d direction of `impl` ("reference", "engine" or "torch") on one
    set of random data."""
    g = case.geometry
    x, w, b, gy = (random_array(rng, s) for s in (case.x_shape, case.w_shape, (case.out_channels,), g.out_shape))
    kw = dict(stride=case.stride, padding=case.padding, groups=case.groups)
    if impl in ("reference", "engine"):
        mod = reference if impl == "reference" else functional
        return {
            "forward": lambda: mod.conv2d(x, w, b, **kw),
            "grad_weight": lambda: mod.conv2d_backward(gy, x, w, need_input_grad=False, **kw),
            "backward": lambda: mod.conv2d_backward(gy, x, w, **kw),
        }
    if impl == "torch":
        torch = torch_module()
        xt, wt, bt, gyt = (torch.from_numpy(a) for a in (x, w, b, gy))
        args = ([case.out_channels], [case.stride] * 2, [case.padding] * 2, [1, 1], False, [0, 0], case.groups)
        backward = torch.ops.aten.convolution_backward
        return {
            "forward": lambda: torch.nn.functional.conv2d(xt, wt, bt, case.stride, case.padding, 1, case.groups),
            "grad_weight": lambda: backward(gyt, xt, wt, *args, [False, True, True]),
            "backward": lambda: backward(gyt, xt, wt, *args, [True, True, True]),
        }
    raise ValueError(f"unknown implementation {impl!r}")


def pool_calls(impl, case, rng):
    """direction -> callable running that direction of a pooling case of `impl` on one set of random data."""
    x = random_array(rng, case.x_shape)
    gy = random_array(rng, case.out_shape)
    k, s, p = case.kernel, case.stride, case.padding
    if impl in ("reference", "engine"):
        mod = reference if impl == "reference" else functional
        if case.op == "max":
            _, indices = mod.max_pool2d(x, k, s, p, return_indices=True)
            return {
                "forward": lambda: mod.max_pool2d(x, k, s, p, return_indices=True),
                "backward": lambda: mod.max_pool2d_backward(gy, indices, x.shape),
            }
        return {
            "forward": lambda: mod.avg_pool2d(x, k, s, p),
            "backward": lambda: mod.avg_pool2d_backward(gy, x.shape, k, s, p),
        }
    if impl == "torch":
        torch = torch_module()
        aten = torch.ops.aten
        xt, gyt = torch.from_numpy(x), torch.from_numpy(gy)
        window = ([k, k], [s, s], [p, p])
        if case.op == "max":
            _, indices = aten.max_pool2d_with_indices(xt, *window, [1, 1], False)
            return {
                "forward": lambda: aten.max_pool2d_with_indices(xt, *window, [1, 1], False),
                "backward": lambda: aten.max_pool2d_with_indices_backward(gyt, xt, *window, [1, 1], False, indices),
            }
        return {
            "forward": lambda: aten.avg_pool2d(xt, *window, False, True, None),
            "backward": lambda: aten.avg_pool2d_backward(gyt, xt, *window, False, True, None),
        }
    raise ValueError(f"unknown implementation {impl!r}")
