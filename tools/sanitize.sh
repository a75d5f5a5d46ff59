#!/usr/bin/env bash
# The core kernel tests under AddressSanitizer and UndefinedBehaviorSanitizer, with Cython's bounds and
# initialisation checks on (issue 5). Any sanitizer report, bounds error or test failure fails the run.
#
# It copies the working tree as it is (tracked files and untracked ones git does not ignore, uncommitted edits
# included, never build outputs) to a temporary directory, builds the extension there with CONVENGINE_SANITIZE=1
# (see setup.py: -fsanitize=address,undefined -O1 -g, boundscheck and initializedcheck on), and runs the tests
# from the copy once per ISA level (CONVENGINE_ISA): the level picked by default on this CPU, then baseline.
#
#   bash tools/sanitize.sh                             # default ISA level and baseline (about 3 minutes)
#   SANITIZE_ISAS=all bash tools/sanitize.sh           # every level this CPU runs
#   SANITIZE_ISAS="avx2 baseline" bash tools/sanitize.sh
#   SANITIZE_RECOVER=1 bash tools/sanitize.sh          # UBSan reports every site and goes on (still fails)
#   SANITIZE_KEEP=1 bash tools/sanitize.sh             # keep the copy and its logs (the path is printed)
#   SANITIZE_TESTS="tests/test_fuzz.py" bash tools/sanitize.sh
#
# Needs gcc with libasan/libubsan, Python with numpy, pytest and hypothesis, and Cython >= 3 + setuptools to build
# (installed with pip when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(pwd)"
python="${PYTHON:-python3}"

read -r -a tests <<<"${SANITIZE_TESTS:-tests/test_functional.py tests/test_determinism.py tests/test_bad_input.py tests/test_fuzz.py tests/test_sizes.py tests/test_subnormal.py tests/test_frozen.py tests/test_fusion.py tests/test_optim_fused.py tests/test_model_fuzz.py}"

work="$(mktemp -d "${TMPDIR:-/tmp}/convengine-sanitize.XXXXXX")"
cleanup() {
    if [[ "${SANITIZE_KEEP:-0}" == "1" ]]; then
        echo "sanitize: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

echo "sanitize: copying the working tree of $src to $work"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$src" ls-files -z --cached --others --exclude-standard \
        | (cd "$src" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh) \
        | (cd "$src" && tar --null -T - -cf -) | tar -C "$work" -xf -
else
    # Not a git checkout (an unpacked sdist): everything but build outputs and caches.
    (cd "$src" && tar --exclude=./build --exclude='*.so' --exclude='./convengine/_kernels/*.c' \
        --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache --exclude=.git -cf - .) \
        | tar -C "$work" -xf -
fi

if ! "$python" -c 'import Cython, setuptools, sys; sys.exit(int(Cython.__version__.split(".")[0]) < 3)' 2>/dev/null; then
    echo "sanitize: installing Cython and setuptools to build"
    "$python" -m pip install --quiet "Cython>=3.0" "setuptools>=64"
fi

echo "sanitize: building with CONVENGINE_SANITIZE=1"
start=$SECONDS
(cd "$work" && CONVENGINE_SANITIZE=1 "$python" setup.py build_ext --inplace >"$work/build.log" 2>&1) || {
    tail -n 60 "$work/build.log"
    echo "sanitize: FAILED to build"
    exit 1
}
echo "sanitize: built in $((SECONDS - start)) s"

libasan="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "$libasan" ]]; then
    echo "sanitize: FAILED: gcc has no libasan.so ($libasan)"
    exit 1
fi

# Python leaks by design at exit: no leak checking. A request too big to allocate returns NULL, as malloc does,
# instead of stopping the process: the refusal paths (MemoryError) are under test too. ASan stops at its first
# report; UBSan too unless SANITIZE_RECOVER=1. Reports go to stderr, which pytest must not capture (-s): a process
# that a sanitizer stops never prints what pytest captured.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1"
if [[ "${SANITIZE_RECOVER:-0}" == "1" ]]; then
    export UBSAN_OPTIONS="halt_on_error=0:print_stacktrace=1"
else
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
fi
export PYTHONDONTWRITEBYTECODE=1
export PYTHONMALLOC=malloc  # Python objects in malloc'd blocks, where ASan sees them

if ! available="$(cd "$work" && LD_PRELOAD="$libasan" "$python" -c \
    'import convengine; b = convengine.build_info(); print(b["simd"], *[i for i in b["simd_available"] if i != b["simd"]])')"; then
    echo "sanitize: FAILED: the sanitizer build does not import (see above; are convengine's dependencies installed?)"
    exit 1
fi
read -r -a available_list <<<"$available"
case "${SANITIZE_ISAS:-default}" in
    default) isas=("${available_list[0]}"); [[ "${available_list[0]}" != baseline ]] && isas+=(baseline) ;;
    all) isas=("${available_list[@]}") ;;
    *) read -r -a isas <<<"$SANITIZE_ISAS" ;;
