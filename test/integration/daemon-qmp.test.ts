/**
 * The daemon hot-plugging the netdevs it holds into a real QEMU (q35, -S,
 * no guest) over QMP, in a throw-away network namespace: the lease that
 * follows (set-active/acquire/delete refused while plugged), a failed
 * hot-add that is undone (lease dropped, active pairs restored, QEMU holds
 * no fd), an unplug that times out because no guest releases the device
 * (lease kept), and forced delete.  The full hot-add/hot-remove cycle with a
 * guest is in test/vm/hotplug.test.ts.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { deleteTap } from '../../lib/tap/tap.js';
import { cliBuiltReason } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { qemuMissingReason, startPausedQemu, type PausedQemu } from '../helpers/qemu';
import { rejection, tunFds, waitFor } from '../helpers/wait';

const env = tapEnv();
const reason = !env.ok ? env.reason : qemuMissingReason() || cliBuiltReason();
if (reason) console.warn(`daemon + QMP tests skipped: ${reason}`);

describe.skipIf(!!reason)(`daemon hotplug into a real QEMU${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let qmpPath: string;
  let qemu: PausedQemu | undefined;
  let daemon: DaemonProcess | undefined;
  let c: DaemonClient;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-dqmp-'));
    qmpPath = join(dir, 'qmp.sock');
    qemu = await startPausedQemu({ qmpPath, rootPorts: 1 });
    daemon = await DaemonProcess.start({ dir, args: ['--qmp-timeout', '5000', '--unplug-timeout', '1000'], timeoutMs: 30_000 });
    c = await DaemonClient.connect(daemon.socket, { timeoutMs: 30_000 });
  }, 60_000);

  afterAll(async () => {
    c?.close();
    await daemon?.dispose();
    await qemu?.stop();
    for (const t of listTaps()) deleteTap(t.name);
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it('hotplug hands every pair to QEMU and records a qmp lease; while plugged: set-active, acquire, hotplug, delete are refused', async () => {
    await c.create({ name: 'dq0', pairs: 4, vhost: 'off', active: 1, persist: true });
    const r = await c.hotplug('dq0', { qmp: qmpPath, id: 'nic1', bus: 'rp0' });
    expect(r).toMatchObject({ device: 'nic1', netdevId: 'nic1-netdev', lease: { kind: 'qmp', qmp: qmpPath, id: 'nic1', netdevId: 'nic1-netdev', pid: process.pid } });
    expect(r.qemu).toMatch(/^\d+\.\d+/);
    expect(tunFds(qemu!.pid)).toBe(4);
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
    expect(tunFds(qemu!.pid)).toBe(4);
  }, 30_000);

  it('a hot-add that QEMU refuses is undone: no lease, the active pairs as before, QEMU holds nothing more', async () => {
    await c.create({ name: 'dq1', pairs: 2, vhost: 'off', active: 1 });
    const e = await rejection(c.hotplug('dq1', { qmp: qmpPath, id: 'nic2', bus: 'no-such-bus' }));
    expect(e.message).toMatch(/device_add failed.*undone/);
    const s = await c.show('dq1');
    expect(s).toMatchObject({ lease: null, active: 1, numQueues: 1, numDisabledQueues: 1 });
    await waitFor('QEMU to close the fds', () => tunFds(qemu!.pid) === 4);
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
    expect(qemu!.child.exitCode).toBeNull();
    const lines = daemon!.logLines();
    expect(lines.some((l) => l.op === 'hotplug' && l.ok === true && (l.peer as { pid: number }).pid === process.pid)).toBe(true);
  });
});
