/**
 * Per-queue kernel counters without the kernel (lib/datapath/qstats.ts, the rates of
 * bin/cmd-data.ts): which qdisc counts which tx queue (mq children :1..:N,
 * any mq handle, single-queue devices, roots that have no per-queue
 * counters and the reasons given), tc handle formatting, the possible-CPU
 * count that sizes per-CPU map values, and rates between two readings
 * (unavailable directions, counter resets, queues that appear).
 */
import { describe, expect, it } from 'vitest';
import { kernelRates, renderStats, type StatsSample } from '../../bin/cmd-data';
import { K, type RawQdisc } from '../../lib/sys/native';
import { MqtapError } from '../../lib/sys/errors';
import { formatTcHandle, mapQdiscsToQueues, possibleCpus, tcxUnavailableReason, type QueueCounters } from '../../lib/datapath/qstats';

function qd(kind: string, handle: number, parent: number, packets = 0, bytes = 0, drops = 0): RawQdisc {
  return { ifindex: 7, kind, handle, parent, packets, bytes, drops, overlimits: 0, requeues: 0, qlen: 0, backlog: 0 };
}

/** What a 4-queue tap reports by default: `mq 0: root` and `pfifo_fast 0: parent :1..:4` (dump order: last child first). */
function defaultMq(counts: number[]): RawQdisc[] {
  return [qd('mq', 0, K.TC_H_ROOT, counts.reduce((a, b) => a + b, 0)), ...counts.map((n, i) => qd('pfifo_fast', 0, i + 1, n, n * 100, i)).reverse()];
}

describe('mapQdiscsToQueues', () => {
  it('maps the default mq root\'s children :1..:N to queues 0..N-1', () => {
    const m = mapQdiscsToQueues(defaultMq([5, 0, 7, 1]), { numQueues: 4, numTxQueues: 256 });
    expect(m.available).toBe(true);
    if (!m.available) return;
    expect(m.root).toBe('mq 0:');
    expect(m.queues.map((q) => [q.queue, q.frames, q.bytes, q.drops, q.parent, q.kind])).toEqual([
      [0, 5, 500, 0, ':1', 'pfifo_fast'],
      [1, 0, 0, 1, ':2', 'pfifo_fast'],
      [2, 7, 700, 2, ':3', 'pfifo_fast'],
      [3, 1, 100, 3, ':4', 'pfifo_fast'],
    ]);
  });

  it('follows an mq root with its own handle (1: → children 1:1..) and ignores other majors, grandchildren and ingress', () => {
    const list = [
      qd('mq', 0x10000, K.TC_H_ROOT),
      qd('fq_codel', 0, 0x10001, 11),
      qd('htb', 0x20000, 0x10002, 22), // a classful child, with its own handle
      qd('pfifo', 0x30000, 0x20001, 999), // its grandchild: not a queue's
      qd('ingress', 0xffff0000, K.TC_H_INGRESS, 5),
      qd('pfifo_fast', 0, 0x00000003, 33), // parent :3 belongs to major 0, not to 1:
    ];
    const m = mapQdiscsToQueues(list, { numQueues: 2, numTxQueues: 256 });
    expect(m.available && m.queues.map((q) => [q.queue, q.frames, q.kind, q.parent])).toEqual([
      [0, 11, 'fq_codel', '1:1'],
      [1, 22, 'htb', '1:2'],
    ]);
  });

  it('reports only the enabled queues (children beyond numQueues are left out)', () => {
    const m = mapQdiscsToQueues(defaultMq([1, 2, 3, 4]), { numQueues: 2, numTxQueues: 256 });
    expect(m.available && m.queues.map((q) => q.queue)).toEqual([0, 1]);
  });

  it('a single-queue tap: the root qdisc is queue 0\'s', () => {
    const m = mapQdiscsToQueues([qd('pfifo_fast', 0, K.TC_H_ROOT, 9, 900)], { numQueues: 1, numTxQueues: 1 });
    expect(m.available && m.queues).toEqual([{ queue: 0, frames: 9, bytes: 900, drops: 0, kind: 'pfifo_fast', parent: 'root' }]);
  });

  it('noqueue: unavailable, because nothing counts', () => {
    for (const numTxQueues of [1, 256]) {
      const m = mapQdiscsToQueues([qd('noqueue', 0, K.TC_H_ROOT)], { numQueues: 4, numTxQueues });
      expect(m.available).toBe(false);
      if (!m.available) expect(m.reason).toMatch(/noqueue/);
    }
  });

  it('a user\'s own root qdisc over all queues of a multi-queue tap: unavailable, and says why', () => {
    const m = mapQdiscsToQueues([qd('htb', 0x10000, K.TC_H_ROOT, 50), qd('pfifo', 0x20000, 0x10001, 50)], { numQueues: 4, numTxQueues: 256 });
    expect(m.available).toBe(false);
    if (m.available) return;
    expect(m.root).toBe('htb 1:');
    expect(m.reason).toMatch(/root qdisc is htb 1:, not mq/);
    expect(m.reason).toMatch(/256 tx queues/);
  });

  it('no root at all: unavailable', () => {
    const m = mapQdiscsToQueues([], { numQueues: 4, numTxQueues: 256 });
    expect(m).toEqual({ available: false, root: null, reason: expect.stringMatching(/no root qdisc/) as unknown as string });
  });
});

