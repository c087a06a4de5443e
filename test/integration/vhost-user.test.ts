/**
 * serveVhostUser on the real kernel, in a throw-away network namespace: a
 * scripted front-end (QEMU 7.2's message orders) connects over the real
 * socket; the enable vectors it sends are checked in the kernel's own view
 * of the tap (rtnetlink numqueues / numdisabled).  The data plane is a fake
 * that records (the native one is tested with it in test/vm and by
 * wt-vu2's tests); everything else is real: socket file and mode,
 * SO_PEERCRED, one front-end after another, client mode, cleanup.
 */
import { lstatSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { UnixServer, UnixSocket } from '../../lib/sys/scm.js';
import { getTap } from '../../lib/tap/links.js';
import { openTap } from '../../lib/tap/tap.js';
import { serveVhostUser, type VhostUserBackend } from '../../lib/vhost-user/backend.js';
import { offeredFeatures } from '../../lib/vhost-user/connection.js';
import { FEATURE, PROTOCOL_FEATURE, bit } from '../../lib/vhost-user/protocol.js';
import { fdCount, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { FakeDataPlane, NEED_REPLY, ScriptedFrontend, memRegion, until } from '../helpers/vhost-user.js';

const env = tapEnv();

async function catchError(fn: () => Promise<unknown>): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected the call to reject');
}

const PROTO = bit(PROTOCOL_FEATURE.MQ) | bit(PROTOCOL_FEATURE.REPLY_ACK) | bit(PROTOCOL_FEATURE.CONFIGURE_MEM_SLOTS) | bit(PROTOCOL_FEATURE.STATUS);
const ACKED = bit(FEATURE.VIRTIO_F_VERSION_1) | bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES) | bit(FEATURE.VIRTIO_NET_F_MQ) | bit(FEATURE.VIRTIO_NET_F_MRG_RXBUF) | bit(FEATURE.VIRTIO_NET_F_CSUM) | bit(FEATURE.VIRTIO_NET_F_GUEST_CSUM);

function counts(name: string): [number, number] {
  const t = getTap(name);
  if (!t) throw new Error(`${name} does not exist`);
  return [t.tun.numQueues, t.tun.numDisabledQueues];
}

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* best effort */
    }
  }
});

function tempSocket(): string {
  const d = mkdtempSync(join(tmpdir(), 'mqtap-vu-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return join(d, 'vu.sock');
}

async function frontend(path: string): Promise<ScriptedFrontend> {
  const fe = new ScriptedFrontend(await UnixSocket.connect(path, { type: 'stream' }));
  cleanups.push(() => fe.close());
  return fe;
}

async function qemuInit(fe: ScriptedFrontend, pairs: number): Promise<void> {
  for (let p = 0; p < pairs; p++) {
    await fe.u64('GET_FEATURES');
    await fe.u64('GET_PROTOCOL_FEATURES');
    await fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: PROTO });
    if (p === 0) expect(await fe.u64('GET_QUEUE_NUM')).toBe(BigInt(pairs));
    await fe.send('SET_OWNER');
  }
  await fe.enableVector(pairs, 1);
  await fe.u64('GET_STATUS');
}

async function qemuStart(fe: ScriptedFrontend, pairs: number, active: number): Promise<void> {
  for (let p = 0; p < pairs; p++) {
    await fe.send('SET_FEATURES', { kind: 'u64', value: ACKED });
    await fe.send('ADD_MEM_REG', { kind: 'memRegion', region: memRegion(0) }, [fe.eventfd()], NEED_REPLY);
    expect((await fe.reply()).payload).toEqual({ kind: 'u64', value: 0n });
    await fe.setupRing(2 * p);
    await fe.setupRing(2 * p + 1);
  }
  await fe.enableVector(pairs, active);
  await fe.u64('GET_STATUS');
}

