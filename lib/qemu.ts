/**
 * Handing a netdev to QEMU at launch: `-netdev tap,id=ID,fds=A:B,...` (and
 * `vhost=on,vhostfds=C:D`) with the fds mapped into the child, plus the
 * matching `-device virtio-net-pci,netdev=ID,mq=on,vectors=2N+2`.
 *
 * QEMU's own rules (net/tap.c) are applied here first, with better errors:
 * fds and vhostfds counts equal, vhostfds only with fds, no queues=/ifname=/
 * vnet_hdr=/vhostfd=/fd= beside fds, vnet_hdr consistent across the fds, at
 * most 256 queues, and vectors = 2N+2 (one per virtqueue + config + control).
 */
import { invalidArg, MqtapError } from './errors';
import { silentLogger, type Logger } from './log';
import { K, native } from './native';
import type { Netdev } from './netdev';
import { spawnWithFds, type ChildExit } from './spawn';
import { MAX_QUEUES, parseMac, formatMac } from './validate';

export interface QemuNetdevOptions {
  /** QEMU netdev id (letters, digits, '-', '.', '_'; starts with a letter).  Default 'net0'. */
  id?: string;
  /** Guest MAC for the device. */
  mac?: string;
  /** Device model.  Default 'virtio-net-pci'. */
  model?: string;
  /** First fd number in the child.  Default 3. */
  fdBase?: number;
  /** Check the fds are tap queues with a consistent vnet_hdr (TUNGETIFF).  Default true; false for a dry run. */
  verifyFds?: boolean;
  /** Extra `key=value` device properties (e.g. { romfile: '' }). */
  deviceProps?: Record<string, string | number | boolean>;
}

export interface QemuNetdevArgs {
  /** ['-netdev', 'tap,id=net0,fds=3:4,...'] */
  netdev: string[];
  /** ['-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=6'] */
  device: string[];
  /** Parent fds in the order they must appear in the child (tap fds, then vhost fds). */
  parentFds: number[];
  /** fd numbers as the child sees them. */
  fds: number[];
  vhostfds: number[];
  /** The next free child fd number after these. */
  nextFd: number;
}

const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

export function validateQemuId(id: unknown): string {
  if (typeof id !== 'string' || !ID_RE.test(id) || id.length > 127)
    throw invalidArg(`QEMU id ${JSON.stringify(id)} is not well-formed`, "QEMU ids start with a letter and contain only letters, digits, '-', '.' and '_'");
  return id;
}

/** Checks the rules QEMU applies to `-netdev tap` options (net/tap.c net_init_tap), on a parsed option list. */
export function checkTapNetdevOptions(opts: ReadonlyMap<string, string>): void {
  const has = (k: string): boolean => opts.has(k);
  const fds = opts.get('fds');
  const vhostfds = opts.get('vhostfds');
  if (has('fds')) {
    for (const k of ['fd', 'ifname', 'script', 'downscript', 'vnet_hdr', 'helper', 'queues', 'vhostfd'])
      if (has(k)) throw invalidArg(`-netdev tap: ${k}= cannot be used with fds= (QEMU refuses it)`, 'with pre-opened fds, mqtap already set the tap up');
    const n = fds!.split(':').filter(Boolean).length;
    if (n < 1 || n > MAX_QUEUES) throw invalidArg(`-netdev tap: fds= lists ${n} fds; 1 to ${MAX_QUEUES} are allowed`);
    if (vhostfds !== undefined) {
      const m = vhostfds.split(':').filter(Boolean).length;
      if (m !== n) throw invalidArg(`-netdev tap: fds= lists ${n} fds but vhostfds= lists ${m}; QEMU needs one vhost fd per queue`);
    }
  } else if (vhostfds !== undefined) {
    throw invalidArg('-netdev tap: vhostfds= needs fds= (one vhost fd per tap queue fd)');
  }
  if (vhostfds !== undefined && opts.get('vhost') === 'off') throw invalidArg('-netdev tap: vhostfds= with vhost=off makes no sense');
}

/** Parses 'tap,id=n0,fds=3:4' into its type and options. */
export function parseNetdevArg(arg: string): { type: string; options: Map<string, string> } {
  const [type = '', ...rest] = arg.split(',');
  const options = new Map<string, string>();
  for (const kv of rest) {
    const i = kv.indexOf('=');
    options.set(i < 0 ? kv : kv.slice(0, i), i < 0 ? 'on' : kv.slice(i + 1));
  }
  return { type, options };
}

