/**
 * Test helpers for lib/vhost-user: a fake DataPlane that records what the
 * connection asks of it, and a scripted front-end speaking the codec over a
 * real UNIX socket (with real eventfds as kick/call fds).
 */
import { native } from '../../lib/sys/native.js';
import type { ReceivedFds, UnixSocket } from '../../lib/sys/scm.js';
import type { DataPlane, DataPlaneFeatures, MemRegion, PairCounters, RingConfig, RingDir, RingStatus } from '../../lib/vhost-user/dataplane-api.js';
import { FEATURE, FLAGS, Framer, PROTOCOL_FEATURE, bit, decodeMessage, encodeMessage, request, type Message, type MemRegionDesc, type Payload, type RequestName } from '../../lib/vhost-user/protocol.js';

export type DpCall =
  | { op: 'addRegion'; gpa: bigint; fdValid: boolean }
  | { op: 'removeRegion'; gpa: bigint }
  | { op: 'setTap'; pair: number; fd: number }
  | { op: 'startRing'; pair: number; dir: RingDir; cfg: RingConfig; features: DataPlaneFeatures }
  | { op: 'stopRing'; pair: number; dir: RingDir; lastAvailIdx: number }
  | { op: 'close' };

function fdValid(fd: number): boolean {
  try {
    native.getFdFlags(fd);
    return true;
  } catch {
    return false;
  }
}

/** Every ring "processes" `progress` descriptors while it runs: stopRing reports base + progress. */
export class FakeDataPlane implements DataPlane {
  readonly calls: DpCall[] = [];
  readonly notifyFd: number;
  closed = false;
  progress = 5;
  failAddRegion: Error | undefined;
  readonly #running = new Map<string, RingConfig>();
  readonly #failed = new Map<string, { reason: string; lastAvailIdx: number }>();

  constructor() {
    this.notifyFd = native.eventfdOpen(0);
  }

  addRegion(r: MemRegion): void {
    if (this.failAddRegion) throw this.failAddRegion;
    this.calls.push({ op: 'addRegion', gpa: r.guestPhysAddr, fdValid: fdValid(r.fd) });
  }
  removeRegion(gpa: bigint): void {
    this.calls.push({ op: 'removeRegion', gpa });
  }
  setTap(pair: number, fd: number): void {
    this.calls.push({ op: 'setTap', pair, fd });
  }
  startRing(pair: number, dir: RingDir, cfg: RingConfig, features: DataPlaneFeatures): void {
    if (!fdValid(cfg.kickFd) || (cfg.callFd >= 0 && !fdValid(cfg.callFd))) throw new Error('startRing with a closed eventfd');
    this.#running.set(`${pair}${dir}`, { ...cfg });
    this.calls.push({ op: 'startRing', pair, dir, cfg: { ...cfg }, features });
  }
  stopRing(pair: number, dir: RingDir): RingStatus {
    const cfg = this.#running.get(`${pair}${dir}`);
    this.#running.delete(`${pair}${dir}`);
    const failed = this.#failed.get(`${pair}${dir}`);
    const lastAvailIdx = failed ? failed.lastAvailIdx : cfg ? (cfg.base + this.progress) & 0xffff : 0;
    this.calls.push({ op: 'stopRing', pair, dir, lastAvailIdx });
    return failed ? { state: 'failed', reason: failed.reason, lastAvailIdx } : { state: 'stopped', lastAvailIdx };
  }
  ringStatus(pair: number, dir: RingDir): RingStatus {
    const f = this.#failed.get(`${pair}${dir}`);
    if (f) return { state: 'failed', reason: f.reason, lastAvailIdx: f.lastAvailIdx };
    const cfg = this.#running.get(`${pair}${dir}`);
    return { state: cfg ? 'running' : 'stopped', lastAvailIdx: cfg?.base ?? 0 };
  }
  /** Makes a running ring fail on its own (as the native plane does on a malformed guest ring). */
  fail(pair: number, dir: RingDir, reason: string): void {
    const cfg = this.#running.get(`${pair}${dir}`);
    this.#failed.set(`${pair}${dir}`, { reason, lastAvailIdx: cfg?.base ?? 0 });
    native.eventfdWrite(this.notifyFd, 1n);
  }
  counters(): PairCounters {
    return { txFrames: 0n, txBytes: 0n, txDropped: 0n, rxFrames: 0n, rxBytes: 0n, rxDropped: 0n, kicks: 0n, calls: 0n, txSyscalls: 0n, rxSyscalls: 0n, wakeups: 0n, tapEngine: 'none', tapEngineErrno: 0, tapEngineSyscall: '' };
  }
  running(): string[] {
    return [...this.#running.keys()].sort();
  }
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.#running.clear();
    this.calls.push({ op: 'close' });
    native.close(this.notifyFd);
  }
}

