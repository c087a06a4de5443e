/**
 * `mqtap launch` end to end with a real guest (vm/: Debian 6.1 kernel under
 * QEMU TCG), on this host, in a network namespace this file creates.  Two
 * boots:
 *
 *   CLI boot: `mqtap create lt0 --queues 4`, the tap gets 169.254.77.1/24
 *   and goes up, then `mqtap launch --name lt0 --existing require --queues 4
 *   --json -- qemu-system-x86_64 <guestQemuArgs>`.  The guest runs
 *   vm/guest-mq.sh: `ethtool -l`, `ethtool -L eth0 combined 1` then 4 (it
 *   stops at each checkpoint while this file looks at the tap's
 *   numqueues/numdisabled), pings the host (which pings it back at the "addr"
 *   checkpoint), sends TCP flows pinned to each vCPU and reports the
 *   per-queue counters of `ethtool -S`.
 *
 *   library boot: launchQemu with two netdevs x 2 queues (ids n0, n1): the
 *   guest sees eth0 and eth1 with 2 queue pairs each, and the MACs given.
 *
 * Each boot takes ~15-40 s (TCG, more on a loaded machine).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getTap, listTaps } from '../../lib/tap/links';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns';
import { openNetdev } from '../../lib/vhost/netdev';
import { launchQemu, pdeathsigWrapper } from '../../lib/qemu/qemu';
import { deleteTap } from '../../lib/tap/tap';
import { probeVhostNet } from '../../lib/vhost/vhost';
import { CLI, runCli } from '../helpers/cli';
import { fdCount, tapEnv } from '../helpers/env';
import {
  REPO_ROOT,
  bootMqGuest,
  ensureGuestImage,
  hostPing,
  qemuBinary,
  vmAvailable,
  type Checkpoint,
  type MqGuestReport,
  type PingResult,
} from './harness.js';

const vm = vmAvailable();
const tap = tapEnv();
const reason = !vm.ok ? vm.reason : !tap.ok ? tap.reason : '';
if (reason) console.warn(`test/vm/launch.test.ts skipped: ${reason}`);

const GUEST_TIMEOUT = 240_000;
const HOOK_TIMEOUT = 300_000;
const HOST_IP = '169.254.77.1';
const GUEST_IP = '169.254.77.2';

/** The CLI under test runs from dist/: it must be built from the current sources. */
function assertDistFresh(): void {
  for (const f of ['lib/qemu/qemu', 'lib/qemu/guest', 'bin/cmd-launch']) {
    const src = statSync(path.join(REPO_ROOT, `${f}.ts`)).mtimeMs;
    const out = path.join(REPO_ROOT, 'dist', `${f}.js`);
    if (!existsSync(out) || statSync(out).mtimeMs < src) throw new Error(`dist/${f}.js is older than ${f}.ts: run \`npx tsc -p tsconfig.json\` first`);
  }
}

type View = { numQueues: number; numDisabledQueues: number } | null;
const view = (name: string): View => {
  const t = getTap(name)?.tun;
  return t ? { numQueues: t.numQueues, numDisabledQueues: t.numDisabledQueues } : null;
};

