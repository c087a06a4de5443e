/**
 * virtio-net header codec.
 *
 * Every frame read from or written to a tap queue opened with IFF_VNET_HDR is
 * prefixed by a virtio-net header (see the virtio 1.x specification, section
 * "Device Operation: Packet Transmission/Reception", and <linux/virtio_net.h>):
 *
 * ```
 * offset size field         (struct virtio_net_hdr_mrg_rxbuf)
 *      0    1 flags         VIRTIO_NET_HDR_F_*
 *      1    1 gso_type      VIRTIO_NET_HDR_GSO_*
 *      2    2 hdr_len       length of the headers to copy into the linear part
 *      4    2 gso_size      segment size (MSS) when gso_type != NONE
 *      6    2 csum_start    where checksumming starts (offset from frame start)
 *      8    2 csum_offset   where to store it, relative to csum_start
 *     10    2 num_buffers   (12-byte header only) buffers merged into this frame
 *                           (filled by vhost-net with mergeable rx buffers; a tap
 *                           zero-fills it on read and ignores it on write)
 * ```
 *
 * The 10-byte form is `struct virtio_net_hdr`; the 12-byte form is
 * `struct virtio_net_hdr_mrg_rxbuf` (also the layout used by every VERSION_1
 * virtio device). The tap's header size is chosen with TUNSETVNETHDRSZ.
 *
 * Byte order: all 16-bit fields are encoded little-endian. That is the byte
 * order of modern (VIRTIO_F_VERSION_1) virtio and of a tap queue after
 * TUNSETVNETLE. A legacy tap without TUNSETVNETLE uses the host's native byte
 * order, which is little-endian on x86-64 and little-endian arm64 / riscv64,
 * so this codec is correct there too; on a big-endian host you must call
 * TUNSETVNETLE on the queue before using it.
 *
 * Only the base flags and GSO types below are understood. Newer extensions
 * (e.g. the UDP-tunnel GSO types and VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM, which
 * require a larger header) are reported as unknown values.
 *
 * TypeScript field names are camelCase; the C name is given in each field's
 * documentation and in error messages.
 *
 * @module
 */

/** Values of the `flags` byte (VIRTIO_NET_HDR_F_*). */
export const VNET_HDR_F = Object.freeze({
  /** VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum from csumStart, store at csumStart+csumOffset. */
  NEEDS_CSUM: 1,
  /** VIRTIO_NET_HDR_F_DATA_VALID: the checksum has already been validated (receive only). */
  DATA_VALID: 2,
  /** VIRTIO_NET_HDR_F_RSC_INFO: csumStart/csumOffset carry RSC coalescing counters (receive only). */
  RSC_INFO: 4,
} as const);

/** Values of the `gso_type` byte (VIRTIO_NET_HDR_GSO_*). */
export const VNET_HDR_GSO = Object.freeze({
  /** VIRTIO_NET_HDR_GSO_NONE: not a GSO frame. */
  NONE: 0,
  /** VIRTIO_NET_HDR_GSO_TCPV4: TCP over IPv4 segmentation offload. */
  TCPV4: 1,
  /** VIRTIO_NET_HDR_GSO_UDP: UDP fragmentation offload (UFO, deprecated). */
  UDP: 3,
  /** VIRTIO_NET_HDR_GSO_TCPV6: TCP over IPv6 segmentation offload. */
  TCPV6: 4,
  /** VIRTIO_NET_HDR_GSO_UDP_L4: UDP segmentation offload (USO). */
  UDP_L4: 5,
  /** VIRTIO_NET_HDR_GSO_ECN: flag bit, the TCP stream uses ECN (CWR set on the first segment only). */
  ECN: 0x80,
} as const);

/** Size in bytes of a virtio-net header: 10 (virtio_net_hdr) or 12 (virtio_net_hdr_mrg_rxbuf). */
export type VnetHdrSize = 10 | 12;

