/**
 * Shared helpers for the integration tests.
 *
 * Every integration file that creates a tap calls `useIsolatedNetns()` at the
 * top level: it moves the test process's JavaScript thread into a fresh,
 * anonymous network namespace in beforeAll (so every tap, socket and `ip`
 * child the file creates lives there) and returns to the original namespace
 * in afterAll, after deleting any tun/tap device still present.  Nothing can
 * leak into the host's root namespace: the namespace is anonymous and goes
 * away with its last reference.
 */
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { listTaps } from '../../lib/tap/links.js';
import { native } from '../../lib/sys/native.js';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns.js';
import { deleteTap, type Tap } from '../../lib/tap/tap.js';

export const CAP_NET_ADMIN = 12;

/** CapEff of this process as a bigint (0n when unreadable). */
export function capEff(status = readFileSync('/proc/self/status', 'utf8')): bigint {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(status);
  return m ? BigInt(`0x${m[1]}`) : 0n;
}

export function hasCap(cap: number, status?: string): boolean {
  return ((capEff(status) >> BigInt(cap)) & 1n) === 1n;
}

export interface TapEnv {
  ok: boolean;
  reason: string;
}

/**
 * The capabilities this run must have: `MQTAP_REQUIRE=all` (as .ci/run sets)
 * or a comma list of names ('tap,bpf,tcx,io_uring,uso,setpriv,...');
 * `MQTAP_VM_REQUIRED=1` implies 'qemu'.  Outside CI nothing is required.
 */
