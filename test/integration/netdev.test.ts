/**
 * Netdevs on this host (root, no vhost-net: the real device is exercised in
 * test/vm/vhost.test.ts), inside a throw-away network namespace:
 *
 *   vhost 'auto' falls back with a logged warning (pino output captured) and
 *   the netdev works with tap fds only (frames both ways);
 *   vhost 'on' fails with the `modprobe vhost_net` hint, leaving no tap and
 *   no fd; a device node that is not vhost-net is refused the same way;
 *   the virtio-net header is set and consistent on every queue, and
 *   checkTapForVhost refuses a tap whose header does not fit the features;
 *   setActivePairs without drivers does exactly what setActiveQueues does
 *   (the kernel's numqueues/numdisabled compared);
 *   `mqtap vhost-selftest` exits 5 with the hint.
 */
import dgram from 'node:dgram';
import { existsSync, writeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../lib/sys/errors.js';
import { drainFrames, udp4Frame } from '../../lib/datapath/frames.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { K, native } from '../../lib/sys/native.js';
import { openNetdev, type Netdev, type OpenNetdevOptions } from '../../lib/vhost/netdev.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import { checkTapForVhost } from '../../lib/vhost/vhost.js';
import { runCli } from '../helpers/cli';
import { catchError, fdCount, netnsSysctls, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';

const env = tapEnv();
const vhostHere = existsSync('/dev/vhost-net');

const LOCAL = '169.254.61.1';
const PEER = '169.254.61.2';
const TAP_MAC = '02:00:00:00:3d:01';
const PEER_MAC = '02:00:00:00:3d:02';

interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

/** A pino logger whose JSON lines land in `lines`. */
function captureLogger(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) });
  return { logger, lines };
}

/** Ethernet/IPv4/UDP (checksum 0, DF clear) from PEER:srcPort to LOCAL:dstPort. */
function udpFrame(srcPort: number, dstPort: number, payload: Buffer): Buffer {
  return udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort, dstPort, payload, dontFragment: false });
}

/** Kernel queue counts, as `ip -d link` would show numqueues / numdisabled. */
function kernelQueues(name: string): { numQueues: number; numDisabledQueues: number } {
  const t = getTap(name);
  if (!t) throw new Error(`${name} is gone`);
  return { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues };
}

const mqtap = runCli;

