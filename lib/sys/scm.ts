/**
 * UNIX sockets that carry fds (SCM_RIGHTS), on the Node event loop.
 *
 * Node's `net` module cannot send or receive ancillary data, and a socket
 * read by libuv with plain read(2) silently drops any fds that arrive.  So
 * every socket here is read and written only with the addon's recvmsg/sendmsg
 * (native/scm.cc), and a libuv poll handle (FdPoll, uv_poll_t) tells us when
 * the fd is readable or writable: no busy polling, no thread, no second
 * reader that could lose fds.  docs/daemon.md has the measurements behind
 * this choice.
 *
 * Ownership:
 * - A UnixSocket / UnixServer owns its fd from creation (all O_CLOEXEC and
 *   O_NONBLOCK) and closes it in close().
 * - Received fds belong to a ReceivedFds object the moment recvmsg returns.
 *   take() moves one to the caller; close() (or garbage collection of an
 *   object nobody closed) closes the rest.  A message that arrives with no
 *   'message' listener has its fds closed at once.
 * - Sending never transfers ownership: the kernel duplicates the fds into
 *   the message; the caller closes its own copies whenever it likes after the
 *   send() promise settles.
 */
import { EventEmitter } from 'node:events';
import { chmodSync, chownSync, lstatSync, readFileSync, renameSync, rmSync, unlinkSync, type Stats } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { ErrorCodes, MqtapError, fsStep, invalidArg } from './errors';
import { K, native } from './native';

/** The kernel's SCM_MAX_FD: the most fds one sendmsg can carry. */
export const SCM_MAX_FD = 253;
/** fds accepted per received message unless a socket says otherwise. */
export const DEFAULT_MAX_FDS = 64;

interface ScmConstants {
  SOCK_STREAM: number;
  SOCK_SEQPACKET: number;
  UV_READABLE: number;
  UV_WRITABLE: number;
}
const C = K as unknown as ScmConstants;

type NativeFdPoll = InstanceType<(typeof native)['FdPoll']>;

/**
 * 'seqpacket': message boundaries kept by the kernel, one message per
 * send()/'message' (the daemon's protocol).  'stream': a byte stream, each
 * 'message' is whatever one recvmsg returned (QEMU's QMP socket).
 */
export type SocketType = 'stream' | 'seqpacket';

function sockType(t: SocketType): number {
  if (t === 'stream') return C.SOCK_STREAM;
  if (t === 'seqpacket') return C.SOCK_SEQPACKET;
  throw invalidArg(`socket type must be 'stream' or 'seqpacket' (got ${String(t)})`);
}

const orphanedFds = new FinalizationRegistry<number[]>((fds) => {
  for (const fd of fds) {
    if (fd < 0) continue;
    try {
      native.close(fd);
    } catch {
      /* nothing to report to: the owner is gone */
    }
  }
});

/**
 * The fds that arrived with one message.  The object owns them: take(i)
 * hands one over (the caller then closes it), close() closes every fd not
 * taken.  If the object is garbage-collected without close(), the fds not
 * taken are closed then.
 */
export class ReceivedFds {
  readonly #fds: number[];

  /** @internal */
  constructor(fds: number[]) {
    this.#fds = fds;
    if (fds.length > 0) orphanedFds.register(this, fds, this);
  }

  /** How many fds arrived (taken and closed ones included). */
  get length(): number {
    return this.#fds.length;
  }

  /** How many are still owned here. */
  get remaining(): number {
    return this.#fds.filter((fd) => fd >= 0).length;
  }

  /** The fd number at `i` without taking it (valid only while this object owns it), or -1. */
  peek(i: number): number {
    return this.#fds[i] ?? -1;
  }

  /** Takes fd `i`: the caller owns (and must close) it from now on. */
  take(i: number): number {
    const fd = this.#fds[i];
    if (fd === undefined || fd < 0) throw invalidArg(`received fd ${i} does not exist or was already taken/closed`);
    this.#fds[i] = -1;
    return fd;
  }

  /** Takes every fd still owned here, in order. */
  takeAll(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.#fds.length; i++) if (this.#fds[i]! >= 0) out.push(this.take(i));
    return out;
  }

