/**
 * lib/vhost/ — kernel vhost-net (this file), the userspace split-vring driver
 * (vring.ts) and queue pairs of tap queue + vhost-net fd (netdev.ts).
 *
 * vhost-net: probing, feature bits, and a userspace driver for one queue
 * pair (like the kernel's tools/virtio/vhost_net_test.c): split virtqueues in
 * process memory, a memory table mapping "guest" address = process address,
 * kick/call/err eventfds, and helpers to push frames into the TX ring and
 * collect them from the RX ring.
 *
 * Virtqueue 0 of a vhost-net fd is RX (device -> driver: frames the kernel
 * sends to the tap), virtqueue 1 is TX (driver -> device: frames that enter
 * the kernel as if received on the tap).
 *
 * Ownership: VHOST_SET_OWNER binds a vhost-net fd to the memory of the
 * process that calls it, once.  Only the process that drives the rings may do
 * it: this one through VhostPairDriver, or QEMU when the fd is handed to it.
 * Opening a fd (openNetdev) never sets the owner.  See docs/vhost.md.
 */
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCodes, MqtapError, invalidArg, withContext } from '../sys/errors';
import { K, native } from '../sys/native';
import { SplitVirtqueue, vringLayout } from './vring';

export const VHOST_NET_RX = 0;
export const VHOST_NET_TX = 1;

/**
 * Named virtio/vhost feature bits (bit numbers from the kernel headers).
 * Bit 27 has two names: VIRTIO_F_ANY_LAYOUT in virtio, and
 * VHOST_NET_F_VIRTIO_NET_HDR for vhost-net (the device adds and strips the
 * virtio-net header itself).
 */
export const FEATURE_BITS: Readonly<Record<string, number>> = {
  CSUM: K.VIRTIO_NET_F_CSUM,
  GUEST_CSUM: K.VIRTIO_NET_F_GUEST_CSUM,
  MAC: K.VIRTIO_NET_F_MAC,
  GUEST_TSO4: K.VIRTIO_NET_F_GUEST_TSO4,
  GUEST_TSO6: K.VIRTIO_NET_F_GUEST_TSO6,
  GUEST_ECN: K.VIRTIO_NET_F_GUEST_ECN,
  GUEST_UFO: K.VIRTIO_NET_F_GUEST_UFO,
  HOST_TSO4: K.VIRTIO_NET_F_HOST_TSO4,
  HOST_TSO6: K.VIRTIO_NET_F_HOST_TSO6,
  HOST_ECN: K.VIRTIO_NET_F_HOST_ECN,
  HOST_UFO: K.VIRTIO_NET_F_HOST_UFO,
  MRG_RXBUF: K.VIRTIO_NET_F_MRG_RXBUF,
  STATUS: K.VIRTIO_NET_F_STATUS,
  CTRL_VQ: K.VIRTIO_NET_F_CTRL_VQ,
  MQ: K.VIRTIO_NET_F_MQ,
  NOTIFY_ON_EMPTY: K.VIRTIO_F_NOTIFY_ON_EMPTY,
  LOG_ALL: K.VHOST_F_LOG_ALL,
  VHOST_NET_VIRTIO_NET_HDR: K.VHOST_NET_F_VIRTIO_NET_HDR,
  ANY_LAYOUT: K.VIRTIO_F_ANY_LAYOUT,
  INDIRECT_DESC: K.VIRTIO_RING_F_INDIRECT_DESC,
  EVENT_IDX: K.VIRTIO_RING_F_EVENT_IDX,
  VERSION_1: K.VIRTIO_F_VERSION_1,
  ACCESS_PLATFORM: K.VIRTIO_F_ACCESS_PLATFORM,
  RING_PACKED: K.VIRTIO_F_RING_PACKED,
  IN_ORDER: K.VIRTIO_F_IN_ORDER,
};

/**
 * vhost's own protocol features (VHOST_GET_BACKEND_FEATURES): a separate bit
 * space from virtio's (linux/vhost_types.h, VHOST_BACKEND_F_*).
 */