esac
echo "sanitize: ISA levels to run: ${isas[*]} (this CPU and build: $available)"

# Where a report points into generated C, name the Cython source line it came from.
explain() {
    "$python" - "$work" "$1" <<'EOF'
import collections, re, sys
work, log = sys.argv[1], sys.argv[2]
pattern = re.compile(r"(\S+\.c):(\d+):\d+: runtime error: (.*)|ERROR: AddressSanitizer: (\S+)|"
                     r"(Out of bounds on buffer access \(axis \d+\)|Memoryview is not initialized)")
sites = collections.Counter()
frame = re.compile(r"#\d+ 0x[0-9a-f]+ in (\S+) (\S+\.c):(\d+)")
lines = open(log, errors="replace").read().splitlines()

def source_line(cfile, lineno):
    try:
        with open(f"{work}/{cfile.lstrip('./')}", errors="replace") as f:
            text = f.readlines()[:lineno]
    except OSError:
        return "?"
    for line in reversed(text):
        m = re.search(r'/\* "([^"]+\.(?:pxi|pyx|pxd))":(\d+)', line)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
    return "?"

for i, line in enumerate(lines):
    m = pattern.search(line)
    if not m:
        continue
    if m.group(1):
        what = re.sub(r"0x[0-9a-f]+", "ADDR", m.group(3))
        sites[f"UBSan: {what} at {source_line(m.group(1), int(m.group(2)))}"] += 1
    elif m.group(4):
        where = "?"
        for follow in lines[i + 1:i + 40]:
            f = frame.search(follow)
            if f and "convengine" in f.group(2):
                where = f"{f.group(1)} at {source_line(f.group(2), int(f.group(3)))}"
                break
        sites[f"ASan: {m.group(4)} in {where}"] += 1
    else:
        sites[f"Cython: {m.group(5)}"] += 1
for site, n in sites.most_common():
    print(f"    {n} x {site}")
EOF
}

status=0
summary=()
for isa in "${isas[@]}"; do
    log="$work/test-$isa.log"
    echo "sanitize: [$isa] ${tests[*]}"
    start=$SECONDS
    set +e
    (cd "$work" && CONVENGINE_ISA="$isa" LD_PRELOAD="$libasan" "$python" - <<'EOF'
import convengine
info = convengine.build_info()
assert "-fsanitize=address,undefined" in info["cflags"], f"not the sanitizer build: {convengine.__file__} {info}"
print(f"sanitize: {convengine.__file__}: simd={info['simd']} cflags={info['cflags']}")
EOF
    ) >"$log" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then
        (cd "$work" && CONVENGINE_ISA="$isa" LD_PRELOAD="$libasan" "$python" -m pytest -q -s -p no:cacheprovider \
            "${tests[@]}") >>"$log" 2>&1
        rc=$?
    fi
    set -e
    reports="$(grep -cE 'ERROR: AddressSanitizer|runtime error:|Out of bounds on buffer access|Memoryview is not initialized' "$log" || true)"
    result="$(grep -E '(passed|failed|error).* in [0-9.]+s' "$log" | tail -n 1 || true)"
    [[ -z "$result" ]] && result="no pytest summary: the process was stopped (exit $rc)"
    echo "sanitize: [$isa] $((SECONDS - start)) s, exit $rc, $reports sanitizer/bounds reports; pytest: $result"
    if [[ "$reports" != "0" ]]; then
        explain "$log"
        grep -m 3 -E -A 12 'ERROR: AddressSanitizer|runtime error:' "$log" || true
        status=1
    fi
    if [[ $rc -ne 0 ]]; then
        grep -E '^(FAILED|ERROR) ' "$log" || tail -n 30 "$log"
        status=1
    fi
    summary+=("$isa: exit $rc, $reports sanitizer/bounds reports; $result")
done

echo "sanitize: summary"
printf '  %s\n' "${summary[@]}"
if [[ $status -ne 0 ]]; then
    if [[ "${SANITIZE_KEEP:-0}" == "1" ]]; then
        echo "sanitize: FAILED (logs in $work)"
    else
        echo "sanitize: FAILED (SANITIZE_KEEP=1 keeps the logs)"
    fi
else
    echo "sanitize: OK, zero reports"
fi
exit $status
