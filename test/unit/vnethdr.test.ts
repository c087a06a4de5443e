import { describe, expect, it } from 'vitest';
import {
  L4_CSUM_OFFSET,
  VNET_HDR_F,
  VNET_HDR_GSO,
  VnetHdrError,
  decodeVnetHdr,
  encodeVnetHdr,
  gsoTypeName,
  validateVnetHdr,
  vnetHdrForChecksum,
  vnetHdrForTcpGso,
  type VnetHdr,
  type VnetHdrField,
  type VnetHdrSize,
} from '../../lib/datapath/vnethdr.js';
import { prng } from '../helpers/prng.js';

const SIZES: readonly VnetHdrSize[] = [10, 12];
const U16_EDGES = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x1234, 0x7fff, 0x8000, 0xfffe, 0xffff];
const VALID_FLAGS = [0, 1, 2, 4, 1 | 2, 2 | 4];
const VALID_GSO = [0, 1, 3, 4, 5, 0x81, 0x83, 0x84, 0x85];

function hdr(partial: Partial<VnetHdr> = {}): VnetHdr {
  return { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0, ...partial };
}

function expectVnetError(fn: () => unknown, field: VnetHdrField, pattern: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(VnetHdrError);
  const err = caught as VnetHdrError;
  expect(err.code).toBe('EVNETHDR');
  expect(err.field).toBe(field);
  expect(err.name).toBe('VnetHdrError');
  expect(err.message).toContain(field);
  expect(err.message).toMatch(pattern);
}

describe('constants', () => {
  it('match <linux/virtio_net.h>', () => {
    expect(VNET_HDR_F).toEqual({ NEEDS_CSUM: 1, DATA_VALID: 2, RSC_INFO: 4 });
    expect(VNET_HDR_GSO).toEqual({ NONE: 0, TCPV4: 1, UDP: 3, TCPV6: 4, UDP_L4: 5, ECN: 0x80 });
    expect(Object.isFrozen(VNET_HDR_F)).toBe(true);
    expect(Object.isFrozen(VNET_HDR_GSO)).toBe(true);
    expect(L4_CSUM_OFFSET).toEqual({ tcp: 16, udp: 6 });
  });

  it('names gso types', () => {
    expect(gsoTypeName(0)).toBe('NONE');
    expect(gsoTypeName(1)).toBe('TCPV4');
    expect(gsoTypeName(0x84)).toBe('TCPV6|ECN');
    expect(gsoTypeName(5)).toBe('UDP_L4');
    expect(gsoTypeName(2)).toBe('0x2');
  });
});

