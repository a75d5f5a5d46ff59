"""The build (setup.py): extension modules compile in parallel and a module built before is reused only when
everything that goes into it is the same; and the OpenMP wait policy the kernels ask for is in force.

tools/build_wheel.sh checks the release wheel itself (manylinux tag, bundled OpenMP runtime, no C sources, no
debug information, installed size); CI runs it."""
import contextlib
import importlib.util
import io
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = textwrap.dedent("""
    #include <Python.h>
    static PyObject *answer(PyObject *self, PyObject *unused) { return PyLong_FromLong(ANSWER); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "cachedmod", NULL, -1, methods};
    PyMODINIT_FUNC PyInit_cachedmod(void) { return PyModule_Create(&def); }
""")


@pytest.fixture(scope="module")
def setup_module():
    """setup.py as a module (its setup() call only runs as __main__)."""
    path = ROOT / "setup.py"
    if not path.exists():
        pytest.skip("setup.py is not beside the tests (installed package)")
    pytest.importorskip("Cython")
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("convengine_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(setup_module, folder, answer, source=SOURCE, extensions=1, inplace=False):
    """Build the tiny module (and extensions - 1 copies) with the cached build_ext; return (path, printed, cmd).
    A source that is already there with the same text is left alone (as cythonize leaves the generated C). With
    inplace, as `build_ext --inplace`: the module is copied to folder/src, and that is the path returned."""
    from setuptools import Distribution, Extension
    folder.mkdir(exist_ok=True)
    exts = []
    for i in range(extensions):
        name = "cachedmod" if i == 0 else f"cachedmod{i}"
        c = folder / f"{name}.c"
        text = source.replace("cachedmod", name)
        if not c.exists() or c.read_text() != text:
            c.write_text(text)
        exts.append(Extension(name, [str(c)], define_macros=[("ANSWER", str(answer))]))
    (folder / "src").mkdir(exist_ok=True)
    dist = Distribution({"name": "cachedmod", "ext_modules": exts, "package_dir": {"": str(folder / "src")}})
    cmd = setup_module.ParallelCachedBuildExt(dist)
    cmd.build_lib = str(folder / "lib")
    cmd.build_temp = str(folder / "tmp")
    cmd.inplace = inplace
    cmd.ensure_finalized()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cmd.run()
    path = Path(cmd.get_ext_fullpath("cachedmod"))
    if inplace:
        path = folder / "src" / path.name
        assert path.exists()
    return path, buf.getvalue(), cmd


def _answer(path):
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('cachedmod', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.answer())")
    return int(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              check=True).stdout)


