"""Subnormal numbers inside the engine: flushed to zero by default, IEEE on request.

Operations that read or produce a subnormal number (below ~1.2e-38 in float32, ~2.2e-308 in float64) take a slow
microcode path on x86 CPUs: a convolution whose inputs were 1% subnormal ran 22x slower, all-subnormal 159x. Such
values appear late in training, when small gradients and activations decay. So the compiled kernels run with
flush-to-zero and denormals-are-zero on, as TensorFlow's CPU threads do: a subnormal input reads as 0 and a result
that would be subnormal becomes 0 (a signed zero). Values that a kernel only selects or copies keep their bits:
max pooling returns the winning input itself, so a subnormal maximum stays subnormal (it compares as 0). The mode is set on entry to each compiled call, in every thread
that runs it, and restored on exit, so NumPy, BLAS and your own code keep full IEEE behaviour. Code in
`convengine.reference` (plain NumPy) is never affected.
"""
from ._kernels import engine as _engine

__all__ = ["set_flush_denormal", "get_flush_denormal"]


def set_flush_denormal(flag):
    """Flush subnormal inputs and results to zero inside the engine's kernels (True, the default), or keep IEEE
    subnormals (False: exact gradual underflow, at the speed cost above). Takes effect from the next call."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be True or False, got {flag!r}")
    _engine.set_flush_denormal(flag)


def get_flush_denormal():
    """Whether the engine's kernels flush subnormal numbers to zero (see set_flush_denormal)."""
    return _engine.get_flush_denormal()
