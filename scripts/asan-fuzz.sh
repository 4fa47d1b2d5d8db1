#!/usr/bin/env bash
# Memory-safety check of the fast path (issue 10): build the compiled module with
# AddressSanitizer and UndefinedBehaviorSanitizer, then run the fast-path test suite (the
# differential fuzz against the Python engine, hostile and forged packets, threads, and a
# running espswitchd's poll loop) under them. Exits non-zero on any sanitizer report, on a
# test failure, or when the sanitized module did not build or would be skipped.
#
#   bash scripts/asan-fuzz.sh [extra pytest arguments]
#
# It works on a scratch copy of src/ and tests/, so the normal in-place build is left alone.
# Needs gcc, libasan and libubsan (Debian: build-essential), Python headers, libssl-dev and
# Cython. Python itself is not instrumented: libasan is preloaded, and PYTHONMALLOC=malloc
# makes every Python object (the packets and payloads the module reads and writes) its
# own malloc block with red zones around it, so an overrun of one is caught.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
top=$(mktemp -d /tmp/espswitch-asan.XXXXXX)
trap 'rm -rf "$top"' EXIT
work="$top/repo"
mkdir "$work"
# The published test vectors live in ../shared beside the repository.
[ -d "$here/../shared" ] && ln -s "$(cd "$here/../shared" && pwd)" "$top/shared"
start=$(date +%s)

cp -r "$here/src" "$here/tests" "$here/setup.py" "$here/pyproject.toml" "$work/"
rm -f "$work"/src/espswitch/datapath/fast/*.so "$work"/src/espswitch/datapath/fast/_fastpath.c
(cd "$work" && ESPSWITCH_SANITIZE=1 python3 setup.py -q build_ext --inplace >"$work/build.log" 2>&1) || {
    cat "$work/build.log" >&2; echo "asan-fuzz: build failed" >&2; exit 2; }
if ! ls "$work"/src/espswitch/datapath/fast/_fastpath*.so >/dev/null 2>&1; then
    cat "$work/build.log" >&2; echo "asan-fuzz: the sanitized module was not built" >&2; exit 2
fi

libasan=$(gcc -print-file-name=libasan.so)
export LD_PRELOAD="$libasan"
# CPython keeps memory until exit on purpose: leak reports would be noise.
# Reports go to files (pytest captures fd 2, and a halted process never shows its capture).
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:strict_string_checks=1:detect_stack_use_after_return=1:log_path=$top/report"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$top/report"
export PYTHONMALLOC=malloc
# ASan keeps freed memory in quarantine: the RSS half of the memory test would measure it.
export ESPSWITCH_SANITIZED=1
export PYTHONPATH="$work/src"
cd "$work"

# The module must load (with the sanitizers) and be the sanitized one, or nothing is tested.
python3 - <<'PY'
from espswitch.datapath import fast
assert fast.AVAILABLE, fast.REASON
print("asan-fuzz: sanitized module:", fast._fastpath.__file__)
PY
# (nm's output goes to a file: `grep -q` would close the pipe early, and under pipefail the
# SIGPIPE nm gets then would read as "not instrumented".)
nm -D "$work"/src/espswitch/datapath/fast/_fastpath*.so >"$work/nm.txt"
if ! grep -q __asan_ "$work/nm.txt"; then
    echo "asan-fuzz: the module is not instrumented" >&2; exit 2
fi
# Canary: an overrun through an intercepted memmove must be reported and fail the run.
if python3 -c 'import ctypes; b = bytes(16); d = ctypes.create_string_buffer(64); ctypes.memmove(d, b, 40)' \
        >"$work/canary.log" 2>&1; then
    echo "asan-fuzz: AddressSanitizer did not catch the canary overrun" >&2; exit 2
fi
cat "$top"/report.* >>"$work/canary.log" 2>/dev/null || true
grep -q "heap-buffer-overflow" "$work/canary.log" || {
    cat "$work/canary.log" >&2; echo "asan-fuzz: unexpected canary result" >&2; exit 2; }
rm -f "$top"/report.*

status=0
# tests/net/test_fast_loop.py: espswitchd itself (it inherits the preload and PYTHONPATH)
# running the compiled poll loop on real TAP and veth devices.
python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/fastpath tests/net/test_fast_loop.py "$@" 2>&1 \
    | tee "$work/pytest.log" || status=$?
if ls "$top"/report.* >/dev/null 2>&1 \
        || grep -qE "ERROR: AddressSanitizer|runtime error:" "$work/pytest.log"; then
    cat "$top"/report.* >&2 2>/dev/null || true
    echo "asan-fuzz: sanitizer report (above)" >&2
    [ "$status" -ne 0 ] || status=1
fi
if grep -qE "[0-9]+ skipped" "$work/pytest.log"; then
    echo "asan-fuzz: tests were skipped: the sanitized module was not used" >&2
    [ "$status" -ne 0 ] || status=3
fi
echo "asan-fuzz: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
