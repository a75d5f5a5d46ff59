"""Frozen models: a Sequential model's inference plan, built once from its weights and then run many times.

`Sequential.freeze()` rewrites the layer chain into a shorter list of steps, in the spirit of ONNX Runtime's graph
transformers (each rewrite matches one pattern; running the plan is separate from building it):

- Dropout is removed (inference is the identity);
- a BatchNorm2d right after a Conv2d is folded into the conv's weights and bias (w * k, (b - mean) * k + beta with
  k = gamma / sqrt(var + eps), computed in float64);
- a BatchNorm2d before an unpadded Conv2d is folded into that conv's input side (w * k per input channel, the shift
  summed into the bias); anywhere else it stays a per-channel affine step;
- a ReLU after a conv becomes the conv's epilogue (applied as each output tile is stored, while it is in cache), and
  so does a BatchNorm2d after that ReLU (a per-channel scale and shift after the max);
- with `freeze(winograd=True)` only: float32 3x3 stride-1 convs of 32+ input and 16+ output channels run by
  Winograd F(2x2, 3x3) (_kernels/conv_winograd.pxi; FrozenModel says what that trades);
- a ReLU after a Linear is applied in place on its output.

Activations live in buffers planned per input shape and batch size and reused across calls (no fresh multi-MB
arrays, whose first touch page-faults); each call takes a free set of buffers from a small pool, so a frozen model
may be called from several threads at once. Arguments are validated when the plan is built; each call checks only
its input. Each set of buffers carries its steps compiled into one loop over them (_kernels/frozen.pxi: one Python
call per batch instead of one per step, the same kernels and thread counts, the same bits); on two or more threads
the loop is split: each step's slices (images, or channels at batch 1) shared by the caller and a small pool of
workers (see _SPLIT_FLOPS below); on one thread a large batch runs in slices of images, each through every
step, so that activations stay in cache (_SLICE_BYTES). A plan with a layer run through its own forward keeps the
Python loop. Results are bitwise identical whatever the thread count, and agree with the model's own `predict`
within float rounding (folding reorders the arithmetic: about 1e-6 relative in float32).
"""
import copy
import functools
import math
import threading

import numpy as np

from . import _args, _threads
from ._kernels import WAIT_POLICY as _WAIT_POLICY, engine as _engine
from .functional import _SERIAL_ELEMENTS, _conv_params, _packed_weights, _pool_params, _threads_for
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from .model import model_input

__all__ = ["FrozenModel"]

# A conv or linear step below this many FLOPs runs on one thread. Higher than functional's 4 MFLOP: a plan's steps
# follow each other within microseconds, longer than the OpenMP workers spin (_kernels.SPIN_COUNT), so the second
# thread must be woken for each (measured on AMD EPYC Zen 4, 2 vCPUs: the CIFAR-shaped net at batch 1, whose convs
# are 9.4 MFLOP and split into one task, took 0.48 ms at 2 threads and 0.31 ms at 1 under the passive policy; with
# the short spin, 0.36 ms with a 4 MFLOP threshold and 0.27 ms with this one).
_SERIAL_FLOPS = 16_000_000


def _workers_keep_spinning(policy):
    """Whether OpenMP workers spin long between parallel regions under `policy` (_kernels.WAIT_POLICY): the user
    chose OMP_WAIT_POLICY=active or a GOMP_SPINCOUNT of at least 5000."""
    policy = policy.strip().lower()
    if policy.startswith("gomp_spincount="):
        count = policy.split("=", 1)[1]
        return count.startswith("infinit") or (count.isdigit() and int(count) >= 5000)
    return policy == "active"


