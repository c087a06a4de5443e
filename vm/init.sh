#!/bin/sh
# /init of the mqtap test guest (runs under busybox sh inside the initramfs).
#
# Built into the initramfs by vm/build.sh; any change to this file changes
# the initramfs cache key, so the next build.sh run rebuilds it.
#
# What it does:
#   1. mounts proc/sys/dev, loads the virtio/9p/net/vhost modules from the
#      initramfs (busybox modprobe, modules.dep generated at build time),
#   2. mounts the host root (9p tag "hostroot", read-only) on /newroot and the
#      job share (9p tag "results", writable) on /results,
#   3. bind-mounts the full module tree of the guest kernel (it lives in the
#      host's cache dir, so it is reachable through hostroot) over
#      /lib/modules/<kver>, so the kernel's request_module() (which runs
#      /sbin/modprobe from this initramfs) can auto-load anything,
#   4. mounts /proc /sys /dev /dev/pts /dev/shm /tmp /run inside /newroot
#      (tmpfs = guest RAM) and the job share on /newroot/run/mqtap,
#   5. runs /run/mqtap/job.sh (written by the host) chrooted into the host
#      root, stdout/stderr into files of the job share, writes the exit code
#      to /run/mqtap/exitcode, and powers off.
#
# Kernel command line parameters (all optional):
#   mqtap.moddir=DIR     host path of lib/modules/<kver> of the guest kernel
#   mqtap.modules=a,b,c  extra modules to load before the job runs
#   mqtap.cache=MODE     9p cache mode for the host root (default: loose)
#   mqtap.echo=1         also copy the job's stdout/stderr to the console
#   mqtap.debug=1        log what init does to the console

PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# No \r\n translation on the serial console.
stty -opost 2>/dev/null

KVER=$(uname -r)
MODDIR=
MODULES=
CACHEMODE=loose
ECHO=0
DEBUG=0
read -r CMDLINE </proc/cmdline
for arg in $CMDLINE; do
    case "$arg" in
        mqtap.moddir=*) MODDIR=${arg#mqtap.moddir=} ;;
        mqtap.modules=*) MODULES=$(echo "${arg#mqtap.modules=}" | tr ',' ' ') ;;
        mqtap.cache=*) CACHEMODE=${arg#mqtap.cache=} ;;
        mqtap.echo=*) ECHO=${arg#mqtap.echo=} ;;
        mqtap.debug=*) DEBUG=${arg#mqtap.debug=} ;;
    esac
done

log() {
    [ "$DEBUG" = 1 ] || return 0
    read -r up _ </proc/uptime
    echo "mqtap-init: [$up] $*"
}

die() {
    echo "MQTAP-INIT-ERROR: $*"
    if [ -d /results/. ] && grep -q ' /results ' /proc/mounts; then
        echo "$*" > /results/init-error
    fi
    poweroff -f
    sleep 60
}

log "kernel $KVER, loading modules"
modprobe -a virtio_pci 9pnet_virtio 9p || die "modprobe virtio_pci/9p failed"
# Networking + vhost; failures here are reported but not fatal.
modprobe -a virtio_net tun vhost_net || echo "mqtap-init: warning: modprobe virtio_net/tun/vhost_net failed"

NINEP_OPTS=trans=virtio,version=9p2000.L,msize=512000
mount9p() { # tag dir extra-opts
    i=0
    while ! mount -t 9p -o "$NINEP_OPTS$3" "$1" "$2" 2>/tmp/mnt.err; do
        i=$((i + 1))
        [ $i -ge 50 ] && { cat /tmp/mnt.err; return 1; }
        sleep 0.1
    done
    return 0
}

mkdir -p /newroot /results
mount9p results /results "" || die "cannot mount 9p share 'results'"
mount9p hostroot /newroot ",ro,cache=$CACHEMODE" || die "cannot mount 9p share 'hostroot'"
log "9p mounted"

# Full module tree of the guest kernel, for request_module() and mqtap.modules.
if [ -n "$MODDIR" ] && [ -f "/newroot$MODDIR/modules.dep" ]; then
    mount --bind "/newroot$MODDIR" "/lib/modules/$KVER" || echo "mqtap-init: warning: cannot bind $MODDIR"
fi
if [ -n "$MODULES" ]; then
    log "loading extra modules: $MODULES"
    # shellcheck disable=SC2086
    modprobe -a $MODULES || echo "mqtap-init: warning: modprobe $MODULES failed"
fi

hostname mqtap-guest
ip link set lo up 2>/dev/null

R=/newroot
mount -t proc proc $R/proc || die "mount $R/proc"
mount -t sysfs sysfs $R/sys || die "mount $R/sys"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev || die "mount $R/dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# /tmp and /run become guest RAM; first keep the host's copies reachable, so
# that paths the job needs there (a checkout under /tmp, as CI may use; listed
# by the host in /results/keep) stay visible at the same place.
mkdir -p /host-tmp /host-run
mount --bind $R/tmp /host-tmp 2>/dev/null
mount --bind $R/run /host-run 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || die "mount $R/tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || die "mount $R/run"
mkdir -p $R/run/mqtap
mount --bind /results $R/run/mqtap || die "bind /results"
if [ -f /results/keep ]; then
    while IFS= read -r p; do
        case $p in
        /tmp/?*) src=/host-tmp/${p#/tmp/} ;;
        /run/?*) src=/host-run/${p#/run/} ;;
        *) continue ;;
        esac
        [ -d "$src" ] || continue
        mkdir -p "$R$p" && mount --bind "$src" "$R$p" || die "bind $p"
    done </results/keep
fi

[ -f /results/job.sh ] || die "no job.sh in the results share"

log "running job"
if [ "$ECHO" = 1 ]; then
    # Copy the output to the console as well (for debugging). The job's
    # stdout/stderr are then pipes; the tees are given 2 s after the job exits
    # (a daemon it left behind may keep the pipes open).
    mkfifo /tmp/out.fifo /tmp/err.fifo
    tee /results/stdout </tmp/out.fifo &
    t1=$!
    tee /results/stderr </tmp/err.fifo >&2 &
    t2=$!
    env -i chroot $R /bin/sh /run/mqtap/job.sh </dev/null >/tmp/out.fifo 2>/tmp/err.fifo
    rc=$?
    i=0
    while [ $i -lt 20 ] && { kill -0 $t1 2>/dev/null || kill -0 $t2 2>/dev/null; }; do
        sleep 0.1
        i=$((i + 1))
    done
else
    env -i chroot $R /bin/sh /run/mqtap/job.sh </dev/null >/results/stdout 2>/results/stderr
    rc=$?
fi
echo "$rc" > /results/exitcode
log "job done"
echo "mqtap-guest: exit=$rc"
poweroff -f
sleep 60
