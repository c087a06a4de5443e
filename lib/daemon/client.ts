/**
 * Client of the mqtap daemon (protocol: ./protocol.ts, docs/daemon.md).
 *
 * @example
 *   await using c = await DaemonClient.connect('/run/mqtap/mqtap.sock');
 *   await c.create({ name: 'vm1-net0', pairs: 4, persist: true });
 *   const a = await c.acquire('vm1-net0');   // a.tapFds / a.vhostFds, owned by a.fds
 *   ... spawn QEMU with them ...
 *   a.fds.close();
 *   await c.release('vm1-net0');
 *
 * Requests may be pipelined; the daemon answers one connection's requests
 * in order.  Every request is bounded by a timeout (default 30 s; unplug
 * gets its own wait on top).  fds received with a reply belong to the
 * returned ReceivedFds; a late reply (after its timeout) has its fds closed.
 */
import { ErrorCodes, MqtapError } from '../sys/errors';
import { ReceivedFds, UnixSocket } from '../sys/scm';
import {
  DEFAULT_SOCKET,
  MAX_FDS_PER_MESSAGE,
  ProtocolError,
  encodeRequest,
  parseReply,
  wireToError,
  type CreateArgs,
  type HotplugArgs,
  type Op,
  type RequestId,
  type VhostArg,
} from './protocol';

export interface DaemonClientOptions {
  /** Per request.  Default 30 000 ms. */
  timeoutMs?: number;
  /** Send `hello` at once (so an authorization error surfaces in connect()).  Default true. */
  hello?: boolean;
}

export interface HelloResult {
  protocol: number;
  version: string;
  pid: number;
  peer: { pid: number; uid: number; gid: number };
  maxRequestBytes: number;
  maxFdsPerMessage: number;
  netdevs: number;
}

export interface NetdevSummary {
  name: string;
  pairs: number;
  active: number;
  vhost: boolean;
  persist: boolean;
  created: boolean;
  netns: string | null;
  holding: boolean;
  lease: Record<string, unknown> | null;
  numQueues: number | null;
  numDisabledQueues: number | null;
}

export interface NetdevDetail extends NetdevSummary {
  createdAt: string;
  pairStates: Array<'enabled' | 'disabled' | 'closed'> | null;
  kernelPairStates: Array<'enabled' | 'disabled' | 'closed'> | null;
  kernel: Record<string, unknown> | null;
  /** While served over vhost-user: the socket, whether a front-end is connected, its live pairs and frame counts. */
  vhostUser: { socket: string; connected: boolean; connections: number; livePairs: number[]; txFrames: number; rxFrames: number; txDropped: number; rxDropped: number } | null;
}

export interface AcquiredNetdev {
  name: string;
  pairs: number;
  /** Tap queue fds of the pairs, in order (numbers owned by `fds`). */
  tapFds: number[];
  /** vhost-net fds of the pairs, in order (empty without vhost). */
  vhostFds: number[];
  /** Owns every received fd: take() what you keep, close() the rest. */
  fds: ReceivedFds;
}

export type CreateOptions = Partial<Omit<CreateArgs, 'name' | 'pairs'>> & { name: string; pairs: number };

interface Pending {
  id: RequestId;
  op: Op;
  resolve: (v: { result: Record<string, unknown>; fds: ReceivedFds }) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  /** Set once the reply came and fds are still expected. */
  result?: Record<string, unknown>;
  fds: number[];
  expect: number;
}

export class DaemonClient {
  readonly path: string;
  readonly timeoutMs: number;
  #sock: UnixSocket;
  #seq = 0;
  readonly #pending = new Map<RequestId, Pending>();
  #fatal: MqtapError | undefined;
  #server: HelloResult | undefined;