/** A decoded virtio-net header. All values are unsigned integers. */
export interface VnetHdr {
  /** `flags` (u8): OR of {@link VNET_HDR_F} values. */
  flags: number;
  /** `gso_type` (u8): one of {@link VNET_HDR_GSO}, optionally OR'ed with `VNET_HDR_GSO.ECN`. */
  gsoType: number;
  /** `hdr_len` (u16): length of the Ethernet+IP+L4 headers (a hint for the linear part). */
  hdrLen: number;
  /** `gso_size` (u16): payload bytes per segment (MSS) when `gsoType` is not NONE. */
  gsoSize: number;
  /** `csum_start` (u16): offset from the start of the frame where checksumming starts. */
  csumStart: number;
  /** `csum_offset` (u16): offset after `csumStart` where the 16-bit checksum is stored. */
  csumOffset: number;
  /**
   * `num_buffers` (u16): number of receive buffers merged into this frame.
   * Present only in the 12-byte header; absent after decoding a 10-byte header.
   */
  numBuffers?: number;
}

/** Name of a header field (or of the buffer) that a {@link VnetHdrError} is about. */
export type VnetHdrField =
  | 'buffer'
  | 'size'
  | 'flags'
  | 'gsoType'
  | 'hdrLen'
  | 'gsoSize'
  | 'csumStart'
  | 'csumOffset'
  | 'numBuffers';

/** Error thrown for malformed or unrepresentable virtio-net headers. */
export class VnetHdrError extends Error {
  /** Always `'EVNETHDR'`. */
  readonly code = 'EVNETHDR' as const;
  /** The field the problem was found in. */
  readonly field: VnetHdrField;

  /**
   * @param field the offending field
   * @param message description, phrased to follow the field name (e.g. `'is 0 but ...'`)
   */
  constructor(field: VnetHdrField, message: string) {
    const cName = C_NAMES[field];
    const label = cName === field ? field : `${field} (${cName})`;
    super(`invalid virtio-net header: ${label} ${message}`);
    this.name = 'VnetHdrError';
    this.field = field;
  }
}

/** Options for {@link validateVnetHdr} and {@link decodeVnetHdr}. */
export interface VnetHdrValidateOptions {
  /**
   * Length in bytes of the frame that follows the header (header excluded).
   * When given, `hdrLen` and the NEEDS_CSUM checksum location are checked
   * against it.
   */
  frameLength?: number;
  /**
   * The header belongs to a frame received through a virtio-net device with
   * mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF, e.g. vhost-net's
   * receive path; 12-byte headers only): `numBuffers` must then be at least 1.
   * Default false. Do not set it for frames read directly from a tap file
   * descriptor: the tap writes the 10-byte header and zero-fills the rest, so
   * `num_buffers` is 0 there; on transmit it is ignored.
   */
  received?: boolean;
}

const C_NAMES: Readonly<Record<VnetHdrField, string>> = {
  buffer: 'buffer',
  size: 'header size',
  flags: 'flags',
  gsoType: 'gso_type',
  hdrLen: 'hdr_len',
  gsoSize: 'gso_size',
  csumStart: 'csum_start',
  csumOffset: 'csum_offset',
  numBuffers: 'num_buffers',
};

const KNOWN_FLAGS = VNET_HDR_F.NEEDS_CSUM | VNET_HDR_F.DATA_VALID | VNET_HDR_F.RSC_INFO;
const KNOWN_GSO_BASES: ReadonlySet<number> = new Set([
  VNET_HDR_GSO.NONE,
  VNET_HDR_GSO.TCPV4,
  VNET_HDR_GSO.UDP,
  VNET_HDR_GSO.TCPV6,
  VNET_HDR_GSO.UDP_L4,
]);

/** Offsets of the fields inside the header. */
const OFF = { flags: 0, gsoType: 1, hdrLen: 2, gsoSize: 4, csumStart: 6, csumOffset: 8, numBuffers: 10 } as const;

function hex(value: number): string {
  return `0x${value.toString(16)}`;
}

function assertSize(size: number): asserts size is VnetHdrSize {
  if (size !== 10 && size !== 12) {
    throw new VnetHdrError('size', `must be 10 or 12, got ${String(size)}`);
  }
}

function assertOffset(offset: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new VnetHdrError('buffer', `offset must be a non-negative integer, got ${String(offset)}`);
  }
}

function assertRoom(buf: Uint8Array, offset: number, size: VnetHdrSize): void {
  if (buf.length - offset < size) {
    throw new VnetHdrError(
      'buffer',
      `is too short: need ${size} bytes at offset ${offset}, have ${Math.max(0, buf.length - offset)}`,
    );
  }
}

function assertUint(field: VnetHdrField, value: number, max: number): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new VnetHdrError(field, `must be an integer in 0..${max}, got ${String(value)}`);
  }
}

