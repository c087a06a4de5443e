/**
 * mqtap as the vhost-user backend of a real QEMU 7.2 booting the test guest
 * (vm/) under TCG on this host: no KVM, no nested guest.  Guest RAM is a
 * shared memfd the backend maps; the NIC is `virtio-net-pci,mq=on,vectors=0`
 * because QEMU 7.2 segfaults in kvm_virtio_pci_irqfd_use when a vhost-user
 * device with MSI-X vectors starts without KVM (with vectors=0 the guest
 * uses INTx and everything works).  All in a network namespace this file
 * creates, link-local addresses only.  Two boots (~25-60 s each under TCG):
 *
 *   CLI boot: `mqtap create vut0 --queues 4` (169.254.83.1/24, up), then
 *   `mqtap vhost-user --socket S --name vut0 --existing require --queues 4
 *   --json` as a user runs it, and QEMU with a hand-written command line
 *   (memfd + -numa, -chardev socket,...,reconnect=1, -netdev
 *   vhost-user,queues=4, virtio-net-pci vectors=0).  The guest runs
 *   vm/guest-mq.sh and stops at checkpoints: at "boot", "combined-1",
 *   "combined-4" this file reads the tap (rtnetlink); at "addr" it pings
 *   the guest, SIGKILLs the backend, starts it again and waits until QEMU
 *   reconnected (reconnect=1) and all 4 pairs run again, then pings again;
 *   the guest then pings the host and sends flows from each CPU; at
 *   "traffic" this file reads the per-queue counters and SIGKILLs QEMU.
 *   The backend must then hold no guest mapping and no more fds than before
 *   it served, and serve the next QEMU (a paused one, -S: it connects and
 *   negotiates without booting).
 *
 *   launch boot: `mqtap launch --backend vhost-user --queues 4 --json --
 *   qemu-system-x86_64 ...`: the backend in mqtap's process, the QEMU
 *   arguments added by mqtap; ethtool -L 1 / 4 seen on the tap, pings both
 *   ways; afterwards the socket's temp dir is gone and the tap has no queue.
 *
 * The KVM variant at the end (scripts/vhost-user-guest.js, vectors=2N+2 and
 * irqfds) runs only with /dev/kvm, or nested with MQTAP_E2E_NESTED=1.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openQueueStats, type QueueCounters } from '../../lib/datapath/qstats';
import { kvmUsable, pdeathsigWrapper } from '../../lib/qemu/qemu';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns';
import { getTap, listTaps } from '../../lib/tap/links';
import { deleteTap } from '../../lib/tap/tap';
import { CLI, runCli } from '../helpers/cli';
import { tapEnv } from '../helpers/env';
import { REPO_ROOT, bootMqGuest, ensureGuestImage, hostPing, qemuBinary, runNestedKvmGuest, vmAvailable, type MqGuestBoot, type PingResult } from './harness.js';

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

const vm = vmAvailable();
const tap = tapEnv();
const reason = !vm.ok ? vm.reason : !tap.ok ? tap.reason : '';
if (reason) console.warn(`test/vm/vhost-user.test.ts skipped: ${reason}`);

const GUEST_TIMEOUT = 300_000;
const HOOK_TIMEOUT = 420_000;

type View = string | null;
const view = (name: string): View => {
  const t = getTap(name)?.tun;
  return t ? `${t.numQueues}/${t.numDisabledQueues}` : null;
};
const fdsOf = (pid: number): number => readdirSync(`/proc/${pid}/fd`).length;
/** Mappings of a memfd (QEMU's guest RAM) in a process. */
const memfdMaps = (pid: number): number => readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter((l) => l.includes('/memfd:')).length;

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
}

/** A process of the CLI whose --json events (stderr lines with "event") are collected and can be waited for. */
class CliProc {
  readonly child: ChildProcess;
  readonly events: Json[] = [];
  stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  #waiters: Array<() => void> = [];

