/**
 * The daemon's state on disk: one JSON file per persistent netdev the daemon
 * created, `<stateDir>/netdevs/<name>.json`, written atomically (temp file +
 * rename) whenever the netdev changes.  On start the daemon re-adopts every
 * netdev listed there whose tap still exists.  Non-persistent netdevs vanish
 * with the daemon's fds and are never written.
 *
 * Default state dir: /run/mqtap (tmpfs: a reboot forgets it, as it forgets
 * the taps).  The dir is created 0755 (the default socket lives in it and
 * group members must reach it), `netdevs/` 0700, the files 0600.
 *
 * One daemon per state dir: init() takes flock(LOCK_EX|LOCK_NB) on
 * `<stateDir>/daemon.lock` right after creating the dir, before anything
 * else in it is read or written, and the daemon holds it (an O_CLOEXEC fd)
 * until it stops or dies (the kernel drops the lock with the last fd).  The
 * file holds the holder's pid, for the message a second daemon gets.  The
 * file itself stays: removing it would let two daemons lock two different
 * files of the same name.
 */
import { closeSync, constants as fsc, ftruncateSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MqtapError, fsStep } from '../sys/errors';
import { K, native } from '../sys/native';
import { validateIfName } from '../sys/validate';

export const STATE_VERSION = 1;

/** The lock file in the state dir (see the module comment). */
export const LOCK_FILE = 'daemon.lock';

/** Who holds a netdev's fds besides the daemon. */
export type Lease =
  | { kind: 'client'; pid: number; uid: number; since: string }
  | { kind: 'qmp'; qmp: string; id: string; netdevId: string; since: string; pid: number; uid: number }
  /** Served by the daemon itself over a vhost-user socket (never written to the state dir: serving ends with the daemon). */
  | { kind: 'vhost-user'; socket: string; since: string; pid: number; uid: number };

export interface NetdevState {
  version: number;
  name: string;
  pairs: number;
  /** vhost-net fds were opened for the pairs. */
  vhost: boolean;
  /** Active pairs the daemon last set (the guest decides while plugged). */
  active: number;
  netns?: string;
  persist: true;
  created: true;
  createdAt: string;
  lease?: Lease;
}

export class StateStore {
  readonly dir: string;
  readonly netdevDir: string;

  constructor(dir: string) {
    this.dir = dir;
    this.netdevDir = join(dir, 'netdevs');
  }

  #lockFd = -1;

  /**
   * Creates the state dir (0755), locks it (see lock()), then creates
   * netdevs/ (0700).  On a failure after the lock, the lock is released.
   */
  init(): void {
    const hint = 'run the daemon as root, or give it a writable --state-dir';
    fsStep('STATE_DIR', this.dir, () => mkdirSync(this.dir, { recursive: true, mode: 0o755 }), hint);
    this.lock();
    try {
      fsStep('STATE_DIR', this.netdevDir, () => mkdirSync(this.netdevDir, { recursive: true, mode: 0o700 }), hint);
    } catch (err) {
      this.unlock();
      throw err;
    }
  }

  /** The lock file's path. */
  get lockFile(): string {
    return join(this.dir, LOCK_FILE);
  }

  /** Whether this store holds the state dir's lock. */
  get locked(): boolean {
    return this.#lockFd >= 0;
  }

  /**
   * flock(LOCK_EX|LOCK_NB) on the lock file (created 0600, never followed
   * through a symlink; the fd is O_CLOEXEC as every fd Node opens), then the
   * pid written into it.  Held by another process: MqtapError code EBUSY
   * (op STATE_LOCK) naming the dir and the holder's pid; the file is left
   * as it was and no fd stays open.
   */
  lock(): void {
    if (this.#lockFd >= 0) return;
    const file = this.lockFile;
    const fd = fsStep('STATE_LOCK', file, () => openSync(file, fsc.O_RDWR | fsc.O_CREAT | fsc.O_NOFOLLOW, 0o600), 'run the daemon as root, or give it a writable --state-dir');
    try {
      native.flock(fd, K.LOCK_EX | K.LOCK_NB);
    } catch (err) {
      closeSync(fd);
      if (err instanceof MqtapError && (err.code === 'EAGAIN' || err.code === 'EWOULDBLOCK')) {
        const pid = holderPid(file);
        throw new MqtapError({
          op: 'STATE_LOCK',
          code: 'EBUSY',
          errno: 16,
          detail: file,
          message: `the state directory ${this.dir} is in use by another mqtap daemon${pid !== undefined ? ` (pid ${pid})` : ''}`,
          hint: `stop that daemon first${pid !== undefined ? ` (kill ${pid})` : ''}, or give this one its own --state-dir; two daemons must not share ${this.dir}`,
          cause: err,
        });
      }
      throw err;
    }
    try {
      const pid = Buffer.from(`${process.pid}\n`);
      ftruncateSync(fd, 0);
      writeSync(fd, pid, 0, pid.length, 0);
    } catch {
      /* the pid is only for messages; the lock is what counts */
    }
    this.#lockFd = fd;
  }

  /** Releases the lock (closing its fd).  Idempotent. */
  unlock(): void {
    const fd = this.#lockFd;
    if (fd < 0) return;
    this.#lockFd = -1;
    closeSync(fd);
  }

  #file(name: string): string {
    validateIfName(name);
    return join(this.netdevDir, `${name}.json`);
  }

  save(s: NetdevState): void {
    const file = this.#file(s.name);
    const tmp = `${file}.${process.pid}.tmp`;
    fsStep('STATE_SAVE', tmp, () => writeFileSync(tmp, `${JSON.stringify(s, null, 2)}\n`, { mode: 0o600 }));
    fsStep('STATE_SAVE', file, () => renameSync(tmp, file));
  }

  remove(name: string): void {
    rmSync(this.#file(name), { force: true });
  }

  /** Every readable state file; unreadable ones are reported through `bad` and left alone. */
  load(bad: (file: string, why: string) => void): NetdevState[] {
    let names: string[];
    try {
      names = readdirSync(this.netdevDir);
    } catch {
      return [];
    }
    const out: NetdevState[] = [];
    for (const f of names) {
      if (!f.endsWith('.json')) continue;
      const file = join(this.netdevDir, f);
      try {
        const s = JSON.parse(readFileSync(file, 'utf8')) as NetdevState;
        if (s.version !== STATE_VERSION) throw new Error(`unknown state version ${String(s.version)}`);
        validateIfName(s.name);
        if (`${s.name}.json` !== f) throw new Error('the file name does not match the netdev name');
        if (!Number.isInteger(s.pairs) || s.pairs < 1 || s.pairs > 256) throw new Error('bad pairs');
        if (!Number.isInteger(s.active) || s.active < 1 || s.active > s.pairs) s.active = s.pairs;
        out.push(s);
      } catch (err) {
        bad(file, (err as Error).message);
      }
    }
    return out;
  }
}

/** The pid recorded in a lock file, if it is one. */
function holderPid(file: string): number | undefined {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}
