/**
 * The benchmarks' shared helpers (bench/stats.ts) and the frames bench/data.ts
 * writes (their checksums now come from lib/datapath/frames.ts), without a
 * kernel.
 */
import { describe, expect, it } from 'vitest';
import { benchFrame } from '../../bench/data';
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
