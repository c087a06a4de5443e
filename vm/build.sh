#!/usr/bin/env bash
# Build (or reuse) the mqtap test guest: a Debian bookworm kernel (package
# linux-image-amd64's kernel, fetched with apt-get download, never installed)
# and a tiny busybox initramfs whose /init is vm/init.sh.
# Idempotent and cached; a cached run takes a few tens of milliseconds.
# Shipped with the npm package (`mqtap demo` uses it); test/vm/build.sh execs it.
#
#   vm/build.sh          build what is missing, then print the paths
#   vm/build.sh --check  build nothing; exit 0 and print the paths if the
#                        image is built, exit 3 if it is not built but can
#                        be, exit 1 (reason on stderr) if it cannot be
#
# A cache dir that exists but is not writable (the host's cache seen from
# inside the guest, through the read-only 9p root: nested QEMU) is used
# read-only: the paths are printed if the image is complete, nothing is built.
#
# stdout: only MQTAP_VM_*=value lines; progress and errors go to stderr.
#
# Environment:
#   MQTAP_VM_CACHE          cache dir (default /var/cache/mqtap-vm if it can
#                           be created or already holds an image, else
#                           <repo>/test/vm/.cache in a git checkout, else
#                           ${XDG_CACHE_HOME:-~/.cache}/mqtap-vm)
#   MQTAP_VM_KERNEL_PKG     kernel package (default: the one linux-image-amd64
#                           depends on, resolved once, then remembered in
#                           $MQTAP_VM_CACHE/kernel.env; delete that file to
#                           move to a newer kernel)
#   MQTAP_VM_KERNEL_FORMAT  vmlinux (default; the uncompressed ELF, booted via
#                           its PVH entry, ~2x faster under TCG) | bzimage
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

# Bump to force re-extraction of the cached kernel trees.
KERNEL_LAYOUT=1
# Modules put into the initramfs (plus their dependencies, from modules.dep).
# Anything else is loaded from the full module tree in the cache, which the
# guest reaches through the 9p host root (see init.sh).
INITRD_MODULES=(virtio_pci 9pnet_virtio 9p virtio_net tun tap vhost_net)

log() { echo "mqtap-vm: $*" >&2; }
die() { echo "mqtap-vm: error: $*" >&2; exit 1; }

CHECK_ONLY=0
case "${1:-}" in
    --check) CHECK_ONLY=1 ;;
    "") ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
esac

# ------------------------------------------------------------------ helpers
find_busybox() {
    local b
    for b in /bin/busybox /usr/bin/busybox "$(command -v busybox 2>/dev/null || true)"; do
        if [ -n "$b" ] && [ -x "$b" ]; then echo "$b"; return 0; fi
    done
    return 1
}

sha() { sha256sum | cut -c1-16; }

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

# Decompress the vmlinux embedded in a bzImage: look for each compressor's
# magic and try to decompress from there until an ELF file comes out (the
# logic of the kernel's scripts/extract-vmlinux).
extract_vmlinux() { # bzImage out
    local img=$1 out=$2 spec name magic cmd off
    for spec in 'xz|\xfd7zXZ\x00|xz -dc' 'zstd|\x28\xb5\x2f\xfd|zstd -dcq' \
        'gzip|\x1f\x8b\x08|gzip -dc' 'lzma|\x5d\x00\x00\x00|xz -dc --format=lzma' \
        'bzip2|BZh|bzip2 -dc' 'lz4|\x02\x21\x4c\x18|lz4 -dc'; do
        IFS='|' read -r name magic cmd <<<"$spec"
        command -v "${cmd%% *}" >/dev/null 2>&1 || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" 2>/dev/null | cut -d: -f1 | head -n 5); do
            tail -c +$((off + 1)) "$img" | $cmd >"$out.tmp" 2>/dev/null || true
            if is_elf "$out.tmp"; then
                mv "$out.tmp" "$out"
                log "vmlinux: $name stream at offset $off"
                return 0
            fi
        done
    done
    rm -f "$out.tmp"
    return 1
}