# On two or more threads a compiled plan is a split program (_kernels/frozen.pxi run_split): slices of a few images
# (_images_per_slice), each through every step in order, or at batch 1 each step cut into slices of its
# channels (a channelwise step continuing the slices of the step before); each op a whole kernel call on one
# thread, the slices shared by the caller and workers of the engine's own pool (frozen.h), which spin between
# steps and for a while after a call. OpenMP could not do this: its workers sleep between steps (a 30-50 us
# wake-up each under a hypervisor), a region's end waits for a worker still waking, and one-thread regions nested
# in a team cost 2.6 us each. Measured on AMD EPYC Zen 4, 2 threads, calls back to back (best of 9), whole-step
# program -> split program: batch 1, CIFAR-shaped net 0.246 -> 0.144 ms, separable 0.074 -> 0.056, VGG-style 1.91
# -> 1.11; batch 4, CIFAR-shaped 1.28 -> 0.50, separable 0.53 -> 0.14; batch 64, CIFAR-shaped 9.4 -> 8.0,
# separable 4.2 -> 2.0, LeNet-5 1.72 -> 0.96, VGG-style 69.5 -> 68. Under OMP_WAIT_POLICY=active, where every op
# of a plan used to run on the spinning OpenMP team, the split program is as fast or faster (CIFAR-shaped batch 1
# 0.175 -> 0.154 ms, VGG-style 1.29 -> 1.14). Below _SPLIT_FLOPS per call a plan stays on one thread (LeNet-5 at
# batch 1, 1.3 MFLOP: 47 us split, 44 whole); "on"/"off" force it (tests).
_SPLIT_FLOPS = 4_000_000
_SPLIT_MODE = "auto"
# Images per slice on several threads: as many as hold about _SPLIT_SLICE_BYTES of the largest activation, at most
# _IMAGES_PER_SLICE. Batch 64 at 2 threads, ms for 2 / 4 / 8 / 16 / 32 images (Zen 4, best of 5, four rounds
# alternating in one process): VGG-style (256 KiB per image) 56.8 / 57.2 / 57.6 / 58.5 / 58.7; CIFAR-shaped (128
# KiB) 6.63 / 6.56 / 6.50 / 6.48 / 6.46; separable (64 KiB) 1.98 / 1.86 / 1.81 / 1.77 / 1.76; LeNet-5 (18 KiB)
# 0.78 / 0.72 / 0.68 / 0.63 / 0.61. Few kernel calls pay where activations are small; where they are large a
# slice that stays in its core's L2 from step to step pays more (16 VGG-style images hold 4 MiB). More slices than
# threads still share out the work when one thread is slowed.
_IMAGES_PER_SLICE = 32
_SPLIT_SLICE_BYTES = 1 << 20
# On one thread, a batch whose largest activation takes more than _SLICE_ABOVE goes through in slices of about
# _SLICE_BYTES of it, all in the same place at the start of the buffers, so that a step reads what the step before
# wrote while it is still in cache (a core's L2 is 1 MiB on Zen 4, 2 MiB on recent Xeons). Batch 64, 1 thread, calls
# back to back, ms whole / slices of 512 KiB / 1 MiB (Zen 4, best of 5 medians): CIFAR-shaped (128 KiB per image)
# 14.0 / 13.7 / 13.8; separable (64 KiB) 4.15 / 3.96 / 3.92; VGG-style (256 KiB) 121.6 / 117.5 / 119.3. LeNet-5
# (18 KiB, 1.2 MiB in all) stays whole: its linears want the whole batch (slices of 16 images: 1.45 -> 1.51 ms).
_SLICE_ABOVE = 2 << 20
_SLICE_BYTES = 1 << 19


def _pool_spin_ns(policy):
    """How long the split programs' idle workers spin before they sleep, after the wait policy: none when the
    user asked for passive workers, a second for active ones, else 200 us (long enough for back-to-back calls
    from Python, a few microseconds apart; short enough that an idle server gives the core back at once)."""
    if policy.strip().lower() == "passive":
        return 0
    return 1_000_000_000 if _workers_keep_spinning(policy) else 200_000


_engine.set_pool_spin(_pool_spin_ns(_WAIT_POLICY))