describe.skipIf(!env.ok)(`netdev on this host${skipNote(env)}`, () => {
  useIsolatedNetns();
  const open: Array<Netdev | Tap> = [];
  const track = <T extends Netdev | Tap>(x: T): T => {
    open.push(x);
    return x;
  };
  afterEach(() => {
    for (const x of open.splice(0)) {
      try {
        x.close();
      } catch {
        /* a test may have closed parts already */
      }
    }
    expect(listTaps().map((t) => t.name), 'a test left a tap behind').toEqual([]);
  });

  beforeAll(() => {
    // No IPv6 on new devices in this namespace: no router solicitations on the queues.
    netnsSysctls();
    // First child process before any fd count: libuv keeps a SIGCHLD pipe open from then on.
    run('ip', ['-V']);
  });

  describe.skipIf(vhostHere)('without /dev/vhost-net', () => {
    it("vhost: 'auto' logs a warning with the hint and opens a working netdev of tap fds only", async () => {
      const { logger, lines } = captureLogger();
      const nd = track(openNetdev({ name: 'nda%d', pairs: 2, vhost: 'auto', up: true, mac: TAP_MAC, logger }));
      const warn = lines.filter((l) => l.level === 40);
      expect(warn).toHaveLength(1);
      expect(warn[0]).toMatchObject({ msg: "vhost-net unavailable; continuing without it (vhost: 'auto')", devicePath: '/dev/vhost-net' });
      expect(warn[0]!.reason).toMatch(/VHOST_OPEN \/dev\/vhost-net failed: ENOENT/);
      expect(warn[0]!.hint).toMatch(/modprobe vhost_net/);
      expect(lines.find((l) => l.msg === 'netdev opened')).toMatchObject({ level: 30, vhost: false, pairs: 2, vhostFds: [] });
      expect(nd.vhost).toBe(false);
      expect(nd.vhostFds()).toEqual([]);
      expect(nd.pairs.map((p) => p.vhostFd)).toEqual([-1, -1]);
      expect(nd.tapFds()).toHaveLength(2);
      expect(nd.tap.vnetHdrSize()).toBe(10); // no vhost: the header size is left alone
      expect(kernelQueues(nd.name)).toEqual({ numQueues: 2, numDisabledQueues: 0 });
      expect(catchError(() => nd.drive(0))).toMatchObject({ code: ErrorCodes.UNSUPPORTED, hint: "open the netdev with vhost: 'on'" });

      // Frames both ways through the tap fds.
      run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', nd.name]);
      run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', nd.name, 'nud', 'permanent']);
      const sock = dgram.createSocket('udp4');
      try {
        const got: Array<{ msg: Buffer; port: number }> = [];
        sock.on('message', (msg, rinfo) => got.push({ msg, port: rinfo.port }));
        await new Promise<void>((resolve) => sock.bind(6161, LOCAL, resolve));
        const sent = nd.pairs.map((p) => Buffer.from(`tap fd only, pair ${p.index}`));
        for (const p of nd.pairs) writeSync(p.tapQueue.fd, Buffer.concat([Buffer.alloc(10), udpFrame(30000 + p.index, 6161, sent[p.index]!)]));
        for (let i = 0; i < 250 && got.length < 2; i++) await sleep(20);
        expect(got.sort((a, b) => a.port - b.port)).toEqual(sent.map((msg, i) => ({ msg, port: 30000 + i })));
        const reply = Buffer.from('kernel to tap fd');
        await new Promise<void>((resolve, reject) => sock.send(reply, 30000, PEER, (e) => (e ? reject(e) : resolve())));
        const buf = Buffer.alloc(4096);
        let found = false;
        for (const fd of nd.tapFds()) native.setNonBlocking(fd, true);
        for (let i = 0; i < 250 && !found; i++) {
          for (const fd of nd.tapFds()) {
            drainFrames(fd, buf, (f) => {
              if (f.subarray(10).includes(reply)) found = true;
            });
          }
          if (!found) await sleep(20);
        }
        expect(found).toBe(true);
      } finally {
        sock.close();
      }
    });

    it("vhost: 'on' fails before opening anything, with the modprobe hint; no tap, no fd", () => {
      const before = fdCount();
      const e = catchError(() => openNetdev({ name: 'ndo%d', pairs: 4, vhost: 'on' }));
      expect(e).toMatchObject({ op: 'VHOST_OPEN', code: 'ENOENT' });
      expect(e.message).toMatch(/vhost-net is required \(vhost: 'on'\) but unusable/);
      expect(e.hint).toMatch(/modprobe vhost_net/);
      expect(listTaps()).toEqual([]);
      expect(fdCount()).toBe(before);
    });

    it('mqtap vhost-selftest: exit 5 with the hint, nothing created', () => {
      const human = mqtap(['vhost-selftest', '--pairs', '2']);
      expect(human.code, human.stderr).toBe(5);
      expect(human.stderr).toMatch(/^mqtap: vhost-net is not available: VHOST_OPEN \/dev\/vhost-net failed: ENOENT/m);
      expect(human.stderr).toMatch(/^hint: .*modprobe vhost_net/m);
      expect(human.stdout).toBe('');
      const j = mqtap(['vhost-selftest', '--json']);
      expect(j.code).toBe(5);
      expect(JSON.parse(j.stdout)).toMatchObject({ ok: false, error: { code: 'ENOENT', hint: expect.stringMatching(/modprobe vhost_net/) } });
      expect(listTaps()).toEqual([]);
    });
  });

  it("a device node that is not vhost-net: 'auto' falls back with the reason, 'on' refuses; nothing left", () => {
    const { logger, lines } = captureLogger();
    const nd = track(openNetdev({ name: 'ndn%d', pairs: 1, vhost: 'auto', vhostDevicePath: '/dev/null', logger }));
    expect(nd.vhost).toBe(false);
    const warn = lines.find((l) => l.level === 40)!;
    expect(warn.devicePath).toBe('/dev/null');
    expect(warn.reason).toMatch(/\/dev\/null is not a vhost-net device.*ENOTTY/);
    nd.close();
    const before = fdCount();
    const e = catchError(() => openNetdev({ name: 'ndn%d', pairs: 2, vhost: 'on', vhostDevicePath: '/dev/null' }));
    expect(e).toMatchObject({ op: 'VHOST_OPEN', code: 'ENOTTY' });
    expect(e.message).toMatch(/\/dev\/null is not a vhost-net device/);
    expect(e.hint).toMatch(/point vhostDevicePath at \/dev\/vhost-net/);
    expect(listTaps()).toEqual([]);
    expect(fdCount()).toBe(before);
  });

  it("vhost: 'off' does not look for vhost-net; 'auto' with vnetHdr: false does not either (no warning)", () => {
    for (const opts of [{ vhost: 'off' }, { vhost: 'auto', vnetHdr: false }] as Array<Partial<OpenNetdevOptions>>) {
      const { logger, lines } = captureLogger();
      const nd = track(openNetdev({ name: 'ndf%d', pairs: 2, logger, vhostDevicePath: '/dev/null', ...opts }));
      expect(nd.vhost).toBe(false);
      expect(lines.filter((l) => l.level >= 40)).toEqual([]);
      expect(nd.tap.vnetHdr).toBe(opts.vnetHdr !== false);
      nd.close();
    }
  });

  it('the virtio-net header is on and the same size on every queue; checkTapForVhost refuses what vhost cannot use', () => {
    for (const [opts, size] of [
      [{}, 10],
      [{ vnetHdrSize: 12 }, 12],
    ] as const) {
      const nd = track(openNetdev({ name: 'ndh%d', pairs: 3, vhost: 'off', ...opts }));
      for (const fd of nd.tapFds()) {
        expect(native.tunGetIff(fd).flags & K.IFF_VNET_HDR).toBe(K.IFF_VNET_HDR);
        expect(native.tunGetVnetHdrSz(fd)).toBe(size);
      }
      expect(getTap(nd.name)!.tun.vnetHdr).toBe(true);
      const fd = nd.tapFds()[1]!;
      if (size === 12) expect(() => checkTapForVhost(fd, 12, 1)).not.toThrow();
      const want = size === 12 ? 10 : 12;
      const e = catchError(() => checkTapForVhost(fd, want, 1));
      expect(e).toMatchObject({ op: 'VHOST_CHECK', code: 'EINVAL', ifname: nd.name, queue: 1 });
      expect(e.message).toBe(`${nd.name} has a ${size}-byte virtio-net header but the negotiated features need ${want}`);
      expect(e.hint).toMatch(new RegExp(`vnetHdrSize: ${want}`));
      nd.close();
    }
    const plain = track(openNetdev({ name: 'ndh%d', pairs: 2, vhost: 'off', vnetHdr: false }));
    expect(native.tunGetIff(plain.tapFds()[0]!).flags & K.IFF_VNET_HDR).toBe(0);
    const e = catchError(() => checkTapForVhost(plain.tapFds()[0]!, 12));
    expect(e.message).toMatch(/has no virtio-net header \(IFF_VNET_HDR\); vhost-net needs it/);
    expect(e.hint).toMatch(/vnetHdr: true/);
  });

  it('setActivePairs without drivers mirrors setActiveQueues (kernel numqueues/numdisabled)', () => {
    const nd = track(openNetdev({ name: 'ndp%d', pairs: 4, vhost: 'off' }));
    const tap = track(openTap({ name: 'ndq%d', queues: 4 }));
    const seen: Array<{ k: number; pairs: unknown; queues: unknown }> = [];
    for (const k of [2, 1, 3, 4, 4, 1, 4]) {
      nd.setActivePairs(k);
      tap.setActiveQueues(k);
      const pairs = { kernel: kernelQueues(nd.name), states: nd.pairs.map((p) => p.state), active: nd.activePairCount() };
      const queues = { kernel: kernelQueues(tap.name), states: tap.queues.map((q) => q.state), active: tap.activeQueueCount() };
      expect(pairs, `k=${k}`).toEqual(queues);
      expect(pairs.kernel).toEqual({ numQueues: k, numDisabledQueues: 4 - k });
      seen.push({ k, pairs, queues });
    }
    // Refusals change nothing, as with setActiveQueues.
    for (const bad of [0, 5, 1.5]) {
      expect(catchError(() => nd.setActivePairs(bad)).code).toBe(ErrorCodes.INVALID_ARG);
      expect(catchError(() => tap.setActiveQueues(bad)).code).toBe(ErrorCodes.INVALID_ARG);
    }
    expect(kernelQueues(nd.name)).toEqual({ numQueues: 4, numDisabledQueues: 0 });
    // A closed pair drops out of the count, like a closed queue.
    nd.pairs[3]!.close();
    tap.queues[3]!.close();
    nd.setActivePairs(2);
    tap.setActiveQueues(2);
    expect(kernelQueues(nd.name)).toEqual(kernelQueues(tap.name));
    expect(kernelQueues(nd.name)).toEqual({ numQueues: 2, numDisabledQueues: 1 });
    expect(nd.tapFds()).toHaveLength(3);
  });

  it('closing pairs one by one (vhost part first, then the tap queue) removes the device and every fd; close() again is harmless', () => {
    const before = fdCount();
    const nd = track(openNetdev({ name: 'ndc%d', pairs: 3, vhost: 'off' }));
    const name = nd.name;
    expect(fdCount()).toBe(before + 3);
    for (const p of nd.pairs) {
      p.closeVhost(); // no vhost fd: a no-op
      expect(p.state).toBe('enabled');
    }
    nd.pairs[0]!.close();
    expect(nd.pairs.map((p) => p.state)).toEqual(['closed', 'enabled', 'enabled']);
    expect(kernelQueues(name)).toEqual({ numQueues: 2, numDisabledQueues: 0 });
    nd.close();
    expect(getTap(name)).toBeUndefined();
    expect(fdCount()).toBe(before);
    expect(() => nd.close()).not.toThrow();
    expect(catchError(() => nd.setActivePairs(1)).code).toBe(ErrorCodes.CLOSED);
    expect(catchError(() => nd.drive(0)).code).toBe(ErrorCodes.CLOSED);
  });
});
