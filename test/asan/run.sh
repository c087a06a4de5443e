#!/usr/bin/env bash
# Runs test suites against the sanitizer build of the addon (ASan + UBSan,
# built by cmake-js from CMakeLists.txt into build-asan/):
#   npm run test:asan                      unit + integration suites
#   npm run test:asan -- test/unit/io.test.ts   chosen files
#
# node itself is not instrumented, so libasan is preloaded.  Memory errors
# and undefined behaviour abort the process that hits them (the test fails).
# Leaks are checked at every process's exit and written to the log dir; node
# and V8 keep plenty of memory until exit by design, so test/asan/leaks.js
# reports only leaks whose allocation came from the addon itself (the first
# frame past the allocator is in mqtap.node).
set -euo pipefail
cd "$(dirname "$0")/../.."
ADDON="$PWD/build-asan/Release/mqtap.node"
[ -f "$ADDON" ] || { echo "test:asan: $ADDON is missing: npm run build:asan" >&2; exit 2; }
libasan=$(gcc -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "test:asan: libasan.so not found (apt-get install gcc)" >&2; exit 2; }
logs=$(mktemp -d /tmp/mqtap-asan.XXXXXX)
trap 'rm -rf "$logs"' EXIT
chmod 0777 "$logs"   # children that drop privileges (permission tests) write here too

export MQTAP_ADDON="$ADDON"
export LD_PRELOAD="$libasan"
# Processes that are not node (ip, setpriv, qemu...) inherit the preload too:
# their leaks only go to the log (exitcode=0) and are not the addon's.
export ASAN_OPTIONS="detect_leaks=1:log_path=$logs/asan:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:handle_segv=1:allow_user_segv_handler=1:detect_odr_violation=0"
export LSAN_OPTIONS="exitcode=0:malloc_context_size=30"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"

files=("$@")
((${#files[@]})) || files=(test/unit test/integration)
set +e
npx vitest run "${files[@]}"
rc=$?
set -e
unset LD_PRELOAD
node test/asan/leaks.js "$logs" "$ADDON" || rc=1
exit $rc
