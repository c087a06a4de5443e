/**
 * `npm run soak`: a soak, not a test.  Repeats whole lifecycles many times
 * and compares what the processes hold before and after: open fds, tun
 * devices, memory mappings and RSS.  Everything flat is the result wanted;
 * a number that grows with the cycle count is a leak.
 *
 *   npm run soak                              all phases, default counts:
 *   npm run soak -- --taps 10000 --daemon 5000 --vhost-user 1000
 *                                             (5000 daemon sessions: V8's young
 *                                             generation reaches its limit after
 *                                             ~2500, see docs/reliability.md)
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
 * Run as root (CAP_NET_ADMIN).  Every sample is taken right after a full GC
 * (node --expose-gc, as the npm script runs it; in the daemon through the
 * preloaded bench/soak-daemon-probe.ts).
 *
 * Each phase also samples at 10 checkpoints (every tenth of its cycles) and
 * prints them: growth that stops after a warm-up (V8 growing its young and
 * old generations up to their limits, JIT code, malloc arenas) is a plateau,
 * not a leak; a leak keeps growing in the second half.  The verdict per row:
 * fds, taps and memfd maps must not grow at all (memfd maps: by at most the
 * few front-end mappings whose ArrayBuffers are not finalized yet).  From the
 * halfway checkpoint to the end, the live JS heap (after a full GC) must grow
 * by less than 512 KiB and RSS outside V8's heap (RSS minus the heap's
 * resident pages) by less than 4 MiB.  V8's
 * committed heap may still grow there (its young generation doubles up to
 * its limit when allocation is busy): that is V8 sizing itself, bounded by
 * its limits, and the table shows it.
 *
 * Daemon options:
 *   MQTAP_SOAK_DAEMON_HEAP=N   run the daemon with --max-old-space-size=N
 *   --heap-snapshots DIR       run the daemon with --heapsnapshot-signal=SIGUSR2
 *                              and write a V8 heap snapshot into DIR at every
 *                              checkpoint (RSS then includes the snapshotting)
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dgram from 'node:dgram';
import { getHeapStatistics } from 'node:v8';
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
/** Preloaded into the daemon: its memory after a full GC, on request (bench/soak-daemon-probe.ts). */
const PROBE = join(__dirname, 'soak-daemon-probe.js');

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}

interface JsHeap {
  /** V8's heap: committed, resident (total_physical_size), live (used after the GC). */
  heapTotalKiB: number;
  heapResidentKiB: number;
  heapUsedKiB: number;
  /** Memory outside the heap held by JS objects (ArrayBuffers, ...). */
  externalKiB: number;
}

/** The reply of bench/soak-daemon-probe.ts, in bytes. */
interface DaemonHeap {
  heapTotal: number;
  heapResident: number;
  heapUsed: number;
  external: number;
}

interface Snapshot {
  fds: number;
  taps: number;
  maps: number;
  /** Mappings of memfds (guest memory): what a vhost-user backend must unmap on disconnect. */
  memfdMaps: number;
  rssKiB: number;
  /** RssAnon: heap, JS heap, stacks (RSS minus file-backed and shared memory). */
  anonKiB: number;
  /** V8's heap, from process.memoryUsage() after a full GC (in the daemon: the probe's reply). */
  js?: JsHeap;
}

/**
 * A full GC in this process, twice with a turn of the event loop between:
 * native finalizers (the unmapping of an mmap'ed ArrayBuffer, for one) run
 * after the collection that found their object dead, and what they released
 * is only counted after that.
 */
async function settle(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) return;
  gc();
  await new Promise((r) => setImmediate(r));
  gc();
}

function snapshot(pid: number | 'self'): Snapshot {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter(Boolean);
  return {
    fds: readdirSync(`/proc/${pid}/fd`).length,
    taps: listTaps().length,
    maps: maps.length,
    memfdMaps: maps.filter((l) => l.includes('/memfd:')).length,
    rssKiB: Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? NaN),
    anonKiB: Number(/^RssAnon:\s+(\d+)/m.exec(status)?.[1] ?? NaN),
    ...(pid === 'self' ? { js: jsHeap() } : {}),
  };
}

function jsHeap(): JsHeap {
  const m = process.memoryUsage();
  return { heapTotalKiB: m.heapTotal >> 10, heapResidentKiB: getHeapStatistics().total_physical_size >> 10, heapUsedKiB: m.heapUsed >> 10, externalKiB: m.external >> 10 };
}

/** Checkpoints: after every tenth of `cycles` (cycle numbers, 1-based). */
function isCheckpoint(i: number, cycles: number): boolean {
  const step = Math.max(1, Math.round(cycles / 10));
  return i === cycles || (i % step === 0 && cycles - i >= step / 2);
}

interface Sample {
  at: number;
  s: Snapshot;
}

interface Row {
  phase: string;
  cycles: number;
  seconds: number;
  before: Snapshot;
  after: Snapshot;
  /** Snapshots at the checkpoints (the last one is `after`). */
  series: Sample[];
}

const rows: Row[] = [];