describe('encodeVnetHdr: exact byte layout', () => {
  // Hand-checked: struct virtio_net_hdr_mrg_rxbuf, all u16 little-endian.
  const tso: VnetHdr = {
    flags: VNET_HDR_F.NEEDS_CSUM,
    gsoType: VNET_HDR_GSO.TCPV4,
    hdrLen: 66, // 14 Ethernet + 20 IPv4 + 32 TCP (timestamps)
    gsoSize: 1448, // 0x05a8
    csumStart: 34, // 0x22
    csumOffset: 16, // 0x10
    numBuffers: 1,
  };

  it('12-byte TCPv4 TSO header', () => {
    expect(encodeVnetHdr(tso, 12).toString('hex')).toBe('0101' + '4200' + 'a805' + '2200' + '1000' + '0100');
  });

  it('10-byte header is the 12-byte one without num_buffers', () => {
    const { numBuffers: _ignored, ...ten } = tso;
    expect(encodeVnetHdr(ten, 10).toString('hex')).toBe('01014200a80522001000');
  });

  it('puts each field at its offset, little-endian', () => {
    const buf = encodeVnetHdr(
      {
        flags: 0x02,
        gsoType: 0x84,
        hdrLen: 0x0102,
        gsoSize: 0x0304,
        csumStart: 0x0506,
        csumOffset: 0x0708,
        numBuffers: 0x090a,
      },
      12,
    );
    expect([...buf]).toEqual([0x02, 0x84, 0x02, 0x01, 0x04, 0x03, 0x06, 0x05, 0x08, 0x07, 0x0a, 0x09]);
  });

  it('all-zero header (plain frame, no offloads)', () => {
    expect(encodeVnetHdr(hdr(), 12).equals(Buffer.alloc(12))).toBe(true);
    expect(encodeVnetHdr(hdr(), 10).equals(Buffer.alloc(10))).toBe(true);
  });

  it('UDP checksum header for a frame with one VLAN tag', () => {
    // 14 Ethernet + 4 802.1Q + 20 IPv4 = UDP header at 38 (0x26), udp check at +6.
    const h = vnetHdrForChecksum({ l4Offset: 38, protocol: 'udp' });
    expect(encodeVnetHdr(h, 10).toString('hex')).toBe('01000000000026000600');
  });

  it('IPv6 TSO with ECN', () => {
    // 14 Ethernet + 40 IPv6 = TCP at 54 (0x36); 20-byte TCP header → hdr_len 74 (0x4a); MSS 1428 (0x0594).
    const h = vnetHdrForTcpGso({ ipVersion: 6, l3Offset: 14, l4Offset: 54, tcpHdrLen: 20, mss: 1428, ecn: true });
    expect(encodeVnetHdr(h, 12).toString('hex')).toBe('01844a00940536001000' + '0000');
  });

  it('writes in place at an offset without touching neighbouring bytes', () => {
    const target = Buffer.alloc(32, 0xee);
    const out = encodeVnetHdr(tso, 12, target, 5);
    expect(out).toBe(target);
    expect(target.subarray(0, 5).every((b) => b === 0xee)).toBe(true);
    expect(target.subarray(17).every((b) => b === 0xee)).toBe(true);
    expect(target.subarray(5, 17).toString('hex')).toBe('01014200a80522001000' + '0100');
  });
});

describe('decodeVnetHdr', () => {
  it('decodes the hand-checked vector', () => {
    const buf = Buffer.from('01014200a80522001000' + '0100', 'hex');
    expect(decodeVnetHdr(buf, 12)).toEqual({
      flags: 1,
      gsoType: 1,
      hdrLen: 66,
      gsoSize: 1448,
      csumStart: 34,
      csumOffset: 16,
      numBuffers: 1,
    });
    const ten = decodeVnetHdr(buf, 10);
    expect(ten).not.toHaveProperty('numBuffers');
    expect(ten.gsoSize).toBe(1448);
  });

  it('decodes at an offset', () => {
    const buf = Buffer.concat([Buffer.from([0xff, 0xff, 0xff]), Buffer.from('0200000000000000000005000000', 'hex')]);
    expect(decodeVnetHdr(buf, 12, 3)).toEqual(hdr({ flags: 2, numBuffers: 5 }));
  });
});

