/**
 * The vhost-user data plane's typed face (the contract is in
 * ./dataplane-api.ts, the worker threads in native/vhost_user.cc).
 *
 * Everything the caller passes is validated here, before the addon is
 * called, so bad input is an MqtapError (ERR_INVALID_ARG, op VALIDATE) with a
 * hint and nothing changed.  The addon checks the same again (it never
 * trusts its caller with guest memory) and guards what only it can see: the
 * guest's rings while they run.
 */
import { ErrorCodes, MqtapError, errnoName, invalidArg } from '../sys/errors';
import { native, type NativeVhostUserDataPlane } from '../sys/native';
import { rejectUnknownKeys, show, validateBoolean, validateInt, validateOneOf } from '../sys/validate';
import type { DataPlane, DataPlaneFeatures, DataPlaneOptions, MemRegion, PairCounters, RingConfig, RingDir, RingStatus, TapEngineChoice } from './dataplane-api';

export const TAP_ENGINES: readonly TapEngineChoice[] = ['auto', 'uring', 'writev'];

/** Validates DataPlaneOptions (also used by serveVhostUser). */
export function validateDataPlaneOptions(o: unknown): { tapEngine: TapEngineChoice } {
  if (o === undefined) return { tapEngine: 'auto' };
  if (typeof o !== 'object' || o === null) throw invalidArg('data plane options must be an object such as { tapEngine: \'auto\' }');
  rejectUnknownKeys(o, ['tapEngine'], 'data plane options');
  const t = (o as DataPlaneOptions).tapEngine;
  return { tapEngine: t === undefined ? 'auto' : validateOneOf(t, 'tapEngine', TAP_ENGINES) };
}

/** Queue pairs one data plane may bridge (a tap has at most 256 queues). */
export const MAX_PAIRS = 256;
export const MAX_RING_SIZE = 32768;
const U64_MAX = (1n << 64n) - 1n;

function u64(v: unknown, what: string): bigint {
  if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) throw invalidArg(`${what} must be a bigint from 0 to 2^64-1 (got ${show(v)})`);
  return v;
}

function fdOrNone(v: unknown, what: string): number {
  return validateInt(v, what, -1, 0x7fffffff, 'pass an open eventfd, or -1 for none');
}

function dirIsTx(dir: unknown): boolean {
  if (dir !== 'rx' && dir !== 'tx') throw invalidArg(`ring direction must be 'rx' or 'tx' (got ${show(dir)})`);
  return dir === 'tx';
}

interface Known {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
}

export class NativeDataPlane implements DataPlane {
  readonly pairs: number;
  /** What was asked for; counters(pair).tapEngine says what each pair uses. */
  readonly tapEngine: TapEngineChoice;
  #n: NativeVhostUserDataPlane | undefined;
  readonly #regions: Known[] = [];

  constructor(pairs: number, opts?: DataPlaneOptions) {
    this.pairs = validateInt(pairs, 'pairs', 1, MAX_PAIRS);
    this.tapEngine = validateDataPlaneOptions(opts).tapEngine;
    // 'auto' and 'uring' both try io_uring in the worker (it must be set up
    // on the thread that submits); whether a missing io_uring is an error is
    // decided here, in startRing.
    this.#n = new native.VhostUserDataPlane(this.pairs, this.tapEngine === 'writev' ? 'writev' : 'uring');
  }

  get notifyFd(): number {
    return this.#live('VHOST_USER_NOTIFY').notifyFd;
  }

  #live(op: string): NativeVhostUserDataPlane {
    if (!this.#n) throw new MqtapError({ op, code: ErrorCodes.CLOSED, message: 'the vhost-user data plane is closed', hint: 'open a new one with openDataPlane()' });
    return this.#n;
  }

