/**
 * `npm run bench`: benchmarks, never tests.  Everything runs in a throw-away
 * network namespace that this process creates (and that disappears with it);
 * the C programs and worker threads it starts inherit it.
 *
 *   npm run bench                        control plane + data path (library vs C)
 *   npm run bench -- --only control      control plane only
 *   npm run bench -- --only data         data path only
 *   npm run bench -- --only vhost-user   vhost-user backend: mqtap against DPDK (dpdk-testpmd; not in 'all')
 *   npm run bench -- --only vhost-user --vu-sizes 60,1514 --vu-pairs 1,2 --vu-dirs guest-to-tap,tap-to-guest
 *                                        --vu-repeats 3 --vu-seconds 5 [--vu-tap-engine auto|writev] [--vu-txqueuelen N]
 *   npm run bench -- --repeats 9         more control-plane repeats
 *   npm run bench -- --data-repeats 5    more data-path repeats (median is reported)
 *   npm run bench -- --engines auto,poll,uring   library engines to compare
 *   npm run bench -- --sizes 60,1514,gso --data-queues 1,2 --dirs write,read
 *   npm run bench -- --pin split,same    data path: where readers/writers and the read generator run:
 *                                        split (default: reader q on CPU q, generator on the other CPU),
 *                                        same (generator on the reader's CPU), none (nothing pinned);
 *                                        several: each a full set of runs, a 'pin' column in the table
 *   npm run bench -- --read-warmup-ms 0  data path reads: timed from each reader's first frame
 *                                        (default 300: from the first frame read 300 ms later, C and library alike)
 *   npm run bench -- --quiet 0.15        before each data run, wait (<= --quiet-max-s, default 300)
 *                                        until other load is below 15% of the CPUs
 *
 * Results are printed as tables and written to bench/out/*.json.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release } from 'node:os';
import { join } from 'node:path';
import type { IoEngine } from '../lib/datapath/io';
import { isolateNetns } from '../lib/sys/netns';
import { buildCControl, compareControl, type ControlRow } from './control';
import { buildPrograms, dataTable, runDataBench, type Dir, type PinMode, type Size } from './data';
import { haveTestpmd, runVhostUserBench, vhostUserTable, type VuDir, type VuTapEngine } from './vhost-user';
import { textTable } from './stats';

const ROOT = join(__dirname, '..', '..');
const SRC = join(ROOT, 'bench', 'c');
const OUT = join(ROOT, 'bench', 'out');

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}

/**
 * --read-warmup-ms: each reader, tapio and the library alike, measures from
 * the first frame it reads this long after its first one (steady state: V8
 * has compiled the library's loop by then).  0: from the first frame.  The
 * default, 300 ms, leaves out V8 compiling the reader's loop (its compiler
 * threads share the 2 CPUs with the reader and the generator) and tapio's
 * ring set-up, with room to spare: the runs are short (0.7-0.9 s of
 * measured frames here).  Writes need
 * none: the library's writer warms up before its clock starts (see measure).
 */
function readWarmupMs(): number {
  const v = Number(arg('read-warmup-ms', String(DEFAULT_READ_WARMUP_MS)));
  if (!Number.isInteger(v) || v < 0 || v > 60_000) throw new Error(`--read-warmup-ms: ${arg('read-warmup-ms', '')} is not a whole number of ms 0..60000`);
  return v;
}
const DEFAULT_READ_WARMUP_MS = 300;

