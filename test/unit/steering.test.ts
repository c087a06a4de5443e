import { describe, expect, it } from 'vitest';
import {
  MICROSOFT_RSS_KEY,
  defaultIndirectionTable,
  flowHash,
  flowHashQueue,
  rssInputIPv4,
  rssInputIPv6,
  rssQueue,
  toeplitzHash,
} from '../../lib/datapath/steering.js';
import { IPV4_VECTORS, IPV6_VECTORS } from '../helpers/rss-vectors.js';

const hex32 = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;

describe('MICROSOFT_RSS_KEY', () => {
  it('is the 40-byte key from the RSS specification', () => {
    expect(MICROSOFT_RSS_KEY.length).toBe(40);
    expect(MICROSOFT_RSS_KEY.toString('hex')).toBe(
      '6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa',
    );
  });
});

describe('toeplitzHash: Microsoft RSS verification suite', () => {
  for (const v of IPV4_VECTORS) {
    it(`IPv4 ${v.src}:${v.sport} -> ${v.dst}:${v.dport}`, () => {
      expect(hex32(toeplitzHash(MICROSOFT_RSS_KEY, rssInputIPv4(v.src, v.dst)))).toBe(hex32(v.ip));
      expect(hex32(toeplitzHash(MICROSOFT_RSS_KEY, rssInputIPv4(v.src, v.dst, v.sport, v.dport)))).toBe(
        hex32(v.tcp),
      );
    });
  }
  for (const v of IPV6_VECTORS) {
    it(`IPv6 [${v.src}]:${v.sport} -> [${v.dst}]:${v.dport}`, () => {
      expect(hex32(toeplitzHash(MICROSOFT_RSS_KEY, rssInputIPv6(v.src, v.dst)))).toBe(hex32(v.ip));
      expect(hex32(toeplitzHash(MICROSOFT_RSS_KEY, rssInputIPv6(v.src, v.dst, v.sport, v.dport)))).toBe(
        hex32(v.tcp),
      );
    });
  }
});

describe('toeplitzHash properties', () => {
  it('returns an unsigned 32-bit integer', () => {
    const h = toeplitzHash(MICROSOFT_RSS_KEY, Buffer.from([0xff, 0xff, 0xff, 0xff]));
    expect(Number.isInteger(h)).toBe(true);
    expect(h).toBeGreaterThanOrEqual(0);
    expect(h).toBeLessThanOrEqual(0xffffffff);
  });

  it('is 0 for empty or all-zero input', () => {
    expect(toeplitzHash(MICROSOFT_RSS_KEY, Buffer.alloc(0))).toBe(0);
    expect(toeplitzHash(MICROSOFT_RSS_KEY, Buffer.alloc(36))).toBe(0);
  });

  it('a single set MSB selects the first 32 key bits', () => {
    expect(toeplitzHash(MICROSOFT_RSS_KEY, Buffer.from([0x80]))).toBe(0x6d5a56da);
    // LSB of byte 0 → key bits 7..38.
    expect(toeplitzHash(MICROSOFT_RSS_KEY, Buffer.from([0x01]))).toBe(
      Number((BigInt('0x' + MICROSOFT_RSS_KEY.subarray(0, 5).toString('hex')) >> 1n) & 0xffffffffn),
    );
  });

  it('is linear over XOR (GF(2))', () => {
    const a = rssInputIPv4('10.0.0.1', '10.0.0.2', 1234, 80);
    const b = rssInputIPv4('192.168.1.9', '172.16.5.4', 40000, 443);
    const x = Buffer.from(a.map((byte, i) => byte ^ b[i]!));
    expect(toeplitzHash(MICROSOFT_RSS_KEY, x)).toBe(
      (toeplitzHash(MICROSOFT_RSS_KEY, a) ^ toeplitzHash(MICROSOFT_RSS_KEY, b)) >>> 0,
    );
  });

  it('accepts raw address bytes', () => {
    const v = IPV4_VECTORS[0];
    const raw = rssInputIPv4(Uint8Array.from([66, 9, 149, 187]), Uint8Array.from([161, 142, 100, 80]), 2794, 1766);
    expect(toeplitzHash(MICROSOFT_RSS_KEY, raw)).toBe(v.tcp);
  });

  it('rejects a key shorter than input + 4 bytes', () => {
    expect(() => toeplitzHash(Buffer.alloc(15), Buffer.alloc(12))).toThrow(RangeError);
    expect(() => toeplitzHash(Buffer.alloc(16), Buffer.alloc(12))).not.toThrow();
  });
});

