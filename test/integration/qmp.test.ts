/**
 * QMP client and hot-add against a real QEMU (qemu-system-x86_64, q35, no
 * guest: started with -S, so nothing runs), inside a throw-away network
 * namespace.  Checks QEMU's own view: the fds it holds (/proc/QEMU/fd
 * entries pointing at /dev/net/tun), qom-get/query-pci, and that a failed
 * hot-add gives back every fd.  Hot-remove needs a guest that releases the
 * device: here it times out cleanly; test/vm/hotplug.test.ts does the real
 * thing.  Also the `mqtap hotplug` / `mqtap unplug` CLI.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hotplugFds, hotplugNetdev, unplugNetdev } from '../../lib/qemu/hotplug.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { openNetdev, type Netdev } from '../../lib/vhost/netdev.js';
import { QmpClient, QmpError } from '../../lib/qemu/qmp.js';
import { cliBuiltReason, runCli } from '../helpers/cli';
import { skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { qemuMissingReason, startPausedQemu, type PausedQemu } from '../helpers/qemu';
import { rejection, tunFds, waitFor } from '../helpers/wait';

const env = tapEnv();
const reason = !env.ok ? env.reason : qemuMissingReason() || cliBuiltReason();
if (reason) console.warn(`QMP integration tests skipped: ${reason}`);

describe.skipIf(!!reason)(`QMP and hot-add against a real QEMU${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let qmpPath: string;
  let qemu: PausedQemu | undefined;
  let qemuPid: number;
  const netdevs: Netdev[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-qmp-'));
    qmpPath = join(dir, 'qmp.sock');
    qemu = await startPausedQemu({ qmpPath, rootPorts: 3, forwardStderr: true });
    qemuPid = qemu.pid;
  }, 60_000);

  afterAll(async () => {
    for (const n of netdevs) n.close();
    await qemu?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function client(): Promise<QmpClient> {
    return QmpClient.connect(qmpPath, { timeoutMs: 10_000 });
  }

  it('negotiates capabilities, runs commands, maps errors, delivers events', async () => {
    const q = await client();
    try {
      expect(q.qemuVersion).toMatch(/^\d+\.\d+\.\d+$/);
      expect(await q.execute('query-status')).toMatchObject({ running: false, status: 'prelaunch' });
      const e = await rejection(q.execute('no-such-command'));
      expect(e).toBeInstanceOf(QmpError);
      expect((e as QmpError).qmpClass).toBe('CommandNotFound');
      const bad = await rejection(q.execute('device_add', { driver: 'no-such-driver', id: 'x' }));
      expect((bad as QmpError).qmpClass).toBe('GenericError');
      const stopped = q.waitForEvent('STOP', () => true, 10_000);
      const resumed = q.waitForEvent('RESUME', () => true, 10_000);
      await q.execute('cont');
      await resumed.promise;
      await q.execute('stop');
      await stopped.promise;
      expect(await q.execute('query-status')).toMatchObject({ running: false, status: 'paused' });
    } finally {
      q.close();
    }
  });

  it('hot-adds a 4-pair tap netdev: QEMU holds 4 tap fds, the device sits on the root port, the tap outlives our copies', async () => {
    const q = await client();
    try {
      const before = tunFds(qemuPid);
      const nd = openNetdev({ name: 'qh%d', pairs: 4, vhost: 'off' });
      netdevs.push(nd);
      nd.setActivePairs(2); // hotplugNetdev enables all pairs: QEMU assumes attached queues
      const r = await hotplugNetdev(q, nd, { id: 'nic1', bus: 'rp0', mac: '52:54:00:00:00:21' });
      expect(r).toMatchObject({ id: 'nic1', netdevId: 'nic1-netdev', queues: 4, vhost: false });
      expect(tunFds(qemuPid)).toBe(before + 4);
      expect(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'netdev' })).toBe('nic1-netdev');
      expect(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'mq' })).toBe(true);
      expect(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'vectors' })).toBe(10);
      expect(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'type' })).toBe('virtio-net-pci');
      expect(String(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'parent_bus' }))).toMatch(/rp0/);
      // Every queue went to QEMU: the device has 4 queues, whichever QEMU keeps attached.
      const t = getTap(nd.name)!;
      expect(t.tun.numQueues + t.tun.numDisabledQueues).toBe(4);
      nd.close();
      const after = getTap(nd.name);
      expect(after, 'QEMU\'s copies keep the non-persistent tap alive').toBeDefined();
      expect(after!.tun.numQueues + after!.tun.numDisabledQueues).toBe(4);
    } finally {
      q.close();
    }
  });

  it('a hot-add that fails at device_add gives every fd back and frees the ids', async () => {
    const q = await client();
    try {
      const before = tunFds(qemuPid);
      const nd = openNetdev({ name: 'qf%d', pairs: 3, vhost: 'off' });
      netdevs.push(nd);
      const e = await rejection(hotplugNetdev(q, nd, { id: 'nic2', bus: 'no-such-bus' }));
      expect(e.message).toMatch(/device_add failed.*undone/);
      await waitFor('QEMU to close the fds', () => tunFds(qemuPid) === before);
      // The same ids work now: nothing was left registered.
      await hotplugNetdev(q, nd, { id: 'nic2', bus: 'rp1' });
      expect(tunFds(qemuPid)).toBe(before + 3);
    } finally {
      q.close();
    }
  });

  it('a hot-add that fails at netdev_add (duplicate netdev id) closes every getfd name in QEMU', async () => {
    const q = await client();
    try {
      const before = tunFds(qemuPid);
      const nd = openNetdev({ name: 'qd%d', pairs: 2, vhost: 'off' });
      netdevs.push(nd);
      const e = await rejection(hotplugFds(q, { id: 'nic3', netdevId: 'nic1-netdev', tapFds: nd.tapFds() }));
      expect(e.message).toMatch(/netdev_add failed.*undone/);
      expect(tunFds(qemuPid)).toBe(before);
    } finally {
      q.close();
    }
  });

  it('unplug without a guest to release the device times out cleanly and leaves the device; an unknown id is ENODEV', async () => {
    const q = await client();
    try {
      const before = tunFds(qemuPid);
      const e = await rejection(unplugNetdev(q, { id: 'nic1', unplugTimeoutMs: 1500 }));
      expect(e.code).toBe('ETIMEDOUT');
      expect(e.hint).toMatch(/did not release nic1/);
      expect(await q.execute('qom-get', { path: '/machine/peripheral/nic1', property: 'netdev' })).toBe('nic1-netdev');
      expect(tunFds(qemuPid)).toBe(before);
      expect((await rejection(unplugNetdev(q, { id: 'nic9' }))).code).toBe('ENODEV');
    } finally {
      q.close();
    }
  });

  it('CLI: mqtap hotplug creates a non-persistent tap that lives on in QEMU; mqtap unplug reports the guest timeout', async () => {
    const before = tunFds(qemuPid);
    const r = runCli(['hotplug', '--qmp', qmpPath, '--queues', '2', '--name', 'qcli0', '--vhost', 'off', '--id', 'nic4', '--bus', 'rp2', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ tap: 'qcli0', persist: false, id: 'nic4', netdevId: 'nic4-netdev', queues: 2, vhost: false });
    const t = getTap('qcli0');
    expect(t, 'the CLI exited; QEMU holds the only queues').toBeDefined();
    expect(t!.tun.persist).toBe(false);
    expect(t!.tun.numQueues + t!.tun.numDisabledQueues).toBe(2);
    expect(tunFds(qemuPid)).toBe(before + 2);

    const u = runCli(['unplug', '--qmp', qmpPath, '--id', 'nic4', '--unplug-timeout', '1000']);
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(/DEVICE_DELETED timed out/);
    expect(u.stderr).toMatch(/hint: the guest did not release nic4/);

    const bad = runCli(['hotplug', '--qmp', join(dir, 'none.sock'), '--queues', '1', '--name', 'qcli1', '--vhost', 'off', '--id', 'nic5']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/ENOENT/);
    expect(getTap('qcli1'), 'a failed hotplug leaves no tap').toBeUndefined();
  }, 60_000);

  it('QEMU going away closes its copies: every non-persistent tap it held disappears', async () => {
    for (const n of netdevs.splice(0)) n.close();
    expect(listTaps().length).toBeGreaterThan(0);
    await qemu!.stop();
    await waitFor('the taps to disappear', () => listTaps().length === 0);
    expect(listTaps()).toEqual([]);
  });
});
