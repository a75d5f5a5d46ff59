"""The compute kernels compiled for the avx2 ISA level (see setup.py); chosen at import by _kernels/__init__.py."""
include "engine.pxi"
