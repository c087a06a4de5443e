/**
 * A QMP (QEMU Machine Protocol) client on a UNIX stream socket, e.g. QEMU
 * started with `-qmp unix:PATH,server=on,wait=off`.
 *
 * - Connects, reads the greeting, negotiates capabilities (`qmp_capabilities`).
 * - Runs one command at a time, each with its own `id`.  Strictly one at a
 *   time on purpose: QEMU stores the fds that arrive with a read and hands
 *   them to the next `getfd`; fds arriving with a later read close the ones
 *   not yet taken.  So a command that carries fds (SCM_RIGHTS, attached to
 *   the bytes of that command) must be the only one in flight.
 * - Emits 'event' for asynchronous events; waitForEvent() subscribes before
 *   the command that triggers the event is sent, so nothing is missed.
 * - Every wait is bounded: connect, greeting, each command (default 10 s).
 *   A timed-out command rejects with ETIMEDOUT; its late reply, if any, is
 *   recognised by id and dropped.
 */
import { EventEmitter } from 'node:events';
import { ErrorCodes, MqtapError, invalidArg } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { UnixSocket } from '../sys/scm';

export interface QmpGreeting {
  QMP: {
    version: { qemu: { major: number; minor: number; micro: number }; package?: string };
    capabilities: string[];
  };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** A command QEMU answered with `{"error": {"class", "desc"}}`. */
export class QmpError extends MqtapError {
  override name = 'QmpError';
  /** QMP error class: 'GenericError', 'CommandNotFound', 'DeviceNotFound', ... */
  readonly qmpClass: string;
  /** The QMP command that failed. */
  readonly command: string;
  /** QEMU's own description of the error. */
  readonly desc: string;

  constructor(command: string, qmpClass: string, desc: string, hint?: string) {
    super({ op: 'QMP', code: 'ERR_QMP', detail: command, message: `QMP ${command} failed: ${desc} (${qmpClass})`, ...(hint !== undefined ? { hint } : {}) });
    this.qmpClass = qmpClass;
    this.command = command;
    this.desc = desc;
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), qmpClass: this.qmpClass, command: this.command, desc: this.desc };
  }
}

function timeoutError(what: string, ms: number, hint?: string): MqtapError {
  return new MqtapError({ op: 'QMP', code: 'ETIMEDOUT', errno: 110, message: `QMP: ${what} timed out after ${ms} ms`, ...(hint !== undefined ? { hint } : {}) });
}

function protocolError(message: string): MqtapError {
  return new MqtapError({ op: 'QMP', code: 'EPROTO', errno: 71, message: `QMP: ${message}` });
}

/**
 * Splits QMP's byte stream into JSON objects: QEMU ends every message with
 * "\r\n" and never puts a raw newline inside one.  A line longer than
 * `maxLineBytes` or one that is not a JSON object is a protocol error.
 */
export class QmpLineParser {
  readonly maxLineBytes: number;
  #pending: Buffer[] = [];
  #pendingBytes = 0;

  constructor(maxLineBytes = 16 * 1024 * 1024) {
    this.maxLineBytes = maxLineBytes;
  }

  /** Feeds bytes; returns the complete messages they finish, in order. */
  push(chunk: Buffer): Array<Record<string, unknown>> {
    const out: Array<Record<string, unknown>> = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      const line = this.#pendingBytes > 0 ? Buffer.concat([...this.#pending, piece]) : piece;
      this.#pending = [];
      this.#pendingBytes = 0;
      start = nl + 1;
      if (line.length > this.maxLineBytes) throw protocolError(`a message is longer than ${this.maxLineBytes} bytes`);
      const text = line.toString('utf8').trim();
      if (text === '') continue;
      let value: unknown;
      try {
        value = JSON.parse(text);
      } catch {
        throw protocolError(`not JSON: ${text.slice(0, 120)}`);
      }
      if (typeof value !== 'object' || value === null || Array.isArray(value)) throw protocolError(`not a JSON object: ${text.slice(0, 120)}`);
      out.push(value as Record<string, unknown>);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.#pendingBytes += rest.length;
      if (this.#pendingBytes > this.maxLineBytes) throw protocolError(`a message is longer than ${this.maxLineBytes} bytes`);
      this.#pending.push(Buffer.from(rest));
    }
    return out;
  }
}

/** The text of one QMP command (with its trailing newline). */
export function encodeCommand(command: string, args: Record<string, unknown> | undefined, id: string | number): string {
  if (typeof command !== 'string' || !/^[A-Za-z][A-Za-z0-9_-]*$/.test(command)) throw invalidArg(`QMP command name ${JSON.stringify(command)} is not valid`);
  const msg: Record<string, unknown> = { execute: command };
  if (args !== undefined) {
    if (typeof args !== 'object' || args === null || Array.isArray(args)) throw invalidArg('QMP arguments must be an object');
    msg.arguments = args;
  }
  msg.id = id;
  return `${JSON.stringify(msg)}\n`;
}

