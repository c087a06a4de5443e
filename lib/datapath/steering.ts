/**
 * Userspace flow-steering helpers: the Toeplitz RSS hash (as computed by
 * RSS-capable NICs and by virtio-net's VIRTIO_NET_F_RSS / VIRTIO_NET_F_HASH_REPORT),
 * the hash-input layouts of Microsoft's RSS specification, an indirection
 * table lookup, and a simple flow-hash queue selector.
 *
 * @module
 */

/**
 * The default 40-byte RSS secret key from Microsoft's RSS specification
 * ("Verifying the RSS Hash Calculation"); also the default key of many NIC
 * drivers and of DPDK's test suite. Shared: do not mutate it; copy it with
 * `Buffer.from(MICROSOFT_RSS_KEY)` if you need a modifiable key.
 */
export const MICROSOFT_RSS_KEY: Readonly<Buffer> = Buffer.from(
  '6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa',
  'hex',
);

/**
 * Computes the Toeplitz hash of `input` with `key`, as specified by Microsoft
 * RSS: for every input bit, most significant bit of `input[0]` first, if the
 * bit is 1 XOR the result with the 32 key bits that start at that bit
 * position.
 *
 * @param key secret key; must be at least `input.length + 4` bytes long
 *   (40 bytes covers the 36-byte IPv6 4-tuple)
 * @param input hash input, e.g. from {@link rssInputIPv4} / {@link rssInputIPv6}
 * @returns the hash as an unsigned 32-bit integer
 * @throws {RangeError} if the key is too short for the input
 */
export function toeplitzHash(key: Uint8Array, input: Uint8Array): number {
  if (key.length < input.length + 4) {
    throw new RangeError(
      `Toeplitz key of ${key.length} bytes is too short for ${input.length} input bytes (need ${input.length + 4})`,
    );
  }
  let result = 0;
  // window: the 32 key bits aligned with the current input bit.
  let window = ((key[0]! << 24) | (key[1]! << 16) | (key[2]! << 8) | key[3]!) >>> 0;
  for (let i = 0; i < input.length; i++) {
    const byte = input[i]!;
    const next = key[i + 4]!;
    for (let bit = 7; bit >= 0; bit--) {
      if ((byte >> bit) & 1) {
        result ^= window;
      }
      window = ((window << 1) | ((next >> bit) & 1)) >>> 0;
    }
  }
  return result >>> 0;
}

/** An IP address as text ('66.9.149.187', '3ffe:2501:200:1fff::7') or as its raw network-order bytes. */
export type IpAddress = string | Uint8Array;

function parseIPv4(text: string): Buffer {
  const parts = text.split('.');
  if (parts.length !== 4 || !parts.every((p) => /^(0|[1-9]\d{0,2})$/.test(p) && Number(p) <= 255)) {
    throw new TypeError(`not a dotted-quad IPv4 address: '${text}'`);
  }
  return Buffer.from(parts.map(Number));
}

function parseHextets(groups: string[], text: string): number[] {
  return groups.map((g) => {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) {
      throw new TypeError(`not an IPv6 address: '${text}'`);
    }
    return parseInt(g, 16);
  });
}

/** Splits off an embedded dotted-quad tail ('::ffff:1.2.3.4') into two hextets. */
function expandIPv4Tail(groups: string[]): string[] {
  const last = groups[groups.length - 1];
  if (last === undefined || !last.includes('.')) {
    return groups;
  }
  const v4 = parseIPv4(last);
  return [...groups.slice(0, -1), v4.readUInt16BE(0).toString(16), v4.readUInt16BE(2).toString(16)];
}