export const BACKEND_FEATURE_BITS: Readonly<Record<string, number>> = {
  IOTLB_MSG_V2: 1,
  IOTLB_BATCH: 2,
  IOTLB_ASID: 3,
  SUSPEND: 4,
  RESUME: 5,
  ENABLE_AFTER_DRIVER_OK: 6,
};

/**
 * Features the in-process driver (VhostPairDriver) implements.  VERSION_1
 * and MRG_RXBUF change the header (12 bytes, num_buffers); NOTIFY_ON_EMPTY
 * and INDIRECT_DESC change nothing for a driver that never suppresses
 * notifications and never builds indirect tables.
 */
export const DRIVER_FEATURES: readonly string[] = ['VERSION_1', 'MRG_RXBUF', 'NOTIFY_ON_EMPTY', 'INDIRECT_DESC'];

/** Why the driver refuses features vhost-net offers. */
const DRIVER_REFUSES: Readonly<Record<string, string>> = {
  LOG_ALL: 'it needs a dirty-page log (VHOST_SET_LOG_BASE), which only live migration uses',
  VHOST_NET_VIRTIO_NET_HDR: 'vhost-net would add and strip the virtio-net header itself; the driver uses the tap\'s header',
  ANY_LAYOUT: 'for vhost-net bit 27 is VHOST_NET_F_VIRTIO_NET_HDR (vhost-net would add and strip the header itself)',
  EVENT_IDX: 'the driver does not maintain used_event/avail_event',
  ACCESS_PLATFORM: 'it needs a device IOTLB (VHOST_IOTLB_MSG), which the driver does not implement',
  RING_PACKED: 'the driver implements split rings only',
  IN_ORDER: 'the driver does not implement in-order completion',
};

export interface DecodedFeatures {
  /** The mask as 0x-prefixed hex. */
  hex: string;
  /** Names of the known bits that are set (a bit with two names gives both). */
  names: string[];
  /** Bit numbers that are set but have no name here. */
  unknownBits: number[];
}

function decodeWith(table: Readonly<Record<string, number>>, mask: bigint): DecodedFeatures {
  if (typeof mask !== 'bigint' || mask < 0n || mask >= 1n << 64n) throw invalidArg(`a feature mask is a bigint from 0 to 2^64-1 (got ${String(mask)})`);
  const names: string[] = [];
  const unknownBits: number[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (!((mask >> BigInt(bit)) & 1n)) continue;
    const these = Object.keys(table).filter((n) => table[n] === bit);
    if (these.length) names.push(...these);
    else unknownBits.push(bit);
  }
  return { hex: `0x${mask.toString(16)}`, names, unknownBits };
}

/** Names of the virtio/vhost feature bits set in `mask`. */
export function decodeFeatures(mask: bigint): DecodedFeatures {
  return decodeWith(FEATURE_BITS, mask);
}

/** Names of the vhost backend (protocol) feature bits set in `mask`. */
export function decodeBackendFeatures(mask: bigint): DecodedFeatures {
  return decodeWith(BACKEND_FEATURE_BITS, mask);
}

/** A feature mask from names; unknown names are refused. */
export function featureMask(names: readonly string[]): bigint {
  if (!Array.isArray(names)) throw invalidArg('features must be an array of names such as ["VERSION_1"]');
  let mask = 0n;
  for (const n of names) {
    const bit = typeof n === 'string' && Object.hasOwn(FEATURE_BITS, n) ? FEATURE_BITS[n] : undefined;
    if (bit === undefined) throw invalidArg(`unknown feature ${JSON.stringify(n)} (known: ${Object.keys(FEATURE_BITS).join(', ')})`);
    mask |= 1n << BigInt(bit);
  }
  return mask;
}

/**
 * The mask for features the in-process driver is asked to negotiate.
 * Unknown names: ERR_INVALID_ARG.  Known features the driver does not
 * implement: ERR_UNSUPPORTED, naming the feature and why.
 */
