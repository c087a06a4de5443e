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
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames.js';
import { getLink } from '../../lib/tap/links.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import type { DataPlaneFeatures } from '../../lib/vhost-user/dataplane-api.js';
import { openDataPlane, type NativeDataPlane } from '../../lib/vhost-user/dataplane.js';
import { run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { DriverRing, F_WRITE, GuestMem } from '../helpers/vu-driver.js';

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

async function bindUdp(address: string): Promise<dgram.Socket> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.bind(0, address, () => {
      s.off('error', reject);
      resolve();
    });
  });
  return s;
}

function send(s: dgram.Socket, payload: Buffer, port: number): Promise<void> {
  return new Promise((resolve, reject) => s.send(payload, port, PEER, (err) => (err ? reject(err) : resolve())));
}

describe.skipIf(!env.ok)(`vhost-user data plane${skipNote(env)}`, () => {
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
    const dp = openDataPlane(PAIRS);
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

  describe.each([
    { what: 'EVENT_IDX off', eventIdx: false },
    { what: 'EVENT_IDX on', eventIdx: true },
  ])('$what', ({ eventIdx }) => {
    it('TX: frames from 4 pairs reach the kernel byte-exact, counted by the kernel and by counters()', async () => {
      const { tap, dp, mem } = setup();
      const s = await bindUdp(LOCAL);
      cleanup.push(() => s.close());
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
    });

    it('RX: datagrams to the peer land in the 4 pairs\' RX rings byte-exact, each exactly once', async () => {
      const { dp, mem } = setup();
      const rings: DriverRing[] = [];
      for (let p = 0; p < PAIRS; p++) {
        const r = ring(mem, 128);
        rings.push(r);
        postRx(r);
        dp.startRing(p, 'rx', r.config(), feats({ eventIdx }));
      }
      const s = await bindUdp(LOCAL);
      cleanup.push(() => s.close());
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
});
