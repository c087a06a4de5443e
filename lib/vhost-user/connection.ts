/**
 * One vhost-user front-end connection (QEMU, DPDK virtio-user): framing of
 * the byte stream with the fds that came with it, the protocol's state
 * machine, and what it means for the tap and the data plane.
 *
 * Rings and pairs (the DPDK rule): ring 2i is pair i's RX (tap -> guest),
 * ring 2i+1 its TX.  A ring is ready when it has num, addr, base, kick and
 * call and is enabled; a pair is live when both its rings are ready, and
 * then both run in the data plane.  A ring that stops being ready is stopped
 * (its last avail index becomes its base, so a restart goes on from there).
 *
 * The tap follows the guest's enable vector (SET_VRING_ENABLE): tap queue i
 * is attached when both rings of pair i are enabled.  Only differences
 * become TUNSETQUEUE, enables before disables, and the tap never drops to
 * zero attached queues (its last enabled queue stays attached).
 *
 * Ownership: every fd that arrives is owned from recvmsg on; a message's fds
 * are either kept (kick/call/err eventfds: closed when replaced, on
 * GET_VRING_BASE and at the end) or closed when the message is done (region
 * fds: the data plane mapped them).  A malformed message closes the
 * connection: every ring stops, the data plane closes (guest memory
 * unmapped), every eventfd is closed; the tap stays.
 */
import { EventEmitter } from 'node:events';
import { MqtapError, errnoName } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { K, native } from '../sys/native';
import type { ReceivedFds, UnixSocket } from '../sys/scm';
import type { Tap } from '../tap/tap';
import type { DataPlane, DataPlaneFeatures, PairCounters, RingDir } from './dataplane-api';
import {
  FEATURE,
  FLAGS,
  Framer,
  MAX_MEM_REGIONS,
  PROTOCOL_FEATURE,
  VhostUserProtocolError,
  bit,
  checkFds,
  decodeMessage,
  encodeMessage,
  featureNames,
  reply,
  requestSpec,
  type MemRegionDesc,
  type Message,
  type Payload,
} from './protocol';

/** Offload features offered (each turns on the HOST_ and the GUEST_ bit). */
export interface VhostUserOffloads {
  csum?: boolean;
  tso4?: boolean;
  tso6?: boolean;
  ecn?: boolean;
}

/** The feature bits offered for `offloads` (default: all of them). */
export function offeredFeatures(offloads: VhostUserOffloads = { csum: true, tso4: true, tso6: true, ecn: true }): bigint {
  let f =
    bit(FEATURE.VIRTIO_F_VERSION_1) |
    bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES) |
    bit(FEATURE.VIRTIO_NET_F_MQ) |
    bit(FEATURE.VIRTIO_RING_F_EVENT_IDX) |
    bit(FEATURE.VIRTIO_RING_F_INDIRECT_DESC) |
    bit(FEATURE.VIRTIO_NET_F_MRG_RXBUF);
  if (offloads.csum) {
    f |= bit(FEATURE.VIRTIO_NET_F_CSUM) | bit(FEATURE.VIRTIO_NET_F_GUEST_CSUM);
    if (offloads.tso4) f |= bit(FEATURE.VIRTIO_NET_F_HOST_TSO4) | bit(FEATURE.VIRTIO_NET_F_GUEST_TSO4);
    if (offloads.tso6) f |= bit(FEATURE.VIRTIO_NET_F_HOST_TSO6) | bit(FEATURE.VIRTIO_NET_F_GUEST_TSO6);
    if (offloads.ecn && (offloads.tso4 || offloads.tso6)) f |= bit(FEATURE.VIRTIO_NET_F_HOST_ECN) | bit(FEATURE.VIRTIO_NET_F_GUEST_ECN);
  }
  return f;
}

/** Protocol features offered: exactly the ones implemented here. */
export const OFFERED_PROTOCOL_FEATURES =
  bit(PROTOCOL_FEATURE.MQ) | bit(PROTOCOL_FEATURE.REPLY_ACK) | bit(PROTOCOL_FEATURE.CONFIGURE_MEM_SLOTS) | bit(PROTOCOL_FEATURE.STATUS);

