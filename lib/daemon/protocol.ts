/**
 * The mqtap daemon's wire protocol (docs/daemon.md), version 1.
 *
 * Transport: a SOCK_SEQPACKET UNIX socket.  One message = one UTF-8 JSON
 * object; the kernel keeps message boundaries, so there is no framing to get
 * wrong, and fds (SCM_RIGHTS) travel attached to exactly the message they
 * belong to.  A request larger than MAX_REQUEST_BYTES arrives truncated
 * (MSG_TRUNC) and is refused with EMSGSIZE.  Clients never send fds.
 *
 *   request:  {"id": 7, "op": "set-active", "args": {"name": "mqt0", "pairs": 2}}
 *   reply:    {"id": 7, "ok": true, "result": {...}}
 *             {"id": 7, "ok": false, "error": {"code": "EBUSY", "message": "...", "hint": "..."}}
 *   fds:      a reply with result.fdCount > 0 carries the first
 *             MAX_FDS_PER_MESSAGE fds; the rest follow in messages
 *             {"id": 7, "fdChunk": 1}, {"id": 7, "fdChunk": 2}, ...
 *
 * This module is pure (no syscalls): parsing and validating requests and
 * replies, shared by the daemon, the client and the unit tests.
 */
import { ErrorCodes, MqtapError, invalidArg } from '../sys/errors';
import { MAX_QUEUES, parseMac, rejectUnknownKeys, validateBoolean, validateIfName, validateInt, validateMtu, validateOneOf, validateVnetHdrSize, type VnetHdrSize } from '../sys/validate';
import { validateQemuId } from '../qemu/qemu';

export const PROTOCOL_VERSION = 1;
/** Largest request the daemon reads (bigger: EMSGSIZE). */
export const MAX_REQUEST_BYTES = 64 * 1024;
/** Largest reply the daemon sends (a SOCK_SEQPACKET message must fit the socket's send buffer, ~208 KiB by default). */
export const MAX_REPLY_BYTES = 192 * 1024;
/** fds per message, both ways (the kernel's limit is 253). */
export const MAX_FDS_PER_MESSAGE = 64;
export const DEFAULT_STATE_DIR = '/run/mqtap';
export const DEFAULT_SOCKET = '/run/mqtap/mqtap.sock';

export const OPS = ['hello', 'create', 'open', 'list', 'show', 'set-active', 'acquire', 'release', 'hotplug', 'unplug', 'delete', 'serve-vhost-user', 'stop-vhost-user'] as const;
export type Op = (typeof OPS)[number];
export type RequestId = number | string;

/** Codes the protocol itself uses (besides errno names and lib/errors ErrorCodes). */
export const ProtocolCodes = {
  /** Not JSON, not an object, bad id/op/args types. */
  PROTOCOL: 'ERR_PROTOCOL',
  UNKNOWN_OP: 'ERR_UNKNOWN_OP',
  /** The daemon is shutting down. */
  SHUTDOWN: 'ERR_SHUTDOWN',
} as const;

export interface Request {
  id: RequestId;
  op: Op;
  args: Record<string, unknown>;
}

export interface WireError {
  code: string;
  message: string;
  op?: string;
  hint?: string;
  errno?: number;
  ifname?: string;
}

export type Reply = { id: RequestId | null; ok: true; result: Record<string, unknown> } | { id: RequestId | null; ok: false; error: WireError };

/** A continuation message carrying more fds of reply `id`. */
export interface FdChunk {
  id: RequestId;
  fdChunk: number;
}