  constructor(args: string[]) {
    // setpriv --pdeathsig: it dies with this test process, whatever happens.
    const argv = [...pdeathsigWrapper('SIGKILL'), process.execPath, CLI, ...args];
    this.child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
    let buf = '';
    this.child.stderr!.on('data', (d: Buffer) => {
      this.stderr += d.toString();
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const j = JSON.parse(line) as Json;
          if (j && typeof j.event === 'string') this.events.push(j);
        } catch {
          /* a log line */
        }
      }
      for (const w of this.#waiters.splice(0)) w();
    });
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })));
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Resolves with the first event (from index `from`) matching `pred`; rejects after `ms` or when the process exits. */
  async waitFor(pred: (e: Json) => boolean, ms: number, from = 0): Promise<Json> {
    const deadline = Date.now() + ms;
    for (;;) {
      const hit = this.events.slice(from).find(pred);
      if (hit) return hit;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`the CLI exited before the event came:\n${this.stderr}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for an event; got ${JSON.stringify(this.events)}\n${this.stderr.slice(-2000)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 500));
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  async kill(sig: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(sig);
    return this.exited;
  }
}

/** The QEMU arguments for a vhost-user NIC on `socket`, written by hand the way docs/vhost-user.md shows them (TCG: vectors=0). */
function vhostUserQemuArgs(socket: string, memMiB: number, queues: number, mac: string): string[] {
  return [
    '-object', `memory-backend-memfd,id=mem,size=${memMiB}M,share=on`,
    '-numa', 'node,memdev=mem',
    '-chardev', `socket,id=vu0,path=${socket},reconnect=1`,
    '-netdev', `vhost-user,id=n0,chardev=vu0,queues=${queues}`,
    '-device', `virtio-net-pci,netdev=n0,mq=on,vectors=0,mac=${mac},romfile=`,
  ];
}

/** The -m value of the guest's QEMU arguments, in MiB (the memfd must be exactly that big). */
function memMiBOf(args: string[]): number {
  const i = args.lastIndexOf('-m');
  const v = i >= 0 ? args[i + 1]! : '';
  if (!/^\d+$/.test(v)) throw new Error(`unexpected -m ${v} in the guest's QEMU arguments`);
  return Number(v);
}

describe.skipIf(!!reason)(`vhost-user with a real QEMU guest under TCG${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let ns: IsolatedNetns | undefined;
  let dir: string | undefined;
  beforeAll(async () => {
    ns = isolateNetns();
    dir = mkdtempSync(path.join(tmpdir(), 'mqtap-vu-test-'));
    await ensureGuestImage();
  }, HOOK_TIMEOUT);
  afterAll(() => {
    for (const t of listTaps()) deleteTap(t.name);
    ns?.restore();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  describe('`mqtap vhost-user` + a hand-written QEMU line: 4 pairs, ethtool -L, pings, every queue, backend SIGKILL + restart, QEMU SIGKILL', () => {
    const TAP = 'vut0';
    const HOST_IP = '169.254.83.1';
    const GUEST_IP = '169.254.83.2';
    const MAC = '52:54:00:6d:75:01';
    const s: {
      boot?: MqGuestBoot;
      views: Record<string, View>;
      pings: Record<string, PingResult>;
      mapsWhileServing: number[];
      be1?: CliProc;
      be2?: CliProc;
      be1Exit?: { code: number | null; signal: NodeJS.Signals | null };
      /** ms from the backend's death until its tap queues were released (io_uring exit work). */
      releaseMs?: number;
      be2Baseline?: number;
      reconnected?: Json;
      qstats?: QueueCounters;
      qstatsError?: string;
      afterQemuKill?: { fds: number; maps: number; disconnected: Json };
      next?: { connected: Json; fdsAfter: number; mapsAfter: number };
      stopped?: { exit: { code: number | null; signal: NodeJS.Signals | null }; socketLeft: boolean };
      diag: string;
    } = { views: {}, pings: {}, mapsWhileServing: [], diag: '' };

    beforeAll(async () => {
      const socket = path.join(dir!, 'vu.sock');
      const mk = runCli(['create', TAP, '--queues', '4']);
      expect(mk.code, mk.stderr).toBe(0);
      sh('sysctl', ['-qw', `net.ipv6.conf.${TAP}.disable_ipv6=1`]);
      sh('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', TAP]);
      sh('ip', ['link', 'set', 'dev', TAP, 'up']);
      const backendArgs = ['vhost-user', '--socket', socket, '--name', TAP, '--existing', 'require', '--queues', '4', '--json'];
      s.be1 = new CliProc(backendArgs);
      await s.be1.waitFor((e) => e.event === 'ready', 30_000);
      let qemu: ChildProcess | undefined;
      let stats: ReturnType<typeof openQueueStats> | undefined;
      try {
        s.boot = await bootMqGuest({
          mq: { hostIp: HOST_IP, guestIp: GUEST_IP },
          resultsPrefix: 'mqtap-vu-test-',
          timeoutMs: GUEST_TIMEOUT,
          onCheckpoint: async (cp) => {
            s.views[cp.name] = view(TAP);
            if (cp.name === 'boot') {
              try {
                stats = openQueueStats(TAP);
              } catch (err) {
                s.qstatsError = (err as Error).message;
              }
            }
            if (cp.name === 'addr') {
              s.pings.before = await hostPing(GUEST_IP, { count: 3, deadlineSec: 30 });
              s.mapsWhileServing.push(memfdMaps(s.be1!.pid));
              s.be1Exit = await s.be1!.kill('SIGKILL');
              // The dead backend's io_uring rings hold the tap queues as registered files; the
              // kernel drops them in the rings' exit work, asynchronously, soon after the exit.
              const killedAt = Date.now();
              for (let v = view(TAP); ; v = view(TAP)) {
                s.views.backendKilled = v;
                if (v === '0/0' || Date.now() - killedAt > 5000) break;
                await new Promise((r) => setTimeout(r, 10));
              }
              s.releaseMs = Date.now() - killedAt;
              s.be2 = new CliProc(backendArgs);
              await s.be2.waitFor((e) => e.event === 'ready', 30_000);
              // Its fds before it serves anyone (QEMU retries once a second; the ready line comes right after listen()).
              s.be2Baseline = fdsOf(s.be2.pid);
              s.reconnected = await s.be2.waitFor((e) => e.event === 'pairs' && e.live.length === 4, 90_000);
              s.views.restarted = view(TAP);
              s.pings.afterRestart = await hostPing(GUEST_IP, { count: 3, deadlineSec: 30 });
            }
            if (cp.name === 'traffic') {
              s.mapsWhileServing.push(memfdMaps(s.be2!.pid));
              s.qstats = stats?.snapshot();
              qemu?.kill('SIGKILL');
            }
          },
          start: (args) => {
            const argv = [...pdeathsigWrapper('SIGKILL'), qemuBinary(), ...args, ...vhostUserQemuArgs(socket, memMiBOf(args), 4, MAC)];
            qemu = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
            qemu.stderr!.on('data', (d: Buffer) => (s.diag += d.toString()));
            return { child: qemu };
          },
        });
        stats?.close();
        const be2 = s.be2!;
        const disconnected = await be2.waitFor((e) => e.event === 'disconnected', 30_000);
        s.afterQemuKill = { fds: fdsOf(be2.pid), maps: memfdMaps(be2.pid), disconnected };
        // The next QEMU: paused (-S), it connects and negotiates at start-up without booting anything.
        const from = be2.events.length;
        const q2 = spawn(qemuBinary(), ['-nodefaults', '-no-user-config', '-display', 'none', '-S', '-machine', 'q35', '-accel', 'tcg', '-m', '128', ...vhostUserQemuArgs(socket, 128, 4, MAC)], { stdio: 'ignore' });
        try {
          const connected = await be2.waitFor((e) => e.event === 'connected' && e.peer?.pid === q2.pid, 60_000, from);
          q2.kill('SIGKILL');
          await be2.waitFor((e) => e.event === 'disconnected', 30_000, from);
          s.next = { connected, fdsAfter: fdsOf(be2.pid), mapsAfter: memfdMaps(be2.pid) };
        } finally {
          q2.kill('SIGKILL');
        }
        const exit = await be2.kill('SIGTERM');
        s.stopped = { exit, socketLeft: existsSync(socket) };
      } finally {
        stats?.close();
        await s.be1?.kill('SIGKILL');
        await s.be2?.kill('SIGKILL');
        const b = s.boot;
        s.diag = `qemu stderr:\n${s.diag}\nbackend 1:\n${s.be1?.stderr.slice(-2000)}\nbackend 2:\n${s.be2?.stderr.slice(-3000)}\n` + (b ? `guest stdout:\n${b.stdout}\nguest stderr:\n${b.stderr}\nconsole:\n${b.console.slice(-3000)}` : '');
      }
      console.log(`vhost-user CLI boot: ${s.boot?.durationMs} ms`);
    }, HOOK_TIMEOUT);

    it('the guest sees one virtio-net NIC with 4 queue pairs; ethtool -L 1 then 4 show up on the tap (rtnetlink: 1/3, then 4/0)', () => {
      const r = s.boot!.report;
      expect(r.nics, s.diag).toEqual([{ name: 'eth0', mac: MAC, driver: 'virtio_net', maxCombined: 4, combined: Math.min(4, r.cpus ?? 1) }]);
      expect(r.setChannels, s.diag).toEqual([
        { want: 1, rc: 0, combined: 1 },
        { want: 4, rc: 0, combined: 4 },
      ]);
      expect(s.views['combined-1'], s.diag).toBe('1/3');
      expect(s.views['combined-4'], s.diag).toBe('4/0');
      expect(r.syncTimeouts).toEqual([]);
    });

    it('pings both ways (link-local): host -> guest before and after the backend restart, guest -> host after it', () => {
      expect(s.pings.before?.received, s.pings.before?.output).toBeGreaterThan(0);
      expect(s.pings.afterRestart?.received, s.pings.afterRestart?.output).toBeGreaterThan(0);
      expect(s.boot!.report.pingHost?.received, s.diag).toBeGreaterThan(0);
    });

    it('backend SIGKILLed: the persistent tap stays (no queue attached); restarted, QEMU reconnects (reconnect=1) and all 4 pairs run again', () => {
      expect(s.be1Exit).toEqual({ code: null, signal: 'SIGKILL' });
      expect(s.views.backendKilled, `tap queues still attached ${s.releaseMs} ms after the backend died`).toBe('0/0');
      expect(s.releaseMs).toBeLessThan(5000);
      expect(s.reconnected, s.diag).toMatchObject({ live: [0, 1, 2, 3], enabled: [0, 1, 2, 3] });
      expect(s.be2!.events.filter((e) => e.event === 'connected').length).toBeGreaterThanOrEqual(1);
      expect(s.views.restarted).toBe('4/0');
    });

    it('every queue pair carried traffic: the guest counts rx and tx on each of its 4 queues; the tap (kernel counters) on each of its 4', () => {
      const q = s.boot!.report.queues;
      expect(q.map((x) => x.queue), s.diag).toEqual([0, 1, 2, 3]);
      for (const x of q) {
        expect(x.rxPackets, `guest queue ${x.queue}: ${JSON.stringify(q)}`).toBeGreaterThan(0);
        expect(x.txPackets, `guest queue ${x.queue}: ${JSON.stringify(q)}`).toBeGreaterThan(0);
      }
      // Host side, from the kernel: frames each tap queue wrote into the stack (tcx) and got from it (mq qdisc).
      if (!s.qstats) {
        console.warn(`no host-side per-queue counters: ${s.qstatsError}`);
        return;
      }
      for (const dir of ['tx', 'rx'] as const) {
        const src = s.qstats[dir];
        if (src.source === null) {
          console.warn(`no host-side ${dir} counters: ${src.reason}`);
          continue;
        }
        const perSlot = [0, 1, 2, 3].map((i) => src.queues.find((c) => c.queue === i)?.frames ?? 0);
        expect(perSlot.every((f) => f > 0), `${dir}: ${JSON.stringify(src.queues)}`).toBe(true);
      }
    });

    it('QEMU SIGKILLed: the backend drops the connection, unmaps guest RAM, is back to its idle fds, and serves the next QEMU', () => {
      expect(s.mapsWhileServing.every((n) => n > 0), `${s.mapsWhileServing}`).toBe(true);
      expect(s.afterQemuKill?.maps, s.diag).toBe(0);
      expect(s.afterQemuKill?.fds, s.diag).toBe(s.be2Baseline);
      expect(s.next?.connected.peer.pid).toBeGreaterThan(0);
      expect(s.next?.mapsAfter).toBe(0);
      expect(s.next?.fdsAfter).toBe(s.be2Baseline);
    });

    it('SIGTERM stops the backend cleanly: exit 0, socket file gone; the guest reached every step before QEMU was killed', () => {
      expect(s.stopped, s.diag).toEqual({ exit: { code: 0, signal: null }, socketLeft: false });
      expect(s.boot!.report.failures, s.diag).toEqual([]);
      expect(s.boot!.exit.signal).toBe('SIGKILL');
      expect(s.boot!.timedOut).toBe(false);
      expect(s.views.traffic).toBe('4/0');
    });
  });

  describe('`mqtap launch --backend vhost-user`: the backend in mqtap, QEMU arguments added by it', () => {
    const TAP = 'vul0';
    const HOST_IP = '169.254.84.1';
    const GUEST_IP = '169.254.84.2';
    const MAC = '52:54:00:6d:75:02';
    let boot: MqGuestBoot;
    let cli: CliProc | undefined;
    const views: Record<string, View> = {};
    let pingGuest: PingResult | undefined;
    let diag = '';

    beforeAll(async () => {
      const mk = runCli(['create', TAP, '--queues', '4']);
      expect(mk.code, mk.stderr).toBe(0);
      sh('sysctl', ['-qw', `net.ipv6.conf.${TAP}.disable_ipv6=1`]);
      sh('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', TAP]);
      sh('ip', ['link', 'set', 'dev', TAP, 'up']);
      try {
        boot = await bootMqGuest({
          mq: { hostIp: HOST_IP, guestIp: GUEST_IP },
          resultsPrefix: 'mqtap-vu-test-',
          timeoutMs: GUEST_TIMEOUT,
          onCheckpoint: async (cp) => {
            views[cp.name] = view(TAP);
            if (cp.name === 'addr') pingGuest = await hostPing(GUEST_IP, { count: 3, deadlineSec: 30 });
          },
          start: (args) => {
            cli = new CliProc(['launch', '--backend', 'vhost-user', '--name', TAP, '--existing', 'require', '--queues', '4', '--mac', MAC, '--json', '--', qemuBinary(), ...args]);
            return { child: cli.child };
          },
        });
      } finally {
        await cli?.kill('SIGKILL');
        diag = `mqtap stderr:\n${cli?.stderr.slice(-4000)}\n` + (boot ? `guest stdout:\n${boot.stdout}\nconsole:\n${boot.console.slice(-3000)}` : '');
      }
      console.log(`vhost-user launch boot: ${boot.durationMs} ms`);
    }, HOOK_TIMEOUT);

    it('started: the socket in a private temp dir, the accelerator, guest RAM = -m as a shared memfd, vectors=0 under TCG, 2N+2 with KVM', () => {
      const started = cli!.events.find((e) => e.event === 'started');
      expect(started, diag).toMatchObject({ backend: 'vhost-user', tap: TAP, id: 'net0', queues: 4 });
      expect(path.dirname(path.dirname(started.socket))).toBe(tmpdir());
      expect(path.basename(path.dirname(started.socket))).toMatch(/^mqtap-launch-/);
      const argv: string[] = started.argv;
      const m = argv[argv.lastIndexOf('-m') + 1];
      expect(started.memBytes).toBe(Number(m) * 2 ** 20);
      const kvm = started.accel === 'kvm';
      expect(started.accel).toBe(kvmUsable() && argv.some((a) => /^kvm/.test(a)) ? 'kvm' : 'tcg');
      const size = Number(m) % 1024 === 0 ? `${Number(m) / 1024}G` : `${m}M`;
      expect(argv.slice(-10)).toEqual([
        '-object', `memory-backend-memfd,id=mqtap-mem,size=${size},share=on`, '-numa', 'node,memdev=mqtap-mem',
        '-chardev', `socket,id=net0-vu,path=${started.socket},reconnect=1`, '-netdev', 'vhost-user,id=net0,chardev=net0-vu,queues=4',
        '-device', `virtio-net-pci,netdev=net0,mq=on,vectors=${kvm ? 10 : 0},mac=${MAC},romfile=`,
      ]);
    });

    it('the guest uses 4 pairs; ethtool -L 1 then 4 reach the tap (1/3, 4/0); pings both ways; flows on every queue', () => {
      const r = boot.report;
      expect(r.failures, diag).toEqual([]);
      expect(r.done, diag).toBe(true);
      expect(r.nics, diag).toEqual([{ name: 'eth0', mac: MAC, driver: 'virtio_net', maxCombined: 4, combined: Math.min(4, r.cpus ?? 1) }]);
      expect(views['combined-1'], diag).toBe('1/3');
      expect(views['combined-4'], diag).toBe('4/0');
      expect(pingGuest?.received, pingGuest?.output).toBeGreaterThan(0);
      expect(r.pingHost?.received, diag).toBeGreaterThan(0);
      for (const q of r.queues) expect(q.rxPackets + q.txPackets, JSON.stringify(r.queues)).toBeGreaterThan(0);
      const pairs = cli!.events.filter((e) => e.event === 'pairs');
      expect(pairs.some((p) => p.live.length === 4), diag).toBe(true);
    });

    it("QEMU powered off: launch exits with its status 0, the backend is stopped, the socket's dir is gone, the tap stays with no queue", () => {
      const started = cli!.events.find((e) => e.event === 'started');
      const exited = cli!.events.find((e) => e.event === 'exited');
      expect(boot.exit, diag).toEqual({ code: 0, signal: null });
      expect(exited, diag).toMatchObject({ code: 0, status: 0, tapGone: false, connections: 1 });
      expect(existsSync(path.dirname(started.socket))).toBe(false);
      expect(existsSync(`/proc/${started.pid}`)).toBe(false);
      expect(view(TAP)).toBe('0/0');
    });
  });
});

// ---------------------------------------------------------------------------
// KVM variant (scripts/vhost-user-guest.js): on a host with /dev/kvm, or nested with MQTAP_E2E_NESTED=1.

const SCRIPT = path.join(REPO_ROOT, 'test', 'vm', 'scripts', 'vhost-user-guest.js');
const hostKvm = existsSync('/dev/kvm');
const nested = process.env.MQTAP_E2E_NESTED === '1';
const kvmVm = hostKvm || nested ? vm : { ok: false as const, reason: 'the KVM variant needs /dev/kvm, or MQTAP_E2E_NESTED=1 to run it nested (~3 minutes); the TCG tests above cover the rest' };
const kvmReason = !kvmVm.ok ? kvmVm.reason : !tap.ok ? tap.reason : '';
if (kvmReason) console.warn(`test/vm/vhost-user.test.ts (KVM variant) skipped: ${kvmReason}`);
const TIMEOUT = 900_000;


function runOnHost(): Promise<{ stdout: string; stderr: string; code: number | null }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [SCRIPT], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => c.kill('SIGKILL'), TIMEOUT - 60_000);
    c.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ stdout, stderr, code });
    });
  });
}

describe.skipIf(!!kvmReason)(`KVM variant: vectors=2N+2 with irqfds${kvmReason ? ` (skipped: ${kvmReason})` : hostKvm ? '' : ' (nested)'}`, () => {
  let r: Json;
  let diag: string;

  beforeAll(async () => {
    let stdout: string;
    if (hostKvm) {
      const h = await runOnHost();
      stdout = h.stdout;
      diag = `exit ${h.code}\nstderr:\n${h.stderr.slice(-3000)}`;
    } else {
      const image = await ensureGuestImage();
      const run = await runNestedKvmGuest({
        cmd: ['node', 'test/vm/scripts/vhost-user-guest.js'],
        env: { MQTAP_VM_CACHE: image.cacheDir },
        modules: ['kvm_amd'],
        memMiB: 2048,
        timeoutMs: TIMEOUT - 60_000,
      });
      stdout = run.stdout;
      diag = `outer exit ${run.exitCode} after ${run.durationMs} ms\nstderr:\n${run.stderr.slice(-3000)}\nconsole:\n${run.console.slice(-3000)}`;
    }
    const last = stdout.trim().split('\n').pop() ?? '';
    try {
      r = JSON.parse(last);
    } catch {
      throw new Error(`no JSON from vhost-user-guest.js: ${stdout.slice(-3000)}\n${diag}`);
    }
    diag = `${diag}\ninner stdout:\n${r.innerStdout}\ninner stderr:\n${r.innerStderr}\nqemu:\n${r.qemuStderr}\nconsole:\n${r.innerConsole}\npairs: ${JSON.stringify(r.pairs)}\nkernel: ${JSON.stringify(r.kernel)}\ndisconnected: ${JSON.stringify(r.disconnected)}`;
    if (r.fatal) throw new Error(`vhost-user-guest.js failed: ${r.fatal}\n${diag}`);
  }, TIMEOUT);

  it('the guest sees a 2-pair virtio-net NIC and runs to the end (ethtool -L 1 and 2, ping, flows)', () => {
    expect(r.exitCode, diag).toBe(0);
    expect(r.report.done, diag).toBe(true);
    expect(r.report.failures, diag).toEqual([]);
    expect(r.report.nics[0], diag).toMatchObject({ driver: 'virtio_net', maxCombined: 2 });
    expect(r.report.setChannels.map((s: Json) => [s.want, s.rc]), diag).toEqual([
      [1, 0],
      [2, 0],
    ]);
    expect(r.report.pingHost.received, diag).toBeGreaterThan(0);
    expect(r.features[0], diag).toEqual(expect.arrayContaining(['VIRTIO_F_VERSION_1', 'VIRTIO_NET_F_MQ']));
  });

  it('the backend followed ethtool -L: one pair live with the tap at 1/1, then two with the tap at 2/0', () => {
    const i1 = r.pairs.findIndex((p: Json) => p.live.length === 1 && p.enabled.length === 1);
    const i2 = r.pairs.findIndex((p: Json, i: number) => i > i1 && p.live.length === 2 && p.enabled.length === 2);
    expect(i1, diag).toBeGreaterThanOrEqual(0);
    expect(i2, diag).toBeGreaterThan(i1);
    expect(r.kernel[i1], diag).toBe('1/1');
    expect(r.kernel[i2], diag).toBe('2/0');
  });

  it('both pairs carried frames each way; QEMU quit cleanly (no protocol error); the tap stayed until closed', () => {
    expect(r.counters, diag).toHaveLength(2);
    for (const q of r.report.queues) expect(q.rxPackets + q.txPackets, `guest queue ${q.queue}: ${diag}`).toBeGreaterThan(0);
    for (const [p, c] of r.counters.entries()) {
      expect(c.txFrames, `pair ${p}: ${diag}`).toBeGreaterThan(0);
      expect(c.rxFrames, `pair ${p}: ${diag}`).toBeGreaterThan(0);
    }
    expect(r.connectedAfter).toBe(false);
    expect(r.disconnected, diag).toEqual([null]);
    expect(r.tapAfterClose).toBe(false);
  });
});
