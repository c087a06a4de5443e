/**
 * Ethernet / IPv4 / UDP frames, byte for byte: the Internet checksum, header
 * and frame builders, a UDP frame parser, and a reader that drains a
 * non-blocking queue fd.  For tests, self-tests and diagnostics that write
 * hand-made frames to a tap queue and look at what the kernel sends back; the
 * batched data path itself is lib/datapath/io.ts.
 *
 * Layouts (no VLAN tag, no frame check sequence; all fields network order):
 *
 * ```
 * Ethernet (14)  0 dst MAC (6)   6 src MAC (6)   12 EtherType (2)
 * IPv4 (20)      0 version 4, IHL 5 (0x45)   1 TOS   2 total length
 *                4 identification   6 flags (0x4000 = DF) + fragment offset
 *                8 TTL   9 protocol (17 = UDP)   10 header checksum
 *               12 source address (4)   16 destination address (4)
 * UDP (8)        0 source port   2 destination port   4 length (8 + payload)
 *                6 checksum (0: none, which RFC 768 allows over IPv4)
 * ```
 *
 * A virtio-net header, when the queue has one, goes before all this: prefix
 * `Buffer.alloc(hdrLen)` (or see lib/datapath/vnethdr.ts).  Builders validate their
 * arguments before building anything and throw an `MqtapError` with code
 * `ERR_INVALID_ARG`, as the rest of the library does.
 *
 * @module
 */
import { readSync } from 'node:fs';
import { invalidArg } from '../sys/errors';
import { addressBytes, type IpAddress } from './steering';
import { formatMac, macBytes, rejectUnknownKeys, show, validateBoolean, validateInt } from '../sys/validate';

/** EtherType values used by this package's frames (IEEE 802 numbers). */
export const ETHERTYPE = Object.freeze({
  IPV4: 0x0800,
  ARP: 0x0806,
  IPV6: 0x86dd,
  /** IEEE 802 "local experimental" EtherType 1: for frames no stack should take. */
  LOCAL_EXPERIMENTAL: 0x88b5,
} as const);

/** IP protocol numbers (IANA) used here. */
export const IPPROTO = Object.freeze({ ICMP: 1, TCP: 6, UDP: 17, ICMPV6: 58 } as const);

/** Header sizes: Ethernet (ETH_HLEN), IPv4 without options, UDP. */
export const ETH_HLEN = 14;
export const IPV4_HLEN = 20;
export const UDP_HLEN = 8;
/** The shortest Ethernet frame without its FCS (ETH_ZLEN). */
export const ETH_ZLEN = 60;

/** A MAC address as text ('02:00:00:00:00:01', any unicast/multicast/broadcast) or as its 6 bytes. */
export type MacAddress = string | Uint8Array;
export type { IpAddress };

