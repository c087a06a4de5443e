/**
 * The vhost-user connection's state machine (lib/vhost-user/connection.ts),
 * driven by a scripted front-end over a real socketpair, with a fake data
 * plane (records what it is asked) and a fake tap (records TUNSETQUEUE and
 * refuses what the kernel refuses: attaching an attached queue is EINVAL).
 * The message orders are QEMU 7.2's (see docs/vhost-user.md).  The real
 * tap's view of the same vectors is test/integration/vhost-user.test.ts.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { native } from '../../lib/sys/native.js';
import { UnixSocket } from '../../lib/sys/scm.js';
import type { Offloads, Tap } from '../../lib/tap/tap.js';
import { OFFERED_PROTOCOL_FEATURES, VhostUserConnection, offeredFeatures } from '../../lib/vhost-user/connection.js';
import { FEATURE, HEADER_SIZE, PROTOCOL_FEATURE, REQUEST, VhostUserProtocolError, bit } from '../../lib/vhost-user/protocol.js';
import pino from 'pino';
import type { Logger } from '../../lib/sys/log.js';
import type { PairCounters } from '../../lib/vhost-user/dataplane-api.js';
import { openFds } from '../helpers/env.js';
import { FakeDataPlane, NEED_REPLY, ScriptedFrontend, memRegion, until } from '../helpers/vhost-user.js';

class FakeQueue {
  constructor(
    readonly tap: FakeTap,
    readonly index: number,
    public state: 'enabled' | 'disabled',
  ) {}
  readonly beforeClose = new Set<() => void>();
  get fd(): number {
    return 100 + this.index;
  }
  _onBeforeClose(fn: () => void): () => void {
    this.beforeClose.add(fn);
    return () => this.beforeClose.delete(fn);
  }
  enable(): void {
    if (this.state === 'enabled') throw new MqtapError({ op: 'TUNSETQUEUE', errno: 22, syscall: 'ioctl' });
    this.tap.ops.push(`attach ${this.index}`);
    this.state = 'enabled';
  }
  disable(): void {
    if (this.state === 'disabled') throw new MqtapError({ op: 'TUNSETQUEUE', errno: 22, syscall: 'ioctl' });
    if (this.tap.queues.filter((q) => q.state === 'enabled').length <= 1) throw new Error('would leave the tap with zero queues');
    this.tap.ops.push(`detach ${this.index}`);
    this.state = 'disabled';
  }
}

class FakeTap {
  readonly name = 'vu0';
  readonly ops: string[] = [];
  readonly queues: FakeQueue[];
  hdr = 10;
  offloads: Offloads = {};
  constructor(n: number) {
    this.queues = Array.from({ length: n }, (_, i) => new FakeQueue(this, i, 'enabled'));
  }
  setVnetHdrSize(n: number): void {
    this.hdr = n;
  }
  setOffloads(o: Offloads): void {
    this.offloads = o;
  }
  states(): string {
    return this.queues.map((q) => (q.state === 'enabled' ? 'E' : 'd')).join('');
  }
}

const PROTO = bit(PROTOCOL_FEATURE.MQ) | bit(PROTOCOL_FEATURE.REPLY_ACK) | bit(PROTOCOL_FEATURE.CONFIGURE_MEM_SLOTS) | bit(PROTOCOL_FEATURE.STATUS);
const ACKED =
  bit(FEATURE.VIRTIO_F_VERSION_1) |
  bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES) |
  bit(FEATURE.VIRTIO_NET_F_MQ) |
  bit(FEATURE.VIRTIO_RING_F_EVENT_IDX) |
  bit(FEATURE.VIRTIO_NET_F_MRG_RXBUF) |
  bit(FEATURE.VIRTIO_NET_F_CSUM) |
  bit(FEATURE.VIRTIO_NET_F_GUEST_CSUM) |
  bit(FEATURE.VIRTIO_NET_F_GUEST_TSO4) |
  bit(FEATURE.VIRTIO_NET_F_HOST_TSO4);

interface Rig {
  fe: ScriptedFrontend;
  conn: VhostUserConnection;
  dp: FakeDataPlane;
  tap: FakeTap;
  closed: Promise<Error | undefined>;
}

const rigs: Rig[] = [];
afterEach(() => {
  for (const r of rigs.splice(0)) {
    r.conn.close();
    r.fe.close();
  }
});

function rig(pairs: number, o: { dp?: FakeDataPlane; logger?: Logger } = {}): Rig {
  const [a, b] = UnixSocket.pair('stream');
  const dp = o.dp ?? new FakeDataPlane();
  const tap = new FakeTap(pairs);
  const conn = new VhostUserConnection({ sock: a, tap: tap as unknown as Tap, pairs, dataPlane: dp, ...(o.logger ? { logger: o.logger } : {}) });
  const closed = new Promise<Error | undefined>((res) => conn.once('close', res));
  const r = { fe: new ScriptedFrontend(b), conn, dp, tap, closed };
  rigs.push(r);
  return r;
}

/** QEMU 7.2's vhost_user_backend_init for each pair's vhost_dev, then net init's enable vector (pair 0 on, rest off) before any SET_FEATURES. */
async function qemuInit(r: Rig, pairs: number): Promise<void> {
  for (let p = 0; p < pairs; p++) {
    expect(await r.fe.u64('GET_FEATURES')).toBe(offeredFeatures());
    expect(await r.fe.u64('GET_PROTOCOL_FEATURES')).toBe(OFFERED_PROTOCOL_FEATURES);
    await r.fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: PROTO });
    if (p === 0) expect(await r.fe.u64('GET_QUEUE_NUM')).toBe(BigInt(pairs));
    expect(await r.fe.u64('GET_MAX_MEM_SLOTS')).toBe(8n);
    await r.fe.send('SET_OWNER');
  }
  await r.fe.enableVector(pairs, 1);
}