# Does ELF file $1 have a PT_INTERP program header (i.e. is it dynamically linked)?
has_interp() {
    local f=$1 phoff phentsize phnum i
    rd() { od -An -t "u$2" -j "$1" -N "$2" "$f" | tr -d ' '; }
    phoff=$(rd 32 8) phentsize=$(rd 54 2) phnum=$(rd 56 2)
    for ((i = 0; i < phnum; i++)); do
        [ "$(rd $((phoff + i * phentsize)) 4)" = 3 ] && return 0
    done
    return 1
}

resolve_kernel_pkg() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }') || true
    if [ -z "$pkg" ]; then
        log "linux-image-amd64 not known to apt; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed (it needs root and the Debian mirror)"
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }') || true
    fi
    [ -n "$pkg" ] || die "cannot resolve the kernel package that linux-image-amd64 depends on"
    echo "$pkg"
}

# Copy module NAME and its dependencies (per modules.dep) from tree $1 to $2.
copy_module_closure() { # srcmoddir dstmoddir name...
    local src=$1 dst=$2 name files f
    shift 2
    for name in "$@"; do
        files=$(awk -v want="$name" '
            { f = $1; sub(/:$/, "", f); n = f; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n)
              if (n == want) { print f; for (i = 2; i <= NF; i++) print $i; exit } }' "$src/modules.dep")
        [ -n "$files" ] || die "module $name not found in $src/modules.dep (built in? check boot/config-*)"
        for f in $files; do
            mkdir -p "$dst/$(dirname "$f")"
            cp "$src/$f" "$dst/$f"
        done
    done
}

# ------------------------------------------------------------------ prerequisites
command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    die "qemu-system-x86_64 not found; install: apt-get install -y qemu-system-x86 busybox-static"
BUSYBOX=$(find_busybox) ||
    die "busybox not found; install: apt-get install -y busybox-static qemu-system-x86"
if has_interp "$BUSYBOX"; then
    die "$BUSYBOX is dynamically linked; install the static one: apt-get install -y busybox-static"
fi
for t in flock sha256sum od; do
    command -v $t >/dev/null 2>&1 || die "$t not found (coreutils/util-linux)"
done

# ------------------------------------------------------------------ cache dir
if [ -n "${MQTAP_VM_CACHE:-}" ]; then
    CACHE=$MQTAP_VM_CACHE
elif mkdir -p /var/cache/mqtap-vm 2>/dev/null && [ -w /var/cache/mqtap-vm ]; then
    CACHE=/var/cache/mqtap-vm
elif [ -f /var/cache/mqtap-vm/kernel.env ]; then
    CACHE=/var/cache/mqtap-vm # built, but read-only here (e.g. inside the guest)
elif [ -d "$REPO/test/vm" ]; then
    CACHE=$REPO/test/vm/.cache
else
    CACHE=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mqtap-vm
fi
# READONLY=1: use a complete image in a cache this process cannot write (the
# host's cache seen through the guest's read-only 9p root); build nothing.
READONLY=0
if [ -d "$CACHE" ] && [ ! -w "$CACHE" ]; then
    READONLY=1
elif ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
    die "cache dir $CACHE is not writable (set MQTAP_VM_CACHE)"
fi
CACHE=$(cd "$CACHE" && pwd)
# ro_missing WHAT: the read-only cache lacks WHAT.
ro_missing() {
    if [ $CHECK_ONLY = 1 ]; then log "cache dir $CACHE is read-only and $1 is not built"; exit 1; fi
    die "cache dir $CACHE is read-only and $1 is not built (build it where the cache is writable: vm/build.sh)"
}

if [ $READONLY = 0 ]; then
    exec 9>"$CACHE/.lock"
    if [ $CHECK_ONLY = 1 ]; then
        flock -n 9 || { log "a build is in progress"; exit 3; }
    elif ! flock -w 1200 9; then
        die "timed out waiting for $CACHE/.lock (another build.sh?)"
    fi
fi

