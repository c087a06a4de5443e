#!/usr/bin/env bash
# Run a command inside the mqtap test guest (Debian 6.1 kernel under QEMU TCG,
# host root shared read-only over 9p, see vm/README.md).  Shipped with the npm
# package; test/vm/run-in-guest.sh execs it.
#
#   vm/run-in-guest.sh [options] [--] CMD [ARG...]
#       Boot the guest, run CMD there, copy its stdout/stderr to ours, exit
#       with its exit code (124: timeout, 125: the guest/harness failed).
#
#   vm/run-in-guest.sh --print-qemu-args --results-dir DIR [options] [--] CMD [ARG...]
#       Only write DIR/job.sh and print the QEMU argv (without the binary),
#       NUL-separated, to stdout. After QEMU exits, DIR holds stdout, stderr
#       and exitcode (init-error if the guest's init failed). This is what
#       lib/qemu/guest.ts uses: the QEMU command line exists only here.
#
# Options:
#   --cwd DIR          working directory in the guest (default: the current
#                      directory; the host root is visible at the same paths)
#   --env NAME=VALUE   extra environment variable (repeatable)
#   --node PATH        node binary whose directory is put first in PATH
#                      (default: the node found in PATH)
#   --mem MIB          guest memory (default 1024)
#   --smp N            guest CPUs (default 2)
#   --accel LIST       accelerators to try in order, ':'-separated (default
#                      tcg; e.g. kvm:tcg uses /dev/kvm when it works: inside
#                      this guest, --modules kvm_amd gives nested QEMU one)
#   --modules A,B      extra kernel modules to load before CMD runs
#   --append STR       extra kernel command line
#   --qemu-arg ARG     extra QEMU argument (repeatable), e.g. -netdev/-device
#   --console-file F   serial console to file F (default: QEMU's stdout)
#   --echo             copy CMD's stdout/stderr to the serial console too
#   --debug            log what the guest's init does to the console
#   --results-dir DIR  job/results dir (default: a temp dir, removed afterwards)
#   --timeout SEC      kill QEMU after SEC seconds (default 600; run mode only)
#   -v, --verbose      show the serial console live on stderr (run mode)
#
# Environment: MQTAP_VM_CACHE etc. as for build.sh (called to build the image
# if needed), MQTAP_VM_QEMU (default qemu-system-x86_64).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "run-in-guest: $*" >&2; exit 125; }
usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; }

PRINT=0
CWD=$PWD
NODE=
MEM=1024
SMP=2
ACCEL=tcg
MODULES=
APPEND=
CONSOLE_FILE=
ECHO=0
DEBUG=0
RESULTS=
TIMEOUT=600
VERBOSE=0
ENVS=()
QEMU_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --print-qemu-args) PRINT=1 ;;
        --cwd) CWD=${2?}; shift ;;
        --env) [[ ${2?} == *=* ]] || die "--env wants NAME=VALUE, got: $2"; ENVS+=("$2"); shift ;;
        --node) NODE=${2?}; shift ;;
        --mem) MEM=${2?}; shift ;;
        --smp) SMP=${2?}; shift ;;
        --accel) ACCEL=${2?}; shift ;;
        --modules) MODULES=${2?}; shift ;;
        --append) APPEND=${2?}; shift ;;
        --qemu-arg) QEMU_EXTRA+=("${2?}"); shift ;;
        --console-file) CONSOLE_FILE=${2?}; shift ;;
        --echo) ECHO=1 ;;
        --debug) DEBUG=1 ;;
        --results-dir) RESULTS=${2?}; shift ;;
        --timeout) TIMEOUT=${2?}; shift ;;
        -v|--verbose) VERBOSE=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) break ;;
    esac
    shift
