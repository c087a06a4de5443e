/**
 * The guest VM harness itself (test/vm/harness.ts): boots the Debian 6.1
 * guest under QEMU TCG and checks what later tests rely on: vhost_net is
 * loaded and /dev/vhost-net answers VHOST_SET_OWNER, /dev/net/tun exists,
 * the host's node runs in the guest, stdout/stderr/exit codes come back
 * cleanly, a virtio-net NIC given with qemuExtraArgs shows up as eth0, and a
 * timeout kills QEMU.  Each boot takes ~5-10 s (more on a loaded machine).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestImage, REPO_ROOT, runInGuest, vmAvailable, type GuestImage } from './harness.js';

const avail = vmAvailable();
const skipNote = avail.ok ? '' : ` (skipped: ${avail.reason})`;
if (!avail.ok) console.warn(`test/vm/guest.test.ts skipped: ${avail.reason}`);

// QEMU is killed after GUEST_TIMEOUT (the result then carries the console);
// the test's own timeout is longer so that this diagnostic is what one sees.
const GUEST_TIMEOUT = 150_000;
const TEST_TIMEOUT = 240_000;

const VHOST_PROBE_C = `
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/vhost.h>
int main(void) {
  int fd = open("/dev/vhost-net", O_RDWR);
  if (fd < 0) { perror("open /dev/vhost-net"); return 2; }
  if (ioctl(fd, VHOST_SET_OWNER) < 0) { perror("VHOST_SET_OWNER"); return 3; }
  uint64_t features = 0;
  if (ioctl(fd, VHOST_GET_FEATURES, &features) < 0) { perror("VHOST_GET_FEATURES"); return 4; }
  printf("VHOST_SET_OWNER ok features=0x%llx\\n", (unsigned long long)features);
  return 0;
}
`;

/**
 * A command that opens /dev/vhost-net and does VHOST_SET_OWNER +
 * VHOST_GET_FEATURES: a small C program compiled into the cache dir (visible
 * in the guest through the shared host root), or python3 as a fallback.
 */
function vhostProbeCmd(image: GuestImage): string[] | undefined {
  try {
    const dir = path.join(image.cacheDir, 'bin');
    const exe = path.join(dir, `vhost-probe-${createHash('sha256').update(VHOST_PROBE_C).digest('hex').slice(0, 12)}`);
    if (!existsSync(exe)) {
      mkdirSync(dir, { recursive: true });
      const src = `${exe}.${process.pid}.c`;
      writeFileSync(src, VHOST_PROBE_C);
      try {
        execFileSync('gcc', ['-O2', '-o', `${exe}.${process.pid}`, src], { stdio: 'pipe', timeout: 60_000 });
      } finally {
        rmSync(src, { force: true });
      }
      renameSync(`${exe}.${process.pid}`, exe);
    }
    return [exe];
  } catch {
    /* no gcc / headers: try python3 */
  }
  if (existsSync('/usr/bin/python3')) {
    return [
      '/usr/bin/python3',
      '-c',
      [
        'import os, fcntl, struct',
        'fd = os.open("/dev/vhost-net", os.O_RDWR)',
        'fcntl.ioctl(fd, 0xAF01)',
        'f = struct.unpack("Q", fcntl.ioctl(fd, 0x8008AF00, bytes(8)))[0]',
        'print("VHOST_SET_OWNER ok features=%#x" % f)',
      ].join('\n'),
    ];
  }
  return undefined;
}

