/**
 * vhost-user benchmark (`npm run bench -- --only vhost-user`): forwarding
 * rate per queue pair between a tap and a vhost-user front-end, mqtap's
 * backend (`mqtap vhost-user`, lib/vhost-user + native/vhost_user.cc)
 * against DPDK doing the same job in the same run (`dpdk-testpmd --vdev
 * net_vhost0,iface=SOCK --vdev net_tap0,iface=TAP --forward-mode=io`).
 *
 * The guest side is DPDK's virtio-user PMD in a second testpmd
 * (`--vdev net_virtio_user0,path=SOCK,queues=N`):
 *   guest->tap  testpmd --forward-mode=txonly --txpkts=SIZE sends flat out;
 *               counted by the tap's kernel rx counter (frames the backend
 *               wrote into the tap).
 *   tap->guest  the AF_PACKET generator of bench/data.ts transmits 64 flows
 *               flat out on the tap (the same program for both backends);
 *               counted by the guest testpmd's own RX-packets (--forward-mode=rxonly,
 *               --stats-period 1), the tap's kernel tx/tx_dropped besides.
 * Sizes: 60 B and 1514 B frames (64 B / 1518 B on a wire with the FCS).
 *
 * CPUs: the backend (the mqtap process, or testpmd's forwarding lcore) on
 * CPU 0, the guest testpmd's forwarding lcore and the generator on CPU 1.
 * CPU per frame: utime+stime of the backend process (/proc/PID/stat) over
 * the measured window / frames.  DPDK polls, so its figure is one busy CPU
 * divided by its rate.  Each repeat runs mqtap then DPDK back to back; the
 * ratio reported is the median over the repeats of mqtap run r / DPDK run r.
 * Everything happens in the caller's throw-away network namespace.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { getLink } from '../lib/tap/links';
import { median, textTable } from './stats';

export type VuDir = 'guest-to-tap' | 'tap-to-guest';
export type VuImpl = 'mqtap' | 'dpdk';
/** mqtap's tap engine in the bench ('auto': io_uring batches where available; 'writev': one syscall per frame, to see what batching buys). */
export type VuTapEngine = 'auto' | 'writev';

export interface VuRun {
  impl: VuImpl;
  dir: VuDir;
  size: number;
  pairs: number;
  /** Frames/s over all pairs. */
  pps: number;
  /** CPU µs of the backend process per frame. */
  cpuUsPerFrame: number;
  seconds: number;
  frames: number;
  /** tap->guest: frames the kernel dropped on full tap queues over the window. */
  tapTxDropped?: number;
  /** mqtap, over the whole connection (warm-up included): frames per tap syscall and per worker wake-up, and the tap engine. */
  batching?: { framesPerSyscall: number; framesPerWakeup: number; tapEngine: string };
}

/** The 'disconnected' event of `mqtap vhost-user --json` (its last counters): frames per tap syscall and per wake-up. */
export function batchingFromCliOutput(out: string, dir: VuDir): VuRun['batching'] | undefined {
  for (const line of out.split('\n').reverse()) {
    if (!line.startsWith('{') || !line.includes('"disconnected"')) continue;
    try {
      const ev = JSON.parse(line) as { event?: string; counters?: Array<Record<string, number | string>> };
      if (ev.event !== 'disconnected' || !ev.counters?.length) continue;
      const sum = (k: string): number => ev.counters!.reduce((a, c) => a + Number(c[k] ?? 0), 0);
      const frames = dir === 'guest-to-tap' ? sum('txFrames') : sum('rxFrames');
      const syscalls = dir === 'guest-to-tap' ? sum('txSyscalls') : sum('rxSyscalls');
      const wakeups = sum('wakeups');
      return { framesPerSyscall: syscalls > 0 ? frames / syscalls : NaN, framesPerWakeup: wakeups > 0 ? frames / wakeups : NaN, tapEngine: String(ev.counters[0]!.tapEngine) };
    } catch {
      /* not a JSON line of ours */
    }
  }
  return undefined;
}

