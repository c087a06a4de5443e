/**
 * Data-path commands: `mqtap stats NAME`.
 *
 * tun keeps counters per device only (IFLA_STATS64): no `ethtool -S`, and
 * /sys/class/net/NAME/queues/ holds only xps/rps settings and tx_timeout.
 * Per-queue numbers come from three places, by who holds the queues:
 *
 *   - nobody (a persistent tap nobody uses): mode 'queues'.  mqtap attaches
 *     --queues N queues itself, reads (and discards) whatever the kernel
 *     sends to them, and counts per queue (lib/datapath/io.ts QueueIO.stats()): the
 *     kernel's steering spread.  Without a queue the kernel would drop those
 *     frames anyway; attaching sets the carrier on.  It detaches on exit.
 *   - another process (QEMU, a daemon): mode 'kernel'.  Attaching queues
 *     would change the steering and take frames away, so mqtap reads the
 *     kernel's own per-queue counters instead (lib/datapath/qstats.ts):
 *       rx (kernel -> queue): the device's mq root qdisc has one child qdisc
 *         per tx queue; its TCA_STATS2 counters are that queue's.
 *       tx (queue -> kernel): a counting program on the device's tcx ingress
 *         hook (a bpf_link: gone when mqtap exits, however it exits) counts
 *         by skb->queue_mapping, which tun sets to the queue written on.
 *     Either may be unavailable (a root qdisc that is not mq; a kernel
 *     without tcx, before 6.6; --no-bpf): the rows then show '-' for it and
 *     a note says why.  If both are, mode 'device': device counters only.
 *
 * Queue numbers are the kernel's slots (attach order).  --json prints one
 * StatsSample per interval (a line each); docs/cli.md describes it.
 */
import { Option, type Command } from 'commander';
import { ErrorCodes, MqtapError } from '../lib/sys/errors';
import { openTapIO, type QueueIO, type QueueIOStats } from '../lib/datapath/io';
import { getTap, type LinkStats, type TapLinkInfo } from '../lib/tap/links';
import { openQueueStats, type QueueCount, type QueueCounters, type QueueStats } from '../lib/datapath/qstats';
import { openTap, type Tap } from '../lib/tap/tap';
import { validateIfName, validateQueueCount } from '../lib/sys/validate';
import { EXIT, intArg, logger, netnsOpt, out, type CliContext, type GlobalOpts } from './context';

interface StatsOpts {
  watch?: boolean;
  interval: number;
  queues: number;
  json?: boolean;
  count?: number;
  /** --no-bpf sets false. */
  bpf: boolean;
}

/**
 * One queue's numbers over an interval, from the queue's point of view.
 * In 'kernel' mode a direction whose counters are unavailable is null.
 */
export interface QueueRate {
  queue: number;
  /** Frames/s and bytes/s the queue received (the kernel sent them out of the tap). */
  rxPps: number | null;
  rxBps: number | null;
  /** Frames/s and bytes/s the queue wrote into the kernel. */
  txPps: number | null;
  txBps: number | null;
  /** Frames and bytes in the interval. */
  rxFrames: number | null;
  rxBytes: number | null;
  txFrames: number | null;
  txBytes: number | null;
  /** 'queues': frames mqtap's read cut short; 'kernel': frames the queue's qdisc dropped. */
  rxDrops: number | null;
}

