/**
 * vhost-net against a real /dev/vhost-net: the host kernel has none, so this
 * runs node scripts (test/vm/scripts/*.js) in the guest VM (QEMU TCG, Debian
 * 6.1 kernel; see test/vm/README.md).  Each script creates its own throw-away
 * network namespace in the guest, uses link-local addresses only, and prints
 * one JSON document; the assertions are here.  One boot runs four
 * scripts side by side:
 *
 *   basics.js: probe, ownership, features, header sizes, mergeable buffers,
 *   index wraparound, all-or-nothing open, close orders;
 *   traffic.js: 1, 2 and 4 pairs, frames both ways on every pair,
 *   setActivePairs 4 -> 2 -> 4;
 *   cli.js: `mqtap vhost-selftest`, `mqtap exec --vhost on` with a child that
 *   drives the handed vhost fds itself;
 *   lifecycle.js: a driven pair's tap queue disabled, enabled, closed
 *   directly (TapQueue / Tap, not Netdev): the driver follows.
 *
 * Both directions are byte-exact: TX ring -> vhost -> tap -> kernel is
 * checked by a UDP socket receiving each payload exactly once; kernel -> tap
 * -> vhost -> RX ring by finding each reply exactly once, on the pair the
 * flow was steered to (rx-follows-tx) or, for kernel-originated flows, on
 * some active pair.
 */
import { statSync, readdirSync } from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, runInGuest, vmAvailable, type RunInGuestResult } from './harness.js';

const vm = vmAvailable();
const skipNote = vm.ok ? '' : ` (skipped: ${vm.reason})`;
if (!vm.ok) console.warn(`test/vm/vhost.test.ts skipped: ${vm.reason}`);

const BOOT_TIMEOUT = 240_000;
const SCRIPTS = 'test/vm/scripts';

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

/** dist/ must be built from the current sources: the guest runs dist/, not the TypeScript. */
function assertDistFresh(): void {
  const stale: string[] = [];
  for (const dir of ['lib', 'bin']) {
    for (const f of readdirSync(path.join(REPO_ROOT, dir))) {
      if (!f.endsWith('.ts') || f.endsWith('.d.ts')) continue;
      const src = path.join(REPO_ROOT, dir, f);
      const out = path.join(REPO_ROOT, 'dist', dir, f.replace(/\.ts$/, '.js'));
      let outTime = 0;
      try {
        outTime = statSync(out).mtimeMs;
      } catch {
        /* missing */
      }
      if (statSync(src).mtimeMs > outTime) stale.push(`${dir}/${f}`);
    }
  }
  if (stale.length) throw new Error(`dist/ is older than ${stale.join(', ')}: run \`npx tsc -p tsconfig.json\` first (the guest runs dist/)`);
}

/**
 * Runs the scripts in one guest, side by side (each in its own namespace; the
 * guest has 2 CPUs), then prints each one's output: one JSON line and "@@rc NAME N".
 */
async function bootScripts(scripts: string[]): Promise<{ results: Record<string, Json>; run: RunInGuestResult }> {
  const body =
    scripts.map((s) => `(node ${SCRIPTS}/${s}.js > /tmp/${s}.out 2> /tmp/${s}.err; echo "@@rc ${s} $?" >> /tmp/${s}.out) &`).join(' ') +
    ` wait; for s in ${scripts.join(' ')}; do cat /tmp/$s.out; cat /tmp/$s.err >&2; done`;
  const run = await runInGuest({ cmd: ['sh', '-c', body], timeoutMs: BOOT_TIMEOUT - 20_000 });
  const diag = `exit ${run.exitCode} after ${run.durationMs} ms\nstdout:\n${run.stdout}\nstderr:\n${run.stderr}\nconsole:\n${run.console.slice(-3000)}`;
  if (run.exitCode !== 0) throw new Error(`guest run failed: ${diag}`);
  const lines = run.stdout.split('\n');
  const results: Record<string, Json> = {};
  for (const s of scripts) {
    const at = lines.findIndex((l) => l.startsWith(`@@rc ${s} `));
    if (at < 1) throw new Error(`no result from ${s}.js: ${diag}`);
    const rc = lines[at]!.slice(`@@rc ${s} `.length);
    const parsed = JSON.parse(lines[at - 1]!) as Json;
    if (rc !== '0') throw new Error(`${s}.js exited ${rc}: ${JSON.stringify(parsed.fatal ?? parsed)}\n${parsed.stack ?? ''}\nstderr:\n${run.stderr}`);
    results[s] = parsed;
  }
  return { results, run };
}