async function tapPhase(cycles: number): Promise<void> {
  await settle();
  const before = snapshot('self');
  const series: Sample[] = [];
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
    if (isCheckpoint(i + 1, cycles)) {
      await settle();
      series.push({ at: i + 1, s: progress('taps', i + 1, cycles, snapshot('self')) });
    }
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  rows.push({ phase: 'taps: open 4 queues, toggle, close', cycles, seconds, before, after: series.at(-1)!.s, series });
}

function progress(phase: string, i: number, cycles: number, s: Snapshot): Snapshot {
  const js = s.js ? `  JS heap ${MiB(s.js.heapUsedKiB)} live, ${MiB(s.js.heapResidentKiB)} resident, ${MiB(s.js.heapTotalKiB)} committed, external ${MiB(s.js.externalKiB)} MiB` : '';
  process.stdout.write(`  ${phase}: ${i}/${cycles}  fds ${s.fds}  maps ${s.maps}  memfd maps ${s.memfdMaps}  RSS ${MiB(s.rssKiB)} MiB (anon ${MiB(s.anonKiB)})${js}\n`);
  return s;
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

/** The daemon's snapshot right after a full GC in it (the probe's reply). */
async function daemonSnapshot(child: ChildProcess): Promise<Snapshot> {
  const js = await new Promise<DaemonHeap>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('the daemon did not answer the soak probe within 10 s')), 10_000);
    child.once('message', (m) => {
      clearTimeout(t);
      resolve(m as DaemonHeap);
    });
    child.send('stats');
  });
  return { ...snapshot(child.pid!), js: { heapTotalKiB: js.heapTotal >> 10, heapResidentKiB: js.heapResident >> 10, heapUsedKiB: js.heapUsed >> 10, externalKiB: js.external >> 10 } };
}

/** SIGUSR2 to a daemon started with --heapsnapshot-signal: waits until the new snapshot file is complete. */
async function heapSnapshot(child: ChildProcess, dir: string): Promise<string> {
  const list = (): string[] => readdirSync(dir).filter((f) => f.endsWith('.heapsnapshot'));
  const had = new Set(list());
  child.kill('SIGUSR2');
  const deadline = Date.now() + 120_000;
  let file: string | undefined;
  let size = -1;
  for (;;) {
    if (Date.now() > deadline) throw new Error(`the daemon wrote no heap snapshot into ${dir}`);
    await new Promise((r) => setTimeout(r, 200));
    file ??= list().find((f) => !had.has(f));
    if (!file) continue;
    // V8 writes the file in chunks and closes it at the end: done once the size holds still.
    const now = statSync(join(dir, file)).size;
    if (now > 0 && now === size) return join(dir, file);
    size = now;
  }
}

