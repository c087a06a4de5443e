/**
 * Split virtqueues in process memory (virtio 1.x, section 2.7), driven from
 * TypeScript.  The memory is a page-aligned ArrayBuffer from the addon
 * (allocPages), so it has a stable address the vhost worker can use; the
 * ring logic — descriptors, avail and used indices — is all here.
 *
 * Layout of one queue of size `num` (a power of two):
 *   desc  : num * 16 bytes, 16-aligned { addr u64, len u32, flags u16, next u16 }
 *   avail : 6 + 2*num bytes, 2-aligned { flags u16, idx u16, ring[num] u16, used_event u16 }
 *   used  : 6 + 8*num bytes, 4-aligned { flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16 }
 *   bufs  : num * bufSize bytes, 64-aligned; descriptor i always points at buffer i
 * (the alignments are what VHOST_SET_VRING_ADDR checks: 16, 2 and 4).
 *
 * The avail and used indices are free-running 16-bit counters: slot =
 * index % num, which stays consistent across the wrap at 65536 because num
 * divides 65536.
 *
 * Ordering: ring entries are written before the index that publishes them,
 * and the index is written with Atomics.store (a sequentially consistent
 * store), so the device never sees an index ahead of its entries; the used
 * index is read with Atomics.load before the entries it covers.
 *
 * Descriptor ids have an owner at every moment: free (in the free list),
 * the driver's (alloc()ed, or collected with `keep`), or the device's (add()ed
 * and not yet returned in the used ring).  Every transition is checked, so an
 * id can neither be lost nor handed to the device twice.
 */
import { invalidArg } from '../sys/errors';
import { K, native } from '../sys/native';

/** struct vring_desc / vring_used_elem sizes, from <linux/virtio_ring.h>. */
const VRING_DESC_SIZE = K.SIZEOF_VRING_DESC;
const VRING_USED_ELEM_SIZE = K.SIZEOF_VRING_USED_ELEM;
/** vhost accepts ring sizes up to 32768 (powers of two <= 0xffff). */
export const MAX_QUEUE_SIZE = 32768;
const MIN_BUF_SIZE = 64;
const MAX_BUF_SIZE = 1 << 20;

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
    throw invalidArg(`queue size must be a power of two from 1 to ${MAX_QUEUE_SIZE} (got ${String(num)})`);
  if (!Number.isInteger(bufSize) || bufSize < MIN_BUF_SIZE || bufSize > MAX_BUF_SIZE)
    throw invalidArg(`buffer size must be an integer from ${MIN_BUF_SIZE} bytes to 1 MiB (got ${String(bufSize)})`);
  if (!Number.isSafeInteger(base) || base < 0) throw invalidArg(`vring base offset must be a non-negative integer (got ${String(base)})`);
  const descOffset = alignUp(base, 16);
  const availOffset = descOffset + num * VRING_DESC_SIZE;
  const usedOffset = alignUp(availOffset + 6 + 2 * num, 4);
  const bufOffset = alignUp(usedOffset + 6 + VRING_USED_ELEM_SIZE * num, 64);
  const end = bufOffset + num * bufSize;
  return { num, bufSize, descOffset, availOffset, usedOffset, bufOffset, size: end - descOffset };
}

export interface UsedElem {
  /** Descriptor (= buffer) id. */
  id: number;
  /** Bytes the device wrote into it (device-writable buffers) or 0. */
  len: number;
}

const FREE = 0;
const DRIVER = 1;
const DEVICE = 2;

export interface SplitVirtqueueOptions {
  /**
   * The avail and used index to start from (0..65535): what VHOST_SET_VRING_BASE
   * gets, and written as the used index (the device reads it when its backend
   * is bound).  Default 0.
   */
  startIndex?: number;
}

/** One split virtqueue over a region of `mem`. */
export class SplitVirtqueue {
  readonly layout: VringLayout;
  readonly mem: ArrayBuffer;
  readonly startIndex: number;
  readonly #view: DataView;
  readonly #availIdx: Uint16Array;
  readonly #usedIdx: Uint16Array;
  readonly #base: bigint;
  #availShadow: number;
  #lastUsed: number;
  readonly #free: number[] = [];
  /** Per id: FREE, DRIVER or DEVICE. */
  readonly #owner: Uint8Array;
  #inFlight = 0;

