/**
 * Running a child process with tap/vhost fds mapped to fixed numbers.
 *
 * fds[i] becomes fd 3+i in the child (libuv dup2()s it there, which clears
 * FD_CLOEXEC on the copy).  Every fd mqtap opens is O_CLOEXEC, and Node opens
 * its own fds close-on-exec, so the child receives exactly stdin/stdout/stderr
 * and the mapped fds.
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import { readdirSync } from 'node:fs';
import { MqtapError } from './errors';
import { native } from './native';

export interface SpawnWithFdsOptions {
  /** Program and arguments. */
  argv: readonly string[];
  /** Parent fds to hand over, in order; the child sees them as 3, 4, ... */
  fds: readonly number[];
  /** Extra environment (merged over process.env unless `clearEnv`). */
  env?: Record<string, string | undefined>;
  clearEnv?: boolean;
  /** How stdin/stdout/stderr are connected.  Default 'inherit'. */
  stdio?: 'inherit' | 'pipe';
  /** Signals to relay from this process to the child while it runs.  Default SIGINT, SIGTERM, SIGHUP. */
  forwardSignals?: readonly NodeJS.Signals[];
  cwd?: string;
  /**
   * Mark every other fd of this process from 3 up close-on-exec first (as
   * libvirt's virCommand does), so that fds this process inherited without
   * FD_CLOEXEC do not reach the child either.  Default true.
   */
  closeOtherFds?: boolean;
}

/** Marks every fd >= 3 of this process FD_CLOEXEC (close_range, or one fcntl per fd before Linux 5.11). */
export function cloexecAllFds(): void {
  try {
    native.cloexecFrom(3);
    return;
  } catch (err) {
    if (!(err instanceof MqtapError) || (err.code !== 'ENOSYS' && err.code !== 'EINVAL')) throw err;
  }
  for (const name of readdirSync('/proc/self/fd')) {
    const fd = Number(name);
    if (fd < 3) continue;
    try {
      native.setCloexec(fd, true);
    } catch {
      // the fd readdir itself used is gone by now
    }
  }
}

export interface ChildExit {
  /** Exit code, or null when killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Shell-style status: the code, or 128 + signal number. */
  status: number;
}

export interface SpawnedChild {
  child: ChildProcess;
  /** The fd numbers as the child sees them. */
  childFds: number[];
  /** Settles when the child exits (after signal relays are removed). */
  exited: Promise<ChildExit>;
}

/** Shell-style exit status for a child's (code, signal). */
export function exitStatus(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  const n = signal ? osConstants.signals[signal] : undefined;
  return 128 + (n ?? 0);
}

/**
 * Spawns argv with fds mapped to 3.. and relays signals.  Rejects `exited`
 * with an MqtapError (op 'SPAWN', code 'ENOENT'/'EACCES', hint) when the
 * program cannot be started; in that case nothing keeps running.
 */
export function spawnWithFds(opts: SpawnWithFdsOptions): SpawnedChild {
  const [file, ...args] = opts.argv;
  if (!file) throw new MqtapError({ op: 'SPAWN', code: 'ERR_INVALID_ARG', message: 'no command given', hint: 'put the command after --' });
  const base: StdioOptions = opts.stdio === 'pipe' ? ['pipe', 'pipe', 'pipe'] : ['inherit', 'inherit', 'inherit'];
  const stdio: StdioOptions = [...(base as unknown[]), ...opts.fds] as StdioOptions;
  const env = { ...(opts.clearEnv ? {} : process.env), ...opts.env };
  if (opts.closeOtherFds !== false) cloexecAllFds();
  // The relays are installed before the child exists: once it runs it may tell
  // someone it is ready, and a signal sent to us in reply must not meet Node's
  // default disposition (which would kill us and leave the child orphaned).
  // A signal that arrives before spawn() returns is delivered right after.
  let spawned: ChildProcess | undefined;
  const early: NodeJS.Signals[] = [];
  const signals = opts.forwardSignals ?? (['SIGINT', 'SIGTERM', 'SIGHUP'] as const);
  const relays = signals.map((sig) => {
    const relay = (): void => {
      if (!spawned) early.push(sig);
      else if (spawned.exitCode === null && spawned.signalCode === null) spawned.kill(sig);
    };
    process.on(sig, relay);
    return (): void => {
      process.off(sig, relay);
    };
  });
  let child: ChildProcess;
  try {
    child = spawned = spawn(file, args, { stdio, env, ...(opts.cwd ? { cwd: opts.cwd } : {}) });
  } catch (err) {
    relays.forEach((off) => off());
    throw err;
  }
  for (const sig of early) child.kill(sig);
  const unrelay = (): void => relays.forEach((off) => off());
  const exited = new Promise<ChildExit>((resolve, reject) => {
    child.once('error', (err: NodeJS.ErrnoException) => {
      unrelay();
      if (child.pid === undefined) {
        const code = err.code ?? 'ENOENT';
        reject(
          new MqtapError({
            op: 'SPAWN',
            code,
            ...(typeof err.errno === 'number' ? { errno: -err.errno } : {}),
            syscall: 'spawn',
            message: `cannot run ${file}: ${code === 'ENOENT' ? 'command not found' : err.message}`,
            hint: code === 'ENOENT' ? `install ${file} or give its full path` : code === 'EACCES' ? `${file} is not executable` : undefined,
            cause: err,
          } as ConstructorParameters<typeof MqtapError>[0]),
        );
      }
    });
    child.once('exit', (code, signal) => {
      unrelay();
      resolve({ code, signal, status: exitStatus(code, signal) });
    });
  });
  return { child, childFds: opts.fds.map((_, i) => 3 + i), exited };
}
