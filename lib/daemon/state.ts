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
 */
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fsStep } from '../sys/errors';
import { validateIfName } from '../sys/validate';

export const STATE_VERSION = 1;

/** Who holds a netdev's fds besides the daemon. */
export type Lease =
  | { kind: 'client'; pid: number; uid: number; since: string }
  | { kind: 'qmp'; qmp: string; id: string; netdevId: string; since: string; pid: number; uid: number };

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

  /** Creates the directories (the state dir 0755, netdevs/ 0700). */
  init(): void {
    const hint = 'run the daemon as root, or give it a writable --state-dir';
    fsStep('STATE_DIR', this.dir, () => mkdirSync(this.dir, { recursive: true, mode: 0o755 }), hint);
    fsStep('STATE_DIR', this.netdevDir, () => mkdirSync(this.netdevDir, { recursive: true, mode: 0o700 }), hint);
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