/** One guest boot for the whole file (a boot costs 5-8 s of TCG before anything runs). */
let boot: Promise<Record<string, Json>> | undefined;
function guestResults(): Promise<Record<string, Json>> {
  boot ??= (async () => {
    assertDistFresh();
    const { results, run } = await bootScripts(['basics', 'traffic', 'cli', 'lifecycle']);
    console.log(`guest boot with basics.js, traffic.js, cli.js and lifecycle.js: ${run.durationMs} ms`);
    return results;
  })();
  return boot;
}

/** Fails with the section's own error when a script section threw. */
function ok(section: Json, what: string): Json {
  if (section === undefined) throw new Error(`${what}: no result`);
  if (section.error) throw new Error(`${what} threw in the guest: ${JSON.stringify(section.error)}\n${section.stack ?? ''}`);
  return section;
}

/** Every pair in `active` moved every frame both ways, on its own pair; nothing lost, unknown or damaged. */
function expectRoundTrip(rt: Json, active: number[], frames: number, pairs: number): void {
  const want = Array.from({ length: pairs }, (_, i) =>
    active.includes(i)
      ? { pair: i, txSent: frames, txReceived: frames, rxSent: frames, rxOnPair: frames, rxElsewhere: 0 }
      : { pair: i, txSent: 0, txReceived: 0, rxSent: 0, rxOnPair: 0, rxElsewhere: 0 },
  );
  expect(rt.pairs.map(({ rxBuffersMax: _b, ...p }: Json) => p)).toEqual(want);
  expect(rt).toMatchObject({ flushed: true, txMissing: 0, rxMissing: 0, unknownTx: 0, unknownRx: 0, badIpChecksum: 0, badUdpChecksum: 0, otherFrames: 0 });
}

