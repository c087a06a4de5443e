/**
 * The vhost-user data plane (native/vhost_user.cc through
 * lib/vhost-user/dataplane.ts) driven directly by a frontend written in the
 * test (test/helpers/vu-driver.ts): guest memory in a memfd, split rings
 * filled by hand, a real 4-queue tap (12-byte vnet header) in a namespace
 * this file creates, link-local addresses only.
 *
 *   TX  guest -> tap: UDP frames put in each pair's TX ring arrive at a
 *       socket bound to the tap's address, byte-exact; the kernel's link
 *       counters and counters() agree.
 *   RX  tap -> guest: datagrams sent to PEER (a permanent neighbour behind
 *       the tap) land in the RX rings of the pairs whose tap queue the kernel
 *       picked, byte-exact, each exactly once.
 */
import dgram from 'node:dgram';
import { readdirSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames.js';
import { getLink } from '../../lib/tap/links.js';
import { MqtapError } from '../../lib/sys/errors.js';
import { native } from '../../lib/sys/native.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import type { DataPlaneFeatures } from '../../lib/vhost-user/dataplane-api.js';
import { openDataPlane, type NativeDataPlane } from '../../lib/vhost-user/dataplane.js';
import { openFds, run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { bindUdp, sendUdp } from '../helpers/net.js';
import { DriverRing, F_INDIRECT, F_NEXT, F_WRITE, GPA_BASE, GuestMem } from '../helpers/vu-driver.js';

const env = tapEnv();

const LOCAL = '169.254.78.1';
const PEER = '169.254.78.2';
const TAP_MAC = '02:00:00:00:01:01';
const PEER_MAC = '02:00:00:00:01:02';
const HDR = 12;
const PAIRS = 4;

async function until(done: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!done() && Date.now() < end) await sleep(5);
}

function send(s: dgram.Socket, payload: Buffer, port: number): Promise<void> {
  return sendUdp(s, payload, port, PEER);
}

// Every case runs with both tap engines: io_uring batches ('auto' here) and one writev/read per frame.
describe.skipIf(!env.ok).each(['auto', 'writev'] as const)(`vhost-user data plane, tapEngine %s${skipNote(env)}`, (tapEngine) => {
  useIsolatedNetns();
  const track = useTapTracker();
  const cleanup: Array<() => void> = [];
  afterEach(() => {
    for (const f of cleanup.splice(0).reverse()) {
      try {
        f();
      } catch {
        /* best effort */
      }
    }
  });

  let seq = 0;
  interface Setup {
    tap: Tap;
    mem: GuestMem;
    dp: NativeDataPlane;
  }

  function setup(): Setup {
    const name = `vu${seq}`;
    const tap = track(openTap({ name, queues: PAIRS, vnetHdrSize: 12, mac: TAP_MAC }));
    run('sysctl', ['-qw', `net.ipv6.conf.${name}.disable_ipv6=1`]);
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    const mem = new GuestMem(`mqtap-vu-test-${process.pid}-${seq++}`);
    cleanup.push(() => mem.close());
    const dp = openDataPlane(PAIRS, { tapEngine });
    cleanup.push(() => dp.close());
    for (const r of mem.regions()) dp.addRegion(r);
    for (let i = 0; i < PAIRS; i++) dp.setTap(i, tap.queues[i]!.fd);
    return { tap, mem, dp };
  }

  function ring(mem: GuestMem, num: number, bufSize = 2048): DriverRing {
    const r = new DriverRing(mem, num, bufSize);
    cleanup.push(() => r.close());
    return r;
  }

  /** A UDP socket on LOCAL, closed after the test. */
  async function udpSocket(): Promise<dgram.Socket> {
    const s = await bindUdp(LOCAL);
    cleanup.push(() => s.close());
    return s;
  }

  const feats = (o: Partial<DataPlaneFeatures> = {}): DataPlaneFeatures => ({ eventIdx: false, mrgRxbuf: false, indirectDesc: false, vnetHdrSize: 12, ...o });

  /** Puts frame i of a TX ring in buffer/descriptor `slot` (one descriptor: header + frame). */
  function putTx(r: DriverRing, slot: number, frame: Buffer): void {
    const off = r.bufOffset(slot);
    r.mem.u8.fill(0, off, off + HDR);
    r.mem.u8.set(frame, off + HDR);
    r.setDesc(slot, r.mem.gpa(off), HDR + frame.length, 0);
  }

  /** Posts every descriptor of an RX ring as one device-writable buffer. */
  function postRx(r: DriverRing, count = r.num): void {
    const heads: number[] = [];
    for (let i = 0; i < count; i++) {
      r.setDesc(i, r.mem.gpa(r.bufOffset(i)), r.bufSize, F_WRITE);
      heads.push(i);
    }
    r.publish(heads);
  }

  interface RingsOptions {
    /** Bytes per buffer (default 2048). */
    bufSize?: number;
    /** The features each pair's ring starts with (default feats()). */
    features?: DataPlaneFeatures | ((pair: number) => DataPlaneFeatures);
    /** RX: post every buffer before the start (default true). */
    post?: boolean;
    /** Runs on each ring before it is posted and started. */
    prepare?: (r: DriverRing) => void;
  }

  /** One `kind` ring of `num` buffers per pair, started (RX rings with every buffer posted first, unless post: false). */
  function startRings(dp: NativeDataPlane, mem: GuestMem, kind: 'rx' | 'tx', num: number, o: RingsOptions = {}): DriverRing[] {
    const rings: DriverRing[] = [];
    for (let p = 0; p < PAIRS; p++) {
      const r = ring(mem, num, o.bufSize);
      o.prepare?.(r);
      if (kind === 'rx' && o.post !== false) postRx(r);
      dp.startRing(p, kind, r.config(), typeof o.features === 'function' ? o.features(p) : (o.features ?? feats()));
      rings.push(r);
    }
    return rings;
  }

  describe.each([
    { what: 'EVENT_IDX off', eventIdx: false },
    { what: 'EVENT_IDX on', eventIdx: true },
  ])('$what', ({ eventIdx }) => {
    it('TX: frames from 4 pairs reach the kernel byte-exact, counted by the kernel and by counters()', async () => {
      const { tap, dp, mem } = setup();
      const s = await udpSocket();
      const port = s.address().port;
      const got = new Map<number, Buffer>();
      s.on('message', (msg, rinfo) => got.set(rinfo.port, msg));
      const before = getLink(tap.name)!.stats!.rxPackets;
      const PER = 50;
      const rings: DriverRing[] = [];
      const want = new Map<number, Buffer>();
      for (let p = 0; p < PAIRS; p++) {
        const r = ring(mem, 64);
        rings.push(r);
        if (eventIdx) r.setUsedEvent(PER - 1);
        dp.startRing(p, 'tx', r.config(), feats({ eventIdx }));
        const heads: number[] = [];
        for (let i = 0; i < PER; i++) {
          const payload = Buffer.from(`pair ${p} frame ${i} ${'z'.repeat(i)}`);
          const srcPort = 20000 + p * 100 + i;
          want.set(srcPort, payload);
          putTx(r, i, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort, dstPort: port, payload }));
          heads.push(i);
        }
        r.publish(heads);
      }
      await until(() => got.size >= want.size && rings.every((r) => r.usedIdx() === PER));
      for (const [i, r] of rings.entries()) {
        expect(r.usedIdx(), `pair ${i} used idx`).toBe(PER);
        const used = r.collect();
        expect(used.map((u) => u.id)).toEqual([...Array(PER).keys()]);
        expect(used.every((u) => u.len === 0)).toBe(true);
        const c = dp.counters(i);
        expect(c.txFrames).toBe(BigInt(PER));
        expect(c.txDropped).toBe(0n);
        expect(c.kicks).toBeGreaterThanOrEqual(1n);
        expect(c.calls, 'the guest asked for an interrupt').toBeGreaterThanOrEqual(1n);
        expect(dp.ringStatus(i, 'tx')).toEqual({ state: 'running', lastAvailIdx: PER });
        if (eventIdx) expect(r.availEvent(), 'avail_event re-armed at the avail idx').toBe(PER);
        else expect(r.usedFlags() & 1, 'NO_NOTIFY cleared when idle').toBe(0);
      }
      expect(got.size).toBe(want.size);
      for (const [srcPort, payload] of want) expect(got.get(srcPort)?.equals(payload), `datagram from port ${srcPort}`).toBe(true);
      const after = getLink(tap.name)!.stats!.rxPackets;
      expect(after - before).toBeGreaterThanOrEqual(PAIRS * PER);
      // A second round after the ring went idle: the kick wakes the worker again.
      const r0 = rings[0]!;
      putTx(r0, PER, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 29999, dstPort: port, payload: Buffer.from('again') }));
      r0.publish([PER]);
      await until(() => got.has(29999));
      expect(got.get(29999)?.toString()).toBe('again');
      expect(dp.stopRing(0, 'tx')).toEqual({ state: 'stopped', lastAvailIdx: PER + 1 });
      // No tap for a pair: what its guest sends is returned to it and counted as dropped.
      dp.setTap(1, -1);
      const r1 = rings[1]!;
      const linkBefore = getLink(tap.name)!.stats!.rxPackets;
      const heads: number[] = [];
      for (let i = 0; i < 5; i++) {
        putTx(r1, PER + i, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 29000 + i, dstPort: port, payload: Buffer.from('void') }));
        heads.push(PER + i);
      }
      r1.publish(heads);
      await until(() => r1.usedIdx() === PER + 5);
      expect(r1.usedIdx()).toBe(PER + 5);
      expect(dp.counters(1)).toMatchObject({ txFrames: BigInt(PER), txDropped: 5n });
      expect(getLink(tap.name)!.stats!.rxPackets).toBe(linkBefore);
    });

    it('RX: datagrams to the peer land in the 4 pairs\' RX rings byte-exact, each exactly once', async () => {
      const { dp, mem } = setup();
      const rings = startRings(dp, mem, 'rx', 128, { features: feats({ eventIdx }) });
      const s = await udpSocket();
      const N = 64;
      for (let i = 0; i < N; i++) await send(s, Buffer.from(`to guest ${i} ${'q'.repeat(i * 3)}`), 30000 + i);
      const got = new Map<number, { pair: number; payload: Buffer; numBuffers: number }>();
      const collectAll = (): void => {
        for (const [p, r] of rings.entries()) {
          for (const u of r.collect()) {
            const off = r.bufOffset(u.id);
            const frame = Buffer.from(mem.u8.subarray(off, off + u.len));
            const d = parseUdp4Frame(frame.subarray(HDR));
            if (!d || d.dstIp !== PEER) continue;
            expect(got.has(d.dstPort), `port ${d.dstPort} delivered once`).toBe(false);
            got.set(d.dstPort, { pair: p, payload: d.payload, numBuffers: frame.readUInt16LE(10) });
          }
        }
      };
      await until(() => {
        collectAll();
        return got.size >= N;
      });
      expect(got.size).toBe(N);
      for (let i = 0; i < N; i++) {
        const g = got.get(30000 + i)!;
        expect(g.payload.toString()).toBe(`to guest ${i} ${'q'.repeat(i * 3)}`);
        expect(g.numBuffers, 'num_buffers is 1 (VERSION_1 header, no MRG_RXBUF)').toBe(1);
      }
      // 64 flows spread by the tap's flow hash: every pair got some (probability of a miss ~ 4 * (3/4)^64).
      expect(new Set([...got.values()].map((g) => g.pair)).size).toBe(PAIRS);
      let frames = 0n;
      for (let p = 0; p < PAIRS; p++) {
        const c = dp.counters(p);
        frames += c.rxFrames;
        expect(c.rxDropped).toBe(0n);
        expect(c.calls).toBeGreaterThanOrEqual(1n);
      }
      expect(frames).toBeGreaterThanOrEqual(BigInt(N));
    });
  });

  /** Collects the UDP datagrams (to PEER) delivered in RX rings, following MRG_RXBUF's num_buffers. */
  function collectRx(rings: DriverRing[], into: Map<number, { pair: number; payload: Buffer; numBuffers: number; lens: number[] }>): void {
    for (const [p, r] of rings.entries()) {
      const used = r.collect();
      for (let k = 0; k < used.length; ) {
        const first = used[k]!;
        const off = r.bufOffset(first.id);
        const nb = r.mem.view.getUint16(off + 10, true);
        const parts: Buffer[] = [];
        const lens: number[] = [];
        for (let j = 0; j < Math.max(nb, 1); j++) {
          const u = used[k + j]!;
          lens.push(u.len);
          parts.push(Buffer.from(r.mem.u8.subarray(r.bufOffset(u.id), r.bufOffset(u.id) + u.len)));
        }
        k += Math.max(nb, 1);
        const frame = Buffer.concat(parts);
        const d = parseUdp4Frame(frame.subarray(HDR));
        if (!d || d.dstIp !== PEER) continue;
        expect(into.has(d.dstPort), `port ${d.dstPort} delivered once`).toBe(false);
        into.set(d.dstPort, { pair: p, payload: d.payload, numBuffers: nb, lens });
      }
    }
  }

  describe.each([
    { what: 'MRG_RXBUF on', mrg: true },
    { what: 'MRG_RXBUF off', mrg: false },
  ])('$what, 512-byte guest buffers', ({ mrg }) => {
    it(mrg ? 'a 1514-byte frame spans 3 buffers, num_buffers = 3, byte-exact' : 'a 1514-byte frame is dropped and counted, the buffers stay, small frames still arrive', async () => {
      const { dp, mem } = setup();
      const rings = startRings(dp, mem, 'rx', 64, { bufSize: 512, features: feats({ mrgRxbuf: mrg }) });
      const s = await udpSocket();
      const N = 16;
      const big = (i: number): Buffer => Buffer.alloc(1472, `big ${i} `); // 14 + 20 + 8 + 1472 = 1514
      for (let i = 0; i < N; i++) await send(s, big(i), 31000 + i);
      const got = new Map<number, { pair: number; payload: Buffer; numBuffers: number; lens: number[] }>();
      const dropped = (): bigint => [0, 1, 2, 3].reduce((a, p) => a + dp.counters(p).rxDropped, 0n);
      if (mrg) {
        await until(() => {
          collectRx(rings, got);
          return got.size >= N;
        });
        expect(got.size).toBe(N);
        for (let i = 0; i < N; i++) {
          const g = got.get(31000 + i)!;
          expect(g.payload.equals(big(i)), `frame ${i} reassembled`).toBe(true);
          expect(g.numBuffers).toBe(3);
          expect(g.lens).toEqual([512, 512, 1514 + HDR - 1024]);
        }
        expect(dropped()).toBe(0n);
      } else {
        await until(() => dropped() >= BigInt(N));
        expect(dropped()).toBe(BigInt(N));
        for (const r of rings) expect(r.usedIdx(), 'no buffer consumed by a dropped frame').toBe(0);
        for (let i = 0; i < N; i++) await send(s, Buffer.from(`small ${i}`), 32000 + i);
        await until(() => {
          collectRx(rings, got);
          return got.size >= N;
        });
        expect([...got.keys()].sort()).toEqual([...Array(N).keys()].map((i) => 32000 + i));
        for (const g of got.values()) expect(g.numBuffers).toBe(1);
      }
    });
  });

  it('MRG_RXBUF: a frame needing more buffers than the whole ring holds is dropped and counted, not a stall', async () => {
    const { dp, mem } = setup();
    // 2 x 512 = 1024 bytes in all: a 1514-byte frame can never fit.
    const rings = startRings(dp, mem, 'rx', 2, { bufSize: 512, features: feats({ mrgRxbuf: true }) });
    const s = await udpSocket();
    const dropped = (): bigint => [0, 1, 2, 3].reduce((a, p) => a + dp.counters(p).rxDropped, 0n);
    for (let i = 0; i < 4; i++) await send(s, Buffer.alloc(1472, i), 38000 + i);
    await until(() => dropped() >= 4n);
    expect(dropped()).toBe(4n);
    for (const r of rings) expect(r.usedIdx()).toBe(0);
    // The ring is not stuck: a small frame for the same flow still arrives
    // (one at a time, each used buffer posted again: a ring holds only 2).
    const got = new Set<number>();
    for (let i = 0; i < 4; i++) {
      await send(s, Buffer.from(`fits ${i}`), 38000 + i);
      await until(() => {
        for (const r of rings) {
          const used = r.collect();
          for (const u of used) {
            const d = parseUdp4Frame(Buffer.from(mem.u8.subarray(r.bufOffset(u.id) + HDR, r.bufOffset(u.id) + u.len)));
            if (d && d.dstIp === PEER) got.add(d.dstPort);
          }
          if (used.length) r.publish(used.map((u) => u.id));
        }
        return got.has(38000 + i);
      });
    }
    expect([...got.keys()].sort()).toEqual([38000, 38001, 38002, 38003]);
  });

  /**
   * 8 frames of 1514 B wait in the tap queue of one flow before 8 chains of 512 B are posted on every pair
   * (MRG_RXBUF): the worker reads all 8 in one batch, places 2 (3 chains each) and parks 6.  Returns the pair
   * the flow went to, its ring, and the frames in order.
   */
  async function parkSix(dp: NativeDataPlane, mem: GuestMem, port: number): Promise<{ p: number; r: DriverRing; frames: Buffer[]; s: dgram.Socket }> {
    const s = await udpSocket();
    const frames = Array.from({ length: 8 }, (_, i) => Buffer.alloc(1472, `frame ${i} `));
    for (const f of frames) await send(s, f, port); // one flow: one tap queue, in order
    const rings = startRings(dp, mem, 'rx', 8, { bufSize: 512, features: feats({ mrgRxbuf: true }) });
    await until(() => rings.some((r) => r.usedIdx() === 6));
    const p = rings.findIndex((r) => r.usedIdx() === 6);
    expect(p, 'a pair placed 2 frames (6 chains)').toBeGreaterThanOrEqual(0);
    await sleep(50); // nothing more moves: the third frame needs 3 chains, 2 are left
    expect(rings[p]!.usedIdx()).toBe(6);
    expect(dp.counters(p)).toMatchObject({ rxFrames: 2n, rxDropped: 0n });
    return { p, r: rings[p]!, frames, s };
  }

  /** Frames (payloads of UDP datagrams to PEER) in a MRG_RXBUF ring's used entries, reposting every used chain. */
  function drainMrg(r: DriverRing, out: Buffer[]): void {
    const used = r.collect();
    for (let k = 0; k < used.length; ) {
      const nb = r.mem.view.getUint16(r.bufOffset(used[k]!.id) + 10, true);
      const parts = used.slice(k, k + nb).map((u) => Buffer.from(r.mem.u8.subarray(r.bufOffset(u.id), r.bufOffset(u.id) + u.len)));
      k += Math.max(nb, 1);
      const d = parseUdp4Frame(Buffer.concat(parts).subarray(HDR));
      if (d && d.dstIp === PEER) out.push(Buffer.from(d.payload));
    }
    if (used.length) r.publish(used.map((u) => u.id));
  }

  it('MRG_RXBUF partial placement: 8 frames of 1514 B, 8 chains of 512 B: 2 delivered, 6 parked, then all 8 in order, byte-exact, none dropped', async () => {
    const { dp, mem } = setup();
    const { p, r, frames } = await parkSix(dp, mem, 39000);
    const got: Buffer[] = [];
    await until(() => {
      drainMrg(r, got); // reposts the used chains and kicks: the parked frames go on
      return got.length >= 8;
    });
    expect(got.length).toBe(8);
    got.forEach((g, i) => expect(g.equals(frames[i]!), `frame ${i} in order, byte-exact`).toBe(true));
    expect(dp.counters(p)).toMatchObject({ rxFrames: 8n, rxDropped: 0n });
  });

  it.each(['stopRing', 'setTap'] as const)('frames parked when the RX ring stops or the tap changes (%s) are dropped and counted, never put in the restarted ring', async (how) => {
    const { dp, mem, tap } = setup();
    const { p, r, s } = await parkSix(dp, mem, 39100);
    let base = -1;
    if (how === 'stopRing') base = dp.stopRing(p, 'rx').lastAvailIdx;
    else {
      dp.setTap(p, -1); // the ring keeps running
      dp.setTap(p, tap.queues[p]!.fd);
    }
    expect(dp.counters(p), 'the 6 parked frames').toMatchObject({ rxFrames: 2n, rxDropped: 6n });
    const got: Buffer[] = [];
    drainMrg(r, got); // reposts the 6 used chains (and kicks)
    expect(got.length).toBe(2);
    got.length = 0;
    if (how === 'stopRing') dp.startRing(p, 'rx', r.config(base), feats({ mrgRxbuf: true }));
    await sleep(100);
    drainMrg(r, got);
    expect(got, 'nothing from before the stop').toEqual([]);
    // The restarted ring receives what comes now (the same flow: the same tap queue).
    await send(s, Buffer.from('after'), 39100);
    await until(() => (drainMrg(r, got), got.length >= 1));
    expect(got.map((g) => g.toString())).toEqual(['after']);
    expect(dp.counters(p)).toMatchObject({ rxFrames: 3n, rxDropped: 6n });
  });

  it.each([
    { mode: 'flags' as const, eventIdx: false },
    { mode: 'eventIdx' as const, eventIdx: true },
  ])('a driver that kicks only when asked ($mode) loses no wake-up: TX rounds and RX refills all go through', async ({ mode, eventIdx }) => {
    const { dp, mem, tap } = setup();
    const s = await udpSocket();
    const linkBefore = getLink(tap.name)!.stats!.rxPackets;
    // TX on pair 0: 200 rounds of 1..8 frames, each round published as soon as the previous is used.
    const tx = ring(mem, 16, 256);
    tx.suppressKicks = mode;
    dp.startRing(0, 'tx', tx.config(), feats({ eventIdx }));
    const frame = udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 43000, dstPort: 9, payload: Buffer.alloc(100) });
    let total = 0;
    for (let round = 0; round < 200; round++) {
      const k = 1 + (round % 8);
      const heads: number[] = [];
      for (let i = 0; i < k; i++) {
        const slot = (tx.availIdx + i) % tx.num;
        putTx(tx, slot, frame);
        heads.push(slot);
      }
      tx.publish(heads);
      total += k;
      const drained = (): boolean => tx.usedIdx() === tx.availIdx;
      const room = (): boolean => ((tx.availIdx - tx.usedIdx()) & 0xffff) <= tx.num - 8;
      const ok = round % 3 !== 0 ? drained : room; // sometimes publish while the device works
      await until(ok, 2000);
      if (!ok()) break; // stalled: a lost wake-up (reported below)
    }
    await until(() => tx.usedIdx() === tx.availIdx, 2000);
    expect(tx.usedIdx(), `TX used idx (kicks sent ${tx.kicksSent}, saved ${tx.kicksSaved})`).toBe(total & 0xffff);
    expect(dp.counters(0).txFrames).toBe(BigInt(total));
    expect(getLink(tap.name)!.stats!.rxPackets - linkBefore).toBe(total);
    // RX on every pair: 2 buffers each, refilled (kicks suppressed as allowed) as they are used.
    const rings = startRings(dp, mem, 'rx', 2, { features: feats({ eventIdx }), prepare: (r) => (r.suppressKicks = mode) });
    const N = 120;
    const got = new Set<number>();
    let udp = 0;
    const refill = (): void => {
      for (const r of rings) {
        const used = r.collect();
        for (const u of used) {
          const d = parseUdp4Frame(Buffer.from(mem.u8.subarray(r.bufOffset(u.id) + HDR, r.bufOffset(u.id) + u.len)));
          if (d && d.dstIp === PEER) {
            got.add(d.dstPort);
            udp++;
          }
        }
        if (used.length) r.publish(used.map((u) => u.id));
      }
    };
    for (let i = 0; i < N; i++) {
      await send(s, Buffer.from(`refill ${i}`), 44000 + (i % 64));
      if (i % 4 === 3) refill(); // the tap holds what does not fit meanwhile
    }
    await until(() => {
      refill();
      return udp >= N;
    });
    expect(udp, `UDP frames in the guest (kicks sent ${rings.map((r) => r.kicksSent).join()}, saved ${rings.map((r) => r.kicksSaved).join()})`).toBe(N);
    expect(got.size).toBe(64);
    for (let p = 0; p < PAIRS; p++) expect(dp.counters(p).rxDropped).toBe(0n);
  });

  it('calls honour the guest: VRING_AVAIL_F_NO_INTERRUPT without EVENT_IDX, used_event with it', async () => {
    const { dp, mem } = setup();
    const s = await udpSocket();
    const got = new Set<number>();
    s.on('message', (_m, rinfo) => got.add(rinfo.port));
    let port = 40100;
    /** Sends `n` frames on the TX ring of `pair` and waits until they are used. */
    const round = async (pair: number, r: DriverRing, n: number): Promise<void> => {
      const heads: number[] = [];
      for (let i = 0; i < n; i++) {
        const slot = (r.availIdx + i) % r.num;
        putTx(r, slot, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: port++, dstPort: s.address().port, payload: Buffer.from('c') }));
        heads.push(slot);
      }
      const want = (r.availIdx + n) & 0xffff;
      r.publish(heads);
      await until(() => r.usedIdx() === want && dp.ringStatus(pair, 'tx').lastAvailIdx === want);
      expect(r.usedIdx()).toBe(want);
      r.collect();
      await sleep(20); // a call would have been written with the used index
    };
    // No EVENT_IDX: the flag silences every call.
    const a = ring(mem, 16);
    a.availFlags(1); // VRING_AVAIL_F_NO_INTERRUPT
    dp.startRing(0, 'tx', a.config(), feats());
    for (let k = 0; k < 3; k++) await round(0, a, 4);
    expect(dp.counters(0).calls).toBe(0n);
    expect(native.eventfdRead(a.call)).toBeNull();
    a.availFlags(0);
    await round(0, a, 4);
    expect(dp.counters(0).calls).toBe(1n);
    expect(native.eventfdRead(a.call)).toBe(1n);
    // EVENT_IDX: the first used entries always signal; then only when used idx passes used_event.
    const b = ring(mem, 16);
    b.setUsedEvent(0x8000);
    dp.startRing(1, 'tx', b.config(), feats({ eventIdx: true }));
    await round(1, b, 4);
    expect(dp.counters(1).calls).toBe(1n);
    for (let k = 0; k < 3; k++) await round(1, b, 4);
    expect(dp.counters(1).calls, 'used_event far ahead: no call').toBe(1n);
    b.setUsedEvent(b.usedIdx()); // interrupt me when the next entry is used
    await round(1, b, 4);
    expect(dp.counters(1).calls).toBe(2n);
    expect(native.eventfdRead(b.call)).toBe(2n);
  });

  it('buffers that straddle the border between two regions are split there, both ways (GPA and user addresses differ)', async () => {
    const { dp, mem } = setup();
    const s = await udpSocket();
    const got = new Map<number, Buffer>();
    s.on('message', (m, rinfo) => got.set(rinfo.port, m));
    const border = mem.size / 2;
    // TX: header alone in one descriptor, the frame in a second one that crosses the border.
    const tx = ring(mem, 8);
    dp.startRing(0, 'tx', tx.config(), feats());
    const payload = Buffer.alloc(900, 'border-tx ');
    const frame = udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 39000, dstPort: s.address().port, payload });
    const hdrOff = tx.bufOffset(0);
    mem.u8.fill(0, hdrOff, hdrOff + HDR);
    const fOff = border - 300;
    mem.u8.set(frame, fOff);
    tx.setDesc(0, mem.gpa(hdrOff), HDR, F_NEXT, 1);
    tx.setDesc(1, mem.gpa(fOff), frame.length, 0);
    tx.publish([0]);
    // The kernel delivers the datagram during the backend's write; the backend counts it after.
    await until(() => got.has(39000) && dp.counters(0).txBytes === BigInt(frame.length));
    expect(got.get(39000)?.equals(payload)).toBe(true);
    expect(dp.counters(0).txBytes).toBe(BigInt(frame.length));
    // RX: every pair's buffers cross the border (one buffer per pair, 2048 bytes from border - 1000 + 2048 * p).
    const rings: DriverRing[] = [];
    for (let p = 0; p < PAIRS; p++) {
      const r = ring(mem, 8);
      rings.push(r);
      const off = border - 1000 - 4096 * p;
      r.setDesc(0, mem.gpa(off), 2048 + 4096 * p, F_WRITE);
      r.publish([0]);
      dp.startRing(p, 'rx', r.config(), feats());
    }
    const flows = new Map<number, number>(); // pair -> port received
    let port = 39100;
    await until(() => {
      for (const [p, r] of rings.entries()) {
        for (const u of r.collect()) {
          const off = border - 1000 - 4096 * p;
          const d = parseUdp4Frame(Buffer.from(mem.u8.subarray(off + HDR, off + u.len)));
          if (d && d.dstIp === PEER && d.payload.equals(Buffer.alloc(1200, d.dstPort % 256))) flows.set(p, d.dstPort);
          r.publish([0]);
        }
      }
      if (flows.size < PAIRS) void send(s, Buffer.alloc(1200, port % 256), port++);
      return flows.size >= PAIRS;
    });
    expect(flows.size, 'every pair got a frame written across the border').toBe(PAIRS);
  });

  it('no guest buffers: the tap is not read (nothing dropped) until the RX kick, then every frame arrives', async () => {
    const { dp, mem } = setup();
    const rings = startRings(dp, mem, 'rx', 64, { post: false, features: (p) => feats({ eventIdx: p % 2 === 0 }) });
    const s = await udpSocket();
    const N = 24;
    for (let i = 0; i < N; i++) await send(s, Buffer.from(`wait ${i}`), 33000 + i);
    await sleep(150);
    for (let p = 0; p < PAIRS; p++) {
      const c = dp.counters(p);
      expect(c.rxFrames + c.rxDropped, `pair ${p} left frames in the kernel`).toBe(0n);
    }
    for (const r of rings) postRx(r); // publish + kick
    const got = new Map<number, { pair: number; payload: Buffer; numBuffers: number; lens: number[] }>();
    await until(() => {
      collectRx(rings, got);
      return got.size >= N;
    });
    expect([...got.keys()].sort()).toEqual([...Array(N).keys()].map((i) => 33000 + i));
  });

  /** Sends one frame on a healthy TX ring and waits for it at the socket. */
  async function txOne(r: DriverRing, slot: number, s: dgram.Socket, got: Set<number>, srcPort: number): Promise<void> {
    putTx(r, slot % r.num, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort, dstPort: s.address().port, payload: Buffer.from(`ok ${srcPort}`) }));
    r.publish([slot % r.num]);
    await until(() => got.has(srcPort));
    expect(got.has(srcPort), `healthy ring still moves frames (port ${srcPort})`).toBe(true);
  }

  interface Evil {
    what: string;
    reason: RegExp;
    indirect?: boolean;
    /** Writes the malformed ring; returns nothing (the test kicks). */
    build(r: DriverRing): void;
  }

  const EVIL: Evil[] = [
    { what: 'descriptor address outside guest memory', reason: /outside guest memory/, build: (r) => { r.setDesc(0, GPA_BASE + (64n << 20n), 64, 0); r.publish([0]); } },
    { what: 'descriptor below the first region', reason: /outside guest memory/, build: (r) => { r.setDesc(0, 0x1000n, 64, 0); r.publish([0]); } },
    { what: 'huge descriptor length', reason: /outside guest memory/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 0xffffffff, 0); r.publish([0]); } },
    { what: 'address + length wraps 2^64', reason: /outside guest memory/, build: (r) => { r.setDesc(0, 0xffff_ffff_ffff_ff00n, 0x200, 0); r.publish([0]); } },
    { what: 'two-descriptor loop', reason: /loops or is longer than the ring/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 20, F_NEXT, 1); r.setDesc(1, r.mem.gpa(r.bufOffset(1)), 20, F_NEXT, 0); r.publish([0]); } },
    { what: 'chain longer than the ring (every descriptor, then back to the first)', reason: /loops or is longer than the ring/, build: (r) => { for (let i = 0; i < r.num; i++) r.setDesc(i, r.mem.gpa(r.bufOffset(i)), 20, F_NEXT, (i + 1) % r.num); r.publish([0]); } },
    { what: 'next index >= ring size', reason: /next index \d+ >= ring size/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 20, F_NEXT, r.num + 5); r.publish([0]); } },
    { what: 'head index >= ring size', reason: /head index \d+ >= ring size/, build: (r) => r.publish([r.num + 3]) },
    { what: 'avail idx jumps by more than the ring size', reason: /avail idx jumped/, build: (r) => { r.setAvailIdx(r.num + 1); native.eventfdWrite(r.kick); } },
    { what: 'device-writable descriptor in a TX chain', reason: /device-writable descriptor in a TX chain/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 64, F_WRITE); r.publish([0]); } },
    { what: 'indirect descriptor without the feature', reason: /without VIRTIO_RING_F_INDIRECT_DESC/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 32, F_INDIRECT); r.publish([0]); } },
    { what: 'indirect table outside guest memory', indirect: true, reason: /indirect table .* outside guest memory/, build: (r) => { r.setDesc(0, GPA_BASE + (1n << 40n), 32, F_INDIRECT); r.publish([0]); } },
    { what: 'indirect table length not a multiple of 16', indirect: true, reason: /not a multiple of 16/, build: (r) => { r.setDesc(0, r.mem.gpa(r.bufOffset(0)), 33, F_INDIRECT); r.publish([0]); } },
    { what: 'indirect table longer than 65536 entries', indirect: true, reason: /indirect table too long/, build: (r) => { r.setDesc(0, r.mem.gpa(r.mem.size / 2), 65537 * 16, F_INDIRECT); r.publish([0]); } },
    { what: 'nested indirect descriptor', indirect: true, reason: /nested indirect/, build: (r) => { const t = r.bufOffset(1); r.setDesc(0, r.mem.gpa(r.bufOffset(2)), 32, F_INDIRECT, 0, t); r.setDesc(0, r.mem.gpa(t), 16, F_INDIRECT); r.publish([0]); } },
    { what: 'indirect chain loop', indirect: true, reason: /indirect chain loops/, build: (r) => { const t = r.bufOffset(1); r.setDesc(0, r.mem.gpa(r.bufOffset(2)), 20, F_NEXT, 1, t); r.setDesc(1, r.mem.gpa(r.bufOffset(2)), 20, F_NEXT, 0, t); r.setDesc(0, r.mem.gpa(t), 32, F_INDIRECT); r.publish([0]); } },
    { what: 'indirect next outside its table', indirect: true, reason: /indirect next index/, build: (r) => { const t = r.bufOffset(1); r.setDesc(0, r.mem.gpa(r.bufOffset(2)), 20, F_NEXT, 7, t); r.setDesc(0, r.mem.gpa(t), 32, F_INDIRECT); r.publish([0]); } },
  ];

  it('each malformed TX ring stops only itself, with the reason, err fd and notify fd; the other rings keep moving frames', async () => {
    const { dp, mem } = setup();
    const s = await udpSocket();
    const got = new Set<number>();
    s.on('message', (_m, rinfo) => got.add(rinfo.port));
    const healthy: DriverRing[] = [];
    for (let p = 1; p < PAIRS; p++) {
      const r = ring(mem, 16);
      healthy.push(r);
      dp.startRing(p, 'tx', r.config(), feats({ indirectDesc: true }));
    }
    const rx0 = ring(mem, 16);
    postRx(rx0);
    dp.startRing(0, 'rx', rx0.config(), feats());
    let port = 34000;
    for (const [k, e] of EVIL.entries()) {
      const r = new DriverRing(mem, 8, 256);
      try {
        dp.startRing(0, 'tx', r.config(), feats({ indirectDesc: e.indirect ?? false }));
        e.build(r);
        await until(() => dp.ringStatus(0, 'tx').state === 'failed');
        const st = dp.ringStatus(0, 'tx');
        expect(st.state, e.what).toBe('failed');
        expect(st.reason, e.what).toMatch(e.reason);
        expect(native.eventfdRead(r.err), `${e.what}: err eventfd signalled`).toBe(1n);
        expect(native.eventfdRead(dp.notifyFd), `${e.what}: notify fd signalled`).toBe(1n);
        expect(r.usedIdx(), `${e.what}: nothing marked used`).toBe(0);
        expect(dp.stopRing(0, 'tx')).toEqual({ state: 'failed', reason: st.reason, lastAvailIdx: 0 });
        expect(dp.ringStatus(0, 'tx').state).toBe('stopped');
        expect(dp.ringStatus(0, 'rx').state, 'the same pair\'s RX ring is untouched').toBe('running');
        const h = healthy[k % healthy.length]!;
        await txOne(h, k, s, got, port++);
      } finally {
        r.close();
      }
    }
    for (let p = 1; p < PAIRS; p++) expect(dp.ringStatus(p, 'tx').state).toBe('running');
  });

  it('a malformed RX ring fails when a frame comes for it; the other pairs keep receiving', async () => {
    const { dp, mem } = setup();
    const rings = startRings(dp, mem, 'rx', 64);
    // Pair 0's first buffer is device-readable: not a receive buffer.
    rings[0]!.setDesc(0, mem.gpa(rings[0]!.bufOffset(0)), 2048, 0);
    const s = await udpSocket();
    const N = 64;
    for (let i = 0; i < N; i++) await send(s, Buffer.from(`rx ${i}`), 35000 + i);
    await until(() => dp.ringStatus(0, 'rx').state === 'failed');
    expect(dp.ringStatus(0, 'rx')).toMatchObject({ state: 'failed', reason: expect.stringMatching(/device-readable descriptor in an RX chain/) });
    expect(native.eventfdRead(rings[0]!.err)).toBe(1n);
    const got = new Map<number, { pair: number; payload: Buffer; numBuffers: number; lens: number[] }>();
    await until(() => {
      collectRx(rings, got);
      return [1, 2, 3].every((p) => [...got.values()].some((g) => g.pair === p));
    });
    for (const p of [1, 2, 3]) {
      expect([...got.values()].some((g) => g.pair === p), `pair ${p} still receives`).toBe(true);
      expect(dp.ringStatus(p, 'rx').state).toBe('running');
    }
  });

  it('removing the region a running ring\'s buffers live in, mid-traffic: the frames go out or the ring fails, never a stray access', async () => {
    const { dp, mem, tap } = setup();
    const rxBefore = getLink(tap.name)!.stats!.rxPackets;
    const extra = new GuestMem(`mqtap-vu-extra-${process.pid}-${seq++}`, 1 << 20);
    cleanup.push(() => extra.close());
    const GPA2 = 0x8000_0000n;
    const s = await udpSocket();
    let received = 0;
    s.on('message', () => received++);
    const frame = udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 41000, dstPort: s.address().port, payload: Buffer.alloc(1400, 7) });
    const NUM = 64;
    let sent = 0;
    let failures = 0;
    let r = ring(mem, NUM, 64);
    dp.startRing(0, 'tx', r.config(), feats());
    for (let iter = 0; iter < 40; iter++) {
      dp.addRegion({ guestPhysAddr: GPA2, size: 1n << 20n, userAddr: extra.ua, mmapOffset: 0n, fd: extra.fd });
      const heads: number[] = [];
      for (let i = 0; i < NUM; i++) {
        const off = i * 2048;
        extra.u8.fill(0, off, off + HDR);
        extra.u8.set(frame, off + HDR);
        const slot = (r.availIdx + i) % NUM;
        r.setDesc(slot, GPA2 + BigInt(off), HDR + frame.length, 0);
        heads.push(slot);
      }
      r.publish(heads);
      if (iter % 2 === 1) await sleep(1); // sometimes let the worker start first
      dp.removeRegion(GPA2); // waits for the worker's batch; the rest of the chains now point nowhere
      expect(extra.mappings(), 'only the test\'s own mapping').toBe(1);
      await until(() => r.usedIdx() === r.availIdx || dp.ringStatus(0, 'tx').state === 'failed', 2000);
      const st = dp.ringStatus(0, 'tx');
      if (st.state === 'failed') {
        expect(st.reason).toMatch(/outside guest memory/);
        failures++;
        native.eventfdRead(dp.notifyFd);
        expect(dp.stopRing(0, 'tx').state).toBe('failed');
        r = ring(mem, NUM, 64); // a fresh ring, as after a device reset
        dp.startRing(0, 'tx', r.config(), feats());
      } else {
        expect(r.usedIdx()).toBe(r.availIdx);
        r.collect();
      }
    }
    // What the worker wrote is what the kernel got from the tap (the socket may drop under this burst).
    sent = Number(dp.counters(0).txFrames);
    expect(getLink(tap.name)!.stats!.rxPackets - rxBefore).toBe(sent);
    expect(sent, 'frames went out').toBeGreaterThan(0);
    console.log(`region removal mid-traffic: ${sent} frames sent, ring failed (and was reset) in ${failures} of 40 rounds`);
    await until(() => received >= sent, 2000);
    received = sent; // only the next datagram matters below
    // The pair still works with memory that stays.
    dp.addRegion({ guestPhysAddr: GPA2, size: 1n << 20n, userAddr: extra.ua, mmapOffset: 0n, fd: extra.fd });
    const slot = r.availIdx % NUM;
    r.setDesc(slot, GPA2, HDR + frame.length, 0);
    r.publish([slot]);
    await until(() => received > sent);
    expect(received).toBe(sent + 1);
  });

  it('a detached tap queue costs no CPU, and its pair receives again once it is attached (no RX kick needed)', async () => {
    const { dp, mem, tap } = setup();
    const rings = startRings(dp, mem, 'rx', 64);
    const tx = ring(mem, 8);
    dp.startRing(3, 'tx', tx.config(), feats()); // the pair's worker keeps running with the ring
    tap.queues[3]!.disable();
    // Stopped or running, the RX ring of the detached queue must not spin its worker.
    for (const stop of [false, true]) {
      if (stop) dp.stopRing(3, 'rx');
      await sleep(50);
      const t0 = process.cpuUsage();
      const w0 = Date.now();
      await sleep(400);
      const cpu = process.cpuUsage(t0);
      const ms = (cpu.user + cpu.system) / 1000;
      expect(ms, `CPU over ${Date.now() - w0} ms with queue 3 detached (ring ${stop ? 'stopped' : 'running'})`).toBeLessThan(150);
    }
    dp.startRing(3, 'rx', rings[3]!.config(dp.ringStatus(3, 'rx').lastAvailIdx), feats());
    tap.queues[3]!.enable(); // after the ring started, and no RX kick: the worker must notice on its own
    const s = await udpSocket();
    const got = new Map<number, { pair: number; payload: Buffer; numBuffers: number; lens: number[] }>();
    let port = 42000;
    await until(() => {
      collectRx(rings, got);
      if (![...got.values()].some((g) => g.pair === 3)) void send(s, Buffer.from('back'), port++);
      return [...got.values()].some((g) => g.pair === 3);
    });
    expect([...got.values()].some((g) => g.pair === 3), 'pair 3 receives again').toBe(true);
  });

  it('the tap deleted under running rings (its fds report EPOLLERR for good): no busy loop, guest frames dropped and counted', async () => {
    const { dp, mem, tap } = setup();
    startRings(dp, mem, 'rx', 16);
    const tx = startRings(dp, mem, 'tx', 16);
    run('ip', ['link', 'del', tap.name]);
    await sleep(50);
    const t0 = process.cpuUsage();
    await sleep(400);
    const cpu = process.cpuUsage(t0);
    expect((cpu.user + cpu.system) / 1000, 'CPU (ms) over 400 ms with the tap gone').toBeLessThan(150);
    putTx(tx[0]!, 0, Buffer.alloc(60));
    tx[0]!.publish([0]);
    await until(() => tx[0]!.usedIdx() === 1);
    expect(tx[0]!.usedIdx()).toBe(1);
    expect(dp.counters(0)).toMatchObject({ txFrames: 0n, txDropped: 1n });
    for (let p = 0; p < PAIRS; p++) expect(dp.ringStatus(p, 'rx').state).toBe('running');
  });

  it('close() mid-traffic joins the workers and leaves no fd, no mapping and no thread behind', async () => {
    const name = `vu${seq}`;
    const tap = track(openTap({ name, queues: PAIRS, vnetHdrSize: 12, mac: TAP_MAC }));
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    const mem = new GuestMem(`mqtap-vu-close-${process.pid}-${seq++}`, 16 << 20);
    cleanup.push(() => mem.close());
    const tx: DriverRing[] = [];
    const rx: DriverRing[] = [];
    for (let p = 0; p < PAIRS; p++) {
      tx.push(ring(mem, 256));
      rx.push(ring(mem, 256));
    }
    const s = await udpSocket();
    const fds = openFds();
    const threads = (): number => readdirSync('/proc/self/task').length;
    const threadsBefore = threads();
    expect(mem.mappings()).toBe(1);
    const dp = openDataPlane(PAIRS, { tapEngine });
    for (const r of mem.regions()) dp.addRegion(r);
    expect(mem.mappings(), 'the data plane maps both regions').toBe(3);
    for (let p = 0; p < PAIRS; p++) {
      dp.setTap(p, tap.queues[p]!.fd);
      postRx(rx[p]!);
      dp.startRing(p, 'rx', rx[p]!.config(), feats({ eventIdx: true }));
      dp.startRing(p, 'tx', tx[p]!.config(), feats({ eventIdx: true }));
      const heads: number[] = [];
      for (let i = 0; i < 256; i++) {
        putTx(tx[p]!, i, udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 36000 + i, dstPort: s.address().port, payload: Buffer.alloc(1000, p) }));
        heads.push(i);
      }
      tx[p]!.publish(heads);
    }
    expect(threads(), 'one worker per pair').toBe(threadsBefore + PAIRS);
    const sending = (async () => {
      for (let i = 0; i < 200; i++) await send(s, Buffer.alloc(600, i), 37000 + (i % 64));
    })();
    await until(() => [0, 1, 2, 3].some((p) => dp.counters(p).rxFrames > 0n));
    dp.close();
    await sending;
    expect(openFds()).toEqual(fds);
    expect(mem.mappings(), 'only the test\'s own mapping is left').toBe(1);
    expect(threads()).toBe(threadsBefore);
    dp.close(); // idempotent
    expect(() => dp.counters(0)).toThrow(MqtapError);
  });

  it('bad input is refused with ERR_INVALID_ARG before anything is mapped or started', () => {
    const mem = new GuestMem(`mqtap-vu-bad-${process.pid}-${seq++}`, 1 << 20);
    cleanup.push(() => mem.close());
    const r = new DriverRing(mem, 8, 256);
    cleanup.push(() => r.close());
    const fdsBefore = openFds();
    const dp = openDataPlane(1, { tapEngine });
    cleanup.push(() => dp.close());
    const region = { guestPhysAddr: GPA_BASE, size: 1n << 20n, userAddr: mem.ua, mmapOffset: 0n, fd: mem.fd };
    const bad = (f: () => void, msg: RegExp): void => {
      let err: unknown;
      try {
        f();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(MqtapError);
      expect((err as MqtapError).code).toBe('ERR_INVALID_ARG');
      expect((err as MqtapError).message).toMatch(msg);
    };
    bad(() => dp.addRegion({ ...region, size: 0n }), /empty/);
    bad(() => dp.addRegion({ ...region, size: 2n << 20n }), /past the end of its fd/);
    bad(() => dp.addRegion({ ...region, mmapOffset: 4096n }), /past the end of its fd/);
    expect(mem.mappings()).toBe(1);
    dp.addRegion({ ...region, size: 1n << 19n });
    bad(() => dp.addRegion({ ...region, size: 1n << 19n, mmapOffset: 1n << 19n, userAddr: mem.ua + (1n << 19n) }), /guest-physical .* overlaps/);
    bad(() => dp.addRegion({ ...region, size: 1n << 19n, mmapOffset: 1n << 19n, guestPhysAddr: GPA_BASE + (1n << 19n) }), /overlaps/);
    expect(mem.mappings()).toBe(2);
    bad(() => dp.startRing(0, 'tx', { ...r.config(), num: 12 }, feats()), /power of two/);
    bad(() => dp.startRing(0, 'tx', { ...r.config(), descAddr: r.config().descAddr + 8n }, feats()), /aligned/);
    bad(() => dp.startRing(0, 'tx', { ...r.config(), usedAddr: mem.ua + (1n << 20n) - 8n }, feats()), /not inside one mapped memory region/);
    bad(() => dp.startRing(0, 'tx', { ...r.config(), kickFd: -1 }, feats()), /kickFd/);
    bad(() => dp.startRing(1, 'tx', r.config(), feats()), /pair/);
    bad(() => dp.startRing(0, 'tx', r.config(), feats({ mrgRxbuf: true, vnetHdrSize: 10 })), /MRG_RXBUF/);
    expect(dp.ringStatus(0, 'tx').state).toBe('stopped');
    // The native layer refuses the same on its own (it never trusts its caller with memory).
    const raw = new native.VhostUserDataPlane(1);
    try {
      expect(() => raw.addRegion(GPA_BASE, 0n, mem.ua, 0n, mem.fd)).toThrow(expect.objectContaining({ op: 'VHOST_USER_ADD_MEM_REG', code: 'EINVAL' }));
      expect(() => raw.addRegion(GPA_BASE, 2n << 20n, mem.ua, 0n, mem.fd)).toThrow(expect.objectContaining({ op: 'VHOST_USER_ADD_MEM_REG', code: 'EINVAL' }));
      expect(() => raw.startRing(0, true, 12, mem.ua, mem.ua, mem.ua, 0, r.kick, -1, -1, false, false, false, 12)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
      expect(() => raw.startRing(0, true, 8, mem.ua, mem.ua + 256n, mem.ua + 512n, 0, r.kick, -1, -1, false, false, false, 12)).toThrow(expect.objectContaining({ code: 'EFAULT' }));
    } finally {
      raw.close();
    }
    // A running ring pins its region; stopped, the region goes.
    dp.startRing(0, 'tx', r.config(), feats());
    expect(() => dp.removeRegion(GPA_BASE)).toThrow(expect.objectContaining({ op: 'VHOST_USER_REM_MEM_REG', code: 'EBUSY', hint: expect.stringMatching(/stop its rings/) }));
    expect(() => dp.startRing(0, 'tx', r.config(), feats())).toThrow(expect.objectContaining({ op: 'VHOST_USER_START_RING', code: 'EBUSY', hint: expect.stringMatching(/stop it first/) }));
    expect(mem.mappings()).toBe(2);
    dp.stopRing(0, 'tx');
    dp.removeRegion(GPA_BASE);
    expect(mem.mappings()).toBe(1);
    dp.close();
    expect(openFds()).toEqual(fdsBefore);
  });
});
