#!/bin/sh
# vm/guest-mq.sh: the guest side of `mqtap demo` and the launch end-to-end
# tests.  Runs inside the mqtap guest (the host's root, chrooted, see
# vm/README.md) as the harness's command, with the host's ethtool, ip, ping
# (or busybox ping), bash and taskset.  It looks at the multi-queue virtio-net
# NIC that `mqtap launch` gave the guest, changes its queue-pair count with
# `ethtool -L`, pings the host's tap, sends parallel flows from every CPU and
# reports the per-queue counters.  Every wait is bounded.
#
# Environment (all optional):
#   MQ_MODE      full (default) | list (only report the NICs, checkpoint "boot")
#   MQ_IF        the interface to work on (default: the first virtio_net one)
#   MQ_HOST_IP   the host tap's address (default 169.254.77.1)
#   MQ_GUEST_IP  this guest's address (default 169.254.77.2)
#   MQ_PREFIX    prefix length (default 24)
#   MQ_FLOWS     TCP connection attempts per CPU (default 16)
#   MQ_SYNC      1: stop at each checkpoint until the host acknowledges it
#
# Checkpoints (MQ_SYNC=1): the script writes $MQTAP_GUEST_RESULTS/sync/at-NAME
# (with a line of data) and waits up to 120 s for sync/ok-NAME, which the host
# (lib/qemu/guest.ts watchCheckpoints) creates after looking at its side: "boot",
# "combined-1", "combined-MAX", "addr" (the host pings the guest then),
# "traffic".
#
# Output: "mq ..." lines on stdout (parsed by lib/qemu/guest.ts parseMqGuestOutput):
#   mq cpus N
#   mq nic NAME MAC DRIVER MAX_COMBINED CUR_COMBINED
#   mq set-channels N RC CUR_COMBINED
#   mq sync NAME HOST-DATA | mq sync-timeout NAME
#   mq addr IP/PREFIX RC
#   mq ping-host SENT RECEIVED
#   mq flows CPU ATTEMPTS
#   mq queue I RX_PACKETS TX_PACKETS
#   mq fail WHAT
#   mq done FAILURES
# Exit status: the number of failed steps (0: all worked).

MODE=${MQ_MODE:-full}
HOST_IP=${MQ_HOST_IP:-169.254.77.1}
GUEST_IP=${MQ_GUEST_IP:-169.254.77.2}
PREFIX=${MQ_PREFIX:-24}
FLOWS=${MQ_FLOWS:-16}
SYNC_DIR=${MQTAP_GUEST_RESULTS:-/run/mqtap}/sync
FAILS=0

fail() {
    echo "mq fail $*"
    FAILS=$((FAILS + 1))
}

have() { command -v "$1" >/dev/null 2>&1; }

# checkpoint NAME DATA: tell the host where we are; wait for its answer.
checkpoint() {
    [ "${MQ_SYNC:-0}" = 1 ] || return 0
    mkdir -p "$SYNC_DIR" 2>/dev/null
    printf '%s\n' "$2" >"$SYNC_DIR/.at-$1" && mv "$SYNC_DIR/.at-$1" "$SYNC_DIR/at-$1"
    i=0
    while [ ! -e "$SYNC_DIR/ok-$1" ]; do
        i=$((i + 1))
        if [ $i -gt 1200 ]; then
            echo "mq sync-timeout $1"
            return 1
        fi
        sleep 0.1
    done
    echo "mq sync $1 $(head -n 1 "$SYNC_DIR/ok-$1")"
}

# channels IF -> "MAX CUR" (combined queue pairs; "? ?" when unknown)
channels() {
    ethtool -l "$1" 2>/dev/null | awk '
        /^Pre-set maximums/ { s = "max" }
        /^Current hardware settings/ { s = "cur" }
        /^Combined:/ { v[s] = $2 }
        END { printf "%s %s\n", (v["max"] == "" ? "?" : v["max"]), (v["cur"] == "" ? "?" : v["cur"]) }'
}

driver_of() { basename "$(readlink "/sys/class/net/$1/device/driver" 2>/dev/null)" 2>/dev/null; }

nics() {
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        [ -e "$d/device" ] && echo "$n"
    done
}

have ethtool || fail "ethtool not found on the host (apt-get install ethtool)"