/**
 * The QEMU arguments for `netdev`, with fd numbers as the child will see
 * them (fdBase.., tap fds first, then vhost fds).
 */
export function qemuNetdevArgs(netdev: Netdev, opts: QemuNetdevOptions = {}): QemuNetdevArgs {
  const id = validateQemuId(opts.id ?? 'net0');
  const fdBase = opts.fdBase ?? 3;
  if (!Number.isInteger(fdBase) || fdBase < 3) throw invalidArg('fdBase must be an integer >= 3 (0-2 are stdio)');
  const tapFds = netdev.tapFds();
  const vhostFds = netdev.vhostFds();
  const n = tapFds.length;
  if (n === 0) throw new MqtapError({ op: 'QEMU_ARGS', code: 'ERR_CLOSED', ifname: netdev.name, message: `${netdev.name} has no open queues` });
  if (n > MAX_QUEUES) throw invalidArg(`${n} queues: QEMU takes at most ${MAX_QUEUES}`);
  if (vhostFds.length && vhostFds.length !== n) throw invalidArg(`${netdev.name}: ${n} tap fds but ${vhostFds.length} vhost fds`);
  if (opts.verifyFds !== false) checkVnetHdrConsistent(netdev.name, tapFds);
  const fds = tapFds.map((_, i) => fdBase + i);
  const vhostfds = vhostFds.map((_, i) => fdBase + n + i);
  const netdevOpts = [`tap`, `id=${id}`, `fds=${fds.join(':')}`];
  if (vhostFds.length) netdevOpts.push('vhost=on', `vhostfds=${vhostfds.join(':')}`);
  else netdevOpts.push('vhost=off');
  checkTapNetdevOptions(parseNetdevArg(netdevOpts.join(',')).options);
  const model = opts.model ?? 'virtio-net-pci';
  if (!/^[A-Za-z0-9._-]+$/.test(model)) throw invalidArg(`device model ${JSON.stringify(model)} is not a QEMU device name`);
  const dev = [model, `netdev=${id}`];
  if (n > 1) dev.push('mq=on', `vectors=${2 * n + 2}`);
  if (opts.mac !== undefined) dev.push(`mac=${formatMac(parseMac(opts.mac))}`);
  for (const [k, v] of Object.entries(opts.deviceProps ?? {})) {
    if (!/^[A-Za-z0-9_-]+$/.test(k) || String(v).includes(',')) throw invalidArg(`device property ${k}=${String(v)} is not allowed`);
    dev.push(`${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)}`);
  }
  return {
    netdev: ['-netdev', netdevOpts.join(',')],
    device: ['-device', dev.join(',')],
    parentFds: [...tapFds, ...vhostFds],
    fds,
    vhostfds,
    nextFd: fdBase + tapFds.length + vhostFds.length,
  };
}

/** QEMU refuses "vnet_hdr not consistent across given tap fds": refuse first, naming the fd. */
function checkVnetHdrConsistent(name: string, fds: readonly number[]): void {
  let first: boolean | undefined;
  fds.forEach((fd, i) => {
    let has: boolean;
    try {
      has = (native.tunGetIff(fd).flags & K.IFF_VNET_HDR) !== 0;
    } catch (err) {
      throw new MqtapError({ op: 'QEMU_ARGS', code: (err as MqtapError).code ?? 'EBADF', ifname: name, queue: i, message: `${name} queue ${i} (fd ${fd}) is not a usable tap queue: ${(err as Error).message}` });
    }
    first ??= has;
    if (has !== first)
      throw new MqtapError({ op: 'QEMU_ARGS', code: 'EINVAL', ifname: name, queue: i, message: `vnet_hdr is not consistent across the fds of ${name} (fd ${fd} differs); QEMU would refuse them` });
  });
}

export interface LaunchNetdev {
  netdev: Netdev;
  options?: Omit<QemuNetdevOptions, 'fdBase'>;
}

