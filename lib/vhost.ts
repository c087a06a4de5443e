/**
 * vhost-net: probing, feature bits, and a userspace driver for one queue
 * pair (like the kernel's tools/virtio/vhost_net_test.c): split virtqueues in
 * process memory, a memory table mapping "guest" address = process address,
 * kick/call eventfds, and helpers to push frames into the TX ring and collect
 * them from the RX ring.
 *
 * Virtqueue 0 of a vhost-net fd is RX (device -> driver: frames the kernel
 * sends to the tap), virtqueue 1 is TX (driver -> device: frames that enter
 * the kernel as if received on the tap).
 */
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCodes, MqtapError, invalidArg, withContext } from './errors';
import { K, native } from './native';
import { SplitVirtqueue, vringLayout } from './vring';

export const VHOST_NET_RX = 0;
export const VHOST_NET_TX = 1;

/** Named virtio/vhost feature bits (bit numbers from the kernel headers). */
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

export interface DecodedFeatures {
  /** The mask as 0x-prefixed hex. */
  hex: string;
  /** Names of the known bits that are set. */
  names: string[];
  /** Bit numbers that are set but have no name here. */
  unknownBits: number[];
}

export function decodeFeatures(mask: bigint): DecodedFeatures {
  const names: string[] = [];
  const unknownBits: number[] = [];
  const byBit = new Map(Object.entries(FEATURE_BITS).map(([n, b]) => [b, n]));
  for (let bit = 0; bit < 64; bit++) {
    if (!((mask >> BigInt(bit)) & 1n)) continue;
    const name = byBit.get(bit);
    if (name) names.push(name);
    else unknownBits.push(bit);
  }
  return { hex: `0x${mask.toString(16)}`, names, unknownBits };
}

/** A feature mask from names; unknown names are refused. */
export function featureMask(names: readonly string[]): bigint {
  let mask = 0n;
  for (const n of names) {
    const bit = FEATURE_BITS[n];
    if (bit === undefined) throw invalidArg(`unknown feature "${n}" (known: ${Object.keys(FEATURE_BITS).join(', ')})`);
    mask |= 1n << BigInt(bit);
  }
  return mask;
}

export interface VhostProbe {
  devicePath: string;
  /** The device node exists. */
  present: boolean;
  /** It could be opened read-write. */
  openable: boolean;
  features?: DecodedFeatures;
  backendFeatures?: DecodedFeatures;
  error?: { code: string; message: string; hint?: string };
}

/** Is vhost-net here and usable?  Never throws for a missing or forbidden device. */
export function probeVhostNet(opts: { devicePath?: string } = {}): VhostProbe {
  const devicePath = opts.devicePath ?? '/dev/vhost-net';
  const present = existsSync(devicePath);
  let fd: number;
  try {
    fd = native.vhostOpen(devicePath);
  } catch (err) {
    if (!(err instanceof MqtapError)) throw err;
    return { devicePath, present, openable: false, error: { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) } };
  }
  try {
    const features = decodeFeatures(native.vhostGetFeatures(fd));
    let backendFeatures: DecodedFeatures | undefined;
    try {
      backendFeatures = decodeFeatures(native.vhostGetBackendFeatures(fd));
    } catch {
      // older kernels: no backend features
    }
    return { devicePath, present, openable: true, features, ...(backendFeatures ? { backendFeatures } : {}) };
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
      hint: `set the tap's header size to ${hdrLen} (vnetHdrSize: ${hdrLen})`,
    });
}

export interface PairDriverOptions {
  /** Ring size per virtqueue (power of two).  Default 256. */
  queueSize?: number;
  /** Bytes per buffer, virtio-net header included.  Default 2048 + 64. */
  bufSize?: number;
  /** Feature names to negotiate (must be offered).  Default ['VERSION_1']. */
  features?: readonly string[];
}

/**
 * Drives one vhost-net fd + one tap queue fd from this process.  Owns the
 * ring memory and the eventfds; the vhost fd and the tap fd stay owned by
 * their Netdev / TapQueue.  The memory is kept alive until stop(): the vhost
 * worker writes into it.
 */
export class VhostPairDriver {
  readonly vhostFd: number;
  readonly tapFd: number;
  readonly features: bigint;
  readonly hdrLen: 10 | 12;
  readonly rx: SplitVirtqueue;
  readonly tx: SplitVirtqueue;
  #mem: ArrayBuffer | undefined;
  readonly #eventfds: number[] = [];
  readonly #kick: [number, number];
  readonly #call: [number, number];
  #bound = false;
  #stopped = false;