/**
 * Human-readable name of a `gso_type` value, e.g. `'TCPV4|ECN'`; unknown
 * values are rendered in hex.
 */
export function gsoTypeName(gsoType: number): string {
  const base = gsoType & ~VNET_HDR_GSO.ECN;
  const entry = Object.entries(VNET_HDR_GSO).find(([name, v]) => v === base && name !== 'ECN');
  const baseName = entry === undefined ? hex(base) : entry[0];
  return (gsoType & VNET_HDR_GSO.ECN) !== 0 ? `${baseName}|ECN` : baseName;
}

/**
 * Encodes a virtio-net header (little-endian).
 *
 * With `target`, the header is written in place at `offset` and `target` is
 * returned (no allocation); otherwise a new `size`-byte Buffer is returned.
 * Only representability is checked (field ranges, room in `target`); use
 * {@link validateVnetHdr} for semantic checks.
 *
 * @param hdr the header; `numBuffers` defaults to 0 and must be absent or 0 when `size` is 10
 * @param size 10 or 12
 * @param target optional destination buffer
 * @param offset byte offset in `target` (default 0)
 * @returns `target`, or the newly allocated buffer
 * @throws {VnetHdrError} on an out-of-range field or a too-short `target`
 */
export function encodeVnetHdr(hdr: VnetHdr, size: VnetHdrSize, target?: Buffer, offset = 0): Buffer {
  assertSize(size);
  assertOffset(offset);
  assertUint('flags', hdr.flags, 0xff);
  assertUint('gsoType', hdr.gsoType, 0xff);
  assertUint('hdrLen', hdr.hdrLen, 0xffff);
  assertUint('gsoSize', hdr.gsoSize, 0xffff);
  assertUint('csumStart', hdr.csumStart, 0xffff);
  assertUint('csumOffset', hdr.csumOffset, 0xffff);
  const numBuffers = hdr.numBuffers ?? 0;
  assertUint('numBuffers', numBuffers, 0xffff);
  if (size === 10 && numBuffers !== 0) {
    throw new VnetHdrError('numBuffers', `is ${numBuffers} but a 10-byte header has no num_buffers field`);
  }
  const out = target ?? Buffer.allocUnsafe(size);
  assertRoom(out, offset, size);
  out[offset + OFF.flags] = hdr.flags;
  out[offset + OFF.gsoType] = hdr.gsoType;
  out.writeUInt16LE(hdr.hdrLen, offset + OFF.hdrLen);
  out.writeUInt16LE(hdr.gsoSize, offset + OFF.gsoSize);
  out.writeUInt16LE(hdr.csumStart, offset + OFF.csumStart);
  out.writeUInt16LE(hdr.csumOffset, offset + OFF.csumOffset);
  if (size === 12) {
    out.writeUInt16LE(numBuffers, offset + OFF.numBuffers);
  }
  return out;
}

function validateFlags(hdr: VnetHdr): void {
  const unknown = hdr.flags & ~KNOWN_FLAGS;
  if (unknown !== 0) {
    throw new VnetHdrError('flags', `${hex(hdr.flags)} has unknown flag bits ${hex(unknown)}`);
  }
  if ((hdr.flags & VNET_HDR_F.NEEDS_CSUM) !== 0 && (hdr.flags & VNET_HDR_F.RSC_INFO) !== 0) {
    throw new VnetHdrError(
      'flags',
      'combine NEEDS_CSUM and RSC_INFO, which are mutually exclusive (RSC_INFO reuses csum_start/csum_offset as counters)',
    );
  }
}

function validateGso(hdr: VnetHdr): void {
  const base = hdr.gsoType & ~VNET_HDR_GSO.ECN;
  if (!KNOWN_GSO_BASES.has(base)) {
    throw new VnetHdrError('gsoType', `${hex(hdr.gsoType)} is an unknown GSO type`);
  }
  if (base === VNET_HDR_GSO.NONE && hdr.gsoType !== VNET_HDR_GSO.NONE) {
    throw new VnetHdrError('gsoType', 'has the ECN bit set without a GSO type');
  }
  if (base !== VNET_HDR_GSO.NONE && hdr.gsoSize === 0) {
    throw new VnetHdrError('gsoSize', `is 0 but gso_type is ${gsoTypeName(hdr.gsoType)}; GSO needs a segment size`);
  }
}