describe.skipIf(!env.ok)(`vhost-user backend on a real tap${skipNote(env)}`, () => {
  useIsolatedNetns();

  it('enable vectors become the tap\'s attached/detached queues in the kernel; one front-end after another', async () => {
    const socket = tempSocket();
    const planes: FakeDataPlane[] = [];
    const be = await serveVhostUser({ socket, name: 'vu%d', queues: 4, dataPlane: () => (planes.push(new FakeDataPlane()), planes.at(-1)!) });
    cleanups.push(() => be.close());
    const name = be.tap.name;
    expect(counts(name)).toEqual([4, 0]);
    expect(lstatSync(socket).mode & 0o777).toBe(0o600);
    const events: string[] = [];
    be.on('connected', () => events.push('connected'));
    const gone: Array<{ counters?: unknown[] }> = [];
    be.on('disconnected', (d: { counters?: unknown[] }) => (events.push('disconnected'), gone.push(d)));
    be.on('features', () => events.push('features'));

    const fe = await frontend(socket);
    await qemuInit(fe, 4);
    expect(counts(name)).toEqual([1, 3]); // pair 0 on, the rest off, before SET_FEATURES
    await qemuStart(fe, 4, 1);
    expect(be.tap.vnetHdrSize()).toBe(12);
    expect(be.pairsState()).toEqual({ enabled: [0], live: [0] });
    await fe.enableVector(4, 3);
    await fe.u64('GET_STATUS');
    expect(counts(name)).toEqual([3, 1]);
    expect(be.pairsState()).toEqual({ enabled: [0, 1, 2], live: [0, 1, 2] });
    await fe.enableVector(4, 4);
    await fe.u64('GET_STATUS');
    expect(counts(name)).toEqual([4, 0]);
    await fe.enableVector(4, 1);
    await fe.u64('GET_STATUS');
    expect(counts(name)).toEqual([1, 3]);
    await fe.enableVector(4, 0); // the tap never drops to zero attached queues
    await fe.u64('GET_STATUS');
    expect(counts(name)).toEqual([1, 3]);
    expect(be.counters()).toHaveLength(4);

    // A second front-end while the first is connected is refused at once.
    const intruder = await frontend(socket);
    await until(() => intruder.closed);
    expect(be.connected).toBe(true);

    // quit: GET_VRING_BASE on every ring, EOF.  The tap stays; the data plane is closed.
    for (let i = 0; i < 8; i++) await fe.getBase(i);
    fe.close();
    await until(() => !be.connected);
    expect(planes[0]!.closed).toBe(true);
    expect(counts(name)).toEqual([1, 3]);
    // The connection's last counters (read before its data plane closed) come with the event.
    expect(gone[0]!.counters).toHaveLength(4);
    expect(gone[0]!.counters![0]).toMatchObject({ txFrames: 0n, tapEngine: 'none' });

    // The next QEMU gets the same features (never fewer) and works.
    const fe2 = await frontend(socket);
    expect(await fe2.u64('GET_FEATURES')).toBe(offeredFeatures());
    await qemuInit(fe2, 4);
    await qemuStart(fe2, 4, 2);
    expect(counts(name)).toEqual([2, 2]);
    expect(planes).toHaveLength(2);
    expect(planes[1]!.running()).toEqual(['0rx', '0tx', '1rx', '1tx']);
    expect(events).toEqual(['connected', 'features', 'features', 'features', 'features', 'disconnected', 'connected', 'features', 'features', 'features', 'features']);
    await be.close();
    expect(planes[1]!.closed).toBe(true);
    expect(() => lstatSync(socket)).toThrow(); // the socket file is removed
    expect(getTap(name)).toBeUndefined(); // the backend opened (created) it: gone with its queues
  });

  it('client mode: connects to a listening front-end, retrying until it appears, and again after it went away', async () => {
    const socket = tempSocket();
    const tap = openTap({ name: 'vuc%d', queues: 2 });
    cleanups.push(() => tap.close());
    const be = await serveVhostUser({ socket, tap, queues: 2, client: true, retryMs: 20, dataPlane: () => new FakeDataPlane() });
    cleanups.push(() => be.close());
    await new Promise((r) => setTimeout(r, 100)); // nothing listens yet: retries, no error
    const server = await UnixServer.listen(socket, { type: 'stream' });
    cleanups.push(() => server.close());
    const accepted: ScriptedFrontend[] = [];
    server.on('connection', (s: UnixSocket) => accepted.push(new ScriptedFrontend(s)));
    await until(() => accepted.length === 1);
    const fe = accepted[0]!;
    cleanups.push(() => fe.close());
    await qemuInit(fe, 2);
    await qemuStart(fe, 2, 2);
    expect(counts(tap.name)).toEqual([2, 0]);
    fe.close();
    await until(() => accepted.length === 2, 3000); // reconnected
    accepted[1]!.close();
    await be.close();
    expect(tap.closed).toBe(false); // a tap passed in stays open
    expect(counts(tap.name)).toEqual([2, 0]);
  });

  it('a group socket is 0660 with that group', async () => {
    const socket = tempSocket();
    const be = await serveVhostUser({ socket, name: 'vug%d', queues: 1, group: 4242, dataPlane: () => new FakeDataPlane() });
    cleanups.push(() => be.close());
    const st = lstatSync(socket);
    expect(st.mode & 0o777).toBe(0o660);
    expect(st.gid).toBe(4242);
  });

  it('bad options: MqtapError, and nothing left behind (no tap, no socket file, no fd)', async () => {
    const socket = tempSocket();
    const before = fdCount();
    const cases: Array<Record<string, unknown>> = [
      { socket: 'relative.sock', name: 'vub0', queues: 1 },
      { socket, queues: 1 },
      { socket, name: 'vub0', queues: 0 },
      { socket, name: 'vub0', queues: 1, tap: {} },
      { socket, name: 'vub0', queues: 1, offloads: { tso4: true } },
      { socket, name: 'vub0', queues: 1, bogus: 1 },
      { socket, name: 'vub0', queues: 1, client: true, group: 1 },
    ];
    for (const c of cases) {
      const err = await catchError(() => serveVhostUser(c as never));
      expect(err).toBeInstanceOf(MqtapError);
      expect((err as MqtapError).code).toBe('ERR_INVALID_ARG');
    }
    // A socket path whose directory does not exist: the tap this call opened is closed again.
    const err = await catchError(() => serveVhostUser({ socket: '/nonexistent-dir/x.sock', name: 'vub1', queues: 2, dataPlane: () => new FakeDataPlane() }));
    expect(err).toBeInstanceOf(MqtapError);
    expect(getTap('vub0')).toBeUndefined();
    expect(getTap('vub1')).toBeUndefined();
    expect(fdCount()).toBe(before);
  });

  it('a connection ending in a malformed message leaves no fd behind and the backend serves the next one', async () => {
    const socket = tempSocket();
    const be: VhostUserBackend = await serveVhostUser({ socket, name: 'vum%d', queues: 2, dataPlane: () => new FakeDataPlane() });
    cleanups.push(() => be.close());
    const before = fdCount();
    const fe = await frontend(socket);
    await qemuInit(fe, 2);
    await qemuStart(fe, 2, 2);
    await fe.send('SET_VRING_KICK', { kind: 'vringFd', index: 0, noFd: false }); // its fd is missing
    await until(() => fe.closed && !be.connected);
    fe.close();
    await until(() => fdCount() === before);
    const fe2 = await frontend(socket);
    expect(await fe2.u64('GET_QUEUE_NUM')).toBe(2n);
  });
});