describe('round trips (property style)', () => {
  it('exhaustive over flags × gso types × edge field values × sizes', () => {
    let count = 0;
    for (const size of SIZES) {
      for (const flags of VALID_FLAGS) {
        for (const gsoType of VALID_GSO) {
          for (const v of U16_EDGES) {
            const h = hdr({
              flags,
              gsoType,
              hdrLen: v,
              gsoSize: gsoType === 0 ? v : Math.max(1, v),
              csumStart: 0xffff - v,
              csumOffset: v ^ 0x5a5a,
            });
            if (size === 12) h.numBuffers = v;
            const enc = encodeVnetHdr(h, size);
            expect(enc.length).toBe(size);
            expect(decodeVnetHdr(enc, size)).toEqual(h);
            count++;
          }
        }
      }
    }
    expect(count).toBe(2 * VALID_FLAGS.length * VALID_GSO.length * U16_EDGES.length);
  });

  it('random valid headers survive encode → decode at random offsets', () => {
    const rnd = prng(0xc0ffee);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const u16 = (): number => Math.floor(rnd() * 0x10000);
    for (let i = 0; i < 5000; i++) {
      const size = pick(SIZES);
      const gsoType = pick(VALID_GSO);
      const h = hdr({
        flags: pick(VALID_FLAGS),
        gsoType,
        hdrLen: u16(),
        gsoSize: gsoType === 0 ? u16() : 1 + Math.floor(rnd() * 0xffff),
        csumStart: u16(),
        csumOffset: u16(),
      });
      if (size === 12) h.numBuffers = u16();
      const offset = Math.floor(rnd() * 8);
      const target = Buffer.alloc(offset + size + Math.floor(rnd() * 4));
      encodeVnetHdr(h, size, target, offset);
      expect(decodeVnetHdr(target, size, offset)).toEqual(h);
      expect(encodeVnetHdr(h, size).equals(target.subarray(offset, offset + size))).toBe(true);
    }
  });

  it('random bytes either decode and re-encode identically, or throw VnetHdrError', () => {
    const rnd = prng(42);
    let ok = 0;
    let bad = 0;
    for (let i = 0; i < 5000; i++) {
      const bytes = Buffer.from(Array.from({ length: 12 }, () => Math.floor(rnd() * 256)));
      // Bias the two 8-bit fields toward valid values so both outcomes occur.
      if (rnd() < 0.6) bytes[0] = VALID_FLAGS[bytes[0]! % VALID_FLAGS.length]!;
      if (rnd() < 0.6) bytes[1] = VALID_GSO[bytes[1]! % VALID_GSO.length]!;
      for (const size of SIZES) {
        try {
          const h = decodeVnetHdr(bytes, size);
          expect(encodeVnetHdr(h, size).equals(bytes.subarray(0, size))).toBe(true);
          ok++;
        } catch (err) {
          expect(err).toBeInstanceOf(VnetHdrError);
          bad++;
        }
      }
    }
    expect(ok).toBeGreaterThan(1000);
    expect(bad).toBeGreaterThan(1000);
  });
});