describe.skipIf(!vm.ok)(`vhost-net in the guest: library${skipNote}`, () => {
  let basics: Json;
  let traffic: Json;

  beforeAll(async () => {
    ({ basics, traffic } = await guestResults());
  }, BOOT_TIMEOUT);

  it('probes /dev/vhost-net: VERSION_1 and MRG_RXBUF offered; backend features decoded in their own bit space', () => {
    const p = ok(basics.probe, 'probe');
    expect(p).toMatchObject({ devicePath: '/dev/vhost-net', present: true, openable: true, usable: true });
    expect(p.features.names).toEqual(expect.arrayContaining(['VERSION_1', 'MRG_RXBUF']));
    expect(p.features.unknownBits).toEqual([]);
    // 6.1 offers VHOST_BACKEND_F_IOTLB_MSG_V2 (bit 1), which is not virtio's GUEST_CSUM.
    expect(p.backendFeatures.names).toContain('IOTLB_MSG_V2');
    expect(p.backendFeatures.names).not.toContain('GUEST_CSUM');
  });

  it('openNetdev leaves the vhost fds without owner; VHOST_SET_OWNER twice gives EBUSY with the hint, without disturbing the owner', () => {
    expect(ok(basics.notOwnedAfterOpen, 'notOwnedAfterOpen')).toEqual({ setOwner: 'ok' });
    const o = ok(basics.ownerTwice, 'ownerTwice');
    for (const e of [o.setOwnerAgain, o.secondDriver]) {
      expect(e).toMatchObject({ code: 'EBUSY', op: 'VHOST_SET_OWNER' });
      expect(e.hint).toMatch(/already has an owner/);
    }
    // The refused second driver did not reset the first one's device: it still moves frames.
    expectRoundTrip(o.tripAfter, [0], 2, 1);
    expect(o.errors).toBe(0);
  });

  it('a stopped driver releases the owner (VHOST_RESET_OWNER): the same fd can be driven again', () => {
    const r = ok(basics.restart, 'restart');
    expect(r).toMatchObject({ stopped: true, driverAfterStop: true, sameObject: false });
    expect(r.counters).toMatchObject({ txFrames: 2, rxFrames: 2 });
    expect(r.useStopped).toMatchObject({ code: 'ERR_CLOSED' });
    expectRoundTrip(r.trip, [0], 2, 1);
  });

  it('features: not offered, not implemented by the driver, unknown, and refused by the kernel are clear errors; nothing is left half set up', () => {
    const f = ok(basics.features, 'features');
    expect(f.notOffered).toMatchObject({ code: 'ERR_UNSUPPORTED', op: 'VHOST_SET_FEATURES', queue: 1 });
    expect(f.notOffered.message).toMatch(/vhost-net does not offer MQ/);
    expect(f.notOffered.hint).toMatch(/it offers .*VERSION_1/);
    expect(f.notImplemented).toMatchObject({ code: 'ERR_UNSUPPORTED', queue: 1 });
    expect(f.notImplemented.message).toMatch(/cannot negotiate ACCESS_PLATFORM .*IOTLB/);
    expect(f.unknownName).toMatchObject({ code: 'ERR_INVALID_ARG' });
    expect(f.unknownName.message).toMatch(/unknown feature "VERSION_2"/);
    expect(f.kernelRefuses).toMatchObject({ code: 'EOPNOTSUPP', op: 'VHOST_SET_FEATURES' });
    expect(f.kernelRefuses.hint).toMatch(/VHOST_GET_FEATURES/);
    expect(f.driverAfterFailures).toBe(true);
    expectRoundTrip(f.trip, [0, 1], 2, 2);
  });

  it('control: a frame with a broken IPv4 checksum passes vhost and the tap but not the kernel', () => {
    const b = ok(basics.badChecksumControl, 'badChecksumControl');
    expect(b.flushed).toBe(true);
    expect(b.tapRxPackets).toBe(2);
    expect(b.received).toEqual([{ port: 29002, msg: 'good checksum' }]);
  });

  it('header sizes: a 10-byte tap header refuses VERSION_1 (12) with a hint, and works with legacy features', () => {
    const h = ok(basics.hdr10, 'hdr10');
    expect(h.tapHdr).toBe(10);
    expect(h.version1).toMatchObject({ code: 'EINVAL', op: 'VHOST_CHECK', queue: 0 });
    expect(h.version1.message).toMatch(/10-byte virtio-net header but the negotiated features need 12/);
    expect(h.version1.hint).toMatch(/vnetHdrSize: 12/);
    expect(h.legacy).toEqual({ hdrLen: 10, features: '0x0' });
    expectRoundTrip(h.trip, [0], 4, 1);
    expect(h.trip.rxHeaders[0]).toHaveLength(10);
  });

  it('MRG_RXBUF: large frames span several small RX buffers (num_buffers) and arrive byte-exact', () => {
    const m = ok(basics.mergeable, 'mergeable');
    expect(m).toMatchObject({ hdrLen: 12, mergeable: true });
    expectRoundTrip(m.trip, [0], 8, 1);
    expect(m.trip.pairs[0].rxBuffersMax).toBeGreaterThan(1);
    expect(m.counters.rxBuffers).toBeGreaterThan(m.counters.rxFrames);
    // num_buffers (header bytes 10-11) of the first reply, as vhost wrote it.
    const hdr = m.trip.rxHeaders[0] as number[];
    expect(hdr[10]! | (hdr[11]! << 8)).toBeGreaterThanOrEqual(1);
  });

  it('16-bit ring indices wrap past 65535 on the real device (start 65530, 8-entry rings, 24 frames each way)', () => {
    const w = ok(basics.wrap, 'wrap');
    for (const t of w.trips) expectRoundTrip(t, [0], 8, 1);
    expect(w.counters).toMatchObject({ txFrames: 24, rxFrames: 24, rxBuffers: 24 });
    // VHOST_GET_VRING_BASE: where the device stopped = 65530 + 24 mod 65536.
    expect(w.bases).toEqual({ rx: (65530 + 24) & 0xffff, tx: (65530 + 24) & 0xffff });
    expect(w.availIndex).toEqual({ rx: (65530 + 24 + 8) & 0xffff, tx: (65530 + 24) & 0xffff });
  });

  it('all or nothing: running out of fds while opening the vhost fds (before any tap) leaves no fd', () => {
    const e = ok(basics.emfileVhost, 'emfileVhost');
    expect(e.openError).toMatchObject({ code: 'EMFILE', op: 'VHOST_OPEN' });
    expect(e.openError.queue).toBeGreaterThanOrEqual(0);
    expect(e.openError.queue).toBeLessThan(4);
    expect(e.taps).toEqual([]);
    expect(e.fdsAfter).toBe(e.fdsBefore);
  });

  it('all or nothing: running out of fds while opening the tap queues (all vhost fds open) closes everything (no tap, no fd)', () => {
    const e = ok(basics.emfile, 'emfile');
    expect(e.openError).toMatchObject({ code: 'EMFILE', op: 'TUN_OPEN', ifname: 've0' });
    expect(e.taps).toEqual([]);
    expect(e.fdsAfter).toBe(e.fdsBefore);
  });

  describe('close orders leave no fd and no device', () => {
    for (const way of ['lib', 'raw'] as const) {
      for (const order of ['vhost-first', 'tap-first'] as const) {
        it(`${way === 'lib' ? 'QueuePair/Netdev' : 'raw fds'}, ${order}`, () => {
          const r = ok(ok(basics.closeOrders, 'closeOrders')[`${way}-${order}`], `${way}-${order}`);
          if (way === 'lib') {
            expectRoundTrip(r.trip, [0, 1], 2, 2);
            expect(r.closeAgain).toBe('no error');
          } else {
            expect(r.trip).toEqual({ txOk: true, rxOk: true, txInFlight: 0 });
            // A descriptor outside the memory table: the worker signals VHOST_SET_VRING_ERR's eventfd.
            expect(r.errEventfd).toBeGreaterThan(0);
          }
          if (way === 'lib' && order === 'tap-first') {
            // Closing a driven pair's tap queue stops its driver first (backend unbound):
            // no backend holds the queues' files, so the device goes with the last one.
            expect(r.afterFirstClose).toMatchObject({ present: false, kernel: null });
          } else {
            // After the first close the device is still there: the tap fds are open, or the
            // vhost backend still holds the tap queue's file (raw fds, nobody unbinds it).
            expect(r.afterFirstClose.present).toBe(true);
            expect(r.afterFirstClose.kernel).toBe(way === 'lib' ? 2 : 1);
          }
          expect(r.gone).toBe(true);
          expect(r.fdsAfter).toBe(r.fdsBefore);
        });
      }
    }
  });

  it('the basics script left nothing behind in its namespace', () => {
    expect(basics.tapsLeft).toEqual([]);
    expect(basics.fdsAtEnd).toBe(basics.fdsAtStart);
  });

  describe('1, 2 and 4 pairs: memory table, vrings and backend on every pair; frames both ways on every pair', () => {
    for (const pairs of [1, 2, 4]) {
      it(`${pairs} pair(s)`, () => {
        const r = ok(traffic.sizes[String(pairs)], `${pairs} pairs`);
        expect(r).toMatchObject({ vhostFds: pairs, tapFds: pairs, hdrSize: 12 });
        expect(r.drivers).toEqual(Array.from({ length: pairs }, () => ({ hdrLen: 12, features: '0x100000000', bound: true })));
        expectRoundTrip(r.roundTrip, Array.from({ length: pairs }, (_, i) => i), 8, pairs);
        // The kernel computed the UDP checksums of its replies (tap offloads off).
        expect(r.roundTrip.zeroUdpChecksum).toBe(0);
        expect(r.kernelRxPackets).toBe(8 * pairs);
        expect(r.kernelTxPackets).toBe(8 * pairs);
        // SET_VRING_CALL: the device signalled used buffers on both rings of every pair.
        for (const k of r.calls) {
          expect(k.rx).toBeGreaterThan(0);
          expect(k.tx).toBeGreaterThan(0);
        }
        expect(r.errors).toEqual(Array.from({ length: pairs }, () => 0));
        if (pairs > 1) {
          // Kernel-originated flows, queue by flow hash: each arrives once, every pair gets some.
          expect(r.hash).toMatchObject({ flows: 64, missing: 0, unknown: 0, duplicates: 0, otherFrames: 0 });
          for (const n of r.hash.perPair) expect(n).toBeGreaterThan(0);
        }
        // VHOST_GET_VRING_BASE: the device consumed every TX descriptor published and as many
        // RX buffers as the driver took frames from (pair 2 of 4 also got one TX frame by hand).
        r.stops.forEach((s: Json, i: number) => {
          expect(s.bases).toEqual({ tx: s.txAvail, rx: s.counters.rxBuffers });
          expect(s.txAvail).toBe(s.counters.txFrames + (pairs === 4 && i === 2 ? 1 : 0));
        });
        expect(r.gone).toBe(true);
        expect(r.fdsAfter).toBe(r.fdsBefore);
      });
    }
  });

  it('setActivePairs 4 -> 2: disabled pairs are detached, their backends unbound, and get no frames', () => {
    const r = ok(traffic.sizes['4'], '4 pairs');
    expect(r.down.kernel).toEqual({ numQueues: 2, numDisabledQueues: 2 });
    expect(r.down.states).toEqual(['enabled', 'enabled', 'disabled', 'disabled']);
    expect(r.down.bound).toEqual([true, true, false, false]);
    expect(r.down.sendOnDisabled).toMatchObject({ code: 'ERR_CLOSED' });
    // A frame put on pair 2's TX ring by hand and kicked stays there: no backend consumes it.
    expect(r.down.parked).toEqual({ inFlightAfterKick: 1, receivedWhileDisabled: 0 });
    expectRoundTrip(r.down.roundTrip, [0, 1], 8, 4);
    expect(r.down.hash).toMatchObject({ flows: 64, missing: 0, unknown: 0, duplicates: 0 });
    expect(r.down.hash.perPair[0]).toBeGreaterThan(0);
    expect(r.down.hash.perPair[1]).toBeGreaterThan(0);
    expect(r.down.hash.perPair.slice(2)).toEqual([0, 0]);
  });

  it('setActivePairs 2 -> 4: attached and bound again, frames on all four pairs', () => {
    const r = ok(traffic.sizes['4'], '4 pairs');
    expect(r.up.kernel).toEqual({ numQueues: 4, numDisabledQueues: 0 });
    expect(r.up.states).toEqual(['enabled', 'enabled', 'enabled', 'enabled']);
    expect(r.up.bound).toEqual([true, true, true, true]);
    // The frame parked on pair 2 while it was disabled is sent once its backend is bound again.
    expect(r.up.parked.flushed).toBe(true);
    expect(r.up.parked.received).toEqual([r.up.parked.expected]);
    expectRoundTrip(r.up.roundTrip, [0, 1, 2, 3], 8, 4);
    expect(r.up.hash).toMatchObject({ flows: 64, missing: 0, unknown: 0, duplicates: 0 });
    for (const n of r.up.hash.perPair) expect(n).toBeGreaterThan(0);
  });

  it('the traffic script left nothing behind in its namespace', () => {
    expect(traffic.tapsLeft).toEqual([]);
  });
});