export function isRequired(name: string, envv: NodeJS.ProcessEnv = process.env): boolean {
  const list = (envv.MQTAP_REQUIRE ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  if (list.includes('all') || list.includes(name)) return true;
  return name === 'qemu' && envv.MQTAP_VM_REQUIRED === '1';
}

/**
 * The one place a test decides between running, skipping and failing:
 * `missing` is '' when the capability `name` is there, else why not.  A
 * missing capability that this run requires (isRequired) throws, so the test
 * (or, at import, the whole file) fails loudly; otherwise the reason is
 * printed and returned, for `describe.skipIf(!x.ok)` / `ctx.skip()`.
 */
export function need(name: string, missing: string): TapEnv {
  if (!missing) return { ok: true, reason: '' };
  if (isRequired(name))
    throw new Error(`${name} is required here (MQTAP_REQUIRE=${process.env.MQTAP_REQUIRE ?? ''}${process.env.MQTAP_VM_REQUIRED ? `, MQTAP_VM_REQUIRED=${process.env.MQTAP_VM_REQUIRED}` : ''}) but missing: ${missing}`);
  console.warn(`mqtap tests: ${name} unavailable, skipping what needs it: ${missing}`);
  return { ok: false, reason: missing };
}

/** Which Debian package has a command the tests run (for the messages; .ci/run installs them). */
const PACKAGE_OF: Record<string, string> = {
  ip: 'iproute2', tc: 'iproute2', ethtool: 'ethtool', setpriv: 'util-linux', prlimit: 'util-linux', unshare: 'util-linux',
  nsenter: 'util-linux', mknod: 'coreutils', getent: 'libc-bin', busybox: 'busybox-static', 'qemu-system-x86_64': 'qemu-system-x86',
};

/** need() for a command on PATH: `needCommand('setpriv').ok`. */
export function needCommand(cmd: string): TapEnv {
  const pkg = PACKAGE_OF[cmd];
  return need(cmd, haveCommand(cmd) ? '' : `${cmd} is not installed${pkg ? ` (apt-get install ${pkg})` : ''}`);
}

let cachedEnv: TapEnv | undefined;

/**
 * Whether this process can run the tap integration tests: /dev/net/tun
 * exists and opens, CapEff has CAP_NET_ADMIN, iproute2's `ip` is there and
 * unshare(CLONE_NEWNET) works (tried once: the probe namespace is left again
 * at once and disappears).  Missing, it skips with the reason, or fails where
 * 'tap' is required (need()).
 */
export function tapEnv(): TapEnv {
  if (cachedEnv) return cachedEnv;
  let reason = '';
  if (!existsSync('/dev/net/tun')) reason = '/dev/net/tun is missing (modprobe tun)';
  else if (!hasCap(CAP_NET_ADMIN)) reason = 'the process lacks CAP_NET_ADMIN (CapEff bit 12)';
  else if (!haveCommand('ip')) reason = 'ip is not installed (apt-get install iproute2): the tests cross-check with it';
  else {
    try {
      // A node that exists may still refuse (a container's device cgroup, a nodev /dev).
      native.close(native.tunOpen());
      isolateNetns().restore();
    } catch (err) {
      reason = `${(err as Error).message}`;
    }
  }
  cachedEnv = need('tap', reason);
  return cachedEnv;
}

/** Title suffix that makes a skip visible in the report. */
export function skipNote(env: TapEnv): string {
  return env.ok ? '' : ` (skipped: ${env.reason})`;
}

/**
 * Enters a fresh network namespace for the whole file (beforeAll) and leaves
 * it in afterAll, deleting leftover tun/tap devices first.  Call at the top
 * level of a test file (or inside its describe) only when tapEnv().ok.
 */
export function useIsolatedNetns(): { readonly ns: IsolatedNetns | undefined } {
  const holder: { ns: IsolatedNetns | undefined } = { ns: undefined };
  beforeAll(() => {
    holder.ns = isolateNetns();
  });
  afterAll(() => {
    if (!holder.ns) return;
    try {
      for (const t of listTaps()) {
        try {
          deleteTap(t.name);
        } catch {
          /* the namespace goes away anyway */
        }
      }
    } finally {
      holder.ns.restore();
      holder.ns = undefined;
    }
  });
  return holder;
}

/**
 * Keeps every Tap handed to `track()` and closes it after each test, so a
 * failing assertion leaves no fd (and no non-persistent device) behind.
 */
export function useTapTracker(): <T extends Tap>(tap: T) => T {
  const taps: Tap[] = [];
  afterEach(() => {
    for (const t of taps.splice(0)) {
      try {
        t.close();
      } catch {
        /* a test may have closed fds behind the library's back */
      }
    }
  });
  return <T extends Tap>(tap: T): T => {
    taps.push(tap);
    return tap;
  };
}

/**
 * The fd numbers open in this process right now (the listing's own transient
 * fd included, at the same number every time when nothing else changed).
 */
export function openFds(): number[] {
  return readdirSync('/proc/self/fd').map(Number).sort((a, b) => a - b);
}

/** Number of open fds (stable across calls when nothing leaks). */
export function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Runs a command (in the current thread's namespace) and returns stdout. */
export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs a command and returns the whole result without throwing. */
export function tryRun(cmd: string, args: string[]): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { encoding: 'utf8' });
}

/** iproute2's detailed JSON view of one link: `ip -d -j link show NAME`. */
export interface IpLink {
  ifname: string;
  ifindex: number;
  mtu: number;
  address?: string;
  flags: string[];
  operstate: string;
  max_mtu?: number;
  linkinfo?: {
    info_kind?: string;
    info_data?: {
      type?: string;
      pi?: boolean;
      vnet_hdr?: boolean;
      multi_queue?: boolean;
      persist?: boolean;
      numqueues?: number;
      numdisabled?: number;
      user?: string | number;
      group?: string | number;
    };
  };
}

export function ipLink(name: string): IpLink | undefined {
  const r = tryRun('ip', ['-d', '-j', 'link', 'show', 'dev', name]);
  if (r.status !== 0) return undefined;
  const parsed = JSON.parse(r.stdout) as IpLink[];
  return parsed[0];
}

