/**
 * Private device nodes for tests, so that a device's mode is a fixture of the
 * test and not whatever the host happens to have (/dev/net/tun is 0666 on most
 * distributions, 0600 on some).
 *
 * `makeNodeDir()` makes a fresh directory, traversable by every user, on a
 * filesystem that allows device nodes (a /tmp mounted `nodev` — systemd's
 * tmp.mount, many containers — makes every node in it unopenable, even for
 * root, with EACCES), and `tunNode()` creates the tun device's node in it
 * with the given mode.  The caller removes the directory (`remove()`).
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { native } from '../../lib/sys/native.js';

/** MISC_MAJOR (include/uapi/linux/major.h) and TUN_MINOR (include/linux/miscdevice.h): the tun device. */
export const TUN_MAJOR = 10;
export const TUN_MINOR = 200;

export interface NodeDir {
  readonly dir: string;
  /** Creates DIR/NAME as the tun device (c 10:200) with exactly `mode` (chmod after mknod: no umask). */
  tunNode(name: string, mode: number): string;
  remove(): void;
}

/** Whether every directory from `dir` up to / has the "others may search" bit. */
function worldSearchable(dir: string): boolean {
  for (let d = dir; ; d = dirname(d)) {
    if ((statSync(d).mode & 0o001) === 0) return false;
    if (d === '/') return true;
  }
}

function mknodTun(path: string, mode: number): void {
  execFileSync('mknod', [path, 'c', String(TUN_MAJOR), String(TUN_MINOR)], { stdio: ['ignore', 'ignore', 'pipe'] });
  chmodSync(path, mode);
}

/**
 * A fresh directory for device nodes; throws (saying why, for each place
 * tried) when there is none.  Needs root (mknod) and the `mknod` command.
 */
export function makeNodeDir(prefix = 'mqtap-node-'): NodeDir {
  const tried: string[] = [];
  const candidates = [...new Set([tmpdir(), '/tmp', '/var/tmp', '/dev/shm', '/dev'])];
  for (const base of candidates) {
    let dir: string | undefined;
    try {
      if (!worldSearchable(base)) {
        tried.push(`${base}: not searchable by other users`);
        continue;
      }
      dir = mkdtempSync(join(base, prefix));
      chmodSync(dir, 0o755);
      // The kernel decides: a node on a nodev mount cannot be opened, even by root.
      const probe = join(dir, 'probe');
      mknodTun(probe, 0o600);
      native.close(native.tunOpen(probe));
      rmSync(probe);
      const d = dir;
      return {
        dir: d,
        tunNode: (name, mode) => {
          const p = join(d, name);
          mknodTun(p, mode);
          return p;
        },
        remove: () => rmSync(d, { recursive: true, force: true }),
      };
    } catch (err) {
      tried.push(`${base}: ${(err as Error).message.trim()}`);
      if (dir) rmSync(dir, { recursive: true, force: true });
    }
  }
  throw new Error(`no directory where a usable device node can be made: ${tried.join('; ')}`);
}

/** Whether uid/gid (with no supplementary groups and no capabilities) may open `path` read-write, by its mode bits. */
export function modeAllowsRw(path: string, uid: number, gid: number): boolean {
  const st = statSync(path);
  const bits = st.uid === uid ? st.mode >> 6 : st.gid === gid ? st.mode >> 3 : st.mode;
  return (bits & 0o6) === 0o6;
}
