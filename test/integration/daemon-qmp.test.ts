/**
 * The daemon hot-plugging the netdevs it holds into a real QEMU (q35, -S,
 * no guest) over QMP, in a throw-away network namespace: the lease that
 * follows (set-active/acquire/delete refused while plugged), a failed
 * hot-add that is undone (lease dropped, active pairs restored, QEMU holds
 * no fd), an unplug that times out because no guest releases the device
 * (lease kept), and forced delete.  The full hot-add/hot-remove cycle with a
 * guest is in test/vm/hotplug.test.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { deleteTap } from '../../lib/tap/tap.js';
import { haveCommand, need, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { rejection, tunFds, waitFor } from '../helpers/wait';

const ROOT = join(__dirname, '..', '..');
const CLI = join(ROOT, 'dist', 'bin', 'mqtap.js');
const QEMU = process.env.MQTAP_VM_QEMU || 'qemu-system-x86_64';
const env = tapEnv();
const reason =
  (!env.ok ? env.reason : need('qemu', haveCommand(QEMU) ? '' : `${QEMU} not found (apt-get install qemu-system-x86)`).reason) ||
  (!existsSync(CLI) ? 'dist/bin/mqtap.js is not built (npx tsc -p tsconfig.json)' : '');
if (reason) console.warn(`daemon + QMP tests skipped: ${reason}`);

function exited(p: ChildProcess, ms = 20_000): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      p.kill('SIGKILL');
      resolve();
    }, ms);
    p.once('exit', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

describe.skipIf(!!reason)(`daemon hotplug into a real QEMU${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let qmpPath: string;
  let qemu: ChildProcess;
  let daemon: ChildProcess;
  let socket: string;
  let logFile: string;
  let c: DaemonClient;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-dqmp-'));
    qmpPath = join(dir, 'qmp.sock');
    socket = join(dir, 'mqtap.sock');
    logFile = join(dir, 'daemon.log');
    const wrap = haveCommand('setpriv') ? ['setpriv', '--pdeathsig', 'KILL', '--', QEMU] : [QEMU];
    qemu = spawn(wrap[0]!, [
      ...wrap.slice(1),
      '-machine', 'q35', '-accel', 'tcg', '-S', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '64',
      '-qmp', `unix:${qmpPath},server=on,wait=off`,
      '-device', 'pcie-root-port,id=rp0,chassis=1',
    ], { stdio: 'ignore' });
    const log = openSync(logFile, 'w');
    daemon = spawn(process.execPath, [CLI, '--log-level', 'info', 'daemon', '--socket', socket, '--state-dir', join(dir, 'state'), '--qmp-timeout', '5000', '--unplug-timeout', '1000'], { stdio: ['ignore', 'ignore', log] });
    closeSync(log);
    await waitFor('QEMU and the daemon', () => (existsSync(qmpPath) && existsSync(socket)) || qemu.exitCode !== null || daemon.exitCode !== null, 30_000);
    expect(qemu.exitCode).toBeNull();
    expect(daemon.exitCode).toBeNull();
    c = await DaemonClient.connect(socket, { timeoutMs: 30_000 });
  }, 60_000);

  afterAll(async () => {
    c?.close();
    daemon?.kill('SIGTERM');
    if (daemon) await exited(daemon);
    qemu?.kill('SIGKILL');
    if (qemu) await exited(qemu);
    for (const t of listTaps()) deleteTap(t.name);
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it('hotplug hands every pair to QEMU and records a qmp lease; while plugged: set-active, acquire, hotplug, delete are refused', async () => {
    await c.create({ name: 'dq0', pairs: 4, vhost: 'off', active: 1, persist: true });
    const r = await c.hotplug('dq0', { qmp: qmpPath, id: 'nic1', bus: 'rp0' });
    expect(r).toMatchObject({ device: 'nic1', netdevId: 'nic1-netdev', lease: { kind: 'qmp', qmp: qmpPath, id: 'nic1', netdevId: 'nic1-netdev', pid: process.pid } });
    expect(r.qemu).toMatch(/^\d+\.\d+/);
    expect(tunFds(qemu.pid!)).toBe(4);
    const t = getTap('dq0')!;
    expect(t.tun.numQueues + t.tun.numDisabledQueues).toBe(4);
    expect(JSON.parse(readFileSync(join(dir, 'state', 'netdevs', 'dq0.json'), 'utf8')).lease).toMatchObject({ kind: 'qmp', id: 'nic1' });

    const sa = await rejection(c.setActive('dq0', 2));
    expect(sa.code).toBe('EBUSY');
    expect(sa.hint).toMatch(/ethtool -L/);
    expect((await rejection(c.acquire('dq0'))).code).toBe('EBUSY');
    expect((await rejection(c.hotplug('dq0', { qmp: qmpPath, id: 'nic9', bus: 'rp0' }))).code).toBe('EBUSY');
    expect((await rejection(c.delete('dq0'))).code).toBe('EBUSY');
    expect((await rejection(c.release('dq0'))).hint).toMatch(/unplug/);
  }, 60_000);

  it('unplug with no guest to release the device times out; the lease and QEMU\'s fds stay', async () => {
    const e = await rejection(c.unplug('dq0', { timeoutMs: 1000 }));
    expect(e.code).toBe('ETIMEDOUT');
    expect((await c.show('dq0')).lease).toMatchObject({ kind: 'qmp', id: 'nic1' });
    expect(tunFds(qemu.pid!)).toBe(4);
  }, 30_000);

  it('a hot-add that QEMU refuses is undone: no lease, the active pairs as before, QEMU holds nothing more', async () => {
    await c.create({ name: 'dq1', pairs: 2, vhost: 'off', active: 1 });
    const e = await rejection(c.hotplug('dq1', { qmp: qmpPath, id: 'nic2', bus: 'no-such-bus' }));
    expect(e.message).toMatch(/device_add failed.*undone/);
    const s = await c.show('dq1');
    expect(s).toMatchObject({ lease: null, active: 1, numQueues: 1, numDisabledQueues: 1 });
    await waitFor('QEMU to close the fds', () => tunFds(qemu.pid!) === 4);
    const gone = await rejection(c.hotplug('dq1', { qmp: join(dir, 'none.sock'), id: 'nic2' }));
    expect(gone.code).toBe('ENOENT');
    expect((await c.show('dq1')).lease).toBeNull();
    await c.setActive('dq1', 2);
    await c.delete('dq1');
  }, 30_000);

  it('a forced delete drops the lease, closes the daemon\'s fds and deletes the tap it created (QEMU keeps running)', async () => {
    const r = await c.delete('dq0', { force: true });
    expect(r).toMatchObject({ deleted: true, deviceDeleted: true });
    expect(getTap('dq0')).toBeUndefined();
    expect(existsSync(join(dir, 'state', 'netdevs', 'dq0.json'))).toBe(false);
    expect(qemu.exitCode).toBeNull();
    const lines = readFileSync(logFile, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.some((l) => l.op === 'hotplug' && l.ok === true && (l.peer as { pid: number }).pid === process.pid)).toBe(true);
  });
});