export interface VuResult {
  dir: VuDir;
  size: number;
  pairs: number;
  mqtap: VuRun[];
  dpdk: VuRun[];
  /** Median over repeats of mqtap run r / DPDK run r (per-pair rates: same pair count, same ratio). */
  ratio: number;
}

export interface VuBenchOptions {
  /** The CLI (dist/bin/mqtap.js). */
  cli: string;
  /** The generator built by bench/data.ts buildPrograms(). */
  gen: string;
  sizes: number[];
  pairs: number[];
  dirs: VuDir[];
  repeats: number;
  warmupMs: number;
  measureMs: number;
  /** mqtap's --tap-engine (default 'auto'). */
  tapEngine?: VuTapEngine;
  /** tap->guest: the tap's txqueuelen (frames the kernel queues for the backend; default: the kernel's, 1000). */
  txqueuelen?: number;
  log: (line: string) => void;
}

const TESTPMD = 'dpdk-testpmd';
const TAP = 'mqvu0';
const CLK_TCK = 100;

export function haveTestpmd(): boolean {
  return spawnSync('sh', ['-c', `command -v ${TESTPMD}`]).status === 0;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** utime + stime of a process, in µs. */
function procCpuUs(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return ((Number(f[11]) + Number(f[12])) * 1e6) / CLK_TCK;
}

/** The first "model name" of /proc/cpuinfo. */
export function cpuModel(): string {
  const m = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
  return m ? m[1]!.trim() : 'unknown';
}

interface Child {
  proc: ChildProcess;
  out: () => string;
  exited: Promise<void>;
}

function start(argv: string[]): Child {
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const add = (d: Buffer): void => {
    out += d.toString();
    if (out.length > 200_000) out = out.slice(-100_000);
  };
  proc.stdout!.on('data', add);
  proc.stderr!.on('data', add);
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  return { proc, out: () => out, exited };
}

async function stop(c: Child | undefined, signal: NodeJS.Signals = 'SIGINT', ms = 10_000): Promise<void> {
  if (!c || c.proc.exitCode !== null || c.proc.signalCode !== null) return;
  c.proc.kill(signal);
  const t = setTimeout(() => c.proc.kill('SIGKILL'), ms);
  await c.exited;
  clearTimeout(t);
}

async function until(what: string, cond: () => boolean, ms: number, c?: Child): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return;
    if (c && (c.proc.exitCode !== null || c.proc.signalCode !== null)) break;
    await sleep(50);
  }
  throw new Error(`bench vhost-user: ${what} did not happen${c ? `; output:\n${c.out().slice(-3000)}` : ''}`);
}

function tapCounters(): { rx: number; tx: number; txDropped: number } {
  const s = getLink(TAP)?.stats;
  return { rx: s?.rxPackets ?? 0, tx: s?.txPackets ?? 0, txDropped: s?.txDropped ?? 0 };
}

/** The guest testpmd's latest cumulative RX-packets of port 0 (from --stats-period output). */
export function testpmdRx(out: string): number | undefined {
  let last: number | undefined;
  for (const m of out.matchAll(/RX-packets:\s+(\d+)/g)) last = Number(m[1]);
  return last;
}

function testpmdBase(prefix: string, mainLcore: number): string[] {
  return [TESTPMD, '-l', '0,1', '--main-lcore', String(mainLcore), '--no-huge', '--no-pci', '-m', '512', '--file-prefix', prefix, '--log-level', 'lib.eal:error'];
}