function validateAgainstFrame(hdr: VnetHdr, frameLength: number): void {
  if (hdr.hdrLen > frameLength) {
    throw new VnetHdrError('hdrLen', `${hdr.hdrLen} exceeds the frame length ${frameLength}`);
  }
  if ((hdr.flags & VNET_HDR_F.NEEDS_CSUM) !== 0) {
    const end = hdr.csumStart + hdr.csumOffset + 2;
    if (end > frameLength) {
      throw new VnetHdrError(
        'csumStart',
        `${hdr.csumStart} + csum_offset ${hdr.csumOffset} + 2 = ${end} puts the NEEDS_CSUM checksum field ` +
          `beyond the frame length ${frameLength}`,
      );
    }
  }
}

/**
 * Checks a header for semantic errors: unknown flag bits, NEEDS_CSUM combined
 * with RSC_INFO, unknown gso_type, ECN without a GSO type, a GSO type with
 * gso_size 0, and — when `options.frameLength` is given — hdr_len or the
 * NEEDS_CSUM checksum field (csum_start + csum_offset + 2) beyond the frame;
 * with `options.received` and `size` 12, num_buffers 0.
 *
 * @param hdr the header to check
 * @param size the header size it was (or will be) encoded with
 * @param options see {@link VnetHdrValidateOptions}
 * @throws {VnetHdrError} naming the offending field
 */
export function validateVnetHdr(hdr: VnetHdr, size: VnetHdrSize, options: VnetHdrValidateOptions = {}): void {
  assertSize(size);
  validateFlags(hdr);
  validateGso(hdr);
  const { frameLength, received = false } = options;
  if (frameLength !== undefined) {
    if (!Number.isSafeInteger(frameLength) || frameLength < 0) {
      throw new RangeError(`frameLength must be a non-negative integer, got ${String(frameLength)}`);
    }
    validateAgainstFrame(hdr, frameLength);
  }
  if (received && size === 12 && (hdr.numBuffers ?? 0) === 0) {
    throw new VnetHdrError('numBuffers', 'is 0 in a received frame; a received frame occupies at least 1 buffer');
  }
}

/**
 * Decodes and validates a virtio-net header (little-endian).
 *
 * @param buf the buffer holding the header
 * @param size 10 or 12
 * @param offset byte offset of the header in `buf` (default 0)
 * @param options validation options, see {@link validateVnetHdr}
 * @returns the decoded header; `numBuffers` is present only when `size` is 12
 * @throws {VnetHdrError} if `buf` is too short or the header is malformed
 */
export function decodeVnetHdr(
  buf: Buffer,
  size: VnetHdrSize,
  offset = 0,
  options: VnetHdrValidateOptions = {},
): VnetHdr {
  assertSize(size);
  assertOffset(offset);
  assertRoom(buf, offset, size);
  const hdr: VnetHdr = {
    flags: buf.readUInt8(offset + OFF.flags),
    gsoType: buf.readUInt8(offset + OFF.gsoType),
    hdrLen: buf.readUInt16LE(offset + OFF.hdrLen),
    gsoSize: buf.readUInt16LE(offset + OFF.gsoSize),
    csumStart: buf.readUInt16LE(offset + OFF.csumStart),
    csumOffset: buf.readUInt16LE(offset + OFF.csumOffset),
  };
  if (size === 12) {
    hdr.numBuffers = buf.readUInt16LE(offset + OFF.numBuffers);
  }
  validateVnetHdr(hdr, size, options);
  return hdr;
}

/** Layer-4 protocols whose checksum can be offloaded with NEEDS_CSUM. */
export type CsumProtocol = 'tcp' | 'udp';

/** Offset of the checksum field inside the L4 header, i.e. `csum_offset`. */
export const L4_CSUM_OFFSET: Readonly<Record<CsumProtocol, number>> = Object.freeze({
  /** offsetof(struct tcphdr, check) */
  tcp: 16,
  /** offsetof(struct udphdr, check) */
  udp: 6,
});

/** Arguments of {@link vnetHdrForChecksum}. */
export interface ChecksumHdrParams {
  /** Offset of the L4 (TCP/UDP) header from the start of the frame, VLAN tags included. */
  l4Offset: number;
  /** The L4 protocol. */
  protocol: CsumProtocol;
}

