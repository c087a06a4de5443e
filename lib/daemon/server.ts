/**
 * The mqtap management daemon: holds netdevs (tap queues + vhost-net fds) on
 * behalf of local clients and speaks the protocol of ./protocol.ts over a
 * SOCK_SEQPACKET UNIX socket (docs/daemon.md).
 *
 * - Authorization: the socket file is 0600 (0660 with `group`), and every
 *   peer is checked with SO_PEERCRED at accept: root, the daemon's own uid,
 *   `allowUids`, and (with `group`) members of that group are served.  A
 *   refused peer gets one error message and the connection is closed; not
 *   one byte it sends is read.
 * - Robustness: each connection is served one request at a time (reading
 *   pauses until the reply is written: a client that does not read its
 *   replies only stalls itself); malformed, oversized (> 64 KiB: MSG_TRUNC)
 *   and fd-carrying requests (MSG_CTRUNC, the fds are closed) get an error
 *   reply and the connection stays usable; a client that vanishes mid-request
 *   changes nothing (an acquire whose reply could not be delivered drops its
 *   lease again).  At most `maxClients` connections.
 * - Logs: one pino line per request (peer pid/uid/gid, op, netdev, result,
 *   duration) and one per connection, refusal and lifecycle event.
 * - stop(): stops accepting, closes every connection, waits (bounded) for
 *   running operations, closes every netdev: non-persistent taps vanish,
 *   persistent ones stay and are re-adopted by the next start.
 */
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { MqtapError } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { UnixServer, peerAllowed, type UnixSocket } from '../sys/scm';
import {
  DEFAULT_SOCKET,
  DEFAULT_STATE_DIR,
  MAX_FDS_PER_MESSAGE,
  MAX_REQUEST_BYTES,
  PROTOCOL_VERSION,
  ProtocolCodes,
  ProtocolError,
  daemonError,
  encodeFdChunk,
  fdChunks,
  encodeReply,
  errorToWire,
  parseRequest,
  validateArgs,
  type ArgsByOp,
  type Op,
  type Reply,
  type RequestId,
} from './protocol';
import { Registry, type Peer } from './registry';
import { StateStore } from './state';

export interface DaemonOptions {
  /** Default /run/mqtap/mqtap.sock. */
  socketPath?: string;
  /** Default /run/mqtap. */
  stateDir?: string;
  /** Serve members of this gid too (socket 0660, chgrp'ed to it). */
  group?: number;
  /** Serve these uids too (root and the daemon's own uid always are). */
  allowUids?: number[];
  /** Default 256. */
  maxClients?: number;
  /** Default 10 000 ms. */
  qmpTimeoutMs?: number;
  /** Default 60 000 ms. */
  unplugTimeoutMs?: number;
  /** How long stop() waits for running operations.  Default 15 000 ms. */
  stopTimeoutMs?: number;
  /** Default 1024. */
  maxNetdevs?: number;
  logger?: Logger;
  /** For tests: device nodes. */
  devicePath?: string;
  vhostDevicePath?: string;
}

interface Outcome {
  result: Record<string, unknown>;
  fds?: number[];
  commit?: () => void;
  abort?: () => void;
}

let cachedVersion: string | undefined;

function version(): string {
  cachedVersion ??= readVersion();
  return cachedVersion;
}

function readVersion(): string {
  // lib/daemon/ in the sources, dist/lib/daemon/ when built.
  for (const rel of ['../../package.json', '../../../package.json']) {
    try {
      const p = JSON.parse(readFileSync(join(__dirname, rel), 'utf8')) as { name?: string; version: string };
      if (p.name === 'mqtap') return p.version;
    } catch {
      /* try the next */
    }
  }
  return 'unknown';
}


let connSeq = 0;

class Connection {
  readonly n = ++connSeq;
  readonly sock: UnixSocket;
  readonly peer: Peer;
  readonly log: Logger;
  readonly #daemon: MqtapDaemon;

