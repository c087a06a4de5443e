/**
 * End to end: hot-plugging a 4-queue tap into a running guest over QMP, and
 * out again, with the host's QEMU (TCG) running the harness guest.
 *
 * QEMU starts with a QMP socket, one pcie-root-port and no NIC; the guest
 * runs test/vm/scripts/hotplug-guest.sh, which reports through the results
 * share while the host drives QEMU.  Two cycles:
 *   1. `mqtap hotplug` (CLI, a non-persistent tap that lives on through
 *      QEMU's fds) ... `mqtap unplug`;
 *   2. the daemon: `create`, `hotplug` into the same QEMU, `unplug`, `delete`.
 * Each cycle checks: the guest sees a virtio-net eth0 with 4 combined
 * channels (current = its CPU count until `ethtool -L combined 4`), and the
 * host's tap shows the guest's choice (numqueues/numdisabled: QEMU attaches
 * and detaches our queues as the guest asks); ping works both ways over
 * link-local addresses (the tap sits in a network namespace this test
 * created); after unplug the NIC is gone in the guest, QEMU holds no tap fd
 * any more (/proc/QEMU_PID/fd entries pointing at /dev/net/tun back to 0),
 * and the non-persistent tap of cycle 1 is gone.
 *
 * QEMU's total fd count is not compared: its 9p server opens and closes fds
 * as the guest touches files of the shared host root, so only the fds of the
 * devices we hand over are counted.  No vhost here: the host has no
 * /dev/vhost-net (tap fds only).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns.js';
import { deleteTap } from '../../lib/tap/tap.js';
import { needCommand, tapEnv } from '../helpers/env.js';
import { guestQemuArgs, qemuBinary, vmAvailable } from './harness.js';
import { tunFds } from '../helpers/wait';
import { cliBuiltReason, runCliAsync, type CliRun } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { stopChild } from '../helpers/proc';
import { qmpArgs } from '../helpers/qemu';
import { pdeathsigWrapper } from '../../lib/qemu/qemu.js';

const GUEST_SCRIPT = join(__dirname, 'scripts', 'hotplug-guest.sh');
const HOST_IP = '169.254.77.1';
const GUEST_IP = '169.254.77.2';

function why(): string {
  const vm = vmAvailable();
  if (!vm.ok) return vm.reason;
  const t = tapEnv();
  if (!t.ok) return t.reason;
  if (cliBuiltReason()) return cliBuiltReason();
  // The guest runs the host's binaries; missing where the run requires them (MQTAP_REQUIRE), needCommand throws.
  for (const cmd of ['ethtool', 'busybox', 'ip']) if (!needCommand(cmd).ok) return `${cmd} is not installed on the host (the guest runs the host's binaries)`;
  return '';
}
const reason = why();
if (reason) console.warn(`test/vm/hotplug.test.ts skipped: ${reason}`);

function sh(cmd: string, args: string[], timeout = 60_000): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

/** The CLI (in this thread's network namespace), without blocking the event loop: the guest needs this process meanwhile. */
const mqtap = (args: string[]): Promise<CliRun> => runCliAsync(args, { timeoutMs: 180_000 });

