/**
 * The daemon against bad clients, as a real process in a throw-away network
 * namespace: malformed, oversized and fd-carrying messages; a client killed
 * in the middle of a request (the daemon waiting on QEMU for it) and one
 * killed while not reading its replies; 50 concurrent clients x 1,000
 * requests.  After each: the daemon is alive, its fd count
 * (/proc/PID/fd) is back where it was, and its state agrees with the kernel.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { type Op } from '../../lib/daemon/protocol.js';
import { MqtapError } from '../../lib/sys/errors.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { native } from '../../lib/sys/native.js';
import { ReceivedFds, UnixServer, UnixSocket } from '../../lib/sys/scm.js';
import { deleteTap } from '../../lib/tap/tap.js';
import { ROOT, cliBuiltReason } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { waitFor } from '../helpers/wait';

const CLIENT_JS = join(ROOT, 'dist', 'lib', 'daemon', 'client.js');
const env = tapEnv();
const reason = !env.ok ? env.reason : cliBuiltReason();
if (reason) console.warn(`daemon abuse tests skipped: ${reason}`);

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    if (err instanceof MqtapError) return err.code;
    throw err;
  }
  return 'no error';
}

/** A raw seqpacket connection with a queue of the messages it receives. */
async function rawConnection(socket: string): Promise<{ s: UnixSocket; next: () => Promise<Record<string, unknown>>; ended: Promise<void> }> {
  const s = await UnixSocket.connect(socket, { type: 'seqpacket', maxFds: 64, maxMessageBytes: 256 * 1024 });
  const queue: Array<Record<string, unknown>> = [];
  const waiters: Array<(m: Record<string, unknown>) => void> = [];
  s.on('message', (d: Buffer, fds: ReceivedFds) => {
    fds.close();
    const m = JSON.parse(d.toString()) as Record<string, unknown>;
    const w = waiters.shift();
    if (w) w(m);
    else queue.push(m);
  });
  const ended = new Promise<void>((r) => s.once('close', () => r()));
  const next = (): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      const m = queue.shift();
      if (m) return resolve(m);
      const t = setTimeout(() => reject(new Error('no reply within 10 s')), 10_000);
      waiters.push((x) => {
        clearTimeout(t);
        resolve(x);
      });
    });
  return { s, next, ended };
}