export interface StatsSample {
  name: string;
  /**
   * 'queues': mqtap attached and read the queues itself; 'kernel': the
   * queues are held elsewhere and the numbers are the kernel's (qdisc, tcx);
   * 'device': per-device counters only.
   */
  mode: 'queues' | 'kernel' | 'device';
  intervalMs: number;
  /** Present in 'queues' and 'kernel' mode. */
  queues?: QueueRate[];
  /** 'kernel' mode: where each direction's numbers come from (null: unavailable, see `unavailable`). */
  sources?: { rx: string | null; tx: string | null };
  /** 'kernel' and 'device' mode: why a direction has no per-queue numbers. */
  unavailable?: { rx?: string; tx?: string };
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

function human(n: number | null, unit: string): string {
  if (n === null) return '-';
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${(n / 1e9).toFixed(2)} G${unit}`;
  if (abs >= 1e6) return `${(n / 1e6).toFixed(2)} M${unit}`;
  if (abs >= 1e3) return `${(n / 1e3).toFixed(1)} k${unit}`;
  return `${n.toFixed(0)} ${unit}`;
}

function spread(queues: QueueRate[], pick: (q: QueueRate) => number | null, what: string): string | undefined {
  const v = queues.map((q) => pick(q) ?? 0);
  const total = v.reduce((a, x) => a + x, 0);
  if (!(total > 0)) return undefined;
  return `${v.map((x) => `${((x / total) * 100).toFixed(0)}%`).join(' / ')} of ${what}`;
}

/** The human view of a sample. */
export function renderStats(s: StatsSample): string {
  const lines: string[] = [];
  const title =
    s.mode === 'queues' ? `${s.queues!.length} queue(s) read by mqtap` : s.mode === 'kernel' ? `${s.queues!.length} queue(s) held by another process, kernel counters` : 'device counters';
  lines.push(`${s.name}: ${title} over ${s.intervalMs} ms`);
  if (s.queues) {
    const sum = (q: QueueRate): number => (q.rxPps ?? 0) + (q.txPps ?? 0);
    const max = Math.max(0, ...s.queues.map(sum));
    const head = ['QUEUE', 'RX FRAMES/S', 'RX BYTES/S', 'TX FRAMES/S', 'TX BYTES/S', ''];
    const rows = s.queues.map((q) => [
      String(q.queue),
      human(q.rxPps, 'f/s'),
      human(q.rxBps, 'B/s'),
      human(q.txPps, 'f/s'),
      human(q.txBps, 'B/s'),
      `|${bar(sum(q), max > 0 ? max : 1)}`,
    ]);
    const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    const line = (r: string[]): string => r.map((c, i) => (i === 0 || i === 5 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  ').trimEnd();
    lines.push(line(head), ...rows.map(line));
    const rx = spread(s.queues, (q) => q.rxPps, 'received frames');
    const tx = s.mode === 'kernel' ? spread(s.queues, (q) => q.txPps, 'written frames') : undefined;
    if (rx || tx) lines.push(`spread: ${[rx, tx].filter(Boolean).join('; ')}`);
  }
  const d = s.device;
  lines.push(
    `device: rx ${human(d.rxPps, 'f/s')} ${human(d.rxBps, 'B/s')}, tx ${human(d.txPps, 'f/s')} ${human(d.txBps, 'B/s')}` +
      (d.rxDroppedPerSec > 0 ? `, ${human(d.rxDroppedPerSec, 'f/s')} dropped by the kernel (queue ring full or no queue)` : ''),
  );
  lines.push('(rx/tx from the queues\' point of view: rx = frames the kernel sent out of the tap)');
  if (s.sources) {
    const src: string[] = [];
    if (s.sources.rx) src.push(`rx from the ${s.sources.rx} (a frame tun drops for a full ring still counts as sent)`);
    if (s.sources.tx) src.push(`tx from the ${s.sources.tx}`);
    if (src.length) lines.push(`sources: ${src.join('; ')}`);
  }
  if (s.unavailable?.rx) lines.push(`per-queue rx unavailable: ${s.unavailable.rx}`);
  if (s.unavailable?.tx) lines.push(`per-queue tx unavailable: ${s.unavailable.tx}`);
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
      rxBytes: s.rx.bytes - p.rx.bytes,
      txFrames: s.tx.frames - p.tx.frames,
      txBytes: s.tx.bytes - p.tx.bytes,
      rxDrops: s.rx.drops - p.rx.drops,
    };
  });
}

/** Counter growth; a counter that went down was reset (a qdisc replaced): it counted from 0 since. */
function grown(before: number | undefined, now: number): number {
  if (before === undefined) return 0; // not seen before (a queue that just appeared): no baseline yet
  return now >= before ? now - before : now;
}

/** Per-queue numbers between two kernel readings: one row per enabled queue (kernel slot) now. */
export function kernelRates(a: QueueCounters, b: QueueCounters, ms: number): QueueRate[] {
  const index = (c: QueueCounters['rx'] | QueueCounters['tx']): Map<number, QueueCount> | null =>
    c.source === null ? null : new Map(c.queues.map((q) => [q.queue, q]));
  const rxA = index(a.rx);
  const rxB = index(b.rx);
  const txA = index(a.tx);
  const txB = index(b.tx);
  const rate = (n: number): number => (n * 1000) / ms;
  const rows: QueueRate[] = [];
  for (let q = 0; q < b.numQueues; q++) {
    const rb = rxB?.get(q);
    const tb = txB?.get(q);
    const rxFrames = rb && rxA ? grown(rxA.get(q)?.frames, rb.frames) : null;
    const rxBytes = rb && rxA ? grown(rxA.get(q)?.bytes, rb.bytes) : null;
    const txFrames = tb && txA ? grown(txA.get(q)?.frames, tb.frames) : null;
    const txBytes = tb && txA ? grown(txA.get(q)?.bytes, tb.bytes) : null;
    rows.push({
      queue: q,
      rxPps: rxFrames === null ? null : rate(rxFrames),
      rxBps: rxBytes === null ? null : rate(rxBytes),
      txPps: txFrames === null ? null : rate(txFrames),
      txBps: txBytes === null ? null : rate(txBytes),
      rxFrames,
      rxBytes,
      txFrames,
      txBytes,
      rxDrops: rb && rxA ? grown(rxA.get(q)?.drops, rb.drops ?? 0) : null,
    });
  }
  return rows;
}

function noTap(name: string): MqtapError {
  return new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: name, message: `no tap named ${name}`, hint: 'list taps with `mqtap show`' });
}

function lookup(name: string, g: GlobalOpts): TapLinkInfo {
  const link = getTap(name, netnsOpt(g));
  if (!link) throw noTap(name);
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
  let baseQ: QueueIOStats[] = [];
  let drained: Promise<void> | undefined;
  let readError: unknown;
  let kstats: QueueStats | undefined;
  try {
    if (inUse === 0) {
      if (!link.tun.multiQueue && o.queues > 1) throw new MqtapError({ op: 'VALIDATE', code: ErrorCodes.INVALID_ARG, message: `${name} is not a multi-queue tap: use --queues 1` });
      tap = openTap({ name, queues: o.queues, existing: 'require', vnetHdr: link.tun.vnetHdr, ...netnsOpt(g), logger: logger(g) });
      // Counting only, on a device whose offloads this process cannot know
      // (64 KiB slots): 64 slots per queue keep each slab at 4 MiB.
      ios = openTapIO(tap, { batch: 64 });
      // The first sample's baseline, before any read: drainAll's first read
      // runs synchronously and takes whatever the queues already hold (frames
      // sent while the queues were being set up), which a baseline taken
      // after it would never count.
      baseQ = ios.map((io) => io.stats());
      // A read error (the tap deleted under us) stops the sampling and is
      // reported below, never left as an unhandled rejection.
      drained = drainAll(ios).catch((err: unknown) => {
        readError = err;
        stop();
      });
    } else {
      // Held elsewhere: read the kernel's per-queue counters (qdiscs; a tcx
      // counter this process attaches and detaches), never the queues.
      kstats = openQueueStats(name, { ...netnsOpt(g), bpf: o.bpf });
    }
    let samples = 0;
    const max = o.watch ? (o.count ?? Infinity) : 1;
    let prevDev = kstats ? undefined : lookup(name, g).stats;
    let prevQ = baseQ;
    let prevK = kstats?.snapshot();
    let t0 = performance.now();
    while (!signal.stopped && samples < max) {
      await sleep(o.interval, signal);
      const ms = performance.now() - t0;
      let sample: StatsSample;
      if (kstats && prevK) {
        const k = kstats.snapshot(); // throws ENODEV (exit 3) if the tap went away
        sample = kernelSample(name, prevK, k, ms);
        prevK = k;
      } else {
        const dev = lookup(name, g).stats;
        const q = ios.map((io) => io.stats());
        sample = { name, mode: 'queues', intervalMs: Math.round(ms), queues: queueRates(prevQ, q, ms), device: deviceRates(prevDev!, dev, ms) };
        prevDev = dev;
        prevQ = q;
      }
      samples++;
      if (g.json) out(JSON.stringify(sample));
      else if (o.watch && process.stdout.isTTY) out(`\x1b[H\x1b[2J${renderStats(sample)}`);
      else out(`${renderStats(sample)}${o.watch ? '\n' : ''}`);
      t0 = performance.now();
    }
    if (readError !== undefined) throw readError;
    return EXIT.OK;
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    kstats?.close();
    for (const io of ios) io.close();
    await drained;
    tap?.close();
  }
}

function kernelSample(name: string, a: QueueCounters, b: QueueCounters, ms: number): StatsSample {
  const device = deviceRates(a.device, b.device, ms);
  const unavailable: { rx?: string; tx?: string } = {};
  if (b.rx.source === null) unavailable.rx = b.rx.reason;
  if (b.tx.source === null) unavailable.tx = b.tx.reason;
  const held = `${b.numQueues} enabled${b.numDisabledQueues ? ` and ${b.numDisabledQueues} disabled` : ''} queue(s) attached by another process`;
  if (b.rx.source === null && b.tx.source === null)
    return { name, mode: 'device', intervalMs: Math.round(ms), unavailable, device, note: `${name} has ${held}; per-queue counters unavailable in both directions, device counters only` };
  return {
    name,
    mode: 'kernel',
    intervalMs: Math.round(ms),
    queues: kernelRates(a, b, ms),
    sources: { rx: b.rx.source === 'qdisc' ? `qdisc ${b.rx.root} children` : null, tx: b.tx.source === 'tcx' ? 'tcx ingress counter' : null },
    ...(Object.keys(unavailable).length ? { unavailable } : {}),
    device,
    ...(b.numQueues === 0 ? { note: `${name} has ${held}: no enabled queue, so no per-queue rows` } : {}),
  };
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('stats')
    .description('per-queue frame and byte rates of a tap, with a bar per queue (see docs/cli.md for where the numbers come from)')
    .argument('<name>', 'tap name')
    .option('-w, --watch', 'keep sampling until interrupted')
    .option('-i, --interval <ms>', 'sampling interval in milliseconds', intArg('--interval'), 1000)
    .option('-q, --queues <n>', 'queues to attach and read when the tap has none attached', intArg('--queues'), 1)
    .option('--no-bpf', 'queues held elsewhere: attach no counting program (per-queue tx then unavailable)')
    .addOption(new Option('--count <n>', 'with --watch: stop after N samples').argParser(intArg('--count')).hideHelp())
    .option('--json', 'one JSON object per sample (a line each)')
    .addHelpText(
      'after',
      '\ntun keeps counters per device only.  When nobody has a queue of NAME attached, mqtap attaches --queues N queues itself,\n' +
        'reads and discards what the kernel sends to them, and shows per-queue rates: the kernel\'s steering spread.\n' +
        'When queues are attached elsewhere (QEMU) it reads the kernel\'s per-queue counters without touching them:\n' +
        'rx from the per-queue child qdiscs of the mq root, tx from a counting BPF program on the tap\'s tcx ingress hook\n' +
        '(Linux 6.6+; detached when mqtap exits).  Whatever is unavailable is shown as - with the reason.',
    )
    .action((name: string, o: StatsOpts, cmd: Command) => ctx.run(() => cmdStats(name, o, ctx.globals(cmd)), ctx.globals(cmd)));
}