export function driverFeatureMask(names: readonly string[]): bigint {
  const mask = featureMask(names);
  const supported = featureMask(DRIVER_FEATURES);
  const refused = mask & ~supported;
  if (refused) {
    const which = decodeFeatures(refused).names;
    const why = which.map((n) => `${n}: ${DRIVER_REFUSES[n] ?? 'it is a device feature vhost-net does not implement'}`);
    throw new MqtapError({
      op: 'VHOST_SET_FEATURES',
      code: ErrorCodes.UNSUPPORTED,
      message: `the vhost pair driver cannot negotiate ${which.join(', ')} (${why.join('; ')})`,
      hint: `the driver implements ${DRIVER_FEATURES.join(', ')}`,
    });
  }
  return mask;
}

export interface VhostProbe {
  devicePath: string;
  /** The device node exists. */
  present: boolean;
  /** It could be opened read-write. */
  openable: boolean;
  /** It was opened and answered VHOST_GET_FEATURES: it is a vhost-net device this process can use. */
  usable: boolean;
  features?: DecodedFeatures;
  backendFeatures?: DecodedFeatures;
  error?: { code: string; message: string; hint?: string };
}

function probeError(err: unknown): { code: string; message: string; hint?: string } {
  if (!(err instanceof MqtapError)) throw err;
  return { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) };
}

/** Is vhost-net here and usable?  Never throws for a missing, forbidden or wrong device. */
export function probeVhostNet(opts: { devicePath?: string } = {}): VhostProbe {
  const devicePath = opts.devicePath ?? '/dev/vhost-net';
  const present = existsSync(devicePath);
  let fd: number;
  try {
    fd = native.vhostOpen(devicePath);
  } catch (err) {
    return { devicePath, present, openable: false, usable: false, error: probeError(err) };
  }
  try {
    let features: DecodedFeatures;
    try {
      features = decodeFeatures(native.vhostGetFeatures(fd));
    } catch (err) {
      const e = probeError(err);
      return {
        devicePath,
        present,
        openable: true,
        usable: false,
        error: { code: e.code, message: `${devicePath} is not a vhost-net device: ${e.message}`, hint: 'point vhostDevicePath at /dev/vhost-net (character device 10:238); load it with `modprobe vhost_net`' },
      };
    }
    let backendFeatures: DecodedFeatures | undefined;
    try {
      backendFeatures = decodeBackendFeatures(native.vhostGetBackendFeatures(fd));
    } catch {
      // older kernels: no backend features
    }
    return { devicePath, present, openable: true, usable: true, features, ...(backendFeatures ? { backendFeatures } : {}) };
  } finally {
    native.close(fd);
  }
}

/** The virtio-net header size vhost-net and the tap must agree on for `features`. */
export function vnetHdrSizeFor(features: bigint): 10 | 12 {
  const mrg = 1n << BigInt(K.VIRTIO_NET_F_MRG_RXBUF);
  const v1 = 1n << BigInt(K.VIRTIO_F_VERSION_1);
  return features & (mrg | v1) ? 12 : 10;
}

/**
 * vhost-net copies frames between its rings and the tap with the tap's
 * virtio-net header, so the tap needs IFF_VNET_HDR and a header size matching
 * the negotiated features (12 with VERSION_1 or MRG_RXBUF, else 10).
 */
export function checkTapForVhost(tapFd: number, hdrLen: number, queue?: number): void {
  const { name, flags } = native.tunGetIff(tapFd);
  if (!(flags & K.IFF_VNET_HDR))
    throw new MqtapError({
      op: 'VHOST_CHECK',
      code: 'EINVAL',
      ifname: name,
      ...(queue !== undefined ? { queue } : {}),
      message: `${name} has no virtio-net header (IFF_VNET_HDR); vhost-net needs it`,
      hint: 'open the tap with vnetHdr: true (mqtap: without --no-vnet-hdr)',
    });
  const size = native.tunGetVnetHdrSz(tapFd);
  if (size !== hdrLen)
    throw new MqtapError({
      op: 'VHOST_CHECK',
      code: 'EINVAL',
      ifname: name,
      ...(queue !== undefined ? { queue } : {}),
      message: `${name} has a ${size}-byte virtio-net header but the negotiated features need ${hdrLen}`,
      hint: `set the tap's header size to ${hdrLen} (vnetHdrSize: ${hdrLen}, or tap.setVnetHdrSize(${hdrLen})); 12 goes with VERSION_1 or MRG_RXBUF, 10 with neither`,
    });
}

