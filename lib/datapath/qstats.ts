/**
 * Per-queue counters of a tap whose queues someone else holds (QEMU, a
 * daemon), read from the kernel without touching the queues:
 *
 *   kernel → queue ("rx" from the queue's point of view): the device's
 *     qdiscs.  A multi-queue tap gets an `mq` root qdisc with one child per
 *     tx queue (parent :1, :2, ... = queue 0, 1, ...); each child counts
 *     the frames (and bytes) it handed to tun for that queue
 *     (RTM_GETQDISC, TCA_STATS2).  A single-queue tap's root qdisc is that
 *     one queue's.  Any other root (noqueue, or a qdisc the user installed
 *     such as htb or a plain fq_codel over all queues) has no per-queue
 *     counters: the reason is reported instead.
 *     Frames tun then drops because the queue's ring is full (its reader is
 *     slow) were still handed over, so the qdisc counts them as sent; they
 *     show up in the device's tx_dropped only.  With TSO/USO offloads on,
 *     a qdisc counts a GSO super-frame as its segments (gso_segs) and their
 *     header bytes, while the reader gets one frame.
 *
 *   queue → kernel ("tx"): tun records the queue a frame was written on in
 *     the skb (skb_record_rx_queue: queue_mapping = queue + 1) before
 *     handing it to the stack.  A tc program on the device's tcx ingress
 *     hook (lib/datapath/bpf.ts queueCountProgram) counts frames and bytes per
 *     queue_mapping in a per-CPU array and lets every frame through.  It is
 *     attached through a bpf_link (BPF_LINK_CREATE, BPF_TCX_INGRESS, Linux
 *     6.6+), first in the device's tcx chain; the attachment lives exactly
 *     as long as the link fd: close() — or the process dying, however it
 *     dies — detaches it, so nothing is left on the device.
 *     Counted: frames that reach the stack's ingress (after tun accepted
 *     them), as skbs: a GSO frame written whole counts once with all its
 *     bytes.
 *
 * Queue numbers are the kernel's slots (see lib/datapath/bpf.ts): for a tap whose
 * queues were opened in order and never disabled, slot i is queue i.
 */
import { readFileSync } from 'node:fs';
import { release } from 'node:os';
import { QUEUE_COUNT_ENTRIES, QUEUE_COUNT_VALUE_SIZE, loadProgram, queueCountProgram } from './bpf';
import { ErrorCodes, MqtapError, withContext } from '../sys/errors';
import { getTap, type LinkStats, type LookupOptions, type TapLinkInfo } from '../tap/links';
import { K, native, type RawQdisc } from '../sys/native';
import { withNetns } from '../sys/netns';

const BC = native.bpfConstants;

/** Absolute counters of one queue in one direction, since the source began counting. */
export interface QueueCount {
  /** The kernel's slot (0-based). */
  queue: number;
  frames: number;
  bytes: number;
  /** Frames the queue's qdisc dropped (rx from qdiscs only; tun's own drops are in the device's tx_dropped). */
  drops?: number;
}

// ---------------------------------------------------------------- kernel → queue: qdiscs

/** A qdisc handle or parent as tc prints it: '1:', ':1', '1:a', 'root', 'ingress'. */
export function formatTcHandle(h: number, role: 'handle' | 'parent' = 'handle'): string {
  if (role === 'parent' && h === K.TC_H_ROOT) return 'root';
  if (role === 'parent' && h === K.TC_H_INGRESS) return 'ingress';
  const major = (h >>> 16) & 0xffff;
  const minor = h & 0xffff;
  if (minor === 0) return `${major.toString(16)}:`;
  return `${major === 0 ? '' : major.toString(16)}:${minor.toString(16)}`;
}

/** What the qdiscs say per queue: counters, or why there are none. */
export type QdiscQueueCounters =
  | {
      available: true;
      /** The root qdisc, e.g. 'mq 0:'. */
      root: string;
      /** One per queue 0..numQueues-1 (a queue whose child the kernel did not report is absent). */
      queues: Array<QueueCount & { kind: string; parent: string }>;
    }
  | { available: false; root: string | null; reason: string };

/**
 * Maps a device's qdiscs (rtnlGetQdiscs) to its tx queues.  Pure: no
 * syscalls.
 *
 *   - root `mq` (any handle M:): the child with parent M:(q+1) counts queue q;
 *   - a device with one tx queue (a single-queue tap): its root qdisc counts
 *     queue 0, unless it is noqueue (which counts nothing);
 *   - anything else: unavailable, with the reason.
 */