export interface ConnectionOptions {
  /** A connected stream socket; the connection owns it from now on. */
  sock: UnixSocket;
  /** Queue i of the tap serves pair i (at least `pairs` open queues, opened with vnetHdr). */
  tap: Tap;
  pairs: number;
  /** This connection's data plane; closed when the connection ends. */
  dataPlane: DataPlane;
  /** Feature bits offered (offeredFeatures()). */
  features?: bigint;
  logger?: Logger;
}

interface Ring {
  num: number | undefined;
  addr: { descAddr: bigint; availAddr: bigint; usedAddr: bigint } | undefined;
  base: number | undefined;
  kickFd: number;
  kickSet: boolean;
  callFd: number;
  callSet: boolean;
  errFd: number;
  /** SET_VRING_ENABLE's last word; undefined: none yet. */
  enabled: boolean | undefined;
  running: boolean;
}

function newRing(): Ring {
  return { num: undefined, addr: undefined, base: undefined, kickFd: -1, kickSet: false, callFd: -1, callSet: false, errFd: -1, enabled: undefined, running: false };
}

export interface PairsState {
  /** Pairs whose tap queue is attached. */
  enabled: number[];
  /** Pairs running in the data plane. */
  live: number[];
}

/** fds of one message: take() what is kept, the rest is closed when the message is done. */
class MessageFds {
  readonly #fds: number[];
  constructor(fds: number[]) {
    this.#fds = fds;
  }
  get length(): number {
    return this.#fds.length;
  }
  peek(i: number): number {
    return this.#fds[i] ?? -1;
  }
  take(i: number): number {
    const fd = this.#fds[i] ?? -1;
    this.#fds[i] = -1;
    return fd;
  }
  close(): void {
    for (let i = 0; i < this.#fds.length; i++) closeFd(this.take(i));
  }
}

function closeFd(fd: number): void {
  if (fd < 0) return;
  try {
    native.close(fd);
  } catch {
    /* ours: cannot be EBADF */
  }
}

const ACK_OK = 0n;
const ACK_FAIL = 1n;

function sameRegion(a: MemRegionDesc, b: MemRegionDesc): boolean {
  return a.guestPhysAddr === b.guestPhysAddr && a.size === b.size && a.userAddr === b.userAddr && a.mmapOffset === b.mmapOffset;
}

/**
 * Events: 'features' (acked: bigint, names: string[]), 'pairs' (PairsState),
 * 'ringFailed' ({ pair, dir, reason }), 'close' (err?: Error: why it closed,
 * undefined for a clean EOF).
 */
export class VhostUserConnection extends EventEmitter {
  readonly pairs: number;
  readonly offered: bigint;
  readonly #sock: UnixSocket;
  readonly #tap: Tap;
  readonly #dp: DataPlane;
  readonly #log: Logger;
  readonly #framer = new Framer('request');
  /** fds that arrived with a chunk, keyed by the stream position of that chunk's last byte. */
  #pendingFds: Array<{ at: number; fds: ReceivedFds }> = [];
  readonly #rings: Ring[];
  #regions: MemRegionDesc[] = [];
  #acked: bigint | undefined;
  #ackedProtocol = 0n;
  #status = 0n;
  #closed = false;
  #notify: InstanceType<(typeof native)['FdPoll']> | undefined;
  #lastPairs = '';
  #final: PairCounters[] | undefined;
  /** Removes the tap queues' before-close hooks (#teardown). */
  readonly #unhook: Array<() => void> = [];
  /** Pairs whose mid-run io_uring failure was already handled (#checkTapEngines). */
  readonly #engineBroken = new Set<number>();