  private constructor(path: string, sock: UnixSocket, opts: DaemonClientOptions) {
    this.path = path;
    this.#sock = sock;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    sock.on('message', (data: Buffer, fds: ReceivedFds) => this.#onMessage(data, fds));
    sock.on('badmessage', (err: MqtapError) => this.#failOldest(err));
    sock.on('close', (err?: Error) => this.#onClose(err));
  }

  /** Connects (and, unless `hello: false`, says hello: EACCES surfaces here). */
  static async connect(path: string = process.env.MQTAP_SOCKET || DEFAULT_SOCKET, opts: DaemonClientOptions = {}): Promise<DaemonClient> {
    let sock: UnixSocket;
    try {
      sock = await UnixSocket.connect(path, { type: 'seqpacket', maxFds: MAX_FDS_PER_MESSAGE, maxMessageBytes: 256 * 1024, timeoutMs: opts.timeoutMs ?? 30_000 });
    } catch (err) {
      if (err instanceof MqtapError && (err.code === 'ENOENT' || err.code === 'ECONNREFUSED'))
        err.hint = `no mqtap daemon at ${path}: start one with \`mqtap daemon --socket ${path}\` (or give the right --socket / MQTAP_SOCKET)`;
      throw err;
    }
    const c = new DaemonClient(path, sock, opts);
    if (opts.hello !== false) {
      try {
        c.#server = await c.hello();
      } catch (err) {
        c.close();
        throw err;
      }
    }
    return c;
  }

  /** What the daemon said to `hello` (undefined with `hello: false`). */
  get server(): HelloResult | undefined {
    return this.#server;
  }

  get closed(): boolean {
    return this.#sock.closed;
  }

  /** Sends one request; resolves with the result and the fds that came with it. */
  request(op: Op, args: Record<string, unknown> = {}, opts: { timeoutMs?: number } = {}): Promise<{ result: Record<string, unknown>; fds: ReceivedFds }> {
    if (this.#fatal) return Promise.reject(this.#fatal);
    if (this.#sock.closed) return Promise.reject(new MqtapError({ op: 'DAEMON', code: ErrorCodes.CLOSED, message: `the connection to ${this.path} is closed` }));
    const id = ++this.#seq;
    let buf: Buffer;
    try {
      buf = encodeRequest(id, op, args);
    } catch (err) {
      return Promise.reject(err);
    }
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const p = this.#pending.get(id);
        if (!p) return;
        this.#pending.delete(id);
        new ReceivedFds(p.fds).close();
        reject(new MqtapError({ op: 'DAEMON', code: 'ETIMEDOUT', errno: 110, message: `daemon request ${op} timed out after ${timeoutMs} ms`, hint: 'the daemon is busy or stuck; see its log' }));
      }, timeoutMs);
      this.#pending.set(id, { id, op, resolve, reject, timer, fds: [], expect: 0 });
      this.#sock.send(buf).catch((err: Error) => {
        const p = this.#pending.get(id);
        if (!p) return;
        this.#pending.delete(id);
        clearTimeout(p.timer);
        reject(err);
      });
    });
  }

  async #call<T>(op: Op, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<T> {
    const r = await this.request(op, args, timeoutMs !== undefined ? { timeoutMs } : {});
    r.fds.close(); // only acquire sends fds
    return r.result as T;
  }

  hello(): Promise<HelloResult> {
    return this.#call('hello');
  }

  /** Creates a new tap (+ vhost-net fds) held by the daemon. */
  create(o: CreateOptions): Promise<NetdevDetail> {
    return this.#call('create', { ...o });
  }

  /** Attaches to an existing multi-queue tap (not created by the daemon; never persisted or deleted by it). */
  open(o: { name: string; pairs: number; vhost?: VhostArg; active?: number; netns?: string }): Promise<NetdevDetail> {
    return this.#call('open', { ...o });
  }

  async list(): Promise<NetdevSummary[]> {
    return (await this.#call<{ netdevs: NetdevSummary[] }>('list')).netdevs;
  }

  show(name: string): Promise<NetdevDetail> {
    return this.#call('show', { name });
  }

  setActive(name: string, pairs: number): Promise<NetdevDetail> {
    return this.#call('set-active', { name, pairs });
  }

  /** Lends the netdev's fds to this process (until release()). */
  async acquire(name: string): Promise<AcquiredNetdev> {
    const { result, fds } = await this.request('acquire', { name });
    const nTap = Number(result.tapFds);
    const nVhost = Number(result.vhostFds);
    return {
      name: String(result.name),
      pairs: Number(result.pairs),
      tapFds: Array.from({ length: nTap }, (_, i) => fds.peek(i)),
      vhostFds: Array.from({ length: nVhost }, (_, i) => fds.peek(nTap + i)),
      fds,
    };
  }

  release(name: string): Promise<NetdevDetail> {
    return this.#call('release', { name });
  }

  /** Hot-plugs the netdev into the QEMU whose QMP socket is `qmp`. */
  hotplug(name: string, o: Omit<HotplugArgs, 'name'>): Promise<NetdevDetail & { device: string; netdevId: string; qemu: string }> {
    return this.#call('hotplug', { name, ...o });
  }

  /** Hot-unplugs it again (waits up to `timeoutMs` for the guest, default the daemon's 60 s). */
  unplug(name: string, o: { timeoutMs?: number } = {}): Promise<NetdevDetail> {
    return this.#call('unplug', { name, ...o }, (o.timeoutMs ?? 60_000) + this.timeoutMs);
  }

  /**
   * Has the daemon serve the netdev's tap queues over a vhost-user socket
   * (QEMU: `-chardev socket,path=SOCKET -netdev vhost-user,chardev=...,queues=PAIRS`)
   * until stopVhostUser/release/delete.  `socket`: only root and the daemon's
   * uid may choose it; default <stateDir>/vhost-user/<name>.sock.
   */
  serveVhostUser(name: string, o: { socket?: string } = {}): Promise<NetdevDetail & { socket: string }> {
    return this.#call('serve-vhost-user', { name, ...o });
  }

  /** Stops serving it (the socket is removed; the daemon holds the queues again). */
  stopVhostUser(name: string): Promise<NetdevDetail & { stopped: string | null }> {
    return this.#call('stop-vhost-user', { name });
  }

  delete(name: string, o: { force?: boolean } = {}): Promise<{ name: string; deleted: boolean; deviceDeleted: boolean }> {
    return this.#call('delete', { name, ...o });
  }

  close(): void {
    this.#sock.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  #settle(p: Pending): void {
    this.#pending.delete(p.id);
    clearTimeout(p.timer);
    p.resolve({ result: p.result!, fds: new ReceivedFds(p.fds) });
  }

  #failOldest(err: MqtapError): void {
    const first = this.#pending.values().next();
    if (first.done) return;
    const p = first.value;
    this.#pending.delete(p.id);
    clearTimeout(p.timer);
    new ReceivedFds(p.fds).close();
    p.reject(err);
  }

  #onMessage(data: Buffer, fds: ReceivedFds): void {
    let msg;
    try {
      msg = parseReply(data);
    } catch (err) {
      fds.close();
      this.#sock.close(err as ProtocolError);
      return;
    }
    if ('fdChunk' in msg) {
      const p = this.#pending.get(msg.id);
      if (!p || p.result === undefined) {
        fds.close();
        return;
      }
      p.fds.push(...fds.takeAll());
      if (p.fds.length >= p.expect) this.#settle(p);
      return;
    }
    if (msg.id === null) {
      fds.close();
      const err = wireToError(msg.ok ? { code: 'EPROTO', message: 'a reply without an id' } : msg.error);
      // Connection-level refusals (authorization, too many clients): the daemon closes next.
      if (err.code === 'EACCES' || err.code === 'EAGAIN') {
        this.#fatal = err;
        for (const p of [...this.#pending.values()]) {
          this.#pending.delete(p.id);
          clearTimeout(p.timer);
          p.reject(err);
        }
        return;
      }
      this.#failOldest(err);
      return;
    }
    const p = this.#pending.get(msg.id);
    if (!p) {
      fds.close(); // a late reply: its request timed out
      return;
    }
    if (!msg.ok) {
      fds.close();
      this.#pending.delete(p.id);
      clearTimeout(p.timer);
      p.reject(wireToError(msg.error));
      return;
    }
    p.result = msg.result;
    p.fds.push(...fds.takeAll());
    p.expect = typeof msg.result.fdCount === 'number' ? msg.result.fdCount : 0;
    if (p.fds.length >= p.expect) this.#settle(p);
  }

  #onClose(err?: Error): void {
    const e =
      this.#fatal ??
      new MqtapError({ op: 'DAEMON', code: ErrorCodes.CLOSED, message: `the daemon closed the connection${err ? ` (${err.message})` : ''}`, ...(err ? { cause: err } : {}) });
    for (const p of [...this.#pending.values()]) {
      this.#pending.delete(p.id);
      clearTimeout(p.timer);
      new ReceivedFds(p.fds).close();
      p.reject(e);
    }
  }
}