cpus=$(grep -c '^processor' /proc/cpuinfo)
echo "mq cpus $cpus"

# The NICs appear while virtio_net probes (loaded by the guest's init).
i=0
while [ -z "$(nics)" ] && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
for n in $(nics); do
    echo "mq nic $n $(cat "/sys/class/net/$n/address") $(driver_of "$n") $(channels "$n")"
done

IF=${MQ_IF:-}
if [ -z "$IF" ]; then
    for n in $(nics); do
        if [ "$(driver_of "$n")" = virtio_net ]; then IF=$n; break; fi
    done
fi
if [ -z "$IF" ]; then
    fail "no virtio_net interface"
    echo "mq done $FAILS"
    exit $FAILS
fi

set -- $(channels "$IF")
MAX=$1
CUR=$2
checkpoint boot "$CUR" || fail "checkpoint boot"

if [ "$MODE" = list ]; then
    echo "mq done $FAILS"
    exit $FAILS
fi

# Queue pairs: down to 1, then up to all of them (VQ_PAIRS_SET each time).
wants=1
[ "$MAX" = 1 ] || wants="1 $MAX"
for want in $wants; do
    ethtool -L "$IF" combined "$want"
    rc=$?
    set -- $(channels "$IF")
    echo "mq set-channels $want $rc $2"
    [ $rc = 0 ] && [ "$2" = "$want" ] || fail "ethtool -L $IF combined $want (rc $rc, now $2)"
    checkpoint "combined-$want" "$2" || fail "checkpoint combined-$want"
done

# Link-local address; the host's tap has $HOST_IP.  No route beyond the link.
ip addr add "$GUEST_IP/$PREFIX" dev "$IF" && ip link set "$IF" up
rc=$?
echo "mq addr $GUEST_IP/$PREFIX $rc"
[ $rc = 0 ] || fail "ip addr add $GUEST_IP/$PREFIX dev $IF"
i=0
while [ "$(cat "/sys/class/net/$IF/operstate" 2>/dev/null)" != up ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
checkpoint addr "$GUEST_IP" || fail "checkpoint addr"

if have ping; then PING=ping; else PING="busybox ping"; fi
out=$($PING -c 3 -w 30 "$HOST_IP" 2>&1)
sent=$(echo "$out" | sed -n 's/^\([0-9][0-9]*\) packets transmitted.*/\1/p')
recv=$(echo "$out" | sed -n 's/.* \([0-9][0-9]*\) \(packets \)\{0,1\}received.*/\1/p')
echo "mq ping-host ${sent:-0} ${recv:-0}"
[ "${recv:-0}" -gt 0 ] || fail "ping $HOST_IP: $(echo "$out" | tail -n 2 | tr '\n' ' ')"

# Parallel flows, one sender per CPU: each TCP connection attempt to a closed
# port on the host is a new flow (SYN out, RST back).  XPS maps each CPU to
# its own TX queues and picks among them by flow hash; the host's tap steers
# the RST back to the queue the SYN came from.
if have bash; then
    c=0
    while [ $c -lt "$cpus" ]; do
        base=$((20000 + c * 1000))
        pin=""
        if have taskset; then pin="taskset -c $c"; fi
        (
            $pin timeout 60 bash -c 'for p in $(seq "$1" "$2"); do : 3<>"/dev/tcp/$3/$p"; done 2>/dev/null' \
                flows "$base" $((base + FLOWS - 1)) "$HOST_IP"
            echo "mq flows $c $FLOWS"
        ) &
        c=$((c + 1))
    done
    wait
else
    fail "bash not found on the host: no parallel flows"
fi

ethtool -S "$IF" 2>/dev/null |
    sed -n 's/^ *\([rt]x\)_queue_\([0-9][0-9]*\)_packets: *\([0-9][0-9]*\)$/\1 \2 \3/p' |
    awk '{ v[$1 " " $2] = $3; if ($2 + 1 > n) n = $2 + 1 }
         END { for (i = 0; i < n; i++) printf "mq queue %d %d %d\n", i, v["rx " i] + 0, v["tx " i] + 0 }'

checkpoint traffic "" || fail "checkpoint traffic"
echo "mq done $FAILS"
exit $FAILS