export function mapQdiscsToQueues(qdiscs: readonly RawQdisc[], dev: { numQueues: number; numTxQueues: number }): QdiscQueueCounters {
  const root = qdiscs.find((q) => q.parent === K.TC_H_ROOT);
  if (!root) return { available: false, root: null, reason: 'the kernel reported no root qdisc for the device' };
  const kind = root.kind ?? '?';
  const rootName = `${kind} ${formatTcHandle(root.handle)}`;
  if (kind === 'noqueue')
    return { available: false, root: rootName, reason: 'the root qdisc is noqueue: frames go straight to the driver and no qdisc counts them per queue' };
  if (kind === 'mq') {
    const major = root.handle >>> 16;
    const queues: Array<QueueCount & { kind: string; parent: string }> = [];
    for (const q of qdiscs) {
      if (q === root || q.parent === K.TC_H_ROOT || q.parent >>> 16 !== major) continue;
      const minor = q.parent & 0xffff;
      if (minor < 1 || minor > dev.numQueues) continue;
      queues.push({ queue: minor - 1, frames: q.packets, bytes: q.bytes, drops: q.drops, kind: q.kind ?? '?', parent: formatTcHandle(q.parent, 'parent') });
    }
    queues.sort((a, b) => a.queue - b.queue);
    return { available: true, root: rootName, queues };
  }
  if (dev.numTxQueues === 1)
    return { available: true, root: rootName, queues: dev.numQueues >= 1 ? [{ queue: 0, frames: root.packets, bytes: root.bytes, drops: root.drops, kind, parent: 'root' }] : [] };
  return {
    available: false,
    root: rootName,
    reason: `the root qdisc is ${rootName}, not mq: one qdisc for all ${dev.numTxQueues} tx queues, so it has no per-queue counters (with the default mq root each queue has its own child qdisc)`,
  };
}

/** Every qdisc of the device (RTM_GETQDISC), in its namespace. */
export function readQdiscs(ifindex: number, opts: LookupOptions = {}): RawQdisc[] {
  return withNetns(opts.netns, () => native.rtnlGetQdiscs(ifindex));
}

// ---------------------------------------------------------------- queue → kernel: tcx counter

/**
 * The number of possible CPUs (/sys/devices/system/cpu/possible, e.g.
 * "0-3,8-11" = 8), which sizes per-CPU map values: the kernel copies one
 * value per possible CPU, back to back (for_each_possible_cpu), as libbpf's
 * libbpf_num_possible_cpus() counts them.
 */
export function possibleCpus(text: string = readFileSync('/sys/devices/system/cpu/possible', 'utf8')): number {
  let n = 0;
  for (const part of text.trim().split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m || Number(m[2] ?? m[1]) < Number(m[1])) throw new MqtapError({ op: 'CPU_POSSIBLE', code: 'ERR_MQTAP', message: `cannot parse /sys/devices/system/cpu/possible: ${JSON.stringify(text)}` });
    n += Number(m[2] ?? m[1]) - Number(m[1]) + 1;
  }
  return n;
}

/** fds owned while something is being built: closed in reverse order unless handed on. */
class FdStack {
  readonly #fds: number[] = [];
  push(fd: number): number {
    this.#fds.push(fd);
    return fd;
  }
  /** Closes every fd still held (errors while closing are ignored: the first error is the one to report). */
  closeAll(): void {
    for (let fd = this.#fds.pop(); fd !== undefined; fd = this.#fds.pop()) {
      try {
        native.close(fd);
      } catch {
        /* already reporting another error */
      }
    }
  }
  /** Closes `fd` now and stops owning it. */
  closeNow(fd: number): void {
    const i = this.#fds.lastIndexOf(fd);
    if (i >= 0) this.#fds.splice(i, 1);
    native.close(fd);
  }
  release(): void {
    this.#fds.length = 0;
  }
}

/** What the tcx counter holds: per queue (slot) frames/bytes written into the kernel, and frames with no queue recorded. */
export interface TcxCounts {
  queues: QueueCount[];
  /** Frames that reached the hook with no queue recorded (not written through a tun queue). */
  unrecorded: { frames: number; bytes: number };
}

/**
 * A per-queue counter on a device's tcx ingress hook.  Open with
 * openTcxQueueCounter(); close() detaches it (so does the process's exit).
 */
export class TcxQueueCounter {
  readonly ifname: string;
  readonly ifindex: number;
  #mapFd: number;
  #linkFd: number;
  readonly #cpus: number;
  readonly #key = Buffer.alloc(4);
  readonly #value: Buffer;

  /** @internal */
  constructor(ifname: string, ifindex: number, mapFd: number, linkFd: number, cpus: number) {
    this.ifname = ifname;
    this.ifindex = ifindex;
    this.#mapFd = mapFd;
    this.#linkFd = linkFd;
    this.#cpus = cpus;
    this.#value = Buffer.alloc(QUEUE_COUNT_VALUE_SIZE * cpus); // value_size is a multiple of 8: no per-CPU padding
  }