export interface LaunchOptions {
  netdevs: readonly LaunchNetdev[];
  /** [binary, ...args].  `${MQTAP_FDS_<ID>}`/`${MQTAP_VHOSTFDS_<ID>}` in args are replaced; otherwise -netdev/-device are appended. */
  qemu: readonly string[];
  stdio?: 'inherit' | 'pipe';
  logger?: Logger;
  /** Close the netdevs when QEMU exits.  Default true. */
  closeOnExit?: boolean;
}

export interface LaunchPlan {
  argv: string[];
  parentFds: number[];
  netdevs: Array<{ id: string; ifname: string; fds: number[]; vhostfds: number[] }>;
}

/** The final argv and fd mapping for a launch, without starting anything. */
export function planLaunch(opts: Pick<LaunchOptions, 'netdevs' | 'qemu'>): LaunchPlan {
  if (!opts.qemu.length || !opts.qemu[0]) throw invalidArg('qemu: give the QEMU binary and its arguments');
  if (opts.netdevs.length === 0) throw invalidArg('netdevs: at least one netdev');
  let fdBase = 3;
  const argv = [...opts.qemu];
  const parentFds: number[] = [];
  const netdevs: LaunchPlan['netdevs'] = [];
  const ids = new Set<string>();
  for (const { netdev, options } of opts.netdevs) {
    const a = qemuNetdevArgs(netdev, { ...options, fdBase });
    const id = options?.id ?? 'net0';
    if (ids.has(id)) throw invalidArg(`netdev id ${id} is used twice`);
    ids.add(id);
    fdBase = a.nextFd;
    parentFds.push(...a.parentFds);
    netdevs.push({ id, ifname: netdev.name, fds: a.fds, vhostfds: a.vhostfds });
    const key = id.toUpperCase().replace(/[^A-Z0-9]/g, '_');
    const fdsToken = `\${MQTAP_FDS_${key}}`;
    const vhostToken = `\${MQTAP_VHOSTFDS_${key}}`;
    const userNetdev = argv.findIndex((x) => x.includes(fdsToken));
    if (userNetdev >= 0) {
      for (let i = 1; i < argv.length; i++) argv[i] = argv[i]!.split(fdsToken).join(a.fds.join(':')).split(vhostToken).join(a.vhostfds.join(':'));
      checkTapNetdevOptions(parseNetdevArg(argv[userNetdev]!).options);
    } else {
      argv.push(...a.netdev);
    }
    if (!argv.some((x, i) => argv[i - 1] === '-device' && new RegExp(`(^|,)netdev=${id.replace(/[.]/g, '\\.')}(,|$)`).test(x))) argv.push(...a.device);
  }
  return { argv, parentFds, netdevs };
}

export interface LaunchedQemu {
  pid: number | undefined;
  plan: LaunchPlan;
  /** Settles when QEMU exits (and, with closeOnExit, after the netdevs are closed). */
  exited: Promise<ChildExit>;
  /** The child process (stdout/stderr streams when stdio is 'pipe'). */
  child: import('node:child_process').ChildProcess;
}

/**
 * Spawns QEMU with exactly the netdevs' fds mapped (nothing else leaks into
 * it), relays SIGINT/SIGTERM/SIGHUP, and closes the netdevs when it exits (a
 * non-persistent tap then disappears).  Rejects `exited` when QEMU cannot be
 * started (closing the netdevs too).
 */
export function launchQemu(opts: LaunchOptions): LaunchedQemu {
  const log = opts.logger ?? silentLogger;
  const plan = planLaunch(opts);
  const closeAll = (): void => {
    if (opts.closeOnExit === false) return;
    for (const { netdev } of opts.netdevs) {
      try {
        netdev.close();
      } catch (err) {
        log.error({ err, ifname: netdev.name }, 'closing netdev after QEMU exit failed');
      }
    }
  };
  let spawned;
  try {
    spawned = spawnWithFds({ argv: plan.argv, fds: plan.parentFds, stdio: opts.stdio ?? 'inherit' });
  } catch (err) {
    closeAll();
    throw err;
  }
  log.info({ pid: spawned.child.pid, argv: plan.argv, netdevs: plan.netdevs }, 'qemu started');
  const exited = spawned.exited.then(
    (st) => {
      log.info({ pid: spawned.child.pid, ...st }, 'qemu exited');
      closeAll();
      return st;
    },
    (err: unknown) => {
      closeAll();
      throw err;
    },
  );
  return { pid: spawned.child.pid, plan, exited, child: spawned.child };
}
