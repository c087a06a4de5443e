/**
 * The addon's small syscall wrappers on their own, without root: flock(2)
 * (the daemon's state-dir lock), addressOf (allocPages and mmapShared memory only), the
 * one mmap helper behind allocPages and mmapShared (anonymous or fd-backed), and
 * the helpers shared through native/common.h (one copy each).  Errors are MqtapErrors with op, syscall
 * and errno; nothing is left open.
 */
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { K, native } from '../../lib/sys/native.js';
import { catchError } from '../helpers/errors.js';

const dir = mkdtempSync(join(tmpdir(), 'mqtap-native-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('flock', () => {
  it('LOCK_EX|LOCK_NB: a second open file description gets EAGAIN (op FLOCK) until the first is closed', () => {
    const file = join(dir, 'lock');
    const a = openSync(file, 'w');
    const b = openSync(file, 'r');
    try {
      native.flock(a, K.LOCK_EX | K.LOCK_NB);
      const e = catchError(() => native.flock(b, K.LOCK_EX | K.LOCK_NB));
      expect(e).toBeInstanceOf(MqtapError);
      expect(e).toMatchObject({ op: 'FLOCK', syscall: 'flock', code: 'EAGAIN' });
      native.flock(a, K.LOCK_UN);
      native.flock(b, K.LOCK_EX | K.LOCK_NB);
      expect(() => native.flock(a, K.LOCK_SH | K.LOCK_NB)).toThrow(MqtapError);
    } finally {
      closeSync(a);
      closeSync(b);
    }
  });

  it('a bad fd or operation: EBADF / EINVAL as MqtapError', () => {
    expect(catchError(() => native.flock(1_000_000, K.LOCK_EX))).toMatchObject({ op: 'FLOCK', code: 'EBADF' });
    const f = openSync(join(dir, 'x'), 'w');
    try {
      expect(catchError(() => native.flock(f, 0))).toMatchObject({ op: 'FLOCK', code: 'EINVAL' });
    } finally {
      closeSync(f);
    }
  });
});

describe('addressOf: allocPages memory only', () => {
  it('the buffer from allocPages and views into it: the address of their first byte', () => {
    const mem = native.allocPages(3 * K.PAGE_SIZE);
    const base = native.addressOf(mem);
    expect(base % BigInt(K.PAGE_SIZE)).toBe(0n);
    expect(native.addressOf(new Uint8Array(mem, 100, 8))).toBe(base + 100n);
    expect(native.addressOf(new Uint32Array(mem, 4096))).toBe(base + 4096n);
    expect(native.addressOf(new DataView(mem, 8, 8))).toBe(base + 8n);
    expect(native.addressOf(new Uint8Array(mem, mem.byteLength - 1, 1))).toBe(base + BigInt(mem.byteLength - 1));
  });

  it('any other memory is a TypeError: a Buffer, a plain ArrayBuffer, a view of one, a SharedArrayBuffer, a non-buffer', () => {
    for (const b of [Buffer.alloc(64), Buffer.allocUnsafe(16), new ArrayBuffer(4096), new Uint8Array(4096), new DataView(new ArrayBuffer(16)), new Uint8Array(new SharedArrayBuffer(64))]) {
      expect(() => native.addressOf(b)).toThrow(TypeError);
      expect(() => native.addressOf(b)).toThrow(/only memory from allocPages/);
    }
    expect(() => native.addressOf(42 as unknown as ArrayBuffer)).toThrow(TypeError);
  });
});

describe('MappedArrayBuffer (native/mem.cc): one mmap for allocPages (anonymous) and mmapShared (fd)', () => {
  it('allocPages: zeroed private memory, whole pages', () => {
    const mem = native.allocPages(K.PAGE_SIZE + 1);
    expect(mem.byteLength).toBe(2 * K.PAGE_SIZE);
    expect(new Uint8Array(mem).every((b) => b === 0)).toBe(true);
  });

  it('mmapShared: MAP_SHARED of the fd at the offset (both ways), addressable, zero-copy', () => {
    const fd = native.memfdCreate('mqtap-native-test');
    try {
      native.ftruncate(fd, 2 * K.PAGE_SIZE);
      writeSync(fd, Buffer.from('second page'), 0, 11, K.PAGE_SIZE);
      const mem = native.mmapShared(fd, K.PAGE_SIZE, K.PAGE_SIZE);
      const u8 = new Uint8Array(mem);
      expect(mem.byteLength).toBe(K.PAGE_SIZE);
      expect(Buffer.from(u8.subarray(0, 11)).toString()).toBe('second page');
      u8.set(Buffer.from('written here'), 100);
      const back = Buffer.alloc(12);
      readSync(fd, back, 0, 12, K.PAGE_SIZE + 100);
      expect(back.toString()).toBe('written here');
      const base = native.addressOf(mem);
      expect(base % BigInt(K.PAGE_SIZE)).toBe(0n);
      expect(native.addressOf(new Uint8Array(mem, 8, 8))).toBe(base + 8n);
    } finally {
      native.close(fd);
    }
  });

  it('a failed mmap is an MqtapError with the caller\'s op (EBADF, EINVAL for an unaligned offset)', () => {
    expect(catchError(() => native.mmapShared(1_000_000, K.PAGE_SIZE, 0))).toMatchObject({ op: 'MMAP_SHARED', syscall: 'mmap', code: 'EBADF' });
    const fd = native.memfdCreate('mqtap-native-test');
    try {
      native.ftruncate(fd, 2 * K.PAGE_SIZE);
      const e = catchError(() => native.mmapShared(fd, K.PAGE_SIZE, 100));
      expect(e).toBeInstanceOf(MqtapError);
      expect(e).toMatchObject({ op: 'MMAP_SHARED', syscall: 'mmap', code: 'EINVAL' });
    } finally {
      native.close(fd);
    }
  });
});

describe('native/common.h: helpers live once', () => {
  const NATIVE = join(__dirname, '..', '..', 'native');
  const sources = readdirSync(NATIVE).filter((f) => f.endsWith('.cc'));
  /** The code of a source file, comments left out. */
  const text = (f: string): string => readFileSync(join(NATIVE, f), 'utf8').replace(/\/\/.*$/gm, '');

  it.each([
    ['an EINTR retry loop (use NoEintr)', /while \(\w+ < 0 && errno == EINTR\)/],
    ['an open(2) of its own (use OpenCloexec: O_CLOEXEC + EINTR)', /[^\w.]open\(/],
    ['an ifreq set up by hand (use IfReqFor)', /memset\(&ifr\b/],
    ['a BigInt -> u64 conversion (use ToU64/ArgU64)', /Uint64Value\(/],
    ['its own Buffer-bytes accessor (use ArgBytes)', /void ArgBytes\(/],
  ])('no native/*.cc except errors.cc has %s', (_what, re) => {
    const offenders = sources.filter((f) => f !== 'errors.cc' && re.test(text(f)));
    expect(offenders).toEqual([]);
  });

  it('BigInt arguments outside 0..2^64-1 are TypeErrors (eventfdWrite used to truncate them)', () => {
    const fd = native.eventfdOpen();
    try {
      expect(() => native.eventfdWrite(fd, 2n ** 64n + 1n)).toThrow(/bigint out of uint64 range/);
      expect(() => native.eventfdWrite(fd, -1n)).toThrow(TypeError);
      expect(native.eventfdRead(fd)).toBeNull(); // nothing was added
      native.eventfdWrite(fd, 5n);
      expect(native.eventfdRead(fd)).toBe(5n);
    } finally {
      native.close(fd);
    }
  });
});