# ------------------------------------------------------------------ kernel
# kernel.env remembers the chosen kernel, so the cached path needs no apt.
KDIR=
if [ -z "${MQTAP_VM_KERNEL_PKG:-}" ] && [ -f "$CACHE/kernel.env" ]; then
    KDIR=$(sed -n 's/^KDIR=//p' "$CACHE/kernel.env")
    [ -n "$KDIR" ] && [ -f "$KDIR/.done-$KERNEL_LAYOUT" ] || KDIR=
elif [ -n "${MQTAP_VM_KERNEL_PKG:-}" ] && [ -f "$CACHE/kernel/$MQTAP_VM_KERNEL_PKG/.done-$KERNEL_LAYOUT" ]; then
    KDIR=$CACHE/kernel/$MQTAP_VM_KERNEL_PKG
fi
if [ -z "$KDIR" ]; then
    [ $READONLY = 0 ] || ro_missing "the guest kernel"
    if [ $CHECK_ONLY = 1 ]; then
        for t in apt-get apt-cache dpkg-deb; do
            command -v $t >/dev/null 2>&1 || { log "$t not found: cannot fetch the guest kernel (a Debian host is needed)"; exit 1; }
        done
        log "guest kernel not built yet (vm/build.sh fetches it)"
        exit 3
    fi
    for t in apt-get apt-cache dpkg-deb; do
        command -v $t >/dev/null 2>&1 || die "$t not found: a Debian host is needed to fetch the guest kernel"
    done
    PKG=${MQTAP_VM_KERNEL_PKG:-$(resolve_kernel_pkg)}
    KDIR=$CACHE/kernel/$PKG
    if [ ! -f "$KDIR/.done-$KERNEL_LAYOUT" ]; then
        t0=$SECONDS
        rm -rf "$KDIR" "$KDIR.tmp"
        mkdir -p "$KDIR.tmp/dl"
        log "downloading $PKG"
        dl_ok=0
        for attempt in 1 2; do
            if (cd "$KDIR.tmp/dl" && apt-get download -q -o APT::Sandbox::User=root "$PKG" >&2); then
                dl_ok=1
                break
            fi
            if [ $attempt = 1 ]; then
                log "apt-get download failed; running apt-get update and retrying"
                apt-get update -qq >&2 || true
            fi
        done
        [ $dl_ok = 1 ] || die "apt-get download $PKG failed"
        deb=$(ls "$KDIR.tmp/dl"/*.deb)
        log "extracting $(basename "$deb")"
        dpkg-deb -x "$deb" "$KDIR.tmp/root"
        rm -rf "$KDIR.tmp/dl"
        kver=$(ls "$KDIR.tmp/root/lib/modules")
        { [ -n "$kver" ] && [ "$(echo "$kver" | wc -l)" = 1 ]; } || die "unexpected lib/modules contents in $PKG: $kver"
        [ -f "$KDIR.tmp/root/boot/vmlinuz-$kver" ] || die "$PKG has no boot/vmlinuz-$kver"
        # bookworm modules are not compressed (CONFIG_MODULE_COMPRESS_NONE), but
        # busybox modprobe/insmod cannot read .ko.{xz,zst,gz}: decompress if so.
        if find "$KDIR.tmp/root/lib/modules" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) | grep -q .; then
            log "decompressing modules"
            find "$KDIR.tmp/root/lib/modules" -name '*.ko.xz' -exec xz -d {} +
            find "$KDIR.tmp/root/lib/modules" -name '*.ko.gz' -exec gzip -d {} +
            find "$KDIR.tmp/root/lib/modules" -name '*.ko.zst' -exec zstd -q --rm -d {} +
        fi
        log "depmod $kver (busybox)"
        "$BUSYBOX" depmod -b "$KDIR.tmp/root" "$kver"
        log "extracting vmlinux from the bzImage"
        extract_vmlinux "$KDIR.tmp/root/boot/vmlinuz-$kver" "$KDIR.tmp/vmlinux" ||
            log "warning: could not extract vmlinux; the bzImage will be booted"
        echo "$kver" >"$KDIR.tmp/kver"
        touch "$KDIR.tmp/.done-$KERNEL_LAYOUT"
        mv "$KDIR.tmp" "$KDIR"
        log "kernel $kver ready ($((SECONDS - t0)) s)"
    fi
    if [ -z "${MQTAP_VM_KERNEL_PKG:-}" ]; then
        echo "KDIR=$KDIR" >"$CACHE/kernel.env.tmp"
        mv "$CACHE/kernel.env.tmp" "$CACHE/kernel.env"
    fi
fi
KVER=$(cat "$KDIR/kver")
MODDIR=$KDIR/root/lib/modules/$KVER

# Boot the uncompressed ELF via its PVH entry point if it has one (QEMU >= 4
# boots such an ELF with -kernel); otherwise the bzImage.
# The check (CONFIG_PVH=y and the XEN_ELFNOTE_PHYS32_ENTRY note, type 18, that
# QEMU's PVH boot looks for) is done once and remembered in $KDIR/pvh.
if [ ! -f "$KDIR/pvh" ] && [ $CHECK_ONLY = 0 ] && [ $READONLY = 0 ]; then
    if [ -f "$KDIR/vmlinux" ] && grep -q '^CONFIG_PVH=y' "$KDIR/root/boot/config-$KVER" 2>/dev/null &&
        LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$KDIR/vmlinux"; then
        echo yes >"$KDIR/pvh"
    else
        echo no >"$KDIR/pvh"
    fi
fi
KERNEL=$KDIR/root/boot/vmlinuz-$KVER
if [ "${MQTAP_VM_KERNEL_FORMAT:-vmlinux}" = vmlinux ] && [ "$(cat "$KDIR/pvh" 2>/dev/null)" = yes ]; then
    KERNEL=$KDIR/vmlinux
fi

# ------------------------------------------------------------------ initramfs
KEY=$({
    echo "layout=$KERNEL_LAYOUT kdir=$KDIR kver=$KVER modules=${INITRD_MODULES[*]}"
    cat "$HERE/init.sh" "$HERE/build.sh" "$BUSYBOX"
} | sha)
IMG=$CACHE/img-$KEY
if [ ! -f "$IMG/.done" ]; then
    [ $READONLY = 0 ] || ro_missing "the initramfs $IMG"
    [ $CHECK_ONLY = 1 ] && { log "initramfs not built yet (vm/build.sh builds it)"; exit 3; }
    t0=$SECONDS
    log "building initramfs $IMG"
    rm -rf "$IMG" "$IMG.tmp"
    st=$IMG.tmp/stage
    mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,newroot,results,lib/modules/"$KVER"}
    cp "$BUSYBOX" "$st/bin/busybox"
    "$BUSYBOX" --list-full | while read -r applet; do
        [ "$applet" = bin/busybox ] || [ -e "$st/$applet" ] || ln -s /bin/busybox "$st/$applet"
    done
    install -m 0755 "$HERE/init.sh" "$st/init"
    copy_module_closure "$MODDIR" "$st/lib/modules/$KVER" "${INITRD_MODULES[@]}"
    cp "$MODDIR"/modules.builtin* "$MODDIR/modules.order" "$st/lib/modules/$KVER/" 2>/dev/null || true
    "$BUSYBOX" depmod -b "$st" "$KVER"
    (cd "$st" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) >"$IMG.tmp/initrd.cpio"
    rm -rf "$st"
    touch "$IMG.tmp/.done"
    mv "$IMG.tmp" "$IMG"
    log "initramfs ready ($((SECONDS - t0)) s, $(($(stat -c %s "$IMG/initrd.cpio") / 1024)) KiB)"
    # Drop images of other init.sh/build.sh versions unused for a day (another
    # checkout sharing this cache may still use a recent one).
    find "$CACHE" -maxdepth 1 -name 'img-*' -type d ! -name "img-$KEY" -mtime +0 -exec rm -rf {} + 2>/dev/null || true
fi
[ $READONLY = 1 ] || touch "$IMG"
echo "MQTAP_VM_CACHE=$CACHE"
echo "MQTAP_VM_KERNEL=$KERNEL"
echo "MQTAP_VM_INITRD=$IMG/initrd.cpio"
echo "MQTAP_VM_MODULES_DIR=$MODDIR"
echo "MQTAP_VM_KVER=$KVER"