async function runOnce(o: VuBenchOptions, impl: VuImpl, dir: VuDir, size: number, pairs: number): Promise<VuRun> {
  const dirTmp = mkdtempSync(join(tmpdir(), 'mqtap-vubench-'));
  const sock = join(dirTmp, 'vu.sock');
  const prefixes = [`mqvb-be-${process.pid}`, `mqvb-g-${process.pid}`];
  let backend: Child | undefined;
  let guest: Child | undefined;
  let gen: Child | undefined;
  try {
    if (impl === 'mqtap') {
      backend = start(['taskset', '-c', '0', process.execPath, o.cli, 'vhost-user', '--socket', sock, '--name', TAP, '--queues', String(pairs), '--json', '--tap-engine', o.tapEngine ?? 'auto']);
    } else {
      backend = start([
        ...testpmdBase(prefixes[0]!, 1),
        '--vdev', `net_vhost0,iface=${sock},queues=${pairs}`,
        '--vdev', `net_tap0,iface=${TAP}`,
        '--', '--forward-mode=io', `--rxq=${pairs}`, `--txq=${pairs}`, '--nb-cores=1', '--total-num-mbufs=32768', '--stats-period', '5',
      ]);
    }
    await until('the backend socket', () => existsSync(sock), 30_000, backend);
    if (impl === 'mqtap') await until('the tap', () => getLink(TAP) !== undefined, 10_000, backend);
    const mode = dir === 'guest-to-tap' ? 'txonly' : 'rxonly';
    guest = start([
      ...testpmdBase(prefixes[1]!, 0),
      '--vdev', `net_virtio_user0,path=${sock},queues=${pairs}`,
      '--', `--forward-mode=${mode}`, `--txpkts=${size}`, `--rxq=${pairs}`, `--txq=${pairs}`, '--nb-cores=1', '--total-num-mbufs=32768', '--stats-period', '1',
    ]);
    await until('the guest testpmd forwarding', () => /RX-packets:/.test(guest!.out()), 30_000, guest);
    await until('the tap', () => getLink(TAP) !== undefined, 10_000, backend);
    spawnSync('ip', ['link', 'set', 'dev', TAP, 'up', ...(o.txqueuelen !== undefined ? ['txqueuelen', String(o.txqueuelen)] : [])]);
    if (dir === 'tap-to-guest') {
      gen = start(['taskset', '-c', '1', o.gen, TAP, String(size), '64']);
      await until('the generator', () => gen!.out().includes('ready'), 10_000, gen);
    }
    await sleep(o.warmupMs);
    const pid = backend.proc.pid!;
    const read = (): { t: number; cpu: number; tap: ReturnType<typeof tapCounters>; rx: number } => ({ t: performance.now(), cpu: procCpuUs(pid), tap: tapCounters(), rx: testpmdRx(guest!.out()) ?? 0 });
    let a = read();
    if (dir === 'tap-to-guest') {
      // Align with a fresh stats line of the guest testpmd.
      const rx0 = a.rx;
      await until('a guest stats line', () => (testpmdRx(guest!.out()) ?? 0) !== rx0, 5_000, guest);
      a = read();
    }
    await sleep(o.measureMs);
    let b = read();
    if (dir === 'tap-to-guest') {
      const rx1 = b.rx;
      await until('a guest stats line', () => (testpmdRx(guest!.out()) ?? 0) !== rx1, 5_000, guest);
      b = read();
    }
    const seconds = (b.t - a.t) / 1000;
    const frames = dir === 'guest-to-tap' ? b.tap.rx - a.tap.rx : b.rx - a.rx;
    const cpu = b.cpu - a.cpu;
    let batching: VuRun['batching'];
    if (impl === 'mqtap') {
      // The counters come with the backend's 'disconnected' event: stop the guest first.
      await stop(gen, 'SIGKILL');
      await stop(guest);
      await until('the backend\'s disconnected event', () => batchingFromCliOutput(backend!.out(), dir) !== undefined, 5_000, backend).catch(() => undefined);
      batching = batchingFromCliOutput(backend.out(), dir);
    }
    return {
      impl,
      dir,
      size,
      pairs,
      pps: frames / seconds,
      cpuUsPerFrame: frames > 0 ? cpu / frames : NaN,
      seconds,
      frames,
      ...(dir === 'tap-to-guest' ? { tapTxDropped: b.tap.txDropped - a.tap.txDropped } : {}),
      ...(batching ? { batching } : {}),
    };
  } finally {
    await stop(gen, 'SIGKILL');
    await stop(guest);
    await stop(backend);
    for (const p of prefixes) rmSync(`/var/run/dpdk/${p}`, { recursive: true, force: true });
    rmSync(dirTmp, { recursive: true, force: true });
    // A tap left by a killed backend (non-persistent taps go with their fds).
    if (getLink(TAP)) spawnSync('ip', ['link', 'del', TAP]);
  }
}