  /** Closes every fd not taken.  Idempotent. */
  close(): void {
    let first: unknown;
    for (let i = 0; i < this.#fds.length; i++) {
      const fd = this.#fds[i]!;
      if (fd < 0) continue;
      this.#fds[i] = -1;
      try {
        native.close(fd);
      } catch (err) {
        first ??= err;
      }
    }
    orphanedFds.unregister(this);
    if (first) throw first;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

export interface UnixSocketOptions {
  /**
   * Receive buffer: the largest message accepted on a seqpacket socket
   * (bigger ones are refused with EMSGSIZE, their fds closed), the read size
   * on a stream socket.  Default 64 KiB.
   */
  maxMessageBytes?: number;
  /** fds accepted per received message (more: EMSGSIZE, all closed).  0..253, default 64. */
  maxFds?: number;
}

export interface ConnectOptions extends UnixSocketOptions {
  type: SocketType;
  /** Give up after this long when the listener's backlog stays full.  Default 5000 ms. */
  timeoutMs?: number;
}

interface PendingSend {
  buf: Buffer;
  offset: number;
  fds: readonly number[];
  resolve: () => void;
  reject: (err: Error) => void;
}

function closedError(what: string): MqtapError {
  return new MqtapError({ op: 'SOCKET', code: ErrorCodes.CLOSED, message: `${what}: the socket is closed` });
}


/**
 * The receive buffer of every socket in the process.  A read copies its bytes
 * out before anything else can run, so one buffer serves all sockets; each
 * reads through a view of its own maxMessageBytes (the kernel truncates, and
 * reports MSG_TRUNC, at that length), one cached view per length.  With a
 * buffer per socket, a daemon allocated 64 KiB per connection that only a
 * garbage collection gave back: RSS climbed by tens of MiB over a thousand
 * short sessions.  Grows to the largest maxMessageBytes read with; when the
 * sockets that needed more than the default (64 KiB) are all closed, it is
 * dropped (and allocated again, at what the open sockets need, on the next
 * read), so one 16 MiB socket does not keep 16 MiB for the process's life.
 * A reader holding an older buffer still reads into valid memory.
 */
const DEFAULT_MAX_BYTES = 64 * 1024;
let recvScratch: Buffer = Buffer.alloc(0);
/** Views of recvScratch by length (cleared with it). */
const recvViews = new Map<number, Buffer>();
/** maxMessageBytes of the open sockets: length -> how many. */
const openLengths = new Map<number, number>();

function recvBuffer(size: number): Buffer {
  let view = recvViews.get(size);
  if (view) return view;
  if (recvScratch.length < size) {
    recvScratch = Buffer.allocUnsafeSlow(size);
    recvViews.clear();
  }
  view = recvScratch.length === size ? recvScratch : recvScratch.subarray(0, size);
  recvViews.set(size, view);
  return view;
}

function holdRecvBuffer(size: number): void {
  openLengths.set(size, (openLengths.get(size) ?? 0) + 1);
}

function releaseRecvBuffer(size: number): void {
  const n = (openLengths.get(size) ?? 1) - 1;
  if (n > 0) openLengths.set(size, n);
  else openLengths.delete(size);
  const need = Math.max(DEFAULT_MAX_BYTES, ...openLengths.keys());
  if (recvScratch.length > need) {
    recvScratch = Buffer.alloc(0);
    recvViews.clear();
  }
}

/** @internal For tests: the shared receive buffer's length, and the view a socket of `size` reads into. */
export const _recvScratch = { bytes: (): number => recvScratch.length, view: recvBuffer };

/** Validates a socket's type and limits (before any fd exists where possible: listen/connect/pair call it first). */
function socketLimits(type: SocketType, opts: UnixSocketOptions): { maxBytes: number; maxFds: number } {
  sockType(type);
  const maxBytes = opts.maxMessageBytes ?? DEFAULT_MAX_BYTES;
  if (!Number.isInteger(maxBytes) || maxBytes < 1 || maxBytes > 16 * 1024 * 1024) throw invalidArg('maxMessageBytes must be 1..16 MiB');
  const maxFds = opts.maxFds ?? DEFAULT_MAX_FDS;
  if (!Number.isInteger(maxFds) || maxFds < 0 || maxFds > SCM_MAX_FD) throw invalidArg(`maxFds must be 0..${SCM_MAX_FD}`);
  return { maxBytes, maxFds };
}

/**
 * A connected UNIX socket read and written with recvmsg/sendmsg.
 *
 * Events:
 * - 'message' (data: Buffer, fds: ReceivedFds): one message (seqpacket) or
 *   one chunk (stream).  The listener owns `fds`.
 * - 'badmessage' (err: MqtapError): a message was refused (EMSGSIZE:
 *   truncated data or control data; its fds are already closed).  Without a
 *   listener the socket closes with that error.
 * - 'end': the peer closed its end; the socket closes right after.
 * - 'close' (err?: Error): the socket is closed; `err` when an error closed it.
 *   There is no 'error' event: nothing here can crash a process by lacking
 *   a listener.
 */
export class UnixSocket extends EventEmitter {
  readonly type: SocketType;
  #fd: number;
  #poll: NativeFdPoll | undefined;
  /** maxMessageBytes: the length of the view of the shared receive buffer. */
  readonly #maxBytes: number;
  readonly #maxFds: number;
  #sendQueue: PendingSend[] = [];
  #reading = true;
  #wantWrite = false;
  #closed = false;
  #events = -1;
  #refed = true;

  /** Adopts a connected socket fd (this object owns and closes it). */
  constructor(fd: number, type: SocketType, opts: UnixSocketOptions = {}) {
    super();
    this.type = type;
    let maxBytes: number;
    let maxFds: number;
    try {
      ({ maxBytes, maxFds } = socketLimits(type, opts));
    } catch (err) {
      native.close(fd); // adopted: owned from the first line
      throw err;
    }
    this.#maxBytes = maxBytes;
    this.#maxFds = maxFds;
    this.#fd = fd;
    try {
      this.#poll = new native.FdPoll(fd, (status, events) => this.#onPoll(status, events));
    } catch (err) {
      this.#fd = -1;
      native.close(fd);
      throw err;
    }
    holdRecvBuffer(maxBytes);
    // Start reading on the next tick, so a caller can attach listeners first.
    queueMicrotask(() => this.#updatePoll());
  }

  /** Connects to a listening UNIX socket at `path`. */
  static async connect(path: string, opts: ConnectOptions): Promise<UnixSocket> {
    const type = sockType(opts.type);
    socketLimits(opts.type, opts);
    const deadline = Date.now() + (opts.timeoutMs ?? 5000);
    for (let delay = 2; ; delay = Math.min(delay * 2, 100)) {
      const fd = native.unixSocket(type);
      let ok: boolean;
      try {
        ok = native.unixConnect(fd, path);
      } catch (err) {
        native.close(fd);
        throw explainConnect(err, path);
      }
      if (ok) return new UnixSocket(fd, opts.type, opts);
      native.close(fd);
      if (Date.now() >= deadline)
        throw new MqtapError({ op: 'CONNECT', code: 'ETIMEDOUT', errno: 110, detail: path, message: `connect ${path}: the listener's backlog stayed full`, hint: 'the server is overloaded or stuck' });
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  /** A connected pair (socketpair). */
  static pair(type: SocketType, opts: UnixSocketOptions = {}): [UnixSocket, UnixSocket] {
    socketLimits(type, opts);
    const [a, b] = native.unixSocketPair(sockType(type));
    let sa: UnixSocket | undefined;
    try {
      sa = new UnixSocket(a, type, opts);
    } catch (err) {
      native.close(b);
      throw err;
    }
    try {
      return [sa, new UnixSocket(b, type, opts)];
    } catch (err) {
      sa.close();
      throw err;
    }
  }

  /** The socket fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes waiting in this process to be written. */
  get pendingSends(): number {
    return this.#sendQueue.length;
  }

  /** The peer's pid/uid/gid as of connect() (SO_PEERCRED). */
  peerCred(): { pid: number; uid: number; gid: number } {
    if (this.#closed) throw closedError('SO_PEERCRED');
    return native.peerCred(this.#fd);
  }

  /**
   * Queues `data` (with `fds` attached to its first byte) and resolves once
   * the kernel took all of it.  On a seqpacket socket it is one message.
   * Rejects when the socket closes first or sendmsg fails (EPIPE, ...).
   */
  send(data: Buffer | string, fds: readonly number[] = []): Promise<void> {
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    if (this.#closed) return Promise.reject(closedError('send'));
    if (fds.length > SCM_MAX_FD) return Promise.reject(invalidArg(`at most ${SCM_MAX_FD} fds per message (got ${fds.length})`));
    if (fds.length > 0 && buf.length === 0) return Promise.reject(invalidArg('fds must travel with at least one byte of data'));
    return new Promise<void>((resolve, reject) => {
      this.#sendQueue.push({ buf, offset: 0, fds, resolve, reject });
      if (this.#sendQueue.length === 1) this.#flush();
    });
  }

  /** Stops reading (backpressure); queued messages stay in the kernel. */
  pause(): void {
    this.#reading = false;
    this.#updatePoll();
  }

  resume(): void {
    this.#reading = true;
    this.#updatePoll();
  }

  /** Lets the process exit while this socket is open (like net.Socket.unref). */
  unref(): void {
    this.#refed = false;
    this.#poll?.unref();
  }

  ref(): void {
    this.#refed = true;
    this.#poll?.ref();
  }

  /** Closes the socket (pending sends reject).  Idempotent. */
  close(err?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#poll?.close();
    this.#poll = undefined;
    const fd = this.#fd;
    this.#fd = -1;
    try {
      native.close(fd);
    } catch {
      /* EBADF cannot happen: the fd was ours */
    }
    releaseRecvBuffer(this.#maxBytes);
    const pending = this.#sendQueue.splice(0);
    for (const p of pending) p.reject(err ?? closedError('send'));
    this.emit('close', err);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #updatePoll(): void {
    if (this.#closed || !this.#poll) return;
    const events = (this.#reading ? C.UV_READABLE : 0) | (this.#wantWrite ? C.UV_WRITABLE : 0);
    if (events === this.#events) return;
    this.#events = events;
    if (events === 0) this.#poll.stop();
    else {
      this.#poll.start(events);
      if (!this.#refed) this.#poll.unref();
    }
  }

  #onPoll(status: number, events: number): void {
    if (this.#closed) return;
    if (status < 0) {
      // POLLERR, e.g. ECONNRESET when the peer closed with our data unread:
      // messages it sent before are still queued; deliver them first.
      this.#readSome(true);
      if (!this.#closed) this.close(new MqtapError({ op: 'POLL', code: 'EIO', errno: 5, message: `poll on a UNIX socket failed (libuv status ${status})` }));
      return;
    }
    if (events & C.UV_WRITABLE) {
      this.#wantWrite = false;
      this.#flush();
    }
    if (events & C.UV_READABLE) this.#readSome();
    this.#updatePoll();
  }

  #flush(): void {
    while (!this.#closed && this.#sendQueue.length > 0) {
      const p = this.#sendQueue[0]!;
      let n: number;
      try {
        n = native.scmSend(this.#fd, p.buf, p.fds, p.offset, p.buf.length - p.offset);
      } catch (err) {
        this.#sendQueue.shift();
        p.reject(err as Error);
        // EPIPE: the peer is gone, but what it sent before is still queued.
        this.#readSome(true);
        this.close(err as Error);
        return;
      }
      if (n < 0) {
        this.#wantWrite = true;
        this.#updatePoll();
        return;
      }
      p.offset += n;
      p.fds = [];
      if (p.offset >= p.buf.length) {
        this.#sendQueue.shift();
        p.resolve();
      }
    }
  }

  #readSome(drain = false): void {
    // A bounded batch per callback, so one busy peer cannot starve the loop
    // (a larger one when draining a socket about to close).
    let reset: Error | undefined;
    for (let i = 0; i < (drain ? 4096 : 64) && (this.#reading || drain || reset) && !this.#closed; i++) {
      let r: { bytes: number; fds: number[] } | null;
      // Taken per read: a 'message' listener may have made another socket
      // read (and grow the shared buffer) in the meantime.
      const buf = recvBuffer(this.#maxBytes);
      try {
        r = native.scmRecv(this.#fd, buf, this.#maxFds);
      } catch (err) {
        if (err instanceof MqtapError && err.code === 'EMSGSIZE') {
          if (this.listenerCount('badmessage') > 0) {
            this.emit('badmessage', err);
            continue;
          }
        }
        // ECONNRESET (the peer closed with our data unread) is reported once,
        // before the messages the peer sent earlier: read those first.
        if (err instanceof MqtapError && err.code === 'ECONNRESET' && !reset) {
          reset = err;
          continue;
        }
        this.close(err as Error);
        return;
      }
      if (r === null) {
        if (reset) this.close(reset);
        return;
      }
      const fds = new ReceivedFds(r.fds);
      if (r.bytes === 0 && r.fds.length === 0) {
        this.emit('end');
        this.close(reset);
        return;
      }
      const data = Buffer.from(buf.subarray(0, r.bytes));
      if (!this.emit('message', data, fds)) fds.close();
    }
  }
}

function explainConnect(err: unknown, path: string): unknown {
  if (!(err instanceof MqtapError)) return err;
  if (err.code === 'ENOENT') err.hint = `nothing listens at ${path}: start the server (e.g. \`mqtap daemon --socket ${path}\`), or check the path`;
  else if (err.code === 'ECONNREFUSED') err.hint = `${path} exists but nobody accepts on it (a stale socket file of a stopped server?)`;
  else if (err.code === 'EACCES' || err.code === 'EPERM') err.hint = `no permission to connect to ${path}: check its mode and group (ls -l), or run as the server's user/root`;
  else if (err.code === 'EPROTOTYPE') err.hint = `${path} is a socket of another type (SOCK_STREAM vs SOCK_SEQPACKET)`;
  return err;
}

export interface ListenOptions extends UnixSocketOptions {
  type: SocketType;
  /** File mode of the socket (it is created 0600 and chmod'ed to this).  Default 0o600. */
  mode?: number;
  /** gid to chown the socket file to (with mode 0o660 for a group of clients). */
  group?: number;
  /** listen(2) backlog.  Default 128. */
  backlog?: number;
  /**
   * When a socket file is already at `path`: if a server answers there,
   * fail with EADDRINUSE; if none does (a stale file of a dead server),
   * remove it and bind.  Default true.  Non-socket files are never removed.
   */
  replaceStale?: boolean;
}

/**
 * A listening UNIX socket at a filesystem path.  'connection' (sock) for
 * each accepted client (already O_CLOEXEC|O_NONBLOCK, with this server's
 * maxMessageBytes/maxFds).  close() stops accepting and removes the socket
 * file (only if it is still the one this server created).
 */
export class UnixServer extends EventEmitter {
  readonly path: string;
  readonly type: SocketType;
  #fd: number;
  #poll: NativeFdPoll | undefined;
  #stat: Stats | undefined;
  readonly #sockOpts: UnixSocketOptions;
  #closed = false;
  #backoff: NodeJS.Timeout | undefined;

  private constructor(path: string, type: SocketType, fd: number, sockOpts: UnixSocketOptions) {
    super();
    this.path = path;
    this.type = type;
    this.#fd = fd;
    this.#sockOpts = sockOpts;
  }

  /** Creates the socket file (mode 0600 from the start, then `mode`/`group`) and starts accepting. */
  static async listen(path: string, opts: ListenOptions): Promise<UnixServer> {
    const type = sockType(opts.type);
    socketLimits(opts.type, opts); // every accepted connection is a UnixSocket with these options
    if (typeof path !== 'string' || !path.startsWith('/')) throw invalidArg(`socket path must be absolute (got ${String(path)})`);
    const mode = opts.mode ?? 0o600;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) throw invalidArg('mode must be a file mode such as 0o600');
    if (opts.replaceStale !== false) await removeStale(path, opts.type);
    const fd = native.unixSocket(type);
    const server = new UnixServer(path, opts.type, fd, { ...(opts.maxMessageBytes !== undefined ? { maxMessageBytes: opts.maxMessageBytes } : {}), ...(opts.maxFds !== undefined ? { maxFds: opts.maxFds } : {}) });
    // Bound and listening under a temporary name, then renamed into place:
    // the path never shows a socket that refuses connections (bound, not yet
    // listening) or has the wrong mode.  The temporary name must fit
    // sun_path too; when it does not, bind the final path directly.
    const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
    const bindPath = Buffer.byteLength(tmp) < 108 ? tmp : path;
    let renamed = bindPath === path;
    try {
      if (bindPath !== path) rmSync(bindPath, { force: true }); // a leftover of a crashed start
      // The socket file never exists with a wider mode than 0600: umask 077
      // during bind(), then widen to what was asked for.
      const old = process.umask(0o177);
      try {
        native.unixBind(fd, bindPath);
      } finally {
        process.umask(old);
      }
      const st = fsStep('BIND', bindPath, () => lstatSync(bindPath));
      if (renamed) server.#stat = st; // bound at the final path: close() removes it
      const group = opts.group;
      if (group !== undefined) fsStep('BIND', bindPath, () => chownSync(bindPath, -1, group), `could not give the socket to group ${group}: run as root, or as a member of it`);
      if (mode !== 0o600) fsStep('BIND', bindPath, () => chmodSync(bindPath, mode));
      native.unixListen(fd, opts.backlog ?? 128);
      if (!renamed) {
        fsStep('BIND', path, () => renameSync(bindPath, path));
        renamed = true;
        server.#stat = st;
      }
      server.#poll = new native.FdPoll(fd, (status) => server.#onPoll(status));
      server.#poll.start(C.UV_READABLE);
    } catch (err) {
      if (!renamed) rmSync(bindPath, { force: true });
      server.close();
      throw err;
    }
    return server;
  }

  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#closed;
  }

  unref(): void {
    this.#poll?.unref();
  }

  ref(): void {
    this.#poll?.ref();
  }

  /** Stops accepting, closes the listening fd and removes the socket file.  Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#backoff) clearTimeout(this.#backoff);
    this.#poll?.close();
    this.#poll = undefined;
    if (this.#stat) {
      try {
        const now = lstatSync(this.path);
        if (now.ino === this.#stat.ino && now.dev === this.#stat.dev) unlinkSync(this.path);
      } catch {
        /* already gone */
      }
    }
    const fd = this.#fd;
    this.#fd = -1;
    if (fd >= 0) native.close(fd);
    this.emit('close');
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #onPoll(status: number): void {
    if (this.#closed) return;
    if (status < 0) return;
    for (let i = 0; i < 64 && !this.#closed; i++) {
      let fd: number;
      try {
        fd = native.unixAccept(this.#fd);
      } catch (err) {
        const code = (err as MqtapError).code;
        if (code === 'ECONNABORTED' || code === 'EPROTO') continue;
        // EMFILE/ENFILE/ENOBUFS: the pending connection stays queued and the
        // fd stays readable; stop watching for a moment instead of spinning.
        this.emit('acceptError', err);
        this.#poll?.stop();
        this.#backoff = setTimeout(() => {
          this.#backoff = undefined;
          if (!this.#closed) this.#poll?.start(C.UV_READABLE);
        }, 100);
        return;
      }
      if (fd < 0) return;
      let sock: UnixSocket;
      try {
        sock = new UnixSocket(fd, this.type, this.#sockOpts);
      } catch (err) {
        this.emit('acceptError', err);
        continue;
      }
      if (!this.emit('connection', sock)) sock.close();
    }
  }
}

/** Removes a socket file nobody listens on; EADDRINUSE when a server answers; EEXIST for non-sockets. */
async function removeStale(path: string, type: SocketType): Promise<void> {
  let st: Stats;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket())
    throw new MqtapError({ op: 'BIND', code: 'EEXIST', errno: 17, detail: path, message: `${path} exists and is not a socket`, hint: 'remove it or choose another --socket path' });
  try {
    const s = await UnixSocket.connect(path, { type, timeoutMs: 1000 });
    s.close();
  } catch (err) {
    const code = (err as MqtapError).code;
    if (code === 'ECONNREFUSED' || code === 'ENOENT') {
      try {
        unlinkSync(path);
      } catch {
        /* raced with someone else's cleanup */
      }
      return;
    }
    if (code !== 'EPROTOTYPE') throw err;
  }
  throw new MqtapError({ op: 'BIND', code: 'EADDRINUSE', errno: 98, detail: path, message: `a server is already listening at ${path}`, hint: 'stop it first, or choose another --socket path' });
}

/** Supplementary groups of a live process (/proc/PID/status), or []. */
function groupsOf(pid: number): number[] {
  try {
    const m = /^Groups:\s*(.*)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? m[1]!.trim().split(/\s+/).filter(Boolean).map(Number) : [];
  } catch {
    return [];
  }
}

/**
 * Who may use a socket mqtap serves (the daemon's, a vhost-user backend's),
 * given the peer SO_PEERCRED reported: root, this process's own uid, an
 * allowed uid, or a member (primary or supplementary) of the allowed group.
 */
export function peerAllowed(peer: { pid: number; uid: number; gid: number }, allow: { allowUids?: readonly number[] | undefined; group?: number | undefined }): boolean {
  if (peer.uid === 0) return true;
  if (typeof process.geteuid === 'function' && peer.uid === process.geteuid()) return true;
  if (allow.allowUids?.includes(peer.uid)) return true;
  const g = allow.group;
  return g !== undefined && (peer.gid === g || groupsOf(peer.pid).includes(g));
}
