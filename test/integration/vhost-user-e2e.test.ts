/**
 * End to end on the real kernel, in a throw-away namespace: serveVhostUser
 * with the native data plane, a front-end speaking vhost-user over the real
 * socket with guest memory in a memfd (test/helpers/vu-driver.ts, the way
 * QEMU shares it), real frames both ways through the tap and the kernel's
 * UDP stack, `ethtool -L` as an enable vector, and quit (GET_VRING_BASE,
 * EOF): guest memory unmapped, no fd left.
 */
import dgram from 'node:dgram';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames.js';
import { UnixSocket } from '../../lib/sys/scm.js';
import { getLink, getTap } from '../../lib/tap/links.js';
import { openTap } from '../../lib/tap/tap.js';
import { serveVhostUser } from '../../lib/vhost-user/backend.js';
import { openFds, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { ScriptedFrontend, startLikeQemu, until } from '../helpers/vhost-user.js';
import { DriverRing, F_WRITE, GuestMem } from '../helpers/vu-driver.js';

const env = tapEnv();
const LOCAL = '169.254.79.1';
const PEER = '169.254.79.2';
const TAP_MAC = '02:00:00:00:02:01';
const PEER_MAC = '02:00:00:00:02:02';
const HDR = 12;

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* best effort */
    }
  }
});