describe.skipIf(!avail.ok)(`guest VM (QEMU TCG, Debian 6.1 kernel)${skipNote}`, () => {
  let image: GuestImage;

  beforeAll(async () => {
    image = await ensureGuestImage();
  }, 20 * 60_000);

  it('loads vhost_net: /dev/vhost-net and /dev/net/tun exist, VHOST_SET_OWNER works', async () => {
    const probe = vhostProbeCmd(image);
    const script = [
      'for m in vhost_net tun virtio_net; do grep -q "^$m " /proc/modules && echo "module $m"; done',
      'test -c /dev/vhost-net && echo "chardev /dev/vhost-net"',
      'test -c /dev/net/tun && echo "chardev /dev/net/tun"',
      'echo "kernel $(uname -r)"',
      'echo "in-guest $MQTAP_IN_GUEST"',
      'echo "cwd $(pwd)"',
      probe ? '"$@"' : 'echo "no vhost probe"',
    ].join('\n');
    const r = await runInGuest({ cmd: ['sh', '-c', script, 'sh', ...(probe ?? [])], timeoutMs: GUEST_TIMEOUT });
    const diag = `stdout:\n${r.stdout}\nstderr:\n${r.stderr}\nconsole:\n${r.console.slice(-3000)}`;
    expect(r.exitCode, diag).toBe(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines).toEqual(
      expect.arrayContaining([
        'module vhost_net',
        'module tun',
        'module virtio_net',
        'chardev /dev/vhost-net',
        'chardev /dev/net/tun',
        `kernel ${image.kernelVersion}`,
        'in-guest 1',
        `cwd ${REPO_ROOT}`,
      ]),
    );
    if (probe) expect(r.stdout).toMatch(/^VHOST_SET_OWNER ok features=0x[0-9a-f]+$/m);
    else if (process.env.MQTAP_VM_REQUIRED === '1') throw new Error('vhost ioctl not checked: neither gcc nor /usr/bin/python3 on the host (MQTAP_VM_REQUIRED=1)');
    else console.warn('vhost ioctl not checked: neither gcc nor /usr/bin/python3 on the host');
  }, TEST_TIMEOUT);

  it("runs the host's node in the guest", async () => {
    const r = await runInGuest({
      cmd: [
        'node',
        '-e',
        'console.log(JSON.stringify({ node: process.versions.node, release: require("os").release(), ' +
          'guest: process.env.MQTAP_IN_GUEST, foo: process.env.FOO, cwd: process.cwd() }))',
      ],
      env: { FOO: 'bar baz' },
      cwd: '/tmp',
      timeoutMs: GUEST_TIMEOUT,
    });
    expect(r.exitCode, `stderr:\n${r.stderr}\nconsole:\n${r.console.slice(-3000)}`).toBe(0);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({
      node: process.versions.node,
      release: image.kernelVersion,
      guest: '1',
      foo: 'bar baz',
      cwd: '/tmp',
    });
  }, TEST_TIMEOUT);

  it("returns the command's exit code and separate stdout/stderr", async () => {
    const r = await runInGuest({
      cmd: ['sh', '-c', `printf 'out\\n'; printf 'err\\n' >&2; printf '%s|' "$1"; exit 7`, 'sh', "it's \"quoted\" $HOME"],
      timeoutMs: GUEST_TIMEOUT,
    });
    expect(r.exitCode, r.console.slice(-3000)).toBe(7);
    expect(r.exitCodeFrom).toBe('file');
    expect(r.stdout).toBe(`out\nit's "quoted" $HOME|`);
    expect(r.stderr).toBe('err\n');
    expect(r.timedOut).toBe(false);
    expect(r.console).toContain('mqtap-guest: exit=7');
  }, TEST_TIMEOUT);

  it("reports the command's exit code when init cannot write the exitcode file (from its console line)", async () => {
    // The job puts a directory where init writes exitcode: init's write fails, it prints
    // "mqtap-guest: exit=5" all the same, and that is the exit code (not "no exit code").
    const r = await runInGuest({
      cmd: ['sh', '-c', 'rm -f "$MQTAP_GUEST_RESULTS/exitcode" && mkdir "$MQTAP_GUEST_RESULTS/exitcode" && exit 5'],
      timeoutMs: GUEST_TIMEOUT,
    });
    expect(r.console, r.console.slice(-3000)).toContain('mqtap-guest: exit=5');
    expect(r.exitCode, r.console.slice(-3000)).toBe(5);
    expect(r.exitCodeFrom).toBe('console');
  }, TEST_TIMEOUT);

  it('shows a virtio-net NIC added with qemuExtraArgs as eth0', async () => {
    const r = await runInGuest({
      // hubport: a NIC connected to nothing (no host networking involved).
      qemuExtraArgs: ['-netdev', 'hubport,id=n0,hubid=0', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99'],
      cmd: [
        'sh',
        '-c',
        'cat /sys/class/net/eth0/address; basename "$(readlink /sys/class/net/eth0/device/driver)"; ' +
          'if command -v ethtool >/dev/null; then ethtool -i eth0 | grep ^driver; else echo "driver: virtio_net"; fi',
      ],
      timeoutMs: GUEST_TIMEOUT,
    });
    expect(r.exitCode, `stderr:\n${r.stderr}\nconsole:\n${r.console.slice(-3000)}`).toBe(0);
    expect(r.stdout).toBe('52:54:00:12:34:99\nvirtio_net\ndriver: virtio_net\n');
  }, TEST_TIMEOUT);

  it('kills QEMU on timeout', async () => {
    const r = await runInGuest({ cmd: ['sleep', '600'], timeoutMs: 2_000 });
    expect(r.timedOut).toBe(true);
    expect(r.exitCode).toBeNull();
    expect(r.durationMs).toBeLessThan(60_000);
  }, TEST_TIMEOUT);
});
