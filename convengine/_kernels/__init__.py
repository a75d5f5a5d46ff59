"""Private compiled kernels. `functional.py` is the face; this module only picks the build for this CPU.

The kernels exist once per ISA level (`_engine_baseline`, `_engine_avx2`, `_engine_avx512`, see setup.py). The
best level that is both built and supported by the CPU is loaded; CONVENGINE_ISA=baseline|avx2|avx512 forces a
level (an error if the CPU lacks it), which the tests use to check every path.
"""
import importlib
import importlib.util
import os

# OpenMP threads that spin-wait between parallel regions hold their cores while Python runs between kernel calls,
# and on a small shared machine they starve everything else: one training epoch of the digits net at 2 threads,
# with other work on the 2 cores, took 0.81 s spinning and 0.19 s passive. libgomp reads this once, when it loads,
# which is when the engine module below is imported (_cpu does not link it); a user's own setting wins.
# The variable is removed again once loaded, so that OpenMP runtimes loaded later (PyTorch ships its own) keep
# their defaults.
_USER_POLICY = os.environ.get("OMP_WAIT_POLICY") or (
    "GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"] if "GOMP_SPINCOUNT" in os.environ else None)
if _USER_POLICY is None:
    os.environ["OMP_WAIT_POLICY"] = "passive"
_NOT_BUILT = ("convengine's compiled kernels are not built in {where}. In a source checkout, build them with "
              "`pip install -e .` (or `python setup.py build_ext --inplace`), run from the checkout's root; or "
              "install the package with `pip install .` and run from another folder.")


def _not_built():
    """An ImportError saying what to run, for a checkout whose extension modules were never compiled (Python's
    own message would be a puzzling 'partially initialized module ... circular import')."""
    return ImportError(_NOT_BUILT.format(where=os.path.dirname(os.path.abspath(__file__))))


def _restore_policy():
    if _USER_POLICY is None:
        os.environ.pop("OMP_WAIT_POLICY", None)


if importlib.util.find_spec(f"{__name__}._cpu") is None:
    _restore_policy()
    raise _not_built()
try:
    from . import _cpu
except BaseException:
    _restore_policy()
    raise
WAIT_POLICY = _USER_POLICY or "passive"

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