describe('formatTcHandle', () => {
  it('prints handles and parents as tc does', () => {
    expect(formatTcHandle(0)).toBe('0:');
    expect(formatTcHandle(0x10000)).toBe('1:');
    expect(formatTcHandle(0x8028_0000)).toBe('8028:');
    expect(formatTcHandle(0x00000001, 'parent')).toBe(':1');
    expect(formatTcHandle(0x0000000a, 'parent')).toBe(':a');
    expect(formatTcHandle(0x00010002, 'parent')).toBe('1:2');
    expect(formatTcHandle(K.TC_H_ROOT, 'parent')).toBe('root');
    expect(formatTcHandle(K.TC_H_INGRESS, 'parent')).toBe('ingress');
  });
});

describe('possibleCpus', () => {
  it('parses /sys/devices/system/cpu/possible', () => {
    expect(possibleCpus('0\n')).toBe(1);
    expect(possibleCpus('0-1\n')).toBe(2);
    expect(possibleCpus('0-3,8-11\n')).toBe(8);
    expect(possibleCpus('0,2\n')).toBe(2);
    expect(() => possibleCpus('garbage')).toThrow(/cannot parse/);
  });

  it('reads this machine\'s file', () => {
    expect(possibleCpus()).toBeGreaterThanOrEqual(1);
  });
});

describe('tcxUnavailableReason: why the queue -> kernel counter could not be attached', () => {
  const err = (op: string, errno: number): MqtapError => new MqtapError({ op, syscall: 'bpf', errno });
  it('a kernel without tcx (EINVAL, EOPNOTSUPP, ENOTSUPP 524 from BPF_LINK_CREATE)', () => {
    expect(tcxUnavailableReason(err('BPF_LINK_CREATE', 22))).toMatch(/does not take a tcx ingress program \(tcx needs Linux 6\.6\+.*BPF_LINK_CREATE: EINVAL\)/);
    expect(tcxUnavailableReason(err('BPF_LINK_CREATE', 95))).toMatch(/tcx needs Linux 6\.6\+.*EOPNOTSUPP/);
    expect(tcxUnavailableReason(err('BPF_LINK_CREATE', 524))).toMatch(/tcx needs Linux 6\.6\+.*ENOTSUPP/);
  });
  it('privileges, no bpf(), anything else', () => {
    expect(tcxUnavailableReason(err('BPF_MAP_CREATE', 1))).toMatch(/needs CAP_BPF and CAP_NET_ADMIN \(BPF_MAP_CREATE: EPERM\)/);
    expect(tcxUnavailableReason(err('BPF_MAP_CREATE', 38))).toMatch(/no bpf\(\) syscall/);
    expect(tcxUnavailableReason(err('BPF_MAP_CREATE', 12))).toMatch(/^BPF_MAP_CREATE failed: .*ENOMEM/);
    expect(tcxUnavailableReason(new Error('boom'))).toMatch(/boom/);
  });
});