/** A front-end over one end of a socket: sends requests (with fds), reads replies. */
export class ScriptedFrontend {
  readonly #sock: UnixSocket;
  readonly #framer = new Framer('reply');
  readonly #replies: Message[] = [];
  #waiters: Array<() => void> = [];
  /** eventfds this side created (closed by closeAll). */
  readonly #own: number[] = [];
  closed = false;

  constructor(sock: UnixSocket) {
    this.#sock = sock;
    sock.on('message', (data: Buffer, fds: ReceivedFds) => {
      fds.close();
      for (const f of this.#framer.push(data)) this.#replies.push(decodeMessage(f.bytes, 'reply'));
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('close', () => {
      this.closed = true;
      for (const w of this.#waiters.splice(0)) w();
    });
  }

  eventfd(): number {
    const fd = native.eventfdOpen(0);
    this.#own.push(fd);
    return fd;
  }

  async send(name: RequestName, payload: Payload = { kind: 'none' }, fds: number[] = [], flags = 0): Promise<void> {
    await this.#sock.send(encodeMessage(request(name, payload, flags)), fds);
  }

  async raw(bytes: Buffer, fds: number[] = []): Promise<void> {
    await this.#sock.send(bytes, fds);
  }

  /** The next reply (rejects after `ms` or when the socket closes first). */
  async reply(ms = 5000): Promise<Message> {
    const deadline = Date.now() + ms;
    while (this.#replies.length === 0) {
      if (this.closed) throw new Error('closed before a reply');
      if (Date.now() > deadline) throw new Error('no reply');
      await new Promise<void>((r) => {
        this.#waiters.push(r);
        setTimeout(r, 50);
      });
    }
    return this.#replies.shift()!;
  }

  get pendingReplies(): number {
    return this.#replies.length;
  }

  async call(name: RequestName, payload: Payload = { kind: 'none' }): Promise<Message> {
    await this.send(name, payload);
    const r = await this.reply();
    if (r.request !== name) throw new Error(`reply to ${r.request}, expected ${name}`);
    return r;
  }

  async u64(name: RequestName): Promise<bigint> {
    const r = await this.call(name);
    if (r.payload.kind !== 'u64') throw new Error('not a u64 reply');
    return r.payload.value;
  }

  /** Sets up ring `index` fully (num, base, addr, kick, call), as QEMU's vhost_virtqueue_start does. */
  async setupRing(index: number, base = 0, num = 256): Promise<{ kick: number; call: number }> {
    await this.send('SET_VRING_NUM', { kind: 'vringState', index, num });
    await this.send('SET_VRING_BASE', { kind: 'vringState', index, num: base });
    await this.send('SET_VRING_ADDR', { kind: 'vringAddr', index, flags: 0, descAddr: 0x1000n * BigInt(index + 1), usedAddr: 0x1000n * BigInt(index + 1) + 0x800n, availAddr: 0x1000n * BigInt(index + 1) + 0x400n, logAddr: 0n });
    const kick = this.eventfd();
    const call = this.eventfd();
    await this.send('SET_VRING_KICK', { kind: 'vringFd', index, noFd: false }, [kick]);
    await this.send('SET_VRING_CALL', { kind: 'vringFd', index, noFd: false }, [call]);
    return { kick, call };
  }

  async enable(index: number, on: boolean): Promise<void> {
    await this.send('SET_VRING_ENABLE', { kind: 'vringState', index, num: on ? 1 : 0 });
  }

  /** QEMU's `ethtool -L combined k`: a full vector over all 2N rings. */
  async enableVector(pairs: number, k: number): Promise<void> {
    for (let i = 0; i < 2 * pairs; i++) await this.enable(i, i < 2 * k);
  }

  async getBase(index: number): Promise<number> {
    const r = await this.call('GET_VRING_BASE', { kind: 'vringState', index, num: 0 });
    if (r.payload.kind !== 'vringState' || r.payload.index !== index) throw new Error('bad GET_VRING_BASE reply');
    return r.payload.num;
  }

  close(): void {
    this.#sock.close();
    for (const fd of this.#own.splice(0)) native.close(fd);
  }
}

export const NEED_REPLY = FLAGS.NEED_REPLY;

export function memRegion(i: number): MemRegionDesc {
  return { guestPhysAddr: BigInt(i) * 0x4000_0000n, size: 0x4000_0000n, userAddr: 0x7f00_0000_0000n + BigInt(i) * 0x4000_0000n, mmapOffset: 0n };
}

/** Resolves when `cond()` holds (polling), rejects after `ms`. */
export async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** What a QEMU 7.2 front-end negotiates with mqtap's backend (MQ, REPLY_ACK, mem slots, STATUS; VERSION_1, MQ). */
export const QEMU_PROTOCOL_FEATURES = bit(PROTOCOL_FEATURE.MQ) | bit(PROTOCOL_FEATURE.REPLY_ACK) | bit(PROTOCOL_FEATURE.CONFIGURE_MEM_SLOTS) | bit(PROTOCOL_FEATURE.STATUS);
export const QEMU_ACKED_FEATURES = bit(FEATURE.VIRTIO_F_VERSION_1) | bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES) | bit(FEATURE.VIRTIO_NET_F_MQ);

/** The parts of guest memory and rings startLikeQemu needs (test/helpers/vu-driver.ts GuestMem and DriverRing fit). */
interface QemuMem {
  regions(): Array<{ guestPhysAddr: bigint; size: bigint; userAddr: bigint; mmapOffset: bigint; fd: number }>;
}
interface QemuRing {
  num: number;
  kick: number;
  call: number;
  config(): { descAddr: bigint; availAddr: bigint; usedAddr: bigint };
}

/**
 * QEMU 7.2's start-up, message for message: per pair GET_FEATURES,
 * SET_PROTOCOL_FEATURES, SET_OWNER; the enable vector of a machine reset (pair 0
 * only) before any ring exists; per pair SET_FEATURES, ADD_MEM_REG for every
 * region (the same ones again for each pair), then NUM/BASE/ADDR/KICK/CALL of
 * both rings; last the vector with every pair enabled.  rings[2p] is RX,
 * rings[2p+1] TX.
 */
export async function startLikeQemu(fe: ScriptedFrontend, mem: QemuMem, rings: readonly QemuRing[], pairs: number): Promise<void> {
  for (let p = 0; p < pairs; p++) {
    await fe.u64('GET_FEATURES');
    await fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: QEMU_PROTOCOL_FEATURES });
    await fe.send('SET_OWNER');
  }
  await fe.enableVector(pairs, 1);
  for (let p = 0; p < pairs; p++) {
    await fe.send('SET_FEATURES', { kind: 'u64', value: QEMU_ACKED_FEATURES });
    for (const r of mem.regions()) {
      await fe.send('ADD_MEM_REG', { kind: 'memRegion', region: { guestPhysAddr: r.guestPhysAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset } }, [r.fd], NEED_REPLY);
      const ack = (await fe.reply()).payload;
      if (ack.kind !== 'u64' || ack.value !== 0n) throw new Error(`ADD_MEM_REG was refused: ${JSON.stringify(ack, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v))}`);
    }
    for (const index of [2 * p, 2 * p + 1]) {
      const r = rings[index]!;
      const c = r.config();
      await fe.send('SET_VRING_NUM', { kind: 'vringState', index, num: r.num });
      await fe.send('SET_VRING_BASE', { kind: 'vringState', index, num: 0 });
      await fe.send('SET_VRING_ADDR', { kind: 'vringAddr', index, flags: 0, descAddr: c.descAddr, usedAddr: c.usedAddr, availAddr: c.availAddr, logAddr: 0n });
      await fe.send('SET_VRING_KICK', { kind: 'vringFd', index, noFd: false }, [r.kick]);
      await fe.send('SET_VRING_CALL', { kind: 'vringFd', index, noFd: false }, [r.call]);
    }
  }
  await fe.enableVector(pairs, pairs);
}
