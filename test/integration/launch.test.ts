/**
 * launchQemu and `mqtap launch` against the real kernel and a real QEMU that
 * boots nothing (`-M q35 -S`: the device is realized and reset, the CPUs
 * never run, so no guest kernel is needed and it costs ~0.2 s).  Everything
 * happens in this file's own network namespace.
 *
 * What it proves: exactly the handed fds reach QEMU (3.. are the tap's
 * queues per /proc/PID/fdinfo, an inherited non-CLOEXEC fd does not leak);
 * QEMU accepts the generated -netdev/-device and, at reset, detaches every
 * pair but the first; several netdevs in one launch; and every failure
 * (mismatched counts, closed fd, non-tap fd, detached queue, QEMU missing,
 * QEMU exiting at once, QEMU SIGKILLed) gives a clear error and leaves no
 * tap and no fd behind.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { getTap, listTaps } from '../../lib/tap/links';
import { native } from '../../lib/sys/native';
import { openNetdev, type Netdev } from '../../lib/vhost/netdev';
import { launchQemu, type ClosableNetdev } from '../../lib/qemu/qemu';
import { probeVhostNet } from '../../lib/vhost/vhost';
import { deleteTap } from '../../lib/tap/tap';
import { CLI, cliBuiltReason, runCli } from '../helpers/cli';
import { catchError, fdCount, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env';
import { PAUSED_MACHINE, QEMU, qemuMissingReason } from '../helpers/qemu';

/** A machine that realizes the device and resets it, and then waits (CPUs stopped): no guest needed. */
const PAUSED = PAUSED_MACHINE;

const env = tapEnv();
const reason = env.ok ? cliBuiltReason() || qemuMissingReason() : env.reason;
if (reason) console.warn(`launch integration tests skipped: ${reason}`);

const mqtap = runCli;

/** fd number -> what it is, from /proc/PID/fd and fdinfo ('tun:NAME' for a tap queue). */
function fdsOf(pid: number): Map<number, string> {
  const m = new Map<number, string>();
  for (const name of readdirSync(`/proc/${pid}/fd`)) {
    const fd = Number(name);
    let target = '?';
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      const iff = /^iff:\s*(\S+)/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
      if (iff) target = `tun:${iff[1]}`;
    } catch {
      /* closed meanwhile */
    }
    m.set(fd, target);
  }
  return m;
}

/** Polls `fn` until it returns a value (not undefined) or `ms` pass; then returns the last value. */
async function until<T>(ms: number, fn: () => T | undefined): Promise<T | undefined> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined || Date.now() > deadline) return v;
    await sleep(50);
  }
}

/** QEMU has installed its SIGTERM handler (SigCgt bit 14): from then on SIGTERM is a clean shutdown (exit 0). */
async function handlesSigterm(pid: number): Promise<boolean> {
  const r = await until(20_000, () => {
    try {
      const m = /^SigCgt:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      return m && (BigInt(`0x${m[1]}`) >> 14n) & 1n ? true : undefined;
    } catch {
      return false;
    }
  });
  return r === true;
}

/** Children this file started (and QEMU pids learned from --json), killed after each test whatever happened. */
const children = new Set<ChildProcess>();
const qemuPids = new Set<number>();
function track(c: ChildProcess): ChildProcess {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
}

/** `mqtap launch ... --json -- QEMU (paused)` in the background: waits for its "started" line. */
async function startLaunch(args: string[]): Promise<{ c: ChildProcess; stderr: () => string; started: { pid: number; tap: string; fds: number[]; vhostfds: number[]; argv: string[] } }> {
  const c = track(spawn(process.execPath, [CLI, 'launch', ...args, '--vhost', 'off', '--json', '--', QEMU, ...PAUSED], { stdio: ['ignore', 'pipe', 'pipe'] }));
  let err = '';
  c.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const line = await until(20_000, () => err.split('\n').find((l) => l.includes('"event":"started"')));
  if (!line) throw new Error(`mqtap launch did not say "started" within 20 s: ${err}`);
  return { c, stderr: () => err, started: JSON.parse(line) };
}

