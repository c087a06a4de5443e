/**
 * lib/datapath/ — the userspace data path: per-queue frame I/O (this file),
 * the virtio-net header and GSO, steering (Toeplitz + eBPF), per-queue
 * counters, frame building and parsing.
 *
 * Per-queue frame I/O: batches of frames in both directions, driven by the
 * event loop, with buffers that are reused and backpressure that waits
 * instead of spinning or dropping.  See docs/datapath.md.
 *
 *   using io = openQueueIO(tap.queues[0]);
 *   for await (const batch of io) {          // frames the kernel sent out of the tap
 *     for (const frame of batch) handle(frame);   // views into the queue's slab
 *   }
 *   await io.writeBatch([frameA, frameB]);    // frames into the kernel, in order
 *
 * Receive.  Each queue has one slab (`batch` slots of `slotSize` bytes).  A
 * read fills up to `batch` slots with the frames waiting right now and hands
 * them to JavaScript as one FrameBatch: views into the slab, no copies.  A
 * batch is valid until the iterator is asked for the next one (or the
 * QueueIO closes); after that its views would show newer frames, so every
 * accessor throws ERR_BATCH_RELEASED.  Copy what you keep (`batch.copy()`).
 * When nothing is waiting the queue waits for POLLIN on the event loop; while
 * frames keep coming it reads without going through epoll, yielding to the
 * event loop every `yieldEvery` batches (by default 16 batches or 1024
 * frames, whichever comes first) so timers and other I/O still run.
 * When the consumer is slower than the kernel, the kernel's ring for the
 * queue (txqueuelen frames) fills and the kernel drops and counts
 * (`tx_dropped` of the device); the library never drops a frame it read.
 *
 * Transmit.  `writeBatch(frames)` writes all frames in order.  If the kernel
 * says EAGAIN (the tap's send buffer, TUNSETSNDBUF, is full) it waits for
 * POLLOUT and goes on; the promise resolves when every frame is written.
 * Batches are written in call order.  Frames must stay unchanged until their
 * promise settles.  Frames the kernel refuses (EINVAL: a malformed frame or
 * virtio-net header) are counted as drops and reported by rejecting the
 * promise after the other frames were written.
 *
 * Closing.  `io.close()` stops polling before anything else, ends the frame
 * stream ({ done: true } for a pending next()), and rejects writes still
 * waiting.  Closing the TapQueue (or its Tap) closes its QueueIO first: the
 * poll is gone before the fd number is released.
 */
import { existsSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { setImmediate as immediate } from 'node:timers/promises';
import { ErrorCodes, MqtapError, errnoName, invalidArg, withContext } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { K, native } from '../sys/native';
import { getLink } from '../tap/links';
import { TapQueue, offloadFlags, type Tap } from '../tap/tap';
import { decodeVnetHdr, type VnetHdr, type VnetHdrSize } from './vnethdr';

const IOC = native.ioConstants;
const READABLE = IOC.UV_READABLE;
const WRITABLE = IOC.UV_WRITABLE;

/** Counter slots in the control block shared with native/io.cc (enum Counter). */
const C = {
  RX_FRAMES: 0,
  RX_BYTES: 1,
  RX_BATCHES: 2,
  RX_DROPS: 3,
  RX_WAITS: 4,
  RX_SYSCALLS: 5,
  TX_FRAMES: 6,
  TX_BYTES: 7,
  TX_BATCHES: 8,
  TX_DROPS: 9,
  TX_EAGAIN: 10,
  TX_WAITS: 11,
  TX_SYSCALLS: 12,
  TX_REORDERED: 13,
  RX_REARMS: 14,
  RX_DRAINS: 15,
  RX_TRUNCATED: 16,
} as const;
/** State words (enum StateWord). */
const S = { NEXT: 0, COUNT: 1, DROPPED: 2, DROP_ERRNO: 3, DROP_INDEX: 4, RX_DROP_ERRNO: 5, RING_ERRNO: 6 } as const;

/**
 * Which errnos drop one frame rather than stop the call (policy: this file's;
 * native/io.cc applies the lists per frame without calling back).
 *  - receive: EINVAL, tun could not describe the frame in a virtio-net
 *    header and dropped it; the queue is fine.
 *  - send: EINVAL (a header or frame tun refuses), EMSGSIZE (too long),
 *    EFAULT (bad GSO layout), ENOMEM/ENOBUFS (no memory for this skb): the
 *    kernel refused this frame, the next one may well go through.
 * Anything else (EBADFD: the device is gone, EIO, ...) stops the call and is
 * thrown: no point writing the rest.
 */
export const RX_DROP_ERRNOS: readonly number[] = Object.freeze([IOC.EINVAL]);
export const TX_DROP_ERRNOS: readonly number[] = Object.freeze([IOC.EINVAL, IOC.EMSGSIZE, IOC.EFAULT, IOC.ENOMEM, IOC.ENOBUFS]);

/**
 * How the syscalls are made: one per frame (`poll`), batched through io_uring
 * (`uring`), or, for receiving only, one multishot read kept armed on io_uring
 * into a ring of provided buffers (`uring-mshot`; its writes are `uring`).
 */
export type IoEngine = 'poll' | 'uring' | 'uring-mshot';
/** The engines that can write. */
export type TxEngine = 'poll' | 'uring';

export interface QueueIOOptions {
  /**
   * 'auto' (default): see {@link defaultEngines}.  A single engine applies to
   * both directions ('uring-mshot': multishot reads, 'uring' writes); `{ rx, tx }`
   * chooses per direction.
   */
  engine?: IoEngine | 'auto' | { rx?: IoEngine | 'auto'; tx?: TxEngine | 'auto' };
  /**
   * Most frames per receive batch (slots in the slab), 1..1024.  Default
   * ({@link defaultBatch}): 256 (64 for slots over 128 KiB).
   */
  batch?: number;
  /**
   * Bytes per slot, header included.  Default ({@link defaultSlotSize}): the
   * header + 18 + the tap's MTU (+1), or the header plus 65,550 bytes (any
   * frame a tap hands out, 64 KB GSO frames included) when the tap's
   * offloads let the kernel hand over GSO frames or are unknown (openFdIO).
   * The slab is anonymous memory, so untouched slot tails cost no RAM.  A
   * frame that fills its slot (slotSize bytes or more, header included) is
   * counted as an rx drop and in rx.truncated: it may have been cut short.
   */
  slotSize?: number;
  /**
   * Batches read back to back before yielding to the event loop.  Default:
   * 16 batches or 1024 frames, whichever comes first (4 full batches of 256);
   * when given, batches alone count.
   */
  yieldEvery?: number;
  /** Where engine decisions are logged (each fallback once per logger, with its reason; io_uring failing).  Default: silent. */
  logger?: Logger;
}

/** Counters of one direction. */
export interface DirectionStats {
  /** Frames read (rx) or written (tx). */
  frames: number;
  /** Ethernet bytes of those frames (virtio-net headers excluded). */
  bytes: number;
  /** Reads that returned frames / writeBatch calls. */
  batches: number;
  /** rx: frames the kernel could not hand over whole (one that fills a slot, or an inexpressible header); tx: frames the kernel refused. */
  drops: number;
  /** Times the queue waited for the fd on the event loop (rx: POLLIN, tx: POLLOUT after EAGAIN). */
  waits: number;
  /** read/write/writev/io_uring_enter calls made. */
  syscalls: number;
}

export interface QueueIOStats {
  /** The TapQueue's index (-1 for an fd opened with openFdIO). */
  queue: number;
  engine: { rx: IoEngine; tx: TxEngine };
  rx: DirectionStats & {
    /**
     * uring-mshot: times the multishot read was armed again after it ended: after a drain caught
     * up (below), or for another reason (a completion without IORING_CQE_F_MORE).
     */
    rearms: number;
    /**
     * uring-mshot: times the reader fell behind (the multishot ended with ENOBUFS: every slot used,
     * frames still queued) and read the backlog with batches of RWF_NOWAIT reads instead of
     * re-arming at once; each drain ends, once a read finds the tap empty, with one re-arm.
     */
    drains: number;
    /**
     * Frames dropped because they filled their slot (maybe cut short: reason EMSGSIZE), also
     * counted in `drops`.  The slot is smaller than a frame the tap handed out: the MTU or the
     * offloads were raised after the QueueIO opened; reopen it, or pass `slotSize`.
     */
    truncated: number;
  };
  tx: DirectionStats & {
    /** Times a write returned EAGAIN (the tap's send buffer was full). */
    eagain: number;
    /** Frames an unordered io_uring batch wrote after one that said EAGAIN (see docs/datapath.md). */
    reordered: number;
  };
}

/** What writeBatch resolves with. */
export interface WriteResult {
  /** Frames written. */
  frames: number;
  /** Their Ethernet bytes (headers excluded). */
  bytes: number;
  /** Times this batch waited for POLLOUT. */
  waits: number;
}

export interface WriteOptions {
  /**
   * The frames start with the tap's virtio-net header (encodeVnetHdr), e.g.
   * for GSO or checksum offload.  Default false: they are Ethernet frames and
   * a zeroed header (no offload) is sent in front of each.  Ignored for a
   * FrameBatch (forwarded with the headers it was read with) and for taps
   * without a header.
   */
  withHeader?: boolean;
}

/** Thrown when a FrameBatch is used after its slab was reused. */
export const ERR_BATCH_RELEASED = 'ERR_BATCH_RELEASED';

function released(): MqtapError {
  return new MqtapError({
    op: 'READ',
    code: ERR_BATCH_RELEASED,
    message: 'this frame batch was released: its slab now holds newer frames (a batch is valid until the next one is requested)',
    hint: 'copy the frames you keep (batch.copy() or Buffer.from(frame)) before asking for the next batch',
  });
}

/**
 * Frames read from one queue in one go: views into the queue's slab, valid
 * until the next batch is requested.  Iterating yields the Ethernet frames.
 */
export class FrameBatch implements Iterable<Buffer> {
  /** Number of frames. */
  readonly count: number;
  /** The virtio-net header length in front of every frame (0 without IFF_VNET_HDR). */
  readonly hdrLen: number;
  readonly #io: QueueIO;
  readonly #gen: number;
  readonly #slab: Buffer;
  readonly #desc: Uint32Array;

  /** @internal */
  constructor(io: QueueIO, gen: number, slab: Buffer, desc: Uint32Array, count: number, hdrLen: number) {
    this.#io = io;
    this.#gen = gen;
    this.#slab = slab;
    this.#desc = desc;
    this.count = count;
    this.hdrLen = hdrLen;
  }

  /** False once the slab was reused (the next batch was requested, or the QueueIO closed). */
  get valid(): boolean {
    return this.#io._gen === this.#gen;
  }

  #check(i: number): void {
    if (this.#io._gen !== this.#gen) throw released();
    if (!(i >= 0 && i < this.count)) throw new RangeError(`frame index ${i} out of range 0..${this.count - 1}`);
  }

  /** The queue's slab: frame i is at rawOffset(i) .. rawOffset(i) + rawLength(i) (header first). */
  get slab(): Buffer {
    if (this.#io._gen !== this.#gen) throw released();
    return this.#slab;
  }

  /** Offset of frame i (its virtio-net header) in the slab. */
  rawOffset(i: number): number {
    this.#check(i);
    return this.#desc[2 * i]!;
  }

  /** Length of frame i with its virtio-net header. */
  rawLength(i: number): number {
    this.#check(i);
    return this.#desc[2 * i + 1]!;
  }

  /** Length of the Ethernet frame i (header excluded). */
  length(i: number): number {
    this.#check(i);
    return this.#desc[2 * i + 1]! - this.hdrLen;
  }

  /** Frame i as read: virtio-net header + Ethernet frame (a view). */
  raw(i: number): Buffer {
    this.#check(i);
    const off = this.#desc[2 * i]!;
    return this.#slab.subarray(off, off + this.#desc[2 * i + 1]!);
  }

  /** The Ethernet frame i (a view, header excluded). */
  frame(i: number): Buffer {
    this.#check(i);
    const off = this.#desc[2 * i]!;
    return this.#slab.subarray(off + this.hdrLen, off + this.#desc[2 * i + 1]!);
  }

  /** Frame i's virtio-net header, decoded and validated (lib/datapath/vnethdr.ts). */
  header(i: number): VnetHdr {
    this.#check(i);
    if (this.hdrLen !== 10 && this.hdrLen !== 12) throw invalidArg(`this queue has a ${this.hdrLen}-byte header; only 10 and 12 can be decoded`);
    const off = this.#desc[2 * i]!;
    return decodeVnetHdr(this.#slab, this.hdrLen as VnetHdrSize, off, { frameLength: this.#desc[2 * i + 1]! - this.hdrLen });
  }

  /** @internal (offset, length) of every raw frame into `desc` as writeBatch triples for buffer 0. */
  _fill(desc: Uint32Array, base: number): void {
    if (this.#io._gen !== this.#gen) throw released();
    const d = this.#desc;
    for (let i = 0; i < this.count; i++) {
      desc[3 * i + 1] = base + d[2 * i]!;
      desc[3 * i + 2] = d[2 * i + 1]!;
    }
  }

  /** Copies of the Ethernet frames (or of the raw frames with `{ raw: true }`), valid forever. */
  copy(opts: { raw?: boolean } = {}): Buffer[] {
    const out: Buffer[] = [];
    for (let i = 0; i < this.count; i++) out.push(Buffer.from(opts.raw ? this.raw(i) : this.frame(i)));
    return out;
  }

  *[Symbol.iterator](): Iterator<Buffer> {
    for (let i = 0; i < this.count; i++) yield this.frame(i);
  }
}

interface TxJob {
  /**
   * The frames are a FrameBatch's, in a queue's receive slab, which that
   * queue reuses for its next batch: a job that has to wait copies them first
   * (#ownFrames), so forwarding stays zero-copy only while it is written at once.
   */
  fromSlab: boolean;
  bufs: ArrayBuffer[];
  desc: Uint32Array;
  next: number;
  count: number;
  withHdr: boolean;
  written: number;
  bytes: number;
  dropped: number;
  dropErrno: number;
  waits: number;
  /**
   * The promise's settle functions, once it exists.  A job written whole
   * inside writeBatch itself settles before any promise was made: its
   * outcome is kept (#settle) and writeBatch returns an already settled
   * promise, without the executor and its two closures.
   */
  resolve: ((r: WriteResult) => void) | undefined;
  reject: ((e: unknown) => void) | undefined;
  /** 0 pending; 1 resolved / 2 rejected with `outcome` before the promise existed. */
  settled: 0 | 1 | 2;
  outcome: unknown;
}

/** The descriptor of a job not yet described (see #takeDesc). */
const NO_DESC = new Uint32Array(0);

const DONE: IteratorResult<FrameBatch> = Object.freeze({ done: true, value: undefined }) as IteratorResult<FrameBatch>;

/** QueueIOs by queue: one per queue (libuv allows one poll handle per fd). */
const byQueue = new WeakMap<TapQueue, QueueIO>();
function engineChoice(v: unknown, what: string): IoEngine | 'auto' {
  if (v === undefined || v === 'auto') return 'auto';
  if (v === 'poll' || v === 'uring' || v === 'uring-mshot') return v;
  throw invalidArg(`${what} must be 'auto', 'poll', 'uring' or 'uring-mshot'`);
}

function txChoice(v: unknown, what: string): TxEngine | 'auto' {
  const e = engineChoice(v, what);
  if (e === 'uring-mshot') throw invalidArg(`${what}: 'uring-mshot' is a receive engine`, "write with 'uring' or 'poll' (engine: 'uring-mshot' alone means multishot reads and 'uring' writes)");
  return e;
}

/** What the running kernel's io_uring offers (native ioUringProbe) and the kernel it is. */
export interface IoCapabilities {
  /** os.release(). */
  kernel: string;
  /** kernel.io_uring_disabled (0, 1, 2), or undefined where the sysctl does not exist (before 6.6). */
  ioUringDisabled: string | undefined;
  setupErrno: number;
  deferTaskrun: boolean;
  /** errno of the SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG setup (0: accepted, -1: not tried). */
  deferErrno: number;
  /** IORING_FEAT_EXT_ARG (Linux 5.11+): every ring the engines set up needs it (bounded waits). */
  extArg: boolean;
  probeErrno: number;
  ops: { read: boolean; write: boolean; writev: boolean; readMultishot: boolean };
  pbufRingErrno: number;
}

let capsCache: IoCapabilities | undefined;

/**
 * Asks the kernel once per process what io_uring offers.  A transient
 * failure (no free fd, no memory) is not remembered: the next call asks again.
 */
export function ioCapabilities(): IoCapabilities {
  if (capsCache) return capsCache;
  const p = native.ioUringProbe();
  const sysctl = '/proc/sys/kernel/io_uring_disabled';
  const caps: IoCapabilities = {
    kernel: release(),
    ioUringDisabled: existsSync(sysctl) ? readFileSync(sysctl, 'utf8').trim() : undefined,
    setupErrno: p.setupErrno,
    deferTaskrun: p.deferTaskrun,
    deferErrno: p.deferErrno,
    extArg: p.extArg,
    probeErrno: p.probeErrno,
    ops: { ...p.ops },
    pbufRingErrno: p.pbufRingErrno,
  };
  if (!transientCaps(caps)) capsCache = caps;
  return caps;
}

/**
 * Whether any answer in `caps` may be transient (no free fd: EMFILE/ENFILE,
 * no memory: ENOMEM), so that it must not be remembered: the setup, the
 * DEFER_TASKRUN setup, the opcode probe or the provided-buffer ring.
 */
export function transientCaps(caps: Pick<IoCapabilities, 'setupErrno' | 'deferErrno' | 'probeErrno' | 'pbufRingErrno'>): boolean {
  const transient: number[] = [IOC.EMFILE, IOC.ENFILE, IOC.ENOMEM];
  return [caps.setupErrno, caps.deferErrno, caps.probeErrno, caps.pbufRingErrno].some((e) => transient.includes(e));
}

/** Major and minor of a kernel release string ('6.18.44-fc' -> [6, 18]); [0, 0] when unreadable. */
export function kernelVersion(rel: string): [number, number] {
  const m = /^(\d+)\.(\d+)/.exec(rel);
  return m ? [Number(m[1]), Number(m[2])] : [0, 0];
}

/**
 * Levels the 'auto' choice can be made to skip, as if the kernel lacked
 * them: `MQTAP_IO_DISABLE=mshot` (no multishot reads) or `=uring` (no
 * io_uring at all), comma-separated.  For testing the fallbacks and for
 * working around a kernel bug without changing code.
 */
export function disabledLevels(env: NodeJS.ProcessEnv = process.env): { mshot: boolean; uring: boolean } {
  const list = (env.MQTAP_IO_DISABLE ?? '').split(',').map((x) => x.trim()).filter(Boolean);
  for (const x of list) if (x !== 'mshot' && x !== 'uring') throw invalidArg(`MQTAP_IO_DISABLE: unknown level "${x}"`, "use 'mshot' and/or 'uring', comma-separated (or unset it)");
  return { mshot: list.includes('mshot'), uring: list.includes('uring') };
}

/** Why a level of the 'auto' chain was not taken: 'io_uring' (both directions) or 'multishot' (reads). */
export interface EngineFallback {
  level: 'io_uring' | 'multishot';
  reason: string;
}

/**
 * The engines 'auto' picks, by what the kernel offers (docs/datapath.md):
 *  - receive: multishot reads (`uring-mshot`) where the kernel has
 *    IORING_OP_READ_MULTISHOT (6.7+) and is 6.12 or later (earlier ones had
 *    multishot-read stalls), with DEFER_TASKRUN and provided-buffer rings;
 *    else one-shot batched io_uring reads (`uring`);
 *    else `poll`.
 *  - send: io_uring batches while the tap's send buffer is unlimited
 *    (TUNSETSNDBUF INT_MAX, the default: a write then never says EAGAIN, so
 *    unlinked batches keep frame order); plain write(2) otherwise or without
 *    io_uring.
 * `fallbacks` says why each level above the chosen one was skipped (old
 * kernel, seccomp, kernel.io_uring_disabled, the probe said no,
 * MQTAP_IO_DISABLE).  Pure: the capabilities and the disabled levels are
 * arguments.
 */
export function defaultEngines(
  sndbuf: number,
  caps: IoCapabilities = ioCapabilities(),
  disabled: { mshot: boolean; uring: boolean } = disabledLevels(),
): { rx: IoEngine; tx: TxEngine; fallbacks: EngineFallback[] } {
  const fallbacks: EngineFallback[] = [];
  const k = caps.kernel;
  let uring = '';
  if (disabled.uring) uring = 'disabled by MQTAP_IO_DISABLE=uring';
  else if (caps.setupErrno !== 0) {
    const code = errnoName(caps.setupErrno);
    if (caps.setupErrno === IOC.EPERM && caps.ioUringDisabled !== undefined && caps.ioUringDisabled !== '0')
      uring = `io_uring_setup: EPERM (kernel.io_uring_disabled=${caps.ioUringDisabled}${caps.ioUringDisabled === '1' ? ': only members of kernel.io_uring_group may use it' : ''})`;
    else if (caps.setupErrno === IOC.EPERM) uring = 'io_uring_setup: EPERM (a seccomp filter or an LSM refuses io_uring)';
    else if (caps.setupErrno === IOC.ENOSYS) uring = `io_uring_setup: ENOSYS (Linux ${k} has no io_uring, or a seccomp filter hides it)`;
    else uring = `io_uring_setup: ${code}`;
  } else if (!caps.extArg) uring = `Linux ${k}: io_uring lacks IORING_FEAT_EXT_ARG (bounded waits, Linux 5.11+), which every engine ring needs`;
  else if (caps.probeErrno !== 0 || !caps.ops.read || !caps.ops.write || !caps.ops.writev)
    uring = `Linux ${k}: io_uring lacks IORING_OP_READ/WRITE/WRITEV (probe${caps.probeErrno > 0 ? `: ${errnoName(caps.probeErrno)}` : ''})`;
  if (uring) {
    fallbacks.push({ level: 'io_uring', reason: uring });
    return { rx: 'poll', tx: 'poll', fallbacks };
  }
  const tx: TxEngine = sndbuf >= IOC.INT_MAX ? 'uring' : 'poll';
  const [major, minor] = kernelVersion(k);
  let mshot = '';
  if (disabled.mshot) mshot = 'disabled by MQTAP_IO_DISABLE=mshot';
  else if (!caps.ops.readMultishot) mshot = `Linux ${k}: no multishot read (IORING_OP_READ_MULTISHOT needs Linux 6.7+)`;
  else if (major < 6 || (major === 6 && minor < 12)) mshot = `Linux ${k}: multishot reads are not used before 6.12 (earlier kernels had multishot-read stalls)`;
  else if (!caps.deferTaskrun) mshot = `Linux ${k}: io_uring refuses SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG${caps.deferErrno > 0 ? ` (${errnoName(caps.deferErrno)})` : ''}`;
  else if (caps.pbufRingErrno !== 0) mshot = `IORING_REGISTER_PBUF_RING: ${errnoName(caps.pbufRingErrno)}`;
  if (mshot) {
    fallbacks.push({ level: 'multishot', reason: mshot });
    return { rx: 'uring', tx, fallbacks };
  }
  return { rx: 'uring-mshot', tx, fallbacks };
}

/** Fallback reasons already logged, per logger: each is logged once. */
const loggedFallbacks = new WeakMap<object, Set<string>>();

function logOnce(logger: Logger, key: string, log: () => void): void {
  let seen = loggedFallbacks.get(logger);
  if (!seen) loggedFallbacks.set(logger, (seen = new Set()));
  if (seen.has(key)) return;
  seen.add(key);
  log();
}

/** Validated options. */
interface IoPlan {
  rx: IoEngine | 'auto';
  tx: TxEngine | 'auto';
  batch: number | undefined;
  slotSize: number | undefined;
  yieldEvery: number | undefined;
  logger: Logger;
}

function planIo(opts: QueueIOOptions): IoPlan {
  if (typeof opts !== 'object' || opts === null) throw invalidArg('QueueIO options must be an object');
  for (const k of Object.keys(opts)) if (!['engine', 'batch', 'slotSize', 'yieldEvery', 'logger'].includes(k)) throw invalidArg(`unknown QueueIO option "${k}"`);
  const int = (v: unknown, name: string, min: number, max: number): number => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw invalidArg(`${name} must be an integer in ${min}..${max}`);
    return v;
  };
  let rx: IoEngine | 'auto' = 'auto';
  let tx: TxEngine | 'auto' = 'auto';
  if (typeof opts.engine === 'object' && opts.engine !== null) {
    rx = engineChoice(opts.engine.rx, 'engine.rx');
    tx = txChoice(opts.engine.tx, 'engine.tx');
  } else {
    rx = engineChoice(opts.engine, 'engine');
    tx = rx === 'uring-mshot' ? 'uring' : rx;
  }
  return {
    rx,
    tx,
    batch: opts.batch === undefined ? undefined : int(opts.batch, 'batch', 1, IOC.MAX_BATCH),
    slotSize: opts.slotSize === undefined ? undefined : int(opts.slotSize, 'slotSize', 128, 1 << 20),
    yieldEvery: opts.yieldEvery === undefined ? undefined : int(opts.yieldEvery, 'yieldEvery', 1, 1 << 20),
    logger: opts.logger ?? silentLogger,
  };
}

/**
 * Batched frame I/O on one tap queue.  An async iterable of FrameBatch
 * (frames the kernel sends out of the tap) plus writeBatch() (frames into
 * the kernel), with per-queue counters.  Create it with openQueueIO().
 */
export class QueueIO implements AsyncIterable<FrameBatch> {
  /** The queue, or undefined for openFdIO(). */
  readonly queue: TapQueue | undefined;
  /** The virtio-net header length on this queue's frames (0 without IFF_VNET_HDR). */
  readonly hdrLen: number;
  /** Slots in the slab: the most frames one batch can hold. */
  readonly batchSize: number;
  readonly slotSize: number;
  /** @internal bumped whenever the slab is reused: FrameBatch checks it. */
  _gen = 0;
  readonly #native: InstanceType<typeof native.QueueIo>;
  readonly #ifname: string | undefined;
  readonly #slab: Buffer;
  readonly #counters: Float64Array;
  readonly #state: Int32Array;
  readonly #rxDesc: Uint32Array;
  readonly #yieldEvery: number;
  readonly #fd: number;
  readonly #restoreNonBlock: boolean;
  #closed = false;
  /** RX_TRUNCATED when last looked at (see #truncated). */
  #truncatedSeen = 0;
  readonly #log: Logger;
  #engineNote: string | undefined;
  #rxBusy = false;
  #rxWaiter: (() => void) | undefined;
  /** READABLE stays armed between batches while the consumer keeps coming back (see #onPoll). */
  #rxArmed = false;
  #pollRefd = true;
  #syncRuns = 0;
  /** Frames returned since the last turn of the event loop (the default yield also stops at YIELD_FRAMES). */
  #syncFrames = 0;
  readonly #yieldFrames: number;
  #pollEvents = 0;
  readonly #tx: TxJob[] = [];
  #txWaiting = false;
  #unhook: (() => void) | undefined;
  /** The reusable descriptor array (see #takeDesc) and the job using it. */
  #scratch = new Uint32Array(3 * 64);
  #scratchHolder: TxJob | undefined;

  /** @internal use openQueueIO() / openFdIO(). */
  constructor(init: { fd: number; queue: TapQueue | undefined; ifname: string | undefined; hdrLen: number; plan: IoPlan; sndbuf: number; defaultSlot?: number }) {
    const { fd, plan } = init;
    this.#fd = fd;
    this.queue = init.queue;
    this.#ifname = init.ifname;
    this.hdrLen = init.hdrLen;
    this.slotSize = plan.slotSize ?? init.defaultSlot ?? gsoSlotSize(init.hdrLen);
    if (this.slotSize <= this.hdrLen + 14) throw invalidArg(`slotSize ${this.slotSize} cannot hold a frame after a ${this.hdrLen}-byte header`);
    this.batchSize = plan.batch ?? defaultBatch(this.slotSize);
    this.#yieldEvery = plan.yieldEvery ?? 16;
    this.#yieldFrames = plan.yieldEvery === undefined ? YIELD_FRAMES : Infinity;
    // Non-blocking for as long as this QueueIO lives (the flag is per open
    // file).  Read before uv_poll_init, which sets it.
    this.#restoreNonBlock = (native.getFlFlags(fd) & native.constants.O_NONBLOCK) === 0;
    this.#log = plan.logger;
    const auto = plan.rx === 'auto' || plan.tx === 'auto' ? defaultEngines(init.sndbuf) : undefined;
    const want = { rx: plan.rx === 'auto' ? auto!.rx : plan.rx, tx: plan.tx === 'auto' ? auto!.tx : plan.tx };
    for (const f of auto?.fallbacks ?? []) if (f.level === 'io_uring' || plan.rx === 'auto') this.#fellBack(f.level, f.reason, want, want);
    // O_NONBLOCK before a ring registers the fd: tun's files have no
    // FMODE_NOWAIT, and io_uring takes a registered file's non-blocking-ness
    // when it is registered (otherwise it polls before every read).
    if (this.#restoreNonBlock) native.setNonBlocking(fd, true);
    let n: InstanceType<typeof native.QueueIo>;
    try {
      n = this.#make(want, plan);
    } catch (err) {
      if (this.#restoreNonBlock) {
        try {
          native.setNonBlocking(fd, false);
        } catch {
          /* nothing to restore on an fd closed behind our back */
        }
      }
      throw this.#ctx(err);
    }
    this.#native = n;
    this.#slab = Buffer.from(n.slab);
    const ctl = n.control;
    this.#counters = new Float64Array(ctl, 0, IOC.COUNTERS);
    this.#state = new Int32Array(ctl, IOC.COUNTERS * 8, IOC.STATES);
    this.#rxDesc = new Uint32Array(ctl, IOC.COUNTERS * 8 + IOC.STATES * 4, 2 * this.batchSize);
    if (init.queue) this.#unhook = init.queue._onBeforeClose(() => this.#close(false));
  }

  /**
   * The native engine, stepping an 'auto' direction down its chain when
   * setting its io_uring ring up fails at run time (no free fd, no memory):
   * reads multishot -> one-shot io_uring -> poll, writes io_uring -> poll.
   * Only the direction whose ring failed steps down (the addon says which:
   * the error's `ring`, 'rx', 'tx' or 'rx,tx' for the ring both share); an
   * explicit engine whose ring cannot be set up fails (IO_URING_SETUP /
   * IO_URING_REGISTER) without touching the other direction.  The fallbacks
   * are logged once the engine exists, with the engines really used.
   */
  #make(want: { rx: IoEngine; tx: TxEngine }, plan: IoPlan): InstanceType<typeof native.QueueIo> {
    let cur = { ...want };
    const stepped: Array<{ level: 'io_uring' | 'multishot'; reason: string; err: { code: string; errno: number | undefined } }> = [];
    for (;;) {
      let n: InstanceType<typeof native.QueueIo>;
      try {
        n = new native.QueueIo(
          this.#fd,
          { ...cur, batch: this.batchSize, slotSize: this.slotSize, hdrLen: this.hdrLen, rxDropErrnos: [...RX_DROP_ERRNOS], txDropErrnos: [...TX_DROP_ERRNOS] },
          (status, events) => this.#onPoll(status, events),
        );
      } catch (err) {
        if (!(err instanceof MqtapError) || (err.op !== 'IO_URING_SETUP' && err.op !== 'IO_URING_REGISTER')) throw err;
        const ring = ((err as MqtapError & { ring?: unknown }).ring ?? '') as string;
        const rx = ring.split(',').includes('rx');
        const tx = ring.split(',').includes('tx');
        if ((!rx && !tx) || (rx && (plan.rx !== 'auto' || cur.rx === 'poll')) || (tx && (plan.tx !== 'auto' || cur.tx === 'poll'))) throw err;
        const reason = `${err.syscall ?? 'io_uring_setup'}: ${err.code}`;
        const info = { code: err.code, errno: err.errno };
        const next = { ...cur };
        if (rx) next.rx = cur.rx === 'uring-mshot' ? 'uring' : 'poll';
        if (tx) next.tx = 'poll';
        stepped.push({ level: cur.rx === 'uring-mshot' && next.rx === 'uring' && !tx ? 'multishot' : 'io_uring', reason, err: info });
        cur = next;
        continue;
      }
      for (const f of stepped) this.#fellBack(f.level, f.reason, want, n.engine, f.err);
      return n;
    }
  }

  /** Notes (engineNote) and logs, once per logger and reason, that a level of the 'auto' chain was skipped; `engine`: what is used instead. */
  #fellBack(level: 'io_uring' | 'multishot', reason: string, wanted: { rx: IoEngine; tx: TxEngine }, engine: { rx: IoEngine; tx: TxEngine }, err?: { code: string; errno: number | undefined }): void {
    const where = this.#where();
    if (level === 'io_uring') {
      const dirs = engine.rx === 'poll' && engine.tx === 'poll' ? '' : engine.rx === 'poll' ? ' for reads' : ' for writes';
      this.#engineNote = `io_uring is unavailable (${reason}): poll engine${dirs}`;
      const note = this.#engineNote;
      logOnce(this.#log, `io_uring:${reason}:${dirs}`, () =>
        this.#log.warn({ ...where, ...(err ? { err } : {}), wanted, engine, reason: note }, `io_uring unavailable; using the poll engine${dirs}`),
      );
    } else {
      this.#engineNote = `multishot reads are unavailable (${reason}): one-shot io_uring reads`;
      const note = this.#engineNote;
      logOnce(this.#log, `multishot:${reason}`, () =>
        this.#log.info({ ...where, ...(err ? { err } : {}), wanted, engine, reason: note }, 'multishot reads unavailable; one-shot io_uring reads'),
      );
    }
  }

  /** The engines in use. */
  get engine(): { rx: IoEngine; tx: TxEngine } {
    return this.#native.engine;
  }

  /** Why the engines differ from what was asked ('auto' or explicit), if they do: io_uring unavailable or failing. */
  get engineNote(): string | undefined {
    return this.#engineNote;
  }

  #where(): Record<string, unknown> {
    return { ...(this.#ifname !== undefined ? { ifname: this.#ifname } : {}), ...(this.queue ? { queue: this.queue.index } : {}), fd: this.#fd };
  }

  /**
   * native/io.cc reported that io_uring_enter itself failed (ST_RING_ERRNO):
   * what had completed was counted; the queue goes on with plain read/write
   * syscalls for good (the ring is torn down).  Policy: here.
   */
  #checkRing(): boolean {
    const err = this.#state[S.RING_ERRNO]!;
    if (err === 0) return false;
    this.#native.stopUring();
    const e = new MqtapError({ op: 'IO_URING_ENTER', syscall: 'io_uring_enter', errno: err });
    this.#engineNote = `io_uring_enter failed (${e.code}): poll engine from then on`;
    this.#log.warn({ ...this.#where(), err: { code: e.code, errno: err }, engine: this.engine, reason: this.#engineNote }, 'io_uring failed; this queue goes on with the poll engine');
    return true;
  }

  /**
   * Frames longer than the slot were dropped (the truncation guard, native/io.cc
   * RxResult): logged, with what to do, at the 1st, 10th, 100th, ... one.
   */
  #truncated(): void {
    const before = this.#truncatedSeen;
    const now = this.#counters[C.RX_TRUNCATED]!;
    this.#truncatedSeen = now;
    if (before !== 0 && Math.floor(Math.log10(now)) === Math.floor(Math.log10(before))) return;
    this.#log.warn(
      {
        ...this.#where(),
        slotSize: this.slotSize,
        truncated: now,
        reason: 'EMSGSIZE',
        hint: 'a frame filled its slot (the MTU or the offloads were raised after this QueueIO opened?): reopen the QueueIO, or pass slotSize',
      },
      'frames longer than the slot were dropped (truncated, EMSGSIZE)',
    );
  }

  get closed(): boolean {
    return this.#closed;
  }

  #ctx<T>(err: T): T {
    return withContext(err, { ...(this.#ifname !== undefined ? { ifname: this.#ifname } : {}), ...(this.queue ? { queue: this.queue.index } : {}) });
  }

  #closedError(op: string): MqtapError {
    return new MqtapError({
      op,
      code: ErrorCodes.CLOSED,
      ...(this.#ifname !== undefined ? { ifname: this.#ifname } : {}),
      ...(this.queue ? { queue: this.queue.index } : {}),
      message: `${this.#ifname ?? 'fd ' + this.#fd}${this.queue ? ` queue ${this.queue.index}` : ''}: queue I/O is closed`,
    });
  }

  // ---- polling: one handle, interest = what is waiting

  #updatePoll(): void {
    if (this.#closed) return;
    const want = (this.#rxArmed ? READABLE : 0) | (this.#txWaiting ? WRITABLE : 0);
    if (want !== this.#pollEvents) {
      this.#pollEvents = want;
      this.#native.pollSet(want);
    }
    // Only a real wait keeps the event loop alive, not a read left armed.
    const ref = this.#rxWaiter !== undefined || this.#txWaiting;
    if (ref !== this.#pollRefd) {
      this.#pollRefd = ref;
      this.#native.pollRef(ref);
    }
  }

  #onPoll(status: number, events: number): void {
    if (this.#closed) return;
    if (status < 0) {
      // POLLERR (e.g. the device was deleted): libuv stopped the handle.
      // Wake both sides; their next syscall reports the real error.
      this.#pollEvents = 0;
      events = READABLE | WRITABLE;
    }
    if (events & READABLE) {
      // Readable with a reader waiting: wake it and leave READABLE armed, it
      // is likely back for more before the loop polls again (no epoll_ctl
      // per wakeup).  Readable with nobody waiting: the consumer is busy;
      // disarm so the level-triggered poll does not fire every loop turn.
      const wake = this.#rxWaiter;
      this.#rxWaiter = undefined;
      if (wake) wake();
      else this.#rxArmed = false;
    }
    if (events & WRITABLE && this.#txWaiting) {
      this.#txWaiting = false;
      this.#pumpTx();
    }
    this.#updatePoll();
  }

  // ---- receive

  /** Iterates over batches of frames as the kernel sends them out of the tap.  One reader at a time. */
  [Symbol.asyncIterator](): AsyncIterator<FrameBatch> {
    const it = { ended: false };
    return {
      next: () => this.#next(it),
      return: async (): Promise<IteratorResult<FrameBatch>> => {
        it.ended = true;
        this._gen++;
        this.#rxArmed = false;
        this.#updatePoll();
        // A next() still waiting for frames ends too (it returns DONE).
        const wake = this.#rxWaiter;
        this.#rxWaiter = undefined;
        wake?.();
        return DONE;
      },
    };
  }

  /** The same stream as an AsyncIterableIterator (for `for await (const b of io.frames())`). */
  frames(): AsyncIterableIterator<FrameBatch> {
    const it = this[Symbol.asyncIterator]();
    return { next: () => it.next(), return: () => it.return!(), [Symbol.asyncIterator]() { return this; } };
  }

  /**
   * Reads the frames waiting right now, without waiting: a FrameBatch, or
   * undefined when none is waiting.  Releases the previous batch.
   */
  tryRead(): FrameBatch | undefined {
    if (this.#closed) throw this.#closedError('READ');
    if (this.#rxBusy) throw invalidArg('another read is waiting on this queue; use one reader at a time');
    this._gen++;
    return this.#readNow() ?? undefined;
  }

  /** A batch, undefined when nothing is waiting, null at end of file (a socket whose peer closed; never a tap). */
  #readNow(): FrameBatch | undefined | null {
    let n: number;
    try {
      n = this.#native.rxRead();
    } catch (err) {
      this.#checkRing();
      throw this.#ctx(err);
    }
    this.#checkRing();
    if (this.#counters[C.RX_TRUNCATED]! !== this.#truncatedSeen) this.#truncated();
    if (n < 0) return null;
    return n > 0 ? new FrameBatch(this, this._gen, this.#slab, this.#rxDesc, n, this.hdrLen) : undefined;
  }

  async #next(it: { ended: boolean }): Promise<IteratorResult<FrameBatch>> {
    if (this.#rxBusy) throw invalidArg('next() called while the previous next() is still pending; use one reader at a time');
    this._gen++;
    this.#rxBusy = true;
    try {
      for (;;) {
        if (this.#closed || it.ended) return DONE;
        if (this.#syncRuns >= this.#yieldEvery || this.#syncFrames >= this.#yieldFrames) {
          this.#syncRuns = 0;
          this.#syncFrames = 0;
          await immediate();
          continue;
        }
        let b: FrameBatch | undefined | null;
        try {
          b = this.#readNow();
        } catch (err) {
          this.#rxArmed = false; // the stream ends here
          this.#updatePoll();
          throw err;
        }
        if (b === null) {
          this.#rxArmed = false;
          this.#updatePoll();
          return DONE;
        }
        if (b) {
          this.#syncRuns++;
          this.#syncFrames += b.count;
          return { done: false, value: b };
        }
        this.#syncRuns = 0;
        this.#syncFrames = 0;
        this.#counters[C.RX_WAITS]! += 1;
        await new Promise<void>((resolve) => {
          this.#rxWaiter = resolve;
          this.#rxArmed = true;
          this.#updatePoll();
        });
      }
    } finally {
      this.#rxBusy = false;
    }
  }

  // ---- transmit

  /**
   * Writes frames into the kernel (as if received on this queue), in order,
   * after every batch passed before.  Resolves when all are written (waiting
   * for POLLOUT whenever the kernel says EAGAIN).  Rejects with the errno of
   * the first refused frame (err.written, err.dropped) if the
   * kernel refused some, after writing the others; with ERR_CLOSED if the
   * queue I/O closes first.  A FrameBatch (from any queue) is written with
   * the headers it was read with, straight from the source queue's slab when
   * it can be written at once; one that has to wait (EAGAIN, or behind other
   * batches) is copied first, so the source may read its next batch.
   */
  writeBatch(frames: readonly Uint8Array[] | FrameBatch, opts: WriteOptions = {}): Promise<WriteResult> {
    if (this.#closed) return Promise.reject(this.#closedError('WRITE'));
    let job: TxJob;
    try {
      job = this.#prepare(frames, opts);
    } catch (err) {
      this.#dropUnqueuedScratch();
      return Promise.reject(err);
    }
    return this.#submit(job);
  }

  /**
   * writeBatch for frames packed back to back in one buffer: frame i is the
   * `lengths[i]` bytes after frame i-1 (the first starts at data[0]).  The
   * cheapest way to hand many frames over: no per-frame object is looked
   * at, so JavaScript's cost per frame is a few nanoseconds.  Same ordering,
   * backpressure and error rules as writeBatch; `data` must stay unchanged
   * until the promise settles.
   */
  writePacked(data: Uint8Array, lengths: ArrayLike<number>, opts: WriteOptions = {}): Promise<WriteResult> {
    if (this.#closed) return Promise.reject(this.#closedError('WRITE'));
    let job: TxJob;
    try {
      job = this.#preparePacked(data, lengths, opts);
    } catch (err) {
      this.#dropUnqueuedScratch();
      return Promise.reject(err);
    }
    return this.#submit(job);
  }

  #submit(job: TxJob): Promise<WriteResult> {
    this.#tx.push(job);
    this.#counters[C.TX_BATCHES]! += 1;
    if (this.#tx.length === 1 && !this.#txWaiting) this.#pumpTx();
    else if (job.fromSlab) this.#ownFrames(job); // it waits behind others: the source may read on meanwhile
    // Written (or failed) at once, the usual case: no executor, no closures.
    if (job.settled === 1) return Promise.resolve(job.outcome as WriteResult);
    if (job.settled === 2) return Promise.reject(job.outcome);
    return new Promise<WriteResult>((resolve, reject) => {
      job.resolve = resolve;
      job.reject = reject;
    });
  }

  /** Settles a job's promise, or keeps the outcome for #submit when there is none yet. */
  #settle(job: TxJob, ok: boolean, v: unknown): void {
    const f = ok ? job.resolve : job.reject;
    if (f !== undefined) f(v as WriteResult);
    else {
      job.settled = ok ? 1 : 2;
      job.outcome = v;
    }
  }

  #newJob(withHdr: boolean): TxJob {
    return {
      fromSlab: false,
      bufs: [],
      desc: NO_DESC,
      next: 0,
      count: 0,
      withHdr,
      written: 0,
      bytes: 0,
      dropped: 0,
      dropErrno: 0,
      waits: 0,
      resolve: undefined,
      reject: undefined,
      settled: 0,
      outcome: undefined,
    };
  }

  /**
   * A descriptor array of `len` words for `job`: the QueueIO's reusable one
   * when no other job holds it (the usual case: a job is written right away),
   * else a new one.  Saves an allocation (and the GC work) per batch.
   */
  #takeDesc(job: TxJob, len: number): Uint32Array {
    if (this.#scratchHolder !== undefined) return (job.desc = new Uint32Array(len));
    if (this.#scratch.length < len) this.#scratch = new Uint32Array(Math.max(len, 2 * this.#scratch.length));
    this.#scratchHolder = job;
    return (job.desc = this.#scratch); // the addon reads only the first 3 * count words
  }

  #releaseDesc(job: TxJob): void {
    if (this.#scratchHolder === job) this.#scratchHolder = undefined;
  }

  /** Copies a FrameBatch job's unwritten frames out of the receive slab into a buffer of its own. */
  #ownFrames(job: TxJob): void {
    const d = job.desc;
    const src = job.bufs[0]!;
    let total = 0;
    for (let i = job.next; i < job.count; i++) total += d[3 * i + 2]!;
    const copy = Buffer.alloc(total);
    for (let i = job.next, off = 0; i < job.count; i++) {
      const len = d[3 * i + 2]!;
      copy.set(new Uint8Array(src, d[3 * i + 1]!, len), off);
      d[3 * i] = 0;
      d[3 * i + 1] = copy.byteOffset + off;
      off += len;
    }
    job.bufs = [copy.buffer as ArrayBuffer];
    job.fromSlab = false;
  }

  /** A job that failed before it was queued (bad frames, a throwing getter) gives the scratch back. */
  #dropUnqueuedScratch(): void {
    if (this.#scratchHolder !== undefined && !this.#tx.includes(this.#scratchHolder)) this.#scratchHolder = undefined;
  }

  #preparePacked(data: Uint8Array, lengths: ArrayLike<number>, opts: WriteOptions): TxJob {
    if (!(data instanceof Uint8Array)) throw invalidArg('writePacked(data, lengths): data must be a Buffer/Uint8Array');
    if (opts.withHeader !== undefined && typeof opts.withHeader !== 'boolean') throw invalidArg('withHeader must be a boolean');
    const job = this.#newJob(opts.withHeader === true && this.hdrLen > 0);
    const min = (job.withHdr ? this.hdrLen : 0) + 14;
    if (!(data.buffer instanceof ArrayBuffer)) data = Buffer.from(data);
    const n = lengths.length;
    const desc = this.#takeDesc(job, 3 * n);
    let off = data.byteOffset;
    const end = data.byteOffset + data.byteLength;
    for (let i = 0; i < n; i++) {
      const len = lengths[i]!;
      if (!(len >= min) || off + len > end || len !== (len >>> 0)) throw invalidArg(`writePacked: frame ${i} (${len} bytes at ${off - data.byteOffset}) is shorter than ${min} bytes or runs past the data`);
      desc[3 * i + 1] = off;
      desc[3 * i + 2] = len;
      off += len;
    }
    job.bufs.push(data.buffer as ArrayBuffer);
    job.count = n;
    return job;
  }

  #prepare(frames: readonly Uint8Array[] | FrameBatch, opts: WriteOptions): TxJob {
    const job = this.#newJob(false);
    if (frames instanceof FrameBatch) {
      if (frames.hdrLen !== this.hdrLen) throw invalidArg(`the batch has ${frames.hdrLen}-byte headers, this queue ${this.hdrLen}-byte ones`);
      const n = frames.count;
      const slab = frames.slab;
      job.bufs.push(slab.buffer as ArrayBuffer);
      frames._fill(this.#takeDesc(job, 3 * n), slab.byteOffset);
      job.count = n;
      job.withHdr = true;
      job.fromSlab = true;
      return job;
    }
    if (!Array.isArray(frames)) throw invalidArg('writeBatch(frames): an array of Buffers/Uint8Arrays or a FrameBatch');
    if (opts.withHeader !== undefined && typeof opts.withHeader !== 'boolean') throw invalidArg('withHeader must be a boolean');
    job.withHdr = opts.withHeader === true && this.hdrLen > 0;
    const min = (job.withHdr ? this.hdrLen : 0) + 14;
    const n = frames.length;
    const desc = this.#takeDesc(job, 3 * n);
    const bufs = job.bufs;
    // Frames usually come from one buffer (a pool, a slab) or each from its
    // own: the last buffer is checked first, a Map only once there are many.
    let index: Map<ArrayBufferLike, number> | undefined;
    let lastAb: ArrayBufferLike | undefined;
    let lastIdx = 0;
    let prev: unknown = NO_DESC; // never a frame
    let prevOff = 0;
    let prevLen = 0;
    for (let i = 0; i < n; i++) {
      let f = frames[i];
      if (f === prev) {
        // The same view again (a template frame sent N times): its triple
        // is known (kept in locals: no loads back from the array), and
        // reading `.buffer` (a C++ builtin, not inlined) is the largest
        // per-frame cost here.
        desc[3 * i] = lastIdx;
        desc[3 * i + 1] = prevOff;
        desc[3 * i + 2] = prevLen;
        continue;
      }
      prev = f;
      if (!(f instanceof Uint8Array)) throw invalidArg(`writeBatch: frame ${i} is not a Buffer/Uint8Array`);
      let ab: ArrayBufferLike = f.buffer;
      if (ab !== lastAb) {
        if (!(ab instanceof ArrayBuffer)) {
          f = Buffer.from(f); // SharedArrayBuffer-backed: copy into an ordinary buffer
          ab = f.buffer;
        }
        let idx: number | undefined;
        if (index !== undefined) idx = index.get(ab);
        else if (bufs.length < 8) {
          idx = bufs.indexOf(ab as ArrayBuffer);
          if (idx < 0) idx = undefined;
        } else {
          index = new Map();
          for (let k = 0; k < bufs.length; k++) index.set(bufs[k]!, k);
          idx = index.get(ab);
        }
        if (idx === undefined) {
          idx = bufs.push(ab as ArrayBuffer) - 1;
          index?.set(ab, idx);
        }
        lastAb = ab;
        lastIdx = idx;
      }
      const len = f.byteLength;
      if (len < min) throw invalidArg(`writeBatch: frame ${i} has ${len} bytes; at least ${min} (${job.withHdr ? 'header + ' : ''}Ethernet header) are needed`);
      prevOff = f.byteOffset;
      prevLen = len;
      desc[3 * i] = lastIdx;
      desc[3 * i + 1] = prevOff;
      desc[3 * i + 2] = len;
    }
    job.desc = desc;
    job.count = n;
    return job;
  }

  /** Writes queued jobs until done or EAGAIN (then waits for POLLOUT). */
  #pumpTx(): void {
    const ctr = this.#counters;
    while (this.#tx.length > 0 && !this.#closed) {
      const job = this.#tx[0]!;
      const f0 = ctr[C.TX_FRAMES]!;
      const b0 = ctr[C.TX_BYTES]!;
      try {
        job.next = this.#native.txWrite(job.bufs, job.desc, job.next, job.count, job.withHdr);
      } catch (err) {
        // A txWrite that failed the ring (ST_RING_ERRNO) and threw: step down now, before
        // the next rxRead (the addon reads nothing while a failed ring's multishot is armed).
        this.#checkRing();
        this.#tx.shift();
        this.#releaseDesc(job);
        job.written += ctr[C.TX_FRAMES]! - f0;
        const e = this.#ctx(err);
        if (e instanceof MqtapError) Object.assign(e, { written: job.written, dropped: job.dropped });
        this.#settle(job, false, e);
        continue;
      }
      job.count = this.#state[S.COUNT]!;
      job.written += ctr[C.TX_FRAMES]! - f0;
      job.bytes += ctr[C.TX_BYTES]! - b0;
      const dropped = this.#state[S.DROPPED]!;
      if (dropped > 0) {
        if (job.dropped === 0) job.dropErrno = this.#state[S.DROP_ERRNO]!;
        job.dropped += dropped;
      }
      // Not an EAGAIN when the ring failed: go on at once without it.
      if (this.#checkRing() && job.next < job.count) continue;
      if (job.next < job.count) {
        // EAGAIN: wait for POLLOUT, then go on from job.next.
        if (job.fromSlab) this.#ownFrames(job);
        job.waits++;
        ctr[C.TX_WAITS]! += 1;
        this.#txWaiting = true;
        this.#updatePoll();
        return;
      }
      this.#tx.shift();
      this.#releaseDesc(job);
      if (job.dropped > 0) {
        const e = new MqtapError({
          op: 'WRITE',
          errno: job.dropErrno,
          syscall: 'write',
          ...(this.#ifname !== undefined ? { ifname: this.#ifname } : {}),
          ...(this.queue ? { queue: this.queue.index } : {}),
        });
        e.setMessage(`${e.message}: the kernel refused ${job.dropped} of the frames (${job.written} written)`);
        Object.assign(e, { written: job.written, dropped: job.dropped });
        this.#settle(job, false, e);
      } else {
        this.#settle(job, true, { frames: job.written, bytes: job.bytes, waits: job.waits });
      }
    }
  }

  // ---- counters and lifecycle

  /** This queue's counters since the QueueIO was opened. */
  stats(): QueueIOStats {
    const c = this.#counters;
    return {
      queue: this.queue?.index ?? -1,
      engine: this.engine,
      rx: {
        frames: c[C.RX_FRAMES]!,
        bytes: c[C.RX_BYTES]!,
        batches: c[C.RX_BATCHES]!,
        drops: c[C.RX_DROPS]!,
        waits: c[C.RX_WAITS]!,
        syscalls: c[C.RX_SYSCALLS]!,
        rearms: c[C.RX_REARMS]!,
        drains: c[C.RX_DRAINS]!,
        truncated: c[C.RX_TRUNCATED]!,
      },
      tx: {
        frames: c[C.TX_FRAMES]!,
        bytes: c[C.TX_BYTES]!,
        batches: c[C.TX_BATCHES]!,
        drops: c[C.TX_DROPS]!,
        waits: c[C.TX_WAITS]!,
        syscalls: c[C.TX_SYSCALLS]!,
        eagain: c[C.TX_EAGAIN]!,
        reordered: c[C.TX_REORDERED]!,
      },
    };
  }

  /**
   * Stops polling (first), ends the frame stream and rejects writes still
   * waiting.  The queue and its fd stay open.  Harmless when closed.
   */
  close(): void {
    this.#close(true);
  }

  #close(restoreFlags: boolean): void {
    if (this.#closed) return;
    this.#closed = true;
    this._gen++;
    this.#native.close();
    this.#pollEvents = 0;
    this.#unhook?.();
    if (this.queue) byQueue.delete(this.queue);
    if (restoreFlags && this.#restoreNonBlock && (!this.queue || this.queue.state !== 'closed')) {
      try {
        native.setNonBlocking(this.#fd, false);
      } catch {
        /* the fd may have been closed behind our back; nothing to restore then */
      }
    }
    const wake = this.#rxWaiter;
    this.#rxWaiter = undefined;
    wake?.();
    this.#scratchHolder = undefined;
    for (const job of this.#tx.splice(0)) {
      const e = this.#closedError('WRITE');
      Object.assign(e, { written: job.written, dropped: job.dropped });
      e.setMessage(`${e.message} (${job.written} of the batch's frames were written)`);
      this.#settle(job, false, e);
    }
    this.#txWaiting = false;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** TUNSETOFFLOAD bits that let the kernel hand the reader GSO frames (up to 64 KiB) unsegmented. */
const GSO_OFFLOADS = (): number => K.TUN_F_TSO4 | K.TUN_F_TSO6 | K.TUN_F_UFO | TUN_F.USO4 | TUN_F.USO6;

/** A slot for any frame a tap hands out, 64 KiB GSO frames included: header + 65,535 + 14 + 1, in 64-byte units. */
function gsoSlotSize(hdrLen: number): number {
  return Math.ceil((hdrLen + 65550) / 64) * 64;
}

/** Frames read back to back before the event loop gets a turn, when yieldEvery is not given. */
const YIELD_FRAMES = 1024;

/**
 * Frames per receive batch when `batch` is not given: 256 for any slot up to
 * 128 KiB (every default slot, the 64 KiB GSO one included), else 64.  Per
 * batch, JavaScript pays a promise, a FrameBatch and a call into the addon
 * with its io_uring_enter (2.5-12 us on a 2-vCPU EPYC); at 64 frames that
 * was 0.04-0.19 us of a 0.45-0.8 us 60-byte frame, at 256 it is a quarter
 * of that (issue 12, docs/datapath.md "The default batch").  The slab is
 * committed lazily: 256 slots of 64 KiB are 16 MiB of address space, and
 * resident only where frames were written (a page per small frame).
 */
export function defaultBatch(slotSize: number): number {
  return slotSize <= 128 * 1024 ? 256 : 64;
}

/**
 * The default slot of a queue of `tap`: room for the longest frame the tap
 * can hand its reader, plus the one byte that tells a whole frame from a cut
 * one (the truncation guard: a frame that fills its slot is dropped).  That
 * is header + 18 (Ethernet header and one VLAN tag) + MTU, unless the
 * offloads the tap's reader accepts (Tap.offloads: TSO4/TSO6/USO/UFO) let
 * the kernel hand over GSO frames, or they are unknown (a device this
 * process did not create), or the MTU cannot be read: then 64 KiB + header.
 * The MTU is read now (rtnetlink); raising it or the offloads later makes
 * longer frames count as truncated drops (docs/datapath.md).
 */
export function defaultSlotSize(tap: Tap, hdrLen: number): number {
  const offloads = tap.offloads;
  if (offloads === undefined || (offloads & GSO_OFFLOADS()) !== 0) return gsoSlotSize(hdrLen);
  let mtu: number | undefined;
  try {
    mtu = getLink(tap.name, tap.netns !== undefined ? { netns: tap.netns } : {})?.mtu;
  } catch {
    mtu = undefined;
  }
  if (mtu === undefined || !(mtu > 0)) return gsoSlotSize(hdrLen);
  return Math.max(128, Math.ceil((hdrLen + 18 + mtu + 1) / 64) * 64);
}

/**
 * Opens batched I/O on a queue.  One QueueIO per queue; the queue's fd is
 * made non-blocking while it lives.  Closing the queue (or the tap) closes
 * the QueueIO first.  The virtio-net header size is read now (TUNGETVNETHDRSZ):
 * set it before opening I/O.
 */
export function openQueueIO(queue: TapQueue, opts: QueueIOOptions = {}): QueueIO {
  if (!(queue instanceof TapQueue)) throw invalidArg('openQueueIO(queue): a TapQueue from openTap() is required (use openFdIO for a bare fd)');
  const plan = planIo(opts);
  if (queue.state === 'closed')
    throw new MqtapError({ op: 'QUEUE_IO', code: ErrorCodes.CLOSED, ifname: queue.tap.name, queue: queue.index, message: `${queue.tap.name} queue ${queue.index} is closed` });
  const existing = byQueue.get(queue);
  if (existing && !existing.closed) throw invalidArg(`${queue.tap.name} queue ${queue.index} already has an open QueueIO; close it first`);
  let hdrLen: number;
  let sndbuf: number;
  try {
    hdrLen = queue.tap.vnetHdr ? native.tunGetVnetHdrSz(queue.fd) : 0;
    sndbuf = native.tunGetSndbuf(queue.fd);
  } catch (err) {
    throw withContext(err, { ifname: queue.tap.name, queue: queue.index });
  }
  const defaultSlot = plan.slotSize === undefined ? defaultSlotSize(queue.tap, hdrLen) : undefined;
  const io = new QueueIO({ fd: queue.fd, queue, ifname: queue.tap.name, hdrLen, plan, sndbuf, ...(defaultSlot !== undefined ? { defaultSlot } : {}) });
  byQueue.set(queue, io);
  return io;
}

/** openQueueIO for every open queue of a tap, by index. */
export function openTapIO(tap: Tap, opts: QueueIOOptions = {}): QueueIO[] {
  const out: QueueIO[] = [];
  try {
    for (const q of tap.openQueues()) out.push(openQueueIO(q, opts));
  } catch (err) {
    for (const io of out) io.close();
    throw err;
  }
  return out;
}

/**
 * Batched I/O on a bare queue fd, e.g. one inherited from `mqtap exec`
 * (MQTAP_FDS) or passed over a socket.  The caller owns the fd and must
 * close the QueueIO before closing the fd.  `hdrLen` is the tap's
 * virtio-net header size (0 without IFF_VNET_HDR); default: asked from the
 * kernel (TUNGETIFF, TUNGETVNETHDRSZ).
 *
 * Any fd that keeps message boundaries works (a SOCK_SEQPACKET or SOCK_DGRAM
 * socket, say; the unit tests use a socketpair): give `hdrLen` then.  For
 * an fd that is not a tap, writes may say EAGAIN at any time, so they are
 * made in order with plain syscalls.
 */
export function openFdIO(fd: number, opts: QueueIOOptions & { hdrLen?: number; ifname?: string } = {}): QueueIO {
  if (!Number.isInteger(fd) || fd < 0) throw invalidArg('openFdIO(fd): a file descriptor number is required');
  const { hdrLen: h, ifname, ...rest } = opts;
  const plan = planIo(rest);
  // TUNGETIFF says whether the device has IFF_VNET_HDR; TUNGETVNETHDRSZ how long it is.
  const hdrLen = h ?? (native.tunGetIff(fd).flags & K.IFF_VNET_HDR ? native.tunGetVnetHdrSz(fd) : 0);
  if (!Number.isInteger(hdrLen) || hdrLen < 0 || hdrLen > 64) throw invalidArg('hdrLen must be 0..64');
  let sndbuf = 0;
  try {
    sndbuf = native.tunGetSndbuf(fd);
  } catch {
    /* not a tap: EAGAIN is always possible */
  }
  return new QueueIO({ fd, queue: undefined, ifname, hdrLen, plan, sndbuf });
}

/** Sums the counters of several queues (e.g. openTapIO's). */
export function totalStats(all: readonly QueueIOStats[]): Omit<QueueIOStats, 'queue' | 'engine'> {
  const zero = (): DirectionStats => ({ frames: 0, bytes: 0, batches: 0, drops: 0, waits: 0, syscalls: 0 });
  const rx = { ...zero(), rearms: 0, drains: 0, truncated: 0 };
  const tx = { ...zero(), eagain: 0, reordered: 0 };
  for (const s of all) {
    for (const k of Object.keys(rx) as Array<keyof typeof rx>) rx[k] += s.rx[k];
    for (const k of Object.keys(tx) as Array<keyof typeof tx>) tx[k] += s.tx[k];
  }
  return { rx, tx };
}

/**
 * TUNSETSNDBUF for the whole tap: how many bytes of written frames a queue
 * may have in flight in the kernel before its writes say EAGAIN.  The kernel
 * default (INT_MAX) never says EAGAIN; lower it to give writers
 * backpressure from a slow path (a qdisc that holds frames, say).
 */
export function setSendBuffer(tap: Tap, bytes: number): void {
  if (!Number.isInteger(bytes) || bytes < 1 || bytes > IOC.INT_MAX) throw invalidArg(`send buffer must be 1..${IOC.INT_MAX} bytes`);
  const q = tap.openQueues()[0];
  if (!q) throw new MqtapError({ op: 'TUNSETSNDBUF', code: ErrorCodes.CLOSED, ifname: tap.name, message: `${tap.name} is closed` });
  try {
    native.tunSetSndbuf(q.fd, bytes);
  } catch (err) {
    throw withContext(err, { ifname: tap.name });
  }
}

/** TUNGETSNDBUF. */
export function getSendBuffer(tap: Tap): number {
  const q = tap.openQueues()[0];
  if (!q) throw new MqtapError({ op: 'TUNGETSNDBUF', code: ErrorCodes.CLOSED, ifname: tap.name, message: `${tap.name} is closed` });
  return native.tunGetSndbuf(q.fd);
}

// ---------------------------------------------------------------- offloads

/** TUNSETOFFLOAD bits, from the kernel headers (USO4/USO6: see native/tun.cc). */
export const TUN_F = Object.freeze({
  CSUM: K.TUN_F_CSUM,
  TSO4: K.TUN_F_TSO4,
  TSO6: K.TUN_F_TSO6,
  TSO_ECN: K.TUN_F_TSO_ECN,
  UFO: K.TUN_F_UFO,
  USO4: K.TUN_F_USO4,
  USO6: K.TUN_F_USO6,
});

/** Offloads the tap's reader accepts, i.e. frames the kernel may hand it unsegmented / with partial checksums. */
export interface OffloadRequest {
  csum?: boolean;
  tso4?: boolean;
  tso6?: boolean;
  tsoEcn?: boolean;
  /**
   * UDP segmentation offload (USO4 and USO6 together: tun takes them only as
   * a pair).  true: required (fails where the kernel lacks it); 'if-available':
   * used when the kernel takes it.  Needs csum.
   */
  uso?: boolean | 'if-available';
}

export interface OffloadResult {
  /** The TUN_F_* bits the kernel accepted. */
  flags: number;
  csum: boolean;
  tso4: boolean;
  tso6: boolean;
  tsoEcn: boolean;
  /** 'on', 'off' (not asked for) or 'unsupported' (asked 'if-available', the kernel said EINVAL). */
  uso: 'on' | 'off' | 'unsupported';
}

/**
 * Sets the tap's offloads with one TUNSETOFFLOAD (which replaces the whole
 * set) and reports what the kernel took.  USO is probed at run time: with
 * `uso: 'if-available'` a kernel without it (EINVAL: tun rejects unknown
 * bits, "so the user can test for new features by trying to set them") gets
 * the same request without USO.  The flags and their rules are
 * lib/tap/tap.ts's offloadFlags (Tap.setOffloads without the USO probing).
 */
export function applyOffloads(tap: Tap, req: OffloadRequest): OffloadResult {
  if (typeof req !== 'object' || req === null) throw invalidArg('offloads must be an object');
  for (const k of Object.keys(req)) if (!['csum', 'tso4', 'tso6', 'tsoEcn', 'uso'].includes(k)) throw invalidArg(`unknown offload "${k}"`);
  if (!tap.vnetHdr) throw invalidArg(`${tap.name} has no virtio-net header: offloads need vnetHdr`);
  const { csum = false, tso4 = false, tso6 = false, tsoEcn = false, uso = false } = req;
  if (uso !== false && uso !== true && uso !== 'if-available') throw invalidArg("uso must be true, false or 'if-available'");
  if (uso !== false && !csum) throw invalidArg('offloads: TSO/USO need csum: true as well', 'the kernel refuses segmentation offloads without checksum offload');
  const base = offloadFlags({ csum, tso4, tso6, tsoEcn });
  const q = tap.openQueues()[0];
  if (!q) throw new MqtapError({ op: 'TUNSETOFFLOAD', code: ErrorCodes.CLOSED, ifname: tap.name, message: `${tap.name} is closed` });
  const result = (flags: number, u: OffloadResult['uso']): OffloadResult => ({ flags, csum, tso4, tso6, tsoEcn, uso: u });
  if (uso !== false) {
    try {
      native.tunSetOffload(q.fd, base | TUN_F.USO4 | TUN_F.USO6);
      tap._offloadsSet(base | TUN_F.USO4 | TUN_F.USO6);
      return result(base | TUN_F.USO4 | TUN_F.USO6, 'on');
    } catch (err) {
      if (!(err instanceof MqtapError) || err.code !== 'EINVAL' || uso === true)
        throw withContext(err, { ifname: tap.name, ...(err instanceof MqtapError && err.code === 'EINVAL' ? { hint: 'this kernel has no UDP segmentation offload for taps (USO needs Linux 6.2+)' } : {}) });
    }
  }
  try {
    native.tunSetOffload(q.fd, base);
  } catch (err) {
    throw withContext(err, { ifname: tap.name });
  }
  tap._offloadsSet(base);
  return result(base, uso === false ? 'off' : 'unsupported');
}