/** vhost_net_start: per pair SET_FEATURES, the memory (ADD_MEM_REG, the same regions once per pair), rings; then the enable vector. */
async function qemuStart(r: Rig, pairs: number, active: number, bases: number[] = []): Promise<void> {
  for (let p = 0; p < pairs; p++) {
    await r.fe.send('SET_FEATURES', { kind: 'u64', value: ACKED });
    for (const i of [0, 1]) await r.fe.send('ADD_MEM_REG', { kind: 'memRegion', region: memRegion(i) }, [r.fe.eventfd()], NEED_REPLY);
    for (let i = 0; i < 2; i++) expect((await r.fe.reply()).payload).toEqual({ kind: 'u64', value: 0n });
    await r.fe.setupRing(2 * p, bases[2 * p] ?? 0);
    await r.fe.setupRing(2 * p + 1, bases[2 * p + 1] ?? 0);
  }
  await r.fe.enableVector(pairs, active);
  await r.fe.u64('GET_STATUS'); // a round trip: everything before it was handled
}

describe('vhost-user connection: QEMU 7.2 message orders', () => {
  it('init, enable vector before SET_FEATURES, start, ethtool -L up and down: only changes become TUNSETQUEUE', async () => {
    const r = rig(4);
    await qemuInit(r, 4);
    await r.fe.u64('GET_STATUS');
    // Pair 0 on, the rest off, before any ring exists: the tap follows, nothing runs.
    expect(r.tap.states()).toBe('Eddd');
    expect(r.tap.ops.filter((o) => o.startsWith('attach'))).toEqual([]);
    expect(r.dp.running()).toEqual([]);
    const pairsEvents: unknown[] = [];
    r.conn.on('pairs', (s) => pairsEvents.push(s));

    await qemuStart(r, 4, 1);
    expect(r.tap.hdr).toBe(12);
    expect(r.tap.offloads).toEqual({ csum: true, tso4: true, tso6: false, tsoEcn: false });
    // The same two regions came four times: mapped once each, every region fd closed.
    expect(r.dp.calls.filter((c) => c.op === 'addRegion')).toEqual([
      { op: 'addRegion', gpa: 0n, fdValid: true },
      { op: 'addRegion', gpa: 0x4000_0000n, fdValid: true },
    ]);
    expect(r.dp.running()).toEqual(['0rx', '0tx']);
    const start = r.dp.calls.find((c) => c.op === 'startRing');
    expect(start).toMatchObject({ pair: 0, dir: 'rx', cfg: { num: 256, base: 0, descAddr: 0x1000n, availAddr: 0x1400n, usedAddr: 0x1800n, errFd: -1 }, features: { eventIdx: true, mrgRxbuf: true, indirectDesc: false, vnetHdrSize: 12 } });
    expect(r.conn.pairsState()).toEqual({ enabled: [0], live: [0] });

    const before = r.tap.ops.length;
    await r.fe.enableVector(4, 3); // ethtool -L combined 3
    await r.fe.u64('GET_STATUS');
    expect(r.tap.states()).toBe('EEEd');
    expect(r.tap.ops.slice(before)).toEqual(['attach 1', 'attach 2']);
    expect(r.dp.running()).toEqual(['0rx', '0tx', '1rx', '1tx', '2rx', '2tx']);

    const mid = r.tap.ops.length;
    await r.fe.enableVector(4, 1); // ethtool -L combined 1: nothing is stopped by QEMU, the rings are disabled
    await r.fe.u64('GET_STATUS');
    expect(r.tap.states()).toBe('Eddd');
    expect(r.tap.ops.slice(mid)).toEqual(['detach 1', 'detach 2']);
    expect(r.dp.running()).toEqual(['0rx', '0tx']);
    // The stopped rings keep where they were: enabling again resumes from their last avail index.
    await r.fe.enableVector(4, 2);
    await r.fe.u64('GET_STATUS');
    const restarted = r.dp.calls.filter((c) => c.op === 'startRing' && c.pair === 1);
    expect(restarted.map((c) => (c.op === 'startRing' ? c.cfg.base : -1))).toEqual([0, 0, 5, 5]);
    expect(pairsEvents.at(-1)).toEqual({ enabled: [0, 1], live: [0, 1] });
  });

  it('driver reset: GET_VRING_BASE on every ring, then setup again without a new memory table', async () => {
    const r = rig(2);
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    expect(r.dp.running()).toEqual(['0rx', '0tx', '1rx', '1tx']);
    const bases: number[] = [];
    for (let i = 0; i < 4; i++) bases.push(await r.fe.getBase(i));
    expect(bases).toEqual([5, 5, 5, 5]);
    expect(r.dp.running()).toEqual([]);
    expect(r.tap.states()).toBe('EE'); // the enable vector did not change
    // Setup again with the bases QEMU got back: same connection, no SET_MEM_TABLE.
    for (let i = 0; i < 4; i++) await r.fe.setupRing(i, bases[i]);
    await r.fe.u64('GET_STATUS');
    expect(r.dp.running()).toEqual(['0rx', '0tx', '1rx', '1tx']);
    const starts = r.dp.calls.filter((c) => c.op === 'startRing');
    expect(starts.slice(4).map((c) => (c.op === 'startRing' ? c.cfg.base : -1))).toEqual([5, 5, 5, 5]);
    expect(r.dp.calls.filter((c) => c.op === 'addRegion')).toHaveLength(2);
    expect(r.conn.closed).toBe(false);
  });

  it('quit: GET_VRING_BASE on every ring, then EOF: data plane closed, every fd closed, tap kept', async () => {
    const baseline = openFds().length;
    const r = rig(2);
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    for (let i = 0; i < 4; i++) await r.fe.getBase(i);
    r.fe.close();
    expect(await r.closed).toBeUndefined();
    expect(r.dp.closed).toBe(true);
    expect(r.tap.states()).toBe('EE');
    await until(() => openFds().length === baseline);
    expect(openFds().length).toBe(baseline);
  });
});