describe.skipIf(!env.ok)(`vhost-user end to end (native data plane)${skipNote(env)}`, () => {
  useIsolatedNetns();

  it('frames both ways over 2 pairs, ethtool -L 1, quit: memory unmapped, no fd left', async () => {
    const fdsBefore = openFds().length;
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vue2e-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    const tap = openTap({ name: 'vue0', queues: 2, mac: TAP_MAC });
    cleanups.push(() => tap.close());
    run('sysctl', ['-qw', 'net.ipv6.conf.vue0.disable_ipv6=1']);
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', 'vue0']);
    run('ip', ['link', 'set', 'dev', 'vue0', 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', 'vue0', 'nud', 'permanent']);
    const be = await serveVhostUser({ socket, tap, queues: 2 });
    cleanups.push(() => be.close());

    const mem = new GuestMem(`mqtap-vue2e-${process.pid}`);
    cleanups.push(() => mem.close());
    const rings = [0, 1, 2, 3].map(() => new DriverRing(mem, 64));
    cleanups.push(() => rings.forEach((r) => r.close()));
    const fe = new ScriptedFrontend(await UnixSocket.connect(socket, { type: 'stream' }));
    cleanups.push(() => fe.close());

    // QEMU 7.2's order: init, the enable vector (pair 0), then features, memory (once per pair), rings, vector.
    await startLikeQemu(fe, mem, rings, 2);
    await fe.u64('GET_STATUS');
    expect(be.pairsState()).toEqual({ enabled: [0, 1], live: [0, 1] });
    const mapped = mem.mappings();
    expect(mapped).toBeGreaterThan(1); // ours plus the backend's

    // RX buffers on both pairs.
    for (const r of [rings[0]!, rings[2]!]) {
      const heads: number[] = [];
      for (let i = 0; i < r.num; i++) {
        r.setDesc(i, r.mem.gpa(r.bufOffset(i)), r.bufSize, F_WRITE);
        heads.push(i);
      }
      r.publish(heads);
    }

    // guest -> host on pair 1's TX ring: the kernel's UDP socket gets it.
    const s = dgram.createSocket('udp4');
    cleanups.push(() => s.close());
    await new Promise<void>((res) => s.bind(0, LOCAL, () => res()));
    const got: string[] = [];
    s.on('message', (m) => got.push(m.toString()));
    const tx = rings[3]!;
    const frame = udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 4000, dstPort: s.address().port, payload: Buffer.from('hello from the guest') });
    const off = tx.bufOffset(0);
    mem.u8.fill(0, off, off + HDR);
    mem.u8.set(frame, off + HDR);
    tx.setDesc(0, mem.gpa(off), HDR + frame.length, 0);
    tx.publish([0]);
    // The kernel delivers the datagram while the backend's write is still in progress; the backend counts it after.
    await until(() => got.length === 1 && be.counters()[1]!.txFrames === 1n, 5000);
    expect(got).toEqual(['hello from the guest']);
    expect(be.counters()[1]!.txFrames).toBe(1n);

    // host -> guest: datagrams to the peer arrive in the RX rings of the live pairs.
    const rxPayloads = (): string[] => {
      const out: string[] = [];
      for (const r of [rings[0]!, rings[2]!])
        for (const u of r.collect()) {
          const o = r.bufOffset(u.id);
          const d = parseUdp4Frame(Buffer.from(mem.u8.subarray(o + HDR, o + u.len)));
          if (d && d.dstIp === PEER) out.push(Buffer.from(d.payload).toString());
        }
      return out;
    };
    const seen: string[] = [];
    for (let i = 0; i < 16; i++) await new Promise<void>((res, rej) => s.send(Buffer.from(`to guest ${i}`), 5000 + i, PEER, (e) => (e ? rej(e) : res())));
    await until(() => (seen.push(...rxPayloads()), seen.length >= 16), 5000);
    expect(seen.sort()).toEqual(Array.from({ length: 16 }, (_, i) => `to guest ${i}`).sort());

    // ethtool -L combined 1: tap queue 1 detached in the kernel, pair 1 stopped; traffic still flows on pair 0.
    await fe.enableVector(2, 1);
    await fe.u64('GET_STATUS');
    expect(getTap('vue0')!.tun).toMatchObject({ numQueues: 1, numDisabledQueues: 1 });
    expect(be.pairsState()).toEqual({ enabled: [0], live: [0] });
    const before1 = be.counters()[1]!.rxFrames;
    seen.length = 0;
    for (let i = 0; i < 8; i++) await new Promise<void>((res, rej) => s.send(Buffer.from(`one pair ${i}`), 6000 + i, PEER, (e) => (e ? rej(e) : res())));
    await until(() => (seen.push(...rxPayloads()), seen.length >= 8), 5000);
    expect(seen).toHaveLength(8);
    expect(be.counters()[1]!.rxFrames).toBe(before1); // pair 1 is stopped

    // quit: GET_VRING_BASE on every ring (TX ring 3 consumed one descriptor), then EOF.
    const bases: number[] = [];
    for (let i = 0; i < 4; i++) bases.push(await fe.getBase(i));
    expect(bases[3]).toBe(1);
    expect(bases[1]).toBe(0);
    fe.close();
    await until(() => !be.connected);
    await until(() => mem.mappings() === 1);
    expect(mem.mappings()).toBe(1); // only the test's own mapping is left
    await be.close();
    s.close();
    rings.forEach((r) => r.close());
    mem.close();
    tap.close();
    cleanups.length = 0;
    rmSync(dir, { recursive: true, force: true });
    await until(() => openFds().length === fdsBefore);
    expect(openFds().length).toBe(fdsBefore);
  });

  it('the tap closed while the connection is live: the worker lets go of its queue, the (non-persistent) tap is gone', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vue2e-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    const tap = openTap({ name: 'vuc0', queues: 1, mac: TAP_MAC });
    cleanups.push(() => tap.close());
    const be = await serveVhostUser({ socket, tap, queues: 1 });
    cleanups.push(() => be.close());
    const mem = new GuestMem(`mqtap-vuc-${process.pid}`);
    cleanups.push(() => mem.close());
    const rings = [0, 1].map(() => new DriverRing(mem, 64));
    cleanups.push(() => rings.forEach((r) => r.close()));
    const fe = new ScriptedFrontend(await UnixSocket.connect(socket, { type: 'stream' }));
    cleanups.push(() => fe.close());
    await startLikeQemu(fe, mem, rings, 1);
    await fe.u64('GET_STATUS');
    expect(be.pairsState()).toEqual({ enabled: [0], live: [0] });
    const engine = be.counters()[0]!.tapEngine;
    expect(getLink('vuc0')).toBeDefined();
    tap.close();
    // The queue's file is released at once (the worker's io_uring held it as a registered file): the device goes.
    await until(() => getLink('vuc0') === undefined, 5000);
    expect(getLink('vuc0'), `tap still there after close (engine ${engine})`).toBeUndefined();
    expect(be.counters()[0]!.tapEngine, 'the pair has no tap').toBe('none');
    // The guest's frames are dropped and counted, not written to a stale fd number.
    const tx = rings[1]!;
    tx.setDesc(0, mem.gpa(tx.bufOffset(0)), HDR + 60, 0);
    tx.publish([0]);
    await until(() => be.counters()[0]!.txDropped === 1n, 5000);
    expect(be.counters()[0]).toMatchObject({ txFrames: 0n, txDropped: 1n });
  });
});