  constructor(opts: ConnectionOptions) {
    super();
    this.#sock = opts.sock;
    this.#tap = opts.tap;
    this.pairs = opts.pairs;
    this.#dp = opts.dataPlane;
    this.#log = opts.logger ?? silentLogger;
    this.offered = opts.features ?? offeredFeatures();
    this.#rings = Array.from({ length: 2 * opts.pairs }, newRing);
    for (let p = 0; p < this.pairs; p++) {
      const q = this.#tap.queues[p];
      const live = q !== undefined && q.state !== 'closed';
      this.#dp.setTap(p, live ? q.fd : -1);
      // A queue closed while the connection lives (Tap.close(), queue.close()): the worker lets go of
      // its fd first (its io_uring holds the file, which would keep the queue, and a non-persistent
      // tap, alive), and never touches that fd number again.
      if (live) this.#unhook.push(q._onBeforeClose(() => this.#tapClosing(p)));
    }
    try {
      this.#notify = new native.FdPoll(this.#dp.notifyFd, (status) => this.#onNotify(status));
      this.#notify.start((K as unknown as { UV_READABLE: number }).UV_READABLE);
    } catch (err) {
      this.#notify = undefined;
      this.#log.warn({ err }, 'vhost-user: cannot watch the data plane notify fd; failed rings are seen on the next message');
    }
    this.#sock.on('message', (data: Buffer, fds: ReceivedFds) => this.#onData(data, fds));
    this.#sock.on('close', (err?: Error) => this.#teardown(err));
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Feature bits the front-end acked (undefined before SET_FEATURES). */
  get ackedFeatures(): bigint | undefined {
    return this.#acked;
  }

  get ackedProtocolFeatures(): bigint {
    return this.#ackedProtocol;
  }

  /** Which pairs have their tap queue attached and which run. */
  pairsState(): PairsState {
    const enabled: number[] = [];
    const live: number[] = [];
    for (let p = 0; p < this.pairs; p++) {
      if (this.#tap.queues[p]?.state === 'enabled') enabled.push(p);
      if (this.#rings[2 * p]!.running && this.#rings[2 * p + 1]!.running) live.push(p);
    }
    return { enabled, live };
  }

  counters(pair: number): PairCounters | undefined {
    if (this.#closed) return undefined;
    return this.#dp.counters(pair);
  }

  /** After close: each pair's counters as they were when the rings stopped (undefined before, or if they could not be read). */
  get finalCounters(): PairCounters[] | undefined {
    return this.#final;
  }

  /** Ends the connection (stops every ring, closes the data plane and every eventfd); the tap stays. */
  close(err?: Error): void {
    this.#teardown(err);
  }

  // --- input ------------------------------------------------------------

  #onData(data: Buffer, fds: ReceivedFds): void {
    if (this.#closed) {
      fds.close();
      return;
    }
    try {
      if (fds.length > 0) this.#pendingFds.push({ at: this.#framer.position + data.length - 1, fds });
      for (const frame of this.#framer.push(data)) {
        const mine = this.#pendingFds.filter((g) => g.at < frame.end);
        this.#pendingFds = this.#pendingFds.filter((g) => g.at >= frame.end);
        const bag = new MessageFds(mine.flatMap((g) => g.fds.takeAll()));
        try {
          if (mine.some((g) => g.at < frame.start)) throw new VhostUserProtocolError('fds', 'fds arrived with no message to carry them');
          const msg = decodeMessage(frame.bytes, 'request');
          checkFds(msg, bag.length);
          this.#dispatch(msg, bag);
        } finally {
          bag.close();
        }
        if (this.#closed) return;
      }
    } catch (err) {
      this.#fail(err);
    }
  }

  #fail(err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    this.#log.warn({ err: e, reason: (e as VhostUserProtocolError).reason }, `vhost-user: closing the connection: ${e.message}`);
    this.#teardown(e);
  }

  #send(m: Message): void {
    this.#sock.send(encodeMessage(m, 'reply')).catch(() => {
      /* the socket closed: 'close' tears down */
    });
  }