  get closed(): boolean {
    return this.#linkFd < 0;
  }

  #entry(key: number): { frames: number; bytes: number } {
    this.#key.writeUInt32LE(key, 0);
    if (!native.bpfMapLookupElem(this.#mapFd, this.#key, this.#value)) return { frames: 0, bytes: 0 };
    let frames = 0n;
    let bytes = 0n;
    for (let c = 0; c < this.#cpus; c++) {
      frames += this.#value.readBigUInt64LE(c * QUEUE_COUNT_VALUE_SIZE);
      bytes += this.#value.readBigUInt64LE(c * QUEUE_COUNT_VALUE_SIZE + 8);
    }
    return { frames: Number(frames), bytes: Number(bytes) };
  }

  /** Absolute counts since the counter was attached, for queues 0..queues-1 (default: all 256). */
  read(queues: number = QUEUE_COUNT_ENTRIES - 1): TcxCounts {
    if (this.closed) throw new MqtapError({ op: 'BPF_MAP_LOOKUP_ELEM', code: ErrorCodes.CLOSED, ifname: this.ifname, message: `${this.ifname}: the queue counter is closed` });
    const n = Math.max(0, Math.min(queues, QUEUE_COUNT_ENTRIES - 1));
    const out: QueueCount[] = [];
    for (let q = 0; q < n; q++) out.push({ queue: q, ...this.#entry(q + 1) });
    return { queues: out, unrecorded: this.#entry(0) };
  }

  /** Detaches the program (closes the link) and frees the map.  Harmless twice. */
  close(): void {
    if (this.closed) return;
    const link = this.#linkFd;
    const map = this.#mapFd;
    this.#linkFd = -1;
    this.#mapFd = -1;
    try {
      native.close(link);
    } finally {
      native.close(map);
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Attaches a counting program to tap `name`'s tcx ingress hook (first in
 * its chain) and returns the counter.  Every fd made on the way (map,
 * program, link) is owned from the moment it exists and closed on any
 * error; the program fd is closed once the link holds the program.
 * Throws MqtapError: e.g. EINVAL from BPF_LINK_CREATE on kernels without
 * tcx (before 6.6) — see tcxUnavailableReason().
 */
export function openTcxQueueCounter(name: string, opts: LookupOptions = {}): TcxQueueCounter {
  const link = getTap(name, opts);
  if (!link) throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: name, message: `no tap named ${name}`, hint: 'list taps with `mqtap show`' });
  const cpus = possibleCpus();
  const fds = new FdStack();
  try {
    // value_size 16 (frames, bytes); the kernel rounds per-CPU values to 8 bytes.
    const mapFd = fds.push(native.bpfMapCreate(BC.BPF_MAP_TYPE_PERCPU_ARRAY, 4, QUEUE_COUNT_VALUE_SIZE, QUEUE_COUNT_ENTRIES, 0, 'mqtap_qcount'));
    const prog = loadProgram(queueCountProgram(mapFd));
    const progFd = fds.push(prog.fd);
    const linkFd = fds.push(withNetns(opts.netns, () => native.bpfLinkCreate(progFd, link.index, BC.BPF_TCX_INGRESS, BC.BPF_F_BEFORE)));
    fds.closeNow(progFd); // the link holds the program
    const counter = new TcxQueueCounter(name, link.index, mapFd, linkFd, cpus);
    fds.release();
    return counter;
  } catch (err) {
    fds.closeAll();
    throw withContext(err, { ifname: name });
  }
}

/** Why the tcx counter could not be attached, for a person. */
export function tcxUnavailableReason(err: unknown): string {
  if (!(err instanceof MqtapError)) return `per-queue counting failed: ${String(err)}`;
  // ENOTSUPP (524) is a kernel-internal errno that leaks out of bpf(); libc has no name for it.
  const code = err.errno === 524 ? 'ENOTSUPP' : err.code;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
      return `attaching a BPF program needs CAP_BPF and CAP_NET_ADMIN (${err.op}: ${err.code})`;
    case 'ENOSYS':
      return 'this kernel has no bpf() syscall (CONFIG_BPF_SYSCALL)';
    case 'EINVAL':
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
    case 'ENOTSUPP':
    case 'E2BIG':
      return `this kernel (${release()}) does not take a tcx ingress program (tcx needs Linux 6.6+ with CONFIG_NET_XGRESS; ${err.op}: ${code})`;
    default:
      return `${err.op} failed: ${err.message}`;
  }
}

/** The ids of the programs on a device's tcx ingress hook, in order (BPF_PROG_QUERY; the ifindex is looked up in opts.netns). */
export function tcxIngressPrograms(ifindex: number, opts: LookupOptions = {}): number[] {
  return withNetns(opts.netns, () => native.bpfProgQuery(ifindex, BC.BPF_TCX_INGRESS, 64)).progIds;
}

// ---------------------------------------------------------------- both directions

/** One reading of every per-queue counter the kernel has for a tap (absolute values). */
export interface QueueCounters {
  name: string;
  /** Enabled queues (the kernel's slots 0..numQueues-1). */
  numQueues: number;
  /** Disabled queues (attached fds without a slot). */
  numDisabledQueues: number;
  /** Kernel → queue: per-queue qdisc counters, or why there are none. */
  rx: { source: 'qdisc'; root: string; queues: QueueCount[] } | { source: null; reason: string };
  /** Queue → kernel: the tcx counter, or why there is none. */
  tx: { source: 'tcx'; queues: QueueCount[]; unrecorded: { frames: number; bytes: number } } | { source: null; reason: string };
  /** Device counters (IFLA_STATS64, the device's point of view). */
  device: LinkStats | null;
}

export interface QueueStatsOptions extends LookupOptions {
  /** Attach the tcx counter (default true).  Without it queue → kernel counts are unavailable. */
  bpf?: boolean;
}

/**
 * The per-queue counters of a tap, from the kernel: qdisc counters (kernel →
 * queue) and a tcx counter it attaches (queue → kernel).  Neither touches the
 * queues or changes where frames go.  Close it to detach the counter.
 */
export class QueueStats {
  readonly name: string;
  readonly #opts: LookupOptions;
  readonly #tcx: TcxQueueCounter | undefined;
  readonly #tcxReason: string;
  /** Highest slot count seen, so slots that go away and come back keep exact counts. */
  #slots = 0;

  /** @internal */
  constructor(name: string, opts: LookupOptions, tcx: TcxQueueCounter | undefined, tcxReason: string) {
    this.name = name;
    this.#opts = opts;
    this.#tcx = tcx;
    this.#tcxReason = tcxReason;
  }

  /** Whether the tcx counter is attached (queue → kernel counts available). */
  get tcxAttached(): boolean {
    return this.#tcx !== undefined && !this.#tcx.closed;
  }

  #lookup(): TapLinkInfo {
    const link = getTap(this.name, this.#opts);
    if (!link) throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: this.name, message: `no tap named ${this.name}`, hint: 'list taps with `mqtap show`' });
    return link;
  }

  /** Reads every counter now. */
  snapshot(): QueueCounters {
    const link = this.#lookup();
    const numQueues = link.tun.numQueues;
    this.#slots = Math.max(this.#slots, numQueues);
    let rx: QueueCounters['rx'];
    try {
      const m = mapQdiscsToQueues(readQdiscs(link.index, this.#opts), { numQueues, numTxQueues: link.numTxQueues });
      rx = m.available
        ? { source: 'qdisc', root: m.root, queues: m.queues.map(({ queue, frames, bytes, drops }) => ({ queue, frames, bytes, drops: drops ?? 0 })) }
        : { source: null, reason: m.reason };
    } catch (err) {
      rx = { source: null, reason: `reading the qdiscs failed: ${(err as Error).message}` };
    }
    let tx: QueueCounters['tx'];
    if (this.#tcx && !this.#tcx.closed) {
      const c = this.#tcx.read(this.#slots);
      tx = { source: 'tcx', queues: c.queues, unrecorded: c.unrecorded };
    } else {
      tx = { source: null, reason: this.#tcxReason || 'the counter is closed' };
    }
    return { name: this.name, numQueues, numDisabledQueues: link.tun.numDisabledQueues, rx, tx, device: link.stats };
  }

  /** Detaches the tcx counter.  Harmless twice. */
  close(): void {
    this.#tcx?.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Starts reading tap `name`'s per-queue counters from the kernel.  The tcx
 * counter is probed here: when the kernel (or the caller's privileges) does
 * not allow it, queue → kernel counts are reported unavailable with the
 * reason, and kernel → queue counts still work.  Throws only when the tap
 * does not exist (ENODEV, op LOOKUP).
 */
export function openQueueStats(name: string, opts: QueueStatsOptions = {}): QueueStats {
  const lookup: LookupOptions = opts.netns !== undefined ? { netns: opts.netns } : {};
  if (!getTap(name, lookup)) throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: name, message: `no tap named ${name}`, hint: 'list taps with `mqtap show`' });
  if (opts.bpf === false) return new QueueStats(name, lookup, undefined, 'not attached (--no-bpf): mqtap attaches no counting program');
  try {
    return new QueueStats(name, lookup, openTcxQueueCounter(name, lookup), '');
  } catch (err) {
    if (err instanceof MqtapError && err.op === 'LOOKUP') throw err;
    return new QueueStats(name, lookup, undefined, tcxUnavailableReason(err));
  }
}