export interface QmpConnectOptions {
  /** Default for every wait (connect, greeting, each command).  Default 10 000 ms. */
  timeoutMs?: number;
  logger?: Logger;
}

export interface ExecuteOptions {
  /** fds to attach (SCM_RIGHTS) to the bytes of this command, e.g. for `getfd`. */
  fds?: readonly number[];
  timeoutMs?: number;
}

interface Pending {
  id: string;
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  match: (data: Record<string, unknown>) => boolean;
  resolve: (ev: QmpEvent) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

let clientSeq = 0;

/**
 * Events: 'event' (ev: QmpEvent), 'close' (err?: Error).  Close it when done:
 * QEMU serves one QMP client per socket at a time.
 */
export class QmpClient extends EventEmitter {
  readonly path: string;
  readonly timeoutMs: number;
  readonly logger: Logger;
  #sock: UnixSocket;
  #parser = new QmpLineParser();
  #greeting: QmpGreeting | undefined;
  #onGreeting: ((g: QmpGreeting) => void) | undefined;
  #pending = new Map<string, Pending>();
  #waiters = new Set<EventWaiter>();
  #queue: Promise<unknown> = Promise.resolve();
  #seq = 0;
  readonly #prefix: string;
  #closed = false;
  #closeError: Error | undefined;

  private constructor(path: string, sock: UnixSocket, opts: QmpConnectOptions) {
    super();
    this.path = path;
    this.#sock = sock;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.logger = opts.logger ?? silentLogger;
    this.#prefix = `mqtap-${process.pid}-${++clientSeq}`;
    sock.on('message', (data: Buffer, fds) => {
      fds.close(); // QEMU never sends fds on QMP; never keep any
      this.#onData(data);
    });
    sock.on('close', (err?: Error) => this.#onClose(err));
  }

  /** Connects to QEMU's QMP socket and negotiates capabilities. */
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    if (typeof path !== 'string' || path === '') throw invalidArg('QMP socket path must be a non-empty string');
    const timeoutMs = opts.timeoutMs ?? 10_000;
    let sock: UnixSocket;
    try {
      sock = await UnixSocket.connect(path, { type: 'stream', timeoutMs, maxFds: 0, maxMessageBytes: 64 * 1024 });
    } catch (err) {
      if (err instanceof MqtapError && (err.code === 'ENOENT' || err.code === 'ECONNREFUSED'))
        err.hint = `no QEMU QMP server at ${path}: start QEMU with \`-qmp unix:${path},server=on,wait=off\``;
      throw err;
    }
    const client = new QmpClient(path, sock, opts);
    try {
      const greeting = await client.#waitGreeting(timeoutMs);
      client.logger.debug({ qmp: path, version: greeting.QMP.version.qemu }, 'QMP connected');
      await client.execute('qmp_capabilities', undefined, { timeoutMs });
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  get greeting(): QmpGreeting | undefined {
    return this.#greeting;
  }

  /** 'major.minor.micro' of the QEMU at the other end. */
  get qemuVersion(): string {
    const v = this.#greeting?.QMP.version.qemu;
    return v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown';
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Runs one command and resolves with its `return` value; rejects with a
   * QmpError when QEMU answers with an error, ETIMEDOUT after the timeout,
   * ERR_CLOSED when the connection closes first.  Commands run one at a time
   * in call order.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: ExecuteOptions = {}): Promise<T> {
    const run = this.#queue.then(
      () => this.#run(command, args, opts),
      () => this.#run(command, args, opts),
    );
    this.#queue = run.catch(() => undefined);
    return run as Promise<T>;
  }

  /**
   * Resolves with the next event named `name` whose data passes `match`,
   * rejects after `timeoutMs` or when the connection closes.  Call it before
   * the command that causes the event.
   */
  waitForEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = this.timeoutMs): { promise: Promise<QmpEvent>; cancel: () => void } {
    let waiter!: EventWaiter;
    const promise = new Promise<QmpEvent>((resolve, reject) => {
      if (this.#closed) {
        reject(this.#closedError(`waiting for ${name}`));
        return;
      }
      const timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        reject(timeoutError(`waiting for event ${name}`, timeoutMs));
      }, timeoutMs);
      waiter = { name, match, resolve, reject, timer };
      this.#waiters.add(waiter);
    });
    const cancel = (): void => {
      if (waiter && this.#waiters.delete(waiter)) {
        clearTimeout(waiter.timer);
        waiter.reject(new MqtapError({ op: 'QMP', code: 'ECANCELED', errno: 125, message: `QMP: waiting for ${name} was cancelled` }));
      }
    };
    promise.catch(() => undefined); // a cancelled/abandoned wait is not an unhandled rejection
    return { promise, cancel };
  }