  #dispatch(msg: Message, fds: MessageFds): void {
    const wantsAck = (msg.flags & FLAGS.NEED_REPLY) !== 0 && (this.#ackedProtocol & bit(PROTOCOL_FEATURE.REPLY_ACK)) !== 0n && requestSpec(msg.request).reply === undefined;
    this.#log.debug({ request: msg.request, flags: msg.flags, fds: fds.length }, 'vhost-user message');
    let result: Payload | undefined;
    try {
      result = this.#handle(msg, fds);
      this.#syncPairs();
    } catch (err) {
      if (err instanceof VhostUserProtocolError || !wantsAck) throw err;
      // An operation that failed (mmap, TUNSETQUEUE): the front-end asked for an ack, so it learns of it and decides.
      this.#log.warn({ err, request: msg.request }, 'vhost-user: request failed; NACK sent');
      this.#send(reply(msg, { kind: 'u64', value: ACK_FAIL }));
      return;
    }
    if (result) this.#send(reply(msg, result));
    else if (wantsAck) this.#send(reply(msg, { kind: 'u64', value: ACK_OK }));
  }

  #ring(index: number, request: Message['request']): Ring {
    const r = this.#rings[index];
    if (!r) throw new VhostUserProtocolError('value', `ring ${index} does not exist (this backend has ${this.pairs} pair(s): rings 0..${2 * this.pairs - 1})`, request);
    return r;
  }

