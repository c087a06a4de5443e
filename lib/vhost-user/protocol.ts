/**
 * The vhost-user message codec (QEMU docs/interop/vhost-user.rst).
 *
 * A message is a 12-byte header (request u32, flags u32, size u32, all
 * little-endian as on every host vhost-user runs on) followed by `size` bytes
 * of payload; fds travel as SCM_RIGHTS with the message's bytes.  Every
 * request has one payload layout for the request and one for the reply, and
 * a rule for how many fds come with it.  decode is strict: anything outside
 * those rules is a VhostUserProtocolError (op 'VHOST_USER_MSG') with a
 * `reason`, never a crash and never a guess.
 *
 * Pure data: no sockets, no fds owned here (connection.ts does that).
 */
import { MqtapError } from '../sys/errors';

/** Header bytes. */
export const HEADER_SIZE = 12;
/** The largest payload accepted (the largest real one, SET_MEM_TABLE with 8 regions, is 264 bytes). */
export const MAX_PAYLOAD = 4096;
/** Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;
/** Bytes of one region description. */
export const MEM_REGION_SIZE = 32;

/** Header flags. */
export const FLAGS = {
  VERSION_MASK: 0x3,
  VERSION: 0x1,
  REPLY: 0x4,
  NEED_REPLY: 0x8,
} as const;