  constructor(mem: ArrayBuffer, layout: VringLayout, opts: SplitVirtqueueOptions = {}) {
    if (!(mem instanceof ArrayBuffer)) throw invalidArg('vring memory must be an ArrayBuffer (from allocPages)');
    if (layout.descOffset + layout.size > mem.byteLength) throw invalidArg('vring layout does not fit its memory');
    const start = opts.startIndex ?? 0;
    if (!Number.isInteger(start) || start < 0 || start > 0xffff) throw invalidArg(`startIndex must be 0..65535 (got ${String(start)})`);
    this.mem = mem;
    this.layout = layout;
    this.startIndex = start;
    this.#view = new DataView(mem);
    this.#availIdx = new Uint16Array(mem, layout.availOffset + 2, 1);
    this.#usedIdx = new Uint16Array(mem, layout.usedOffset + 2, 1);
    this.#base = native.addressOf(mem);
    this.#owner = new Uint8Array(layout.num);
    for (let i = layout.num - 1; i >= 0; i--) this.#free.push(i);
    this.#availShadow = start;
    this.#lastUsed = start;
    Atomics.store(this.#availIdx, 0, start);
    Atomics.store(this.#usedIdx, 0, start);
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
    this.#checkId(id);
    return Buffer.from(this.mem, this.layout.bufOffset + id * this.layout.bufSize, this.layout.bufSize);
  }

  /** Ids in the free list. */
  get freeCount(): number {
    return this.#free.length;
  }

  /** Ids the device holds (add()ed, not yet collected). */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Ids the driver holds (alloc()ed or kept, not add()ed or released). */
  get heldCount(): number {
    return this.layout.num - this.#free.length - this.#inFlight;
  }

  /** Takes a free descriptor id, or -1 when none is free. */
  alloc(): number {
    const id = this.#free.pop();
    if (id === undefined) return -1;
    this.#owner[id] = DRIVER;
    return id;
  }

  /**
   * Points descriptor `id` (alloc()ed, or kept by collect) at the first `len`
   * bytes of its buffer and puts it in the avail ring (not yet visible: call
   * publish()).  `writable` marks a buffer the device fills (RX); otherwise
   * the device reads it (TX).
   */
  add(id: number, len: number, writable: boolean): void {
    this.#checkId(id);
    if (this.#owner[id] !== DRIVER) throw invalidArg(`descriptor ${id} is ${this.#owner[id] === FREE ? 'free (alloc() it first)' : 'already with the device'}`);
    if (!Number.isInteger(len) || len < 0 || len > this.layout.bufSize) throw invalidArg(`descriptor length ${String(len)} does not fit the ${this.layout.bufSize}-byte buffer`);
    const d = this.layout.descOffset + id * VRING_DESC_SIZE;
    this.#view.setBigUint64(d, this.#base + BigInt(this.layout.bufOffset + id * this.layout.bufSize), true);
    this.#view.setUint32(d + 8, len, true);
    this.#view.setUint16(d + 12, writable ? K.VRING_DESC_F_WRITE : 0, true);
    this.#view.setUint16(d + 14, 0, true);
    this.#view.setUint16(this.layout.availOffset + 4 + 2 * (this.#availShadow % this.layout.num), id, true);
    this.#availShadow = (this.#availShadow + 1) & 0xffff;
    this.#owner[id] = DEVICE;
    this.#inFlight++;
  }

  /** Makes everything add()ed visible to the device (one index store). */
  publish(): void {
    Atomics.store(this.#availIdx, 0, this.#availShadow);
  }

  /** Ids add()ed but not yet publish()ed. */
  get unpublished(): number {
    return (this.#availShadow - Atomics.load(this.#availIdx, 0)) & 0xffff;
  }

  /** Used elements the device has returned but collect() has not taken yet. */
  pending(): number {
    return (Atomics.load(this.#usedIdx, 0) - this.#lastUsed) & 0xffff;
  }

  /**
   * Used elements the device returned since the last call (at most `max`);
   * their ids become free again, or stay the driver's with `keep` (to be
   * add()ed again or release()d).  Throws a RangeError (and takes nothing)
   * when the used ring makes no sense: more entries than buffers in flight,
   * or an id the device does not hold.
   */
  collect(max = Infinity, keep = false): UsedElem[] {
    const out: UsedElem[] = [];
    const usedIdx = Atomics.load(this.#usedIdx, 0);
    const ready = (usedIdx - this.#lastUsed) & 0xffff;
    if (ready > this.#inFlight)
      throw new RangeError(`used index ${usedIdx} is ${ready} ahead of the last one seen (${this.#lastUsed}) but only ${this.#inFlight} buffer(s) are with the device`);
    while (this.#lastUsed !== usedIdx && out.length < max) {
      const e = this.layout.usedOffset + 4 + VRING_USED_ELEM_SIZE * (this.#lastUsed % this.layout.num);
      const id = this.#view.getUint32(e, true);
      const len = this.#view.getUint32(e + 4, true);
      if (id >= this.layout.num) throw new RangeError(`device returned descriptor id ${id} beyond the ring (${this.layout.num})`);
      if (this.#owner[id] !== DEVICE) throw new RangeError(`device returned descriptor id ${id}, which it does not hold`);
      out.push({ id, len });
      this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
      this.#inFlight--;
      if (keep) this.#owner[id] = DRIVER;
      else {
        this.#owner[id] = FREE;
        this.#free.push(id);
      }
    }
    return out;
  }

  /** Returns an id the driver holds (alloc()ed, or kept by collect) to the free list. */
  release(id: number): void {
    this.#checkId(id);
    if (this.#owner[id] !== DRIVER) throw invalidArg(`descriptor ${id} is ${this.#owner[id] === FREE ? 'already free' : 'with the device'}; only held ids can be released`);
    this.#owner[id] = FREE;
    this.#free.push(id);
  }

  /** The next avail index the driver will publish (free-running, 16 bits). */
  get availIndex(): number {
    return this.#availShadow;
  }

  /** The used index up to which collect() has taken entries. */
  get lastUsedIndex(): number {
    return this.#lastUsed;
  }

  #checkId(id: number): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.layout.num) throw invalidArg(`descriptor id ${String(id)} is not in 0..${this.layout.num - 1}`);
  }
}
