/**
 * lib/datapath/frames.ts without a kernel: the Internet checksum against published
 * examples (RFC 1071, Wikipedia's IPv4 header checksum, Forouzan's UDP
 * checksum with its pseudo header), byte-exact header
 * and frame layouts, the UDP frame parser on good and malformed frames,
 * argument validation, and drainFrames over a non-blocking socketpair.
 */
import { writeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../lib/sys/errors.js';
import {
  ETHERTYPE,
  ETH_ZLEN,
  IPPROTO,
  drainFrames,
  ethernetFrame,
  ipv4Checksum,
  ipv4Header,
  ipv4PseudoHeaderSum,
  l4Checksum4,
  onesComplementSum,
  parseUdp4Frame,
  udp4Frame,
  type Udp4FrameOptions,
} from '../../lib/datapath/frames.js';
import * as lib from '../../lib/index.js';
import { native } from '../../lib/sys/native.js';
import { catchError } from '../helpers/errors.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

/** Wikipedia, "Internet checksum" / "IPv4 header checksum": the header with its checksum field zeroed, and the checksum. */
const WIKIPEDIA_HEADER = hex('4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7');
const WIKIPEDIA_CHECKSUM = 0xb861;

/** A UDP frame whose IPv4 header is Wikipedia's example (total length 0x73: 87 payload bytes). */
const WIKI_UDP: Udp4FrameOptions = {
  dstMac: '02:00:00:00:00:01',
  srcMac: '02:00:00:00:00:02',
  srcIp: '192.168.0.1',
  dstIp: '192.168.0.199',
  srcPort: 0x1234,
  dstPort: 53,
  payload: Buffer.alloc(87, 0xab),
};
const WIKI_UDP_BYTES = Buffer.concat([
  hex('020000000001 020000000002 0800'), // Ethernet: dst, src, IPv4
  hex('4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7'), // IPv4, checksum filled in
  hex('1234 0035 005f 0000'), // UDP: ports, length 8 + 87, no checksum
  Buffer.alloc(87, 0xab),
]);

function expectInvalid(fn: () => unknown, message: RegExp): void {
  const e = catchError(fn);
  expect(e.code).toBe(ErrorCodes.INVALID_ARG);
  expect(e.op).toBe('VALIDATE');
  expect(e.message).toMatch(message);
}

describe('onesComplementSum / ipv4Checksum', () => {
  it('RFC 1071 section 3 numerical example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2', () => {
    expect(onesComplementSum(hex('0001f203f4f5f6f7'))).toBe(0xddf2);
    expect(~onesComplementSum(hex('0001f203f4f5f6f7')) & 0xffff).toBe(0x220d);
  });

  it('pads an odd trailing byte with zero, adds `initial` first, folds the carries', () => {
    expect(onesComplementSum(hex('0102 03'))).toBe(0x0102 + 0x0300);
    expect(onesComplementSum(hex('ffff ffff'))).toBe(0xffff);
    expect(onesComplementSum(hex('8000 8000'))).toBe(0x0001);
    expect(onesComplementSum(hex('0001'), 0xffff)).toBe(0x0001);
    expect(onesComplementSum(hex('0001'), 0x12340000)).toBe(0x1235);
    expect(onesComplementSum(Buffer.alloc(0))).toBe(0);
    // Same result in pieces as in one go (how pseudo-header sums are used).
    const data = Buffer.from(Array.from({ length: 1001 }, (_, i) => (i * 37 + 11) & 0xff));
    expect(onesComplementSum(data.subarray(500), onesComplementSum(data.subarray(0, 500)))).toBe(onesComplementSum(data));
    // A Uint8Array that is not a Buffer, at an offset in its ArrayBuffer.
    const u8 = new Uint8Array(9);
    u8.set(hex('ff 0001f203f4f5f6f7'));
    expect(onesComplementSum(u8.subarray(1))).toBe(0xddf2);
  });

  it("Wikipedia's IPv4 header checksum example: b861, and 0 over the header that carries it", () => {
    expect(ipv4Checksum(WIKIPEDIA_HEADER)).toBe(WIKIPEDIA_CHECKSUM);
    const filled = Buffer.from(WIKIPEDIA_HEADER);
    filled.writeUInt16BE(WIKIPEDIA_CHECKSUM, 10);
    expect(ipv4Checksum(filled)).toBe(0);
    filled[8] = 63; // one hop later, unchanged checksum: no longer valid
    expect(ipv4Checksum(filled)).not.toBe(0);
  });

  it('refuses what is not bytes, and a bad initial value', () => {
    expectInvalid(() => onesComplementSum('4500' as never), /data must be a Buffer or Uint8Array \(got string\)/);
    expectInvalid(() => ipv4Checksum(null as never), /header must be a Buffer or Uint8Array \(got null\)/);
    expectInvalid(() => onesComplementSum(Buffer.alloc(2), -1), /initial must be between 0 and 4294967295/);
    expectInvalid(() => onesComplementSum(Buffer.alloc(2), 1.5), /initial must be an integer/);
  });
});

/**
 * Forouzan, "TCP/IP Protocol Suite", "Checksum calculation of a simple UDP user datagram": 153.18.8.105 ->
 * 171.2.14.10, ports 1087 -> 13, length 15, data "TESTING"; the checksum is 0x6914 (01101001 00010100).
 */
const FOROUZAN = { src: '153.18.8.105', dst: '171.2.14.10', udp: hex('043f 000d 000f 0000 54455354494e47'), checksum: 0x6914 };

describe('ipv4PseudoHeaderSum / l4Checksum4 (TCP and UDP over IPv4)', () => {
  it("Forouzan's UDP checksum example: 6914, and 0 over the datagram that carries it", () => {
    expect(l4Checksum4(FOROUZAN.src, FOROUZAN.dst, IPPROTO.UDP, FOROUZAN.udp)).toBe(FOROUZAN.checksum);
    const filled = Buffer.from(FOROUZAN.udp);
    filled.writeUInt16BE(FOROUZAN.checksum, 6);
    expect(l4Checksum4(FOROUZAN.src, FOROUZAN.dst, IPPROTO.UDP, filled)).toBe(0);
    // the pseudo header counts: another destination, the protocol or the length break it
    expect(l4Checksum4(FOROUZAN.src, '171.2.14.11', IPPROTO.UDP, filled)).not.toBe(0);
    expect(l4Checksum4(FOROUZAN.src, FOROUZAN.dst, IPPROTO.TCP, filled)).not.toBe(0);
    expect(l4Checksum4(FOROUZAN.src, FOROUZAN.dst, IPPROTO.UDP, Buffer.concat([filled, Buffer.alloc(2)]))).not.toBe(0);
  });

  it('the pseudo-header sum, by hand: addresses + protocol + length, folded, not inverted (the CHECKSUM_PARTIAL seed)', () => {
    // 9912 + 0869 + ab02 + 0e0a + 0011 + 000f = 0x1_5aa7 -> 0x5aa8
    expect(ipv4PseudoHeaderSum(FOROUZAN.src, FOROUZAN.dst, IPPROTO.UDP, 15)).toBe(0x5aa8);
    expect(ipv4PseudoHeaderSum(Buffer.from([153, 18, 8, 105]), Buffer.from([171, 2, 14, 10]), 17, 15)).toBe(0x5aa8);
    // seed + segment, inverted, is the full checksum
    expect(~onesComplementSum(FOROUZAN.udp, ipv4PseudoHeaderSum(FOROUZAN.src, FOROUZAN.dst, 17, 15)) & 0xffff).toBe(FOROUZAN.checksum);
  });

  it('refuses bad addresses, protocols, lengths and segments', () => {
    expectInvalid(() => ipv4PseudoHeaderSum('1.2.3', '1.2.3.4', 6, 20), /srcIp/);
    expectInvalid(() => ipv4PseudoHeaderSum('1.2.3.4', Buffer.alloc(16), 6, 20), /dstIp/);
    expectInvalid(() => ipv4PseudoHeaderSum('1.2.3.4', '1.2.3.5', 256, 20), /protocol must be between 0 and 255/);
    expectInvalid(() => ipv4PseudoHeaderSum('1.2.3.4', '1.2.3.5', 6, 65516), /l4Length must be between 0 and 65515/);
    expectInvalid(() => l4Checksum4('1.2.3.4', '1.2.3.5', 6, 'tcp' as never), /segment must be a Buffer or Uint8Array \(got string\)/);
  });
});

describe('ipv4Header', () => {
  it("reproduces Wikipedia's example header byte for byte, checksum included", () => {
    const h = ipv4Header({ srcIp: '192.168.0.1', dstIp: '192.168.0.199', protocol: IPPROTO.UDP, payloadLength: 0x73 - 20 });
    expect(h.toString('hex')).toBe('45000073000040004011b861c0a80001c0a800c7');
  });

  it('id, ttl, DF, protocol and addresses as bytes (a TCP header example: checksum b1e6)', () => {
    const h = ipv4Header({ srcIp: Buffer.from([172, 16, 10, 99]), dstIp: new Uint8Array([172, 16, 10, 12]), protocol: IPPROTO.TCP, payloadLength: 40, id: 0x1c46, ttl: 64 });
    expect(h.toString('hex')).toBe('4500003c1c4640004006b1e6ac100a63ac100a0c');
    const noDf = ipv4Header({ srcIp: '10.0.0.1', dstIp: '10.0.0.2', protocol: 17, payloadLength: 8, dontFragment: false, ttl: 1 });
    expect(noDf.readUInt16BE(6)).toBe(0);
    expect(noDf[8]).toBe(1);
    expect(ipv4Checksum(noDf)).toBe(0);
  });

  it('refuses bad addresses, numbers out of range and unknown options', () => {
    const ok = { srcIp: '10.0.0.1', dstIp: '10.0.0.2', protocol: 17, payloadLength: 8 };
    expectInvalid(() => ipv4Header({ ...ok, srcIp: '256.0.0.1' }), /srcIp: not a dotted-quad IPv4 address: '256.0.0.1'/);
    expectInvalid(() => ipv4Header({ ...ok, dstIp: '::1' }), /dstIp: not a dotted-quad/);
    expectInvalid(() => ipv4Header({ ...ok, dstIp: Buffer.from([10, 0, 0]) }), /dstIp: IPv4 address must be 4 bytes, got 3/);
    expectInvalid(() => ipv4Header({ ...ok, srcIp: 167772161 as never }), /srcIp must be a dotted-quad string or 4 bytes \(got 167772161\)/);
    expectInvalid(() => ipv4Header({ ...ok, protocol: 256 }), /protocol must be between 0 and 255/);
    expectInvalid(() => ipv4Header({ ...ok, payloadLength: 65516 }), /payloadLength must be between 0 and 65515/);
    expectInvalid(() => ipv4Header({ ...ok, id: 0x10000 }), /id must be between 0 and 65535/);
    expectInvalid(() => ipv4Header({ ...ok, ttl: -1 }), /ttl must be between 0 and 255/);
    expectInvalid(() => ipv4Header({ ...ok, dontFragment: 1 as never }), /dontFragment must be true or false/);
    expectInvalid(() => ipv4Header({ ...ok, tos: 0 } as never), /ipv4Header: unknown option "tos"/);
    expectInvalid(() => ipv4Header(undefined as never), /ipv4Header options must be an object/);
  });
});

describe('ethernetFrame', () => {
  it('header, payload, and zero padding to minLength', () => {
    const f = ethernetFrame({ dstMac: 'ff:ff:ff:ff:ff:ff', srcMac: Buffer.from([2, 0, 0, 0, 0xde, 3]), etherType: ETHERTYPE.LOCAL_EXPERIMENTAL, payload: Buffer.from('hi'), minLength: ETH_ZLEN });
    expect(f).toHaveLength(60);
    expect(f.subarray(0, 16).toString('hex')).toBe('ffffffffffff02000000de0388b56869');
    expect(f.subarray(16).every((b) => b === 0)).toBe(true);
    // No padding asked for, or the frame is longer anyway: exactly header + payload.
    expect(ethernetFrame({ dstMac: '02-00-00-00-00-01', srcMac: '02:00:00:00:00:02', etherType: 0x0806, payload: Buffer.alloc(28) })).toHaveLength(42);
    expect(ethernetFrame({ dstMac: '02:00:00:00:00:01', srcMac: '02:00:00:00:00:02', etherType: 0x0800, payload: Buffer.alloc(100), minLength: 60 })).toHaveLength(114);
  });

  it('refuses bad MACs, an 802.3 length for an EtherType, a payload that is not bytes', () => {
    const ok = { dstMac: '02:00:00:00:00:01', srcMac: '02:00:00:00:00:02', etherType: 0x0800, payload: Buffer.alloc(1) };
    expectInvalid(() => ethernetFrame({ ...ok, dstMac: '02:00:00:00:00' }), /dstMac must look like 52:54:00:12:34:56 \(got "02:00:00:00:00"\)/);
    expectInvalid(() => ethernetFrame({ ...ok, srcMac: Buffer.alloc(5) }), /srcMac must be 6 bytes \(got 5\)/);
    expectInvalid(() => ethernetFrame({ ...ok, etherType: 1500 }), /etherType must be between 1536 and 65535/);
    expectInvalid(() => ethernetFrame({ ...ok, payload: 'x' as never }), /payload must be a Buffer or Uint8Array/);
    expectInvalid(() => ethernetFrame({ ...ok, minLength: -1 }), /minLength must be between 0 and 65535/);
  });
});

describe('udp4Frame', () => {
  it('byte for byte: Ethernet, IPv4 (the Wikipedia header), UDP without checksum, payload', () => {
    const f = udp4Frame(WIKI_UDP);
    expect(f.toString('hex')).toBe(WIKI_UDP_BYTES.toString('hex'));
    expect(ipv4Checksum(f.subarray(14, 34))).toBe(0);
  });

  it('id, ttl and DF reach the IPv4 header; an empty payload is 42 bytes', () => {
    const f = udp4Frame({ ...WIKI_UDP, payload: Buffer.alloc(0), id: 0x1234, ttl: 5, dontFragment: false });
    expect(f).toHaveLength(42);
    expect(f.subarray(14, 34).toString('hex')).toBe('4500001c123400000511' + '2185' + 'c0a80001c0a800c7');
    expect(ipv4Checksum(f.subarray(14, 34))).toBe(0);
    expect(f.readUInt16BE(38)).toBe(8);
  });

  it('refuses bad ports, MACs, addresses, an oversized payload and unknown options', () => {
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, srcPort: 65536 }), /srcPort must be between 0 and 65535/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, dstPort: -1 }), /dstPort must be between 0 and 65535/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, dstPort: '53' as never }), /dstPort must be an integer \(got "53"\)/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, dstMac: 'zz:00:00:00:00:01' }), /dstMac must look like/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, srcMac: undefined as never }), /srcMac must look like/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, dstIp: '192.168.0' }), /dstIp: not a dotted-quad/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, payload: Buffer.alloc(65508) }), /payload is 65508 bytes; a UDP\/IPv4 payload is at most 65507/);
    expectInvalid(() => udp4Frame({ ...WIKI_UDP, srcport: 1 } as never), /udp4Frame: unknown option "srcport"/);
  });
});