/**
 * Ring memory that must never be freed: VHOST_RESET_OWNER failed on it, so
 * the vhost worker may still own the fd's memory table and write into these
 * pages (the fd is the caller's and may stay open for as long as the process
 * lives).  The allocPages finalizer would munmap them once unreferenced; this
 * list keeps them referenced instead.  Only error paths add to it.
 */
const keptRingMemory: ArrayBuffer[] = [];

function keepRingMemory(mem: ArrayBuffer | undefined): void {
  if (mem && !keptRingMemory.includes(mem)) keptRingMemory.push(mem);
}

/** @internal Bytes of ring memory kept because VHOST_RESET_OWNER failed (diagnostics, tests). */
export function _keptRingMemoryBytes(): number {
  return keptRingMemory.reduce((n, m) => n + m.byteLength, 0);
}

export interface PairDriverOptions {
  /** Ring size per virtqueue (power of two, 1..32768).  Default 256. */
  queueSize?: number;
  /** Bytes per buffer, virtio-net header included.  Default 2048 + 64. */
  bufSize?: number;
  /** Feature names to negotiate (must be offered, and in DRIVER_FEATURES).  Default ['VERSION_1']. */
  features?: readonly string[];
  /**
   * Ring index both virtqueues start from (VHOST_SET_VRING_BASE), 0..65535.
   * Default 0; a value near 65535 makes the 16-bit indices wrap early.
   */
  startIndex?: number;
}

/** One frame taken from the RX ring. */
export interface RxPacket {
  /** The virtio-net header as the tap wrote it (hdrLen bytes). */
  header: Buffer;
  /** The Ethernet frame. */
  frame: Buffer;
  /** Buffers it spanned (> 1 only with MRG_RXBUF). */
  buffers: number;
}

/**
 * Drives one vhost-net fd + one tap queue fd from this process.  Owns the
 * ring memory and the eventfds; the vhost fd and the tap fd stay owned by
 * their QueuePair / TapQueue (or the caller, for raw fds).  The memory is
 * kept alive until stop(): the vhost worker writes into it.  When
 * VHOST_RESET_OWNER fails (in stop() or on the constructor's error path) the
 * memory is never freed: the worker may still own it.
 */
export class VhostPairDriver {
  readonly vhostFd: number;
  readonly tapFd: number;
  /** The negotiated features. */
  readonly features: bigint;
  readonly hdrLen: 10 | 12;
  readonly mergeable: boolean;
  readonly rx: SplitVirtqueue;
  readonly tx: SplitVirtqueue;
  #mem: ArrayBuffer | undefined;
  readonly #eventfds: number[] = [];
  readonly #kick: [number, number];
  readonly #call: [number, number];
  readonly #err: number;
  #bound = false;
  #stopped = false;
  /** Frames collected from the ring but not yet returned by receive(). */
  readonly #backlog: RxPacket[] = [];
  readonly #counters = { txFrames: 0, txBytes: 0, rxFrames: 0, rxBuffers: 0, rxBytes: 0 };

