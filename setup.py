"""Build the Cython kernels.

The compute kernels (`convengine/_kernels/engine.pxi`) are compiled once per x86-64 ISA level into
`_engine_<isa>` modules and the fastest one the CPU supports is picked at import (`_kernels/__init__.py`), so one
build runs on any x86-64 and still uses AVX2/AVX-512 where present. Other architectures get the baseline only.

Environment switches:
  CONVENGINE_DEBUG=1     Cython bounds/wraparound/initialized checks on, -O1 -g (a debug build for CI)
  CONVENGINE_SANITIZE=1  also -fsanitize=address,undefined (run with LD_PRELOAD of libasan; see tests/README)
  CONVENGINE_NO_OPENMP=1 build without OpenMP (the kernels then run serially)
"""
import os
import platform
import subprocess
import sys
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CONVENGINE_DEBUG") == "1"
SANITIZE = os.environ.get("CONVENGINE_SANITIZE") == "1"

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
ISA_FLAGS = {"baseline": []}
if X86 and sys.platform != "win32":
    ISA_FLAGS["avx2"] = ["-mavx2", "-mfma"]
    ISA_FLAGS["avx512"] = ["-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"]


def openmp_flags():
    """-fopenmp if the compiler can build and link a program with it, else [] (serial kernels)."""
    if os.environ.get("CONVENGINE_NO_OPENMP") == "1" or sys.platform == "win32":
        return []
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(tmp, "t")], capture_output=True)
        except OSError:
            return []
        return ["-fopenmp"] if r.returncode == 0 else []


OMP = openmp_flags()
BASE_CFLAGS = ["-O1", "-g"] if DEBUG or SANITIZE else ["-O3"]
# -fno-trapping-math: no code here reads FP exception flags, and without it gcc may not turn float compares into
# selects (max pooling stayed branchy: 5x slower on real data)
BASE_CFLAGS += ["-fno-strict-aliasing", "-fno-trapping-math"]
LDFLAGS = list(OMP)
if SANITIZE:
    BASE_CFLAGS += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    LDFLAGS += ["-fsanitize=address,undefined"]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG or SANITIZE,
    "wraparound": False,
    "initializedcheck": DEBUG or SANITIZE,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}


def build_info_macros(isa, cflags):
    """Compile-time facts that build_info() reports."""
    text = " ".join(cflags)
    return [("CE_BUILD_CFLAGS", '"%s"' % text), ("CE_BUILD_ISA", '"%s"' % isa)]


extensions = [
    Extension("convengine._kernels._cpu", ["convengine/_kernels/_cpu.pyx"],
              extra_compile_args=BASE_CFLAGS + OMP, extra_link_args=LDFLAGS,
              define_macros=build_info_macros("baseline", BASE_CFLAGS + OMP)),
]
for isa, flags in ISA_FLAGS.items():
    cflags = BASE_CFLAGS + OMP + flags
    extensions.append(Extension(
        f"convengine._kernels._engine_{isa}", [f"convengine/_kernels/_engine_{isa}.pyx"],
        include_dirs=["convengine/_kernels"], extra_compile_args=cflags, extra_link_args=LDFLAGS,
        define_macros=build_info_macros(isa, cflags)))

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                            include_path=["convengine/_kernels"], nthreads=0))