async function daemonPhase(sessions: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mqtap-soak-'));
  const socket = join(dir, 'mqtap.sock');
  const snapDir = arg('heap-snapshots', '');
  if (snapDir) mkdirSync(snapDir, { recursive: true });
  const nodeArgs = [
    ...(process.env.MQTAP_SOAK_DAEMON_HEAP ? [`--max-old-space-size=${process.env.MQTAP_SOAK_DAEMON_HEAP}`] : []),
    ...(snapDir ? ['--heapsnapshot-signal=SIGUSR2', `--diagnostic-dir=${snapDir}`] : []),
  ];
  const child = spawn(process.execPath, [...nodeArgs, '--expose-gc', '--require', PROBE, CLI, '--log-level', 'info', 'daemon', '--socket', socket, '--state-dir', join(dir, 'state')], {
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
  });
  try {
    await waitForLine(child, /listening/, 20_000);
    // One netdev made up front; the sessions use it (and one in ten makes and deletes its own).
    const setup = await DaemonClient.connect(socket);
    await setup.create({ name: 'soakd0', pairs: 4 });
    setup.close();
    const before = await daemonSnapshot(child);
    const series: Sample[] = [];
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
      if (isCheckpoint(i + 1, sessions)) {
        // Let the daemon finish closing the last connection before looking.
        await new Promise((r) => setTimeout(r, 100));
        series.push({ at: i + 1, s: progress('daemon', i + 1, sessions, await daemonSnapshot(child)) });
        if (snapDir) process.stdout.write(`  daemon: heap snapshot ${await heapSnapshot(child, snapDir)}\n`);
      }
    }
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    rows.push({ phase: 'daemon: connect, acquire 4 fds, release, disconnect (in the daemon)', cycles: sessions, seconds, before, after: series.at(-1)!.s, series });
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
      await settle();
      const before = snapshot('self');
      const series: Sample[] = [];
      const t0 = process.hrtime.bigint();
      for (let i = 1; i <= cycles; i++) {
        await vhostUserSession(socket, i, s, got);
        await until(() => !be.connected, 5000);
        got.length = 0;
        if (isCheckpoint(i, cycles)) {
          await settle();
          series.push({ at: i, s: progress('vhost-user', i, cycles, snapshot('self')) });
        }
      }
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      rows.push({ phase: 'vhost-user: connect, 2 pairs, a frame each way, quit (backend in this process)', cycles, seconds, before, after: series.at(-1)!.s, series });
    } finally {
      await be.close();
    }
  } finally {
    s.close();
    tap.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const MiB = (kib: number): string => (kib / 1024).toFixed(1);

/** The second half of a run: from the checkpoint nearest the halfway point to the end. */
function halfway(r: Row): Snapshot {
  const mid = r.series.find((x) => x.at >= r.cycles / 2);
  return (mid ?? r.series[0]!).s;
}

/** Allowed slack: memfd mappings of the front-end (this process) not finalized yet; noise. */
const MEMFD_SLACK = 16;
const HEAP_SLACK_KIB = 512;
const RSS_SLACK_KIB = 4 * 1024;

/**
 * RSS outside V8's heap: native allocations, malloc arenas, stacks, code,
 * file pages.  The heap's resident part, not its committed size: V8 commits
 * a grown young generation at once but its pages become resident as they are
 * first used.
 */
const outsideHeap = (s: Snapshot): number => s.rssKiB - (s.js?.heapResidentKiB ?? 0);

/** What is not flat in a row (see the header comment for the rules). */
function problems(r: Row): string[] {
  const out: string[] = [];
  const mid = halfway(r);
  if (r.after.fds > r.before.fds) out.push(`fds +${r.after.fds - r.before.fds}`);
  if (r.after.taps > r.before.taps) out.push(`taps +${r.after.taps - r.before.taps}`);
  if (r.after.memfdMaps > r.before.memfdMaps + MEMFD_SLACK) out.push(`memfd maps +${r.after.memfdMaps - r.before.memfdMaps}`);
  const used = (r.after.js?.heapUsedKiB ?? 0) - (mid.js?.heapUsedKiB ?? 0);
  if (used >= HEAP_SLACK_KIB) out.push(`JS heap still growing (+${MiB(used)} MiB live in the second half)`);
  const late = outsideHeap(r.after) - outsideHeap(mid);
  if (late >= RSS_SLACK_KIB) out.push(`RSS outside the JS heap still growing (+${MiB(late)} MiB in the second half)`);
  return out;
}

function markdown(head: string[], body: string[][]): string {
  const w = head.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  const line = (r: string[]): string => `| ${r.map((c, i) => c.padEnd(w[i]!)).join(' | ')} |`;
  return [line(head), `|${w.map((n) => '-'.repeat(n + 2)).join('|')}|`, ...body.map(line)].join('\n');
}

function table(): string {
  const head = ['phase', 'cycles', 's', 'fds', 'taps', 'maps', 'memfd maps', 'RSS MiB', 'JS heap live MiB, 2nd half', 'RSS outside JS heap MiB, 2nd half', 'flat'];
  const d = (a: number, b: number): string => (a === b ? `${a} = ${b}` : `${a} -> ${b} (${b > a ? '+' : ''}${b - a})`);
  const body = rows.map((r) => {
    const p = problems(r);
    const mid = halfway(r);
    return [
      r.phase,
      String(r.cycles),
      r.seconds.toFixed(1),
      d(r.before.fds, r.after.fds),
      d(r.before.taps, r.after.taps),
      d(r.before.maps, r.after.maps),
      d(r.before.memfdMaps, r.after.memfdMaps),
      `${MiB(r.before.rssKiB)} -> ${MiB(r.after.rssKiB)}`,
      `${MiB(mid.js?.heapUsedKiB ?? NaN)} -> ${MiB(r.after.js?.heapUsedKiB ?? NaN)}`,
      `${MiB(outsideHeap(mid))} -> ${MiB(outsideHeap(r.after))}`,
      p.length ? `no: ${p.join(', ')}` : 'yes',
    ];
  });
  return markdown(head, body);
}

/** RSS / V8 heap committed / its resident part / JS heap live (MiB) at every checkpoint, one row per phase. */
function checkpoints(): string {
  const n = Math.max(...rows.map((r) => r.series.length));
  const head = ['RSS / heap committed / resident / live, MiB', 'start', ...Array.from({ length: n }, (_, i) => `${(i + 1) * 10}%`)];
  const cell = (x: Snapshot): string => `${MiB(x.rssKiB)} / ${MiB(x.js?.heapTotalKiB ?? NaN)} / ${MiB(x.js?.heapResidentKiB ?? NaN)} / ${MiB(x.js?.heapUsedKiB ?? NaN)}`;
  const body = rows.map((r) => [r.phase.split(':')[0]!, cell(r.before), ...Array.from({ length: n }, (_, i) => (r.series[i] ? cell(r.series[i]!.s) : ''))]);
  return markdown(head, body);
}

async function main(): Promise<void> {
  const only = arg('only', '');
  const ns = isolateNetns();
  try {
    if (!only || only === 'taps') await tapPhase(Number(arg('taps', '10000')));
    if (!only || only === 'daemon') await daemonPhase(Number(arg('daemon', '5000')));
    if (!only || only === 'vhost-user') await vhostUserPhase(Number(arg('vhost-user', '1000')));
  } finally {
    ns.restore();
  }
  process.stdout.write(`\n${table()}\n\n${checkpoints()}\n`);
  process.exitCode = rows.some((r) => problems(r).length > 0) ? 1 : 0;
}

main().catch((err: unknown) => {
  process.stderr.write(`soak: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
