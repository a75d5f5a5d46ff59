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
# training step is hundreds of regions. So the workers spin briefly (SPIN_COUNT, libgomp's GOMP_SPINCOUNT: a few
# microseconds) and then sleep. Measured on AMD EPYC Zen 4, 2 vCPUs, 2 threads, medians of 3 runs (epoch of the
# digits net): alone passive 0.114 s, spin 500 0.083, spin 1000 0.076; beside a busy process passive 0.097, spin 500
# 0.126, spin 1000 0.152 (spin 10000: 0.069 alone, 0.51 beside it). Batch-64 training steps alone: LeNet-5 5.0 ->
# 3.9 ms, the depthwise-separable net 21 -> 18. libgomp reads this once, when it loads, which is when the engine
# module below is imported (_cpu does not link it); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (passive
# for a machine shared with other busy work). The variable is removed again once loaded, so that OpenMP runtimes
# loaded later (PyTorch ships its own) keep their defaults.
SPIN_COUNT = 500
_USER_POLICY = os.environ.get("OMP_WAIT_POLICY") or (
    "GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"] if "GOMP_SPINCOUNT" in os.environ else None)
if _USER_POLICY is None:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
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
    _restore_policy()
    raise _not_built()
try:
    from . import _cpu
except BaseException:
    _restore_policy()
    raise
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
        "num_threads": get_num_threads(),
    }