/** The u64 payload of SET_VRING_KICK/CALL/ERR: ring index in bits 0..7, no fd attached when bit 8 is set. */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** Front-end requests (the numbers are the protocol's). */
export const REQUEST = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

export type RequestName = keyof typeof REQUEST;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const PROTOCOL_FEATURE = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio and vhost-user feature bits (GET/SET_FEATURES) this backend talks about. */
export const FEATURE = {
  VIRTIO_NET_F_CSUM: 0,
  VIRTIO_NET_F_GUEST_CSUM: 1,
  VIRTIO_NET_F_MTU: 3,
  VIRTIO_NET_F_GUEST_TSO4: 7,
  VIRTIO_NET_F_GUEST_TSO6: 8,
  VIRTIO_NET_F_GUEST_ECN: 9,
  VIRTIO_NET_F_GUEST_UFO: 10,
  VIRTIO_NET_F_HOST_TSO4: 11,
  VIRTIO_NET_F_HOST_TSO6: 12,
  VIRTIO_NET_F_HOST_ECN: 13,
  VIRTIO_NET_F_HOST_UFO: 14,
  VIRTIO_NET_F_MRG_RXBUF: 15,
  VIRTIO_NET_F_STATUS: 16,
  VIRTIO_NET_F_CTRL_VQ: 17,
  VIRTIO_NET_F_MQ: 22,
  VIRTIO_F_NOTIFY_ON_EMPTY: 24,
  VIRTIO_RING_F_INDIRECT_DESC: 28,
  VIRTIO_RING_F_EVENT_IDX: 29,
  VHOST_USER_F_PROTOCOL_FEATURES: 30,
  VIRTIO_F_VERSION_1: 32,
  VIRTIO_F_ACCESS_PLATFORM: 33,
  VIRTIO_F_RING_PACKED: 34,
} as const;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** Names of the bits set in `mask`, from `table` (unknown bits as 'bit N'). */
export function featureNames(mask: bigint, table: Record<string, number> = FEATURE): string[] {
  const byBit = new Map(Object.entries(table).map(([k, v]) => [v, k]));
  const out: string[] = [];
  for (let i = 0; i < 64; i++) if (mask & bit(i)) out.push(byBit.get(i) ?? `bit ${i}`);
  return out;
}

export interface MemRegionDesc {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

/** Payload layouts. */
export type Payload =
  | { kind: 'none' }
  | { kind: 'u64'; value: bigint }
  | { kind: 'vringState'; index: number; num: number }
  | { kind: 'vringAddr'; index: number; flags: number; descAddr: bigint; usedAddr: bigint; availAddr: bigint; logAddr: bigint }
  | { kind: 'memTable'; regions: MemRegionDesc[] }
  | { kind: 'memRegion'; region: MemRegionDesc }
  | { kind: 'vringFd'; index: number; noFd: boolean };

export type PayloadKind = Payload['kind'];

interface RequestSpec {
  request: PayloadKind;
  /** Reply payload; undefined: the request has no reply of its own (only a REPLY_ACK u64 when NEED_REPLY is set). */
  reply: PayloadKind | undefined;
}

const SPECS: Record<RequestName, RequestSpec> = {
  GET_FEATURES: { request: 'none', reply: 'u64' },
  SET_FEATURES: { request: 'u64', reply: undefined },
  SET_OWNER: { request: 'none', reply: undefined },
  RESET_OWNER: { request: 'none', reply: undefined },
  SET_MEM_TABLE: { request: 'memTable', reply: undefined },
  SET_LOG_BASE: { request: 'u64', reply: 'u64' },
  SET_LOG_FD: { request: 'none', reply: undefined },
  SET_VRING_NUM: { request: 'vringState', reply: undefined },
  SET_VRING_ADDR: { request: 'vringAddr', reply: undefined },
  SET_VRING_BASE: { request: 'vringState', reply: undefined },
  GET_VRING_BASE: { request: 'vringState', reply: 'vringState' },
  SET_VRING_KICK: { request: 'vringFd', reply: undefined },
  SET_VRING_CALL: { request: 'vringFd', reply: undefined },
  SET_VRING_ERR: { request: 'vringFd', reply: undefined },
  GET_PROTOCOL_FEATURES: { request: 'none', reply: 'u64' },
  SET_PROTOCOL_FEATURES: { request: 'u64', reply: undefined },
  GET_QUEUE_NUM: { request: 'none', reply: 'u64' },
  SET_VRING_ENABLE: { request: 'vringState', reply: undefined },
  SEND_RARP: { request: 'u64', reply: undefined },
  NET_SET_MTU: { request: 'u64', reply: undefined },
  GET_MAX_MEM_SLOTS: { request: 'none', reply: 'u64' },
  ADD_MEM_REG: { request: 'memRegion', reply: undefined },
  REM_MEM_REG: { request: 'memRegion', reply: undefined },
  SET_STATUS: { request: 'u64', reply: undefined },
  GET_STATUS: { request: 'none', reply: 'u64' },
};

const NAMES = new Map<number, RequestName>(Object.entries(REQUEST).map(([k, v]) => [v, k as RequestName]));

/** The request's name, or undefined for a number this codec does not know. */
export function requestName(n: number): RequestName | undefined {
  return NAMES.get(n);
}

export function requestSpec(name: RequestName): Readonly<RequestSpec> {
  return SPECS[name];
}

export interface Message {
  request: RequestName;
  /** Header flags as sent (version, REPLY, NEED_REPLY). */
  flags: number;
  payload: Payload;
}

export type Direction = 'request' | 'reply';

/** Why a message was refused. */
export type ProtocolErrorReason = 'short' | 'size' | 'request' | 'flags' | 'payload' | 'fds' | 'regions' | 'value';

/** A malformed or unsupported vhost-user message. */
export class VhostUserProtocolError extends MqtapError {
  readonly reason: ProtocolErrorReason;
  readonly request: RequestName | number | undefined;

  constructor(reason: ProtocolErrorReason, message: string, request?: RequestName | number) {
    super({
      op: 'VHOST_USER_MSG',
      code: 'EPROTO',
      errno: 71,
      message: `vhost-user: ${request !== undefined ? `${typeof request === 'number' ? `request ${request}` : request}: ` : ''}${message}`,
      hint: 'the front-end (QEMU, DPDK virtio-user) sent a message outside the vhost-user protocol this backend speaks; the connection is closed: check that the front-end is a vhost-user net front-end and its version',
    });
    this.reason = reason;
    this.request = request;
  }
}

/** Bytes of the payload a request (or reply) of `kind` has; memTable depends on its region count. */
export function payloadSize(p: Payload): number {
  switch (p.kind) {
    case 'none':
      return 0;
    case 'u64':
    case 'vringState':
    case 'vringFd':
      return 8;
    case 'vringAddr':
      return 40;
    case 'memTable':
      return 8 + p.regions.length * MEM_REGION_SIZE;
    case 'memRegion':
      return 8 + MEM_REGION_SIZE;
  }
}

const U32_MAX = 0xffffffff;
const U64_MAX = (1n << 64n) - 1n;

function checkU32(v: number, what: string): void {
  if (!Number.isInteger(v) || v < 0 || v > U32_MAX) throw new VhostUserProtocolError('value', `${what} must be a u32 (got ${v})`);
}

function checkU64(v: bigint, what: string): void {
  if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) throw new VhostUserProtocolError('value', `${what} must be a u64 (got ${String(v)})`);
}

function writeRegion(buf: Buffer, off: number, r: MemRegionDesc): void {
  checkU64(r.guestPhysAddr, 'guestPhysAddr');
  checkU64(r.size, 'size');
  checkU64(r.userAddr, 'userAddr');
  checkU64(r.mmapOffset, 'mmapOffset');
  buf.writeBigUInt64LE(r.guestPhysAddr, off);
  buf.writeBigUInt64LE(r.size, off + 8);
  buf.writeBigUInt64LE(r.userAddr, off + 16);
  buf.writeBigUInt64LE(r.mmapOffset, off + 24);
}

function readRegion(buf: Buffer, off: number): MemRegionDesc {
  return {
    guestPhysAddr: buf.readBigUInt64LE(off),
    size: buf.readBigUInt64LE(off + 8),
    userAddr: buf.readBigUInt64LE(off + 16),
    mmapOffset: buf.readBigUInt64LE(off + 24),
  };
}

function encodePayload(p: Payload): Buffer {
  const buf = Buffer.alloc(payloadSize(p));
  switch (p.kind) {
    case 'none':
      break;
    case 'u64':
      checkU64(p.value, 'value');
      buf.writeBigUInt64LE(p.value, 0);
      break;
    case 'vringState':
      checkU32(p.index, 'index');
      checkU32(p.num, 'num');
      buf.writeUInt32LE(p.index, 0);
      buf.writeUInt32LE(p.num, 4);
      break;
    case 'vringFd':
      if (!Number.isInteger(p.index) || p.index < 0 || p.index > VRING_IDX_MASK) throw new VhostUserProtocolError('value', `ring index must be 0..255 (got ${p.index})`);
      buf.writeBigUInt64LE(BigInt(p.index | (p.noFd ? VRING_NOFD_MASK : 0)), 0);
      break;
    case 'vringAddr':
      checkU32(p.index, 'index');
      checkU32(p.flags, 'flags');
      buf.writeUInt32LE(p.index, 0);
      buf.writeUInt32LE(p.flags, 4);
      for (const [v, off, what] of [
        [p.descAddr, 8, 'descAddr'],
        [p.usedAddr, 16, 'usedAddr'],
        [p.availAddr, 24, 'availAddr'],
        [p.logAddr, 32, 'logAddr'],
      ] as const) {
        checkU64(v, what);
        buf.writeBigUInt64LE(v, off);
      }
      break;
    case 'memTable':
      if (p.regions.length > MAX_MEM_REGIONS) throw new VhostUserProtocolError('regions', `at most ${MAX_MEM_REGIONS} regions (got ${p.regions.length})`);
      buf.writeUInt32LE(p.regions.length, 0);
      p.regions.forEach((r, i) => writeRegion(buf, 8 + i * MEM_REGION_SIZE, r));
      break;
    case 'memRegion':
      writeRegion(buf, 8, p.region);
      break;
  }
  return buf;
}

/** Encodes a message (header + payload).  The payload must be the kind the request has in `dir`. */
export function encodeMessage(m: Message, dir: Direction = 'request'): Buffer {
  const spec = SPECS[m.request];
  if (!spec) throw new VhostUserProtocolError('request', `unknown request ${String(m.request)}`);
  const want = dir === 'request' ? spec.request : (spec.reply ?? 'u64');
  if (m.payload.kind !== want) throw new VhostUserProtocolError('payload', `a ${dir} carries a ${want} payload, not ${m.payload.kind}`, m.request);
  checkU32(m.flags, 'flags');
  const body = encodePayload(m.payload);
  const head = Buffer.alloc(HEADER_SIZE);
  head.writeUInt32LE(REQUEST[m.request], 0);
  head.writeUInt32LE(m.flags, 4);
  head.writeUInt32LE(body.length, 8);
  return Buffer.concat([head, body]);
}

/** A request header with version 1 and the given extra flags. */
export function request(name: RequestName, payload: Payload = { kind: 'none' }, flags = 0): Message {
  return { request: name, flags: FLAGS.VERSION | flags, payload };
}

/** The reply to `req` carrying `payload`. */
export function reply(req: Pick<Message, 'request'>, payload: Payload): Message {
  return { request: req.request, flags: FLAGS.VERSION | FLAGS.REPLY, payload };
}

export interface Header {
  request: RequestName;
  flags: number;
  size: number;
}

/**
 * Reads and checks a header: a known request, version 1, no unknown flag
 * bits, REPLY set exactly when `dir` is 'reply', size <= MAX_PAYLOAD.
 */
export function decodeHeader(buf: Buffer, dir: Direction = 'request'): Header {
  if (buf.length < HEADER_SIZE) throw new VhostUserProtocolError('short', `a header is ${HEADER_SIZE} bytes (got ${buf.length})`);
  const n = buf.readUInt32LE(0);
  const flags = buf.readUInt32LE(4);
  const size = buf.readUInt32LE(8);
  const name = NAMES.get(n);
  if (!name) throw new VhostUserProtocolError('request', 'unknown or unsupported request', n);
  if (size > MAX_PAYLOAD) throw new VhostUserProtocolError('size', `payload of ${size} bytes is over the ${MAX_PAYLOAD}-byte limit`, name);
  if ((flags & FLAGS.VERSION_MASK) !== FLAGS.VERSION) throw new VhostUserProtocolError('flags', `protocol version ${flags & FLAGS.VERSION_MASK} (only version 1 exists)`, name);
  const known = FLAGS.VERSION_MASK | FLAGS.REPLY | FLAGS.NEED_REPLY;
  if (flags & ~known) throw new VhostUserProtocolError('flags', `unknown flag bits 0x${(flags & ~known).toString(16)}`, name);
  if (dir === 'request' && flags & FLAGS.REPLY) throw new VhostUserProtocolError('flags', 'a request with the REPLY flag set', name);
  if (dir === 'reply' && !(flags & FLAGS.REPLY)) throw new VhostUserProtocolError('flags', 'a reply without the REPLY flag', name);
  return { request: name, flags, size };
}

/** Decodes the payload of `request` (exactly `buf`, whose length is the header's size). */
export function decodePayload(name: RequestName, buf: Buffer, dir: Direction = 'request'): Payload {
  const spec = SPECS[name];
  const kind = dir === 'request' ? spec.request : (spec.reply ?? 'u64');
  const wrongSize = (want: string): VhostUserProtocolError =>
    new VhostUserProtocolError('payload', `a ${kind} payload is ${want} bytes (got ${buf.length})`, name);
  switch (kind) {
    case 'none':
      if (buf.length !== 0) throw wrongSize('0');
      return { kind };
    case 'u64':
      if (buf.length !== 8) throw wrongSize('8');
      return { kind, value: buf.readBigUInt64LE(0) };
    case 'vringState':
      if (buf.length !== 8) throw wrongSize('8');
      return { kind, index: buf.readUInt32LE(0), num: buf.readUInt32LE(4) };
    case 'vringFd': {
      if (buf.length !== 8) throw wrongSize('8');
      const v = buf.readBigUInt64LE(0);
      if (v & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) throw new VhostUserProtocolError('value', `unknown bits in 0x${v.toString(16)} (ring index 0..255, NOFD 0x100)`, name);
      return { kind, index: Number(v & BigInt(VRING_IDX_MASK)), noFd: (v & BigInt(VRING_NOFD_MASK)) !== 0n };
    }
    case 'vringAddr':
      if (buf.length !== 40) throw wrongSize('40');
      return {
        kind,
        index: buf.readUInt32LE(0),
        flags: buf.readUInt32LE(4),
        descAddr: buf.readBigUInt64LE(8),
        usedAddr: buf.readBigUInt64LE(16),
        availAddr: buf.readBigUInt64LE(24),
        logAddr: buf.readBigUInt64LE(32),
      };
    case 'memRegion':
      if (buf.length !== 8 + MEM_REGION_SIZE) throw wrongSize(String(8 + MEM_REGION_SIZE));
      return { kind, region: readRegion(buf, 8) };
    case 'memTable': {
      if (buf.length < 8) throw wrongSize('8 + 32 per region');
      const n = buf.readUInt32LE(0);
      if (n > MAX_MEM_REGIONS) throw new VhostUserProtocolError('regions', `${n} regions (at most ${MAX_MEM_REGIONS})`, name);
      // QEMU sends only the regions in use; some front-ends send the whole 8-region struct.
      const exact = 8 + n * MEM_REGION_SIZE;
      const full = 8 + MAX_MEM_REGIONS * MEM_REGION_SIZE;
      if (buf.length !== exact && buf.length !== full) throw wrongSize(`${exact} (or ${full})`);
      const regions: MemRegionDesc[] = [];
      for (let i = 0; i < n; i++) regions.push(readRegion(buf, 8 + i * MEM_REGION_SIZE));
      return { kind, regions };
    }
  }
}

/** Decodes one whole message (header + exactly its payload). */
export function decodeMessage(buf: Buffer, dir: Direction = 'request'): Message {
  const h = decodeHeader(buf, dir);
  if (buf.length !== HEADER_SIZE + h.size)
    throw new VhostUserProtocolError('payload', `header says ${h.size} payload bytes, ${buf.length - HEADER_SIZE} present`, h.request);
  return { request: h.request, flags: h.flags, payload: decodePayload(h.request, buf.subarray(HEADER_SIZE), dir) };
}

/**
 * The fds a request must carry: { min, max }.  SET_MEM_TABLE one per region,
 * ADD_MEM_REG one, REM_MEM_REG none (the spec lets a back-end accept and
 * close one, for front-ends that send it), SET_VRING_KICK/CALL/ERR one unless
 * NOFD, SET_LOG_BASE/SET_LOG_FD one; everything else none.
 */
export function fdRule(m: Message): { min: number; max: number } {
  const p = m.payload;
  switch (m.request) {
    case 'SET_MEM_TABLE':
      return p.kind === 'memTable' ? { min: p.regions.length, max: p.regions.length } : { min: 0, max: 0 };
    case 'ADD_MEM_REG':
    case 'SET_LOG_BASE':
    case 'SET_LOG_FD':
      return { min: 1, max: 1 };
    case 'REM_MEM_REG':
      return { min: 0, max: 1 };
    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR':
      return p.kind === 'vringFd' && !p.noFd ? { min: 1, max: 1 } : { min: 0, max: 0 };
    default:
      return { min: 0, max: 0 };
  }
}

/** Throws a VhostUserProtocolError('fds') unless `count` fds fit the request's rule. */
export function checkFds(m: Message, count: number): void {
  const { min, max } = fdRule(m);
  if (count < min) throw new VhostUserProtocolError('fds', `needs ${min === max ? min : `at least ${min}`} fd(s), ${count} arrived`, m.request);
  if (count > max) throw new VhostUserProtocolError('fds', `takes ${max === min ? max : `at most ${max}`} fd(s), ${count} arrived`, m.request);
}

/** One complete message's bytes and where it sits in the stream. */
export interface Frame {
  bytes: Buffer;
  /** Stream offset of its first byte and one past its last. */
  start: number;
  end: number;
}

/**
 * Cuts a byte stream into whole messages by their headers.  A header is
 * checked (decodeHeader) as soon as its 12 bytes are in, so an oversized or
 * unknown message is refused before its payload is waited for.
 */
export class Framer {
  #buf: Buffer = Buffer.alloc(0);
  /** Stream offset of #buf[0]. */
  #offset = 0;
  readonly #dir: Direction;

  constructor(dir: Direction = 'request') {
    this.#dir = dir;
  }

  /** Total bytes pushed so far. */
  get position(): number {
    return this.#offset + this.#buf.length;
  }

  /** Bytes of an incomplete message held. */
  get pending(): number {
    return this.#buf.length;
  }

  /** Adds bytes; returns every message now complete, in order.  Throws on a bad header (the framer is then unusable). */
  push(chunk: Buffer): Frame[] {
    this.#buf = this.#buf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.#buf, chunk]);
    const out: Frame[] = [];
    for (;;) {
      if (this.#buf.length < HEADER_SIZE) break;
      const h = decodeHeader(this.#buf, this.#dir);
      const total = HEADER_SIZE + h.size;
      if (this.#buf.length < total) break;
      out.push({ bytes: this.#buf.subarray(0, total), start: this.#offset, end: this.#offset + total });
      this.#buf = this.#buf.subarray(total);
      this.#offset += total;
    }
    return out;
  }
}
