/**
 * Split virtqueues in process memory (virtio 1.x, section 2.7), driven from
 * TypeScript.  The memory is a page-aligned ArrayBuffer from the addon
 * (allocPages), so it has a stable address the vhost worker can use; the
 * ring logic — descriptors, avail and used indices — is all here.
 *
 * Layout of one queue of size `num` (a power of two):
 *   desc  : num * 16 bytes          { addr u64, len u32, flags u16, next u16 }
 *   avail : 6 + 2*num bytes          { flags u16, idx u16, ring[num] u16, used_event u16 }
 *   used  : 6 + 8*num bytes, 4-aligned { flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16 }
 *   bufs  : num * bufSize bytes      descriptor i always points at buffer i
 *
 * Ordering: ring entries are written before the index that publishes them,
 * and the index is written with Atomics.store (a sequentially consistent
 * store), so the device never sees an index ahead of its entries.
 */
import { invalidArg } from './errors';
import { K, native } from './native';

export const VRING_DESC_SIZE = 16;
export const MAX_QUEUE_SIZE = 32768;

export interface VringLayout {
  num: number;
  bufSize: number;
  descOffset: number;
  availOffset: number;
  usedOffset: number;
  bufOffset: number;
  /** Bytes this queue occupies, from descOffset. */
  size: number;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Where each part of a queue of `num` entries with `bufSize`-byte buffers sits, from `base`. */
export function vringLayout(num: number, bufSize: number, base = 0): VringLayout {
  if (!Number.isInteger(num) || num < 1 || num > MAX_QUEUE_SIZE || (num & (num - 1)) !== 0)
    throw invalidArg(`queue size must be a power of two from 1 to ${MAX_QUEUE_SIZE} (got ${num})`);
  if (!Number.isInteger(bufSize) || bufSize < 64 || bufSize > 1 << 20) throw invalidArg(`buffer size must be 64 bytes to 1 MiB (got ${bufSize})`);
  const descOffset = alignUp(base, 16);
  const availOffset = descOffset + num * VRING_DESC_SIZE;
  const usedOffset = alignUp(availOffset + 6 + 2 * num, 4);
  const bufOffset = alignUp(usedOffset + 6 + 8 * num, 64);
  const end = bufOffset + num * bufSize;
  return { num, bufSize, descOffset, availOffset, usedOffset, bufOffset, size: end - descOffset };
}

export interface UsedElem {
  /** Descriptor (= buffer) id. */
  id: number;
  /** Bytes the device wrote into it (device-writable buffers) or 0. */
  len: number;
}

/** One split virtqueue over a region of `mem`. */
export class SplitVirtqueue {
  readonly layout: VringLayout;
  readonly mem: ArrayBuffer;
  readonly #view: DataView;
  readonly #availIdx: Uint16Array;
  readonly #usedIdx: Uint16Array;
  readonly #base: bigint;
  #availShadow = 0;
  #lastUsed = 0;
  readonly #free: number[] = [];
  #inFlight = 0;

  constructor(mem: ArrayBuffer, layout: VringLayout) {
    if (layout.descOffset + layout.size > mem.byteLength) throw invalidArg('vring layout does not fit its memory');
    this.mem = mem;
    this.layout = layout;
    this.#view = new DataView(mem);
    this.#availIdx = new Uint16Array(mem, layout.availOffset + 2, 1);
    this.#usedIdx = new Uint16Array(mem, layout.usedOffset + 2, 1);
    this.#base = native.addressOf(mem);
    for (let i = layout.num - 1; i >= 0; i--) this.#free.push(i);
  }

  /** Process addresses for VHOST_SET_VRING_ADDR. */
  addresses(): { descUserAddr: bigint; availUserAddr: bigint; usedUserAddr: bigint } {
    return {
      descUserAddr: this.#base + BigInt(this.layout.descOffset),
      availUserAddr: this.#base + BigInt(this.layout.availOffset),
      usedUserAddr: this.#base + BigInt(this.layout.usedOffset),
    };
  }

  /** Buffer `id` as a Buffer view (no copy). */
  buffer(id: number): Buffer {
    return Buffer.from(this.mem, this.layout.bufOffset + id * this.layout.bufSize, this.layout.bufSize);
  }

  get freeCount(): number {
    return this.#free.length;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  /** Takes a free descriptor id, or -1 when the ring is full. */
  alloc(): number {
    return this.#free.pop() ?? -1;
  }

  /**
   * Points descriptor `id` at `len` bytes of its buffer and puts it in the
   * avail ring (not yet published: call publish()).  `writable` marks a
   * buffer the device fills (RX); otherwise the device reads it (TX).
   */
  add(id: number, len: number, writable: boolean): void {
    if (len < 0 || len > this.layout.bufSize) throw invalidArg(`descriptor length ${len} exceeds the ${this.layout.bufSize}-byte buffer`);
    const d = this.layout.descOffset + id * VRING_DESC_SIZE;
    this.#view.setBigUint64(d, this.#base + BigInt(this.layout.bufOffset + id * this.layout.bufSize), true);
    this.#view.setUint32(d + 8, len, true);
    this.#view.setUint16(d + 12, writable ? K.VRING_DESC_F_WRITE : 0, true);
    this.#view.setUint16(d + 14, 0, true);
    this.#view.setUint16(this.layout.availOffset + 4 + 2 * (this.#availShadow % this.layout.num), id, true);
    this.#availShadow = (this.#availShadow + 1) & 0xffff;
    this.#inFlight++;
  }

  /** Makes everything add()ed visible to the device (one index store). */
  publish(): void {
    Atomics.store(this.#availIdx, 0, this.#availShadow);
  }

  /** Used elements the device returned since the last call; their ids become free again unless `keep`. */
  collect(max = Infinity, keep = false): UsedElem[] {
    const out: UsedElem[] = [];
    const usedIdx = Atomics.load(this.#usedIdx, 0);
    while (this.#lastUsed !== usedIdx && out.length < max) {
      const e = this.layout.usedOffset + 4 + 8 * (this.#lastUsed % this.layout.num);
      const id = this.#view.getUint32(e, true);
      const len = this.#view.getUint32(e + 4, true);
      if (id >= this.layout.num) throw new RangeError(`device returned descriptor id ${id} beyond the ring (${this.layout.num})`);
      out.push({ id, len });
      this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
      this.#inFlight--;
      if (!keep) this.#free.push(id);
    }
    return out;
  }

  /** Returns an id taken with alloc() (or kept by collect) to the free list. */
  release(id: number): void {
    this.#free.push(id);
  }

  /** The avail index the device should start from (VHOST_SET_VRING_BASE). */
  get availIndex(): number {
    return this.#availShadow;
  }
}