describe('rssInputIPv4 / rssInputIPv6', () => {
  it('lays out src, dst, sport, dport in network order', () => {
    expect(rssInputIPv4('66.9.149.187', '161.142.100.80', 2794, 1766).toString('hex')).toBe(
      '420995bb' + 'a18e6450' + '0aea' + '06e6',
    );
    expect(rssInputIPv4('1.2.3.4', '5.6.7.8').toString('hex')).toBe('0102030405060708');
  });

  it('expands IPv6 :: and embedded IPv4', () => {
    expect(rssInputIPv6('3ffe:2501:200:1fff::7', '::').toString('hex')).toBe(
      '3ffe250102001fff0000000000000007' + '00000000000000000000000000000000',
    );
    expect(rssInputIPv6('::ffff:1.2.3.4', '1:2:3:4:5:6:7:8', 1, 2).toString('hex')).toBe(
      '00000000000000000000ffff01020304' + '00010002000300040005000600070008' + '0001' + '0002',
    );
    expect(rssInputIPv6('fe80::', '::1').subarray(0, 2).toString('hex')).toBe('fe80');
    expect(rssInputIPv6('FE80::ABCD', '::1').subarray(14, 16).toString('hex')).toBe('abcd');
  });

  it('rejects malformed addresses and ports', () => {
    for (const bad of ['1.2.3', '1.2.3.256', '01.2.3.4', 'a.b.c.d', '1.2.3.4.5', '']) {
      expect(() => rssInputIPv4(bad, '1.2.3.4'), bad).toThrow(TypeError);
    }
    for (const bad of ['1::2::3', '1:2:3:4:5:6:7:8:9', '12345::', 'fe80::1%eth0', '1:2:3:4:5:6:7', ':::']) {
      expect(() => rssInputIPv6(bad, '::1'), bad).toThrow(TypeError);
    }
    expect(() => rssInputIPv6('1:2:3:4::5:6:7:8', '::1')).toThrow(TypeError);
    expect(() => rssInputIPv4('1.2.3.4', '5.6.7.8', 80)).toThrow(/both ports/);
    expect(() => rssInputIPv4('1.2.3.4', '5.6.7.8', 80, 65536)).toThrow(RangeError);
    expect(() => rssInputIPv4(new Uint8Array(16), '5.6.7.8')).toThrow(/4 bytes/);
  });
});

describe('rssQueue', () => {
  it('indexes the table with the low-order hash bits', () => {
    const table = [7, 6, 5, 4, 3, 2, 1, 0];
    expect(rssQueue(0, table)).toBe(7);
    expect(rssQueue(9, table)).toBe(6);
    expect(rssQueue(0xffffffff, table)).toBe(0);
    expect(rssQueue(0x51ccc178, table)).toBe(table[0x51ccc178 & 7]);
    expect(rssQueue(-1, [1, 2])).toBe(2);
  });

  it('rejects tables whose length is not a power of two', () => {
    expect(() => rssQueue(1, [])).toThrow(RangeError);
    expect(() => rssQueue(1, [0, 1, 2])).toThrow(/power of two/);
  });

  it('with the default table, spreads the vectors over the queues', () => {
    const table = defaultIndirectionTable(128, 4);
    expect(table.length).toBe(128);
    expect(table.slice(0, 6)).toEqual([0, 1, 2, 3, 0, 1]);
    for (const v of IPV4_VECTORS) {
      expect(rssQueue(v.tcp, table)).toBe((v.tcp & 127) % 4);
    }
    expect(() => defaultIndirectionTable(100, 4)).toThrow(RangeError);
    expect(() => defaultIndirectionTable(128, 0)).toThrow(RangeError);
  });
});

describe('flowHash / flowHashQueue', () => {
  it('flowHash is 32-bit FNV-1a', () => {
    // Published FNV-1a 32-bit test values.
    expect(flowHash(Buffer.from(''))).toBe(0x811c9dc5);
    expect(flowHash(Buffer.from('a'))).toBe(0xe40c292c);
    expect(flowHash(Buffer.from('foobar'))).toBe(0xbf9cf968);
  });

  it('is hash % numQueues, stable per flow, within range', () => {
    const key = rssInputIPv4('169.254.0.1', '169.254.0.2', 40000, 5201);
    for (const n of [1, 2, 3, 4, 7, 8, 256]) {
      const q = flowHashQueue(key, n);
      expect(q).toBe(flowHash(key) % n);
      expect(q).toBeGreaterThanOrEqual(0);
      expect(q).toBeLessThan(n);
      expect(flowHashQueue(Buffer.from(key), n)).toBe(q);
    }
  });

  it('spreads many flows roughly evenly', () => {
    const n = 4;
    const counts = new Array<number>(n).fill(0);
    for (let port = 1024; port < 1024 + 4000; port++) {
      const q = flowHashQueue(rssInputIPv4('10.1.2.3', '10.4.5.6', port, 443), n);
      counts[q]!++;
    }
    for (const c of counts) {
      expect(c).toBeGreaterThan(800);
      expect(c).toBeLessThan(1200);
    }
  });

  it('rejects bad queue counts', () => {
    expect(() => flowHashQueue(Buffer.alloc(12), 0)).toThrow(RangeError);
    expect(() => flowHashQueue(Buffer.alloc(12), 1.5)).toThrow(RangeError);
  });
});