  /** Closes the connection; pending commands and waits reject.  Idempotent. */
  close(): void {
    this.#sock.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** Lets the process exit while connected. */
  unref(): void {
    this.#sock.unref();
  }

  async #run(command: string, args: Record<string, unknown> | undefined, opts: ExecuteOptions): Promise<unknown> {
    const id = `${this.#prefix}-${++this.#seq}`;
    const text = encodeCommand(command, args, id);
    if (this.#closed) throw this.#closedError(command);
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const result = new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(timeoutError(`${command}`, timeoutMs, 'QEMU did not answer: is it stopped in a debugger, or is another client holding its monitor busy?'));
      }, timeoutMs);
      this.#pending.set(id, { id, command, resolve, reject, timer });
    });
    this.logger.debug({ qmp: this.path, command, id, fds: opts.fds?.length ?? 0 }, 'QMP command');
    this.#sock.send(text, opts.fds ?? []).catch((err: Error) => {
      const p = this.#pending.get(id);
      if (!p) return;
      this.#pending.delete(id);
      clearTimeout(p.timer);
      p.reject(err);
    });
    return result;
  }

  #waitGreeting(timeoutMs: number): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#onGreeting = undefined;
        reject(timeoutError('waiting for the greeting', timeoutMs, 'is another client connected to this QMP socket? QEMU serves one at a time'));
      }, timeoutMs);
      const onClose = (err?: Error): void => {
        clearTimeout(timer);
        reject(err ?? protocolError('the connection closed before the greeting'));
      };
      this.once('close', onClose);
      this.#onGreeting = (g) => {
        clearTimeout(timer);
        this.off('close', onClose);
        resolve(g);
      };
    });
  }

  #onData(data: Buffer): void {
    let msgs: Array<Record<string, unknown>>;
    try {
      msgs = this.#parser.push(data);
    } catch (err) {
      this.#sock.close(err as Error);
      return;
    }
    for (const m of msgs) this.#dispatch(m);
  }

  #dispatch(m: Record<string, unknown>): void {
    if (this.#greeting === undefined) {
      if (!('QMP' in m)) {
        this.#sock.close(protocolError('the first message is not a QMP greeting'));
        return;
      }
      this.#greeting = m as unknown as QmpGreeting;
      this.#onGreeting?.(this.#greeting);
      this.#onGreeting = undefined;
      return;
    }
    if (typeof m.event === 'string') {
      const ev = m as unknown as QmpEvent;
      this.logger.debug({ qmp: this.path, event: ev.event, data: ev.data }, 'QMP event');
      for (const w of [...this.#waiters]) {
        let hit = false;
        try {
          hit = w.name === ev.event && w.match(ev.data ?? {});
        } catch {
          hit = false;
        }
        if (hit) {
          this.#waiters.delete(w);
          clearTimeout(w.timer);
          w.resolve(ev);
        }
      }
      this.emit('event', ev);
      return;
    }
    const id = typeof m.id === 'string' ? m.id : undefined;
    const p = id !== undefined ? this.#pending.get(id) : undefined;
    if (!p) {
      this.logger.debug({ qmp: this.path, message: m }, 'QMP reply without a waiting command (late or unknown id); dropped');
      return;
    }
    this.#pending.delete(p.id);
    clearTimeout(p.timer);
    if ('return' in m) p.resolve(m.return);
    else if (typeof m.error === 'object' && m.error !== null) {
      const e = m.error as { class?: unknown; desc?: unknown };
      p.reject(new QmpError(p.command, String(e.class ?? 'GenericError'), String(e.desc ?? 'unknown error')));
    } else p.reject(protocolError(`a reply to ${p.command} has neither "return" nor "error"`));
  }

  #closedError(what: string): MqtapError {
    return new MqtapError({
      op: 'QMP',
      code: ErrorCodes.CLOSED,
      message: `QMP ${what}: the connection to ${this.path} is closed${this.#closeError ? ` (${this.#closeError.message})` : ''}`,
      ...(this.#closeError ? { cause: this.#closeError } : {}),
    });
  }

  #onClose(err?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeError = err;
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(this.#closedError(p.command));
    }
    this.#pending.clear();
    for (const w of this.#waiters) {
      clearTimeout(w.timer);
      w.reject(this.#closedError(`waiting for ${w.name}`));
    }
    this.#waiters.clear();
    this.logger.debug({ qmp: this.path, err: err?.message }, 'QMP connection closed');
    this.emit('close', err);
  }
}

/** Connects, runs `fn` with the client, and always closes it. */
export async function withQmp<T>(path: string, opts: QmpConnectOptions, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
  const qmp = await QmpClient.connect(path, opts);
  try {
    return await fn(qmp);
  } finally {
    qmp.close();
  }
}
