/**
 * Split virtqueues over plain memory (no device, no root): the layout
 * arithmetic, and the driver side of SplitVirtqueue against a device played
 * by the test itself (FakeDevice reads the avail ring and descriptors and
 * writes used entries into the same ArrayBuffer from native.allocPages, as
 * the vhost worker would).
 */
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../lib/sys/errors.js';
import { native } from '../../lib/sys/native.js';
import { MAX_QUEUE_SIZE, SplitVirtqueue, vringLayout, type VringLayout } from '../../lib/vhost/vring.js';
import { catchError } from '../helpers/errors.js';
import { prng } from '../helpers/prng.js';

const VRING_DESC_F_WRITE = 2; // virtio spec 2.7.5

/**
 * The device side of one split virtqueue, written from the virtio spec (2.7)
 * independently of lib/vhost/vring.ts: it consumes published avail entries and
 * completes them (in any order) by writing used elements and the used index.
 */
class FakeDevice {
  readonly view: DataView;
  lastAvail: number;
  usedIdx: number;
  /** Heads taken from the avail ring and not yet completed. */
  readonly taken: Array<{ id: number; addr: bigint; len: number; flags: number; next: number }> = [];

  constructor(
    readonly mem: ArrayBuffer,
    readonly l: VringLayout,
    start = 0,
  ) {
    this.view = new DataView(mem);
    this.lastAvail = start;
    this.usedIdx = start;
  }

  availIdx(): number {
    return this.view.getUint16(this.l.availOffset + 2, true);
  }

  usedIdxInMemory(): number {
    return this.view.getUint16(this.l.usedOffset + 2, true);
  }

  /** Takes every published avail entry. */
  consume(): number {
    let n = 0;
    while (this.lastAvail !== this.availIdx()) {
      const id = this.view.getUint16(this.l.availOffset + 4 + 2 * (this.lastAvail % this.l.num), true);
      const d = this.l.descOffset + 16 * id;
      this.taken.push({ id, addr: this.view.getBigUint64(d, true), len: this.view.getUint32(d + 8, true), flags: this.view.getUint16(d + 12, true), next: this.view.getUint16(d + 14, true) });
      this.lastAvail = (this.lastAvail + 1) & 0xffff;
      n++;
    }
    return n;
  }

  /** Completes taken heads (by position in `taken`), writing used elements, then one used-index store. */
  complete(positions: number[], lenOf: (id: number) => number): Array<{ id: number; len: number }> {
    const done = positions.sort((a, b) => b - a).map((p) => this.taken.splice(p, 1)[0]!);
    const out: Array<{ id: number; len: number }> = [];
    for (const t of done) {
      const e = this.l.usedOffset + 4 + 8 * (this.usedIdx % this.l.num);
      const len = lenOf(t.id);
      this.view.setUint32(e, t.id, true);
      this.view.setUint32(e + 4, len, true);
      this.usedIdx = (this.usedIdx + 1) & 0xffff;
      out.push({ id: t.id, len });
    }
    this.view.setUint16(this.l.usedOffset + 2, this.usedIdx, true);
    return out;
  }

  /** Writes a raw used element and bumps the used index (for corruption tests). */
  forgeUsed(id: number, len: number, bump = 1): void {
    const e = this.l.usedOffset + 4 + 8 * (this.usedIdx % this.l.num);
    this.view.setUint32(e, id, true);
    this.view.setUint32(e + 4, len, true);
    this.usedIdx = (this.usedIdx + bump) & 0xffff;
    this.view.setUint16(this.l.usedOffset + 2, this.usedIdx, true);
  }
}

function queue(num: number, bufSize = 256, start = 0): { q: SplitVirtqueue; dev: FakeDevice; mem: ArrayBuffer; l: VringLayout } {
  const l = vringLayout(num, bufSize);
  const mem = native.allocPages(l.size);
  const q = new SplitVirtqueue(mem, l, { startIndex: start });
  return { q, dev: new FakeDevice(mem, l, start), mem, l };
}