describe.skipIf(!vm.ok)(`vhost-net in the guest: a driven pair's tap queue changed directly${skipNote}`, () => {
  let lifecycle: Json;

  beforeAll(async () => {
    ({ lifecycle } = await guestResults());
  }, BOOT_TIMEOUT);

  it('queue.disable() on a driven pair unbinds the backend first: the kernel detaches the queue, a kicked frame stays on the ring', () => {
    const r = ok(lifecycle.disable, 'disable');
    expectRoundTrip(r.before, [0, 1], 2, 2);
    expect(r.down.kernel).toEqual({ numQueues: 1, numDisabledQueues: 1 });
    expect(r.down.states).toEqual(['enabled', 'disabled']);
    expect(r.down.bound).toEqual([true, false]);
    expect(r.down.driven).toEqual([true, true]);
    expect(r.down.sendOnDisabled).toMatchObject({ code: 'ERR_CLOSED' });
    // A backend still bound to the detached queue would consume the frame (and the tap drop it).
    expect(r.down.parked).toEqual({ inFlightAfterKick: 1, receivedWhileDisabled: 0 });
    expectRoundTrip(r.down.trip, [0], 2, 2);
  });

  it('queue.enable() attaches, then binds again: the parked frame goes out and both pairs move frames both ways', () => {
    const r = ok(lifecycle.disable, 'disable');
    expect(r.up.kernel).toEqual({ numQueues: 2, numDisabledQueues: 0 });
    expect(r.up.states).toEqual(['enabled', 'enabled']);
    expect(r.up.bound).toEqual([true, true]);
    expect(r.up.parked.flushed).toBe(true);
    expect(r.up.parked.received).toEqual([{ port: r.up.parked.expectedPort, msg: 'parked on a queue disabled directly' }]);
    expectRoundTrip(r.up.trip, [0, 1], 2, 2);
    expect(r.errors).toEqual([0, 0]);
    expect(r.gone).toBe(true);
    expect(r.fdsAfter).toBe(r.fdsBefore);
  });

  it('tap.setActiveQueues() on a driven netdev unbinds and binds like setActivePairs', () => {
    const r = ok(lifecycle.setActiveQueues, 'setActiveQueues');
    expect(r.down.kernel).toEqual({ numQueues: 1, numDisabledQueues: 1 });
    expect(r.down.bound).toEqual([true, false]);
    expectRoundTrip(r.down.trip, [0], 2, 2);
    expect(r.up.kernel).toEqual({ numQueues: 2, numDisabledQueues: 0 });
    expect(r.up.bound).toEqual([true, true]);
    expectRoundTrip(r.up.trip, [0, 1], 2, 2);
    expect(r.fdsAfter).toBe(r.fdsBefore);
  });

  it('queue.close() on a driven pair stops the driver first: the kernel releases the queue at once, no driver fd is left', () => {
    const r = ok(lifecycle.close, 'close');
    expect(r.after.kernel).toEqual({ numQueues: 1, numDisabledQueues: 0 });
    expect(r.after.stopped).toEqual([false, true]);
    expect(r.after.driven).toEqual([true, false]);
    expect(r.after.states).toEqual(['enabled', 'closed']);
    // The tap queue fd and the driver's five eventfds (2 kick, 2 call, 1 err).
    expect(r.after.fdsClosed).toBe(6);
    expect(r.after.vhostFdOpen).toBe(true);
    expect(r.after.useStopped).toMatchObject({ code: 'ERR_CLOSED' });
    expect(r.after.driveClosed).toMatchObject({ code: 'ERR_CLOSED', op: 'VHOST_DRIVER' });
    expectRoundTrip(r.after.trip, [0], 2, 1);
    expect(r.gone).toBe(true);
    expect(r.fdsAfter).toBe(r.fdsBefore);
  });

  it('tap.close() on a driven netdev stops every driver: the device is gone at once; Netdev.close() leaves no fd', () => {
    const r = ok(lifecycle.tapClose, 'tapClose');
    expect(r.after).toEqual({ present: false, stopped: [true, true], driven: [false, false], vhostFds: [true, true] });
    expect(r.gone).toBe(true);
    expect(r.fdsAfter).toBe(r.fdsBefore);
  });

  it('the lifecycle script left nothing behind in its namespace', () => {
    expect(lifecycle.tapsLeft).toEqual([]);
    expect(lifecycle.fdsAtEnd).toBe(lifecycle.fdsAtStart);
  });
});