  #pair(pair: unknown): number {
    return validateInt(pair, 'pair', 0, this.pairs - 1, `this data plane has ${this.pairs} queue pair(s)`);
  }

  addRegion(r: MemRegion): void {
    const n = this.#live('VHOST_USER_ADD_MEM_REG');
    if (typeof r !== 'object' || r === null) throw invalidArg('a memory region must be an object { guestPhysAddr, size, userAddr, mmapOffset, fd }');
    const gpa = u64(r.guestPhysAddr, 'guestPhysAddr');
    const size = u64(r.size, 'size');
    const ua = u64(r.userAddr, 'userAddr');
    const off = u64(r.mmapOffset, 'mmapOffset');
    const fd = validateInt(r.fd, 'fd', 0, 0x7fffffff);
    if (size === 0n) throw invalidArg('a memory region cannot be empty (size 0)', 'the frontend sent a zero-size region: refuse the message');
    if (gpa + size > U64_MAX + 1n || ua + size > U64_MAX + 1n || off + size > U64_MAX + 1n) throw invalidArg('the memory region wraps around the 64-bit address space');
    for (const k of this.#regions) {
      if (gpa < k.guestPhysAddr + k.size && k.guestPhysAddr < gpa + size)
        throw invalidArg(`region at guest-physical 0x${gpa.toString(16)} (+0x${size.toString(16)}) overlaps the one at 0x${k.guestPhysAddr.toString(16)}`, 'remove the old region first');
      if (ua < k.userAddr + k.size && k.userAddr < ua + size)
        throw invalidArg(`region at user address 0x${ua.toString(16)} (+0x${size.toString(16)}) overlaps the one at 0x${k.userAddr.toString(16)}`, 'remove the old region first');
    }
    const end = native.fdSize(fd);
    if (off + size > end)
      throw invalidArg(`region [0x${off.toString(16)}, +0x${size.toString(16)}) ends past the end of its fd (${end} bytes)`, 'the frontend sent a region larger than its memory fd: refuse the message');
    n.addRegion(gpa, size, ua, off, fd);
    this.#regions.push({ guestPhysAddr: gpa, size, userAddr: ua });
  }

  removeRegion(guestPhysAddr: bigint): void {
    const n = this.#live('VHOST_USER_REM_MEM_REG');
    const gpa = u64(guestPhysAddr, 'guestPhysAddr');
    const i = this.#regions.findIndex((k) => k.guestPhysAddr === gpa);
    if (i < 0) throw invalidArg(`no memory region starts at guest-physical 0x${gpa.toString(16)}`);
    n.removeRegion(gpa); // EBUSY while a running ring lives in it
    this.#regions.splice(i, 1);
  }

  setTap(pair: number, fd: number): void {
    const n = this.#live('VHOST_USER_SET_TAP');
    const p = this.#pair(pair);
    const f = validateInt(fd, 'tap fd', -1, 0x7fffffff, 'pass an open tap queue fd, or -1 for none');
    // The worker never blocks: the tap is read until EAGAIN.
    if (f >= 0) native.setNonBlocking(f, true);
    n.setTap(p, f);
    this.#requireUring(n, p, 'VHOST_USER_SET_TAP', () => n.setTap(p, -1));
  }

  /** tapEngine 'uring': a pair whose worker could not set up its io_uring is an error (undone by `undo`); 'auto' goes on with writev. */
  #requireUring(n: NativeVhostUserDataPlane, p: number, op: string, undo: () => void): void {
    if (this.tapEngine !== 'uring') return;
    const c = n.counters(p);
    if (c.tapEngine !== 'writev' || c.tapEngineErrno === 0) return;
    undo();
    throw new MqtapError({
      op,
      code: errnoName(c.tapEngineErrno),
      errno: c.tapEngineErrno,
      syscall: c.tapEngineSyscall || 'io_uring_setup',
      detail: `pair ${p}: tap engine 'uring'`,
      hint:
        c.tapEngineSyscall === 'io_uring_enter'
          ? "the pair's io_uring failed mid-run (io_uring_enter); setTap gives it a new one: use tapEngine 'auto' to go on with one writev/read per frame instead"
          : "io_uring cannot be set up here (kernel.io_uring_disabled, seccomp, no free fd, or an old kernel): use tapEngine 'auto' (falls back to one writev/read per frame) or 'writev'",
    });
  }

  #inOneRegion(addr: bigint, len: bigint): boolean {
    return this.#regions.some((k) => addr >= k.userAddr && addr + len <= k.userAddr + k.size);
  }

  startRing(pair: number, dir: RingDir, cfg: RingConfig, features: DataPlaneFeatures): void {
    const n = this.#live('VHOST_USER_START_RING');
    const p = this.#pair(pair);
    const tx = dirIsTx(dir);
    if (typeof cfg !== 'object' || cfg === null) throw invalidArg('ring config must be an object');
    if (typeof features !== 'object' || features === null) throw invalidArg('features must be an object');
    const num = validateInt(cfg.num, 'ring size (num)', 1, MAX_RING_SIZE);
    if ((num & (num - 1)) !== 0) throw invalidArg(`ring size must be a power of two (got ${num})`, 'the frontend sent a bad VHOST_USER_SET_VRING_NUM: refuse it');
    const desc = u64(cfg.descAddr, 'descAddr');
    const avail = u64(cfg.availAddr, 'availAddr');
    const used = u64(cfg.usedAddr, 'usedAddr');
    if (desc % 16n !== 0n || avail % 2n !== 0n || used % 4n !== 0n) throw invalidArg('ring addresses must be aligned: descriptors to 16, avail to 2, used to 4 bytes');
    const N = BigInt(num);
    if (!this.#inOneRegion(desc, 16n * N) || !this.#inOneRegion(avail, 6n + 2n * N) || !this.#inOneRegion(used, 6n + 8n * N))
      throw invalidArg('a ring (descriptor table, avail or used ring) is not inside one mapped memory region', 'send the memory table (SET_MEM_TABLE / ADD_MEM_REG) before the ring addresses');
    const base = validateInt(cfg.base, 'base', 0, 0xffff);
    const kick = validateInt(cfg.kickFd, 'kickFd', 0, 0x7fffffff, 'a kick eventfd is required (polling mode is not supported)');
    const call = fdOrNone(cfg.callFd, 'callFd');
    const err = fdOrNone(cfg.errFd, 'errFd');
    const eventIdx = validateBoolean(features.eventIdx, 'features.eventIdx');
    const mrg = validateBoolean(features.mrgRxbuf, 'features.mrgRxbuf');
    const indirect = validateBoolean(features.indirectDesc, 'features.indirectDesc');
    if (features.vnetHdrSize !== 10 && features.vnetHdrSize !== 12) throw invalidArg(`features.vnetHdrSize must be 10 or 12 (got ${show(features.vnetHdrSize)})`);
    if (mrg && features.vnetHdrSize !== 12) throw invalidArg('MRG_RXBUF needs the 12-byte virtio-net header');
    n.startRing(p, tx, num, desc, avail, used, base, kick, call, err, eventIdx, mrg, indirect, features.vnetHdrSize);
    this.#requireUring(n, p, 'VHOST_USER_START_RING', () => n.stopRing(p, tx));
  }

  stopRing(pair: number, dir: RingDir): RingStatus {
    const n = this.#live('VHOST_USER_STOP_RING');
    return n.stopRing(this.#pair(pair), dirIsTx(dir));
  }

  ringStatus(pair: number, dir: RingDir): RingStatus {
    const n = this.#live('VHOST_USER_RING_STATUS');
    return n.ringStatus(this.#pair(pair), dirIsTx(dir));
  }

  counters(pair: number): PairCounters {
    const n = this.#live('VHOST_USER_COUNTERS');
    return n.counters(this.#pair(pair));
  }

  /** Stops every ring, unmaps every region, closes notifyFd.  Harmless when already closed. */
  close(): void {
    const n = this.#n;
    if (!n) return;
    this.#n = undefined;
    this.#regions.length = 0;
    n.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** A data plane for `pairs` queue pairs (virtqueues 2i = RX, 2i+1 = TX). */
export function openDataPlane(pairs: number, opts?: DataPlaneOptions): NativeDataPlane {
  return new NativeDataPlane(pairs, opts);
}