/** Arguments of {@link vnetHdrForTcpGso}. */
export interface TcpGsoHdrParams {
  /** 4 for TCPV4, 6 for TCPV6. */
  ipVersion: 4 | 6;
  /** Offset of the IP header from the start of the frame (14 for untagged Ethernet, 0 for IFF_TUN). */
  l3Offset: number;
  /** Offset of the TCP header from the start of the frame. */
  l4Offset: number;
  /** TCP header length in bytes including options (data offset * 4): 20..60, multiple of 4. */
  tcpHdrLen: number;
  /** Maximum segment size: TCP payload bytes per segment (`gso_size`). */
  mss: number;
  /** Set VIRTIO_NET_HDR_GSO_ECN (the flow negotiated ECN, CWR must go only on the first segment). */
  ecn?: boolean;
}

function assertArg(name: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer in ${min}..${max}, got ${String(value)}`);
  }
}

/**
 * Header for a single (non-GSO) frame whose TCP/UDP checksum is left for the
 * receiver to fill in, as Linux's `virtio_net_hdr_from_skb()` builds it for a
 * CHECKSUM_PARTIAL skb: flags NEEDS_CSUM, csum_start = offset of the L4 header
 * (`skb_checksum_start_offset()` + VLAN header length when the tag is
 * inserted on output — in a userspace frame the tag is already inline, so just
 * pass the real offset), csum_offset = offset of the checksum field inside the
 * L4 header, gso_type NONE and hdr_len 0 (the kernel zeroes hdr_len for
 * non-GSO skbs). The L4 checksum field itself must hold the folded
 * pseudo-header sum, as for any CHECKSUM_PARTIAL packet.
 *
 * @throws {RangeError} if `l4Offset` is out of range
 */
export function vnetHdrForChecksum(params: ChecksumHdrParams): VnetHdr {
  const csumOffset = L4_CSUM_OFFSET[params.protocol];
  assertArg('l4Offset', params.l4Offset, 0, 0xffff - csumOffset - 2);
  return {
    flags: VNET_HDR_F.NEEDS_CSUM,
    gsoType: VNET_HDR_GSO.NONE,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: params.l4Offset,
    csumOffset,
  };
}

/**
 * Header for a TCP GSO "super-frame", as Linux's `virtio_net_hdr_from_skb()`
 * builds it for a TSO skb from the local TCP stack: gso_type TCPV4/TCPV6
 * (| ECN), gso_size = MSS, flags NEEDS_CSUM with csum_start = TCP header
 * offset and csum_offset = 16. The kernel sets hdr_len to `skb_headlen()`,
 * the linear part, which for a TCP stack skb is exactly the protocol headers;
 * here it is therefore `l4Offset + tcpHdrLen` (Ethernet + IP + TCP headers).
 *
 * @throws {RangeError} on inconsistent offsets (IP header shorter than its
 *   minimum, bad TCP header length, MSS 0 or above 65535)
 */
export function vnetHdrForTcpGso(params: TcpGsoHdrParams): VnetHdr {
  const { ipVersion, l3Offset, l4Offset, tcpHdrLen, mss, ecn = false } = params;
  if (ipVersion !== 4 && ipVersion !== 6) {
    throw new RangeError(`ipVersion must be 4 or 6, got ${String(ipVersion)}`);
  }
  const minIpHdr = ipVersion === 4 ? 20 : 40;
  assertArg('l3Offset', l3Offset, 0, 0xffff);
  assertArg('l4Offset', l4Offset, l3Offset + minIpHdr, 0xffff);
  assertArg('tcpHdrLen', tcpHdrLen, 20, 60);
  if (tcpHdrLen % 4 !== 0) {
    throw new RangeError(`tcpHdrLen must be a multiple of 4, got ${tcpHdrLen}`);
  }
  assertArg('l4Offset + tcpHdrLen', l4Offset + tcpHdrLen, 0, 0xffff);
  assertArg('mss', mss, 1, 0xffff);
  const base = ipVersion === 4 ? VNET_HDR_GSO.TCPV4 : VNET_HDR_GSO.TCPV6;
  return {
    flags: VNET_HDR_F.NEEDS_CSUM,
    gsoType: ecn ? base | VNET_HDR_GSO.ECN : base,
    hdrLen: l4Offset + tcpHdrLen,
    gsoSize: mss,
    csumStart: l4Offset,
    csumOffset: L4_CSUM_OFFSET.tcp,
  };
}
