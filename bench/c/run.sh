#!/bin/sh
# SPDX-License-Identifier: MIT
#
# Builds bench/c/*.c into a temporary directory and runs them inside a
# throw-away network namespace (deleted on exit, even on failure). Never
# creates a tap in the caller's namespace. Needs root (CAP_NET_ADMIN +
# CAP_SYS_ADMIN for `ip netns`) and cc; the io_uring modes use raw syscalls
# (no liburing) and are skipped where the kernel lacks what they need.
#
# usage: bench/c/run.sh [all|tapio|ctl]        (default: all)
# env:   REPEATS=3      runs per tapio case
#        CPU=0 GEN_CPU=1  CPUs for the benchmark process and the read generator
#        CTL_REPEATS=5  CTL_QUEUES=1,2,4,8,16,32,64,128,256
#        FRAMES_SMALL=2000000 FRAMES_MTU=1000000 FRAMES_GSO=100000
#
# Output: JSON lines on stdout (one per run), progress on stderr.
set -eu

what=${1:-all}
case $what in all | tapio | ctl) ;; *)
	echo "usage: $0 [all|tapio|ctl]" >&2
	exit 1
	;;
esac

here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/mqtap-cbench.XXXXXX")
ns="mqtap-bench-$$"

cleanup() {
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

CC=${CC:-cc}
CFLAGS="-O2 -Wall -Wextra -Werror"
REPEATS=${REPEATS:-3}
CPU=${CPU:-0}
GEN_CPU=${GEN_CPU:-1}
if [ "$(nproc)" -lt 2 ]; then GEN_CPU=0; fi
FRAMES_SMALL=${FRAMES_SMALL:-2000000}
FRAMES_MTU=${FRAMES_MTU:-1000000}
FRAMES_GSO=${FRAMES_GSO:-100000}

# shellcheck disable=SC2086 # CFLAGS is a word list
$CC $CFLAGS -o "$out/ctl" "$here/ctl.c"
# shellcheck disable=SC2086
$CC $CFLAGS -o "$out/tapio" "$here/tapio.c"
echo "run.sh: io_uring here: $("$out/tapio" --mode probe)" >&2

ip netns add "$ns"
nsx() { ip netns exec "$ns" "$@"; }
# No IPv6 on the tap: keeps DAD / router solicitation / MLD frames out of the read benchmark.
nsx sysctl -qw net.ipv6.conf.default.disable_ipv6=1

tapio() {
	# tapio exits 3 when io_uring is unavailable: report and go on.
	rc=0
	nsx "$out/tapio" --dev mqbench0 --cpu "$CPU" --gen-cpu "$GEN_CPU" --timeout 60 "$@" || rc=$?
	if [ "$rc" -eq 3 ]; then
		echo "run.sh: skipped (io_uring unavailable): $*" >&2
	elif [ "$rc" -ne 0 ]; then
		echo "run.sh: tapio $* failed with status $rc" >&2
		return "$rc"
	fi
}

if [ "$what" = all ] || [ "$what" = tapio ]; then
	# naive loops (plain syscalls; io_uring x32 on a blocking fd) and the best ones
	for mode in write uring-write uring-write256 read uring-read uring-mshot; do
		for size in 60 1514 gso; do
			case $size in
			60) n=$FRAMES_SMALL ;;
			1514) n=$FRAMES_MTU ;;
			*) n=$FRAMES_GSO ;;
			esac
			i=0
			while [ "$i" -lt "$REPEATS" ]; do
				echo "run.sh: tapio --mode $mode --size $size ($((i + 1))/$REPEATS)" >&2
				tapio --mode "$mode" --size "$size" --frames "$n"
				i=$((i + 1))
			done
		done
	done
fi

if [ "$what" = all ] || [ "$what" = ctl ]; then
	echo "run.sh: ctl" >&2
	nsx "$out/ctl" -r "${CTL_REPEATS:-5}" -q "${CTL_QUEUES:-1,2,4,8,16,32,64,128,256}"
fi