/** Median over the repeats of mqtap run r / DPDK run r (run back to back: the pairing cancels slow drifts of a noisy machine). */
export function pairedRatio(mqtap: ReadonlyArray<{ pps: number }>, dpdk: ReadonlyArray<{ pps: number }>): number {
  const n = Math.min(mqtap.length, dpdk.length);
  return median(Array.from({ length: n }, (_, i) => mqtap[i]!.pps / dpdk[i]!.pps));
}

export async function runVhostUserBench(o: VuBenchOptions): Promise<VuResult[]> {
  const out: VuResult[] = [];
  for (const pairs of o.pairs)
    for (const dir of o.dirs)
      for (const size of o.sizes) {
        const r: VuResult = { dir, size, pairs, mqtap: [], dpdk: [], ratio: NaN };
        for (let i = 0; i < o.repeats; i++) {
          for (const impl of ['mqtap', 'dpdk'] as const) {
            const run = await runOnce(o, impl, dir, size, pairs);
            r[impl].push(run);
            const extra = [
              run.tapTxDropped !== undefined ? `tap dropped ${(run.tapTxDropped / run.seconds / 1e6).toFixed(3)} Mf/s (offered = forwarded + dropped)` : '',
              run.batching ? `${run.batching.tapEngine}: ${run.batching.framesPerSyscall.toFixed(1)} frames/tap syscall, ${run.batching.framesPerWakeup.toFixed(1)} frames/wake-up` : '',
            ].filter(Boolean);
            o.log(`vhost-user ${dir} ${size} B ${pairs} pair(s) ${impl} run ${i + 1}: ${(run.pps / 1e6).toFixed(3)} Mf/s, ${run.cpuUsPerFrame.toFixed(3)} µs CPU/frame${extra.length ? `; ${extra.join('; ')}` : ''}`);
          }
        }
        r.ratio = pairedRatio(r.mqtap, r.dpdk);
        out.push(r);
      }
  return out;
}

function mpps(x: number): string {
  return (x / 1e6).toFixed(3);
}

/** The table: per pair rates (Mframes/s), paired ratio, CPU µs per frame; CPU model and load in the header.  Sizes are frames without the FCS (60 B: the 64 B class). */
export function vhostUserTable(results: VuResult[]): string {
  const head = ['direction', 'frame', 'pairs', 'mqtap Mf/s/pair', 'DPDK Mf/s/pair', 'mqtap/DPDK', 'mqtap µs CPU/f', 'DPDK µs CPU/f'];
  const rows = results.map((r) => [
    r.dir,
    `${r.size} B`,
    String(r.pairs),
    mpps(median(r.mqtap.map((x) => x.pps)) / r.pairs),
    mpps(median(r.dpdk.map((x) => x.pps)) / r.pairs),
    `${r.ratio.toFixed(2)}x`,
    median(r.mqtap.map((x) => x.cpuUsPerFrame)).toFixed(3),
    median(r.dpdk.map((x) => x.cpuUsPerFrame)).toFixed(3),
  ]);
  return `CPU: ${cpuModel()} x ${cpus().length} vCPUs (noisy: shared with other work; load average ${loadavg()[0]!.toFixed(2)})\n${textTable(head, rows, 2)}`;
}
