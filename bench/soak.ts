/**
 * `npm run soak`: a soak, not a test.  Repeats whole lifecycles many times
 * and compares what the processes hold before and after: open fds, tun
 * devices, memory mappings and RSS.  Everything flat is the result wanted;
 * a number that grows with the cycle count is a leak.
 *
 *   npm run soak                              all phases, default counts
 *   npm run soak -- --taps 10000 --daemon 1000
 *   npm run soak -- --only taps               one phase
 *
 * Phases:
 *  - taps:   openTap (4 queues) -> setActiveQueues 1..4 -> disable/enable one
 *            queue -> close, in this process;
 *  - daemon: a real `mqtap daemon` child; each session connects, creates or
 *            shows a netdev, acquires its fds (SCM_RIGHTS), closes them,
 *            releases, disconnects.  Counted in the daemon process.
 *
 * Everything runs in a throw-away network namespace this process creates.
 * Run as root (CAP_NET_ADMIN).  RSS is taken after a forced GC (node
 * --expose-gc, as the npm script runs it); JS heaps still move by a few MB.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DaemonClient } from '../lib/daemon/client';
import { isolateNetns } from '../lib/sys/netns';
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
  rssKiB: number;
}

function snapshot(pid: number | 'self'): Snapshot {
  if (pid === 'self') (globalThis as { gc?: () => void }).gc?.();
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return {
    fds: readdirSync(`/proc/${pid}/fd`).length,
    taps: listTaps().length,
    maps: readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter(Boolean).length,
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
  const child = spawn(process.execPath, [CLI, '--log-level', 'info', 'daemon', '--socket', socket, '--state-dir', join(dir, 'state')], {
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

function table(): string {
  const head = ['phase', 'cycles', 's', 'fds', 'taps', 'maps', 'RSS MiB'];
  const d = (a: number, b: number): string => (a === b ? `${a} = ${b}` : `${a} -> ${b} (${b > a ? '+' : ''}${b - a})`);
  const body = rows.map((r) => [
    r.phase,
    String(r.cycles),
    r.seconds.toFixed(1),
    d(r.before.fds, r.after.fds),
    d(r.before.taps, r.after.taps),
    d(r.before.maps, r.after.maps),
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
