/**
 * The native descriptor-chain walker (native/vhost_user.cc) fed random guest
 * rings (fast-check): random descriptor tables (addresses inside, across and
 * outside guest memory, huge lengths, random flags and next indices, loops,
 * indirect tables), random avail entries and avail index jumps, in a memfd
 * mapped as QEMU maps guest memory.  No tap is attached (pair without a tap:
 * frames are walked, dropped and counted), so this needs no privileges.
 *
 * For every ring, whatever it holds:
 *  - the process survives (a read or write outside guest memory would crash
 *    it, or be reported by `npm run test:asan`);
 *  - the ring either keeps running with every published entry completed, in
 *    order, with ids < num — or stops as 'failed' with a reason and its err
 *    eventfd signalled; it never hangs with work pending;
 *  - the data plane writes nothing in guest memory but the used ring and
 *    avail_event (TX buffers are device-readable);
 *  - stopRing's lastAvailIdx is what GET_VRING_BASE must answer.
 *
 * Seed and run count: test/helpers/fuzz.ts (`npm run fuzz -- --runs N`).
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../lib/sys/native';
import { openDataPlane, type NativeDataPlane } from '../../lib/vhost-user/dataplane';
import { fuzzParams, fuzzTimeout } from '../helpers/fuzz';
import { DriverRing, F_INDIRECT, F_NEXT, F_WRITE, GPA_BASE, GuestMem } from '../helpers/vu-driver';

const MEM = 256 << 10;
const P = fuzzParams(150);

interface Desc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** Addresses a hostile guest would try: inside, at and across the borders of its memory, and far outside. */
function addrArb(mem: number): fc.Arbitrary<bigint> {
  const g = (n: bigint): bigint => (GPA_BASE + n) & ((1n << 64n) - 1n);
  return fc.oneof(
    fc.integer({ min: 0, max: mem - 1 }).map((o) => g(BigInt(o))),
    fc.constantFrom(g(0n), g(BigInt(mem) - 1n), g(BigInt(mem)), g(BigInt(mem / 2) - 8n), GPA_BASE - 1n, 0n, (1n << 64n) - 1n, (1n << 63n)),
    fc.bigUintN(64),
  );
}

const lenArb = fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.constantFrom(0, 11, 12, 13, 0xffff, 0x10000, 0x7fffffff, 0xffffffff), fc.nat());
const flagsArb = fc.oneof(fc.constantFrom(0, F_NEXT, F_WRITE, F_INDIRECT, F_NEXT | F_INDIRECT, F_NEXT | F_WRITE), fc.integer({ min: 0, max: 0xffff }));

function descArb(num: number, mem: number): fc.Arbitrary<Desc> {
  return fc.record({
    addr: addrArb(mem),
    len: lenArb,
    flags: flagsArb,
    next: fc.oneof(fc.integer({ min: 0, max: num - 1 }), fc.integer({ min: 0, max: 0xffff })),
  });
}

/** A ring case: size, descriptor table, indirect tables placed in guest memory, avail entries and index. */
const caseArb = fc
  .record({
    log2: fc.integer({ min: 0, max: 6 }),
    indirect: fc.boolean(),
    eventIdx: fc.boolean(),
    base: fc.integer({ min: 0, max: 0xffff }),
  })
  .chain(({ log2, indirect, eventIdx, base }) => {
    const num = 1 << log2;
    return fc.record({
      num: fc.constant(num),
      indirect: fc.constant(indirect),
      eventIdx: fc.constant(eventIdx),
      base: fc.constant(base),
      descs: fc.array(descArb(num, MEM), { minLength: num, maxLength: num }),
      /** Indirect tables written into guest memory (their descriptors may point anywhere). */
      tables: fc.array(fc.array(descArb(16, MEM), { minLength: 1, maxLength: 16 }), { maxLength: 3 }),
      heads: fc.array(fc.oneof(fc.integer({ min: 0, max: num - 1 }), fc.integer({ min: 0, max: 0xffff })), { maxLength: 2 * num + 2 }),
      /** How far the avail index moves past base: normally heads.length, sometimes an arbitrary jump. */
      jump: fc.option(fc.integer({ min: 0, max: 0xffff }), { freq: 4 }),
    });
  });