def test_a_module_is_reused_only_when_nothing_changed(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", str(tmp_path / "cache"))
    path, printed, _ = _build(setup_module, tmp_path / "a", 41)
    assert "reused" not in printed and _answer(path) == 41
    # A fresh build folder (as pip's editable install has each time): the same module comes from the cache.
    path, printed, _ = _build(setup_module, tmp_path / "b", 41)
    assert "cachedmod: reused the module built before" in printed and _answer(path) == 41
    # Another macro, another source text: compiled again, and the result says so.
    path, printed, _ = _build(setup_module, tmp_path / "c", 42)
    assert "reused" not in printed and _answer(path) == 42
    path, printed, _ = _build(setup_module, tmp_path / "d", 42, SOURCE.replace("ANSWER)", "ANSWER + 1)"))
    assert "reused" not in printed and _answer(path) == 43
    # Flags from the environment go into the module too.
    monkeypatch.setenv("CFLAGS", "-DUNUSED_FLAG=1")
    path, printed, _ = _build(setup_module, tmp_path / "e", 42)
    assert "reused" not in printed and _answer(path) == 42


def test_a_change_that_leaves_the_source_as_it_was_is_compiled_and_cached_as_built(setup_module, tmp_path,
                                                                                   monkeypatch):
    """Another macro (or flag, or compiler) in the same build folder: the generated C is as it was, older than
    the module built before, which distutils would call up to date and keep; it must not go into the cache under
    the new key either."""
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", str(tmp_path / "cache"))
    path, printed, _ = _build(setup_module, tmp_path / "a", 41)
    assert _answer(path) == 41
    path, printed, _ = _build(setup_module, tmp_path / "a", 42)
    assert "reused" not in printed and _answer(path) == 42
    # What the cache holds for 42 is the module built with 42.
    path, printed, _ = _build(setup_module, tmp_path / "b", 42)
    assert "cachedmod: reused the module built before" in printed and _answer(path) == 42


def test_inplace_builds_take_the_module_they_reuse(setup_module, tmp_path, monkeypatch):
    """`build_ext --inplace` after an edit, its undoing, the edit again, in one tree: each time the module in the
    source tree is the one of the current source, also when it comes from the cache (whose entry is older than
    the module in place: the copy to the source tree must not skip it as up to date)."""
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", str(tmp_path / "cache"))
    edited = SOURCE.replace("ANSWER)", "ANSWER + 1)")
    for i, (source, expected) in enumerate([(SOURCE, 41), (edited, 42), (SOURCE, 41), (edited, 42), (SOURCE, 41)]):
        time.sleep(0.05)  # distinct modification times, as builds a while apart
        path, printed, _ = _build(setup_module, tmp_path / "tree", 41, source, inplace=True)
        assert ("reused" in printed) == (i >= 2) and _answer(path) == expected, (i, printed)


def test_cache_keeps_the_most_recently_used(setup_module, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", str(cache))
    monkeypatch.setattr(setup_module, "CACHE_KEEP", 2)
    # 1 is reused after 2 was built, so 2 is the least recently used entry when 3 comes in.
    for i, answer in enumerate((1, 2, 1, 3)):
        path, printed, _ = _build(setup_module, tmp_path / str(i), answer)
        assert _answer(path) == answer and ("reused" in printed) == (i == 2)
        time.sleep(0.05)  # distinct modification times
    assert len(list(cache.iterdir())) == 2
    assert "reused" in _build(setup_module, tmp_path / "again3", 3)[1]
    assert "reused" in _build(setup_module, tmp_path / "again1", 1)[1]
    assert "reused" not in _build(setup_module, tmp_path / "again2", 2)[1]


def test_cache_off(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", "0")
    _build(setup_module, tmp_path / "a", 7)
    path, printed, _ = _build(setup_module, tmp_path / "b", 7)
    assert "reused" not in printed and _answer(path) == 7


@pytest.mark.parametrize("jobs, extensions, expected", [("2", 3, 2), ("8", 3, 3), ("1", 3, None)])
def test_modules_compile_in_parallel(setup_module, tmp_path, monkeypatch, jobs, extensions, expected):
    monkeypatch.setenv("CONVENGINE_BUILD_JOBS", jobs)
    monkeypatch.setenv("CONVENGINE_BUILD_CACHE", "0")
    _, _, cmd = _build(setup_module, tmp_path, 1, extensions=extensions)
    assert cmd.parallel == expected
    for i in range(extensions):
        assert Path(cmd.get_ext_fullpath("cachedmod" if i == 0 else f"cachedmod{i}")).exists()


def test_release_builds_carry_no_debug_information(setup_module):
    if setup_module.DEBUG or setup_module.SANITIZE:
        pytest.skip("a debug build")
    assert "-g0" in setup_module.BASE_CFLAGS and "-g" not in setup_module.BASE_CFLAGS


def test_openmp_spins_briefly_unless_the_user_says_otherwise():
    """libgomp reads its spin count once, when the engine module loads it: the kernels' spin (_kernels.SPIN_COUNT,
    measured in each process) must be in force then, and gone from the environment afterwards; a user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    code = ("import os, convengine; from convengine import _kernels as k; "
            "print('left', os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')); "
            "print('count', k.SPIN_COUNT)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__import__("convengine").__file__).parents[1]),
                                                    env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if "GOMP_SPINCOUNT" not in run.stderr:
        pytest.skip("not GNU OpenMP (libgomp)")
    count = int(run.stdout.split("count ")[1].split()[0])
    assert f"GOMP_SPINCOUNT = '{count}'" in run.stderr and "left None None" in run.stdout
    env["OMP_WAIT_POLICY"] = "passive"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "GOMP_SPINCOUNT = '0'" in run.stderr and "left None passive" in run.stdout
    del env["OMP_WAIT_POLICY"]
    env["GOMP_SPINCOUNT"] = "20000"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "GOMP_SPINCOUNT = '20000'" in run.stderr and "left 20000 None" in run.stdout


def test_openmp_spin_count_is_a_time_in_pause_instructions():
    """GOMP_SPINCOUNT counts pause instructions, whose length differs between CPUs (an Intel Xeon's 11.5 ns spun
    500 of them in 5.8 us): the count is _kernels.SPIN_MICROSECONDS over one pause's measured time, within bounds
    that keep convengine.frozen's reading of it (below 5000: not a user's wish to keep spinning)."""
    from convengine import _kernels as k, frozen
    assert k.spin_count(10.0) == round(k.SPIN_MICROSECONDS * 100)
    assert k.spin_count(k.SPIN_MICROSECONDS * 1000 / 1234) == 1234
    assert k.spin_count(1e-3) == k.SPIN_COUNT_MAX and k.spin_count(1e6) == k.SPIN_COUNT_MIN
    assert k.spin_count(0.0) == k.spin_count(float("nan")) == k.SPIN_COUNT_FALLBACK
    assert not frozen._workers_keep_spinning(f"GOMP_SPINCOUNT={k.SPIN_COUNT_MAX}")
    pause = k._cpu.pause_ns(200, 3)
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        assert 0.1 < pause < 1000, pause
        assert k.SPIN_COUNT_MIN <= k.SPIN_COUNT <= k.SPIN_COUNT_MAX
    with pytest.raises(ValueError, match="must be >= 1"):
        k._cpu.pause_ns(0, 3)


def test_the_cpu_family_is_the_one_the_kernel_reports():
    """_cpu.family (which picks Winograd's weight gradient on Zen 4 and not on Zen 5) reads CPUID's family as
    /proc/cpuinfo's "cpu family" gives it, the extended family added (25 = 0x19 on Zen 3 and 4, 26 on Zen 5, 6 on
    Intel's cores); 0 off x86."""
    from convengine._kernels import _cpu
    from test_functional import _cpu_family
    family = _cpu.family()
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        assert family == 0
        return
    assert family >= 5
    if _cpu_family() is not None:
        assert family == _cpu_family()