/** A Buffer over the same bytes (no copy). */
function bufferOf(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function bytesArg(value: unknown, what: string): Buffer {
  if (!(value instanceof Uint8Array)) throw invalidArg(`${what} must be a Buffer or Uint8Array (got ${value === null ? 'null' : typeof value})`);
  return bufferOf(value);
}

function macArg(mac: unknown, what: string): Buffer {
  if (mac instanceof Uint8Array) {
    if (mac.length !== 6) throw invalidArg(`${what} must be 6 bytes (got ${mac.length})`);
    return Buffer.from(mac);
  }
  return macBytes(mac, what);
}

function ipv4Arg(addr: unknown, what: string): Buffer {
  if (typeof addr !== 'string' && !(addr instanceof Uint8Array)) throw invalidArg(`${what} must be a dotted-quad string or 4 bytes (got ${show(addr)})`);
  try {
    return addressBytes(addr, 4);
  } catch (err) {
    throw invalidArg(`${what}: ${(err as Error).message}`, "an IPv4 address such as '169.254.0.1'");
  }
}

/** An options object with no key outside `known` (a misspelt option is an error, not a default). */
function checkOptions(opts: unknown, what: string, known: readonly string[]): void {
  if (typeof opts !== 'object' || opts === null) throw invalidArg(`${what} options must be an object (got ${show(opts)})`);
  rejectUnknownKeys(opts, known, what);
}

/**
 * The 16-bit ones' complement sum of `data` (RFC 1071), folded to 16 bits and
 * not inverted: the building block of the IPv4, UDP and TCP checksums.  An
 * odd trailing byte counts as its high half (padded with a zero byte).
 * `initial` is added first (e.g. a pseudo-header sum); it may be any
 * non-negative integer below 2^32.
 *
 * @example onesComplementSum(Buffer.from('0001f203f4f5f6f7', 'hex')) === 0xddf2 // RFC 1071, section 3
 */
export function onesComplementSum(data: Uint8Array, initial = 0): number {
  const b = bytesArg(data, 'data');
  validateInt(initial, 'initial', 0, 0xffffffff);
  // Summed as a plain number (exact far beyond any frame's length), folded once.
  let sum = initial;
  const even = b.length - (b.length % 2);
  for (let i = 0; i < even; i += 2) sum += b.readUInt16BE(i);
  if (b.length & 1) sum += b[b.length - 1]! << 8;
  while (sum > 0xffff) sum = (sum % 0x10000) + Math.floor(sum / 0x10000);
  return sum;
}

/**
 * The IPv4 header checksum (RFC 791): the ones' complement of the ones'
 * complement sum of the header.  Over a header whose checksum field is zero
 * it is the value to store at offset 10; over a header with a correct
 * checksum it is 0 (how a receiver checks one).
 *
 * @example ipv4Checksum(Buffer.from('450000730000400040110000c0a80001c0a800c7', 'hex')) === 0xb861
 */
export function ipv4Checksum(header: Uint8Array): number {
  return ~onesComplementSum(bytesArg(header, 'header')) & 0xffff;
}

/**
 * The ones' complement sum of the IPv4 pseudo header of a TCP or UDP segment
 * (RFC 793 section 3.1, RFC 768): source address, destination address, a zero
 * byte, `protocol`, and `l4Length` (the segment's length, header included),
 * folded to 16 bits and not inverted.  It is what the checksum field holds in
 * a frame handed over with CHECKSUM_PARTIAL (virtio-net NEEDS_CSUM: whoever
 * sends it adds the segment and inverts), and the starting sum of
 * {@link l4Checksum4}.
 */
export function ipv4PseudoHeaderSum(srcIp: IpAddress, dstIp: IpAddress, protocol: number, l4Length: number): number {
  const src = ipv4Arg(srcIp, 'srcIp');
  const dst = ipv4Arg(dstIp, 'dstIp');
  const proto = validateInt(protocol, 'protocol', 0, 255);
  const len = validateInt(l4Length, 'l4Length', 0, 0xffff - IPV4_HLEN, 'a TCP/UDP segment over IPv4 is at most 65515 bytes');
  return onesComplementSum(Buffer.concat([src, dst]), proto + len);
}

/**
 * The TCP or UDP checksum of `segment` (its header and payload) over IPv4:
 * the ones' complement of the sum of the pseudo header and the segment.  Over
 * a segment whose checksum field is zero it is the value to store (for UDP a
 * computed 0 goes on the wire as 0xffff, RFC 768); over a segment with a
 * correct checksum it is 0 (how a receiver checks one).
 *
 * @example l4Checksum4('153.18.8.105', '171.2.14.10', IPPROTO.UDP, Buffer.from('043f000d000f000054455354494e47', 'hex')) === 0x6914
 *   // Forouzan, TCP/IP Protocol Suite: "checksum calculation of a simple UDP user datagram"
 */
export function l4Checksum4(srcIp: IpAddress, dstIp: IpAddress, protocol: number, segment: Uint8Array): number {
  const seg = bytesArg(segment, 'segment');
  return ~onesComplementSum(seg, ipv4PseudoHeaderSum(srcIp, dstIp, protocol, seg.length)) & 0xffff;
}

export interface EthernetFrameOptions {
  dstMac: MacAddress;
  srcMac: MacAddress;
  /** 0x0600..0xffff (an EtherType, not an 802.3 length); see {@link ETHERTYPE}. */
  etherType: number;
  payload: Uint8Array;
  /** Pad with zero bytes to at least this many bytes (e.g. {@link ETH_ZLEN}); default: no padding. */
  minLength?: number;
}

/** An Ethernet frame: 14-byte header, then `payload` (copied), zero-padded to `minLength`. */
export function ethernetFrame(opts: EthernetFrameOptions): Buffer {
  checkOptions(opts, 'ethernetFrame', ['dstMac', 'srcMac', 'etherType', 'payload', 'minLength']);
  const dst = macArg(opts.dstMac, 'dstMac');
  const src = macArg(opts.srcMac, 'srcMac');
  const type = validateInt(opts.etherType, 'etherType', 0x0600, 0xffff, 'an EtherType such as 0x0800 (IPv4)');
  const payload = bytesArg(opts.payload, 'payload');
  const min = opts.minLength === undefined ? 0 : validateInt(opts.minLength, 'minLength', 0, 0xffff);
  const f = Buffer.alloc(Math.max(ETH_HLEN + payload.length, min));
  dst.copy(f, 0);
  src.copy(f, 6);
  f.writeUInt16BE(type, 12);
  payload.copy(f, ETH_HLEN);
  return f;
}

export interface Ipv4HeaderOptions {
  srcIp: IpAddress;
  dstIp: IpAddress;
  /** The protocol of what follows (see {@link IPPROTO}). */
  protocol: number;
  /** Bytes after the header; the total length field is 20 + this (at most 65535). */
  payloadLength: number;
  /** Identification field; default 0. */
  id?: number;
  /** Default 64. */
  ttl?: number;
  /** Set the DF flag (flags/fragment offset 0x4000, else 0); default true. */
  dontFragment?: boolean;
}

/** A 20-byte IPv4 header (no options, TOS 0, not a fragment) with its checksum filled in. */
export function ipv4Header(opts: Ipv4HeaderOptions): Buffer {
  checkOptions(opts, 'ipv4Header', ['srcIp', 'dstIp', 'protocol', 'payloadLength', 'id', 'ttl', 'dontFragment']);
  const src = ipv4Arg(opts.srcIp, 'srcIp');
  const dst = ipv4Arg(opts.dstIp, 'dstIp');
  const protocol = validateInt(opts.protocol, 'protocol', 0, 255);
  const payloadLength = validateInt(opts.payloadLength, 'payloadLength', 0, 0xffff - IPV4_HLEN, 'an IPv4 packet is at most 65535 bytes');
  const id = opts.id === undefined ? 0 : validateInt(opts.id, 'id', 0, 0xffff);
  const ttl = opts.ttl === undefined ? 64 : validateInt(opts.ttl, 'ttl', 0, 255);
  const df = opts.dontFragment === undefined ? true : validateBoolean(opts.dontFragment, 'dontFragment');
  const ip = Buffer.alloc(IPV4_HLEN);
  ip[0] = 0x45;
  ip.writeUInt16BE(IPV4_HLEN + payloadLength, 2);
  ip.writeUInt16BE(id, 4);
  ip.writeUInt16BE(df ? 0x4000 : 0, 6);
  ip[8] = ttl;
  ip[9] = protocol;
  src.copy(ip, 12);
  dst.copy(ip, 16);
  ip.writeUInt16BE(ipv4Checksum(ip), 10);
  return ip;
}

export interface Udp4FrameOptions {
  dstMac: MacAddress;
  srcMac: MacAddress;
  srcIp: IpAddress;
  dstIp: IpAddress;
  srcPort: number;
  dstPort: number;
  payload: Uint8Array;
  /** IPv4 TTL; default 64. */
  ttl?: number;
  /** IPv4 identification; default 0. */
  id?: number;
  /** IPv4 DF flag; default true. */
  dontFragment?: boolean;
}

/**
 * An Ethernet + IPv4 + UDP frame (42 bytes + payload; not padded): IPv4
 * header checksum filled in, UDP checksum 0 (none).
 */
export function udp4Frame(opts: Udp4FrameOptions): Buffer {
  checkOptions(opts, 'udp4Frame', ['dstMac', 'srcMac', 'srcIp', 'dstIp', 'srcPort', 'dstPort', 'payload', 'ttl', 'id', 'dontFragment']);
  const { dstMac, srcMac, srcIp, dstIp, ttl, id, dontFragment } = opts;
  const srcPort = validateInt(opts.srcPort, 'srcPort', 0, 0xffff);
  const dstPort = validateInt(opts.dstPort, 'dstPort', 0, 0xffff);
  const payload = bytesArg(opts.payload, 'payload');
  const max = 0xffff - IPV4_HLEN - UDP_HLEN;
  if (payload.length > max) throw invalidArg(`payload is ${payload.length} bytes; a UDP/IPv4 payload is at most ${max}`);
  macArg(dstMac, 'dstMac');
  macArg(srcMac, 'srcMac');
  const ip = ipv4Header({ srcIp, dstIp, protocol: IPPROTO.UDP, payloadLength: UDP_HLEN + payload.length, ttl, id, dontFragment });
  const udp = Buffer.alloc(UDP_HLEN);
  udp.writeUInt16BE(srcPort, 0);
  udp.writeUInt16BE(dstPort, 2);
  udp.writeUInt16BE(UDP_HLEN + payload.length, 4);
  return ethernetFrame({ dstMac, srcMac, etherType: ETHERTYPE.IPV4, payload: Buffer.concat([ip, udp, payload]) });
}

/** What {@link parseUdp4Frame} reads from a frame. */
export interface Udp4Datagram {
  dstMac: string;
  srcMac: string;
  /** Dotted quads. */
  srcIp: string;
  dstIp: string;
  ttl: number;
  id: number;
  /** The IPv4 header checksum verifies. */
  ipChecksumOk: boolean;
  srcPort: number;
  dstPort: number;
  /** The UDP checksum field as sent (0: none); not verified. */
  udpChecksum: number;
  /** The UDP payload (a copy: readers often reuse the frame's buffer). */
  payload: Buffer;
}

/**
 * Reads an Ethernet + IPv4 + UDP frame (starting at its Ethernet header:
 * strip a virtio-net header first).  Anything else gives undefined: another
 * EtherType or protocol, a truncated frame, inconsistent lengths, a fragment.
 * IPv4 options are skipped; Ethernet padding after the IPv4 packet is ignored.
 */
export function parseUdp4Frame(frame: Uint8Array): Udp4Datagram | undefined {
  const f = bytesArg(frame, 'frame');
  if (f.length < ETH_HLEN + IPV4_HLEN + UDP_HLEN || f.readUInt16BE(12) !== ETHERTYPE.IPV4) return undefined;
  const ihl = (f[ETH_HLEN]! & 0x0f) * 4;
  if (f[ETH_HLEN]! >> 4 !== 4 || ihl < IPV4_HLEN || f[ETH_HLEN + 9] !== IPPROTO.UDP) return undefined;
  const total = f.readUInt16BE(ETH_HLEN + 2);
  if (total < ihl + UDP_HLEN || ETH_HLEN + total > f.length) return undefined;
  if ((f.readUInt16BE(ETH_HLEN + 6) & 0x3fff) !== 0) return undefined; // MF or an offset: a fragment
  const ip = f.subarray(ETH_HLEN, ETH_HLEN + ihl);
  const udp = f.subarray(ETH_HLEN + ihl, ETH_HLEN + total);
  const udpLen = udp.readUInt16BE(4);
  if (udpLen < UDP_HLEN || udpLen > udp.length) return undefined;
  return {
    dstMac: formatMac(f.subarray(0, 6)),
    srcMac: formatMac(f.subarray(6, 12)),
    srcIp: ip.subarray(12, 16).join('.'),
    dstIp: ip.subarray(16, 20).join('.'),
    ttl: ip[8]!,
    id: ip.readUInt16BE(4),
    ipChecksumOk: ipv4Checksum(ip) === 0,
    srcPort: udp.readUInt16BE(0),
    dstPort: udp.readUInt16BE(2),
    udpChecksum: udp.readUInt16BE(6),
    payload: Buffer.from(udp.subarray(UDP_HLEN, udpLen)),
  };
}

/**
 * Reads every frame waiting on a NON-BLOCKING fd (a tap queue: one read(2),
 * one frame, virtio-net header included) into `buf` and calls `onFrame` with
 * each, until the kernel says EAGAIN or a read returns 0 bytes.  `onFrame`
 * gets a view of `buf`, overwritten by the next read: copy what you keep.
 * Other read errors are thrown (after the frames before them were handed
 * over).  A blocking fd would block here: set O_NONBLOCK first
 * (`native.setNonBlocking(fd, true)`).
 *
 * @returns the number of frames read
 */
export function drainFrames(fd: number, buf: Buffer, onFrame: (frame: Buffer) => void): number {
  validateInt(fd, 'fd', 0, 0x7fffffff);
  if (!Buffer.isBuffer(buf) || buf.length === 0) throw invalidArg('buf must be a non-empty Buffer', 'one frame at most 65535 bytes plus the virtio-net header');
  if (typeof onFrame !== 'function') throw invalidArg(`onFrame must be a function (got ${typeof onFrame})`);
  let count = 0;
  for (;;) {
    let n: number;
    try {
      n = readSync(fd, buf, 0, buf.length, null);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return count;
      throw err;
    }
    if (n === 0) return count;
    count++;
    onFrame(buf.subarray(0, n));
  }
}