function parseIPv6(text: string): Buffer {
  const halves = text.split('::');
  if (halves.length > 2 || text.includes('%')) {
    throw new TypeError(`not an IPv6 address (or has a zone id): '${text}'`);
  }
  const split = (s: string): string[] => (s === '' ? [] : s.split(':'));
  let groups: number[];
  if (halves.length === 2) {
    const head = parseHextets(split(halves[0]!), text);
    const tail = parseHextets(expandIPv4Tail(split(halves[1]!)), text);
    const missing = 8 - head.length - tail.length;
    if (missing < 1) {
      throw new TypeError(`not an IPv6 address: '${text}'`);
    }
    groups = [...head, ...new Array<number>(missing).fill(0), ...tail];
  } else {
    groups = parseHextets(expandIPv4Tail(split(text)), text);
  }
  if (groups.length !== 8) {
    throw new TypeError(`not an IPv6 address: '${text}'`);
  }
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(g, i * 2));
  return out;
}

/**
 * An address's network-order bytes (4 or 16), from text or from bytes of the right length.
 * @throws {TypeError} on a malformed address
 * @internal
 */
export function addressBytes(addr: IpAddress, family: 4 | 6): Buffer {
  const expected = family === 4 ? 4 : 16;
  if (typeof addr === 'string') {
    return family === 4 ? parseIPv4(addr) : parseIPv6(addr);
  }
  if (addr.length !== expected) {
    throw new TypeError(`IPv${family} address must be ${expected} bytes, got ${addr.length}`);
  }
  return Buffer.from(addr);
}

function portBytes(sport: number | undefined, dport: number | undefined): Buffer {
  if (sport === undefined && dport === undefined) {
    return Buffer.alloc(0);
  }
  if (sport === undefined || dport === undefined) {
    throw new TypeError('give both ports (4-tuple hash) or neither (2-tuple hash)');
  }
  for (const [name, port] of [
    ['sport', sport],
    ['dport', dport],
  ] as const) {
    if (!Number.isInteger(port) || port < 0 || port > 0xffff) {
      throw new RangeError(`${name} must be an integer in 0..65535, got ${String(port)}`);
    }
  }
  const out = Buffer.alloc(4);
  out.writeUInt16BE(sport, 0);
  out.writeUInt16BE(dport, 2);
  return out;
}

/**
 * Builds the Microsoft RSS hash input for IPv4: source address, destination
 * address and, for the TCP/UDP 4-tuple hash, source port and destination port,
 * all in network byte order (8 or 12 bytes).
 *
 * @param src source address
 * @param dst destination address
 * @param sport source port (give both ports or neither)
 * @param dport destination port
 * @throws {TypeError} on a malformed address or a single port
 * @throws {RangeError} on a port outside 0..65535
 */
export function rssInputIPv4(src: IpAddress, dst: IpAddress, sport?: number, dport?: number): Buffer {
  return Buffer.concat([addressBytes(src, 4), addressBytes(dst, 4), portBytes(sport, dport)]);
}

/**
 * Builds the Microsoft RSS hash input for IPv6 (without extension-header
 * address substitution): source address, destination address and optionally
 * source and destination ports, in network byte order (32 or 36 bytes).
 *
 * @param src source address, e.g. '3ffe:2501:200:1fff::7'
 * @param dst destination address
 * @param sport source port (give both ports or neither)
 * @param dport destination port
 * @throws {TypeError} on a malformed address or a single port
 * @throws {RangeError} on a port outside 0..65535
 */
export function rssInputIPv6(src: IpAddress, dst: IpAddress, sport?: number, dport?: number): Buffer {
  return Buffer.concat([addressBytes(src, 6), addressBytes(dst, 6), portBytes(sport, dport)]);
}

/**
 * Looks a hash up in an RSS indirection table: `table[hash & (table.length - 1)]`,
 * i.e. the low-order bits of the hash select the entry, as NICs and
 * virtio-net RSS (`indirection_table_mask`) do.
 *
 * @param hash a 32-bit hash, e.g. from {@link toeplitzHash}
 * @param table queue indices; its length must be a power of two
 * @returns the queue index stored in the selected entry
 * @throws {RangeError} if the table is empty or its length is not a power of two
 */