describe.skipIf(!!reason)(`mqtap daemon under abuse${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let d: DaemonProcess;
  let baseline: number;
  const children: ChildProcess[] = [];
  const servers: UnixServer[] = [];

  /** The daemon's fd count once it has noticed every connection closing. */
  async function expectFdsBack(): Promise<void> {
    await waitFor(`the daemon's fd count to return to ${baseline}`, () => d.fdCount() === baseline, 20_000).catch(() => undefined);
    expect(d.fdCount()).toBe(baseline);
    expect(d.alive).toBe(true);
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-abuse-'));
    d = await DaemonProcess.start({ dir, args: ['--qmp-timeout', '1500', '--max-clients', '128'] });
    const c = await DaemonClient.connect(d.socket);
    await c.create({ name: 'ab0', pairs: 4, vhost: 'off', active: 2 });
    const withClient = d.fdCount();
    c.close();
    await waitFor('the setup client to be gone', () => d.fdCount() === withClient - 1);
    baseline = d.fdCount();
  }, 30_000);

  afterAll(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const s of servers) s.close();
    if (d?.alive) {
      const exit = await d.stop('SIGTERM', 20_000);
      expect(exit, 'the daemon stops cleanly after all this').toEqual({ code: 0, signal: null });
      expect(d.logLines().filter((l) => Number(l.level) >= 50), 'no error-level log lines').toEqual([]);
    }
    for (const t of listTaps()) deleteTap(t.name);
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it('malformed, oversized and fd-carrying requests each get an error reply; the connection stays usable; nothing leaks', async () => {
    const { s, next, ended } = await rawConnection(d.socket);
    const fds = Array.from({ length: 3 }, () => native.eventfdOpen());
    const cases: Array<[string, Buffer, readonly number[], string, unknown]> = [
      ['not JSON', Buffer.from('hello daemon'), [], 'ERR_PROTOCOL', null],
      ['invalid UTF-8', Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), [], 'ERR_PROTOCOL', null],
      ['a JSON array', Buffer.from('[1,2,3]'), [], 'ERR_PROTOCOL', null],
      ['no id', Buffer.from('{"op":"list"}'), [], 'ERR_PROTOCOL', null],
      ['a negative id', Buffer.from('{"id":-1,"op":"list"}'), [], 'ERR_PROTOCOL', null],
      ['an unknown op', Buffer.from('{"id":5,"op":"rm-rf"}'), [], 'ERR_UNKNOWN_OP', 5],
      ['bad argument types', Buffer.from('{"id":6,"op":"create","args":{"name":"x","pairs":"many"}}'), [], 'ERR_INVALID_ARG', 6],
      ['args not an object', Buffer.from('{"id":7,"op":"list","args":"all"}'), [], 'ERR_PROTOCOL', 7],
      ['an unknown field', Buffer.from('{"id":"s","op":"list","x":1}'), [], 'ERR_PROTOCOL', 's'],
      ['deep nesting', Buffer.from(`{"id":8,"op":"list","args":${'['.repeat(30_000)}${']'.repeat(30_000)}}`), [], 'ERR_PROTOCOL', 8],
      ['100 KiB (over the 64 KiB limit)', Buffer.alloc(100 * 1024, 0x20), [], 'EMSGSIZE', null],
      ['fds attached (MSG_CTRUNC)', Buffer.from('{"id":9,"op":"list"}'), fds, 'EMSGSIZE', null],
      ['an unknown netdev', Buffer.from('{"id":10,"op":"delete","args":{"name":"zz9"}}'), [], 'ENODEV', 10],
      ['a relative QMP path', Buffer.from('{"id":11,"op":"hotplug","args":{"name":"ab0","qmp":"q.sock","id":"n1"}}'), [], 'ERR_INVALID_ARG', 11],
    ];
    try {
      for (const [what, payload, withFds, code, id] of cases) {
        await s.send(payload, withFds);
        const r = await next();
        expect(r, what).toMatchObject({ id, ok: false, error: { code } });
      }
      await s.send(Buffer.from('{"id":100,"op":"hello"}'));
      expect(await next()).toMatchObject({ id: 100, ok: true, result: { protocol: 1 } });
      const refusals = d.logLines().filter((l) => l.ok === false);
      expect(refusals.length).toBeGreaterThanOrEqual(cases.length);
      await s.send(Buffer.from('{"id":101,"op":"list"}'));
      expect(await next()).toMatchObject({ id: 101, ok: true });
    } finally {
      fds.forEach((fd) => native.close(fd));
    }
    // An empty message reads as end-of-file: the daemon hangs up (we do not close first).
    await s.send(Buffer.alloc(0));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([ended, new Promise((_, rej) => (timer = setTimeout(() => rej(new Error('the daemon did not hang up')), 10_000)))]);
    clearTimeout(timer);
    expect(s.closed).toBe(true);
    await expectFdsBack();
  });

  it('a client killed while the daemon waits on QEMU for it: the request finishes, the lease is dropped, nothing leaks', async () => {
    // A "QEMU" that accepts and never says a word: the daemon's QMP connect waits (1.5 s timeout).
    const qmpPath = join(dir, 'silent-qmp.sock');
    const silent = await UnixServer.listen(qmpPath, { type: 'stream' });
    servers.push(silent);
    let qmpConn: UnixSocket | undefined;
    silent.on('connection', (s: UnixSocket) => {
      qmpConn = s;
      s.on('message', (_d: Buffer, f: ReceivedFds) => f.close());
    });
    const script = `
const { DaemonClient } = require(${JSON.stringify(CLIENT_JS)});
DaemonClient.connect(${JSON.stringify(d.socket)}).then((c) => {
  c.hotplug('ab0', { qmp: ${JSON.stringify(qmpPath)}, id: 'nic1' }).catch(() => {});
  setInterval(() => {}, 1000);
});`;
    const child = spawn(process.execPath, ['-e', script], { stdio: 'ignore' });
    children.push(child);
    await waitFor('the daemon to connect to the silent QEMU', () => qmpConn !== undefined);
    const c = await DaemonClient.connect(d.socket);
    expect((await c.show('ab0')).lease).toMatchObject({ kind: 'qmp', pending: true });
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const qmpClosed = new Promise<void>((r) => (qmpConn!.closed ? r() : qmpConn!.once('close', () => r())));
    await qmpClosed; // the daemon gave up on QEMU and closed its end
    await waitFor('the failed hotplug in the log', () => d.logLines().some((l) => l.op === 'hotplug' && l.ok === false && l.code === 'ETIMEDOUT'));
    const after = await c.show('ab0');
    expect(after).toMatchObject({ lease: null, active: 2, holding: true, numQueues: 2, numDisabledQueues: 2 });
    expect(after.kernelPairStates).toEqual(['enabled', 'enabled', 'disabled', 'disabled']);
    c.close();
    await expectFdsBack();
  }, 60_000);

  it('a client that never reads its replies (fds included) and is killed: no leak; its lease is still released by another client', async () => {
    const script = `
const { UnixSocket } = require(${JSON.stringify(join(ROOT, 'dist', 'lib', 'sys', 'scm.js'))});
UnixSocket.connect(${JSON.stringify(d.socket)}, { type: 'seqpacket' }).then(async (s) => {
  s.pause();
  const sends = [];
  for (let i = 0; i < 2000; i++) sends.push(s.send(JSON.stringify({ id: i, op: i === 0 ? 'acquire' : 'show', args: { name: 'ab0' } })).catch(() => {}));
  await sends[0];
  process.stdout.write('sent\\n');
  setInterval(() => {}, 1000);
});`;
    const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'ignore'] });
    children.push(child);
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('the child did not start')), 15_000);
      child.stdout!.on('data', () => {
        clearTimeout(t);
        resolve();
      });
    });
    const c = await DaemonClient.connect(d.socket);
    await waitFor('the acquire to be served', async () => (await c.show('ab0')).lease !== null);
    // Give the daemon time to fill the child's socket buffer with replies it never reads.
    await waitFor('the daemon to stall on the unread replies', () => d.logLines().filter((l) => l.op === 'show' && l.ok === true).length > 50);
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const shown = await c.show('ab0');
    expect(shown.lease).toMatchObject({ kind: 'client', pid: child.pid });
    const released = await c.release('ab0');
    expect(released).toMatchObject({ lease: null, numQueues: 2, numDisabledQueues: 2 });
    c.close();
    await expectFdsBack();
  }, 60_000);

  it('50 concurrent clients x 1,000 requests: every reply as expected, no crash, no fd leak, consistent state', async () => {
    const N_CLIENTS = 50;
    const N_REQ = 1000;
    const ourFds = readdirSync('/proc/self/fd').length;
    const clients = await Promise.all(Array.from({ length: N_CLIENTS }, () => DaemonClient.connect(d.socket, { timeoutMs: 120_000 })));
    const tally = { ok: 0, busy: 0 };
    const unexpected: string[] = [];
    const expectCode = async (what: string, p: Promise<unknown>, code: string): Promise<void> => {
      const got = await codeOf(p);
      if (got !== code) unexpected.push(`${what}: ${got} instead of ${code}`);
    };
    const worker = async (c: DaemonClient, i: number): Promise<void> => {
      for (let j = 0; j < N_REQ; j++) {
        try {
          switch (j % 10) {
            case 0:
              await c.list();
              break;
            case 1:
            case 9:
              await c.show('ab0');
              break;
            case 2:
              await c.setActive('ab0', 1 + ((i + j) % 4));
              break;
            case 3:
              try {
                const a = await c.acquire('ab0');
                if (a.tapFds.length !== 4) unexpected.push(`acquire gave ${a.tapFds.length} fds`);
                a.fds.close();
                await c.release('ab0');
              } catch (err) {
                if ((err as MqtapError).code !== 'EBUSY') throw err;
                tally.busy++;
              }
              break;
            case 4:
              await expectCode('unknown op', c.request('rm-rf' as Op), 'ERR_UNKNOWN_OP');
              break;
            case 5:
              await expectCode('unknown netdev', c.show(`nx${i}`), 'ENODEV');
              break;
            case 6:
              if (j % 100 === 6) await c.create({ name: `st${i}`, pairs: 2, vhost: 'off' });
              else if (j % 100 === 56) await c.delete(`st${i}`);
              else await c.hello();
              break;
            case 7:
              await expectCode('bad pairs', c.request('create', { name: 'x', pairs: 0 }), 'ERR_INVALID_ARG');
              break;
            case 8:
              await expectCode('bad qmp path', c.request('hotplug', { name: 'ab0', qmp: 'relative.sock', id: 'n1' }), 'ERR_INVALID_ARG');
              break;
          }
          tally.ok++;
        } catch (err) {
          unexpected.push(`client ${i} request ${j}: ${(err as Error).message}`);
        }
      }
    };
    await Promise.all(clients.map((c, i) => worker(c, i)));
    expect(unexpected.slice(0, 10)).toEqual([]);
    expect(tally.ok).toBe(N_CLIENTS * N_REQ);
    expect(d.alive).toBe(true);

    const c = clients[0]!;
    const list = await c.list();
    expect(list.map((n) => n.name)).toEqual(['ab0']);
    const ab0 = await c.show('ab0');
    expect(ab0.lease).toBeNull();
    expect(ab0.kernelPairStates).toEqual(ab0.pairStates);
    expect(ab0.numQueues).toBe(ab0.active);
    expect(ab0.numDisabledQueues).toBe(4 - ab0.active);
    const k = getTap('ab0')!;
    expect(k.tun.numQueues).toBe(ab0.active);
    expect(listTaps().map((t) => t.name)).toEqual(['ab0']);
    for (const cl of clients) cl.close();
    expect(readdirSync('/proc/self/fd').length).toBeLessThanOrEqual(ourFds);
    await expectFdsBack();
    const served = d.logLines().filter((l) => l.msg === 'request done' || l.msg === 'request failed').length;
    expect(served).toBeGreaterThanOrEqual(N_CLIENTS * N_REQ);
  }, 300_000);
});
