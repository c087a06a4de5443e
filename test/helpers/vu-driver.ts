/**
 * A tiny vhost-user *frontend* for tests: guest memory in a memfd (mapped
 * here with MAP_SHARED, as QEMU maps it) and split virtqueues the test fills
 * by hand, so it can also write malformed rings on purpose.
 *
 * Address spaces are kept apart on purpose, as in QEMU: descriptor addresses
 * are guest-physical (GPA_BASE + offset), ring addresses are this process's
 * virtual addresses of the test's own mapping ("QEMU virtual").  The memory
 * is handed to the data plane as two regions (split in the middle) so that
 * ranges crossing a region border are exercised.
 */
import { readFileSync } from 'node:fs';
import { native } from '../../lib/sys/native.js';
import type { MemRegion, RingConfig } from '../../lib/vhost-user/dataplane-api.js';

export const GPA_BASE = 0x4000_0000n;
export const F_NEXT = 1;
export const F_WRITE = 2;
export const F_INDIRECT = 4;

export class GuestMem {
  readonly fd: number;
  readonly name: string;
  readonly buf: ArrayBuffer;
  readonly u8: Uint8Array;
  readonly view: DataView;
  readonly ua: bigint;
  readonly size: number;
  #next = 0;

  constructor(name: string, size = 4 << 20) {
    this.name = name;
    this.size = size;
    this.fd = native.memfdCreate(name);
    native.ftruncate(this.fd, size);
    this.buf = native.mmapShared(this.fd, size, 0);
    this.u8 = new Uint8Array(this.buf);
    this.view = new DataView(this.buf);
    this.ua = native.addressOf(this.buf);
  }

  /** Bump allocation (never freed); returns the offset. */
  alloc(len: number, align = 64): number {
    const off = Math.ceil(this.#next / align) * align;
    if (off + len > this.size) throw new Error('guest memory exhausted');
    this.#next = off + len;
    return off;
  }

  gpa(off: number): bigint {
    return GPA_BASE + BigInt(off);
  }

  uaOf(off: number): bigint {
    return this.ua + BigInt(off);
  }

  /** The memory as two regions split at `split` bytes (page multiple). */
  regions(split = this.size / 2): MemRegion[] {
    return [
      { guestPhysAddr: GPA_BASE, size: BigInt(split), userAddr: this.ua, mmapOffset: 0n, fd: this.fd },
      { guestPhysAddr: GPA_BASE + BigInt(split), size: BigInt(this.size - split), userAddr: this.ua + BigInt(split), mmapOffset: BigInt(split), fd: this.fd },
    ];
  }

  /** Lines of /proc/self/maps that map this memfd. */
  mappings(): number {
    return countMappings(this.name);
  }

  close(): void {
    native.close(this.fd);
  }
}

export function countMappings(name: string): number {
  const text = readFileSync('/proc/self/maps', 'utf8');
  return text.split('\n').filter((l) => l.includes(`/memfd:${name} `) || l.endsWith(`/memfd:${name}`)).length;
}

/** One split virtqueue in guest memory, driven from the test. */
export class DriverRing {
  readonly mem: GuestMem;
  readonly num: number;
  readonly descOff: number;
  readonly availOff: number;
  readonly usedOff: number;
  readonly kick: number;
  readonly call: number;
  readonly err: number;
  readonly bufOff: number;
  readonly bufSize: number;
  readonly #availIdx: Uint16Array;
  readonly #usedIdx: Uint16Array;
  readonly #usedFlags: Uint16Array;
  readonly #availEvent: Uint16Array;
  availIdx = 0;
  lastUsed = 0;