export function rssQueue(hash: number, table: readonly number[]): number {
  const n = table.length;
  if (n === 0 || (n & (n - 1)) !== 0) {
    throw new RangeError(`indirection table length must be a power of two, got ${n}`);
  }
  return table[(hash >>> 0) & (n - 1)]!;
}

/**
 * Builds an indirection table of `size` entries that spreads `numQueues`
 * queues round-robin (entry i → queue i % numQueues), the usual default
 * (cf. Linux `ethtool_rxfh_indir_default()`).
 *
 * @param size table length, a power of two (e.g. 128)
 * @param numQueues number of queues, at least 1
 */
export function defaultIndirectionTable(size: number, numQueues: number): number[] {
  if (!Number.isInteger(size) || size < 1 || (size & (size - 1)) !== 0) {
    throw new RangeError(`indirection table size must be a power of two, got ${String(size)}`);
  }
  if (!Number.isInteger(numQueues) || numQueues < 1) {
    throw new RangeError(`numQueues must be a positive integer, got ${String(numQueues)}`);
  }
  return Array.from({ length: size }, (_, i) => i % numQueues);
}

const FNV32_OFFSET = 0x811c9dc5;
const FNV32_PRIME = 0x01000193;

/**
 * 32-bit FNV-1a hash of a flow-key byte string (e.g. the output of
 * {@link rssInputIPv4} with ports). Deterministic and unkeyed — fine for
 * spreading flows over queues, not for resisting adversarial flow placement
 * (use {@link toeplitzHash} with a random key for that).
 *
 * @param flowKey the bytes identifying the flow
 * @returns an unsigned 32-bit hash
 */
export function flowHash(flowKey: Uint8Array): number {
  let h = FNV32_OFFSET;
  for (let i = 0; i < flowKey.length; i++) {
    h ^= flowKey[i]!;
    h = Math.imul(h, FNV32_PRIME);
  }
  return h >>> 0;
}

/**
 * Picks a queue for a flow in the style of Xen netback's
 * `xenvif_select_queue()`: `hash(flow) % numQueues`.
 *
 * What the kernel does: multi-queue xen-netback (Linux 3.16) picked
 * `skb_get_hash(skb) % num_queues`, where `skb_get_hash()` is the flow
 * dissector's 4-tuple hash (jhash with a random per-boot seed) or the hash
 * the NIC reported — values userspace cannot reproduce. Later kernels added
 * the frontend-controlled hash protocol: if the frontend configured Toeplitz,
 * the skb hash is recomputed with the frontend's key and the queue is
 * `mapping[hash % mappingSize]` (or `hash % real_num_tx_queues` without a
 * mapping table); with no algorithm configured it uses
 * `netdev_pick_tx() % real_num_tx_queues`.
 *
 * This function keeps the simple structure — a flow hash modulo the queue
 * count — with a documented, deterministic hash: {@link flowHash} (32-bit
 * FNV-1a) of `flowKey`. For the Toeplitz variant use
 * `rssQueue(toeplitzHash(key, input), table)` or `toeplitzHash(...) % n`.
 *
 * Note that `%` with a queue count that is not a power of two slightly
 * favours low queue numbers, and every flow may move when `numQueues`
 * changes; {@link rssQueue} with an indirection table avoids the latter.
 *
 * @param flowKey bytes identifying the flow, e.g. `rssInputIPv4(src, dst, sport, dport)`
 * @param numQueues number of queues, at least 1
 * @returns a queue index in 0..numQueues-1
 * @throws {RangeError} if `numQueues` is not a positive integer
 */
export function flowHashQueue(flowKey: Uint8Array, numQueues: number): number {
  if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 0xffff) {
    throw new RangeError(`numQueues must be an integer in 1..65535, got ${String(numQueues)}`);
  }
  return flowHash(flowKey) % numQueues;
}