describe.skipIf(!!reason)(`launch: QEMU with pre-opened tap fds (real kernel, paused QEMU)${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  const netdevs: Netdev[] = [];
  const open = (name: string, pairs: number): Netdev => {
    const nd = openNetdev({ name, pairs, vhost: 'off' });
    netdevs.push(nd);
    return nd;
  };
  afterEach(async () => {
    for (const c of children) c.kill('SIGKILL');
    for (const pid of qemuPids) {
      try {
        // only if that pid is still a QEMU (never a reused pid of someone else)
        if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('qemu-system')) process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
    qemuPids.clear();
    await until(5_000, () => (children.size === 0 ? true : undefined));
    for (const nd of netdevs.splice(0)) nd.close();
    for (const t of listTaps()) deleteTap(t.name);
  });

  it('QEMU gets exactly stdio and the queue fds as 3..6, nothing this process had open; at reset QEMU detaches every pair but the first; SIGTERM ends it and the tap is gone', async () => {
    // An fd this process holds without FD_CLOEXEC: it must not reach QEMU.
    const leaky = openSync('/proc/self/status', 'r');
    native.setCloexec(leaky, false);
    const fdsBefore = fdCount();
    try {
      const nd = open('lq%d', 4);
      const name = nd.name;
      const l = launchQemu({ netdevs: [{ netdev: nd, options: { deviceProps: { romfile: '' } } }], qemu: [QEMU, ...PAUSED], stdio: 'pipe' });
      track(l.child);
      let qemuErr = '';
      l.child.stderr!.on('data', (d: Buffer) => (qemuErr += d.toString()));
      expect(l.plan.argv.slice(-4)).toEqual(['-netdev', 'tap,id=net0,fds=3:4:5:6,vhost=off', '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=10,romfile=']);
      // QEMU realized and reset the device when only queue pair 0 is attached.
      const view = await until(20_000, () => {
        const t = getTap(name)?.tun;
        return t && t.numQueues === 1 ? t : undefined;
      });
      expect(view, qemuErr).toMatchObject({ numQueues: 1, numDisabledQueues: 3 });
      const fds = fdsOf(l.pid!);
      expect([3, 4, 5, 6].map((fd) => fds.get(fd))).toEqual([`tun:${name}`, `tun:${name}`, `tun:${name}`, `tun:${name}`]);
      expect(await handlesSigterm(l.pid!)).toBe(true);
      // No other tun fd, and nothing that is this test's (the leaky fd's file is /proc/<test pid>/status).
      expect([...fds.values()].filter((t) => t.startsWith('tun:'))).toHaveLength(4);
      expect([...fds.values()].filter((t) => t.includes(`/proc/${process.pid}/`))).toEqual([]);
      l.child.kill('SIGTERM');
      const st = await l.exited;
      expect(st, qemuErr).toEqual({ code: 0, signal: null, status: 0 });
      expect(getTap(name)).toBeUndefined();
      expect(nd.tapFds()).toEqual([]);
    } finally {
      closeSync(leaky);
    }
    expect(fdCount()).toBe(fdsBefore - 1);
  });

  it('two netdevs x 2 queues in one launch: fds 3:4 are the first tap, 5:6 the second; both gone afterwards', async () => {
    const fdsBefore = fdCount();
    const a = open('la%d', 2);
    const b = open('lb%d', 2);
    const l = launchQemu({
      netdevs: [
        { netdev: a, options: { id: 'n0', mac: '52:54:00:00:00:0a', deviceProps: { romfile: '' } } },
        { netdev: b, options: { id: 'n1', mac: '52:54:00:00:00:0b', deviceProps: { romfile: '' } } },
      ],
      qemu: [QEMU, ...PAUSED],
      stdio: 'pipe',
    });
    track(l.child);
    expect(l.plan.netdevs.map((n) => [n.id, n.ifname, n.fds])).toEqual([
      ['n0', a.name, [3, 4]],
      ['n1', b.name, [5, 6]],
    ]);
    const ready = await until(20_000, () => (getTap(a.name)?.tun.numQueues === 1 && getTap(b.name)?.tun.numQueues === 1 ? true : undefined));
    expect(ready).toBe(true);
    const fds = fdsOf(l.pid!);
    expect([3, 4, 5, 6].map((fd) => fds.get(fd))).toEqual([`tun:${a.name}`, `tun:${a.name}`, `tun:${b.name}`, `tun:${b.name}`]);
    expect(await handlesSigterm(l.pid!)).toBe(true);
    l.child.kill('SIGTERM');
    expect((await l.exited).status).toBe(0);
    expect(listTaps()).toEqual([]);
    expect(fdCount()).toBe(fdsBefore);
  });

  describe('bad fds: a clear error, and the netdev is closed (no tap, no fd)', () => {
    /** A netdev view over real fds, closing the real netdev. */
    const view = (nd: Netdev, tap: number[], vhost: number[] = []): ClosableNetdev => ({ name: nd.name, tapFds: () => tap, vhostFds: () => vhost, close: () => nd.close() });

    it('a closed fd', () => {
      const before = fdCount();
      const nd = open('bf%d', 2);
      const [q0, q1] = nd.tapFds();
      native.close(q1!); // behind the library's back
      const e = catchError(() => launchQemu({ netdevs: [{ netdev: view(nd, [q0!, q1!]) }], qemu: [QEMU, ...PAUSED] }));
      expect(e).toMatchObject({ op: 'QEMU_ARGS', code: 'EBADF', queue: 1 });
      expect(e.message).toMatch(/queue 1 \(fd \d+\) is not a tap queue: it is not an open fd/);
      expect(nd.tapFds()).toEqual([]);
      expect(listTaps()).toEqual([]);
      expect(fdCount()).toBe(before);
    });

    it('a non-tap fd, and a /dev/net/tun fd attached to nothing', () => {
      const before = fdCount();
      const nd = open('bn%d', 1);
      const devnull = openSync('/dev/null', 'r');
      const e = catchError(() => launchQemu({ netdevs: [{ netdev: view(nd, [nd.tapFds()[0]!, devnull]) }], qemu: [QEMU, ...PAUSED] }));
      closeSync(devnull);
      expect(e).toMatchObject({ op: 'QEMU_ARGS', queue: 1 });
      expect(e.message).toMatch(/is not a tap queue: it is not a \/dev\/net\/tun fd/);
      expect(listTaps()).toEqual([]);

      const nd2 = open('bn%d', 1);
      const loose = native.tunOpen();
      const e2 = catchError(() => launchQemu({ netdevs: [{ netdev: view(nd2, [nd2.tapFds()[0]!, loose]) }], qemu: [QEMU, ...PAUSED] }));
      native.close(loose);
      expect(e2.message).toMatch(/attached to any tap/);
      expect(listTaps()).toEqual([]);
      expect(fdCount()).toBe(before);
    });

    it('a disabled (detached) queue: refused before QEMU would abort on it', () => {
      const nd = open('bd%d', 4);
      nd.setActivePairs(2);
      const e = catchError(() => launchQemu({ netdevs: [{ netdev: nd }], qemu: [QEMU, ...PAUSED] }));
      expect(e.queue).toBe(2);
      expect(e.message).toMatch(/is disabled \(detached\); QEMU assumes every queue it is handed is enabled and aborts/);
      expect(e.hint).toMatch(/ethtool -L/);
      expect(listTaps()).toEqual([]);
    });

    it('mismatched counts, and a vhost fd that is not /dev/vhost-net', () => {
      const before = fdCount();
      const nd = open('bm%d', 2);
      const [q0, q1] = nd.tapFds() as [number, number];
      const devnull = openSync('/dev/null', 'r');
      const mis = catchError(() => launchQemu({ netdevs: [{ netdev: view(nd, [q0, q1], [devnull]) }], qemu: [QEMU, ...PAUSED] }));
      expect(mis.message).toMatch(/2 tap fd\(s\) but 1 vhost-net fd\(s\)/);
      expect(listTaps()).toEqual([]);
      const nd2 = open('bm%d', 1);
      const notVhost = catchError(() => launchQemu({ netdevs: [{ netdev: view(nd2, nd2.tapFds(), [devnull]) }], qemu: [QEMU, ...PAUSED] }));
      closeSync(devnull);
      expect(notVhost.message).toMatch(/vhost fd 0 \(fd \d+\) is not \/dev\/vhost-net/);
      expect(listTaps()).toEqual([]);
      expect(fdCount()).toBe(before);
    });

    it('QEMU missing: SPAWN ENOENT with the install hint; netdev closed', () => {
      const nd = open('bq%d', 2);
      const e = catchError(() => launchQemu({ netdevs: [{ netdev: nd }], qemu: ['qemu-system-x86_64-missing', ...PAUSED] }));
      expect(e).toMatchObject({ op: 'SPAWN', code: 'ENOENT' });
      expect(e.hint).toMatch(/apt-get install -y qemu-system-x86/);
      expect(listTaps()).toEqual([]);
    });
  });

  describe('mqtap launch', () => {
    it('only stdio and the queue fds reach the command, not even an fd mqtap inherited', () => {
      // fd 3 of mqtap is an inherited pipe (no CLOEXEC); the "QEMU" here is a shell whose fds ls lists
      // (the shell holds nothing extra while ls runs; mqtap's -netdev/-device become its $1..).
      const r = spawnSync(process.execPath, [CLI, 'launch', '--queues', '3', '--vhost', 'off', '--', 'sh', '-c', 'ls -l /proc/$$/fd', 'sh'], {
        encoding: 'utf8',
        stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
        timeout: 30_000,
      });
      expect(r.status, String(r.stderr)).toBe(0);
      const fds = new Map<number, string>();
      for (const l of String(r.stdout).split('\n')) {
        const m = / (\d+) -> (.*)$/.exec(l);
        if (m) fds.set(Number(m[1]), m[2]!);
      }
      expect([...fds.keys()].sort((x, y) => x - y)).toEqual([0, 1, 2, 3, 4, 5]);
      expect([3, 4, 5].map((fd) => fds.get(fd))).toEqual(['/dev/net/tun', '/dev/net/tun', '/dev/net/tun']);
      expect(listTaps()).toEqual([]);
    });

    it('--json: a started and an exited line on stderr; exits with QEMU\'s status; SIGTERM is relayed', async () => {
      const { c, stderr: err, started } = await startLaunch(['--queues', '2']);
      qemuPids.add(started.pid);
      expect(started).toMatchObject({ fds: [3, 4], vhostfds: [], vhost: false, queues: 2 });
      expect(started.argv.slice(-4)).toEqual(['-netdev', 'tap,id=net0,fds=3:4,vhost=off', '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=6,romfile=']);
      expect(await until(20_000, () => (getTap(started.tap)?.tun.numQueues === 1 ? true : undefined))).toBe(true);
      expect(await handlesSigterm(started.pid)).toBe(true);
      c.kill('SIGTERM');
      const code = await new Promise<number | null>((resolve) => c.once('exit', (x) => resolve(x)));
      expect(code, err()).toBe(0);
      const exited = JSON.parse(err().split('\n').find((l) => l.includes('"event":"exited"'))!) as Record<string, unknown>;
      expect(exited).toMatchObject({ pid: started.pid, tap: started.tap, code: 0, signal: null, status: 0, tapGone: true });
      expect(listTaps()).toEqual([]);
    });

    it('QEMU killed with SIGKILL: launch exits 137, says so, and the tap is gone', async () => {
      const { c, stderr, started: { pid, tap } } = await startLaunch(['--queues', '2']);
      qemuPids.add(pid);
      expect(await until(20_000, () => (getTap(tap)?.tun.numQueues === 1 ? true : undefined))).toBe(true);
      process.kill(pid, 'SIGKILL');
      const code = await new Promise<number | null>((resolve) => c.once('exit', (x) => resolve(x)));
      expect(code, stderr()).toBe(137);
      expect(stderr()).toMatch(/"signal":"SIGKILL","status":137,.*"tapGone":true/);
      expect(getTap(tap)).toBeUndefined();
      expect(existsSync(`/proc/${pid}`)).toBe(false);
    });

    it('mqtap killed with SIGKILL: QEMU dies with it (pdeathsig) and the tap goes with both', async () => {
      const { c, started: { pid, tap } } = await startLaunch(['--queues', '2']);
      qemuPids.add(pid);
      c.kill('SIGKILL');
      expect(await until(10_000, () => (!existsSync(`/proc/${pid}`) ? true : undefined))).toBe(true);
      expect(await until(10_000, () => (getTap(tap) === undefined ? true : undefined))).toBe(true);
    });

    it('QEMU exiting at once: its own message, then mqtap\'s, its status, no tap', () => {
      const r = mqtap(['launch', '--queues', '2', '--vhost', 'off', '--', QEMU, '-no-such-option']);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/-no-such-option: invalid option/);
      expect(r.stderr).toMatch(/exited with status 1 after [\d.]+ s; closed its queues: mqt\d+ is gone/);
      expect(listTaps()).toEqual([]);
    });

    it('QEMU binary missing: exit 127 with the install hint, no tap created', () => {
      const r = mqtap(['launch', '--queues', '2', '--vhost', 'off', '--', 'qemu-system-x86_64-missing']);
      expect(r.code).toBe(127);
      expect(r.stderr).toMatch(/cannot run qemu-system-x86_64-missing: command not found/);
      expect(r.stderr).toMatch(/apt-get install -y qemu-system-x86/);
      expect(listTaps()).toEqual([]);
    });

    it('argument mistakes exit 2 before a tap exists', () => {
      for (const args of [
        ['--queues', '2', '--', QEMU, '-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},vhostfds=7:8:9'],
        ['--queues', '2', '--', QEMU, '-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},queues=2'],
        ['--queues', '2', '--', QEMU, '-netdev', 'tap,id=net0,ifname=x'],
        ['--queues', '4', '--active', '2', '--', QEMU],
      ]) {
        const r = mqtap(['launch', '--vhost', 'off', ...args]);
        expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
        expect(r.stderr).not.toMatch(/\n\s+at /);
        expect(listTaps()).toEqual([]);
      }
    });

    it('--existing require on a persistent tap: the tap stays after QEMU, with its queues released', async () => {
      expect(mqtap(['create', 'lp0', '--queues', '2']).code).toBe(0);
      const { c, stderr, started } = await startLaunch(['--name', 'lp0', '--existing', 'require', '--queues', '2']);
      expect(await until(20_000, () => (getTap('lp0')?.tun.numQueues === 1 ? true : undefined)), stderr()).toBe(true);
      expect(await handlesSigterm(started.pid)).toBe(true);
      c.kill('SIGTERM');
      expect(await new Promise((resolve) => c.once('exit', resolve))).toBe(0);
      expect(getTap('lp0')?.tun).toMatchObject({ persist: true, numQueues: 0, numDisabledQueues: 0 });
      expect(mqtap(['launch', '--name', 'nope0', '--existing', 'require', '--', QEMU]).code).toBe(3);
    });

    it.skipIf(probeVhostNet().usable)('--vhost on without vhost-net here: exit 5 with the modprobe hint, no tap', () => {
      const r = mqtap(['launch', '--queues', '2', '--vhost', 'on', '--', QEMU, ...PAUSED]);
      expect(r.code).toBe(5);
      expect(r.stderr).toMatch(/modprobe vhost_net/);
      expect(listTaps()).toEqual([]);
    });
  });
});