  constructor(daemon: MqtapDaemon, sock: UnixSocket, peer: Peer, log: Logger) {
    this.#daemon = daemon;
    this.sock = sock;
    this.peer = peer;
    this.log = log.child({ conn: this.n, peer });
    sock.on('message', (data: Buffer, fds) => {
      fds.close(); // never happens with maxFds 0 (MSG_CTRUNC), but never keep any
      this.#serve(() => this.#request(data));
    });
    sock.on('badmessage', (err: MqtapError) => {
      this.#serve(async () => {
        const why = err.detail ?? err.message;
        this.log.warn({ op: null, ok: false, code: 'EMSGSIZE', why }, 'request refused');
        await this.#send({ id: null, ok: false, error: { code: 'EMSGSIZE', op: 'RECVMSG', message: `request refused: ${why}`, hint: `requests are single JSON messages of at most ${MAX_REQUEST_BYTES} bytes, without fds` } }).catch(() => undefined);
      });
    });
  }

  /** One request at a time: reading pauses until `fn` is done. */
  #serve(fn: () => Promise<void>): void {
    this.sock.pause();
    const done = fn()
      .catch((err: unknown) => this.log.error({ err }, 'unexpected error while serving a request'))
      .finally(() => {
        this.#daemon._untrack(done);
        if (!this.sock.closed) this.sock.resume();
      });
    this.#daemon._track(done);
  }

  #send(reply: Reply, fds: readonly number[] = []): Promise<void> {
    return this.sock.send(encodeReply(reply), fds);
  }

  async #request(data: Buffer): Promise<void> {
    const t0 = process.hrtime.bigint();
    const ms = (): number => Number((process.hrtime.bigint() - t0) / 1000n) / 1000;
    let id: RequestId | null = null;
    let op: Op | null = null;
    let name: string | undefined;
    let outcome: Outcome;
    try {
      const req = parseRequest(data);
      id = req.id;
      op = req.op;
      const args = validateArgs(req.op, req.args);
      name = (args as { name?: string }).name;
      outcome = await this.#daemon._dispatch(req.op, args, this.peer);
    } catch (err) {
      const wire = errorToWire(err);
      if (err instanceof ProtocolError && id === null) id = err.requestId;
      const level = wire.code === 'ERR_INTERNAL' ? 'error' : 'warn';
      this.log[level]({ id, op, name, ok: false, code: wire.code, error: wire.message, ms: ms(), ...(wire.code === 'ERR_INTERNAL' ? { err } : {}) }, 'request failed');
      await this.#send({ id, ok: false, error: wire }).catch(() => undefined);
      return;
    }
    const fds = outcome.fds ?? [];
    try {
      const [first = [], ...rest] = fdChunks(fds);
      const sending = [this.#send({ id: id!, ok: true, result: outcome.result }, first)];
      rest.forEach((chunk, i) => sending.push(this.sock.send(encodeFdChunk(id!, i + 1), chunk)));
      await Promise.all(sending);
    } catch (err) {
      outcome.abort?.();
      this.log.warn({ id, op, name, ok: false, code: 'EPIPE', error: (err as Error).message, ms: ms() }, 'reply not delivered (client gone); the operation was kept, a lease was dropped');
      return;
    }
    outcome.commit?.();
    this.log.info({ id, op, name, ok: true, fds: fds.length || undefined, ms: ms() }, 'request done');
  }
}

export class MqtapDaemon {
  readonly socketPath: string;
  readonly stateDir: string;
  readonly logger: Logger;
  readonly registry: Registry;
  readonly #opts: DaemonOptions;
  /** Holds the state dir's lock until stop() is done. */
  readonly #state: StateStore;
  #server: UnixServer | undefined;
  readonly #conns = new Set<Connection>();
  readonly #running = new Set<Promise<void>>();
  #stopping: Promise<void> | undefined;
  #resolveStopped!: () => void;
  /** Settles once stop() finished. */
  readonly stopped: Promise<void>;

  private constructor(opts: DaemonOptions, registry: Registry, state: StateStore, logger: Logger) {
    this.#opts = opts;
    this.#state = state;
    this.socketPath = opts.socketPath ?? DEFAULT_SOCKET;
    this.stateDir = opts.stateDir ?? DEFAULT_STATE_DIR;
    this.registry = registry;
    this.logger = logger;
    this.stopped = new Promise((r) => {
      this.#resolveStopped = r;
    });
  }

