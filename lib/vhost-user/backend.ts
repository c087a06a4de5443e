/**
 * serveVhostUser: mqtap as the vhost-user backend of a QEMU (or any
 * vhost-user net front-end) over a UNIX socket, one front-end after another,
 * bridging virtqueue pair i to tap queue i (docs/vhost-user.md).
 *
 * - Server mode (default): listens at `socket` (0600, or 0660 with `group`);
 *   every peer is checked with SO_PEERCRED before one byte is read (root,
 *   this process's uid, `allowUids`, members of `group`).  A second
 *   front-end while one is connected is refused.  QEMU:
 *   `-chardev socket,id=c0,path=SOCK -netdev vhost-user,id=n0,chardev=c0,queues=N`.
 * - Client mode (`client: true`): connects to a front-end listening at
 *   `socket` (QEMU's `-chardev socket,...,server=on`), retrying until it
 *   answers, and again after each disconnect.
 *
 * Events: 'connected' ({ pid, uid, gid }), 'features' (acked bigint, names),
 * 'pairs' ({ enabled, live }), 'disconnected' ({ reason?, counters?: the
 * connection's last per-pair counters }), 'error' (err: only emitted when
 * someone listens; otherwise logged).
 */
import { EventEmitter } from 'node:events';
import { invalidArg, type MqtapError } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { UnixServer, UnixSocket, peerAllowed } from '../sys/scm';
import { rejectUnknownKeys, validateBoolean, validateId, validateQueueCount } from '../sys/validate';
import { openTap, type ExistingPolicy, type Tap } from '../tap/tap';
import { VhostUserConnection, offeredFeatures, type PairsState, type VhostUserOffloads } from './connection';
import type { DataPlane, PairCounters, TapEngineChoice } from './dataplane-api';
import { openDataPlane, validateDataPlaneOptions } from './dataplane';
import { MAX_MEM_REGIONS } from './protocol';

export interface ServeVhostUserOptions {
  /** Absolute path of the UNIX socket (listened on, or connected to with `client`). */
  socket: string;
  /** A tap to serve (kept open at close()), or... */
  tap?: Tap;
  /** ...the name of the tap to open (closed again at close()). */
  name?: string;
  /** Queue pairs: 1..256 (the tap needs at least this many open queues). */
  queues: number;
  /** How to treat an existing tap of that name (with `name`; default 'allow'). */
  existing?: ExistingPolicy;
  /** Connect to the front-end instead of listening. */
  client?: boolean;
  /** Offloads offered to the guest (default: csum, tso4, tso6, ecn). */
  offloads?: VhostUserOffloads;
  /** Server mode: socket group (mode becomes 0660) and extra uids served. */
  group?: number;
  allowUids?: number[];
  /** Client mode: wait this long between attempts (default 200 ms). */
  retryMs?: number;
  /** The data plane for each connection (default: the native one, lib/vhost-user/dataplane.ts). */
  dataPlane?: (pairs: number) => DataPlane;
  /** The native data plane's tap I/O (default 'auto': io_uring batches where it can be set up, else one writev/read per frame). Not with `dataPlane`. */
  tapEngine?: TapEngineChoice;
  netns?: string;
  logger?: Logger;
}

const KEYS = ['socket', 'tap', 'name', 'queues', 'existing', 'client', 'offloads', 'group', 'allowUids', 'retryMs', 'dataPlane', 'tapEngine', 'netns', 'logger'] as const;
const OFFLOAD_KEYS = ['csum', 'tso4', 'tso6', 'ecn'] as const;


/** PairCounters with numbers instead of bigints (JSON logs). */
export function countersForLog(c: PairCounters): Record<string, number | string> {
  const out: Record<string, number | string> = {};
  for (const [k, v] of Object.entries(c)) out[k] = typeof v === 'bigint' ? Number(v) : v;
  return out;
}

export class VhostUserBackend extends EventEmitter {
  readonly socket: string;
  readonly pairs: number;
  readonly client: boolean;
  readonly tap: Tap;
  /** Feature bits offered to every front-end (the same across reconnects). */
  readonly features: bigint;
  readonly #ownsTap: boolean;
  readonly #opts: ServeVhostUserOptions;
  readonly #log: Logger;
  readonly #makeDataPlane: (pairs: number) => DataPlane;
  #server: UnixServer | undefined;
  #conn: VhostUserConnection | undefined;
  #closed = false;
  #retry: NodeJS.Timeout | undefined;
  #connections = 0;

  /** @internal use serveVhostUser(). */
  constructor(opts: ServeVhostUserOptions, tap: Tap, ownsTap: boolean) {
    super();
    this.#opts = opts;
    this.socket = opts.socket;
    this.pairs = opts.queues;
    this.client = opts.client ?? false;
    this.tap = tap;
    this.#ownsTap = ownsTap;
    this.#log = opts.logger ?? silentLogger;
    const tapEngine = opts.tapEngine ?? 'auto';
    this.#makeDataPlane = opts.dataPlane ?? ((pairs: number) => openDataPlane(pairs, { tapEngine }));
    this.features = offeredFeatures(opts.offloads);
  }

