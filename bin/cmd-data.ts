/**
 * Data-path commands: `mqtap stats NAME`.
 *
 * The kernel keeps a tap's counters per device only (IFLA_STATS64): tun has
 * no per-queue statistics (no `ethtool -S`, and /sys/class/net/NAME/queues/
 * holds only xps/rps settings and tx_timeout).  Per-queue counters exist
 * only in the process that reads and writes the queues (lib/io.ts
 * QueueIO.stats()).  So `mqtap stats` shows what it can honestly show:
 *
 *   - the tap has no queue attached (a persistent tap nobody uses): mqtap
 *     attaches --queues N queues itself, reads (and discards) whatever the
 *     kernel sends to them for the interval, and shows per-queue rates with
 *     a bar each: the kernel's steering spread.  Without a queue the kernel
 *     would drop those frames anyway; attaching sets the carrier on.
 *   - queues are attached by someone else: attaching more would change the
 *     steering (flows move to the new queues) and steal their frames, so
 *     mqtap shows the device counters only, and says why.
 */
import { Option, type Command } from 'commander';
import { ErrorCodes, MqtapError } from '../lib/errors';
import { openTapIO, type QueueIO, type QueueIOStats } from '../lib/io';
import { getTap, type LinkStats, type TapLinkInfo } from '../lib/links';
import { openTap, type Tap } from '../lib/tap';
import { validateIfName, validateQueueCount } from '../lib/validate';
import { EXIT, intArg, logger, netnsOpt, out, type CliContext, type GlobalOpts } from './context';

interface StatsOpts {
  watch?: boolean;
  interval: number;
  queues: number;
  json?: boolean;
  count?: number;
}

/** One queue's rates over an interval, from the queue's point of view. */
export interface QueueRate {
  queue: number;
  /** Frames/s and bytes/s the queue received (the kernel sent them out of the tap). */
  rxPps: number;
  rxBps: number;
  /** Frames/s and bytes/s the queue wrote into the kernel. */
  txPps: number;
  txBps: number;
  rxFrames: number;
  txFrames: number;
  rxDrops: number;
}

export interface StatsSample {
  name: string;
  /** 'queues': mqtap read the queues itself; 'device': per-device counters only. */
  mode: 'queues' | 'device';
  intervalMs: number;
  /** Present in 'queues' mode. */
  queues?: QueueRate[];
  /** Device rates from the queues' point of view (rx = what the kernel sent out of the tap). */
  device: { rxPps: number; rxBps: number; txPps: number; txBps: number; rxDroppedPerSec: number };
  note?: string;
}

