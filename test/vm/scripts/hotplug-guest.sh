#!/bin/sh
# Guest side of test/vm/hotplug.test.ts: the one command the guest runs.
#
# For each of $HOTPLUG_CYCLES cycles (default 1) it waits for a hot-plugged
# virtio-net NIC (eth0) to appear, reports its driver and channel counts
# (ethtool -l), waits for the host's go-ahead (the host checks the tap's
# numqueues first), sets all channels (ethtool -L combined MAX), pings the
# host side of the tap over IPv4 link-local addresses, reports, and waits for
# the NIC to disappear (hot-unplug).  Every wait is bounded.
#
# Talks to the host through the results share ($MQTAP_GUEST_RESULTS, 9p,
# uncached): status lines appended to "status" (also echoed to stdout), and
# files "go-N" and "finish" the host creates.  Exit status: 0 all cycles done, 2 a wait
# timed out, 3 an ethtool/ip step failed.
R=${MQTAP_GUEST_RESULTS:-/run/mqtap}
STATUS=$R/status
CYCLES=${HOTPLUG_CYCLES:-1}
WAIT=${HOTPLUG_WAIT_S:-240}
GUEST_IP=${HOTPLUG_GUEST_IP:-169.254.77.2}
HOST_IP=${HOTPLUG_HOST_IP:-169.254.77.1}

say() {
    echo "$*" >>"$STATUS"
    echo "$*"
}

# wait_for SECONDS COMMAND...: polls every 0.1 s.
wait_for() {
    n=$(($1 * 10))
    shift
    while ! "$@" 2>/dev/null; do
        n=$((n - 1))
        [ "$n" -le 0 ] && return 1
        sleep 0.1
    done
    return 0
}

# channels: "MAX CURRENT" of eth0's combined channels.
channels() {
    ethtool -l eth0 2>/dev/null | sed -n 's/^Combined:[[:space:]]*//p' | tr '\n' ' '
}

present() { [ -e /sys/class/net/eth0 ]; }
absent() { [ ! -e /sys/class/net/eth0 ]; }

: >"$STATUS"
say "ready"
i=1
while [ "$i" -le "$CYCLES" ]; do
    wait_for "$WAIT" present || { say "cycle $i: timeout waiting for eth0"; exit 2; }
    drv=$(basename "$(readlink /sys/class/net/eth0/device/driver)")
    say "cycle $i: eth0 present driver=$drv mac=$(cat /sys/class/net/eth0/address)"
    # The driver may still be setting the queues up right after the device appears.
    wait_for 30 sh -c '[ -n "$(ethtool -l eth0 2>/dev/null | sed -n "s/^Combined:[[:space:]]*//p")" ]'
    set -- $(channels)
    max=${1:-0}
    say "cycle $i: channels max=$max current=${2:-0}"
    wait_for "$WAIT" test -e "$R/go-$i" || { say "cycle $i: timeout waiting for go-$i"; exit 2; }
    ethtool -L eth0 combined "$max" 2>&1 || { say "cycle $i: ethtool -L failed"; exit 3; }
    set -- $(channels)
    say "cycle $i: channels-after max=${1:-0} current=${2:-0}"
    ip addr add "$GUEST_IP/16" dev eth0 && ip link set eth0 up || { say "cycle $i: ip failed"; exit 3; }
    if busybox ping -c 3 -W 3 -w 60 "$HOST_IP" >"$R/ping-$i.txt" 2>&1; then
        say "cycle $i: ping ok"
    else
        say "cycle $i: ping failed"
    fi
    say "cycle $i: waiting for removal"
    wait_for "$WAIT" absent || { say "cycle $i: timeout waiting for eth0 to go"; exit 2; }
    say "cycle $i: eth0 gone"
    i=$((i + 1))
done
# Stay up until the host has checked QEMU's side of the last unplug.
say "all cycles done"
wait_for "$WAIT" test -e "$R/finish" || { say "timeout waiting for finish"; exit 2; }
say "done"
exit 0
