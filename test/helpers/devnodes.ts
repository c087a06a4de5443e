/**
 * A /dev of the test's own, so "a host without /dev/vhost-net" (or without
 * /dev/net/tun, or with a root-only one) can be tested on any host: the
 * command runs in a private mount namespace with a tmpfs on /dev holding
 * /dev/null and, if asked, /dev/net/tun, nothing else.  Needs root and
 * util-linux `unshare`; the network namespace is the caller's.
 */
import { spawnSync } from 'node:child_process';

/** argv prefix: `[...ownDev('666'), 'node', ...]` runs node with that /dev. */
export function ownDev(tun: '666' | '600' | null): string[] {
  const script = [
    'mount -t tmpfs -o mode=755 mqtap-dev /dev',
    'mknod -m 666 /dev/null c 1 3',
    ...(tun ? ['mkdir /dev/net', `mknod -m ${tun} /dev/net/tun c 10 200`] : []),
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