  #handle(msg: Message, fds: MessageFds): Payload | undefined {
    const p = msg.payload;
    switch (msg.request) {
      case 'GET_FEATURES':
        return { kind: 'u64', value: this.offered };
      case 'SET_FEATURES':
        if (p.kind === 'u64') this.#setFeatures(p.value);
        return undefined;
      case 'GET_PROTOCOL_FEATURES':
        return { kind: 'u64', value: OFFERED_PROTOCOL_FEATURES };
      case 'SET_PROTOCOL_FEATURES':
        if (p.kind !== 'u64') return undefined;
        if (p.value & ~OFFERED_PROTOCOL_FEATURES)
          throw new VhostUserProtocolError('value', `protocol features not offered: ${featureNames(p.value & ~OFFERED_PROTOCOL_FEATURES, PROTOCOL_FEATURE).join(' ')}`, msg.request);
        this.#ackedProtocol = p.value;
        this.#log.info({ protocolFeatures: featureNames(p.value, PROTOCOL_FEATURE) }, 'vhost-user protocol features');
        return undefined;
      case 'SET_OWNER':
        return undefined;
      case 'RESET_OWNER':
        this.#resetRings();
        this.#acked = undefined;
        return undefined;
      case 'GET_QUEUE_NUM':
        return { kind: 'u64', value: BigInt(this.pairs) };
      case 'GET_MAX_MEM_SLOTS':
        return { kind: 'u64', value: BigInt(MAX_MEM_REGIONS) };
      case 'SET_MEM_TABLE':
        if (p.kind === 'memTable') this.#setMemTable(p.regions, fds);
        return undefined;
      case 'ADD_MEM_REG':
        if (p.kind === 'memRegion') this.#addRegion(p.region, fds.peek(0));
        return undefined;
      case 'REM_MEM_REG':
        if (p.kind === 'memRegion') this.#removeRegion(p.region);
        return undefined;
      case 'SET_VRING_NUM': {
        if (p.kind !== 'vringState') return undefined;
        const r = this.#ring(p.index, msg.request);
        if (p.num < 1 || p.num > 32768 || (p.num & (p.num - 1)) !== 0) throw new VhostUserProtocolError('value', `ring size ${p.num} is not a power of two in 1..32768`, msg.request);
        this.#quiesce(p.index);
        r.num = p.num;
        return undefined;
      }
      case 'SET_VRING_ADDR': {
        if (p.kind !== 'vringAddr') return undefined;
        const r = this.#ring(p.index, msg.request);
        this.#quiesce(p.index);
        r.addr = { descAddr: p.descAddr, availAddr: p.availAddr, usedAddr: p.usedAddr };
        return undefined;
      }
      case 'SET_VRING_BASE': {
        if (p.kind !== 'vringState') return undefined;
        const r = this.#ring(p.index, msg.request);
        if (p.num > 0xffff) throw new VhostUserProtocolError('value', `base ${p.num} does not fit a split ring's 16-bit index`, msg.request);
        this.#quiesce(p.index);
        r.base = p.num;
        return undefined;
      }
      case 'GET_VRING_BASE': {
        if (p.kind !== 'vringState') return undefined;
        const r = this.#ring(p.index, msg.request);
        this.#stopRing(p.index);
        // The ring is stopped until the front-end sets it up again (new kick and call).
        closeFd(r.kickFd);
        closeFd(r.callFd);
        r.kickFd = -1;
        r.callFd = -1;
        r.kickSet = false;
        r.callSet = false;
        return { kind: 'vringState', index: p.index, num: r.base ?? 0 };
      }
      case 'SET_VRING_KICK':
      case 'SET_VRING_CALL':
      case 'SET_VRING_ERR': {
        if (p.kind !== 'vringFd') return undefined;
        const r = this.#ring(p.index, msg.request);
        this.#quiesce(p.index);
        const fd = p.noFd ? -1 : fds.take(0);
        if (msg.request === 'SET_VRING_KICK') {
          closeFd(r.kickFd);
          r.kickFd = fd;
          r.kickSet = fd >= 0;
          if (fd < 0) this.#log.warn({ ring: p.index }, 'vhost-user: kick without an eventfd (polling) is not supported; the ring stays stopped');
        } else if (msg.request === 'SET_VRING_CALL') {
          closeFd(r.callFd);
          r.callFd = fd;
          r.callSet = true;
        } else {
          closeFd(r.errFd);
          r.errFd = fd;
        }
        return undefined;
      }
      case 'SET_VRING_ENABLE': {
        if (p.kind !== 'vringState') return undefined;
        const r = this.#ring(p.index, msg.request);
        if (p.num > 1) throw new VhostUserProtocolError('value', `enable must be 0 or 1 (got ${p.num})`, msg.request);
        r.enabled = p.num === 1;
        return undefined;
      }
      case 'SET_STATUS':
        if (p.kind === 'u64') this.#status = p.value & 0xffn;
        return undefined;
      case 'GET_STATUS':
        return { kind: 'u64', value: this.#status };
      case 'SEND_RARP': {
        if (p.kind !== 'u64') return undefined;
        const mac = Buffer.alloc(8);
        mac.writeBigUInt64LE(p.value);
        this.#log.info({ mac: [...mac.subarray(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':') }, 'vhost-user: SEND_RARP (accepted; the guest announces itself)');
        return undefined;
      }
      case 'NET_SET_MTU':
        if (p.kind === 'u64') this.#log.info({ mtu: Number(p.value) }, 'vhost-user: NET_SET_MTU (accepted; the tap MTU is the administrator\'s)');
        return undefined;
      case 'SET_LOG_BASE':
      case 'SET_LOG_FD':
        throw new VhostUserProtocolError('request', 'dirty-page logging (live migration) is not supported and was not offered', msg.request);
    }
  }