function fmt(us: number): string {
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(1)} µs`;
}

function controlTable(lib: ControlRow[], c: ControlRow[]): string {
  const head = ['queues', 'create lib', 'create C', 'ratio', 'toggle lib', 'toggle C', 'ratio', 'close lib', 'close C', 'ratio'];
  const rows = lib.map((l) => {
    const k = c.find((r) => r.queues === l.queues)!;
    return [
      String(l.queues),
      fmt(l.createUs),
      fmt(k.createUs),
      `${(l.createUs / k.createUs).toFixed(2)}x`,
      fmt(l.toggleUs),
      fmt(k.toggleUs),
      `${(l.toggleUs / k.toggleUs).toFixed(2)}x`,
      fmt(l.closeUs),
      fmt(k.closeUs),
      `${(l.closeUs / k.closeUs).toFixed(2)}x`,
    ];
  });
  return textTable(head, rows);
}

function control(): void {
  const repeats = Number(arg('repeats', '5'));
  const rounds = Number(arg('rounds', '4'));
  const queues = arg('queues', '1,2,4,8,16,32,64,128,256').split(',').map(Number);
  process.stdout.write(
    `control plane: create a tap with Q queues, detach+attach each queue, close\n` +
      `(median of ${rounds} alternating rounds x ${repeats} repeats; ratio = library / C)\n`,
  );
  const { library: lib, c } = compareControl(buildCControl(OUT, SRC), queues, repeats, rounds);
  process.stdout.write(`${controlTable(lib, c)}\n`);
  const worst = Math.max(
    ...lib.map((l) => {
      const k = c.find((r) => r.queues === l.queues)!;
      return (l.createUs + l.toggleUs + l.closeUs) / (k.createUs + k.toggleUs + k.closeUs);
    }),
  );
  process.stdout.write(`worst whole-cycle ratio: ${worst.toFixed(2)}x (target <= 1.2x)\n`);
  writeFileSync(join(OUT, 'control.json'), JSON.stringify({ date: new Date().toISOString(), repeats, rounds, library: lib, c }, null, 2));
}

async function data(): Promise<void> {
  const repeats = Number(arg('data-repeats', '3'));
  const engines = arg('engines', 'auto').split(',') as Array<IoEngine | 'auto'>;
  const sizes = arg('sizes', '60,1514,gso')
    .split(',')
    .map((s) => (s === 'gso' ? 'gso' : Number(s))) as Size[];
  const queues = arg('data-queues', '1,2').split(',').map(Number);
  const dirs = arg('dirs', 'write,read').split(',') as Dir[];
  const scale = Number(arg('frames-scale', '1'));
  // About a second of measured frames per run at this VM's speeds (since 2026-12-06 08:50; before,
  // 1514 B 500,000 and GSO 50,000: 0.3 s, too short to average over this VM's swings of speed).
  const frames = { '60': Math.round(1_000_000 * scale), '1514': Math.round(1_000_000 * scale), gso: Math.round(150_000 * scale) };
  const load0 = loadavg()[0]!;
  process.stdout.write(
    `\ndata path: frames/s per implementation (sum over Q queues, one thread/process per queue)\n` +
      `(median of ${repeats} alternating repeats; lib/C = library / plain C loop, lib/x32 = library / naive C io_uring (32 per submit, blocking fd),\n` +
      ` lib/best = library / best C loop (tapio uring-mshot-drain: multishot read into a provided-buffer ring, backlogs drained with RWF_NOWAIT batches; uring-write256: 256 writes per submit),\n` +
      ` each the median over the repeats of library run r / C run r (run back to back);\n` +
      ` µs/f = CPU µs per frame of each reader/writer thread or process, median over the repeats;\n` +
      ` reads measured ${readWarmupMs() > 0 ? `after a ${readWarmupMs()} ms warm-up from each reader's first frame` : "from each reader's first frame"})\n` +
      `CPU: ${cpus()[0]?.model ?? 'unknown'}, ${cpus().length} CPUs, Linux ${release()}\n`,
  );
  const pins = arg('pin', 'split').split(',') as PinMode[];
  for (const p of pins) if (!['split', 'same', 'none'].includes(p)) throw new Error(`--pin: ${p} is not one of split, same, none`);
  const { results, uring, programs } = await runDataBench({
    outDir: OUT,
    srcDir: SRC,
    repeats,
    sizes,
    queues,
    dirs,
    engines,
    frames,
    tune: {
      ...(arg('batch', '') !== '' ? { batch: Number(arg('batch', '')) } : {}), // openQueueIO refuses what is not 1..1024
      ...(arg('write-batch', '') ? { writeBatch: Number(arg('write-batch', '')) } : {}),
      ...(arg('slot-size', '') !== '' ? { slotSize: Number(arg('slot-size', '')) } : {}),
    },
    pins,
    readWarmupMs: readWarmupMs(),
    quiet: Number(arg('quiet', '0')),
    quietMaxMs: Number(arg('quiet-max-s', '300')) * 1000,
    log: (l) => process.stderr.write(`${l}\n`),
  });
  for (const e of engines) {
    if (engines.length > 1) process.stdout.write(`\nlibrary engine: ${e}\n`);
    process.stdout.write(`${dataTable(results, e)}\n`);
  }
  if (!uring) process.stdout.write(`(C io_uring: skipped, io_uring unavailable here: ${programs.probe.error || 'no IORING_OP_READ/WRITE'})\n`);
  else if (!programs.best.read) process.stdout.write('(C best read loop: skipped, this kernel lacks IORING_OP_READ_MULTISHOT (Linux 6.7+), DEFER_TASKRUN or provided-buffer rings)\n');
  const load1 = loadavg()[0]!;
  process.stdout.write(`load average (1 min) before/after: ${load0.toFixed(2)} / ${load1.toFixed(2)} on ${cpus().length} CPUs\n`);
  writeFileSync(join(OUT, 'data.json'), JSON.stringify({ date: new Date().toISOString(), cpu: cpus()[0]?.model, kernel: release(), uring: programs.probe, repeats, frames, readWarmupMs: readWarmupMs(), pins, load: [load0, load1], results }, null, 2));
}

async function vhostUser(): Promise<void> {
  if (!haveTestpmd()) {
    process.stdout.write('vhost-user: skipped, dpdk-testpmd is not installed (apt-get install dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-net-tap23 librte-mempool-ring23)\n');
    return;
  }
  const repeats = Number(arg('vu-repeats', '3'));
  const seconds = Number(arg('vu-seconds', '5'));
  const { gen } = buildPrograms(OUT, SRC);
  process.stdout.write(
    `\nvhost-user: forwarding rate per queue pair, mqtap's backend against DPDK (testpmd net_vhost + net_tap, io forwarding);\n` +
      `guest side DPDK virtio-user (txonly / rxonly); tap->guest fed by the AF_PACKET generator; ${seconds} s windows after 2 s warm-up;\n` +
      `mqtap/DPDK = median over ${repeats} repeats of mqtap run r / DPDK run r (back to back); CPU/f = backend process utime+stime per frame\n`,
  );
  const results = await runVhostUserBench({
    cli: join(ROOT, 'dist', 'bin', 'mqtap.js'),
    gen,
    sizes: arg('vu-sizes', '60,1514').split(',').map(Number),
    pairs: arg('vu-pairs', '1').split(',').map(Number),
    dirs: arg('vu-dirs', 'guest-to-tap,tap-to-guest').split(',') as VuDir[],
    repeats,
    warmupMs: 2000,
    measureMs: seconds * 1000,
    tapEngine: arg('vu-tap-engine', 'auto') as VuTapEngine,
    ...(arg('vu-txqueuelen', '') ? { txqueuelen: Number(arg('vu-txqueuelen', '')) } : {}),
    log: (l) => process.stderr.write(`${l}\n`),
  });
  process.stdout.write(`${vhostUserTable(results)}\n`);
  writeFileSync(join(OUT, 'vhost-user.json'), JSON.stringify({ date: new Date().toISOString(), repeats, seconds, load: loadavg(), results }, null, 2));
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('bench: needs root (it creates taps in a throw-away network namespace)\n');
    process.exitCode = 4;
    return;
  }
  const only = arg('only', 'all');
  mkdirSync(OUT, { recursive: true });
  const ns = isolateNetns();
  try {
    if (only === 'all' || only === 'control') control();
    if (only === 'all' || only === 'data') await data();
    if (only === 'vhost-user') await vhostUser();
  } finally {
    ns.restore();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exitCode = 1;
});