/** A request that could not be understood; `requestId` is set when the id was readable. */
export class ProtocolError extends MqtapError {
  requestId: RequestId | null;
  constructor(message: string, requestId: RequestId | null = null, code: string = ProtocolCodes.PROTOCOL) {
    super({ op: 'PROTOCOL', code, message });
    this.requestId = requestId;
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function isRequestId(v: unknown): v is RequestId {
  return (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) || (typeof v === 'string' && v.length > 0 && v.length <= 64);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Parses one JSON message (strict UTF-8, an object), or throws ProtocolError. */
function parseJsonMessage(buf: Buffer | Uint8Array): Record<string, unknown> {
  let text: string;
  try {
    text = utf8.decode(buf);
  } catch {
    throw new ProtocolError('the message is not valid UTF-8');
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ProtocolError(`the message is not JSON (${(err as Error).message})`);
  }
  if (!isObject(value)) throw new ProtocolError('the message must be a JSON object');
  return value;
}

/**
 * Parses a request message: {id, op, args?}.  Throws ProtocolError (with
 * requestId when the id was readable) for anything else; the op's arguments
 * are checked separately by validateArgs().
 */
export function parseRequest(buf: Buffer | Uint8Array): Request {
  if (buf.length > MAX_REQUEST_BYTES) throw new ProtocolError(`the request is larger than ${MAX_REQUEST_BYTES} bytes`, null, 'EMSGSIZE');
  const m = parseJsonMessage(buf);
  const id = isRequestId(m.id) ? m.id : null;
  if (id === null) throw new ProtocolError('"id" must be a non-negative integer or a string of 1..64 characters');
  for (const k of Object.keys(m)) if (k !== 'id' && k !== 'op' && k !== 'args') throw new ProtocolError(`unknown field "${k}" (a request has id, op, args)`, id);
  if (typeof m.op !== 'string') throw new ProtocolError('"op" must be a string', id);
  if (!(OPS as readonly string[]).includes(m.op)) throw new ProtocolError(`unknown op "${m.op.slice(0, 64)}" (known: ${OPS.join(', ')})`, id, ProtocolCodes.UNKNOWN_OP);
  const args = m.args === undefined ? {} : m.args;
  if (!isObject(args)) throw new ProtocolError('"args" must be an object', id);
  return { id, op: m.op as Op, args };
}

// ---------------------------------------------------------------- op arguments

export type VhostArg = 'on' | 'off' | 'auto';

export interface CreateArgs {
  name: string;
  pairs: number;
  vhost: VhostArg;
  persist: boolean;
  active?: number;
  mtu?: number;
  mac?: string;
  up?: boolean;
  owner?: number;
  group?: number;
  vnetHdrSize?: VnetHdrSize;
  netns?: string;
}

export interface OpenArgs {
  name: string;
  pairs: number;
  vhost: VhostArg;
  active?: number;
  netns?: string;
}

export interface NameArgs {
  name: string;
}

export interface SetActiveArgs {
  name: string;
  pairs: number;
}

export interface HotplugArgs {
  name: string;
  qmp: string;
  id: string;
  netdevId?: string;
  bus?: string;
  addr?: string;
  mac?: string;
}

export interface UnplugArgs {
  name: string;
  timeoutMs?: number;
}

export interface ServeVhostUserArgs {
  name: string;
  /** Where to listen (default <stateDir>/vhost-user/<name>.sock); only root and the daemon's uid may choose. */
  socket?: string;
}

export interface DeleteArgs {
  name: string;
  force: boolean;
}

export interface ArgsByOp {
  hello: Record<string, never>;
  create: CreateArgs;
  open: OpenArgs;
  list: Record<string, never>;
  show: NameArgs;
  'set-active': SetActiveArgs;
  acquire: NameArgs;
  release: NameArgs;
  hotplug: HotplugArgs;
  unplug: UnplugArgs;
  delete: DeleteArgs;
  'serve-vhost-user': ServeVhostUserArgs;
  'stop-vhost-user': NameArgs;
}


function optional<T>(args: Record<string, unknown>, key: string, check: (v: unknown) => T): T | undefined {
  return args[key] === undefined ? undefined : check(args[key]);
}

function validateNetns(v: unknown): string {
  if (typeof v !== 'string' || v === '' || v.includes('\0') || Buffer.byteLength(v) > 4096) throw invalidArg('netns must be a namespace name (under /run/netns) or a path');
  return v;
}

function validateAbsPath(v: unknown, what: string): string {
  if (typeof v !== 'string' || !v.startsWith('/') || v.includes('\0') || Buffer.byteLength(v) > 107) throw invalidArg(`${what} must be an absolute path of at most 107 bytes (a UNIX socket path)`);
  return v;
}


const vhostArg = (v: unknown): VhostArg => validateOneOf(v, 'vhost', ['on', 'off', 'auto'] as const);
const pairsArg = (v: unknown): number => validateInt(v, 'pairs', 1, MAX_QUEUES);
const nameArg = (v: unknown): string => validateIfName(v, 'name');

/**
 * Checks and normalises the arguments of `op` (unknown keys, types, ranges).
 * Throws an MqtapError with code ERR_INVALID_ARG; nothing has been done then.
 */
export function validateArgs<O extends Op>(op: O, args: Record<string, unknown>): ArgsByOp[O] {
  const a = args;
  switch (op) {
    case 'hello':
    case 'list':
      rejectUnknownKeys(a, [], op);
      return {} as ArgsByOp[O];
    case 'create': {
      rejectUnknownKeys(a, ['name', 'pairs', 'vhost', 'persist', 'active', 'mtu', 'mac', 'up', 'owner', 'group', 'vnetHdrSize', 'netns'], op);
      const out: CreateArgs = {
        name: validateIfName(a.name, 'name', { template: true }),
        pairs: pairsArg(a.pairs),
        vhost: a.vhost === undefined ? 'auto' : vhostArg(a.vhost),
        persist: a.persist === undefined ? false : validateBoolean(a.persist, 'persist'),
      };
      const active = optional(a, 'active', (v) => validateInt(v, 'active', 1, out.pairs));
      if (active !== undefined) out.active = active;
      const mtu = optional(a, 'mtu', validateMtu);
      if (mtu !== undefined) out.mtu = mtu;
      if (a.mac !== undefined) {
        parseMac(a.mac);
        out.mac = a.mac as string;
      }
      const up = optional(a, 'up', (v) => validateBoolean(v, 'up'));
      if (up !== undefined) out.up = up;
      const owner = optional(a, 'owner', (v) => validateInt(v, 'owner', 0, 0xfffffffe));
      if (owner !== undefined) out.owner = owner;
      const group = optional(a, 'group', (v) => validateInt(v, 'group', 0, 0xfffffffe));
      if (group !== undefined) out.group = group;
      const hdr = optional(a, 'vnetHdrSize', validateVnetHdrSize);
      if (hdr !== undefined) out.vnetHdrSize = hdr;
      const netns = optional(a, 'netns', validateNetns);
      if (netns !== undefined) out.netns = netns;
      return out as ArgsByOp[O];
    }
    case 'open': {
      rejectUnknownKeys(a, ['name', 'pairs', 'vhost', 'active', 'netns'], op);
      const out: OpenArgs = { name: nameArg(a.name), pairs: pairsArg(a.pairs), vhost: a.vhost === undefined ? 'auto' : vhostArg(a.vhost) };
      const active = optional(a, 'active', (v) => validateInt(v, 'active', 1, out.pairs));
      if (active !== undefined) out.active = active;
      const netns = optional(a, 'netns', validateNetns);
      if (netns !== undefined) out.netns = netns;
      return out as ArgsByOp[O];
    }
    case 'show':
    case 'acquire':
    case 'release':
    case 'stop-vhost-user':
      rejectUnknownKeys(a, ['name'], op);
      return { name: nameArg(a.name) } as ArgsByOp[O];
    case 'set-active':
      rejectUnknownKeys(a, ['name', 'pairs'], op);
      return { name: nameArg(a.name), pairs: pairsArg(a.pairs) } as ArgsByOp[O];
    case 'hotplug': {
      rejectUnknownKeys(a, ['name', 'qmp', 'id', 'netdevId', 'bus', 'addr', 'mac'], op);
      const out: HotplugArgs = { name: nameArg(a.name), qmp: validateAbsPath(a.qmp, 'qmp'), id: validateQemuId(a.id, 'id') };
      const netdevId = optional(a, 'netdevId', (v) => validateQemuId(v, 'netdevId'));
      if (netdevId !== undefined) out.netdevId = netdevId;
      const bus = optional(a, 'bus', (v) => {
        if (typeof v !== 'string' || v === '' || v.length > 128) throw invalidArg('bus must be a non-empty string');
        return v;
      });
      if (bus !== undefined) out.bus = bus;
      const addr = optional(a, 'addr', (v) => {
        if (typeof v !== 'string' || !/^[0-9a-fA-F]{1,2}(\.[0-7])?$/.test(v)) throw invalidArg('addr must look like "0" or "1f.0"');
        return v;
      });
      if (addr !== undefined) out.addr = addr;
      if (a.mac !== undefined) {
        parseMac(a.mac);
        out.mac = a.mac as string;
      }
      return out as ArgsByOp[O];
    }
    case 'unplug': {
      rejectUnknownKeys(a, ['name', 'timeoutMs'], op);
      const out: UnplugArgs = { name: nameArg(a.name) };
      const t = optional(a, 'timeoutMs', (v) => validateInt(v, 'timeoutMs', 100, 600_000));
      if (t !== undefined) out.timeoutMs = t;
      return out as ArgsByOp[O];
    }
    case 'serve-vhost-user': {
      rejectUnknownKeys(a, ['name', 'socket'], op);
      const out: ServeVhostUserArgs = { name: nameArg(a.name) };
      const socket = optional(a, 'socket', (v) => validateAbsPath(v, 'socket'));
      if (socket !== undefined) out.socket = socket;
      return out as ArgsByOp[O];
    }
    case 'delete':
      rejectUnknownKeys(a, ['name', 'force'], op);
      return { name: nameArg(a.name), force: a.force === undefined ? false : validateBoolean(a.force, 'force') } as ArgsByOp[O];
    default:
      throw new ProtocolError(`unknown op "${String(op)}"`, null, ProtocolCodes.UNKNOWN_OP);
  }
}

// ---------------------------------------------------------------- replies

/** An error as it travels: code, message and what else is known. */
export function errorToWire(err: unknown): WireError {
  if (err instanceof MqtapError) {
    const w: WireError = { code: err.code, message: err.message };
    if (err.op) w.op = err.op;
    if (err.hint) w.hint = err.hint;
    if (err.errno !== undefined) w.errno = err.errno;
    if (err.ifname) w.ifname = err.ifname;
    return w;
  }
  return { code: 'ERR_INTERNAL', message: `internal error: ${err instanceof Error ? err.message : String(err)}` };
}

/** The MqtapError a client throws for a wire error. */
export function wireToError(w: WireError): MqtapError {
  return new MqtapError({
    op: w.op ?? 'DAEMON',
    code: w.code,
    message: w.message,
    ...(w.errno !== undefined ? { errno: w.errno } : {}),
    ...(w.hint !== undefined ? { hint: w.hint } : {}),
    ...(w.ifname !== undefined ? { ifname: w.ifname } : {}),
  });
}

export function encodeRequest(id: RequestId, op: Op, args: Record<string, unknown> = {}): Buffer {
  const b = Buffer.from(JSON.stringify({ id, op, args }), 'utf8');
  if (b.length > MAX_REQUEST_BYTES) throw invalidArg(`the ${op} request is larger than ${MAX_REQUEST_BYTES} bytes`);
  return b;
}

/** Encodes a reply; one too large to send becomes an EMSGSIZE error reply. */
export function encodeReply(reply: Reply): Buffer {
  const b = Buffer.from(JSON.stringify(reply), 'utf8');
  if (b.length <= MAX_REPLY_BYTES) return b;
  return Buffer.from(JSON.stringify({ id: reply.id, ok: false, error: { code: 'EMSGSIZE', message: `the reply would be ${b.length} bytes, more than ${MAX_REPLY_BYTES}` } } satisfies Reply), 'utf8');
}

export function encodeFdChunk(id: RequestId, chunk: number): Buffer {
  return Buffer.from(JSON.stringify({ id, fdChunk: chunk } satisfies FdChunk), 'utf8');
}

/** Splits fds into the per-message groups the daemon sends (at most MAX_FDS_PER_MESSAGE each). */
export function fdChunks<T>(fds: readonly T[], per = MAX_FDS_PER_MESSAGE): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < fds.length; i += per) out.push(fds.slice(i, i + per));
  return out;
}

/** Parses a message from the daemon: a reply or an fd chunk.  Throws ProtocolError. */
export function parseReply(buf: Buffer | Uint8Array): Reply | FdChunk {
  const m = parseJsonMessage(buf);
  const id = m.id === null ? null : isRequestId(m.id) ? m.id : undefined;
  if (id === undefined) throw new ProtocolError('a reply has no valid "id"');
  if (typeof m.fdChunk === 'number') {
    if (id === null || !Number.isInteger(m.fdChunk) || m.fdChunk < 1) throw new ProtocolError('a bad fd chunk message');
    return { id, fdChunk: m.fdChunk };
  }
  if (m.ok === true) {
    if (!isObject(m.result)) throw new ProtocolError('a successful reply has no "result" object');
    return { id, ok: true, result: m.result };
  }
  if (m.ok === false) {
    const e = m.error;
    if (!isObject(e) || typeof e.code !== 'string' || typeof e.message !== 'string') throw new ProtocolError('an error reply has no "error" {code, message}');
    const w: WireError = { code: e.code, message: e.message };
    if (typeof e.op === 'string') w.op = e.op;
    if (typeof e.hint === 'string') w.hint = e.hint;
    if (typeof e.errno === 'number') w.errno = e.errno;
    if (typeof e.ifname === 'string') w.ifname = e.ifname;
    return { id, ok: false, error: w };
  }
  throw new ProtocolError('a reply needs "ok": true or false');
}

/** Shorthand for errors the daemon raises about its own state. */
export function daemonError(code: string, message: string, hint?: string, ifname?: string): MqtapError {
  const errnos: Record<string, number> = { ENODEV: 19, EEXIST: 17, EBUSY: 16, EACCES: 13, EMSGSIZE: 90, ENOSPC: 28 };
  return new MqtapError({ op: 'DAEMON', code, message, ...(errnos[code] !== undefined ? { errno: errnos[code] } : {}), ...(hint !== undefined ? { hint } : {}), ...(ifname !== undefined ? { ifname } : {}) });
}

export { ErrorCodes };