  /** @internal use Netdev.drive(). Sets owner, features, memory table and both rings; binds the backend. */
  constructor(vhostFd: number, tapFd: number, opts: PairDriverOptions = {}) {
    this.vhostFd = vhostFd;
    this.tapFd = tapFd;
    const num = opts.queueSize ?? 256;
    const bufSize = opts.bufSize ?? 2048 + 64;
    const rxLayout = vringLayout(num, bufSize, 0);
    const txLayout = vringLayout(num, bufSize, rxLayout.descOffset + rxLayout.size);
    const total = txLayout.descOffset + txLayout.size;
    const eventfd = (): number => {
      const fd = native.eventfdOpen(0);
      this.#eventfds.push(fd);
      return fd;
    };
    try {
      native.vhostSetOwner(vhostFd);
      const offered = native.vhostGetFeatures(vhostFd);
      const wanted = featureMask(opts.features ?? ['VERSION_1']);
      const missing = wanted & ~offered;
      if (missing)
        throw new MqtapError({
          op: 'VHOST_SET_FEATURES',
          code: ErrorCodes.UNSUPPORTED,
          message: `vhost-net does not offer ${decodeFeatures(missing).names.join(', ') || decodeFeatures(missing).hex}`,
          hint: `offered: ${decodeFeatures(offered).names.join(', ')}`,
        });
      this.features = wanted;
      this.hdrLen = vnetHdrSizeFor(wanted);
      checkTapForVhost(tapFd, this.hdrLen);
      native.vhostSetFeatures(vhostFd, wanted);
      this.#mem = native.allocPages(total);
      const base = native.addressOf(this.#mem);
      native.vhostSetMemTable(vhostFd, [{ guestPhysAddr: base, memorySize: BigInt(this.#mem.byteLength), userspaceAddr: base }]);
      this.rx = new SplitVirtqueue(this.#mem, rxLayout);
      this.tx = new SplitVirtqueue(this.#mem, txLayout);
      this.#kick = [eventfd(), eventfd()];
      this.#call = [eventfd(), eventfd()];
      const err = eventfd();
      for (const [index, q] of [[VHOST_NET_RX, this.rx], [VHOST_NET_TX, this.tx]] as const) {
        native.vhostSetVringNum(vhostFd, index, num);
        native.vhostSetVringBase(vhostFd, index, 0);
        native.vhostSetVringAddr(vhostFd, index, q.addresses());
        native.vhostSetVringKick(vhostFd, index, this.#kick[index]);
        native.vhostSetVringCall(vhostFd, index, this.#call[index]);
        native.vhostSetVringErr(vhostFd, index, err);
      }
      // Every RX buffer goes to the device up front.
      for (let id = this.rx.alloc(); id >= 0; id = this.rx.alloc()) this.rx.add(id, bufSize, true);
      this.rx.publish();
      this.bind();
      native.eventfdWrite(this.#kick[VHOST_NET_RX]);
    } catch (err) {
      this.#closeEventfds();
      try {
        native.vhostResetOwner(vhostFd);
      } catch {
        /* the original error is the one to report */
      }
      this.#mem = undefined;
      throw err;
    }
  }

  /** VHOST_NET_SET_BACKEND for both virtqueues to the tap queue. */
  bind(): void {
    if (this.#bound) return;
    native.vhostNetSetBackend(this.vhostFd, VHOST_NET_RX, this.tapFd);
    try {
      native.vhostNetSetBackend(this.vhostFd, VHOST_NET_TX, this.tapFd);
    } catch (err) {
      native.vhostNetSetBackend(this.vhostFd, VHOST_NET_RX, K.VHOST_FILE_UNBIND);
      throw err;
    }
    this.#bound = true;
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

  /**
   * Queues frames (Ethernet, without virtio-net header: a zero header is
   * prepended) on the TX ring and kicks.  Returns how many fit; reclaims
   * completed TX buffers first.
   */
  send(frames: readonly Buffer[]): number {
    this.#live();
    this.tx.collect();
    let n = 0;
    for (const f of frames) {
      if (f.length + this.hdrLen > this.tx.layout.bufSize) throw invalidArg(`frame of ${f.length} bytes does not fit a ${this.tx.layout.bufSize}-byte buffer`);
      const id = this.tx.alloc();
      if (id < 0) break;
      const b = this.tx.buffer(id);
      b.fill(0, 0, this.hdrLen);
      f.copy(b, this.hdrLen);
      this.tx.add(id, this.hdrLen + f.length, false);
      n++;
    }
    if (n > 0) {
      this.tx.publish();
      native.eventfdWrite(this.#kick[VHOST_NET_TX]);
    }
    return n;
  }

  /** Frames the device has put in the RX ring (header stripped, copied out); buffers go back to the device. */
  receive(max = Infinity): Buffer[] {
    this.#live();
    const used = this.rx.collect(max, true);
    const frames = used.map(({ id, len }) => Buffer.from(this.rx.buffer(id).subarray(this.hdrLen, len)));
    for (const { id } of used) this.rx.add(id, this.rx.layout.bufSize, true);
    if (used.length > 0) {
      this.rx.publish();
      native.eventfdWrite(this.#kick[VHOST_NET_RX]);
    }
    return frames;
  }

  /** Waits (polling the used ring) until `count` frames arrived or `timeoutMs` passed. */
  async receiveUntil(count: number, timeoutMs: number): Promise<Buffer[]> {
    const out: Buffer[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < count && Date.now() < deadline) {
      out.push(...this.receive(count - out.length));
      if (out.length < count) await sleep(2);
    }
    return out;
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

  /** Counters from the call eventfds (how often the device signalled), reset on read. */
  calls(): { rx: bigint; tx: bigint } {
    return { rx: native.eventfdRead(this.#call[VHOST_NET_RX]) ?? 0n, tx: native.eventfdRead(this.#call[VHOST_NET_TX]) ?? 0n };
  }

  #live(): void {
    if (this.#stopped) throw new MqtapError({ op: 'VHOST_DRIVER', code: ErrorCodes.CLOSED, message: 'this vhost pair driver is stopped' });
  }

  /**
   * Unbinds the backend, stops both rings and releases the owner, so the
   * worker can no longer touch the ring memory; then frees it.  Idempotent.
   */
  stop(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    let first: unknown;
    const attempt = (fn: () => void): void => {
      try {
        fn();
      } catch (err) {
        first ??= err;
      }
    };
    attempt(() => this.unbind());
    attempt(() => native.vhostGetVringBase(this.vhostFd, VHOST_NET_RX));
    attempt(() => native.vhostGetVringBase(this.vhostFd, VHOST_NET_TX));
    attempt(() => native.vhostResetOwner(this.vhostFd));
    this.#closeEventfds();
    this.#mem = undefined;
    if (first) throw withContext(first, {});
  }

  #closeEventfds(): void {
    for (const fd of this.#eventfds.splice(0)) native.close(fd);
  }
}