describe('vringLayout', () => {
  it('places desc, avail, used and buffers as the spec sizes them (hand-computed)', () => {
    // desc 16*num (16-aligned), avail 6+2*num (2-aligned), used 6+8*num (4-aligned), buffers 64-aligned.
    expect(vringLayout(1, 64)).toEqual({ num: 1, bufSize: 64, descOffset: 0, availOffset: 16, usedOffset: 24, bufOffset: 64, size: 128 });
    expect(vringLayout(8, 2112)).toEqual({ num: 8, bufSize: 2112, descOffset: 0, availOffset: 128, usedOffset: 152, bufOffset: 256, size: 256 + 8 * 2112 });
    expect(vringLayout(256, 2112)).toEqual({ num: 256, bufSize: 2112, descOffset: 0, availOffset: 4096, usedOffset: 4616, bufOffset: 6720, size: 6720 + 256 * 2112 });
    expect(vringLayout(MAX_QUEUE_SIZE, 64)).toEqual({ num: 32768, bufSize: 64, descOffset: 0, availOffset: 524288, usedOffset: 589832, bufOffset: 852032, size: 852032 + 32768 * 64 });
  });

  it('starts at the next 16-byte boundary after base, and a second queue after the first does not overlap it', () => {
    expect(vringLayout(8, 64, 1)).toMatchObject({ descOffset: 16, availOffset: 144 });
    const rx = vringLayout(256, 2112, 0);
    const tx = vringLayout(256, 2112, rx.descOffset + rx.size);
    expect(tx.descOffset).toBe(rx.descOffset + rx.size);
    expect(tx.descOffset % 16).toBe(0);
  });

  it('keeps every alignment and order for every ring size and odd bases and buffer sizes', () => {
    const rnd = prng(7);
    for (let num = 1; num <= MAX_QUEUE_SIZE; num *= 2) {
      for (let k = 0; k < 4; k++) {
        const base = Math.floor(rnd() * 10_000);
        const bufSize = 64 + Math.floor(rnd() * 5000);
        const l = vringLayout(num, bufSize, base);
        expect(l.descOffset % 16).toBe(0);
        expect(l.descOffset).toBeGreaterThanOrEqual(base);
        expect(l.descOffset - base).toBeLessThan(16);
        expect(l.availOffset % 2).toBe(0);
        expect(l.usedOffset % 4).toBe(0);
        expect(l.bufOffset % 64).toBe(0);
        expect(l.availOffset).toBe(l.descOffset + 16 * num);
        expect(l.usedOffset).toBeGreaterThanOrEqual(l.availOffset + 6 + 2 * num);
        expect(l.usedOffset - (l.availOffset + 6 + 2 * num)).toBeLessThan(4);
        expect(l.bufOffset).toBeGreaterThanOrEqual(l.usedOffset + 6 + 8 * num);
        expect(l.descOffset + l.size).toBe(l.bufOffset + num * bufSize);
      }
    }
  });

  it('refuses ring sizes that are not powers of two from 1 to 32768, bad buffer sizes and bases', () => {
    for (const num of [0, 3, 6, 100, 32769, 65536, -8, 1.5, Number.NaN, '8' as unknown as number]) {
      const e = catchError(() => vringLayout(num, 256));
      expect(e.code).toBe(ErrorCodes.INVALID_ARG);
      expect(e.message).toMatch(/queue size must be a power of two from 1 to 32768/);
    }
    for (const bufSize of [0, 63, (1 << 20) + 1, 100.5]) expect(catchError(() => vringLayout(8, bufSize)).message).toMatch(/buffer size/);
    for (const base of [-1, 0.5]) expect(catchError(() => vringLayout(8, 64, base)).message).toMatch(/base offset/);
  });
});