  /** Re-adopts the state dir's netdevs, then listens. */
  static async start(opts: DaemonOptions = {}): Promise<MqtapDaemon> {
    const logger = opts.logger ?? silentLogger;
    const stateDir = opts.stateDir ?? DEFAULT_STATE_DIR;
    const socketPath = opts.socketPath ?? DEFAULT_SOCKET;
    if (!socketPath.startsWith('/')) throw new MqtapError({ op: 'VALIDATE', code: 'ERR_INVALID_ARG', message: `the socket path must be absolute (got ${socketPath})` });
    if (opts.maxClients !== undefined && (!Number.isInteger(opts.maxClients) || opts.maxClients < 1))
      throw new MqtapError({ op: 'VALIDATE', code: 'ERR_INVALID_ARG', message: 'maxClients must be a positive integer' });
    const state = new StateStore(stateDir);
    // First: create and lock the state dir (one daemon per state dir).  A
    // second daemon stops here, before it reads a state file, creates a
    // socket or attaches a queue to the first one's taps.
    state.init();
    try {
      return await MqtapDaemon.#startLocked(opts, state, stateDir, socketPath, logger);
    } catch (err) {
      state.unlock();
      throw err;
    }
  }

  static async #startLocked(opts: DaemonOptions, state: StateStore, stateDir: string, socketPath: string, logger: Logger): Promise<MqtapDaemon> {
    mkdirSync(dirname(socketPath), { recursive: true, mode: 0o755 });
    const registry = new Registry({
      state,
      logger,
      ...(opts.qmpTimeoutMs !== undefined ? { qmpTimeoutMs: opts.qmpTimeoutMs } : {}),
      ...(opts.unplugTimeoutMs !== undefined ? { unplugTimeoutMs: opts.unplugTimeoutMs } : {}),
      ...(opts.maxNetdevs !== undefined ? { maxNetdevs: opts.maxNetdevs } : {}),
      ...(opts.devicePath !== undefined ? { devicePath: opts.devicePath } : {}),
      ...(opts.vhostDevicePath !== undefined ? { vhostDevicePath: opts.vhostDevicePath } : {}),
      ...(opts.group !== undefined ? { group: opts.group } : {}),
      ...(opts.allowUids !== undefined ? { allowUids: opts.allowUids } : {}),
    });
    const d = new MqtapDaemon({ ...opts, socketPath, stateDir }, registry, state, logger);
    // Listen first: a second daemon started on a socket already served fails
    // here, before it attaches queues to the running one's taps.  Adopting is
    // synchronous, so no connection is accepted before it is done.
    d.#server = await UnixServer.listen(socketPath, {
      type: 'seqpacket',
      mode: opts.group !== undefined ? 0o660 : 0o600,
      ...(opts.group !== undefined ? { group: opts.group } : {}),
      maxFds: 0,
      maxMessageBytes: MAX_REQUEST_BYTES,
      backlog: 256,
    });
    let adoption: ReturnType<Registry['adopt']>;
    try {
      adoption = registry.adopt();
    } catch (err) {
      registry.closeAll();
      d.#server.close();
      throw err;
    }
    d.#server.on('connection', (sock: UnixSocket) => d.#accept(sock));
    d.#server.on('acceptError', (err: unknown) => logger.error({ err }, 'accept failed; retrying in 100 ms'));
    logger.info({ socket: socketPath, stateDir, pid: process.pid, group: opts.group ?? null, allowUids: opts.allowUids ?? [], ...adoption }, 'daemon listening');
    return d;
  }

  /** @internal */
  _track(p: Promise<void>): void {
    this.#running.add(p);
  }

  /** @internal */
  _untrack(p: Promise<void>): void {
    this.#running.delete(p);
  }

  #refusal(peer: Peer): string | undefined {
    return peerAllowed(peer, this.#opts) ? undefined : `uid ${peer.uid} (pid ${peer.pid}) is not allowed to use this daemon`;
  }

  #accept(sock: UnixSocket): void {
    sock.pause(); // nothing is read before the peer is checked
    if (this.#stopping) {
      sock.close();
      return;
    }
    let peer: Peer;
    try {
      peer = sock.peerCred();
    } catch (err) {
      this.logger.warn({ err }, 'SO_PEERCRED failed; connection closed');
      sock.close();
      return;
    }
    const refusal = this.#refusal(peer);
    if (refusal) {
      this.logger.warn({ peer, ok: false, code: 'EACCES' }, `connection refused: ${refusal}`);
      const hint = this.#opts.group !== undefined ? `only root, uid ${process.geteuid?.()} and members of gid ${this.#opts.group} are served` : `only root and uid ${process.geteuid?.()} are served (start the daemon with --group to serve a group)`;
      sock
        .send(encodeReply({ id: null, ok: false, error: { code: 'EACCES', errno: 13, op: 'AUTH', message: `permission denied: ${refusal}`, hint } }))
        .catch(() => undefined)
        .finally(() => sock.close());
      return;
    }
    if (this.#conns.size >= (this.#opts.maxClients ?? 256)) {
      this.logger.warn({ peer, ok: false, code: 'EAGAIN', clients: this.#conns.size }, 'connection refused: too many clients');
      sock
        .send(encodeReply({ id: null, ok: false, error: { code: 'EAGAIN', errno: 11, op: 'ACCEPT', message: `too many clients (${this.#conns.size})`, hint: 'try again later' } }))
        .catch(() => undefined)
        .finally(() => sock.close());
      return;
    }
    const conn = new Connection(this, sock, peer, this.logger);
    this.#conns.add(conn);
    conn.log.debug({ clients: this.#conns.size }, 'client connected');
    sock.on('close', (err?: Error) => {
      this.#conns.delete(conn);
      conn.log.debug({ clients: this.#conns.size, err: err?.message }, 'client disconnected');
    });
    sock.resume();
  }

  /** @internal runs one validated request. */
  async _dispatch(op: Op, args: ArgsByOp[Op], peer: Peer): Promise<Outcome> {
    if (this.#stopping) throw daemonError(ProtocolCodes.SHUTDOWN, 'the daemon is shutting down');
    const r = this.registry;
    switch (op) {
      case 'hello':
        return { result: { protocol: PROTOCOL_VERSION, version: version(), pid: process.pid, peer, maxRequestBytes: MAX_REQUEST_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE, netdevs: r.size } };
      case 'create':
        return { result: r.create(args as ArgsByOp['create']) };
      case 'open':
        return { result: r.open(args as ArgsByOp['open']) };
      case 'list':
        return { result: r.list() };
      case 'show':
        return { result: r.show((args as ArgsByOp['show']).name) };
      case 'set-active':
        return { result: await r.setActive(args as ArgsByOp['set-active']) };
      case 'acquire': {
        const a = await r.acquire((args as ArgsByOp['acquire']).name, peer);
        return { result: a.result, fds: a.fds, commit: a.commit, abort: a.abort };
      }
      case 'release':
        return { result: await r.release((args as ArgsByOp['release']).name) };
      case 'hotplug':
        return { result: await r.hotplug(args as ArgsByOp['hotplug'], peer) };
      case 'unplug':
        return { result: await r.unplug(args as ArgsByOp['unplug']) };
      case 'delete':
        return { result: await r.delete(args as ArgsByOp['delete']) };
      case 'serve-vhost-user':
        return { result: await r.serveVhostUser(args as ArgsByOp['serve-vhost-user'], peer) };
      case 'stop-vhost-user':
        return { result: await r.stopVhostUser((args as ArgsByOp['stop-vhost-user']).name) };
    }
  }

  /**
   * Stops accepting (the socket file is removed), closes every client,
   * waits up to stopTimeoutMs for running operations, closes every netdev.
   */
  stop(): Promise<void> {
    if (this.#stopping) return this.#stopping;
    this.#stopping = (async () => {
      this.logger.info({ clients: this.#conns.size, running: this.#running.size }, 'daemon stopping');
      this.#server?.close();
      for (const c of [...this.#conns]) c.sock.close();
      if (this.#running.size > 0) {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          Promise.allSettled([...this.#running]),
          new Promise<void>((r) => {
            timer = setTimeout(() => {
              this.logger.warn({ running: this.#running.size }, 'operations still running at the stop timeout; closing anyway');
              r();
            }, this.#opts.stopTimeoutMs ?? 15_000);
          }),
        ]);
        clearTimeout(timer);
      }
      const held = this.registry.names();
      this.registry.closeAll();
      this.#state.unlock();
      this.logger.info({ closed: held }, 'daemon stopped; persistent taps stay');
      this.#resolveStopped();
    })();
    return this.#stopping;
  }
}
