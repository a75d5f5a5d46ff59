"""Private compiled kernels. `functional.py` is the face; this module only picks the build for this CPU.

The kernels exist once per ISA level (`_engine_baseline`, `_engine_avx2`, `_engine_avx512`, see setup.py). The
best level that is both built and supported by the CPU is loaded; CONVENGINE_ISA=baseline|avx2|avx512 forces a
level (an error if the CPU lacks it), which the tests use to check every path.
"""
import importlib
import importlib.util
import os

# How OpenMP workers wait between parallel regions. Spinning long holds the cores while Python runs between kernel
# calls and, on a small shared machine, starves everything else: one training epoch of the digits net at 2 threads,
# with other work on the 2 cores, took 0.81 s spinning and 0.19 s passive. Sleeping at once
# (passive) makes every region pay a wake-up, which under a hypervisor is an idle vCPU's exit (tens of us): a
# training step is hundreds of regions. So the workers spin for a while (SPIN_MICROSECONDS) and then sleep.
# libgomp counts its spin (GOMP_SPINCOUNT) in pause instructions, whose length differs from CPU to CPU, so the count
# is the spin time over one pause's, measured here (_cpu.pause_ns): a fixed count of 500, chosen on AMD EPYC Zen 4,
# spun 5.8 us on an Intel Xeon (AVX-512, 2 vCPUs, 11.5 ns per pause), shorter than the gaps between a step's
# regions, and the workers slept between most of them. Batch-64 training steps at 2 threads there, medians of 15
# (count: ms): LeNet-5 0: 6.3, 500: 5.4, 1000: 4.7, 2000: 4.0, 5000: 3.9, active 3.6; the depthwise-separable net
# 0: 23.7, 500: 20.9, 2000: 17.8, 5000: 15.6; epoch of the digits net 0.162 / 0.148 / 0.110 / 0.098 s (0 / 500 /
# 2000 / 5000); beside a busy process that epoch took 0.108 / 0.125 / 0.156 / 0.186 s. Earlier on Zen 4 (digits
# epoch): alone passive 0.114 s, count 500 0.083, 1000 0.076; beside a busy process passive 0.097, 500 0.126, 1000
# 0.152. SPIN_MICROSECONDS is where the gain alone levels off, at a cost beside a busy process that
# `OMP_WAIT_POLICY=passive` removes. libgomp reads the count once, when it loads, which is when the engine module
# below is imported (_cpu does not link it); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (passive for a
# machine shared with other busy work). The variable is removed again once loaded, so that OpenMP runtimes loaded
# later (PyTorch ships its own) keep their defaults.
SPIN_MICROSECONDS = 25
# The count where a pause cannot be timed, and the bounds of a measured one: below 5000, which convengine.frozen
# reads as a user's wish that workers keep spinning.
SPIN_COUNT_FALLBACK, SPIN_COUNT_MIN, SPIN_COUNT_MAX = 2000, 500, 4000


def spin_count(pause_ns):
    """GOMP_SPINCOUNT for a spin of SPIN_MICROSECONDS where one pause takes pause_ns nanoseconds."""
    if not pause_ns > 0:
        return SPIN_COUNT_FALLBACK
    return int(min(SPIN_COUNT_MAX, max(SPIN_COUNT_MIN, round(SPIN_MICROSECONDS * 1000 / pause_ns))))


_USER_POLICY = os.environ.get("OMP_WAIT_POLICY") or (
    "GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"] if "GOMP_SPINCOUNT" in os.environ else None)
_NOT_BUILT = ("convengine's compiled kernels are not built in {where}. In a source checkout, build them with "
              "`pip install -e .` (or `python setup.py build_ext --inplace`), run from the checkout's root; or "
              "install the package with `pip install .` and run from another folder.")


def _not_built():
    """An ImportError saying what to run, for a checkout whose extension modules were never compiled (Python's
    own message would be a puzzling 'partially initialized module ... circular import')."""
    return ImportError(_NOT_BUILT.format(where=os.path.dirname(os.path.abspath(__file__))))


def _restore_policy():
    if _USER_POLICY is None:
        os.environ.pop("GOMP_SPINCOUNT", None)


if importlib.util.find_spec(f"{__name__}._cpu") is None:
    raise _not_built()
from . import _cpu  # noqa: E402  (does not load libgomp)

SPIN_COUNT = spin_count(_cpu.pause_ns())
if _USER_POLICY is None:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
WAIT_POLICY = _USER_POLICY or f"GOMP_SPINCOUNT={SPIN_COUNT}"

_ORDER = ("baseline", "avx2", "avx512")


def _available():
    """ISA levels that are built here and that this CPU runs."""
    return [isa for isa in _cpu.cpu_supports() if importlib.util.find_spec(f"{__name__}._engine_{isa}") is not None]


def _select():
    available = _available()
    if not available:
        raise _not_built()
    wanted = os.environ.get("CONVENGINE_ISA", "").strip().lower()
    if wanted:
        if wanted not in _ORDER:
            raise ImportError(f"CONVENGINE_ISA={wanted!r} is not one of {', '.join(_ORDER)}")
        if wanted not in available:
            raise ImportError(f"CONVENGINE_ISA={wanted!r} is not available here (built and supported: "
                              f"{', '.join(available)})")
        return wanted
    return max(available, key=_ORDER.index)


try:
    ISA = _select()
    engine = importlib.import_module(f"{__name__}._engine_{ISA}")  # loads libgomp, which reads the policy now
finally:
    _restore_policy()
# choices by the CPU's maker, as measured on each
_AMD = _cpu.is_amd()
_ZEN4 = _AMD and _cpu.family() == 0x19   # AVX-512 on 256-bit halves (Zen 5, family 0x1A, runs it whole)
engine.set_pixels_first(_AMD)            # the pixel path goes first on AMD (conv_plan.pxi)
engine.set_winograd_grad_weight(_ZEN4)   # Winograd's weight gradient gains on Zen 4 (conv_winograd_grad_weight.pxi)


def build_info():
    """How the kernels were built and what runs now: compiler, flags, OpenMP, the ISA level in use."""
    from .._threads import get_num_threads
    omp_on, omp_version = _cpu.openmp()
    return {
        "version": __import__("convengine").__version__,
        "compiler": _cpu.compiler(),
        "cflags": engine.CFLAGS,
        "openmp": omp_on,
        "openmp_version": omp_version,
        "omp_wait_policy": WAIT_POLICY,
        "flush_denormal": engine.get_flush_denormal(),
        "flush_denormal_supported": engine.FLUSH_SUPPORTED,
        "simd": ISA,
        "simd_available": _available(),
        "tile": engine.tile_info(),
        # float32 convs on small planes of large batches: the pixel path before the direct kernel (AMD only)
        "conv_pixels_first": engine.set_pixels_first(),
        # training with model.winograd: the weight gradient by Winograd too (AMD Zen 4 only)
        "winograd_grad_weight": engine.set_winograd_grad_weight(),
        "num_threads": get_num_threads(),
    }
