/**
 * `npm run soak`: a soak, not a test.  Repeats whole lifecycles many times
 * and compares what the processes hold before and after: open fds, tun
 * devices, memory mappings and RSS.  Everything flat is the result wanted;
 * a number that grows with the cycle count is a leak.
 *
 *   npm run soak                              all phases, default counts
 *   npm run soak -- --taps 10000 --daemon 1000 --vhost-user 1000
 *   npm run soak -- --only taps               one phase
 *
 * Phases:
 *  - taps:   openTap (4 queues) -> setActiveQueues 1..4 -> disable/enable one
 *            queue -> close, in this process;
 *  - daemon: a real `mqtap daemon` child; each session connects, creates or
 *            shows a netdev, acquires its fds (SCM_RIGHTS), closes them,
 *            releases, disconnects.  Counted in the daemon process.
 *  - vhost-user: serveVhostUser on a 2-queue tap in this process; each cycle a
 *            front-end (QEMU's message order, guest memory in a fresh memfd)
 *            connects, sets up both pairs, sends a frame guest -> tap and
 *            gets one tap -> guest, then quits (GET_VRING_BASE, EOF).
 *
 * Everything runs in a throw-away network namespace this process creates.
 * Run as root (CAP_NET_ADMIN).  RSS is taken after a forced GC (node
 * --expose-gc, as the npm script runs it); JS heaps still move by a few MB.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dgram from 'node:dgram';
import { DaemonClient } from '../lib/daemon/client';
import { parseUdp4Frame, udp4Frame } from '../lib/datapath/frames';
import { UnixSocket } from '../lib/sys/scm';
import { serveVhostUser } from '../lib/vhost-user/backend';
import { ScriptedFrontend, startLikeQemu, until } from '../test/helpers/vhost-user';
import { DriverRing, F_WRITE, GuestMem } from '../test/helpers/vu-driver';
import { isolateNetns } from '../lib/sys/netns';
import { execFileSync } from 'node:child_process';
import { listTaps } from '../lib/tap/links';
import { openTap } from '../lib/tap/tap';

const ROOT = join(__dirname, '..', '..');
const CLI = join(ROOT, 'dist', 'bin', 'mqtap.js');

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}

interface Snapshot {
  fds: number;
  taps: number;
  maps: number;
  /** Mappings of memfds (guest memory): what a vhost-user backend must unmap on disconnect. */
  memfdMaps: number;
  rssKiB: number;
}

function snapshot(pid: number | 'self'): Snapshot {
  if (pid === 'self') (globalThis as { gc?: () => void }).gc?.();
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter(Boolean);
  return {
    fds: readdirSync(`/proc/${pid}/fd`).length,
    taps: listTaps().length,
    maps: maps.length,
    memfdMaps: maps.filter((l) => l.includes('/memfd:')).length,
    rssKiB: Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? NaN),
  };
}

interface Row {
  phase: string;
  cycles: number;
  seconds: number;
  before: Snapshot;
  after: Snapshot;
}

const rows: Row[] = [];

function tapPhase(cycles: number): void {
  const before = snapshot('self');
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < cycles; i++) {
    const tap = openTap({ name: 'soak0', queues: 4, vnetHdrSize: 12, up: i % 2 === 0 });
    try {
      for (let k = 1; k <= 4; k++) tap.setActiveQueues(k);
      tap.queues[3]!.disable();
      tap.queues[3]!.enable();
    } finally {
      tap.close();
    }
    if ((i + 1) % 1000 === 0) process.stdout.write(`  taps: ${i + 1}/${cycles}\n`);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  rows.push({ phase: 'taps: open 4 queues, toggle, close', cycles, seconds, before, after: snapshot('self') });
}

function waitForLine(child: ChildProcess, re: RegExp, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const t = setTimeout(() => reject(new Error(`the daemon did not say ${re} within ${timeoutMs} ms:\n${buf}`)), timeoutMs);
    const on = (d: Buffer): void => {
      buf += d.toString();
      if (re.test(buf)) {
        clearTimeout(t);
        child.stderr!.off('data', on);
        child.stderr!.resume();
        resolve();
      }
    };
    child.stderr!.on('data', on);
    child.once('exit', (code) => reject(new Error(`the daemon exited (${code}):\n${buf}`)));
  });
}