  /** True while a front-end is connected. */
  get connected(): boolean {
    return this.#conn !== undefined && !this.#conn.closed;
  }

  /** Front-ends served so far. */
  get connections(): number {
    return this.#connections;
  }

  get closed(): boolean {
    return this.#closed;
  }

  pairsState(): PairsState {
    if (this.#conn && !this.#conn.closed) return this.#conn.pairsState();
    return { enabled: this.tap.queues.slice(0, this.pairs).filter((q) => q.state === 'enabled').map((q) => q.index), live: [] };
  }

  /** Per-pair counters of the current connection (zeros when none). */
  counters(): PairCounters[] {
    const zero = (): PairCounters => ({ txFrames: 0n, txBytes: 0n, txDropped: 0n, rxFrames: 0n, rxBytes: 0n, rxDropped: 0n, kicks: 0n, calls: 0n, txSyscalls: 0n, rxSyscalls: 0n, wakeups: 0n, tapEngine: 'none', tapEngineErrno: 0, tapEngineSyscall: '' });
    return Array.from({ length: this.pairs }, (_, p) => (this.#conn && !this.#conn.closed ? (this.#conn.counters(p) ?? zero()) : zero()));
  }

  /** @internal */
  async _start(): Promise<void> {
    if (this.client) {
      this.#dial();
      return;
    }
    this.#server = await UnixServer.listen(this.socket, {
      type: 'stream',
      maxFds: MAX_MEM_REGIONS * 2,
      ...(this.#opts.group !== undefined ? { group: this.#opts.group, mode: 0o660 } : {}),
    });
    this.#server.on('connection', (sock: UnixSocket) => this.#accept(sock));
    this.#server.on('acceptError', (err: Error) => this.#error(err));
    this.#log.info({ socket: this.socket, ifname: this.tap.name, pairs: this.pairs }, 'vhost-user backend listening');
  }

  #refusal(peer: { pid: number; uid: number; gid: number }): string | undefined {
    return peerAllowed(peer, this.#opts) ? undefined : `uid ${peer.uid} (pid ${peer.pid}) is not allowed to use this vhost-user socket`;
  }

  #accept(sock: UnixSocket): void {
    sock.pause(); // nothing is read before the peer is checked
    if (this.#closed) {
      sock.close();
      return;
    }
    let peer: { pid: number; uid: number; gid: number };
    try {
      peer = sock.peerCred();
    } catch (err) {
      this.#log.warn({ err }, 'vhost-user: SO_PEERCRED failed; connection closed');
      sock.close();
      return;
    }
    const refusal = this.#refusal(peer);
    if (refusal) {
      this.#log.warn({ peer }, `vhost-user: refused: ${refusal}`);
      sock.close();
      return;
    }
    if (this.connected) {
      this.#log.warn({ peer }, 'vhost-user: refused: a front-end is already connected (one at a time)');
      sock.close();
      return;
    }
    this.#serve(sock, peer);
  }

  #dial(): void {
    if (this.#closed) return;
    UnixSocket.connect(this.socket, { type: 'stream', maxFds: MAX_MEM_REGIONS * 2, timeoutMs: 1000 }).then(
      (sock) => {
        if (this.#closed) {
          sock.close();
          return;
        }
        let peer = { pid: 0, uid: 0, gid: 0 };
        try {
          peer = sock.peerCred();
        } catch {
          /* the connection just failed; 'close' follows */
        }
        this.#serve(sock, peer);
      },
      (err: MqtapError) => {
        this.#log.debug({ socket: this.socket, code: err.code }, 'vhost-user: front-end not there yet; retrying');
        this.#scheduleDial();
      },
    );
  }

  #scheduleDial(): void {
    if (this.#closed) return;
    this.#retry = setTimeout(() => {
      this.#retry = undefined;
      this.#dial();
    }, this.#opts.retryMs ?? 200);
  }