describe.skipIf(!!reason)(`hot-plugging a multi-queue tap into a running guest${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let work: string | undefined;
  let qemu: ChildProcess | undefined;
  let daemon: DaemonProcess | undefined;
  let ns: IsolatedNetns | undefined;

  afterAll(async () => {
    await daemon?.dispose();
    await stopChild(qemu, 'SIGKILL', 15_000);
    if (ns) {
      for (const t of listTaps()) deleteTap(t.name);
      ns.restore();
    }
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  it('cycle 1 with the CLI, cycle 2 through the daemon: NIC appears with 4 queues, carries traffic, goes away, fds come back', async () => {
    ns = isolateNetns();
    work = mkdtempSync(join(tmpdir(), 'mqtap-hp-'));
    const results = join(work, 'results');
    mkdirSync(results);
    const qmp = join(work, 'qmp.sock');
    const consoleFile = join(work, 'console.log');
    const statusFile = join(results, 'status');

    const argv = await guestQemuArgs({ cmd: ['/bin/sh', GUEST_SCRIPT], resultsDir: results, consoleFile, env: { HOTPLUG_CYCLES: '2', HOTPLUG_GUEST_IP: GUEST_IP, HOTPLUG_HOST_IP: HOST_IP } });
    argv.push(...qmpArgs(qmp), '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1');
    const wrap = [...pdeathsigWrapper('SIGKILL'), qemuBinary()];
    const qlog = openSync(join(work, 'qemu.stderr'), 'w');
    qemu = spawn(wrap[0]!, [...wrap.slice(1), ...argv], { stdio: ['ignore', 'ignore', qlog] });
    closeSync(qlog);
    const q = qemu;
    const qemuPid = q.pid!;

    const context = (): string =>
      `\n--- guest status ---\n${existsSync(statusFile) ? readFileSync(statusFile, 'utf8') : '(none)'}` +
      `\n--- console (tail) ---\n${existsSync(consoleFile) ? readFileSync(consoleFile, 'utf8').replace(/\r/g, '').split('\n').slice(-25).join('\n') : ''}` +
      `\n--- qemu stderr ---\n${readFileSync(join(work!, 'qemu.stderr'), 'utf8')}`;
    const waitFor = async (what: string, cond: () => boolean, timeoutMs: number): Promise<void> => {
      const deadline = Date.now() + timeoutMs;
      while (!cond()) {
        if (q.exitCode !== null || q.signalCode !== null) throw new Error(`QEMU exited while waiting for ${what}${context()}`);
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${context()}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const status = (): string => (existsSync(statusFile) ? readFileSync(statusFile, 'utf8') : '');
    const waitStatus = async (re: RegExp, timeoutMs = 240_000): Promise<RegExpMatchArray> => {
      await waitFor(`guest status ${re}`, () => re.test(status()), timeoutMs);
      return status().match(re)!;
    };
    const hostPing = (): { status: number | null; stdout: string; stderr: string } => sh('busybox', ['ping', '-c', '3', '-W', '3', '-w', '60', GUEST_IP], 90_000);
    const configureHostSide = (tap: string): void => {
      const a = sh('ip', ['addr', 'add', `${HOST_IP}/16`, 'dev', tap]);
      expect(a.status, a.stderr).toBe(0);
      const u = sh('ip', ['link', 'set', tap, 'up']);
      expect(u.status, u.stderr).toBe(0);
    };

    await waitStatus(/^ready$/m);
    expect(tunFds(qemuPid)).toBe(0);

    // ---- cycle 1: the CLI
    const hp = await mqtap(['hotplug', '--qmp', qmp, '--queues', '4', '--name', 'mqhp0', '--vhost', 'off', '--id', 'nic1', '--bus', 'rp0', '--mac', '52:54:00:00:77:02', '--json']);
    expect(hp.code, hp.stderr).toBe(0);
    expect(JSON.parse(hp.stdout)).toMatchObject({ tap: 'mqhp0', persist: false, id: 'nic1', queues: 4, vhost: false });
    expect(getTap('mqhp0'), 'QEMU holds the only queues of the non-persistent tap').toBeDefined();
    expect(tunFds(qemuPid)).toBe(4);
    configureHostSide('mqhp0');

    let m = await waitStatus(/^cycle 1: eth0 present driver=(\S+) mac=(\S+)$/m);
    expect(m[1]).toBe('virtio_net');
    expect(m[2]).toBe('52:54:00:00:77:02');
    m = await waitStatus(/^cycle 1: channels max=(\d+) current=(\d+)$/m);
    expect(Number(m[1])).toBe(4);
    const current = Number(m[2]);
    expect(current).toBeGreaterThanOrEqual(1);
    expect(current).toBeLessThanOrEqual(4);
    // QEMU attached exactly the pairs the guest enabled.
    await waitFor(`mqhp0 to show ${current} enabled queues`, () => getTap('mqhp0')?.tun.numQueues === current, 30_000);
    expect(getTap('mqhp0')!.tun.numDisabledQueues).toBe(4 - current);
    writeFileSync(join(results, 'go-1'), '');
    m = await waitStatus(/^cycle 1: channels-after max=(\d+) current=(\d+)$/m);
    expect([m[1], m[2]]).toEqual(['4', '4']);
    await waitFor('all 4 queues of mqhp0 attached', () => getTap('mqhp0')?.tun.numQueues === 4, 30_000);
    expect(getTap('mqhp0')!.tun.numDisabledQueues).toBe(0);
    await waitStatus(/^cycle 1: ping (ok|failed)$/m);
    expect(status(), context()).toMatch(/^cycle 1: ping ok$/m);
    const p1 = hostPing();
    expect(p1.status, `${p1.stdout}${p1.stderr}`).toBe(0);
    expect(p1.stdout).toMatch(/3 packets received/);
    const stats = getTap('mqhp0')!.stats!;
    expect(stats.rxPackets).toBeGreaterThanOrEqual(6);
    expect(stats.txPackets).toBeGreaterThanOrEqual(6);

    const un = await mqtap(['unplug', '--qmp', qmp, '--id', 'nic1', '--unplug-timeout', '180000', '--json']);
    expect(un.code, `${un.stderr}${context()}`).toBe(0);
    expect(JSON.parse(un.stdout)).toEqual({ unplugged: 'nic1', netdevId: 'nic1-netdev' });
    await waitStatus(/^cycle 1: eth0 gone$/m);
    await waitFor('QEMU to close the tap fds', () => tunFds(qemuPid) === 0, 30_000);
    await waitFor('the non-persistent tap to disappear', () => getTap('mqhp0') === undefined, 30_000);

    // ---- cycle 2: the daemon
    daemon = await DaemonProcess.start({ dir: work, args: ['--unplug-timeout', '180000'], timeoutMs: 30_000 });
    const c = await DaemonClient.connect(daemon.socket, { timeoutMs: 60_000 });
    try {
      await c.create({ name: 'mqhp1', pairs: 4, vhost: 'off', active: 1 });
      const plugged = await c.hotplug('mqhp1', { qmp, id: 'nic2', bus: 'rp0', mac: '52:54:00:00:77:03' });
      expect(plugged.lease).toMatchObject({ kind: 'qmp', id: 'nic2' });
      expect(tunFds(qemuPid)).toBe(4);
      configureHostSide('mqhp1');
      m = await waitStatus(/^cycle 2: eth0 present driver=(\S+) mac=(\S+)$/m);
      expect([m[1], m[2]]).toEqual(['virtio_net', '52:54:00:00:77:03']);
      m = await waitStatus(/^cycle 2: channels max=(\d+) current=(\d+)$/m);
      expect(Number(m[1])).toBe(4);
      const cur2 = Number(m[2]);
      await waitFor(`mqhp1 to show ${cur2} enabled queues`, () => getTap('mqhp1')?.tun.numQueues === cur2, 30_000);
      const shown = await c.show('mqhp1');
      expect([shown.numQueues, shown.numDisabledQueues]).toEqual([cur2, 4 - cur2]);
      writeFileSync(join(results, 'go-2'), '');
      m = await waitStatus(/^cycle 2: channels-after max=(\d+) current=(\d+)$/m);
      expect([m[1], m[2]]).toEqual(['4', '4']);
      await waitStatus(/^cycle 2: ping (ok|failed)$/m);
      expect(status(), context()).toMatch(/^cycle 2: ping ok$/m);
      const p2 = hostPing();
      expect(p2.status, `${p2.stdout}${p2.stderr}`).toBe(0);

      const back = await c.unplug('mqhp1', { timeoutMs: 180_000 });
      expect(back).toMatchObject({ lease: null, holding: true, active: 4 });
      await waitStatus(/^cycle 2: eth0 gone$/m);
      await waitFor('QEMU to close the tap fds', () => tunFds(qemuPid) === 0, 30_000);
      // The daemon holds the queues again, in the state it says.
      const after = await c.show('mqhp1');
      expect(after.kernelPairStates).toEqual(after.pairStates);
      expect(after.numQueues).toBe(4);
      await c.delete('mqhp1');
      expect(getTap('mqhp1')).toBeUndefined();
    } finally {
      c.close();
    }

    // ---- the guest finishes and powers off
    await waitStatus(/^all cycles done$/m);
    expect(tunFds(qemuPid)).toBe(0);
    writeFileSync(join(results, 'finish'), '');
    await waitStatus(/^done$/m);
    await waitFor('QEMU to exit', () => q.exitCode !== null || q.signalCode !== null, 120_000);
    expect(readFileSync(join(results, 'exitcode'), 'utf8').trim(), context()).toBe('0');
    expect(listTaps()).toEqual([]);
    console.info(`guest status lines:\n${status()}`);
  }, 900_000);
});
