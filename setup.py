"""Build the Cython kernels.

The compute kernels (`convengine/_kernels/engine.pxi`) are compiled once per x86-64 ISA level into
`_engine_<isa>` modules and the fastest one the CPU supports is picked at import (`_kernels/__init__.py`), so one
build runs on any x86-64 and still uses AVX2/AVX-512 where present. Other architectures get the baseline only.

A release build carries no debug information (-g0 overrides the interpreter's -g; the symbol table stays, for
profilers). The modules compile in parallel, one compiler process per module (`build_ext -j N` or
CONVENGINE_BUILD_JOBS=N; default: every usable core), and each built module is kept in a cache keyed by
everything that goes into it (the generated C, the headers, compiler, flags, Python ABI), so that installing
again, e.g. `pip install -e .` then `pip install -e '.[test]'`, reuses it instead of compiling again.

Environment switches:
  CONVENGINE_DEBUG=1     Cython bounds/wraparound/initialized checks on, -O1 -g (a debug build for CI)
  CONVENGINE_SANITIZE=1  also -fsanitize=address,undefined (run with LD_PRELOAD of libasan; see tests/README)
  CONVENGINE_NO_OPENMP=1 build without OpenMP (the kernels then run serially)
  CONVENGINE_BUILD_JOBS=N  modules compiled at once (default: the usable cores)
  CONVENGINE_BUILD_CACHE=DIR  where built modules are kept (default: build/module-cache beside setup.py);
                         CONVENGINE_BUILD_CACHE=0 turns the cache off
"""
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

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
BASE_CFLAGS = ["-O1", "-g"] if DEBUG or SANITIZE else ["-O3", "-g0"]
# -fno-trapping-math: no code here reads FP exception flags, and without it gcc may not turn float compares into
# selects (max pooling stayed branchy: 5x slower on real data)
# -fno-math-errno: no code here reads errno either, and with it gcc keeps every sqrt scalar behind a branch to the
# library call (Adam's update: 3 ns per value instead of a vectorised loop)
BASE_CFLAGS += ["-fno-strict-aliasing", "-fno-trapping-math", "-fno-math-errno"]
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

def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Built modules kept in the cache (each entry one module, under 1 MB in a release build); the least recently used
# go first.
CACHE_KEEP = 32


def cache_dir():
    setting = os.environ.get("CONVENGINE_BUILD_CACHE", "")
    if setting == "0":
        return None
    return setting or os.path.join(HERE, "build", "module-cache")