  #serve(sock: UnixSocket, peer: { pid: number; uid: number; gid: number }): void {
    let dp: DataPlane;
    try {
      dp = this.#makeDataPlane(this.pairs);
    } catch (err) {
      sock.close();
      this.#error(err as Error);
      if (this.client) this.#scheduleDial();
      return;
    }
    let conn: VhostUserConnection;
    try {
      conn = new VhostUserConnection({ sock, tap: this.tap, pairs: this.pairs, dataPlane: dp, features: this.features, logger: this.#log.child({ conn: this.#connections + 1 }) });
    } catch (err) {
      sock.close();
      dp.close();
      this.#error(err as Error);
      if (this.client) this.#scheduleDial();
      return;
    }
    this.#connections++;
    this.#conn = conn;
    conn.on('features', (acked: bigint, names: string[]) => this.emit('features', acked, names));
    conn.on('pairs', (s: PairsState) => this.emit('pairs', s));
    conn.on('close', (err?: Error) => {
      if (this.#conn === conn) this.#conn = undefined;
      const counters = conn.finalCounters;
      this.#log.info({ reason: err?.message, ...(counters ? { counters: counters.map(countersForLog) } : {}) }, 'vhost-user front-end disconnected');
      this.emit('disconnected', { ...(err ? { reason: err.message, error: err } : {}), ...(counters ? { counters } : {}) });
      if (this.client) this.#scheduleDial();
    });
    this.#log.info({ peer, socket: this.socket }, 'vhost-user front-end connected');
    this.emit('connected', peer);
    sock.resume();
  }

  #error(err: Error): void {
    this.#log.warn({ err }, 'vhost-user backend error');
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  /** Stops serving: closes the connection (rings stopped, guest memory unmapped), the socket, and the tap if it opened it. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#retry) clearTimeout(this.#retry);
    this.#server?.close();
    this.#conn?.close();
    this.#conn = undefined;
    if (this.#ownsTap) this.tap.close();
    this.#log.info({ socket: this.socket }, 'vhost-user backend closed');
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Starts a vhost-user backend (see the module comment).  Bad options: MqtapError before anything is opened. */
export async function serveVhostUser(opts: ServeVhostUserOptions): Promise<VhostUserBackend> {
  if (typeof opts !== 'object' || opts === null) throw invalidArg('serveVhostUser(options): options must be an object with { socket, tap | name, queues }');
  rejectUnknownKeys(opts, KEYS, 'serveVhostUser');
  if (typeof opts.socket !== 'string' || !opts.socket.startsWith('/')) throw invalidArg(`socket must be an absolute path (got ${String(opts.socket)})`);
  const queues = validateQueueCount(opts.queues);
  if ((opts.tap === undefined) === (opts.name === undefined)) throw invalidArg('give exactly one of tap (an open Tap) and name (a tap to open)');
  if (opts.client !== undefined) validateBoolean(opts.client, 'client');
  if (opts.offloads !== undefined) {
    if (typeof opts.offloads !== 'object' || opts.offloads === null) throw invalidArg('offloads must be an object such as { csum: true, tso4: true }');
    rejectUnknownKeys(opts.offloads, OFFLOAD_KEYS, 'offloads');
    for (const k of OFFLOAD_KEYS) if (opts.offloads[k] !== undefined) validateBoolean(opts.offloads[k], `offloads.${k}`);
    if ((opts.offloads.tso4 || opts.offloads.tso6) && !opts.offloads.csum) throw invalidArg('offloads: tso4/tso6 need csum as well', 'virtio-net segmentation offloads depend on checksum offload');
  }
  if (opts.group !== undefined) validateId(opts.group, 'group');
  if (opts.allowUids !== undefined && (!Array.isArray(opts.allowUids) || opts.allowUids.some((u) => !Number.isInteger(u) || u < 0))) throw invalidArg('allowUids must be an array of uids');
  if (opts.retryMs !== undefined && (!Number.isInteger(opts.retryMs) || opts.retryMs < 1 || opts.retryMs > 60_000)) throw invalidArg('retryMs must be 1..60000');
  if (opts.dataPlane !== undefined && typeof opts.dataPlane !== 'function') throw invalidArg('dataPlane must be a function (pairs) => DataPlane');
  if (opts.tapEngine !== undefined) {
    validateDataPlaneOptions({ tapEngine: opts.tapEngine });
    if (opts.dataPlane !== undefined) throw invalidArg('tapEngine applies to the native data plane, not to one given with dataPlane', 'pass the engine to your own data plane instead');
  }
  if (opts.client && (opts.group !== undefined || opts.allowUids !== undefined)) throw invalidArg('group and allowUids apply to a listening socket, not to client: true');
  let tap: Tap;
  let owns = false;
  if (opts.tap) {
    tap = opts.tap;
    const open = tap.queues.slice(0, queues).filter((q) => q.state !== 'closed').length;
    if (open < queues) throw invalidArg(`${tap.name} has ${open} open queue(s) among the first ${queues}; vhost-user pair i needs tap queue i`);
    if (!tap.vnetHdr) throw invalidArg(`${tap.name} was opened without vnetHdr; the guest's frames carry a virtio-net header`, 'open the tap with vnetHdr: true (the default)');
  } else {
    tap = openTap({ name: opts.name!, queues, existing: opts.existing ?? 'allow', vnetHdr: true, ...(opts.netns !== undefined ? { netns: opts.netns } : {}), ...(opts.logger ? { logger: opts.logger } : {}) });
    owns = true;
  }
  const backend = new VhostUserBackend({ ...opts, queues }, tap, owns);
  try {
    await backend._start();
  } catch (err) {
    await backend.close();
    throw err;
  }
  return backend;
}