describe('SplitVirtqueue over plain memory', () => {
  it('writes descriptors and avail entries, and makes them visible only on publish()', () => {
    const { q, dev, mem, l } = queue(8, 256);
    const base = native.addressOf(mem);
    expect(q.addresses()).toEqual({ descUserAddr: base, availUserAddr: base + BigInt(l.availOffset), usedUserAddr: base + BigInt(l.usedOffset) });
    expect([q.freeCount, q.inFlight, q.heldCount]).toEqual([8, 0, 0]);
    const a = q.alloc();
    const b = q.alloc();
    expect([a, b]).toEqual([0, 1]);
    expect(q.heldCount).toBe(2);
    q.add(a, 100, true);
    q.add(b, 256, false);
    expect(q.unpublished).toBe(2);
    expect(dev.consume()).toBe(0); // not published yet
    q.publish();
    expect(q.unpublished).toBe(0);
    expect(dev.consume()).toBe(2);
    expect(dev.taken).toEqual([
      { id: 0, addr: base + BigInt(l.bufOffset), len: 100, flags: VRING_DESC_F_WRITE, next: 0 },
      { id: 1, addr: base + BigInt(l.bufOffset + 256), len: 256, flags: 0, next: 0 },
    ]);
    expect([q.freeCount, q.inFlight, q.heldCount, q.availIndex]).toEqual([6, 2, 0, 2]);
  });

  it('buffer(id) is a view of the buffer the descriptor points at', () => {
    const { q, mem, l } = queue(4, 128);
    const id = q.alloc();
    q.buffer(id).write('hello', 0);
    expect(Buffer.from(mem, l.bufOffset + id * 128, 5).toString()).toBe('hello');
    expect(q.buffer(3).byteOffset).toBe(l.bufOffset + 3 * 128);
    expect(q.buffer(3).length).toBe(128);
  });

  it('collect() returns used elements in used-ring order, frees their ids, and honours max and keep', () => {
    const { q, dev } = queue(8);
    for (let i = 0; i < 5; i++) q.add(q.alloc(), 10 + i, true);
    q.publish();
    dev.consume();
    // The device completes out of order: ids 3, 0, 4.
    const done = dev.complete([3, 0, 4], (id) => 1000 + id);
    expect(done.map((d) => d.id)).toEqual([4, 3, 0]);
    expect(q.pending()).toBe(3);
    expect(q.collect(2)).toEqual([
      { id: 4, len: 1004 },
      { id: 3, len: 1003 },
    ]);
    expect(q.collect(Infinity, true)).toEqual([{ id: 0, len: 1000 }]);
    expect([q.freeCount, q.inFlight, q.heldCount]).toEqual([3 + 2, 2, 1]);
    // A kept id goes back to the device without alloc(), or back to the free list.
    q.add(0, 50, true);
    expect(q.inFlight).toBe(3);
    expect(q.collect()).toEqual([]);
  });

  it('accounts for every id: double add, add of a free id, bad releases, bad ids and lengths are refused', () => {
    const { q } = queue(4, 64);
    expect(catchError(() => q.add(0, 10, true)).message).toMatch(/descriptor 0 is free/);
    const id = q.alloc();
    expect(catchError(() => q.add(id, 65, true)).message).toMatch(/does not fit the 64-byte buffer/);
    expect(catchError(() => q.add(id, -1, true)).message).toMatch(/does not fit/);
    q.add(id, 64, true);
    expect(catchError(() => q.add(id, 10, true)).message).toMatch(/already with the device/);
    expect(catchError(() => q.release(id)).message).toMatch(/with the device/);
    const other = q.alloc();
    q.release(other);
    expect(catchError(() => q.release(other)).message).toMatch(/already free/);
    for (const bad of [-1, 4, 1.5]) expect(catchError(() => q.add(bad, 1, true)).message).toMatch(/not in 0\.\.3/);
    expect(catchError(() => q.buffer(4)).code).toBe(ErrorCodes.INVALID_ARG);
    expect([q.freeCount, q.inFlight, q.heldCount]).toEqual([3, 1, 0]);
  });

  it('alloc() returns -1 when every id is taken, and ids come back after completion', () => {
    const { q, dev } = queue(4);
    const ids = [q.alloc(), q.alloc(), q.alloc(), q.alloc()];
    expect(new Set(ids).size).toBe(4);
    expect(q.alloc()).toBe(-1);
    for (const id of ids) q.add(id, 1, false);
    q.publish();
    dev.consume();
    dev.complete([0, 1, 2, 3], () => 0);
    expect(q.collect()).toHaveLength(4);
    expect(q.freeCount).toBe(4);
  });

  it('refuses a used ring that makes no sense: unknown ids, ids not in flight, an index too far ahead', () => {
    {
      const { q, dev } = queue(4);
      q.add(q.alloc(), 1, true);
      q.publish();
      dev.forgeUsed(7, 0);
      expect(() => q.collect()).toThrow(/descriptor id 7 beyond the ring/);
    }
    {
      const { q, dev } = queue(4);
      q.add(q.alloc(), 1, true); // id 0 in flight
      q.publish();
      dev.forgeUsed(2, 0); // id 2 is free
      expect(() => q.collect()).toThrow(/id 2, which it does not hold/);
    }
    {
      const { q, dev } = queue(4);
      q.add(q.alloc(), 1, true);
      q.publish();
      dev.forgeUsed(0, 0, 3);
      expect(() => q.collect()).toThrow(/3 ahead of the last one seen .* only 1 buffer/);
      expect(q.inFlight).toBe(1); // nothing was taken
    }
  });

  it('starts from startIndex: avail and used indices in memory, and the device sees entries from there', () => {
    const { q, dev } = queue(8, 64, 65534);
    expect(dev.availIdx()).toBe(65534);
    expect(dev.usedIdxInMemory()).toBe(65534);
    for (let i = 0; i < 4; i++) q.add(q.alloc(), i + 1, true);
    q.publish();
    expect(dev.availIdx()).toBe(2); // 65534 + 4 wrapped
    expect(dev.consume()).toBe(4);
    expect(dev.taken.map((t) => t.len)).toEqual([1, 2, 3, 4]);
    dev.complete([0, 1, 2, 3], (id) => id);
    expect(q.collect().map((u) => u.len)).toEqual([3, 2, 1, 0]);
    expect(q.lastUsedIndex).toBe(2);
    expect(catchError(() => queue(8, 64, 65536)).message).toMatch(/startIndex must be 0\.\.65535/);
  });

  it('survives the 16-bit indices wrapping past 65535 many times, with out-of-order completion and exact accounting', () => {
    const rnd = prng(42);
    const { q, dev } = queue(4, 64);
    let added = 0;
    let collected = 0;
    const problems: string[] = [];
    const outstanding = new Map<number, number>(); // id -> len the device reported
    for (let round = 0; added < 4 * 65536 + 123; round++) {
      // Driver: post some of the free buffers (usually all).
      const n = rnd() < 0.8 ? q.freeCount : Math.floor(rnd() * (q.freeCount + 1));
      for (let i = 0; i < n; i++) {
        q.add(q.alloc(), 1 + Math.floor(rnd() * 64), rnd() < 0.5);
        added++;
      }
      if (n) q.publish();
      dev.consume();
      // Device: complete a random subset of what it holds, in a random order.
      const positions = dev.taken.map((_, i) => i).filter(() => rnd() < 0.7);
      for (const u of dev.complete(positions, () => Math.floor(rnd() * 64))) outstanding.set(u.id, u.len);
      for (const u of q.collect(rnd() < 0.2 ? 1 : Infinity)) {
        if (outstanding.get(u.id) !== u.len) problems.push(`round ${round}: id ${u.id} len ${u.len}, device said ${outstanding.get(u.id)}`);
        outstanding.delete(u.id);
        collected++;
      }
      if (q.freeCount + q.inFlight + q.heldCount !== 4 || q.inFlight !== added - collected)
        problems.push(`round ${round}: free ${q.freeCount} inFlight ${q.inFlight} held ${q.heldCount}, added ${added} collected ${collected}`);
      if (problems.length > 5) break;
    }
    expect(problems).toEqual([]);
    expect(added).toBeGreaterThan(3 * 65536); // wrapped at least three times
    expect(q.availIndex).toBe(added & 0xffff);
    expect(dev.availIdx()).toBe(added & 0xffff);
    // Drain: everything comes back, nothing is lost or duplicated.
    dev.consume();
    dev.complete(dev.taken.map((_, i) => i), () => 0);
    collected += q.collect().length;
    expect(collected).toBe(added);
    expect([q.freeCount, q.inFlight, q.heldCount]).toEqual([4, 0, 0]);
    expect(q.lastUsedIndex).toBe(added & 0xffff);
  });

  it('refuses memory that is not an ArrayBuffer or too small for the layout', () => {
    const l = vringLayout(8, 256);
    expect(catchError(() => new SplitVirtqueue(native.allocPages(l.size - 1), vringLayout(8, 256, 4096))).message).toMatch(/does not fit its memory/);
    expect(catchError(() => new SplitVirtqueue(new Uint8Array(l.size) as unknown as ArrayBuffer, l)).message).toMatch(/must be an ArrayBuffer/);
  });
});