class ParallelCachedBuildExt(build_ext):
    """build_ext that compiles the extension modules at once (distutils' thread pool: each thread runs its own
    compiler process) and keeps every built module in a content-addressed cache."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            jobs = int(os.environ.get("CONVENGINE_BUILD_JOBS") or usable_cores())
            self.parallel = max(1, min(jobs, len(self.extensions or ())))
        if self.parallel == 1:
            self.parallel = None  # serial, in order
        self._compiler_version = None

    def build_extensions(self):
        # Biggest sources first, so that the small module fills a free slot instead of starting a long tail.
        self.extensions.sort(key=lambda e: -sum(os.path.getsize(s) for s in e.sources if os.path.exists(s)))
        super().build_extensions()

    def compiler_version(self):
        if self._compiler_version is None:
            try:
                out = subprocess.run([self.compiler.compiler_so[0], "--version"], capture_output=True, text=True)
                self._compiler_version = out.stdout
            except (OSError, AttributeError, IndexError):
                self._compiler_version = "unknown"
        return self._compiler_version

    def cache_key(self, ext):
        """A digest of everything the built module depends on; None when something cannot be read."""
        h = hashlib.sha256()
        facts = {
            "name": ext.name, "compiler_so": getattr(self.compiler, "compiler_so", None),
            "linker_so": getattr(self.compiler, "linker_so", None), "compiler_version": self.compiler_version(),
            "compile_args": ext.extra_compile_args, "link_args": ext.extra_link_args,
            "macros": ext.define_macros, "undef": ext.undef_macros, "include_dirs": ext.include_dirs,
            "libraries": ext.libraries, "library_dirs": ext.library_dirs, "ext_suffix": self.get_ext_filename(""),
            "platform": sysconfig.get_platform(), "abi": sys.implementation.cache_tag,
            "env": {k: os.environ.get(k) for k in ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED", "ARCHFLAGS")},
        }
        h.update(json.dumps(facts, sort_keys=True, default=str).encode())
        headers = sorted({os.path.join(d, f) for d in ext.include_dirs or [] if os.path.isdir(d)
                          for f in os.listdir(d) if f.endswith(".h")})
        for path in list(ext.sources) + list(ext.depends) + headers:
            try:
                with open(path, "rb") as f:
                    h.update(os.path.basename(path).encode() + b"\0" + hashlib.sha256(f.read()).digest())
            except OSError:
                return None
        return h.hexdigest()

    def build_extension(self, ext):
        folder = cache_dir()
        key = self.cache_key(ext) if folder and not self.force else None
        target = self.get_ext_fullpath(ext.name)
        cached = os.path.join(folder, key, os.path.basename(target)) if key else None
        if cached and os.path.isfile(cached):
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            # A fresh modification time (shutil.copy, not copy2): the entry keeps the time it was built, and a
            # target older than the module it replaces is "up to date" to distutils' copies and checks, e.g. the
            # copy to the source tree that `build_ext --inplace` makes, which then kept the module of the build
            # before. Through a temporary file, so that a process that has the old module loaded keeps its own.
            partial = f"{target}.{os.getpid()}.{threading.get_ident()}.partial"
            shutil.copy(cached, partial)
            os.replace(partial, target)
            os.utime(os.path.dirname(cached))  # recently used
            print(f"{ext.name}: reused the module built before ({cached})", flush=True)
            return
        if cached:
            # Not in the cache, so something that goes into the module changed, and what is there was built
            # from something else. distutils would skip the build when the target is newer than the sources
            # (a change of flags, macros or compiler leaves the generated C as it was) and that old module would
            # go into the cache under the new key. With the target gone the module is compiled now, and only a module
            # compiled in this run is stored.
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)
        super().build_extension(ext)
        if cached and os.path.isfile(target):
            try:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                partial = f"{cached}.{os.getpid()}.{threading.get_ident()}.partial"
                shutil.copy2(target, partial)
                os.replace(partial, cached)
                prune(folder, CACHE_KEEP)
            except OSError as e:  # a cache that cannot be written costs the next build time, nothing else
                print(f"{ext.name}: not cached ({e})", flush=True)

    def copy_extensions_to_source(self):
        """`--inplace`: the built modules into the source tree, always. setuptools copies with distutils' update
        rule, which skips a destination that is not older than the source, and a module taken from the cache
        may well be older than the one in place."""
        force, self.force = self.force, True
        try:
            super().copy_extensions_to_source()
        finally:
            self.force = force


def prune(folder, keep):
    """Remove all but the `keep` most recently used entries of the cache."""
    entries = [os.path.join(folder, name) for name in os.listdir(folder)]
    entries = sorted((p for p in entries if os.path.isdir(p)), key=os.path.getmtime, reverse=True)
    for path in entries[keep:]:
        shutil.rmtree(path, ignore_errors=True)


# pip (setuptools.build_meta) and `python setup.py` both run this file as __main__; tests/test_build.py imports
# it to check the build command without building the package.
if __name__ == "__main__":
    setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                                include_path=["convengine/_kernels"], nthreads=usable_cores()),
          cmdclass={"build_ext": ParallelCachedBuildExt},
          # The generated C sources (about 11 MB) are build inputs, not part of the installed package.
          exclude_package_data={"convengine._kernels": ["*.c"]})