  #setFeatures(value: bigint): void {
    const extra = value & ~this.offered;
    if (extra) throw new VhostUserProtocolError('value', `features not offered: ${featureNames(extra).join(' ')}`, 'SET_FEATURES');
    this.#acked = value;
    const has = (b: number): boolean => (value & bit(b)) !== 0n;
    // The tap carries the virtio-net header the guest uses, and hands the guest only the offloads it acked.
    const hdr: 10 | 12 = has(FEATURE.VIRTIO_F_VERSION_1) || has(FEATURE.VIRTIO_NET_F_MRG_RXBUF) ? 12 : 10;
    this.#tap.setVnetHdrSize(hdr);
    const csum = has(FEATURE.VIRTIO_NET_F_GUEST_CSUM);
    const tso4 = csum && has(FEATURE.VIRTIO_NET_F_GUEST_TSO4);
    const tso6 = csum && has(FEATURE.VIRTIO_NET_F_GUEST_TSO6);
    this.#tap.setOffloads({ csum, tso4, tso6, tsoEcn: (tso4 || tso6) && has(FEATURE.VIRTIO_NET_F_GUEST_ECN) });
    const names = featureNames(value);
    this.#log.info({ features: names, vnetHdrSize: hdr }, 'vhost-user features negotiated');
    this.emit('features', value, names);
  }

  #dataPlaneFeatures(): DataPlaneFeatures {
    const f = this.#acked ?? 0n;
    const has = (b: number): boolean => (f & bit(b)) !== 0n;
    return {
      eventIdx: has(FEATURE.VIRTIO_RING_F_EVENT_IDX),
      mrgRxbuf: has(FEATURE.VIRTIO_NET_F_MRG_RXBUF),
      indirectDesc: has(FEATURE.VIRTIO_RING_F_INDIRECT_DESC),
      vnetHdrSize: has(FEATURE.VIRTIO_F_VERSION_1) || has(FEATURE.VIRTIO_NET_F_MRG_RXBUF) ? 12 : 10,
    };
  }

  // --- memory -------------------------------------------------------------

  #setMemTable(regions: MemRegionDesc[], fds: MessageFds): void {
    // QEMU sends the table once per queue pair: the same table again changes nothing.
    if (regions.length === this.#regions.length && regions.every((r) => this.#regions.some((o) => sameRegion(o, r)))) return;
    this.#stopAll();
    for (const r of this.#regions.splice(0)) this.#dp.removeRegion(r.guestPhysAddr);
    regions.forEach((r, i) => {
      this.#dp.addRegion({ ...r, fd: fds.peek(i) });
      this.#regions.push(r);
    });
    this.#log.info({ regions: regions.length }, 'vhost-user memory table set');
  }

  #addRegion(r: MemRegionDesc, fd: number): void {
    if (this.#regions.some((o) => sameRegion(o, r))) return; // once per queue pair
    if (this.#regions.length >= MAX_MEM_REGIONS) throw new VhostUserProtocolError('regions', `more than ${MAX_MEM_REGIONS} memory regions (GET_MAX_MEM_SLOTS said ${MAX_MEM_REGIONS})`, 'ADD_MEM_REG');
    this.#dp.addRegion({ ...r, fd });
    this.#regions.push(r);
  }

  #removeRegion(r: MemRegionDesc): void {
    const i = this.#regions.findIndex((o) => o.guestPhysAddr === r.guestPhysAddr && o.size === r.size && o.userAddr === r.userAddr);
    if (i < 0) return; // once per queue pair: already gone
    this.#stopAll(); // a running ring may point into it; the rings restart below if still ready
    this.#dp.removeRegion(r.guestPhysAddr);
    this.#regions.splice(i, 1);
  }

  // --- rings and pairs ------------------------------------------------------

  #where(index: number): { pair: number; dir: RingDir } {
    return { pair: index >> 1, dir: index & 1 ? 'tx' : 'rx' };
  }

  #enabled(r: Ring): boolean | undefined {
    if (r.enabled !== undefined) return r.enabled;
    if (this.#acked === undefined) return undefined;
    // Without PROTOCOL_FEATURES a ring starts enabled; with it, disabled until SET_VRING_ENABLE.
    return (this.#acked & bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES)) === 0n;
  }

  #ready(r: Ring): boolean {
    return r.num !== undefined && r.addr !== undefined && r.base !== undefined && r.kickSet && r.callSet && this.#enabled(r) === true && this.#acked !== undefined;
  }

  #stopRing(index: number): void {
    const r = this.#rings[index]!;
    if (!r.running) return;
    const { pair, dir } = this.#where(index);
    r.running = false;
    const st = this.#dp.stopRing(pair, dir);
    r.base = st.lastAvailIdx;
    if (st.state === 'failed') this.#log.warn({ pair, dir, reason: st.reason }, 'vhost-user ring had failed');
  }

  /** A ring about to be changed: stop it (it restarts with the change once ready again). */
  #quiesce(index: number): void {
    this.#stopRing(index);
  }

  #stopAll(): void {
    for (let i = 0; i < this.#rings.length; i++) this.#stopRing(i);
  }

  #resetRings(): void {
    this.#stopAll();
    for (const r of this.#rings) {
      closeFd(r.kickFd);
      closeFd(r.callFd);
      closeFd(r.errFd);
      Object.assign(r, newRing());
    }
  }

  /** Brings the tap's queues and the data plane's rings in line with the rings' state. */
  #syncPairs(): void {
    this.#syncTap();
    for (let p = 0; p < this.pairs; p++) {
      const rx = this.#rings[2 * p]!;
      const tx = this.#rings[2 * p + 1]!;
      const live = this.#ready(rx) && this.#ready(tx);
      if (!live) {
        this.#stopRing(2 * p);
        this.#stopRing(2 * p + 1);
        continue;
      }
      const features = this.#dataPlaneFeatures();
      let started = false;
      for (const [r, dir] of [[rx, 'rx'], [tx, 'tx']] as const) {
        if (r.running) continue;
        this.#dp.startRing(p, dir, { num: r.num!, ...r.addr!, base: r.base!, kickFd: r.kickFd, callFd: r.callFd, errFd: r.errFd }, features);
        r.running = true;
        started = true;
      }
      if (started) this.#logTapEngine(p);
    }
    const state = this.pairsState();
    const key = JSON.stringify(state);
    if (key !== this.#lastPairs) {
      this.#lastPairs = key;
      this.#log.info(state, 'vhost-user pairs');
      this.emit('pairs', state);
    }
  }

  /** Once per pair start: which tap I/O the pair's worker uses, and why not io_uring when it does not. */
  #logTapEngine(pair: number): void {
    const c = this.#dp.counters(pair);
    if (c.tapEngine === 'writev' && c.tapEngineErrno !== 0)
      this.#log.warn({ pair, tapEngine: c.tapEngine, uringErrno: errnoName(c.tapEngineErrno), syscall: c.tapEngineSyscall }, 'vhost-user pair: io_uring unavailable, tap I/O is one writev/read per frame');
    else this.#log.info({ pair, tapEngine: c.tapEngine }, 'vhost-user pair tap I/O');
  }

  /** The enable vector, diffed against the tap's queue states: only changes become TUNSETQUEUE. */
  #syncTap(): void {
    const want: Array<boolean | undefined> = [];
    for (let p = 0; p < this.pairs; p++) {
      const a = this.#enabled(this.#rings[2 * p]!);
      const b = this.#enabled(this.#rings[2 * p + 1]!);
      want.push(a === undefined || b === undefined ? undefined : a && b);
    }
    const queues = this.#tap.queues.slice(0, this.pairs).filter((q) => q.state !== 'closed');
    const target = queues.map((q) => want[q.index] ?? q.state === 'enabled');
    // Never zero attached queues: if the guest wants none, the lowest attached one stays.
    if (!target.some(Boolean)) {
      const keep = queues.findIndex((q) => q.state === 'enabled');
      if (keep >= 0) target[keep] = true;
    }
    const toEnable = queues.filter((q, i) => target[i] && q.state !== 'enabled');
    const toDisable = queues.filter((q, i) => !target[i] && q.state === 'enabled');
    if (toEnable.length === 0 && toDisable.length === 0) return;
    for (const q of toEnable) q.enable();
    for (const q of toDisable) q.disable();
    this.#log.info({ ifname: this.#tap.name, attached: toEnable.map((q) => q.index), detached: toDisable.map((q) => q.index) }, 'tap queues follow the guest');
  }

  #onNotify(status: number): void {
    if (this.#closed || status < 0) return;
    try {
      native.eventfdRead(this.#dp.notifyFd);
    } catch {
      /* nothing to read */
    }
    this.#checkTapEngines();
    if (this.#closed) return;
    for (let i = 0; i < this.#rings.length; i++) {
      const r = this.#rings[i]!;
      if (!r.running) continue;
      const { pair, dir } = this.#where(i);
      const st = this.#dp.ringStatus(pair, dir);
      if (st.state !== 'failed') continue;
      this.#stopRing(i);
      this.#log.warn({ pair, dir, reason: st.reason }, 'vhost-user ring stopped: the guest ring is malformed');
      this.emit('ringFailed', { pair, dir, reason: st.reason });
    }
  }

  #tapClosing(pair: number): void {
    if (this.#closed) return;
    try {
      this.#dp.setTap(pair, -1);
      this.#log.info({ ifname: this.#tap.name, pair }, 'vhost-user: tap queue closed; the pair has no tap now (guest frames are dropped and counted)');
    } catch (err) {
      this.#log.warn({ err, pair }, 'vhost-user: letting go of a closing tap queue failed');
    }
  }

  /**
   * A pair whose io_uring failed mid-run (io_uring_enter: the data plane went on with writev/read and
   * signalled notifyFd): with tapEngine 'auto' a warning, once per failure; with 'uring' (the io_uring
   * or an error) the connection ends with that error, as a failed setup at startRing would have.
   */
  #checkTapEngines(): void {
    for (let p = 0; p < this.pairs; p++) {
      const c = this.#dp.counters(p);
      if (c.tapEngineSyscall !== 'io_uring_enter') {
        this.#engineBroken.delete(p);
        continue;
      }
      if (this.#engineBroken.has(p)) continue;
      this.#engineBroken.add(p);
      const where = { pair: p, ifname: this.#tap.name, uringErrno: errnoName(c.tapEngineErrno), syscall: c.tapEngineSyscall };
      if (this.#dp.tapEngine !== 'uring') {
        this.#log.warn({ ...where, tapEngine: c.tapEngine }, 'vhost-user pair: io_uring failed mid-run; tap I/O goes on with one writev/read per frame');
        continue;
      }
      const err = new MqtapError({
        op: 'VHOST_USER_TAP_IO',
        code: errnoName(c.tapEngineErrno),
        errno: c.tapEngineErrno,
        syscall: 'io_uring_enter',
        ifname: this.#tap.name,
        queue: p,
        detail: `pair ${p}: tap engine 'uring'`,
        hint: "the pair's io_uring failed mid-run and tapEngine 'uring' allows no fallback: the connection ends (the front-end may reconnect); use tapEngine 'auto' to go on with one writev/read per frame",
      });
      this.#log.error({ ...where, err }, "vhost-user pair: io_uring failed mid-run with tapEngine 'uring': closing the connection");
      this.#teardown(err);
      return;
    }
  }

  #teardown(err?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const u of this.#unhook.splice(0)) u();
    this.#notify?.close();
    this.#notify = undefined;
    try {
      this.#stopAll();
    } catch (e) {
      this.#log.warn({ err: e }, 'vhost-user: stopping a ring failed during teardown');
    }
    try {
      this.#final = Array.from({ length: this.pairs }, (_, p) => this.#dp.counters(p));
    } catch (e) {
      this.#log.warn({ err: e }, 'vhost-user: reading the final counters failed');
    }
    try {
      this.#dp.close();
    } catch (e) {
      this.#log.warn({ err: e }, 'vhost-user: closing the data plane failed');
    }
    for (const r of this.#rings) {
      closeFd(r.kickFd);
      closeFd(r.callFd);
      closeFd(r.errFd);
      Object.assign(r, newRing());
    }
    for (const g of this.#pendingFds.splice(0)) g.fds.close();
    this.#regions = [];
    if (!this.#sock.closed) this.#sock.close(err);
    this.#log.info({ reason: err?.message }, 'vhost-user connection closed');
    this.emit('close', err);
  }
}