done
[ $# -gt 0 ] || die "no command given (see --help)"
[[ $MEM =~ ^[0-9]+$ && $SMP =~ ^[0-9]+$ && $TIMEOUT =~ ^[0-9]+$ ]] || die "--mem/--smp/--timeout want numbers"
[[ $MODULES =~ ^[A-Za-z0-9_,-]*$ ]] || die "bad --modules list: $MODULES"
[[ $ACCEL =~ ^(kvm|tcg)(:(kvm|tcg))*$ ]] || die "bad --accel list: $ACCEL (kvm, tcg, or both, e.g. kvm:tcg)"
[[ $CWD == /* ]] || die "--cwd must be absolute: $CWD"
if [ -z "$NODE" ]; then NODE=$(command -v node 2>/dev/null || true); fi

QEMU=${MQTAP_VM_QEMU:-qemu-system-x86_64}

# ------------------------------------------------------------------ image
IMAGE_ENV=$(bash "$HERE/build.sh") || die "vm/build.sh failed"
MQTAP_VM_KERNEL='' MQTAP_VM_INITRD='' MQTAP_VM_MODULES_DIR=''
while IFS= read -r line; do
    case "$line" in
        MQTAP_VM_KERNEL=*) MQTAP_VM_KERNEL=${line#*=} ;;
        MQTAP_VM_INITRD=*) MQTAP_VM_INITRD=${line#*=} ;;
        MQTAP_VM_MODULES_DIR=*) MQTAP_VM_MODULES_DIR=${line#*=} ;;
    esac
done <<<"$IMAGE_ENV"
if [ -z "$MQTAP_VM_KERNEL" ] || [ -z "$MQTAP_VM_INITRD" ] || [ -z "$MQTAP_VM_MODULES_DIR" ]; then
    die "vm/build.sh printed no image paths"
fi

# ------------------------------------------------------------------ job dir
CLEANUP_RESULTS=0
if [ -z "$RESULTS" ]; then
    [ $PRINT = 0 ] || die "--print-qemu-args needs --results-dir"
    RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/mqtap-guest.XXXXXX")
    CLEANUP_RESULTS=1
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
rm -f "$RESULTS"/{job.sh,stdout,stderr,exitcode,init-error}

# POSIX sh single-quoting.
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -n "$NODE" ]; then GUEST_PATH=$(dirname "$NODE"):$GUEST_PATH; fi
{
    echo "# generated by vm/run-in-guest.sh; run by the guest's init with /bin/sh"
    for kv in "PATH=$GUEST_PATH" HOME=/root USER=root LOGNAME=root SHELL=/bin/sh \
        LANG=C.UTF-8 TERM=dumb MQTAP_IN_GUEST=1 MQTAP_GUEST_RESULTS=/run/mqtap ${ENVS[@]+"${ENVS[@]}"}; do
        name=${kv%%=*}
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad environment variable name: $name"
        echo "export $name=$(q "${kv#*=}")"
    done
    echo "cd $(q "$CWD") || exit 125"
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} >"$RESULTS/job.sh"
# Host paths under /tmp or /run the job needs (the guest mounts its own RAM
# there): the package, the working directory and node, re-exposed by init.sh.
{
    for p in "$(cd "$HERE/.." && pwd)" "$CWD" ${NODE:+"$(dirname "$NODE")"}; do
        case $p in /tmp/?* | /run/?*) printf '%s\n' "$p" ;; esac
    done
} >"$RESULTS/keep"

# ------------------------------------------------------------------ QEMU argv
# Boot-time savings under TCG (measured, see README): tsc=reliable skips the
# TSC sync/watchdog checks, rodata=off the W+X page table walk, the crypto
# self-tests (cryptomgr, kdf108) cost ~0.5 s; no security relevance here.
CMDLINE="console=ttyS0 quiet loglevel=4 panic=-1 8250.nr_uarts=1 tsc=reliable no_timer_check"
CMDLINE+=" rodata=off mitigations=off audit=0 cryptomgr.notests=1 initcall_blacklist=crypto_kdf108_init,init_kprobe_trace"
CMDLINE+=" mqtap.moddir=$MQTAP_VM_MODULES_DIR"
[ -z "$MODULES" ] || CMDLINE+=" mqtap.modules=$MODULES"
[ $ECHO = 0 ] || CMDLINE+=" mqtap.echo=1"
[ $DEBUG = 0 ] || CMDLINE+=" mqtap.debug=1"
[ -z "$APPEND" ] || CMDLINE+=" $APPEND"

# -accel once per accelerator, tried in order; TCG multi-threaded.
ACCEL_ARGS=()
IFS=: read -r -a accels <<<"$ACCEL"
for a in "${accels[@]}"; do
    if [ "$a" = tcg ]; then ACCEL_ARGS+=(-accel tcg,thread=multi); else ACCEL_ARGS+=(-accel "$a"); fi
done

# QEMU's -virtfs/-serial option parser splits on commas; double them.
qc() { printf '%s' "${1//,/,,}"; }
# shellcheck disable=SC2054  # commas are QEMU's
ARGS=(
    -nodefaults -no-user-config -display none -no-reboot
    # q35: virtio-pci probing takes ~40 ms there vs ~500 ms on the i440fx "pc".
    -machine q35 "${ACCEL_ARGS[@]}" -cpu max -smp "$SMP" -m "$MEM"
    -kernel "$MQTAP_VM_KERNEL" -initrd "$MQTAP_VM_INITRD" -append "$CMDLINE"
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=$(qc "$RESULTS"),mount_tag=results,security_model=none,multidevs=remap"
    -nic none
)
if [ -n "$CONSOLE_FILE" ]; then
    ARGS+=(-serial "file:$(qc "$CONSOLE_FILE")")
else
    ARGS+=(-serial stdio)
fi
ARGS+=(${QEMU_EXTRA[@]+"${QEMU_EXTRA[@]}"})

if [ $PRINT = 1 ]; then
    printf '%s\0' "${ARGS[@]}"
    exit 0
fi

# ------------------------------------------------------------------ run
command -v "$QEMU" >/dev/null 2>&1 || die "$QEMU not found (apt-get install -y qemu-system-x86)"
QPID=
WATCHDOG=
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    if [ -n "$QPID" ]; then
        kill -KILL "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    [ -z "$WATCHDOG" ] || kill "$WATCHDOG" 2>/dev/null || true
    [ "$CLEANUP_RESULTS" = 0 ] || rm -rf "$RESULTS"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# setpriv --pdeathsig: QEMU dies with this script even if it is SIGKILLed.
WRAP=()
if setpriv --help 2>&1 | grep -q -- --pdeathsig; then WRAP=(setpriv --pdeathsig KILL --); fi
LOG=$RESULTS/.console.log
[ -z "$CONSOLE_FILE" ] || LOG=$CONSOLE_FILE
if [ $VERBOSE = 1 ] && [ -z "$CONSOLE_FILE" ]; then
    "${WRAP[@]}" "$QEMU" "${ARGS[@]}" </dev/null > >(tee "$LOG" >&2) 2>&1 &
else
    "${WRAP[@]}" "$QEMU" "${ARGS[@]}" </dev/null >>"$LOG" 2>&1 &
fi
QPID=$!
sleep "$TIMEOUT" &
WATCHDOG=$!
TIMED_OUT=0
set +e
wait -n "$QPID" "$WATCHDOG"
if kill -0 "$QPID" 2>/dev/null; then
    TIMED_OUT=1
    kill -KILL "$QPID"
fi
wait "$QPID" 2>/dev/null
QRC=$?
set -e
QPID=
kill "$WATCHDOG" 2>/dev/null || true
WATCHDOG=

[ ! -f "$RESULTS/stdout" ] || cat "$RESULTS/stdout"
[ ! -f "$RESULTS/stderr" ] || cat "$RESULTS/stderr" >&2
if [ -f "$RESULTS/exitcode" ]; then
    exit "$(cat "$RESULTS/exitcode")"
fi
if [ $TIMED_OUT = 1 ]; then
    echo "run-in-guest: timed out after $TIMEOUT s" >&2
    rc=124
else
    echo "run-in-guest: the guest did not report an exit code (QEMU exit status $QRC)" >&2
    rc=125
fi
[ ! -f "$RESULTS/init-error" ] || echo "run-in-guest: guest init error: $(cat "$RESULTS/init-error")" >&2
if [ $VERBOSE = 0 ] && [ -s "$LOG" ]; then
    echo "run-in-guest: last console lines:" >&2
    tail -n 30 "$LOG" | tr -d '\r' >&2
fi
exit $rc