describe('parseUdp4Frame', () => {
  it('reads back what udp4Frame wrote (payload copied)', () => {
    const f = udp4Frame({ ...WIKI_UDP, id: 7, ttl: 9 });
    const u = parseUdp4Frame(f)!;
    expect(u).toEqual({
      dstMac: '02:00:00:00:00:01',
      srcMac: '02:00:00:00:00:02',
      srcIp: '192.168.0.1',
      dstIp: '192.168.0.199',
      ttl: 9,
      id: 7,
      ipChecksumOk: true,
      srcPort: 0x1234,
      dstPort: 53,
      udpChecksum: 0,
      payload: Buffer.alloc(87, 0xab),
    });
    f.fill(0, 42);
    expect(u.payload.equals(Buffer.alloc(87, 0xab)), 'a copy, not a view').toBe(true);
  });

  it('skips IPv4 options, ignores Ethernet padding, reports a bad header checksum', () => {
    const payload = Buffer.from('opt');
    const plain = udp4Frame({ ...WIKI_UDP, payload });
    // Same packet with a 4-byte option (IHL 6): NOP NOP NOP EOL.
    const ip = Buffer.concat([plain.subarray(14, 34), hex('01010100')]);
    ip[0] = 0x46;
    ip.writeUInt16BE(ip.readUInt16BE(2) + 4, 2);
    ip.writeUInt16BE(0, 10);
    ip.writeUInt16BE(ipv4Checksum(ip), 10);
    const withOpts = Buffer.concat([plain.subarray(0, 14), ip, plain.subarray(34), Buffer.alloc(10)]);
    expect(parseUdp4Frame(withOpts)).toMatchObject({ ipChecksumOk: true, srcPort: 0x1234, dstPort: 53, payload });
    const bad = Buffer.from(plain);
    bad[14 + 8] ^= 1; // TTL changed, checksum not
    expect(parseUdp4Frame(bad)).toMatchObject({ ipChecksumOk: false, payload });
  });

  it('undefined for anything that is not a whole, unfragmented Ethernet/IPv4/UDP frame', () => {
    const f = udp4Frame({ ...WIKI_UDP, payload: Buffer.from('payload') });
    const edit = (fn: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(f);
      fn(b);
      return b;
    };
    expect(parseUdp4Frame(f)).toBeDefined();
    expect(parseUdp4Frame(f.subarray(0, 41)), 'shorter than the headers').toBeUndefined();
    expect(parseUdp4Frame(f.subarray(0, f.length - 1)), 'IPv4 total length beyond the frame').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(ETHERTYPE.IPV6, 12))), 'IPv6').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(ETHERTYPE.ARP, 12))), 'ARP').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => (b[14 + 9] = IPPROTO.TCP))), 'TCP').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => (b[14] = 0x65))), 'IP version 6 in an IPv4 frame').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => (b[14] = 0x44))), 'IHL below 5').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(0x2000, 14 + 6))), 'first fragment (MF)').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(0x0001, 14 + 6))), 'later fragment').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(27, 14 + 2))), 'total length too small for UDP').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(7, 38))), 'UDP length below 8').toBeUndefined();
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(8 + 8, 38))), 'UDP length beyond the IPv4 packet').toBeUndefined();
    // A shorter UDP length is honoured (the kernel trims the same way).
    expect(parseUdp4Frame(edit((b) => b.writeUInt16BE(8 + 3, 38)))?.payload.toString()).toBe('pay');
  });

  it('refuses what is not bytes', () => {
    expectInvalid(() => parseUdp4Frame([1, 2, 3] as never), /frame must be a Buffer or Uint8Array \(got object\)/);
  });
});