describe.skipIf(!!reason)(`mqtap launch with a real guest${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let ns: IsolatedNetns | undefined;
  beforeAll(async () => {
    assertDistFresh();
    ns = isolateNetns();
    await ensureGuestImage();
  }, HOOK_TIMEOUT);
  afterAll(() => {
    for (const t of listTaps()) deleteTap(t.name);
    ns?.restore();
  });

  describe('CLI: 4 queue pairs, ethtool -L, pings, traffic per queue', () => {
    const TAP = 'lt0';
    const MAC = '52:54:00:6d:71:02';
    let run: {
      code: number | null;
      signal: NodeJS.Signals | null;
      timedOut: boolean;
      stderr: string;
      started: Record<string, unknown> & { pid: number; argv: string[] };
      exited: Record<string, unknown>;
      report: MqGuestReport;
      guestExit: string;
      checkpoints: Checkpoint[];
      views: Record<string, View>;
      pingGuest: PingResult | undefined;
      diag: string;
      ms: number;
    };

    beforeAll(async () => {
      const mk = runCli(['create', TAP, '--queues', '4']);
      expect(mk.code, mk.stderr).toBe(0);
      for (const args of [['addr', 'add', `${HOST_IP}/24`, 'dev', TAP], ['link', 'set', TAP, 'up']]) {
        const r = spawnSync('ip', args, { encoding: 'utf8' });
        expect(r.status, r.stderr).toBe(0);
      }
      const views: Record<string, View> = { beforeLaunch: view(TAP) };
      let pingGuest: PingResult | undefined;
      let stderr = '';
      const boot = await bootMqGuest({
        mq: { hostIp: HOST_IP, guestIp: GUEST_IP },
        resultsPrefix: 'mqtap-launch-test-',
        timeoutMs: GUEST_TIMEOUT,
        onCheckpoint: async (cp) => {
          views[cp.name] = view(TAP);
          if (cp.name === 'addr') pingGuest = await hostPing(GUEST_IP, { count: 3, deadlineSec: 30 });
        },
        start: (args) => {
          // setpriv --pdeathsig: mqtap (and through it QEMU) dies with this test process.
          const argv = [...pdeathsigWrapper('SIGKILL'), process.execPath, CLI, 'launch', '--name', TAP, '--existing', 'require', '--queues', '4', '--mac', MAC, '--json', '--', qemuBinary(), ...args];
          const c = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
          c.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
          return { child: c };
        },
      });
      const line = (ev: string): Record<string, unknown> => JSON.parse(stderr.split('\n').find((l) => l.includes(`"event":"${ev}"`)) ?? '{}') as Record<string, unknown>;
      run = {
        ...boot.exit,
        timedOut: boot.timedOut,
        stderr,
        started: line('started') as typeof run.started,
        exited: line('exited'),
        report: boot.report,
        guestExit: boot.guestExitCode === null ? '' : String(boot.guestExitCode),
        checkpoints: boot.checkpoints,
        views,
        pingGuest,
        diag: `mqtap stderr:\n${stderr}\nguest stdout:\n${boot.stdout}\nguest stderr:\n${boot.stderr}\nconsole:\n${boot.console.slice(-3000)}`,
        ms: boot.durationMs,
      };
      console.log(`CLI boot: ${run.ms} ms`);
    }, HOOK_TIMEOUT);

    it("launch exits with QEMU's status 0; --json names the tap, fds 3:4:5:6 and the final argv", () => {
      expect(run.timedOut, run.diag).toBe(false);
      expect(run.code, run.diag).toBe(0);
      const vhost = probeVhostNet().usable;
      expect(run.started).toMatchObject({ tap: TAP, id: 'net0', queues: 4, fds: [3, 4, 5, 6], vhostfds: vhost ? [7, 8, 9, 10] : [], vhost });
      const netdev = vhost ? 'tap,id=net0,fds=3:4:5:6,vhost=on,vhostfds=7:8:9:10' : 'tap,id=net0,fds=3:4:5:6,vhost=off';
      expect(run.started.argv.slice(-4)).toEqual(['-netdev', netdev, '-device', `virtio-net-pci,netdev=net0,mq=on,vectors=10,mac=${MAC},romfile=`]);
      expect(run.exited).toMatchObject({ pid: run.started.pid, tap: TAP, code: 0, status: 0, tapGone: false });
    });

    it('the guest sees one virtio-net NIC with 4 queue pairs (max), one in use per vCPU', () => {
      expect(run.report.nics, run.diag).toHaveLength(1);
      const cpus = run.report.cpus!;
      expect(cpus).toBeGreaterThanOrEqual(1);
      expect(run.report.nics[0]).toEqual({ name: 'eth0', mac: MAC, driver: 'virtio_net', maxCombined: 4, combined: Math.min(4, cpus) });
    });

    it('ethtool -L combined 1 then 4 work; QEMU detaches and re-attaches the tap queues to match (the host sees it at each step)', () => {
      expect(run.report.setChannels, run.diag).toEqual([
        { want: 1, rc: 0, combined: 1 },
        { want: 4, rc: 0, combined: 4 },
      ]);
      expect(run.checkpoints.map((c) => c.name)).toEqual(['boot', 'combined-1', 'combined-4', 'addr', 'traffic']);
      const inUse = run.report.nics[0]!.combined!;
      expect(run.views).toMatchObject({
        // the persistent tap before the launch: no queue attached
        beforeLaunch: { numQueues: 0, numDisabledQueues: 0 },
        // after the guest driver's VQ_PAIRS_SET at probe: the pairs it uses are attached, the rest detached
        boot: { numQueues: inUse, numDisabledQueues: 4 - inUse },
        'combined-1': { numQueues: 1, numDisabledQueues: 3 },
        'combined-4': { numQueues: 4, numDisabledQueues: 0 },
      });
      expect(run.report.syncTimeouts).toEqual([]);
    });

    it('the guest and the host tap ping each other (link-local, this namespace only)', () => {
      expect(run.report.addr, run.diag).toEqual({ cidr: `${GUEST_IP}/24`, rc: 0 });
      expect(run.report.pingHost!.received, run.diag).toBeGreaterThan(0);
      expect(run.pingGuest?.received, run.pingGuest?.output).toBeGreaterThan(0);
    });

    it('parallel flows from every vCPU spread over more than one queue pair, both ways (ethtool -S in the guest)', () => {
      expect(run.report.flows.length, run.diag).toBe(run.report.cpus);
      expect(run.report.queues.map((q) => q.queue)).toEqual([0, 1, 2, 3]);
      const rx = run.report.queues.filter((q) => q.rxPackets > 0).length;
      const tx = run.report.queues.filter((q) => q.txPackets > 0).length;
      expect(rx, JSON.stringify(run.report.queues)).toBeGreaterThan(1);
      expect(tx, JSON.stringify(run.report.queues)).toBeGreaterThan(1);
    });

    it('afterwards: the guest script passed every step, QEMU is gone, the persistent tap stays with no queue attached', () => {
      expect(run.report.failures, run.diag).toEqual([]);
      expect(run.report.done).toBe(true);
      expect(run.guestExit).toBe('0');
      expect(existsSync(`/proc/${run.started.pid}`)).toBe(false);
      expect(view(TAP)).toEqual({ numQueues: 0, numDisabledQueues: 0 });
      deleteTap(TAP);
      expect(getTap(TAP)).toBeUndefined();
    });
  });

  describe('bootMqGuest cleans up whatever happens', () => {
    const ours = (): string[] => readdirSync(tmpdir()).filter((f) => f.startsWith('mqtap-boot-test-'));

    it('start throws: the error comes through, no checkpoint watcher, no results dir left', async () => {
      await expect(
        bootMqGuest({
          resultsPrefix: 'mqtap-boot-test-',
          start: () => {
            throw new Error('no QEMU today');
          },
        }),
      ).rejects.toThrow('no QEMU today');
      expect(ours()).toEqual([]);
    }, HOOK_TIMEOUT);

    it('a process that outlives timeoutMs is SIGKILLed; the boot reports timedOut, no guest report, no results dir left', async () => {
      let child: ChildProcess | undefined;
      const boot = await bootMqGuest({
        resultsPrefix: 'mqtap-boot-test-',
        timeoutMs: 300,
        start: () => ({ child: (child = spawn('sleep', ['600'], { stdio: 'ignore' })) }),
      });
      expect(boot).toMatchObject({ exit: { code: null, signal: 'SIGKILL' }, timedOut: true, guestExitCode: null, checkpoints: [] });
      expect(boot.report.done).toBe(false);
      expect(child!.signalCode).toBe('SIGKILL');
      expect(ours()).toEqual([]);
    }, HOOK_TIMEOUT);
  });

  describe('library: two netdevs x 2 queue pairs in one launch', () => {
    it('the guest sees eth0 and eth1 with 2 queue pairs each; both taps are in use, then gone', async () => {
      const fdsBefore = fdCount();
      const a = openNetdev({ name: 'lma%d', pairs: 2, vhost: 'off' });
      let b;
      try {
        b = openNetdev({ name: 'lmb%d', pairs: 2, vhost: 'off' });
      } catch (err) {
        a.close();
        throw err;
      }
      const names = [a.name, b.name];
      try {
        const views: Record<string, View[]> = {};
        let plan: Array<[string, number[]]> = [];
        const boot = await bootMqGuest({
          mq: { mode: 'list' },
          resultsPrefix: 'mqtap-launch-test-',
          timeoutMs: GUEST_TIMEOUT,
          onCheckpoint: (cp) => {
            views[cp.name] = names.map(view);
          },
          start: (args) => {
            const l = launchQemu({
              netdevs: [
                { netdev: a, options: { id: 'n0', mac: '52:54:00:6d:72:0a', deviceProps: { romfile: '' } } },
                { netdev: b!, options: { id: 'n1', mac: '52:54:00:6d:72:0b', deviceProps: { romfile: '' } } },
              ],
              qemu: [qemuBinary(), ...args],
              stdio: 'pipe',
              killWithParent: true,
            });
            l.child.stdout!.resume();
            l.child.stderr!.resume();
            plan = l.plan.netdevs.map((n) => [n.id, n.fds]);
            return l;
          },
        });
        expect(plan).toEqual([
          ['n0', [3, 4]],
          ['n1', [5, 6]],
        ]);
        const report = boot.report;
        const diag = `guest stdout:\n${boot.stdout}\nconsole:\n${boot.console.slice(-3000)}`;
        expect(boot.exit.code, diag).toBe(0);
        expect(boot.guestExitCode, diag).toBe(0);
        const inUse = Math.min(2, report.cpus ?? 1);
        expect(report.nics, diag).toEqual([
          { name: 'eth0', mac: '52:54:00:6d:72:0a', driver: 'virtio_net', maxCombined: 2, combined: inUse },
          { name: 'eth1', mac: '52:54:00:6d:72:0b', driver: 'virtio_net', maxCombined: 2, combined: inUse },
        ]);
        expect(views.boot).toEqual([
          { numQueues: inUse, numDisabledQueues: 2 - inUse },
          { numQueues: inUse, numDisabledQueues: 2 - inUse },
        ]);
        expect(names.map(view)).toEqual([null, null]);
      } finally {
        a.close();
        b.close();
      }
      expect(listTaps()).toEqual([]);
      expect(fdCount()).toBe(fdsBefore);
    }, HOOK_TIMEOUT);
  });
});