  constructor(mem: GuestMem, num: number, bufSize = 2048) {
    this.mem = mem;
    this.num = num;
    this.bufSize = bufSize;
    this.descOff = mem.alloc(16 * num, 4096);
    this.availOff = mem.alloc(6 + 2 * num, 2);
    this.usedOff = mem.alloc(6 + 8 * num, 4);
    this.bufOff = mem.alloc(num * bufSize, 64);
    this.#availIdx = new Uint16Array(mem.buf, this.availOff + 2, 1);
    this.#usedIdx = new Uint16Array(mem.buf, this.usedOff + 2, 1);
    this.#usedFlags = new Uint16Array(mem.buf, this.usedOff, 1);
    this.#availEvent = new Uint16Array(mem.buf, this.usedOff + 4 + 8 * num, 1);
    this.kick = native.eventfdOpen();
    this.call = native.eventfdOpen();
    this.err = native.eventfdOpen();
  }

  config(base = 0): RingConfig {
    return {
      num: this.num,
      descAddr: this.mem.uaOf(this.descOff),
      availAddr: this.mem.uaOf(this.availOff),
      usedAddr: this.mem.uaOf(this.usedOff),
      base,
      kickFd: this.kick,
      callFd: this.call,
      errFd: this.err,
    };
  }

  bufOffset(i: number): number {
    return this.bufOff + i * this.bufSize;
  }

  setDesc(i: number, addr: bigint, len: number, flags: number, next = 0, table = this.descOff): void {
    const o = table + 16 * i;
    this.mem.view.setBigUint64(o, addr, true);
    this.mem.view.setUint32(o + 8, len >>> 0, true);
    this.mem.view.setUint16(o + 12, flags, true);
    this.mem.view.setUint16(o + 14, next, true);
  }

  /**
   * When set, publish() kicks only when the device asked for it, as a real
   * driver does: with EVENT_IDX when the new avail index passes avail_event,
   * else unless the used ring's VRING_USED_F_NO_NOTIFY is set.  A device that
   * forgets to re-arm then stalls.
   */
  suppressKicks: 'never' | 'flags' | 'eventIdx' = 'never';
  kicksSent = 0;
  kicksSaved = 0;

  /** Puts heads in the avail ring, then publishes the index (a seq-cst store), then kicks. */
  publish(heads: number[], kick = true): void {
    const old = this.availIdx;
    for (const h of heads) {
      this.mem.view.setUint16(this.availOff + 4 + 2 * (this.availIdx % this.num), h, true);
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    Atomics.store(this.#availIdx, 0, this.availIdx); // seq-cst: also the fence before reading avail_event / flags
    if (!kick) return;
    let need = true;
    if (this.suppressKicks === 'eventIdx') {
      const ev = Atomics.load(this.#availEvent, 0);
      need = ((this.availIdx - ev - 1) & 0xffff) < ((this.availIdx - old) & 0xffff);
    } else if (this.suppressKicks === 'flags') {
      need = (Atomics.load(this.#usedFlags, 0) & 1) === 0;
    }
    if (need) {
      native.eventfdWrite(this.kick);
      this.kicksSent++;
    } else {
      this.kicksSaved++;
    }
  }

  /** Writes the avail index as is (for the index-jump case). */
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    Atomics.store(this.#availIdx, 0, this.availIdx);
  }

  usedIdx(): number {
    return Atomics.load(this.#usedIdx, 0);
  }

  /** Used entries not collected yet. */
  collect(): Array<{ id: number; len: number }> {
    const end = this.usedIdx();
    const out: Array<{ id: number; len: number }> = [];
    while (this.lastUsed !== end) {
      const o = this.usedOff + 4 + 8 * (this.lastUsed % this.num);
      out.push({ id: this.mem.view.getUint32(o, true), len: this.mem.view.getUint32(o + 4, true) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  availFlags(v: number): void {
    this.mem.view.setUint16(this.availOff, v, true);
  }

  usedFlags(): number {
    return this.mem.view.getUint16(this.usedOff, true);
  }

  /** used_event (written by the driver, EVENT_IDX). */
  setUsedEvent(v: number): void {
    this.mem.view.setUint16(this.availOff + 4 + 2 * this.num, v & 0xffff, true);
  }

  /** avail_event (written by the device, EVENT_IDX). */
  availEvent(): number {
    return this.mem.view.getUint16(this.usedOff + 4 + 8 * this.num, true);
  }

  close(): void {
    for (const fd of [this.kick, this.call, this.err]) native.close(fd);
  }
}