describe('vhost-user connection: features, replies, rings', () => {
  it('REPLY_ACK: NEED_REPLY gets 0; a failed operation gets a NACK and the connection stays', async () => {
    const r = rig(1);
    await r.fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: PROTO });
    await r.fe.send('SET_OWNER', { kind: 'none' }, [], NEED_REPLY);
    expect((await r.fe.reply()).payload).toEqual({ kind: 'u64', value: 0n });
    r.dp.failAddRegion = new MqtapError({ op: 'MMAP', errno: 22, syscall: 'mmap' });
    await r.fe.send('ADD_MEM_REG', { kind: 'memRegion', region: memRegion(0) }, [r.fe.eventfd()], NEED_REPLY);
    expect((await r.fe.reply()).payload).toEqual({ kind: 'u64', value: 1n });
    expect(r.conn.closed).toBe(false);
    // Without REPLY_ACK negotiated, NEED_REPLY gets nothing (GET_STATUS's reply comes first).
    const s = rig(1);
    await s.fe.send('SET_OWNER', { kind: 'none' }, [], NEED_REPLY);
    await s.fe.send('SET_STATUS', { kind: 'u64', value: 0xfn });
    expect(await s.fe.u64('GET_STATUS')).toBe(0xfn);
    expect(s.fe.pendingReplies).toBe(0);
  });

  it('features: without PROTOCOL_FEATURES rings start enabled; a 10-byte header without VERSION_1/MRG_RXBUF; no offloads unless acked', async () => {
    const r = rig(1);
    await r.fe.send('SET_FEATURES', { kind: 'u64', value: bit(FEATURE.VIRTIO_NET_F_CSUM) });
    await r.fe.setupRing(0);
    await r.fe.setupRing(1);
    await r.fe.u64('GET_STATUS');
    expect(r.tap.hdr).toBe(10);
    expect(r.tap.offloads).toEqual({ csum: false, tso4: false, tso6: false, tsoEcn: false });
    expect(r.dp.running()).toEqual(['0rx', '0tx']);
    expect(r.dp.calls.find((c) => c.op === 'startRing')).toMatchObject({ features: { vnetHdrSize: 10, eventIdx: false } });
  });

  it('offered features: exactly the documented set, never RING_PACKED, ACCESS_PLATFORM, CTRL_VQ; offloads can be narrowed', () => {
    const f = offeredFeatures();
    for (const b of [FEATURE.VIRTIO_F_RING_PACKED, FEATURE.VIRTIO_F_ACCESS_PLATFORM, FEATURE.VIRTIO_NET_F_CTRL_VQ]) expect(f & bit(b)).toBe(0n);
    for (const b of [FEATURE.VIRTIO_F_VERSION_1, FEATURE.VHOST_USER_F_PROTOCOL_FEATURES, FEATURE.VIRTIO_NET_F_MQ, FEATURE.VIRTIO_NET_F_GUEST_ECN, FEATURE.VIRTIO_NET_F_HOST_TSO6])
      expect(f & bit(b)).not.toBe(0n);
    const none = offeredFeatures({});
    expect(none & (bit(FEATURE.VIRTIO_NET_F_CSUM) | bit(FEATURE.VIRTIO_NET_F_GUEST_CSUM))).toBe(0n);
    expect(offeredFeatures({ csum: true }) & bit(FEATURE.VIRTIO_NET_F_GUEST_TSO4)).toBe(0n);
    expect(OFFERED_PROTOCOL_FEATURES).toBe(PROTO);
  });

  it('a new call fd while running restarts that ring from its last avail index with the new fd, the old one closed', async () => {
    const r = rig(1);
    await qemuInit(r, 1);
    await qemuStart(r, 1, 1);
    const call = r.fe.eventfd();
    await r.fe.send('SET_VRING_CALL', { kind: 'vringFd', index: 1, noFd: false }, [call]);
    await r.fe.u64('GET_STATUS');
    const starts = r.dp.calls.filter((c) => c.op === 'startRing' && c.dir === 'tx');
    expect(starts).toHaveLength(2);
    expect(starts[1]).toMatchObject({ cfg: { base: 5 } });
    expect(r.dp.running()).toEqual(['0rx', '0tx']);
  });

  it('all pairs disabled: the tap keeps one attached queue', async () => {
    const r = rig(2);
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    await r.fe.enableVector(2, 0);
    await r.fe.u64('GET_STATUS');
    // The vector arrives ring by ring: pair 0 goes first, so pair 1's queue is the one that stays.
    expect(r.tap.states()).toBe('dE');
    expect(r.dp.running()).toEqual([]);
  });

  it('the tap engine of each pair is logged once per pair start: info for io_uring, warn with the errno for the writev fallback', async () => {
    class EngineDataPlane extends FakeDataPlane {
      override counters(pair?: number): PairCounters {
        const c = super.counters();
        return pair === 0 ? { ...c, tapEngine: 'writev', tapEngineErrno: 1 } : { ...c, tapEngine: 'uring' };
      }
    }
    const lines: Array<{ level: number; msg: string; pair?: number; tapEngine?: string; uringErrno?: string }> = [];
    const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
    const r = rig(2, { dp: new EngineDataPlane(), logger });
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    const engineLines = (): typeof lines => lines.filter((l) => l.tapEngine !== undefined);
    expect(engineLines()).toEqual([
      expect.objectContaining({ level: 40, pair: 0, tapEngine: 'writev', uringErrno: 'EPERM' }),
      expect.objectContaining({ level: 30, pair: 1, tapEngine: 'uring' }),
    ]);
    // ethtool -L 1 then 2: pair 1 stops and starts again: one more line, for it only.
    await r.fe.enableVector(2, 1);
    await r.fe.u64('GET_STATUS');
    await r.fe.enableVector(2, 2);
    await r.fe.u64('GET_STATUS');
    expect(engineLines().slice(2)).toEqual([expect.objectContaining({ level: 30, pair: 1, tapEngine: 'uring' })]);
  });

  it.each(['auto', 'uring'] as const)("a pair's io_uring failing mid-run (notify fd, io_uring_enter): tapEngine %s", async (tapEngine) => {
    class BreakingDataPlane extends FakeDataPlane {
      readonly tapEngine = tapEngine;
      broken = false;
      override counters(pair?: number): PairCounters {
        const c = super.counters();
        if (pair === 1 && this.broken) return { ...c, tapEngine: 'writev', tapEngineErrno: 12, tapEngineSyscall: 'io_uring_enter' };
        return { ...c, tapEngine: 'uring' };
      }
      break(): void {
        this.broken = true;
        native.eventfdWrite(this.notifyFd, 1n);
      }
    }
    const lines: Array<{ level: number; msg: string; pair?: number; uringErrno?: string; syscall?: string }> = [];
    const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
    const dp = new BreakingDataPlane();
    const r = rig(2, { dp, logger });
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    const midRun = (): typeof lines => lines.filter((l) => l.syscall === 'io_uring_enter');
    dp.break();
    if (tapEngine === 'auto') {
      await until(() => midRun().length > 0);
      expect(midRun()).toEqual([expect.objectContaining({ level: 40, pair: 1, uringErrno: 'ENOMEM' })]);
      native.eventfdWrite(dp.notifyFd, 1n); // another notification: the same failure is not reported again
      await new Promise((res) => setTimeout(res, 50));
      expect(midRun()).toHaveLength(1);
      expect(r.conn.closed).toBe(false);
      expect(r.dp.running()).toEqual(['0rx', '0tx', '1rx', '1tx']);
    } else {
      const err = await r.closed;
      expect(err).toBeInstanceOf(MqtapError);
      expect(err).toMatchObject({ op: 'VHOST_USER_TAP_IO', code: 'ENOMEM', errno: 12, syscall: 'io_uring_enter', queue: 1 });
      expect((err as MqtapError).hint).toMatch(/tapEngine 'auto'/);
      expect(midRun()).toEqual([expect.objectContaining({ level: 50, pair: 1 })]);
      expect(dp.closed).toBe(true);
    }
  });

  it("a tap queue closed while the connection lives is taken from its pair first; the hooks go with the connection", async () => {
    const r = rig(2);
    await qemuInit(r, 2);
    await qemuStart(r, 2, 2);
    expect(r.tap.queues.map((q) => q.beforeClose.size)).toEqual([1, 1]);
    for (const f of [...r.tap.queues[1]!.beforeClose]) f(); // what queue.close() runs before closing its fd
    expect(r.dp.calls.filter((c) => c.op === 'setTap').at(-1)).toEqual({ op: 'setTap', pair: 1, fd: -1 });
    r.conn.close();
    expect(r.tap.queues.map((q) => q.beforeClose.size), 'hooks removed at teardown').toEqual([0, 0]);
  });

  it('a ring the data plane failed is stopped and reported', async () => {
    const r = rig(1);
    await qemuInit(r, 1);
    await qemuStart(r, 1, 1);
    const failed = new Promise((res) => r.conn.once('ringFailed', res));
    r.dp.fail(0, 'tx', 'descriptor loop');
    expect(await failed).toEqual({ pair: 0, dir: 'tx', reason: 'descriptor loop' });
    expect(r.dp.running()).toEqual(['0rx']);
  });

  it('SET_MEM_TABLE: the same table again maps nothing; a new one replaces the old (rings stopped first)', async () => {
    const r = rig(1);
    const table = (n: number): Parameters<ScriptedFrontend['send']>[1] => ({ kind: 'memTable', regions: Array.from({ length: n }, (_, i) => memRegion(i)) });
    await r.fe.send('SET_MEM_TABLE', table(2), [r.fe.eventfd(), r.fe.eventfd()]);
    await r.fe.send('SET_MEM_TABLE', table(2), [r.fe.eventfd(), r.fe.eventfd()]);
    await r.fe.send('SET_MEM_TABLE', table(3), [r.fe.eventfd(), r.fe.eventfd(), r.fe.eventfd()]);
    await r.fe.u64('GET_STATUS');
    expect(r.dp.calls.map((c) => c.op).filter((o) => o.endsWith('Region'))).toEqual(['addRegion', 'addRegion', 'removeRegion', 'removeRegion', 'addRegion', 'addRegion', 'addRegion']);
  });
});

