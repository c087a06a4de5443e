/**
 * Input validation, done in JavaScript before any syscall (as better-sqlite3
 * validates every option before native code): a bad argument is refused
 * with a message that names it, and nothing is opened or changed.
 */
import { invalidArg } from './errors';

/** The kernel's limit on queues per tap (MAX_TAP_QUEUES in drivers/net/tun.c). */
export const MAX_QUEUES = 256;
/** IFNAMSIZ - 1: the longest interface name in bytes. */
export const MAX_IFNAME_BYTES = 15;
/** The tap driver's MTU range (ETH_MIN_MTU .. 65535 - ETH_HLEN). */
export const MIN_MTU = 68;
export const MAX_MTU = 65521;
/** virtio-net header sizes: legacy, with num_buffers (VERSION_1 / MRG_RXBUF), with hash report. */
export const VNET_HDR_SIZES = [10, 12, 20] as const;
export type VnetHdrSize = (typeof VNET_HDR_SIZES)[number];

/** A value for an error message; never throws (BigInt, symbols, cycles). */
export function show(value: unknown): string {
  if (typeof value === 'bigint') return `${value}n`;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/**
 * Checks an interface name the way the kernel's dev_valid_name() does, before
 * any syscall.  With `template`, one '%d' is allowed (the kernel picks the
 * number, e.g. 'mqt%d' -> 'mqt0').
 */
export function validateIfName(name: unknown, what = 'name', opts: { template?: boolean } = {}): string {
  if (typeof name !== 'string') throw invalidArg(`${what} must be a string (got ${typeof name})`);
  if (name.length === 0) throw invalidArg(`${what} must not be empty`, 'give an interface name such as "tap0" or a template such as "mqt%d"');
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_IFNAME_BYTES)
    throw invalidArg(`${what} "${name}" is ${bytes} bytes; interface names are at most ${MAX_IFNAME_BYTES} bytes`, 'use a shorter name');
  if (name === '.' || name === '..') throw invalidArg(`${what} must not be "." or ".."`);
  if (name.includes('/')) throw invalidArg(`${what} "${name}" must not contain "/"`);
  if (name.includes(':')) throw invalidArg(`${what} "${name}" must not contain ":" (that is alias syntax)`);
  // The kernel's isspace() also counts byte 0xA0 (it is in UTF-8 of e.g. "à").
  if (/[\s\0]/.test(name) || Buffer.from(name, 'utf8').includes(0xa0))
    throw invalidArg(`${what} ${JSON.stringify(name)} must not contain whitespace or NUL (the kernel also counts byte 0xA0 as a space)`);
  const percents = name.split('%').length - 1;
  if (percents > 0) {
    if (!opts.template) throw invalidArg(`${what} "${name}" must not contain "%" here`, 'name an existing device, not a template');
    if (percents !== 1 || !name.includes('%d'))
      throw invalidArg(`${what} "${name}" is not a valid template: use exactly one "%d" (e.g. "mqt%d")`);
  }
  return name;
}

/** True when `name` is a kernel name template such as 'mqt%d'. */
export function isTemplate(name: string): boolean {
  return name.includes('%d');
}

export function validateInt(value: unknown, what: string, min: number, max: number, hint?: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value))
    throw invalidArg(`${what} must be an integer (got ${show(value)})`, hint);
  if (value < min || value > max) throw invalidArg(`${what} must be between ${min} and ${max} (got ${value})`, hint);
  return value;
}

export function validateQueueCount(n: unknown, what = 'queues'): number {
  return validateInt(n, what, 1, MAX_QUEUES, `a tap has 1 to ${MAX_QUEUES} queues`);
}

/** tx_queue_len: the kernel takes a u32 (IFLA_TXQLEN); 0 would make a tap drop every frame, so it is refused here. */
export function validateTxQueueLen(n: unknown, what = 'txQueueLen'): number {
  return validateInt(n, what, 1, 0xffffffff, "the frames each queue's ring holds before the kernel drops: the batch the reader takes, times the bursts it must absorb (docs/datapath.md)");
}

export function validateMtu(mtu: unknown): number {
  return validateInt(mtu, 'mtu', MIN_MTU, MAX_MTU);
}

/** A uid or gid as the kernel takes it (not -1, which means "none"). */
export function validateId(id: unknown, what: 'owner' | 'group'): number {
  return validateInt(id, what, 0, 0xfffffffe, `${what} is a numeric ${what === 'owner' ? 'uid' : 'gid'}`);
}

export function validateVnetHdrSize(size: unknown): VnetHdrSize {
  if (!VNET_HDR_SIZES.includes(size as VnetHdrSize))
    throw invalidArg(
      `vnetHdrSize must be one of ${VNET_HDR_SIZES.join(', ')} (got ${show(size)})`,
      '10 is struct virtio_net_hdr, 12 adds num_buffers (needed by vhost with VERSION_1 or MRG_RXBUF)',
    );
  return size as VnetHdrSize;
}

/**
 * Any MAC address written as six hex pairs ('52:54:00:12:34:56' or with '-'),
 * unicast, multicast or broadcast, as its 6 bytes.  `what` names the argument
 * in the error.
 */
export function macBytes(mac: unknown, what = 'mac'): Buffer {
  if (typeof mac !== 'string' || !/^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$/.test(mac))
    throw invalidArg(`${what} must look like 52:54:00:12:34:56 (got ${show(mac)})`);
  return Buffer.from(mac.split(/[:-]/).map((h) => parseInt(h, 16)));
}

/** Parses 'aa:bb:cc:dd:ee:ff' (or '-' separated) into 6 bytes; refuses multicast and all-zero (a device's own address). */
export function parseMac(mac: unknown): Buffer {
  const bytes = macBytes(mac);
  if (bytes[0]! & 1) throw invalidArg(`mac ${mac} is a multicast address`, 'the first octet must be even, e.g. 52:54:00:...');
  if (bytes.every((b) => b === 0)) throw invalidArg('mac must not be all zeros');
  return bytes;
}

export function formatMac(bytes: Buffer): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join(':');
}

export function validateBoolean(value: unknown, what: string): boolean {
  if (typeof value !== 'boolean') throw invalidArg(`${what} must be true or false (got ${show(value)})`);
  return value;
}

export function validateOneOf<T extends string>(value: unknown, what: string, allowed: readonly T[]): T {
  if (!allowed.includes(value as T))
    throw invalidArg(`${what} must be one of ${allowed.map((a) => `'${a}'`).join(', ')} (got ${show(value)})`);
  return value as T;
}

/** Refuses option names the function does not know (catches typos such as `queue: 4`). */
export function rejectUnknownKeys(opts: object, known: readonly string[], what: string): void {
  for (const key of Object.keys(opts)) {
    if (!known.includes(key)) throw invalidArg(`${what}: unknown option "${key}" (known: ${known.join(', ')})`);
  }
}
