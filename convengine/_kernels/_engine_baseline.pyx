"""The compute kernels compiled for the baseline ISA level (see setup.py); chosen at import by _kernels/__init__.py."""
include "engine.pxi"