def _ranges(total, parts, align=1):
    """range(total) in at most `parts` contiguous pieces of near-equal size whose inner bounds are multiples of
    align (fewer pieces where total holds fewer aligned ones)."""
    blocks = -(-total // align)
    parts = max(1, min(parts, blocks))
    bounds = [min(total, (blocks * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _part(array, start, stop):
    return None if array is None else array[start:stop]


def _per_range(append, ranges):
    """One callable per (start, stop) in ranges, calling append(start, stop): a split step's slices."""
    return [functools.partial(append, start, stop) for start, stop in ranges]


# ---------------------------------------------------------------------------------------------------------------
# Steps: what the plan runs. Each has output_shape(sample shape), prepare(sample shape) -> arguments that do not
# depend on the batch, and run(x, out, prepared) writing into out (or returning a view where it computes nothing).

class _Step:
    in_place = False      # writes its output over its input (run(x, x, ...))
    view = False          # returns a view of its input (no buffer)

    def prepare(self, shape):
        return None

    def compile(self, program, prepared, shape, n, src, dst):
        """Append this step for a batch of n inputs of per-sample shape `shape` to the compiled program (operands
        src and dst, see _kernels/frozen.pxi), with the thread counts run() would use; False where it cannot."""
        return False

    def flops(self, prepared):
        """Multiply-adds x 2 per sample (convs and linears; 0 for the rest)."""
        return 0

    def packed_bytes(self, prepared):
        """Bytes of the weights packed for the kernels that `prepare` made (convs; 0 for the rest)."""
        return 0

    # Output channel c depends on input channel c alone: at batch 1 such a step continues its predecessor's slices
    # of channels on the same threads, without a wait between them.
    channelwise = False

    def channelwise_for(self, shape):
        return self.channelwise

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        """At batch 1, in a split program: (the output channel ranges of the slices, one callable per slice that
        appends its ops and returns False where it cannot). A channelwise step takes `ranges` where given (its
        predecessor's); by default one slice, the whole step."""
        return None, [lambda: self.compile(program, prepared, shape, 1, src, dst)]

    @staticmethod
    def elementwise_threads(n, shape):
        """Threads of an elementwise step (pool, batch norm, ReLU, global mean) on n samples of shape `shape`: the
        one rule that run() and compile() share."""
        return _threads_for(n * math.prod(shape), _SERIAL_ELEMENTS)


class _Conv(_Step):
    def __init__(self, weight, bias, stride, padding, dilation, groups, relu=False, scale=None, shift=None,
                 winograd=False):
        self.winograd = winograd
        self.weight = np.ascontiguousarray(weight)
        self.bias = None if bias is None else np.ascontiguousarray(bias)
        self.hyper = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.relu = relu
        self.scale = scale
        self.shift = shift

    def describe(self):
        parts = ["Conv2d"]
        if self.relu:
            parts.append("ReLU")
        if self.scale is not None:
            parts.append("affine")
        return "+".join(parts)

    def _geometry(self, shape):
        return _args.conv2d_geometry((1,) + tuple(shape), self.weight.shape, **self.hyper)

    def output_shape(self, shape):
        return self._geometry(shape).out_shape[1:]

    def prepare(self, shape):
        geom = self._geometry(shape)
        params = _conv_params(geom)
        # the weights packed once for the kernel this shape takes (every call packed them again: 5-45 us per conv,
        # much of a batch-1 call): Winograd's where the plan opted in and the conv can take it
        x_shape = (1,) + tuple(shape)
        winograd = self.winograd and _engine.winograd_takes(x_shape, self.weight.shape, params, self.weight.itemsize)
        path = _engine.WINOGRAD_PATH if winograd else _engine.AUTO_PATH
        packed = _packed_weights(x_shape, self.weight, params, path)
        return params, _args.flops_conv2d(geom), math.prod(shape) + math.prod(geom.out_shape[1:]), packed

    @staticmethod
    def threads(prepared, n):
        # threads for enough arithmetic, or for enough memory traffic: a depthwise conv of a batch of 64 does
        # little arithmetic (9.4 MFLOP for 32 channels of 16x16) over 4 MB, and ran on one thread
        _, flops, elements, _ = prepared
        return max(_threads_for(flops * n, _SERIAL_FLOPS), _threads_for(elements * n, _SERIAL_ELEMENTS))

    def run(self, x, out, prepared):
        params, _, _, packed = prepared
        _engine.conv2d_forward(x, self.weight, self.bias, out, params, self.threads(prepared, x.shape[0]), self.relu,
                               self.scale, self.shift, packed, forced=packed is not None)
        return out

    def compile(self, program, prepared, shape, n, src, dst):
        params, _, _, packed = prepared
        # on the path the weights were packed for, whatever n: a batch's path may depend on its size (the pixel
        # path's), and the images a program runs at once on the thread count
        program.conv(src, dst, self.threads(prepared, n), (n,) + tuple(shape), self.weight, self.bias, params,
                     self.relu, self.scale, self.shift, packed, forced=packed is not None)
        return True

    def flops(self, prepared):
        return prepared[1]

    def packed_bytes(self, prepared):
        return 0 if prepared[3] is None else prepared[3][1].nbytes

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        # slices of the output channels (of whole groups where grouped), each with its weights packed for the
        # whole conv's path (forced: a slice's shape alone might choose another, with other bits); a dense conv's
        # slices hold whole 16-channel blocks, so that no tile is split. A depthwise conv is channelwise, and its
        # slices hold two channels or more: one channel alone is a dense conv to the kernels (is_depthwise), whose
        # first-layer path sums in another order (a 2-channel depthwise conv with a folded batch norm differed in
        # the last bit at batch 1 on 2 threads)
        K, G = self.weight.shape[0], self.hyper["groups"]
        depthwise = self.channelwise_for(shape)
        if ranges is not None and depthwise and min(k1 - k0 for k0, k1 in ranges) < 2:
            ranges = None
        if ranges is None or not depthwise:
            if G == 1:
                ranges = _ranges(K, parts, 16)
            else:
                ranges = [(g0 * K // G, g1 * K // G) for g0, g1 in _ranges(G, max(1, min(parts, G // 2))
                                                                            if depthwise else parts)]
        if len(ranges) == 1:
            return ranges, [lambda: self.compile(program, prepared, shape, 1, src, dst)]
        return ranges, _per_range(functools.partial(self._slice, program, prepared, shape, src, dst), ranges)

    def channelwise_for(self, shape):
        return self.hyper["groups"] == shape[0] == self.weight.shape[0]

    def _slice(self, program, prepared, shape, src, dst, k0, k1):
        params, _, _, packed = prepared
        C, H, W = shape
        K, G = self.weight.shape[0], self.hyper["groups"]
        _, OH, OW = self.output_shape(shape)
        Cg, Kg = C // G, K // G
        g0, g1 = (0, 1) if G == 1 else (k0 // Kg, k1 // Kg)
        sliced = params[:6] + (g1 - g0,) + params[7:]
        x_shape = (1, (g1 - g0) * Cg, H, W)
        weight = self.weight[k0:k1]
        part = None if packed is None else _packed_weights(x_shape, weight, sliced, packed[0])
        program.conv(src, dst, 1, x_shape, weight, _part(self.bias, k0, k1), sliced, self.relu,
                     _part(self.scale, k0, k1), _part(self.shift, k0, k1), part, forced=True)
        program.place(g0 * Cg * H * W, k0 * OH * OW)
        return True


class _BatchNorm(_Step):
    """A per-channel affine that could not be folded: the inference batch norm kernel, with ReLU after it."""
    in_place = True

    def __init__(self, layer, relu=False):
        self.gamma = layer.weight.data.copy()
        self.beta = layer.bias.data.copy()
        self.mean = layer.running_mean.copy()
        self.var = layer.running_var.copy()
        self.eps = layer.eps
        self.relu = relu

    def describe(self):
        return "BatchNorm2d+ReLU" if self.relu else "BatchNorm2d"

    def output_shape(self, shape):
        if len(shape) != 3 or shape[0] != self.gamma.shape[0]:
            raise ValueError(f"BatchNorm2d({self.gamma.shape[0]}) cannot take per-sample shape {tuple(shape)}")
        return tuple(shape)

    def run(self, x, out, prepared):
        _engine.batch_norm2d_forward(x, self.gamma, self.beta, self.mean, self.var, False, self.eps, out,
                                     self.elementwise_threads(x.shape[0], x.shape[1:]), relu=self.relu)
        return out

    def compile(self, program, prepared, shape, n, src, dst):
        program.batch_norm(src, dst, self.elementwise_threads(n, shape), n, shape[0],
                           math.prod(shape[1:]), self.gamma, self.beta, self.mean, self.var, self.eps, self.relu)
        return True

    channelwise = True

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        plane = math.prod(shape[1:])
        ranges = ranges or _ranges(shape[0], parts)

        def part(c0, c1):
            program.batch_norm(src, dst, 1, 1, c1 - c0, plane, self.gamma[c0:c1], self.beta[c0:c1],
                               self.mean[c0:c1], self.var[c0:c1], self.eps, self.relu)
            program.place(c0 * plane, c0 * plane)
        return ranges, _per_range(part, ranges)


class _ReLU(_Step):
    in_place = True

    def describe(self):
        return "ReLU"

    def output_shape(self, shape):
        return tuple(shape)

    def run(self, x, out, prepared):
        flat = out.reshape(-1)
        _engine.relu_forward(x.reshape(-1), flat, self.elementwise_threads(x.shape[0], x.shape[1:]))
        return out

    def compile(self, program, prepared, shape, n, src, dst):
        program.relu(src, dst, self.elementwise_threads(n, shape), n * math.prod(shape))
        return True

    channelwise = True

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        # whole vectors of values, or the planes of the given channels
        plane = math.prod(shape[1:]) if len(shape) > 1 else 1
        pieces = [(c0 * plane, c1 * plane) for c0, c1 in ranges] if ranges else _ranges(math.prod(shape), parts, 16)

        def part(i0, i1):
            program.relu(src, dst, 1, i1 - i0)
            program.place(i0, i0)
        return ranges, _per_range(part, pieces)


class _Pool(_Step):
    def __init__(self, layer):
        self.kind = "max" if isinstance(layer, MaxPool2d) else "avg"
        self.hyper = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          ceil_mode=layer.ceil_mode)
        self.count_include_pad = getattr(layer, "count_include_pad", True)

    def describe(self):
        return "MaxPool2d" if self.kind == "max" else "AvgPool2d"

    def _geometry(self, shape):
        return _args.pool2d_geometry((1,) + tuple(shape), self.hyper["kernel_size"], self.hyper["stride"],
                                     self.hyper["padding"], self.hyper["ceil_mode"], f"{self.kind}_pool2d")

    def output_shape(self, shape):
        return self._geometry(shape).out_shape[1:]

    def prepare(self, shape):
        return _pool_params(self._geometry(shape))

    def run(self, x, out, params):
        n = self.elementwise_threads(x.shape[0], x.shape[1:])
        if self.kind == "max":
            _engine.max_pool2d_forward(x, out, None, params, n)
        else:
            _engine.avg_pool2d_forward(x, out, params, self.count_include_pad, n)
        return out

    def compile(self, program, params, shape, n, src, dst):
        program.pool(src, dst, self.elementwise_threads(n, shape), self.kind == "max",
                     n * shape[0], shape[1], shape[2], params, self.count_include_pad)
        return True

    channelwise = True

    def channel_slices(self, program, params, shape, src, dst, parts, ranges=None):
        _, OH, OW = self.output_shape(shape)
        ranges = ranges or _ranges(shape[0], parts)

        def part(c0, c1):
            program.pool(src, dst, 1, self.kind == "max", c1 - c0, shape[1], shape[2], params, self.count_include_pad)
            program.place(c0 * shape[1] * shape[2], c0 * OH * OW)
        return ranges, _per_range(part, ranges)


class _GlobalAvgPool(_Step):
    def describe(self):
        return "GlobalAvgPool2d"

    def output_shape(self, shape):
        return GlobalAvgPool2d().output_shape(shape)

    def run(self, x, out, prepared):
        # the compiled mean per plane (one plane a task: the same bits for any thread count)
        _engine.global_avg_pool2d_forward(x, out, self.elementwise_threads(x.shape[0], x.shape[1:]))
        return out

    def compile(self, program, prepared, shape, n, src, dst):
        program.global_avg_pool(src, dst, self.elementwise_threads(n, shape), n * shape[0],
                                shape[1] * shape[2])
        return True

    channelwise = True

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        ranges = ranges or _ranges(shape[0], parts)

        def part(c0, c1):
            program.global_avg_pool(src, dst, 1, c1 - c0, shape[1] * shape[2])
            program.place(c0 * shape[1] * shape[2], c0)
        return ranges, _per_range(part, ranges)


class _Flatten(_Step):
    view = True

    def describe(self):
        return "Flatten"

    def output_shape(self, shape):
        return (math.prod(shape),)

    def run(self, x, out, prepared):
        return x.reshape(x.shape[0], -1)


class _Linear(_Step):
    def __init__(self, weight, bias, relu=False):
        # W^T stored contiguous: at batch 1 the GEMM then reads its rows in place, without packing (same bits)
        self.weight_t = np.ascontiguousarray(weight.T)
        self.bias = None if bias is None else bias.copy()
        self.relu = relu

    def describe(self):
        return "Linear+ReLU" if self.relu else "Linear"

    def output_shape(self, shape):
        if len(shape) != 1 or shape[0] != self.weight_t.shape[0]:
            raise ValueError(f"Linear({self.weight_t.shape[0]}, {self.weight_t.shape[1]}) cannot take per-sample "
                             f"shape {tuple(shape)}")
        return (self.weight_t.shape[1],)

    def threads(self, n):
        """Threads of the product and of the ReLU after it, for n samples (run() and compile() alike)."""
        return (_threads_for(2 * n * self.weight_t.size, _SERIAL_FLOPS),
                self.elementwise_threads(n, self.weight_t.shape[1:]))

    def run(self, x, out, prepared):
        product_threads, relu_threads = self.threads(x.shape[0])
        _engine.matmul(x, self.weight_t, out, product_threads)
        if self.bias is not None:
            out += self.bias
        if self.relu:
            flat = out.reshape(-1)
            _engine.relu_forward(flat, flat, relu_threads)
        return out

    def compile(self, program, prepared, shape, n, src, dst):
        product_threads, relu_threads = self.threads(n)
        program.linear(src, dst, product_threads, n, self.weight_t, self.bias, self.relu, relu_threads)
        return True

    def flops(self, prepared):
        return 2 * self.weight_t.size

    def channel_slices(self, program, prepared, shape, src, dst, parts, ranges=None):
        # slices of the output columns, whole vectors each (the product reads W^T's rows in place: same bits)
        def part(j0, j1):
            program.linear(src, dst, 1, 1, self.weight_t, self.bias, self.relu, 1, j0, j1 - j0)
        ranges = _ranges(self.weight_t.shape[1], parts, 16)
        return ranges, _per_range(part, ranges)


class _Layer(_Step):
    """Any other layer, run through its own forward on a private copy (the plan never sees later changes)."""

    def __init__(self, layer):
        self.layer = _inference_copy(layer)

    def describe(self):
        return type(self.layer).__name__

    def output_shape(self, shape):
        return tuple(self.layer.output_shape(shape))

    def run(self, x, out, prepared):
        out[...] = self.layer.forward(x, training=False)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Rewrites: from the model's layers to steps.

# What layers keep between a training forward and its backward: not part of a frozen copy.
_CACHES = ("_x", "_cache", "_indices", "_shape", "_mask")


def _inference_copy(layer):
    """A deep copy of a layer (weights and statistics as they are now) without its training caches."""
    saved = {name: layer.__dict__.pop(name) for name in _CACHES if name in layer.__dict__}
    try:
        twin = copy.deepcopy(layer)
    finally:
        layer.__dict__.update(saved)
    twin.__dict__.update(dict.fromkeys(saved))
    return twin


def _bn_coefficients(bn):
    """(k, s) in float64 such that bn(x) = x * k + s per channel, in inference mode."""
    k = bn.weight.data.astype(np.float64) / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    s = bn.bias.data.astype(np.float64) - bn.running_mean.astype(np.float64) * k
    return k, s


def _unpadded(conv):
    return conv.padding == "valid" or conv.padding == (0, 0)


def _fold_after(w, b, bn):
    """Weights and bias of conv then bn."""
    k, s = _bn_coefficients(bn)
    w64 = w.astype(np.float64) * k[:, None, None, None]
    b64 = (b.astype(np.float64) if b is not None else 0.0) * k + s
    return w64, b64


def _fold_before(bn, w, b, groups):
    """Weights and bias of bn then an unpadded conv: every tap sees x * k + s of its input channel."""
    k, s = _bn_coefficients(bn)
    K, cin_g = w.shape[:2]
    kg = K // groups
    channel = (np.arange(K)[:, None] // kg) * cin_g + np.arange(cin_g)[None, :]     # (K, cin_g) global channel
    w64 = w.astype(np.float64)
    b64 = (b.astype(np.float64) if b is not None else np.zeros(K)) + np.einsum("kchw,kc->k", w64, s[channel])
    return w64 * k[channel][:, :, None, None], b64


def _is(layer, cls):
    """Exactly this layer type: a subclass may compute something else, and goes through its own forward."""
    return type(layer) is cls


def _rewrite(model_layers, winograd=False):
    """The plan's steps for a list of layers (see the module docstring for the rewrites). Each step's `origin` is
    (index, type name) of the model layer it starts with, for error messages. The steps hold copies of the arrays
    they use: nothing of the model is kept. winograd: the convs may run by Winograd F(2x2, 3x3) (FrozenModel)."""
    kept = [(k, layer) for k, layer in enumerate(model_layers) if not _is(layer, Dropout)]
    layers = [layer for _, layer in kept]
    steps = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        origin = (kept[i][0], type(layer[0] if isinstance(layer, tuple) else layer).__name__)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if _is(layer, BatchNorm2d) and _is(nxt, Conv2d) and _unpadded(nxt):
            w, b = _fold_before(layer, nxt.weight.data, nxt.bias.data if nxt.bias is not None else None, nxt.groups)
            layers[i + 1] = (nxt, w, b)      # a conv with folded arrays, picked up below
            i += 1
            continue
        if _is(layer, Conv2d) or isinstance(layer, tuple):
            conv, w, b = layer if isinstance(layer, tuple) else (layer, layer.weight.data,
                                                                 None if layer.bias is None else layer.bias.data)
            i += 1
            if i < len(layers) and _is(layers[i], BatchNorm2d):
                w, b = _fold_after(w, b, layers[i])
                i += 1
            relu = i < len(layers) and _is(layers[i], ReLU)
            i += relu
            scale = shift = None
            if relu and i < len(layers) and _is(layers[i], BatchNorm2d):
                k, s = _bn_coefficients(layers[i])
                scale, shift = k.astype(conv.dtype), s.astype(conv.dtype)
                i += 1
            dtype = conv.dtype
            steps.append(_Conv(np.array(w, dtype), None if b is None else np.array(b, dtype), conv.stride,
                               conv.padding, conv.dilation, conv.groups, relu, scale, shift, winograd))
            steps[-1].origin = origin
            continue
        if _is(layer, Linear):
            relu = _is(nxt, ReLU)
            steps.append(_Linear(layer.weight.data.copy(), None if layer.bias is None else layer.bias.data, relu))
            steps[-1].origin = origin
            i += 1 + relu
            continue
        if _is(layer, BatchNorm2d):
            relu = _is(nxt, ReLU)
            steps.append(_BatchNorm(layer, relu))
            steps[-1].origin = origin
            i += 1 + relu
            continue
        if _is(layer, ReLU):
            steps.append(_ReLU())
        elif _is(layer, MaxPool2d) or _is(layer, AvgPool2d):
            steps.append(_Pool(layer))
        elif _is(layer, GlobalAvgPool2d):
            steps.append(_GlobalAvgPool())
        elif _is(layer, Flatten):
            steps.append(_Flatten())
        else:
            steps.append(_Layer(layer))
        steps[-1].origin = origin
        i += 1
    return steps


# ---------------------------------------------------------------------------------------------------------------

class _Plan:
    """The steps' shapes and batch-independent arguments for one per-sample input shape."""

    def __init__(self, steps, sample_shape):
        self.shapes = [tuple(sample_shape)]
        self.prepared = []
        for step in steps:
            try:
                self.prepared.append(step.prepare(self.shapes[-1]))
                self.shapes.append(tuple(step.output_shape(self.shapes[-1])))
            except ValueError as e:            # (message, the shapes so far): FrozenModel names the layer
                raise ValueError(str(e), list(self.shapes)) from e
        # buffers in turn (_Arena): each step that computes writes into one its input is not in
        self.largest = max(math.prod(s) for s in self.shapes[1:])


_IN_PLACE = object()      # an arena's mark for a step that writes over its input


def _buffer_count(n):
    """Activation buffers of a call of n samples: two, in turn; three at batch 1, whose split programs cut each
    step into channel slices: there a channelwise step after a dense one writes into a buffer that neither has
    touched, so that its slices continue the dense step's in the same stage instead of waiting for all of them
    (a wait per pool, depthwise conv or global average pool: the CIFAR-shaped net's split program has 4 stages
    instead of 6)."""
    return 3 if n == 1 else 2


def _operand(where):
    """frozen.pxi's operand number of activation buffer `where` (0, 1, 2)."""
    return (1, 2, 4)[where]


class _Arena:
    """The activation buffers of one call of a (per-sample shape, batch size) (_buffer_count), and each step's
    output in them, worked out once: None for a step that returns a view, _IN_PLACE for one that writes over its
    input. `program`: the steps compiled into one loop over these buffers (_kernels/frozen.pxi), or None where a
    step cannot be (a layer run through its own forward); `result`: the final output's view of its buffer."""

    def __init__(self, steps, plan, n, dtype):
        count = _buffer_count(n)
        self.buffers = [np.empty(n * plan.largest, dtype) for _ in range(count)]
        self.outs = []
        self.written = []                     # per step: the buffer its output is in (None: the caller's x)
        where = None                          # which buffer the current activation is in (None: the caller's x)
        for step, shape in zip(steps, plan.shapes[1:]):
            if step.view:
                self.outs.append(None)
            elif step.in_place and where is not None:
                self.outs.append(_IN_PLACE)
            else:
                where = 0 if where is None else (where + 1) % count
                self.outs.append(self.buffers[where][:n * math.prod(shape)].reshape((n,) + shape))
            self.written.append(where)
        self.holds_result = where is not None
        self.result = self.buffers[where][:n * math.prod(plan.shapes[-1])].reshape((n,) + plan.shapes[-1]) \
            if self.holds_result else None
        self.steps, self.plan, self.n, self.dtype = steps, plan, n, dtype
        self.thread_setting = None
        self.program = None

    def compiled(self):
        """The program for the thread setting now (each op's thread count is fixed when it is built, as run()
        would choose it now), built again when that setting has changed; None where the plan cannot compile."""
        setting = (_threads.get_num_threads(), _threads._serial_small_calls)
        if setting != self.thread_setting and self.holds_result:
            self.program = self._compile()
            self.thread_setting = setting
        return self.program

    def _compile(self):
        steps, plan, n, dtype = self.steps, self.plan, self.n, self.dtype
        if not all(_compilable(a, dtype) for step in steps for a in vars(step).values() if isinstance(a, np.ndarray)):
            return None
        program = _engine.Program(np.dtype(dtype) == np.float64, n * math.prod(plan.shapes[0]), self.buffers)
        parts = self._split_parts()
        work = []                             # (step, prepared, per-sample input shape, src, dst) of each kernel step
        operand = 0                           # 0: the caller's x; 1, 2, 4: buffers[0], [1], [2] (_operand)
        for step, prepared, shape, out, where in zip(steps, plan.prepared, plan.shapes, self.outs, self.written):
            if out is not None:
                work.append((step, prepared, shape, operand, _operand(where)))
                operand = _operand(where)
        per = self._images_per_slice(parts)
        if parts == 1 and per >= n:
            if not all(step.compile(program, prepared, shape, n, src, dst) for step, prepared, shape, src, dst in work):
                return None
        elif n > 1:
            # slices of images, each through every step in order: one stage, no waits, and a slice's activations
            # stay in its thread's cache from step to step. On several threads a slice keeps to its own region of
            # each buffer (images i0 to i1 of the largest activation: the steps' own sizes would overlap the next
            # slice's); on one, where they run one after another, all use the start of the buffers, which stays in
            # cache (batch 64, back to back, own regions -> shared: CIFAR-shaped 14.0 -> 13.8 ms, separable 4.2 ->
            # 3.9, VGG-style 121 -> 118). The last step writes the program's own output array (operand 3)
            program.set_result(np.empty((n,) + plan.shapes[-1], dtype))
            for i0, i1 in _ranges(n, max(parts, -(-n // per))):
                for k, (step, prepared, shape, src, dst) in enumerate(work):
                    if not step.compile(program, prepared, shape, i1 - i0, src, 3 if k == len(work) - 1 else dst):
                        return None
                    region = i0 * plan.largest if parts > 1 else 0
                    program.place(i0 * math.prod(shape) if src == 0 else region,
                                  i0 * math.prod(plan.shapes[-1]) if k == len(work) - 1 else region)
                program.end_slice()
        else:
            # batch 1: each step in slices of its channels; a channelwise step continues the slices before it
            # into a buffer that no step of the stage has touched yet (the other threads may still read it whole, as
            # a dense conv does, or hold its other channels at another step's plane size)
            stages, ranges, touched = [], None, set()
            for step, prepared, shape, src, dst in work:
                given = ranges if ranges is not None and step.channelwise_for(shape) and dst not in touched else None
                ranges, parts_of_step = step.channel_slices(program, prepared, shape, src, dst, parts, given)
                # chained where the step kept the slices it was given (a depthwise conv may not)
                if given is not None and ranges == given and len(parts_of_step) == len(stages[-1]):
                    for slice_, part in zip(stages[-1], parts_of_step):
                        slice_.append(part)
                else:
                    stages.append([[part] for part in parts_of_step])
                    touched = set()
                touched |= {src, dst}
                if ranges is not None and len(ranges) < 2:
                    ranges = None
            for stage in stages:
                for slice_ in stage:
                    if any(part() is False for part in slice_):
                        return None
                    program.end_slice()
                program.end_stage()
        program.finish(parts)
        return program

    def _images_per_slice(self, parts):
        """Images per slice of a batch: on several threads about _SPLIT_SLICE_BYTES of the largest activation, at
        most _IMAGES_PER_SLICE; on one a slice of about _SLICE_BYTES of it where the whole batch's is more than
        _SLICE_ABOVE (else all)."""
        image = self.plan.largest * np.dtype(self.dtype).itemsize
        if parts > 1:
            return max(1, min(_IMAGES_PER_SLICE, _SPLIT_SLICE_BYTES // image))
        if _SPLIT_MODE == "off" or self.n * image <= _SLICE_ABOVE:
            return self.n
        return max(1, _SLICE_BYTES // image)

    def _split_parts(self):
        """Threads of a split program (frozen.pxi run_split), or 1 for a program of whole steps."""
        threads = _threads.get_num_threads()
        if threads == 1 or _SPLIT_MODE == "off":
            return 1
        if _SPLIT_MODE == "on":
            return threads
        flops = self.n * sum(step.flops(prepared) for step, prepared in zip(self.steps, self.plan.prepared))
        return threads if flops >= _SPLIT_FLOPS or not _threads._serial_small_calls else 1


def _compilable(array, dtype):
    return array.dtype == dtype and array.flags.c_contiguous


class FrozenModel:
    """An inference plan of a Sequential model (see the module docstring): `frozen(x)` or `frozen.predict(x,
    batch_size)` give what `model.predict(x)` gives, within float rounding, for NCHW arrays of the model's dtype.

    The weights are taken when the model is frozen: later training, `load`, or edits of the model's parameters do
    not reach a frozen model; freeze again to take them. Calls may come from several threads at once.

    winograd=True (opt-in): float32 3x3 convs of stride 1, dilation 1, one group, 32 or more input channels and 16
    or more output channels run by Winograd's F(2x2, 3x3), with 4/9 of the multiplications (1.4-1.8x faster on such
    convs). Its transforms round differently (as close to the exact result as the direct sum, in
    tests/test_winograd.py), a non-finite input value spreads to the whole 2x2 output tile whose input holds it
    (inf - inf), and a non-finite weight makes its output channel non-finite everywhere, as in the direct sum but
    NaN where that may give an infinity; so it stays off unless asked for. Bits still do not depend on the thread
    count or the batch size."""

    def __init__(self, model, winograd=False):
        self.dtype = model.dtype
        self.input_shape = model.input_shape
        self.winograd = bool(winograd)
        self.steps = _rewrite(model.layers, self.winograd)
        self._plans = {}
        self._arenas = {}
        self._lock = threading.Lock()

    def __repr__(self):
        winograd = ", winograd=True" if self.winograd else ""
        return f"FrozenModel({' -> '.join(step.describe() for step in self.steps)}{winograd})"

    def __getstate__(self):
        # copies and pickles keep the steps and plans; the buffer sets (with their compiled loops, which point
        # into them) and the lock are made afresh
        state = dict(self.__dict__)
        del state["_arenas"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arenas = {}
        self._lock = threading.Lock()

    def plan_for(self, sample_shape):
        """The plan for inputs of per-sample shape sample_shape (built on first use); ValueError naming the layer
        where the shape does not fit."""
        plan = self._plans.get(sample_shape)
        if plan is None:
            if self.input_shape is not None and tuple(self.input_shape) != sample_shape:
                raise ValueError(f"this frozen model takes input of shape (N, {', '.join(map(str, self.input_shape))})"
                                 f", got (N, {', '.join(map(str, sample_shape))})")
            try:
                plan = _Plan(self.steps, sample_shape)
            except ValueError as e:
                i, name = self.steps[len(e.args[1]) - 1].origin if len(e.args) > 1 else (None, None)
                raise ValueError(f"layer {i} ({name}) cannot take per-sample input of shape {e.args[1][-1]}: "
                                 f"{e.args[0]}") from e
            with self._lock:
                self._plans[sample_shape] = plan
        return plan

    def _take_arena(self, sample_shape, n, plan):
        # each call takes a free set of buffers or makes one; dict.setdefault, list.pop and list.append are each
        # atomic (under the GIL, and locked per object in free-threaded builds), which is all this needs: two
        # calls never get the same arena (a lock per call cost about 1 us of a 30 us batch-1 call)
        free = self._arenas.setdefault((sample_shape, n), [])
        try:
            return free.pop()
        except IndexError:
            return _Arena(self.steps, plan, n, self.dtype)

    def _give_arena(self, sample_shape, n, arena):
        self._arenas[(sample_shape, n)].append(arena)

    # False: run the steps one Python call each, as before the compiled loop (the tests compare the two)
    compiled = True

    def _run(self, x, plan):
        n = x.shape[0]
        arena = self._take_arena(x.shape[1:], n, plan)
        try:
            current = np.ascontiguousarray(x)
            program = arena.compiled() if self.compiled else None
            if program is not None:
                program.run(current)
                return (arena.result if program.result is None else program.result).copy()
            for step, prepared, out in zip(self.steps, plan.prepared, arena.outs):
                current = step.run(current, current if out is _IN_PLACE else out, prepared)
            return current.copy() if arena.holds_result else np.array(current)
        finally:
            self._give_arena(x.shape[1:], n, arena)

    def predict(self, x, batch_size=256):
        """The model's outputs for x (N, ...), computed batch_size samples at a time in reused buffers."""
        batch_size = _args.check_int(batch_size, "batch_size", 1)
        x = model_input(x, self.dtype)
        sample_shape = tuple(x.shape[1:])
        plan = self.plan_for(sample_shape)
        n = x.shape[0]
        if n == 0:
            return np.empty((0,) + plan.shapes[-1], self.dtype)
        if n <= batch_size:
            return self._run(x, plan)
        out = np.empty((n,) + plan.shapes[-1], self.dtype)
        for start in range(0, n, batch_size):
            out[start:start + batch_size] = self._run(x[start:start + batch_size], plan)
        return out

    __call__ = predict

    def memory_bytes(self, batch_size, input_shape=None):
        """Bytes this plan holds for one call of batch_size samples: the weights it keeps (as the model had them,
        folded, and as packed for the conv kernels: Winograd's are 16/9 the size) plus the activation buffers a
        call uses (two, three at batch 1; each concurrent call has its own)."""
        batch_size = _args.check_int(batch_size, "batch_size", 1)
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None and len(self._plans) == 1:
            shape = next(iter(self._plans))             # the one input shape this model has been called with
        if shape is None:
            raise ValueError("the input shape is unknown: pass input_shape")
        plan = self.plan_for(tuple(shape))
        weights = sum(a.nbytes for step in self.steps for a in vars(step).values() if isinstance(a, np.ndarray))
        weights += sum(step.packed_bytes(prepared) for step, prepared in zip(self.steps, plan.prepared))
        return weights + _buffer_count(batch_size) * batch_size * plan.largest * np.dtype(self.dtype).itemsize