describe('malformed headers → VnetHdrError naming the field', () => {
  it('buffer too short (decode and encode target)', () => {
    expectVnetError(() => decodeVnetHdr(Buffer.alloc(11), 12), 'buffer', /too short: need 12 bytes at offset 0, have 11/);
    expectVnetError(() => decodeVnetHdr(Buffer.alloc(12), 10, 3), 'buffer', /need 10 bytes at offset 3, have 9/);
    expectVnetError(() => decodeVnetHdr(Buffer.alloc(4), 10, 9), 'buffer', /have 0/);
    expectVnetError(() => encodeVnetHdr(hdr(), 12, Buffer.alloc(12), 1), 'buffer', /too short/);
    expectVnetError(() => decodeVnetHdr(Buffer.alloc(12), 10, -1), 'buffer', /offset/);
  });

  it('bad header size', () => {
    expectVnetError(() => decodeVnetHdr(Buffer.alloc(20), 11 as VnetHdrSize), 'size', /10 or 12/);
    expectVnetError(() => encodeVnetHdr(hdr(), 20 as VnetHdrSize), 'size', /10 or 12/);
  });

  it('unknown flag bits', () => {
    for (const flags of [8, 0x10, 0x80, 0xff, 1 | 8]) {
      const buf = Buffer.alloc(12);
      buf[0] = flags;
      expectVnetError(() => decodeVnetHdr(buf, 12), 'flags', /unknown flag bits/);
    }
  });

  it('NEEDS_CSUM together with RSC_INFO', () => {
    expectVnetError(
      () => validateVnetHdr(hdr({ flags: VNET_HDR_F.NEEDS_CSUM | VNET_HDR_F.RSC_INFO }), 12),
      'flags',
      /mutually exclusive/,
    );
  });

  it('unknown gso_type', () => {
    for (const gsoType of [2, 6, 7, 0x20, 0x40, 0x7f, 0x82, 0xff]) {
      const buf = encodeVnetHdr(hdr({ gsoType, gsoSize: 1000 }), 10);
      expectVnetError(() => decodeVnetHdr(buf, 10), 'gsoType', /unknown GSO type/);
    }
  });

  it('ECN bit without a GSO type', () => {
    const buf = encodeVnetHdr(hdr({ gsoType: VNET_HDR_GSO.ECN }), 10);
    expectVnetError(() => decodeVnetHdr(buf, 10), 'gsoType', /ECN/);
  });

  it('GSO type with gso_size 0', () => {
    for (const gsoType of [1, 3, 4, 5, 0x81, 0x84]) {
      const buf = encodeVnetHdr(hdr({ gsoType, gsoSize: 0, flags: 1, csumStart: 34, csumOffset: 16 }), 12);
      expectVnetError(() => decodeVnetHdr(buf, 12), 'gsoSize', /is 0 but gso_type is/);
    }
  });

  it('NEEDS_CSUM checksum field beyond the frame', () => {
    const h = vnetHdrForChecksum({ l4Offset: 34, protocol: 'tcp' }); // needs 34 + 16 + 2 = 52 bytes
    const buf = encodeVnetHdr(h, 12);
    expect(() => decodeVnetHdr(buf, 12, 0, { frameLength: 52 })).not.toThrow();
    expectVnetError(() => decodeVnetHdr(buf, 12, 0, { frameLength: 51 }), 'csumStart', /= 52 .*frame length 51/);
    // Without NEEDS_CSUM the csum fields are not checked against the frame.
    const dataValid = encodeVnetHdr(hdr({ flags: VNET_HDR_F.DATA_VALID, csumStart: 9999 }), 12);
    expect(() => decodeVnetHdr(dataValid, 12, 0, { frameLength: 60 })).not.toThrow();
  });

  it('hdr_len beyond the frame', () => {
    const h = vnetHdrForTcpGso({ ipVersion: 4, l3Offset: 14, l4Offset: 34, tcpHdrLen: 32, mss: 1448 });
    const buf = encodeVnetHdr(h, 12);
    expect(() => decodeVnetHdr(buf, 12, 0, { frameLength: 66 })).not.toThrow();
    expectVnetError(() => decodeVnetHdr(buf, 12, 0, { frameLength: 65 }), 'hdrLen', /66 exceeds the frame length 65/);
  });

  it('num_buffers 0 in a received 12-byte frame (only when asked)', () => {
    const buf = encodeVnetHdr(hdr(), 12);
    expect(() => decodeVnetHdr(buf, 12)).not.toThrow();
    expectVnetError(() => decodeVnetHdr(buf, 12, 0, { received: true }), 'numBuffers', /is 0 in a received frame/);
    expect(() => decodeVnetHdr(buf, 10, 0, { received: true })).not.toThrow();
    expect(decodeVnetHdr(encodeVnetHdr(hdr({ numBuffers: 3 }), 12), 12, 0, { received: true }).numBuffers).toBe(3);
  });

  it('unrepresentable values on encode', () => {
    expectVnetError(() => encodeVnetHdr(hdr({ flags: 256 }), 10), 'flags', /0\.\.255/);
    expectVnetError(() => encodeVnetHdr(hdr({ gsoType: -1 }), 10), 'gsoType', /0\.\.255/);
    expectVnetError(() => encodeVnetHdr(hdr({ hdrLen: 0x10000 }), 10), 'hdrLen', /0\.\.65535/);
    expectVnetError(() => encodeVnetHdr(hdr({ gsoSize: 1.5 }), 10), 'gsoSize', /integer/);
    expectVnetError(() => encodeVnetHdr(hdr({ csumStart: Number.NaN }), 10), 'csumStart', /NaN/);
    expectVnetError(() => encodeVnetHdr(hdr({ csumOffset: 70000 }), 10), 'csumOffset', /70000/);
    expectVnetError(() => encodeVnetHdr(hdr({ numBuffers: 0x10000 }), 12), 'numBuffers', /65535/);
    expectVnetError(() => encodeVnetHdr(hdr({ numBuffers: 2 }), 10), 'numBuffers', /10-byte header/);
  });

  it('error message format', () => {
    expectVnetError(
      () => decodeVnetHdr(encodeVnetHdr(hdr({ gsoType: 1 }), 10), 10),
      'gsoSize',
      /^invalid virtio-net header: gsoSize \(gso_size\) is 0 but gso_type is TCPV4/,
    );
  });
});