/** Names of every link iproute2 sees in the current namespace. */
export function ipLinkNames(): string[] {
  return (JSON.parse(run('ip', ['-j', 'link', 'show'])) as IpLink[]).map((l) => l.ifname);
}

/** Captures what a function throws (moved to errors.ts, which needs no native addon; re-exported for the integration tests). */
export { catchError } from './errors.js';

/**
 * Lowers this process's soft RLIMIT_NOFILE (with util-linux `prlimit`, since
 * Node has no setrlimit) so that exactly `free` more fds can be opened, and
 * returns a function that restores the previous soft limit.  Only the soft
 * limit changes, so restoring needs no CAP_SYS_RESOURCE.
 */
export function limitFreeFds(free: number): () => void {
  const m = /^Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
  if (!m) throw new Error('cannot read RLIMIT_NOFILE from /proc/self/limits');
  const [soft, hard] = [m[1]!, m[2]!];
  const open = new Set(readdirSync('/proc/self/fd').map(Number));
  let limit = 0;
  for (let avail = 0; avail < free || open.has(limit); limit++) if (!open.has(limit)) avail++;
  execFileSync('prlimit', ['--pid', String(process.pid), `--nofile=${limit}:${hard}`], { stdio: 'ignore' });
  return () => {
    execFileSync('prlimit', ['--pid', String(process.pid), `--nofile=${soft}:${hard}`], { stdio: 'ignore' });
  };
}

export function haveCommand(cmd: string): boolean {
  return tryRun('sh', ['-c', `command -v '${cmd}'`]).status === 0;
}

/**
 * Opens fresh (unattached) /dev/net/tun fds until one gets number `fd`
 * (the kernel hands out the lowest free number), closes the others and
 * returns it.  Used to put a fd that is not a queue of any tap behind a
 * TapQueue's number, so TUNSETQUEUE on it fails for real (EINVAL).
 */
export function reuseFdNumber(fd: number): number {
  const extra: number[] = [];
  try {
    for (let i = 0; i < 1024; i++) {
      const got = native.tunOpen();
      if (got === fd) return got;
      extra.push(got);
      if (got > fd) break;
    }
    throw new Error(`could not get fd number ${fd} again`);
  } finally {
    for (const e of extra) native.close(e);
  }
}

/**
 * Settings for the current (throw-away) network namespace, written to
 * /proc/sys directly (no procps `sysctl` needed): IPv6 off for all and new
 * devices, so no router solicitations reach the queues (a kernel booted with
 * ipv6.disable=1 has no such files, and nothing to turn off), and optionally
 * IPv4 forwarding on.
 */
export function netnsSysctls(opts: { ipForward?: boolean } = {}): void {
  for (const which of ['all', 'default']) {
    const p = `/proc/sys/net/ipv6/conf/${which}/disable_ipv6`;
    if (existsSync(p)) writeFileSync(p, '1');
  }
  if (opts.ipForward) writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
}

const loadable = new Map<string, string>();

/**
 * '' when uid `uid` (gid the same, no groups, no capabilities) can load the
 * built module `path`, else why not: tests that run library code as another
 * user need the checkout readable by others, which a clone under a 0700 home
 * (/root) is not.  Needs setpriv (check needCommand('setpriv') first).
 */
export function cannotLoadAs(uid: number, path: string): string {
  const key = `${uid}:${path}`;
  let why = loadable.get(key);
  if (why === undefined) {
    const r = spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', process.execPath, '-e', `require(${JSON.stringify(path)})`], {
      encoding: 'utf8',
      cwd: '/',
    });
    const first = (r.stderr ?? '').split('\n').find((l) => /Error|EACCES|denied/.test(l)) ?? (r.error?.message ?? `exit ${r.status}`);
    why = r.status === 0 ? '' : `uid ${uid} cannot load ${path}: ${first.trim()} (the checkout must be readable by other users: clone it outside a 0700 home, or chmod o+rx its parents)`;
    loadable.set(key, why);
  }
  return why;
}
