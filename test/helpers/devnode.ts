/**
 * Device nodes of the test's own, so that a device's presence and mode are
 * fixtures of the test and not whatever the host happens to have
 * (/dev/net/tun is 0666 on most distributions, 0600 on some; /dev/vhost-net
 * is missing on many).  Two ways, both needing root:
 *
 * - `makeNodeDir()` makes a fresh directory, traversable by every user, on a
 *   filesystem that allows device nodes (a /tmp mounted `nodev` — systemd's
 *   tmp.mount, many containers — makes every node in it unopenable, even for
 *   root, with EACCES), and `tunNode()` creates the tun device's node in it
 *   with the given mode, for code that takes a device path.  The caller
 *   removes the directory (`remove()`).  Needs the `mknod` command.
 * - `ownDev()` is an argv prefix that runs a command in a private mount
 *   namespace with a tmpfs on /dev holding /dev/null and, if asked,
 *   /dev/net/tun, nothing else: "a host without /dev/vhost-net" (or without
 *   /dev/net/tun, or with a root-only one) for a whole child process.  Needs
 *   util-linux `unshare`; the network namespace is the caller's.
 *   `wrapperProblem()` says why such a prefix cannot run here.
 */
import { execFileSync, spawnSync } from 'node:child_process';
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

/** argv prefix: `[...ownDev('666'), 'node', ...]` runs node with a /dev of its own (tun: that mode, or no tun node). */
export function ownDev(tun: '666' | '600' | null): string[] {
  const script = [
    'mount -t tmpfs -o mode=755 mqtap-dev /dev',
    'mknod -m 666 /dev/null c 1 3',
    ...(tun ? ['mkdir /dev/net', `mknod -m ${tun} /dev/net/tun c ${TUN_MAJOR} ${TUN_MINOR}`] : []),
    'exec "$@"',
  ].join(' && ');
  return ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, 'sh'];
}

/** Why `prefix` cannot run `node` reading `file` here ('' when it can). */
export function wrapperProblem(prefix: readonly string[], file: string): string {
  const r = spawnSync(prefix[0]!, [...prefix.slice(1), process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(file)}, require('fs').constants.R_OK)`], { encoding: 'utf8', timeout: 30_000 });
  if (r.error) return `${prefix[0]}: ${r.error.message}`;
  return r.status === 0 ? '' : `${prefix.join(' ').slice(0, 40)}... failed: ${String(r.stderr).trim().split('\n')[0]}`;
}