describe('vnetHdrForChecksum', () => {
  it('matches virtio_net_hdr_from_skb for CHECKSUM_PARTIAL TCP/UDP', () => {
    expect(vnetHdrForChecksum({ l4Offset: 34, protocol: 'tcp' })).toEqual(
      hdr({ flags: VNET_HDR_F.NEEDS_CSUM, csumStart: 34, csumOffset: 16 }),
    );
    expect(vnetHdrForChecksum({ l4Offset: 54, protocol: 'udp' })).toEqual(
      hdr({ flags: VNET_HDR_F.NEEDS_CSUM, csumStart: 54, csumOffset: 6 }),
    );
  });

  it('rejects impossible offsets', () => {
    expect(() => vnetHdrForChecksum({ l4Offset: -1, protocol: 'tcp' })).toThrow(RangeError);
    expect(() => vnetHdrForChecksum({ l4Offset: 0xffff, protocol: 'udp' })).toThrow(/l4Offset/);
  });
});

describe('vnetHdrForTcpGso', () => {
  it('IPv4: csum_start = TCP offset, csum_offset 16, hdr_len = all headers', () => {
    expect(vnetHdrForTcpGso({ ipVersion: 4, l3Offset: 14, l4Offset: 34, tcpHdrLen: 20, mss: 1460 })).toEqual({
      flags: VNET_HDR_F.NEEDS_CSUM,
      gsoType: VNET_HDR_GSO.TCPV4,
      hdrLen: 54,
      gsoSize: 1460,
      csumStart: 34,
      csumOffset: 16,
    });
  });

  it('IPv4 with options and VLAN tag, ECN', () => {
    const h = vnetHdrForTcpGso({ ipVersion: 4, l3Offset: 18, l4Offset: 42, tcpHdrLen: 40, mss: 1000, ecn: true });
    expect(h.gsoType).toBe(VNET_HDR_GSO.TCPV4 | VNET_HDR_GSO.ECN);
    expect(h.csumStart).toBe(42);
    expect(h.hdrLen).toBe(82);
  });

  it('IPv6', () => {
    const h = vnetHdrForTcpGso({ ipVersion: 6, l3Offset: 14, l4Offset: 54, tcpHdrLen: 32, mss: 1428 });
    expect(h.gsoType).toBe(VNET_HDR_GSO.TCPV6);
    expect(h.hdrLen).toBe(86);
    expect(h.gsoSize).toBe(1428);
  });

  it('produces headers that validate against a 64 KB frame', () => {
    for (const ipVersion of [4, 6] as const) {
      for (const tcpHdrLen of [20, 32, 60]) {
        for (const mss of [1, 536, 1448, 9000, 65535]) {
          const l4Offset = 14 + (ipVersion === 4 ? 20 : 40);
          const h = vnetHdrForTcpGso({ ipVersion, l3Offset: 14, l4Offset, tcpHdrLen, mss });
          expect(() => validateVnetHdr(h, 12, { frameLength: 65535 })).not.toThrow();
          expect(decodeVnetHdr(encodeVnetHdr(h, 10), 10, 0, { frameLength: h.hdrLen })).toEqual(h);
        }
      }
    }
  });

  it('rejects inconsistent arguments', () => {
    const ok = { ipVersion: 4, l3Offset: 14, l4Offset: 34, tcpHdrLen: 20, mss: 1460 } as const;
    expect(() => vnetHdrForTcpGso({ ...ok, l4Offset: 33 })).toThrow(/l4Offset/);
    expect(() => vnetHdrForTcpGso({ ...ok, ipVersion: 6 })).toThrow(/l4Offset/);
    expect(() => vnetHdrForTcpGso({ ...ok, tcpHdrLen: 18 })).toThrow(/tcpHdrLen/);
    expect(() => vnetHdrForTcpGso({ ...ok, tcpHdrLen: 22 })).toThrow(/multiple of 4/);
    expect(() => vnetHdrForTcpGso({ ...ok, tcpHdrLen: 64 })).toThrow(/tcpHdrLen/);
    expect(() => vnetHdrForTcpGso({ ...ok, mss: 0 })).toThrow(/mss/);
    expect(() => vnetHdrForTcpGso({ ...ok, mss: 65536 })).toThrow(/mss/);
    expect(() => vnetHdrForTcpGso({ ...ok, ipVersion: 5 as 4 })).toThrow(/ipVersion/);
  });
});