describe('vhost-user descriptor-chain walker under random rings (native/vhost_user.cc)', () => {
  let dp: NativeDataPlane;
  let seq = 0;

  beforeAll(() => {
    dp = openDataPlane(1);
  });
  afterAll(() => {
    dp?.close();
  });

  it('every ring completes in order or fails with a reason; nothing but the used ring is written; no hang', async () => {
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        // Fresh guest memory per case (two regions), filled with a pattern the device must leave alone.
        const mem = new GuestMem(`mqtap-vu-fuzz-${process.pid}-${seq++}`, MEM);
        const regions = mem.regions();
        for (const reg of regions) dp.addRegion(reg);
        mem.u8.fill(0xa5);
        const r = new DriverRing(mem, c.num, 64);
        // What each avail slot holds once the heads are written (later heads overwrite earlier ones).
        const slots: number[] = Array.from({ length: c.num }, () => 0xa5a5);
        try {
          r.availIdx = c.base;
          r.setAvailIdx(c.base);
          new Uint16Array(mem.buf, r.usedOff + 2, 1)[0] = c.base; // QEMU sets used.idx = base on (re)start
          r.lastUsed = c.base;
          // Indirect tables somewhere in the free part of guest memory.
          let at = r.bufOff;
          const tableAddrs: bigint[] = [];
          for (const t of c.tables) {
            for (const [i, d] of t.entries()) r.setDesc(i, d.addr, d.len, d.flags, d.next, at);
            tableAddrs.push(mem.gpa(at));
            at += 16 * t.length;
          }
          c.descs.forEach((d, i) => {
            // Half of the indirect descriptors point at a real table (with its real length).
            const real = (d.flags & F_INDIRECT) !== 0 && tableAddrs.length > 0 && i % 2 === 0;
            const t = i % Math.max(1, tableAddrs.length);
            r.setDesc(i, real ? tableAddrs[t]! : d.addr, real ? 16 * c.tables[t]!.length : d.len, d.flags, d.next);
          });
          for (const [k, h] of c.heads.entries()) {
            mem.view.setUint16(r.availOff + 4 + 2 * ((c.base + k) % c.num), h, true);
            slots[(c.base + k) % c.num] = h;
          }
          const published = c.jump ?? c.heads.length;
          const before = Buffer.from(mem.u8);

          dp.startRing(0, 'tx', r.config(c.base), { eventIdx: c.eventIdx, mrgRxbuf: false, indirectDesc: c.indirect, vnetHdrSize: 12 });
          r.setAvailIdx(c.base + published);
          native.eventfdWrite(r.kick);

          const done = (): boolean => dp.ringStatus(0, 'tx').state === 'failed' || ((r.usedIdx() - c.base) & 0xffff) === published;
          const end = Date.now() + 5_000;
          while (!done() && Date.now() < end) await new Promise((res) => setTimeout(res, 1));
          const finished = done();
          const st = dp.stopRing(0, 'tx');

          expect(finished, `hung: state ${st.state}, used ${r.usedIdx()} of ${c.base}+${published}`).toBe(true);
          if (st.state === 'failed') {
            expect(st.reason, 'a failed ring says why').toMatch(/\S/);
            expect(native.eventfdRead(r.err), 'err eventfd signalled').toBeGreaterThanOrEqual(1n);
            expect(native.eventfdRead(dp.notifyFd)).toBeGreaterThanOrEqual(1n);
          } else {
            expect(published, 'a jump past the ring size must fail the ring').toBeLessThanOrEqual(c.num);
            expect(st.lastAvailIdx).toBe((c.base + published) & 0xffff);
          }
          // Completed entries: in order, ids < num, and exactly the heads published.
          const used = r.collect();
          used.forEach((u, k) => {
            expect(u.id).toBeLessThan(c.num);
            expect(u.id).toBe(slots[(c.base + k) % c.num]);
          });
          expect((st.lastAvailIdx - c.base) & 0xffff).toBeGreaterThanOrEqual(used.length);
          // The device wrote only its own parts of the used ring (flags, idx, entries, avail_event).
          const usedStart = r.usedOff;
          const usedEnd = r.usedOff + 6 + 8 * c.num;
          for (let i = 0; i < MEM; i++) {
            if (i === r.availOff + 2 || i === r.availOff + 3) continue; // avail.idx: the driver's own write above
            if (mem.u8[i] !== before[i] && (i < usedStart || i >= usedEnd)) throw new Error(`guest memory written at offset ${i} (outside the used ring)`);
          }
        } finally {
          try {
            dp.stopRing(0, 'tx');
          } catch {
            /* already stopped */
          }
          while (native.eventfdRead(dp.notifyFd) !== null); // drain: the next case starts clean
          r.close();
          for (const reg of regions) dp.removeRegion(reg.guestPhysAddr);
          mem.close();
        }
      }),
      P,
    );
  }, fuzzTimeout(40));
});