describe('kernelRates (mqtap stats, queues held elsewhere)', () => {
  const dev = { rxPackets: 0, txPackets: 0, rxBytes: 0, txBytes: 0, rxErrors: 0, txErrors: 0, rxDropped: 0, txDropped: 0 };
  const reading = (numQueues: number, rx: number[][] | string, tx: number[][] | string): QueueCounters => ({
    name: 'x0',
    numQueues,
    numDisabledQueues: 0,
    rx: typeof rx === 'string' ? { source: null, reason: rx } : { source: 'qdisc', root: 'mq 0:', queues: rx.map(([f, b, d], queue) => ({ queue, frames: f!, bytes: b!, drops: d ?? 0 })) },
    tx: typeof tx === 'string' ? { source: null, reason: tx } : { source: 'tcx', queues: tx.map(([f, b], queue) => ({ queue, frames: f!, bytes: b! })), unrecorded: { frames: 0, bytes: 0 } },
    device: dev,
  });

  it('per-queue deltas and rates in both directions', () => {
    const a = reading(2, [[10, 1000], [0, 0]], [[1, 60], [2, 120]]);
    const b = reading(2, [[30, 3000, 1], [5, 500]], [[4, 240], [2, 120]]);
    const r = kernelRates(a, b, 500);
    expect(r).toEqual([
      { queue: 0, rxFrames: 20, rxBytes: 2000, rxPps: 40, rxBps: 4000, txFrames: 3, txBytes: 180, txPps: 6, txBps: 360, rxDrops: 1 },
      { queue: 1, rxFrames: 5, rxBytes: 500, rxPps: 10, rxBps: 1000, txFrames: 0, txBytes: 0, txPps: 0, txBps: 0, rxDrops: 0 },
    ]);
  });

  it('an unavailable direction is null, the other still counts', () => {
    const a = reading(1, 'not mq', [[0, 0]]);
    const b = reading(1, 'not mq', [[3, 300]]);
    const [q] = kernelRates(a, b, 1000);
    expect(q).toMatchObject({ rxFrames: null, rxPps: null, rxDrops: null, txFrames: 3, txPps: 3 });
  });

  it('a counter that went down was reset (a qdisc replaced): it counts from 0', () => {
    const [q] = kernelRates(reading(1, [[100, 10000]], [[0, 0]]), reading(1, [[7, 700]], [[0, 0]]), 1000);
    expect(q!.rxFrames).toBe(7);
  });

  it('a queue that just appeared has no baseline yet: 0 for this interval', () => {
    const r = kernelRates(reading(1, [[1, 1]], [[1, 1]]), reading(2, [[1, 1], [50, 5000]], [[1, 1], [9, 900]]), 1000);
    expect(r[1]).toMatchObject({ queue: 1, rxFrames: 0, txFrames: 0 });
  });

  it('renders unavailable numbers as - with the reason, and both spreads', () => {
    const s: StatsSample = {
      name: 'x0',
      mode: 'kernel',
      intervalMs: 1000,
      queues: kernelRates(reading(2, 'the root qdisc is htb 1:', [[0, 0], [0, 0]]), reading(2, 'the root qdisc is htb 1:', [[1, 100], [3, 300]]), 1000),
      sources: { rx: null, tx: 'tcx ingress counter' },
      unavailable: { rx: 'the root qdisc is htb 1:' },
      device: { rxPps: 0, rxBps: 0, txPps: 4, txBps: 400, rxDroppedPerSec: 0 },
    };
    const text = renderStats(s);
    expect(text).toMatch(/^x0: 2 queue\(s\) held by another process, kernel counters over 1000 ms$/m);
    expect(text).toMatch(/^0\s+-\s+-\s+1 f\/s\s+100 B\/s\s+\|█+/m);
    expect(text).toMatch(/25% \/ 75% of written frames/);
    expect(text).toMatch(/per-queue rx unavailable: the root qdisc is htb 1:/);
    expect(text).toMatch(/sources: tx from the tcx ingress counter/);
  });
});