describe.skipIf(!vm.ok)(`vhost-net in the guest: CLI${skipNote}`, () => {
  let cli: Json;

  beforeAll(async () => {
    ({ cli } = await guestResults());
  }, BOOT_TIMEOUT);

  it('mqtap vhost-selftest --pairs 4 --json: every pair moves every frame both ways', () => {
    const r = cli.selftestJson;
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as Json;
    expect(j).toMatchObject({ ok: true, devicePath: '/dev/vhost-net', unexpected: 0 });
    expect(j.pairs).toHaveLength(4);
    for (const [i, p] of (j.pairs as Json[]).entries()) {
      expect(p).toMatchObject({ pair: i, ok: true, tx: { sent: 8, ok: 8, completed: true }, rx: { sent: 8, ok: 8, misrouted: 0 } });
      expect(p.tx.bytes).toBeGreaterThan(0);
      expect(p.rx.bytes).toBe(p.tx.bytes);
    }
  });

  it('mqtap vhost-selftest (human): a per-pair table', () => {
    const r = cli.selftestHuman;
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^PAIR\s+TX_OK\s+RX_OK\s+TX_BYTES\s+RX_BYTES\s+RESULT$/m);
    expect(r.stdout).toMatch(/^\s*0\s+3\/3\s+3\/3\s+\d+\s+\d+\s+ok$/m);
    expect(r.stdout).toMatch(/^all pairs passed$/m);
  });

  it('mqtap exec --queues 2 --vhost on: the child gets working, owner-less vhost fds after the tap fds (MQTAP_VHOSTFDS)', () => {
    const r = cli.exec;
    expect(r.status, r.stderr).toBe(0);
    const child = JSON.parse(r.stdout.trim().split('\n').pop()!) as Json;
    expect(child.env).toMatchObject({ MQTAP_FDS: '3:4', MQTAP_VHOSTFDS: '5:6', MQTAP_QUEUES: '2' });
    expect(child.links).toEqual({ 3: '/dev/net/tun', 4: '/dev/net/tun', 5: '/dev/vhost-net', 6: '/dev/vhost-net' });
    // The child's VHOST_SET_OWNER succeeded: mqtap did not own the fds it handed over.
    expect(child.owner).toEqual(['ok', 'ok']);
    expectRoundTrip(child.trip, [0, 1], 4, 2);
  });

  it('the CLI left no tap in the namespace', () => {
    expect(cli.tapsLeft).toEqual([]);
  });
});