describe('vhost-user connection: malformed input closes the connection, never a crash, no fd leaked', () => {
  const head = (req: number, flags: number, size: number): Buffer => {
    const b = Buffer.alloc(HEADER_SIZE + size);
    b.writeUInt32LE(req, 0);
    b.writeUInt32LE(flags, 4);
    b.writeUInt32LE(size, 8);
    return b;
  };
  const cases: Array<[string, (r: Rig) => Promise<void>, string]> = [
    ['an unknown request', (r) => r.fe.raw(head(99, 1, 0)), 'request'],
    ['a payload over 4096 bytes', (r) => r.fe.raw(head(REQUEST.SET_FEATURES, 1, 5000)), 'size'],
    ['a wrong payload size', (r) => r.fe.raw(head(REQUEST.SET_FEATURES, 1, 4)), 'payload'],
    ['a kick without its fd', (r) => r.fe.send('SET_VRING_KICK', { kind: 'vringFd', index: 0, noFd: false }), 'fds'],
    ['extra fds', (r) => r.fe.send('SET_FEATURES', { kind: 'u64', value: 0n }, [r.fe.eventfd(), r.fe.eventfd()]), 'fds'],
    ['a memory table with fewer fds than regions', (r) => r.fe.send('SET_MEM_TABLE', { kind: 'memTable', regions: [memRegion(0), memRegion(1)] }, [r.fe.eventfd()]), 'fds'],
    ['a ring that does not exist', (r) => r.fe.send('SET_VRING_CALL', { kind: 'vringFd', index: 9, noFd: false }, [r.fe.eventfd()]), 'value'],
    ['a feature not offered', (r) => r.fe.send('SET_FEATURES', { kind: 'u64', value: bit(FEATURE.VIRTIO_F_RING_PACKED) }), 'value'],
    ['a protocol feature not offered', (r) => r.fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: bit(PROTOCOL_FEATURE.LOG_SHMFD) }), 'value'],
    ['a ring size that is not a power of two', (r) => r.fe.send('SET_VRING_NUM', { kind: 'vringState', index: 0, num: 300 }), 'value'],
    ['dirty logging (not offered)', (r) => r.fe.send('SET_LOG_BASE', { kind: 'u64', value: 0n }, [r.fe.eventfd()]), 'request'],
    ['a REPLY flag in a request', (r) => r.fe.raw(head(REQUEST.GET_FEATURES, 5, 0)), 'flags'],
  ];
  for (const [what, send, reason] of cases) {
    it(what, async () => {
      const baseline = openFds().length;
      const r = rig(2);
      await qemuInit(r, 2);
      await qemuStart(r, 2, 2);
      await send(r);
      const err = await r.closed;
      expect(err).toBeInstanceOf(VhostUserProtocolError);
      expect((err as VhostUserProtocolError).reason).toBe(reason);
      expect(r.dp.closed).toBe(true);
      expect(r.dp.running()).toEqual([]);
      r.fe.close();
      await until(() => openFds().length === baseline);
      expect(openFds().length).toBe(baseline);
    });
  }
});