describe('drainFrames', () => {
  it('reads every waiting frame of a non-blocking fd, one read each, until EAGAIN; stops at end of file', () => {
    const SOCK_SEQPACKET = 5;
    const [a, b] = native.unixSocketPair(SOCK_SEQPACKET);
    let aOpen = true;
    try {
      const sent = [udp4Frame(WIKI_UDP), Buffer.from('short'), Buffer.alloc(1500, 7)];
      for (const f of sent) writeSync(a, f);
      const buf = Buffer.alloc(2048);
      const got: Buffer[] = [];
      expect(drainFrames(b, buf, (f) => void got.push(Buffer.from(f)))).toBe(3);
      expect(got).toEqual(sent);
      expect(drainFrames(b, buf, () => expect.fail('nothing is waiting'))).toBe(0);
      writeSync(a, Buffer.from('last'));
      native.close(a);
      aOpen = false;
      expect(drainFrames(b, buf, (f) => expect(f.toString()).toBe('last'))).toBe(1);
      expect(drainFrames(b, buf, () => expect.fail('end of file'))).toBe(0);
    } finally {
      native.close(b);
      if (aOpen) native.close(a);
    }
  });

  it('throws other read errors, and refuses bad arguments', () => {
    expect(() => drainFrames(2 ** 30, Buffer.alloc(64), () => undefined)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expectInvalid(() => drainFrames(-1, Buffer.alloc(64), () => undefined), /fd must be between 0 and 2147483647/);
    expectInvalid(() => drainFrames(0, Buffer.alloc(0), () => undefined), /buf must be a non-empty Buffer/);
    expectInvalid(() => drainFrames(0, Buffer.alloc(64), undefined as never), /onFrame must be a function \(got undefined\)/);
  });
});

it('is exported from the package entry point', () => {
  expect(lib.udp4Frame).toBe(udp4Frame);
  expect(lib.parseUdp4Frame).toBe(parseUdp4Frame);
  expect(lib.ipv4Checksum).toBe(ipv4Checksum);
  expect(lib.onesComplementSum).toBe(onesComplementSum);
  expect(lib.drainFrames).toBe(drainFrames);
  expect(lib.ETHERTYPE.IPV4).toBe(0x0800);
});