async function daemonPhase(sessions: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mqtap-soak-'));
  const socket = join(dir, 'mqtap.sock');
  const child = spawn(process.execPath, [...(process.env.MQTAP_SOAK_DAEMON_HEAP ? [`--max-old-space-size=${process.env.MQTAP_SOAK_DAEMON_HEAP}`] : []), CLI, '--log-level', 'info', 'daemon', '--socket', socket, '--state-dir', join(dir, 'state')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  try {
    await waitForLine(child, /listening/, 20_000);
    // One netdev made up front; the sessions use it (and one in ten makes and deletes its own).
    const setup = await DaemonClient.connect(socket);
    await setup.create({ name: 'soakd0', pairs: 4 });
    setup.close();
    const before = snapshot(child.pid!);
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < sessions; i++) {
      const c = await DaemonClient.connect(socket);
      try {
        if (i % 10 === 0) {
          await c.create({ name: 'soakd1', pairs: 2 });
          await c.delete('soakd1');
        }
        const a = await c.acquire('soakd0');
        a.fds.close();
        await c.release('soakd0');
        await c.show('soakd0');
      } finally {
        c.close();
      }
      if ((i + 1) % 200 === 0) process.stdout.write(`  daemon: ${i + 1}/${sessions}\n`);
    }
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    // Let the daemon finish closing the last connection before looking.
    await new Promise((r) => setTimeout(r, 200));
    rows.push({ phase: 'daemon: connect, acquire 4 fds, release, disconnect (in the daemon)', cycles: sessions, seconds, before, after: snapshot(child.pid!) });
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
    rmSync(dir, { recursive: true, force: true });
  }
}

const VU_LOCAL = '169.254.81.1';
const VU_PEER = '169.254.81.2';
const VU_TAP_MAC = '02:00:00:00:03:01';
const VU_PEER_MAC = '02:00:00:00:03:02';

/** One front-end session in QEMU 7.2's message order: set up 2 pairs, one frame each way, quit. */
async function vhostUserSession(socket: string, i: number, s: dgram.Socket, got: string[]): Promise<void> {
  const mem = new GuestMem(`mqtap-soak-${process.pid}-${i}`, 1 << 20);
  const rings = [0, 1, 2, 3].map(() => new DriverRing(mem, 16, 2048));
  const fe = new ScriptedFrontend(await UnixSocket.connect(socket, { type: 'stream' }));
  try {
    await startLikeQemu(fe, mem, rings, 2);
    await fe.u64('GET_STATUS');
    // RX buffers on pair (i % 2); a frame guest -> tap on the other pair's TX ring.
    const rx = rings[2 * (i % 2)]!;
    for (let d = 0; d < rx.num; d++) rx.setDesc(d, mem.gpa(rx.bufOffset(d)), rx.bufSize, F_WRITE);
    rx.publish(Array.from({ length: rx.num }, (_, d) => d));
    const tx = rings[2 * ((i + 1) % 2) + 1]!;
    const want = `soak ${i}`;
    const frame = udp4Frame({ dstMac: VU_TAP_MAC, srcMac: VU_PEER_MAC, srcIp: VU_PEER, dstIp: VU_LOCAL, srcPort: 4000, dstPort: s.address().port, payload: Buffer.from(want) });
    mem.u8.fill(0, tx.bufOffset(0), tx.bufOffset(0) + 12);
    mem.u8.set(frame, tx.bufOffset(0) + 12);
    tx.setDesc(0, mem.gpa(tx.bufOffset(0)), 12 + frame.length, 0);
    tx.publish([0]);
    await until(() => got.includes(want), 5000);
    // tap -> guest: datagrams to the peer until one lands in the posted RX ring (the tap steers by flow).
    let received = false;
    for (let k = 0; k < 64 && !received; k++) {
      await new Promise<void>((res, rej) => s.send(Buffer.from(`back ${i}`), 5000 + k, VU_PEER, (e) => (e ? rej(e) : res())));
      await until(() => rx.usedIdx() !== 0, 20).catch(() => undefined);
      received = rx.collect().some((u) => parseUdp4Frame(Buffer.from(mem.u8.subarray(rx.bufOffset(u.id) + 12, rx.bufOffset(u.id) + u.len)))?.dstIp === VU_PEER);
    }
    if (!received) throw new Error(`cycle ${i}: no frame reached the guest's RX ring`);
    for (let r = 0; r < 4; r++) await fe.getBase(r);
  } finally {
    fe.close();
    for (const r of rings) r.close();
    mem.close();
  }
}

async function vhostUserPhase(cycles: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mqtap-soak-vu-'));
  const socket = join(dir, 'vu.sock');
  const tap = openTap({ name: 'soakvu0', queues: 2, mac: VU_TAP_MAC });
  const s = dgram.createSocket('udp4');
  try {
    const sysctl = (k: string, v: string): void => {
      try {
        execFileSync('sysctl', ['-qw', `${k}=${v}`]);
      } catch {
        /* IPv6 may be absent */
      }
    };
    sysctl('net.ipv6.conf.soakvu0.disable_ipv6', '1');
    execFileSync('ip', ['addr', 'add', `${VU_LOCAL}/24`, 'dev', 'soakvu0']);
    execFileSync('ip', ['link', 'set', 'dev', 'soakvu0', 'up']);
    execFileSync('ip', ['neigh', 'replace', VU_PEER, 'lladdr', VU_PEER_MAC, 'dev', 'soakvu0', 'nud', 'permanent']);
    await new Promise<void>((res) => s.bind(0, VU_LOCAL, () => res()));
    const got: string[] = [];
    s.on('message', (m) => got.push(m.toString()));
    const be = await serveVhostUser({ socket, tap, queues: 2 });
    try {
      // One cycle first, so lazily created state (JIT, pools) is not counted as growth.
      await vhostUserSession(socket, 0, s, got);
      await until(() => !be.connected, 5000);
      const before = snapshot('self');
      const t0 = process.hrtime.bigint();
      for (let i = 1; i <= cycles; i++) {
        await vhostUserSession(socket, i, s, got);
        await until(() => !be.connected, 5000);
        got.length = 0;
        if (i % 100 === 0) process.stdout.write(`  vhost-user: ${i}/${cycles}\n`);
      }
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      rows.push({ phase: 'vhost-user: connect, 2 pairs, a frame each way, quit (backend in this process)', cycles, seconds, before, after: snapshot('self') });
    } finally {
      await be.close();
    }
  } finally {
    s.close();
    tap.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

function table(): string {
  const head = ['phase', 'cycles', 's', 'fds', 'taps', 'maps', 'memfd maps', 'RSS MiB'];
  const d = (a: number, b: number): string => (a === b ? `${a} = ${b}` : `${a} -> ${b} (${b > a ? '+' : ''}${b - a})`);
  const body = rows.map((r) => [
    r.phase,
    String(r.cycles),
    r.seconds.toFixed(1),
    d(r.before.fds, r.after.fds),
    d(r.before.taps, r.after.taps),
    d(r.before.maps, r.after.maps),
    d(r.before.memfdMaps, r.after.memfdMaps),
    `${(r.before.rssKiB / 1024).toFixed(1)} -> ${(r.after.rssKiB / 1024).toFixed(1)}`,
  ]);
  const w = head.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  const line = (r: string[]): string => `| ${r.map((c, i) => c.padEnd(w[i]!)).join(' | ')} |`;
  return [line(head), `|${w.map((n) => '-'.repeat(n + 2)).join('|')}|`, ...body.map(line)].join('\n');
}

async function main(): Promise<void> {
  const only = arg('only', '');
  const ns = isolateNetns();
  try {
    if (!only || only === 'taps') tapPhase(Number(arg('taps', '10000')));
    if (!only || only === 'daemon') await daemonPhase(Number(arg('daemon', '1000')));
    if (!only || only === 'vhost-user') await vhostUserPhase(Number(arg('vhost-user', '1000')));
  } finally {
    ns.restore();
  }
  process.stdout.write(`\n${table()}\n`);
  const leaked = rows.some((r) => r.after.fds > r.before.fds || r.after.taps > r.before.taps);
  process.exitCode = leaked ? 1 : 0;
}

main().catch((err: unknown) => {
  process.stderr.write(`soak: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