  /**
   * Checks the features and the tap, then VHOST_SET_OWNER, SET_FEATURES,
   * SET_MEM_TABLE, both rings (NUM, BASE, ADDR, KICK, CALL, ERR), posts every
   * RX buffer and binds the backend (NET_SET_BACKEND) for both virtqueues.
   * On failure nothing is left: the owner is reset only if this call set it.
   * Prefer Netdev.drive(); with raw fds, call stop() before closing them.
   */
  constructor(vhostFd: number, tapFd: number, opts: PairDriverOptions = {}) {
    if (typeof opts !== 'object' || opts === null) throw invalidArg('driver options must be an object');
    for (const [what, fd] of [['vhostFd', vhostFd], ['tapFd', tapFd]] as const)
      if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) throw invalidArg(`${what} must be an open fd (got ${String(fd)})`);
    this.vhostFd = vhostFd;
    this.tapFd = tapFd;
    const num = opts.queueSize ?? 256;
    const bufSize = opts.bufSize ?? 2048 + 64;
    const rxLayout = vringLayout(num, bufSize, 0);
    const txLayout = vringLayout(num, bufSize, rxLayout.descOffset + rxLayout.size);
    const total = txLayout.descOffset + txLayout.size;
    if (total > 0xffffffff) throw invalidArg(`rings of ${num} x ${bufSize}-byte buffers need ${total} bytes; use fewer or smaller buffers`);
    const names = opts.features ?? ['VERSION_1'];
    const wanted = featureMask(names);
    const hdrLen = vnetHdrSizeFor(wanted);
    const mergeable = (wanted & (1n << BigInt(K.VIRTIO_NET_F_MRG_RXBUF))) !== 0n;
    if (bufSize < hdrLen + 60 && !mergeable) throw invalidArg(`buffers of ${bufSize} bytes cannot hold a ${hdrLen}-byte header and a minimum Ethernet frame`);
    const startIndex = opts.startIndex ?? 0;
    if (!Number.isInteger(startIndex) || startIndex < 0 || startIndex > 0xffff) throw invalidArg(`startIndex must be 0..65535 (got ${String(startIndex)})`);
    const eventfd = (): number => {
      const fd = native.eventfdOpen(0);
      this.#eventfds.push(fd);
      return fd;
    };
    let owner = false;
    try {
      const offered = native.vhostGetFeatures(vhostFd);
      const missing = wanted & ~offered;
      if (missing)
        throw new MqtapError({
          op: 'VHOST_SET_FEATURES',
          code: ErrorCodes.UNSUPPORTED,
          message: `vhost-net does not offer ${decodeFeatures(missing).names.join(', ') || decodeFeatures(missing).hex}`,
          hint: `it offers ${decodeFeatures(offered).names.join(', ')}`,
        });
      driverFeatureMask(names);
      checkTapForVhost(tapFd, hdrLen);
      native.vhostSetOwner(vhostFd);
      owner = true;
      native.vhostSetFeatures(vhostFd, wanted);
      this.#mem = native.allocPages(total);
      const base = native.addressOf(this.#mem);
      native.vhostSetMemTable(vhostFd, [{ guestPhysAddr: base, memorySize: BigInt(this.#mem.byteLength), userspaceAddr: base }]);
      this.rx = new SplitVirtqueue(this.#mem, rxLayout, { startIndex });
      this.tx = new SplitVirtqueue(this.#mem, txLayout, { startIndex });
      this.#kick = [eventfd(), eventfd()];
      this.#call = [eventfd(), eventfd()];
      this.#err = eventfd();
      for (const [index, q] of [[VHOST_NET_RX, this.rx], [VHOST_NET_TX, this.tx]] as const) {
        native.vhostSetVringNum(vhostFd, index, num);
        native.vhostSetVringBase(vhostFd, index, startIndex);
        native.vhostSetVringAddr(vhostFd, index, q.addresses());
        native.vhostSetVringKick(vhostFd, index, this.#kick[index]);
        native.vhostSetVringCall(vhostFd, index, this.#call[index]);
        native.vhostSetVringErr(vhostFd, index, this.#err);
      }
      // Every RX buffer goes to the device before the backend is bound.
      for (let id = this.rx.alloc(); id >= 0; id = this.rx.alloc()) this.rx.add(id, bufSize, true);
      this.rx.publish();
      this.features = wanted;
      this.hdrLen = hdrLen;
      this.mergeable = mergeable;
      this.bind();
    } catch (err) {
      this.#closeEventfds();
      if (owner) {
        try {
          native.vhostResetOwner(vhostFd);
        } catch {
          // The original error is the one to report.  The worker may still
          // own the memory table: the pages must outlive this object.
          keepRingMemory(this.#mem);
        }
      }
      this.#mem = undefined;
      throw err;
    }
  }

  /** VHOST_NET_SET_BACKEND for both virtqueues to the tap queue, then a kick of each ring. */
  bind(): void {
    this.#live();
    if (this.#bound) return;
    native.vhostNetSetBackend(this.vhostFd, VHOST_NET_RX, this.tapFd);
    try {
      native.vhostNetSetBackend(this.vhostFd, VHOST_NET_TX, this.tapFd);
    } catch (err) {
      native.vhostNetSetBackend(this.vhostFd, VHOST_NET_RX, K.VHOST_FILE_UNBIND);
      throw err;
    }
    this.#bound = true;
    native.eventfdWrite(this.#kick[VHOST_NET_RX]);
    native.eventfdWrite(this.#kick[VHOST_NET_TX]);
  }

  /** VHOST_NET_SET_BACKEND -1 for both virtqueues: the worker stops touching the tap queue. */
  unbind(): void {
    if (!this.#bound) return;
    native.vhostNetSetBackend(this.vhostFd, VHOST_NET_TX, K.VHOST_FILE_UNBIND);
    native.vhostNetSetBackend(this.vhostFd, VHOST_NET_RX, K.VHOST_FILE_UNBIND);
    this.#bound = false;
  }

  get bound(): boolean {
    return this.#bound;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  /**
   * Queues frames (Ethernet, without virtio-net header: a zero header is
   * prepended) on the TX ring and kicks.  Returns how many fit; reclaims
   * completed TX buffers first.  Refused while the backend is unbound (a
   * disabled pair): nothing would consume them.
   */
  send(frames: readonly Uint8Array[]): number {
    this.#live();
    if (!this.#bound)
      throw new MqtapError({ op: 'VHOST_DRIVER', code: ErrorCodes.CLOSED, message: 'the backend of this vhost pair is unbound (the pair is disabled); enable it first', hint: 'netdev.setActivePairs(k) with k above this pair\'s index' });
    this.tx.collect();
    let n = 0;
    for (const f of frames) {
      if (!(f instanceof Uint8Array)) throw invalidArg('frames must be Buffers');
      if (f.length + this.hdrLen > this.tx.layout.bufSize) throw invalidArg(`a frame of ${f.length} bytes does not fit a ${this.tx.layout.bufSize}-byte buffer with its ${this.hdrLen}-byte header`);
      const id = this.tx.alloc();
      if (id < 0) break;
      const b = this.tx.buffer(id);
      b.fill(0, 0, this.hdrLen);
      b.set(f, this.hdrLen);
      this.tx.add(id, this.hdrLen + f.length, false);
      this.#counters.txFrames++;
      this.#counters.txBytes += f.length;
      n++;
    }
    if (n > 0) {
      this.tx.publish();
      native.eventfdWrite(this.#kick[VHOST_NET_TX]);
    }
    return n;
  }

  /**
   * Notifies the device of both rings (the kick eventfds), e.g. after
   * filling the TX ring by hand through `tx`.  send() and receive() kick by
   * themselves.  A kick on an unbound ring does nothing.
   */
  kick(): void {
    this.#live();
    native.eventfdWrite(this.#kick[VHOST_NET_RX]);
    native.eventfdWrite(this.#kick[VHOST_NET_TX]);
  }

  /** Moves complete frames from the used ring to the backlog and gives their buffers back to the device. */
  #drainRx(): void {
    const used = this.rx.collect(Infinity, true);
    let i = 0;
    while (i < used.length) {
      const head = used[i]!;
      const hb = this.rx.buffer(head.id);
      let count = 1;
      if (this.mergeable && head.len >= this.hdrLen) count = Math.max(1, hb.readUInt16LE(10));
      if (i + count > used.length) {
        // vhost publishes all buffers of a frame with one used-index update; a
        // shorter run means the ring is corrupt.
        throw new RangeError(`RX frame claims ${count} buffers but only ${used.length - i} were returned`);
      }
      const header = Buffer.from(hb.subarray(0, Math.min(this.hdrLen, head.len)));
      const parts = [hb.subarray(this.hdrLen, Math.max(this.hdrLen, head.len))];
      for (let j = 1; j < count; j++) {
        const e = used[i + j]!;
        parts.push(this.rx.buffer(e.id).subarray(0, e.len));
      }
      const frame = Buffer.concat(parts);
      this.#backlog.push({ header, frame, buffers: count });
      this.#counters.rxFrames++;
      this.#counters.rxBuffers += count;
      this.#counters.rxBytes += frame.length;
      i += count;
    }
    for (const { id } of used) this.rx.add(id, this.rx.layout.bufSize, true);
    if (used.length > 0) {
      this.rx.publish();
      native.eventfdWrite(this.#kick[VHOST_NET_RX]);
    }
  }

  /** Frames the device has put in the RX ring, with their headers (copied out); buffers go back to the device. */
  receivePackets(max = Infinity): RxPacket[] {
    this.#live();
    this.#drainRx();
    return this.#backlog.splice(0, max);
  }

  /** Frames the device has put in the RX ring (header stripped, copied out); buffers go back to the device. */
  receive(max = Infinity): Buffer[] {
    return this.receivePackets(max).map((p) => p.frame);
  }

  /** Waits (polling the used ring) until `count` frames arrived or `timeoutMs` passed. */
  async receiveUntil(count: number, timeoutMs: number): Promise<Buffer[]> {
    const out: Buffer[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      out.push(...this.receive(count - out.length));
      if (out.length >= count || Date.now() >= deadline) return out;
      await sleep(2);
    }
  }

  /** Waits until the device has consumed every queued TX buffer, or the timeout. */
  async flushTx(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.tx.collect();
      if (this.tx.inFlight === 0) return true;
      if (Date.now() > deadline) return false;
      await sleep(2);
    }
  }

  /**
   * Frames (and Ethernet bytes) this driver queued on the TX ring and took
   * from the RX ring, and RX buffers used, since it started.  The ring bases
   * stop() returns are startIndex + txFrames and startIndex + rxBuffers (mod
   * 65536) once every TX buffer completed.
   */
  counters(): { txFrames: number; txBytes: number; rxFrames: number; rxBuffers: number; rxBytes: number } {
    return { ...this.#counters };
  }

  /** Counters from the call eventfds (how often the device signalled used buffers), reset on read. */
  calls(): { rx: bigint; tx: bigint } {
    this.#live();
    return { rx: native.eventfdRead(this.#call[VHOST_NET_RX]) ?? 0n, tx: native.eventfdRead(this.#call[VHOST_NET_TX]) ?? 0n };
  }

  /** How often the device reported a ring error (VHOST_SET_VRING_ERR eventfd), reset on read. */
  errors(): bigint {
    this.#live();
    return native.eventfdRead(this.#err) ?? 0n;
  }

  #live(): void {
    if (this.#stopped) throw new MqtapError({ op: 'VHOST_DRIVER', code: ErrorCodes.CLOSED, message: 'this vhost pair driver is stopped' });
  }

  /**
   * Unbinds the backend, reads where both rings stopped (VHOST_GET_VRING_BASE)
   * and resets the owner (VHOST_RESET_OWNER), so the worker can no longer
   * touch the ring memory; then frees it and closes the eventfds.  The vhost
   * fd is left open and owner-less: it can be driven again or handed to
   * QEMU.  Returns the ring bases (avail indices the device reached), or
   * undefined when a step failed (the first error is thrown after every step
   * was tried).  Idempotent.
   */
  stop(): { rx: number; tx: number } | undefined {
    if (this.#stopped) return undefined;
    this.#stopped = true;
    let first: unknown;
    const attempt = <T>(fn: () => T): T | undefined => {
      try {
        return fn();
      } catch (err) {
        first ??= err;
        return undefined;
      }
    };
    attempt(() => this.unbind());
    this.#bound = false;
    const rx = attempt(() => native.vhostGetVringBase(this.vhostFd, VHOST_NET_RX));
    const tx = attempt(() => native.vhostGetVringBase(this.vhostFd, VHOST_NET_TX));
    const reset = attempt(() => {
      native.vhostResetOwner(this.vhostFd);
      return true;
    });
    this.#closeEventfds();
    // Keep the memory referenced if the worker may still own it (reset failed
    // on an open fd), also once this object is gone (a pair drops its driver).
    if (reset) this.#mem = undefined;
    else keepRingMemory(this.#mem);
    if (first) throw withContext(first, {});
    return rx !== undefined && tx !== undefined ? { rx, tx } : undefined;
  }

  #closeEventfds(): void {
    for (const fd of this.#eventfds.splice(0)) native.close(fd);
  }
}
