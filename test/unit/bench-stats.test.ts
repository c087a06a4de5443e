/**
 * The benchmarks' shared helpers (bench/stats.ts) and the frames bench/data.ts
 * writes (their checksums now come from lib/datapath/frames.ts), without a
 * kernel.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { benchFrame, C_BEST_WRITE_BATCH, dataTable, libraryWriteBatch, pairedRatio, readClock, tapioMode, type DataResult, type Impl, type PinMode } from '../../bench/data';
import { median, textTable } from '../../bench/stats';
import { IPPROTO, ipv4Checksum, ipv4PseudoHeaderSum } from '../../lib/datapath/frames';

describe('median', () => {
  it('the middle value, the mean of the two middle ones, NaN for none; the input is not reordered', () => {
    const xs = [5, 1, 4];
    expect(median(xs)).toBe(4);
    expect(xs).toEqual([5, 1, 4]);
    expect(median([10, 2, 4, 8])).toBe(6);
    expect(median([7])).toBe(7);
    expect(median([])).toBeNaN();
  });
});

describe('textTable', () => {
  it('aligns columns two spaces apart: label columns to the left, the rest to the right', () => {
    expect(textTable(['q', 'pps'], [['1', '12 k'], ['16', '1.20 M']])).toBe([' q     pps', ' 1    12 k', '16  1.20 M'].join('\n'));
    expect(textTable(['dir', 'pps'], [['read', '5'], ['w', '10']], 1)).toBe(['dir   pps', 'read    5', 'w      10'].join('\n'));
  });
});

describe('benchFrame', () => {
  const HDR = 12;
  it('a UDP frame with a valid IPv4 header checksum, the source port naming the flow', () => {
    const f = benchFrame(60, 3);
    expect(f.length).toBe(HDR + 60);
    const ip = f.subarray(HDR + 14, HDR + 34);
    expect(ip[9]).toBe(IPPROTO.UDP);
    expect(ipv4Checksum(ip)).toBe(0);
    expect(f.readUInt16BE(HDR + 34)).toBe(40003);
  });
  it('the 64 KB TCPv4 GSO frame: valid IPv4 checksum, the pseudo-header sum in the TCP check field (CHECKSUM_PARTIAL), NEEDS_CSUM + TCPV4', () => {
    const f = benchFrame('gso');
    const ip = f.subarray(HDR + 14, HDR + 34);
    expect(ipv4Checksum(ip)).toBe(0);
    const tcpLen = ip.readUInt16BE(2) - 20;
    expect(tcpLen).toBe(20 + 45 * 1448);
    expect(f.readUInt16BE(HDR + 34 + 16)).toBe(ipv4PseudoHeaderSum('169.254.77.1', '169.254.77.2', IPPROTO.TCP, tcpLen));
    expect([f[0], f[1], f.readUInt16LE(4)]).toEqual([1, 1, 1448]);
  });
});

describe('data table: the C baselines side by side', () => {
  const run = (impl: Impl, pps: number[], pin: PinMode = 'split', engineReq?: string): DataResult =>
    ({
      impl,
      ...(engineReq ? { engineReq, engine: 'uring/uring' } : {}),
      dir: 'read',
      size: 60,
      queues: 1,
      pin,
      perQueue: [{ pps: pps[0]!, gbps: 0, cpuUsPerFrame: 0.5, frames: 1 }],
      pps: pps[0]!,
      gbps: 0,
      repeats: pps.length,
      ppsAll: pps,
      cpuUsPerFrame: 0.5,
      cpuAll: pps.map(() => 0.5),
    }) as DataResult;

  it("the library reader's clock (as tapio's read_clock): the first batch only starts it; with a warm-up, the first batch that long after the first one does", () => {
    const cold = readClock(0);
    expect([cold.tick(5), cold.tick(5.1), cold.tick(9)]).toEqual(['start', 'count', 'count']);
    expect(cold.measuring).toBe(true);
    const warm = readClock(300);
    expect([warm.tick(1000), warm.tick(1100), warm.tick(1299.9)]).toEqual(['skip', 'skip', 'skip']);
    expect(warm.measuring).toBe(false);
    expect([warm.tick(1300), warm.tick(1300), warm.tick(5000)]).toEqual(['start', 'count', 'count']);
  });

  it('tapio modes: best = uring-mshot-drain (reads) / uring-write256 (writes); naive io_uring and plain loops kept', () => {
    expect(tapioMode('c-best', 'read')).toBe('uring-mshot-drain');
    expect(tapioMode('c-best', 'write')).toBe('uring-write256');
    expect(tapioMode('c-uring', 'read')).toBe('uring-read');
    expect(tapioMode('c-plain', 'write')).toBe('write');
    expect(tapioMode('c-batch', 'read')).toBe('uring-batch');
    expect(() => tapioMode('c-batch', 'write')).toThrow(/read loop/);
  });

  it('the batched one-shot C read loop gets its own paired column (lib/batch) and CPU per frame', () => {
    const lib = run('library', [1000, 2000], 'split', 'auto');
    const t = dataTable([lib, run('c-best', [2000, 2000]), { ...run('c-batch', [4000, 4000]), cpuUsPerFrame: 0.25 } as DataResult]);
    const [head, row] = t.split('\n') as [string, string];
    expect(head).toMatch(/C batch pps\s+lib\/batch\s+batch µs\/f/);
    const cells = row.trim().split(/\s{2,}/);
    expect(cells.slice(-3)).toEqual(['4 k', '0.38x', '0.250']); // lib/batch: median of 1000/4000 and 2000/4000
  });

  it('fair pairing for writes: the library writer passes as many frames per writeBatch as the best C loop submits per enter', () => {
    const src = readFileSync(join(__dirname, '../../bench/c/tapio.c'), 'utf8');
    const m = /#define URING_BEST_WRITE_BATCH (\d+)/.exec(src);
    expect(m, 'URING_BEST_WRITE_BATCH in tapio.c').not.toBeNull();
    expect(C_BEST_WRITE_BATCH).toBe(Number(m![1]));
    // The default is that batch whatever the receive batch (--batch); --write-batch overrides it.
    expect(libraryWriteBatch()).toBe(C_BEST_WRITE_BATCH);
    expect(libraryWriteBatch({})).toBe(256);
    expect(libraryWriteBatch({ writeBatch: 64 })).toBe(64);
    expect(() => libraryWriteBatch({ writeBatch: 0 })).toThrow(/--write-batch: 0/);
    expect(() => libraryWriteBatch({ writeBatch: Number('x') })).toThrow(/--write-batch: NaN/);
  });

  it('lib / best C and lib / naive C io_uring x32 are paired ratios; a pin column appears when placements differ', () => {
    const lib = run('library', [1000, 2000], 'split', 'auto');
    const t = dataTable([lib, run('c-plain', [500, 500]), run('c-uring', [1000, 1000]), run('c-best', [2000, 2000])]);
    const [head, row] = t.split('\n') as [string, string];
    expect(head).toMatch(/C uring x32 pps\s+lib\/x32\s+C best pps\s+lib\/best/);
    expect(head).not.toMatch(/\bpin\b/);
    const cells = row.trim().split(/\s{2,}/);
    expect(cells).toContain('1.50x'); // lib/x32: median of 1000/1000 and 2000/1000
    expect(cells).toContain('0.75x'); // lib/best: median of 1000/2000 and 2000/2000
    expect(cells).toContain('3.00x'); // lib/C
    expect(pairedRatio(lib, run('c-best', [2000, 2000]))).toBeCloseTo(0.75);
    const both = dataTable([lib, run('library', [900], 'same', 'auto'), run('c-best', [1000], 'same')]);
    expect(both.split('\n')[0]).toMatch(/\bpin\b/);
    expect(both.split('\n')).toHaveLength(3);
  });
});