const BAR = 32;
const EIGHTHS = ['', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

/** A horizontal bar of `width` cells for value/max (eighth-cell resolution). */
export function bar(value: number, max: number, width = BAR): string {
  if (!(max > 0) || !(value > 0)) return '';
  const cells = Math.min(width, (value / max) * width);
  const full = Math.floor(cells);
  return '█'.repeat(full) + EIGHTHS[Math.floor((cells - full) * 8)]!;
}

function human(n: number, unit: string): string {
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${(n / 1e9).toFixed(2)} G${unit}`;
  if (abs >= 1e6) return `${(n / 1e6).toFixed(2)} M${unit}`;
  if (abs >= 1e3) return `${(n / 1e3).toFixed(1)} k${unit}`;
  return `${n.toFixed(0)} ${unit}`;
}

/** The human view of a sample. */
export function renderStats(s: StatsSample): string {
  const lines: string[] = [];
  lines.push(`${s.name}: ${s.mode === 'queues' ? `${s.queues!.length} queue(s) read by mqtap` : 'device counters'} over ${s.intervalMs} ms`);
  if (s.queues) {
    const max = Math.max(...s.queues.map((q) => q.rxPps), ...s.queues.map((q) => q.txPps));
    const head = ['QUEUE', 'RX FRAMES/S', 'RX BYTES/S', 'TX FRAMES/S', 'TX BYTES/S', ''];
    const rows = s.queues.map((q) => [
      String(q.queue),
      human(q.rxPps, 'f/s'),
      human(q.rxBps, 'B/s'),
      human(q.txPps, 'f/s'),
      human(q.txBps, 'B/s'),
      `|${bar(q.rxPps + q.txPps, max > 0 ? max : 1)}`,
    ]);
    const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    const line = (r: string[]): string => r.map((c, i) => (i === 0 || i === 5 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  ').trimEnd();
    lines.push(line(head), ...rows.map(line));
    const total = s.queues.reduce((a, q) => a + q.rxPps, 0);
    if (total > 0) lines.push(`spread: ${s.queues.map((q) => `${((q.rxPps / total) * 100).toFixed(0)}%`).join(' / ')} of received frames`);
  }
  const d = s.device;
  lines.push(
    `device: rx ${human(d.rxPps, 'f/s')} ${human(d.rxBps, 'B/s')}, tx ${human(d.txPps, 'f/s')} ${human(d.txBps, 'B/s')}` +
      (d.rxDroppedPerSec > 0 ? `, ${human(d.rxDroppedPerSec, 'f/s')} dropped by the kernel (queue ring full or no queue)` : ''),
  );
  lines.push('(rx/tx from the queues\' point of view: rx = frames the kernel sent out of the tap)');
  if (s.note) lines.push(s.note);
  return lines.join('\n');
}

function sleep(ms: number, signal: { stopped: boolean; wake?: () => void }): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.wake = () => {
      clearTimeout(t);
      resolve();
    };
  });
}

function deviceRates(a: LinkStats | null, b: LinkStats | null, ms: number): StatsSample['device'] {
  const per = (x: number, y: number): number => (Math.max(0, y - x) * 1000) / ms;
  if (!a || !b) return { rxPps: 0, rxBps: 0, txPps: 0, txBps: 0, rxDroppedPerSec: 0 };
  // The kernel's tx is what the queues receive.
  return { rxPps: per(a.txPackets, b.txPackets), rxBps: per(a.txBytes, b.txBytes), txPps: per(a.rxPackets, b.rxPackets), txBps: per(a.rxBytes, b.rxBytes), rxDroppedPerSec: per(a.txDropped, b.txDropped) };
}

function queueRates(a: QueueIOStats[], b: QueueIOStats[], ms: number): QueueRate[] {
  const per = (x: number, y: number): number => ((y - x) * 1000) / ms;
  return b.map((s, i) => {
    const p = a[i]!;
    return {
      queue: s.queue,
      rxPps: per(p.rx.frames, s.rx.frames),
      rxBps: per(p.rx.bytes, s.rx.bytes),
      txPps: per(p.tx.frames, s.tx.frames),
      txBps: per(p.tx.bytes, s.tx.bytes),
      rxFrames: s.rx.frames - p.rx.frames,
      txFrames: s.tx.frames - p.tx.frames,
      rxDrops: s.rx.drops - p.rx.drops,
    };
  });
}

function lookup(name: string, g: GlobalOpts): TapLinkInfo {
  const link = getTap(name, netnsOpt(g));
  if (!link)
    throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: name, message: `no tap named ${name}`, hint: 'list taps with `mqtap show`' });
  return link;
}

/** Reads (and discards) every frame of every queue until the QueueIOs close. */
function drainAll(ios: QueueIO[]): Promise<void> {
  return Promise.all(
    ios.map(async (io) => {
      for await (const batch of io) void batch; // counted by QueueIO; frames discarded
    }),
  ).then(() => undefined);
}

async function cmdStats(name: string, o: StatsOpts, g: GlobalOpts): Promise<number> {
  validateIfName(name);
  validateQueueCount(o.queues, '--queues');
  if (o.interval < 100 || o.interval > 3_600_000) throw new MqtapError({ op: 'VALIDATE', code: ErrorCodes.INVALID_ARG, message: '--interval must be 100..3600000 ms' });
  const link = lookup(name, g);
  const inUse = link.tun.numQueues + link.tun.numDisabledQueues;
  const signal: { stopped: boolean; wake?: () => void } = { stopped: false };
  const stop = (): void => {
    signal.stopped = true;
    signal.wake?.();
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  let tap: Tap | undefined;
  let ios: QueueIO[] = [];
  let drained: Promise<void> | undefined;
  try {
    let note: string | undefined;
    if (inUse === 0) {
      if (!link.tun.multiQueue && o.queues > 1) throw new MqtapError({ op: 'VALIDATE', code: ErrorCodes.INVALID_ARG, message: `${name} is not a multi-queue tap: use --queues 1` });
      tap = openTap({ name, queues: o.queues, existing: 'require', vnetHdr: link.tun.vnetHdr, ...netnsOpt(g), logger: logger(g) });
      ios = openTapIO(tap);
      drained = drainAll(ios);
    } else {
      note =
        `per-queue counters: unavailable: ${name} has ${inUse} queue(s) attached by another process, and tun keeps counters per device only. ` +
        'Attaching queues here would change the steering and take frames away from them. Per-queue counters exist in the process that ' +
        'owns the queues (mqtap QueueIO.stats()).';
    }
    let samples = 0;
    const max = o.watch ? (o.count ?? Infinity) : 1;
    let prevDev = lookup(name, g).stats;
    let prevQ = ios.map((io) => io.stats());
    let t0 = performance.now();
    while (!signal.stopped && samples < max) {
      await sleep(o.interval, signal);
      const ms = performance.now() - t0;
      const dev = lookup(name, g).stats;
      const q = ios.map((io) => io.stats());
      const sample: StatsSample = {
        name,
        mode: ios.length ? 'queues' : 'device',
        intervalMs: Math.round(ms),
        ...(ios.length ? { queues: queueRates(prevQ, q, ms) } : {}),
        device: deviceRates(prevDev, dev, ms),
        ...(note ? { note } : {}),
      };
      samples++;
      if (g.json) out(JSON.stringify(sample));
      else if (o.watch && process.stdout.isTTY) out(`\x1b[H\x1b[2J${renderStats(sample)}`);
      else out(`${renderStats(sample)}${o.watch ? '\n' : ''}`);
      prevDev = dev;
      prevQ = q;
      t0 = performance.now();
    }
    return EXIT.OK;
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    for (const io of ios) io.close();
    await drained;
    tap?.close();
  }
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('stats')
    .description('per-queue frame and byte rates of a tap, with a bar per queue (see docs/datapath.md for what can be shown)')
    .argument('<name>', 'tap name')
    .option('-w, --watch', 'keep sampling until interrupted')
    .option('-i, --interval <ms>', 'sampling interval in milliseconds', intArg('--interval'), 1000)
    .option('-q, --queues <n>', 'queues to attach and read when the tap has none attached', intArg('--queues'), 1)
    .addOption(new Option('--count <n>', 'with --watch: stop after N samples').argParser(intArg('--count')).hideHelp())
    .option('--json', 'one JSON object per sample (a line each)')
    .addHelpText(
      'after',
      '\ntun keeps counters per device only.  When nobody has a queue of NAME attached, mqtap attaches --queues N queues itself,\n' +
        'reads and discards what the kernel sends to them, and shows per-queue rates: the kernel\'s steering spread.\n' +
        'When queues are attached elsewhere it shows the device counters and says why (attaching would change the steering).',
    )
    .action((name: string, o: StatsOpts, cmd: Command) => ctx.run(() => cmdStats(name, o, ctx.globals(cmd)), ctx.globals(cmd)));
}
