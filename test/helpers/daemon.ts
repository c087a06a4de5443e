/**
 * A real `mqtap daemon` process for the tests: `node dist/bin/mqtap.js
 * --log-level info daemon --socket DIR/mqtap.sock --state-dir DIR/state`,
 * its JSON log in a file under DIR, started in this thread's network
 * namespace.  `DaemonProcess.start` waits for its socket; `stop` ends it
 * (SIGKILL if it does not stop in time); `dispose` also removes DIR when
 * the helper made it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI } from './cli';
import { running, stopChild, type ExitStatus } from './proc';
import { waitFor } from './wait';

export interface DaemonStartOptions {
  /** Where the socket, the state dir and the log go (created if missing); default: a new temp dir, removed by dispose(). */
  dir?: string;
  /** More `mqtap daemon` options, e.g. ['--qmp-timeout', '1500']. */
  args?: string[];
  /** How long to wait for the socket (default 20 000 ms). */
  timeoutMs?: number;
}

export class DaemonProcess {
  readonly proc: ChildProcess;
  readonly socket: string;
  readonly stateDir: string;
  readonly logFile: string;
  /** Resolves when the process exits. */
  readonly exit: Promise<ExitStatus>;

  private constructor(
    readonly dir: string,
    args: string[],
    private readonly ownsDir: boolean,
  ) {
    mkdirSync(dir, { recursive: true });
    this.socket = join(dir, 'mqtap.sock');
    this.stateDir = join(dir, 'state');
    this.logFile = join(dir, `daemon-${Date.now()}-${Math.random().toString(36).slice(2)}.log`);
    const log = openSync(this.logFile, 'w');
    try {
      this.proc = spawn(process.execPath, [CLI, '--log-level', 'info', 'daemon', '--socket', this.socket, '--state-dir', this.stateDir, ...args], { stdio: ['ignore', 'ignore', log] });
    } finally {
      closeSync(log);
    }
    this.exit = new Promise((r) => this.proc.once('exit', (code, signal) => r({ code, signal })));
  }

  /** Starts a daemon and waits until its socket exists; throws (with its log) if it exits first. */
  static async start(opts: DaemonStartOptions = {}): Promise<DaemonProcess> {
    const d = new DaemonProcess(opts.dir ?? mkdtempSync(join(tmpdir(), 'mqtap-daemon-')), opts.args ?? [], opts.dir === undefined);
    try {
      await waitFor('the daemon socket', () => existsSync(d.socket) || !d.alive, opts.timeoutMs ?? 20_000);
    } catch (err) {
      await d.dispose();
      throw err;
    }
    if (!d.alive) {
      const log = d.log();
      await d.dispose();
      throw new Error(`the daemon exited: ${log}`);
    }
    return d;
  }

  get pid(): number {
    return this.proc.pid!;
  }

  get alive(): boolean {
    return running(this.proc);
  }

  /** How many fds the daemon has open (/proc/PID/fd). */
  fdCount(): number {
    return readdirSync(`/proc/${this.pid}/fd`).length;
  }

  log(): string {
    try {
      return readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }

  /** The log's JSON lines. */
  logLines(): Array<Record<string, unknown>> {
    return this.log()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  /** Sends `signal` (default SIGTERM) and waits for the exit; after `ms` (default 20 s) SIGKILLs it and rejects. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', ms = 20_000): Promise<ExitStatus> {
    const r = await stopChild(this.proc, signal, ms);
    if (r.timedOut) throw new Error(`the daemon did not stop within ${ms / 1000} s`);
    return { code: r.code, signal: r.signal };
  }

  /** Stops the daemon if it still runs (SIGKILL after the timeout, no error) and removes its dir if start() made it. */
  async dispose(): Promise<void> {
    await stopChild(this.proc, 'SIGTERM', 20_000);
    if (this.ownsDir) rmSync(this.dir, { recursive: true, force: true });
  }
}
