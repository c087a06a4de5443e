/**
 * lib/qemu/ — handing queues to QEMU: at launch (this file), at run time over
 * QMP (qmp.ts, hotplug.ts), and the small guest that `mqtap demo` and the
 * tests boot (guest.ts).
 *
 * Handing a netdev to QEMU at launch, the way libvirt does:
 * `-netdev tap,id=ID,fds=A:B:...[,vhost=on,vhostfds=C:D:...]` with the fds
 * mapped into the child (tap fds first, then vhost fds, from fd 3 up) and the
 * matching `-device virtio-net-pci,netdev=ID,mq=on,vectors=2N+2`.
 *
 * QEMU's own rules (net/tap.c net_init_tap, hw/net/virtio-net.c) are applied
 * here first, with errors that say what to do:
 *
 *  - fds= and vhostfds= list the same number of fds; vhostfds= only with fds=;
 *  - no fd=, ifname=, script=, downscript=, vnet_hdr=, helper=, queues= or
 *    vhostfd= beside fds=; no vhostfds= with vhost=off;
 *  - 1..256 queues (the kernel's MAX_TAP_QUEUES; QEMU would take more fds);
 *  - every fd is a queue of a tap (not tun), all of the same device, with
 *    vnet_hdr consistent across them (QEMU: "vnet_hdr not consistent across
 *    given tap fds"), and **attached**: QEMU 7.2 assumes every queue it is
 *    handed is enabled; at device reset it detaches the pairs beyond the
 *    guest's count and aborts ("could not disable queue", an assertion in
 *    virtio_net_set_queue_pairs) if one was already detached;
 *  - every vhost fd is /dev/vhost-net (char 10:238);
 *  - vectors = 2N+2: one MSI-X vector per virtqueue, one for config changes,
 *    one for the control queue.
 */
import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { accessSync, constants as fsConstants, fstatSync } from 'node:fs';
import * as path from 'node:path';
import { ErrorCodes, invalidArg, MqtapError } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { K, native } from '../sys/native';
import { spawnWithFds, type ChildExit } from '../sys/spawn';
import { MAX_QUEUES, formatMac, parseMac } from '../sys/validate';

/** What qemuNetdevArgs needs of a netdev: its name and its open fds (a Netdev from openNetdev has them). */
export interface NetdevFds {
  readonly name: string;
  /** Tap queue fds, in queue order. */
  tapFds(): number[];
  /** vhost-net fds, one per tap fd, or none. */
  vhostFds(): number[];
}

/** A netdev launchQemu can close after QEMU exits (a Netdev from openNetdev). */
export interface ClosableNetdev extends NetdevFds {
  close(): void;
}

export interface QemuNetdevOptions {
  /** QEMU netdev id (starts with a letter; letters, digits, '-', '.', '_').  Default 'net0'. */
  id?: string;
  /** Guest MAC for the device. */
  mac?: string;
  /** Device model.  Default 'virtio-net-pci'. */
  model?: string;
  /** First fd number in the child.  Default 3. */
  fdBase?: number;
  /**
   * Check the fds (default true; false for a dry run with placeholder fds):
   * tap fds are attached queues of one tap with consistent vnet_hdr (TUNGETIFF),
   * vhost fds are /dev/vhost-net.
   */
  verifyFds?: boolean;
  /** Extra or overriding `key=value` device properties, e.g. { romfile: '' }.  Commas are escaped for QEMU. */
  deviceProps?: Record<string, string | number | boolean>;
}

export interface QemuNetdevArgs {
  /** ['-netdev', 'tap,id=net0,fds=3:4,vhost=off'] */
  netdev: string[];
  /** ['-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=6'] */
  device: string[];
  /** Parent fds in the order they must appear in the child (tap fds, then vhost fds). */
  parentFds: number[];
  /** Tap fd numbers as the child sees them. */
  fds: number[];
  /** vhost fd numbers as the child sees them (empty without vhost). */
  vhostfds: number[];
  /** The next free child fd number after these. */
  nextFd: number;
}

const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

export function validateQemuId(id: unknown, what = 'QEMU id'): string {
  if (typeof id !== 'string' || !ID_RE.test(id) || id.length > 127)
    throw invalidArg(`${what} ${JSON.stringify(id)} is not well-formed`, "QEMU ids start with a letter and contain only letters, digits, '-', '.' and '_' (at most 127)");
  return id;
}

/** QEMU's option escaping: a literal ',' in a value is written ',,'. */
export function qemuEscape(value: string): string {
  return value.replace(/,/g, ',,');
}

/** Splits a QEMU option string on single commas (',,' is a literal comma). */
function splitQemuOpts(arg: string): string[] {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < arg.length; i++) {
    const c = arg[i]!;
    if (c === ',') {
      if (arg[i + 1] === ',') {
        cur += ',';
        i++;
      } else {
        parts.push(cur);
        cur = '';
      }
    } else cur += c;
  }
  parts.push(cur);
  return parts;
}

/**
 * Parses a `-netdev` value — 'tap,id=n0,fds=3:4', 'type=tap,id=n0,...'
 * (',,' is a literal comma) or QEMU's JSON form '{"type":"tap",...}' — into
 * its type and options.  A bare flag ('vhost') reads as 'on'.
 */
export function parseNetdevArg(arg: string): { type: string; options: Map<string, string> } {
  const options = new Map<string, string>();
  if (arg.trimStart().startsWith('{')) {
    let obj: Record<string, unknown>;
    try {
      obj = JSON.parse(arg) as Record<string, unknown>;
    } catch (err) {
      throw invalidArg(`-netdev ${arg}: not valid JSON (${(err as Error).message})`);
    }
    for (const [k, v] of Object.entries(obj)) {
      if (k === 'type') continue;
      options.set(k, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v));
    }
    return { type: String(obj.type ?? ''), options };
  }
  const parts = splitQemuOpts(arg);
  let type = '';
  parts.forEach((kv, i) => {
    const eq = kv.indexOf('=');
    if (i === 0 && eq < 0) {
      type = kv;
      return;
    }
    const k = eq < 0 ? kv : kv.slice(0, eq);
    const v = eq < 0 ? 'on' : kv.slice(eq + 1);
    if (k === 'type') type = v;
    else options.set(k, v);
  });
  return { type, options };
}

const FD_TOKEN_RE = /^(\d+|[A-Za-z][A-Za-z0-9._-]*)$/;

function fdList(what: string, value: string): string[] {
  const list = value.split(':');
  if (list.some((f) => !FD_TOKEN_RE.test(f))) throw invalidArg(`-netdev tap: ${what}=${value} is not a ':'-separated list of fd numbers`);
  return list;
}

/** Checks the rules QEMU applies to `-netdev tap` options (net/tap.c net_init_tap), on a parsed option list. */
export function checkTapNetdevOptions(opts: ReadonlyMap<string, string>): void {
  const has = (k: string): boolean => opts.has(k);
  const fds = opts.get('fds');
  const vhostfds = opts.get('vhostfds');
  if (fds !== undefined) {
    const clash = ['fd', 'ifname', 'script', 'downscript', 'vnet_hdr', 'helper', 'queues', 'vhostfd'].filter(has);
    if (clash.length)
      throw invalidArg(
        `-netdev tap: ${clash.map((k) => `${k}=`).join(', ')} cannot be used with fds= (QEMU refuses it)`,
        'with pre-opened fds the tap is already set up: the queue count is the number of fds, vnet_hdr is the tap\'s, vhost fds go in vhostfds=',
      );
    const list = fdList('fds', fds);
    if (list.length < 1 || list.length > MAX_QUEUES) throw invalidArg(`-netdev tap: fds= lists ${list.length} fds; 1 to ${MAX_QUEUES} are allowed (a tap has at most ${MAX_QUEUES} queues)`);
    if (new Set(list).size !== list.length) throw invalidArg(`-netdev tap: fds=${fds} lists an fd twice`);
    if (vhostfds !== undefined) {
      const vlist = fdList('vhostfds', vhostfds);
      if (vlist.length !== list.length)
        throw invalidArg(`-netdev tap: fds= lists ${list.length} fd(s) but vhostfds= lists ${vlist.length}; QEMU needs exactly one vhost-net fd per tap queue fd`);
      if (new Set(vlist).size !== vlist.length) throw invalidArg(`-netdev tap: vhostfds=${vhostfds} lists an fd twice`);
      const both = vlist.filter((f) => list.includes(f));
      if (both.length) throw invalidArg(`-netdev tap: fd ${both[0]} is in both fds= and vhostfds=`);
    }
  } else if (vhostfds !== undefined) {
    throw invalidArg('-netdev tap: vhostfds= needs fds= (one vhost-net fd per tap queue fd); QEMU refuses it otherwise');
  }
  if (vhostfds !== undefined && opts.get('vhost') === 'off') throw invalidArg('-netdev tap: vhostfds= with vhost=off: QEMU would not use the vhost-net fds; drop one of them');
}

function isPciModel(model: string): boolean {
  return /-pci(-|$)/.test(model);
}

/**
 * The QEMU arguments for `netdev`, with fd numbers as the child will see
 * them (fdBase.., tap fds first, then vhost fds).  With verifyFds (default)
 * the fds are checked the way QEMU will, so a mistake is reported here
 * rather than as a QEMU error or abort.
 */
export function qemuNetdevArgs(netdev: NetdevFds, opts: QemuNetdevOptions = {}): QemuNetdevArgs {
  const id = validateQemuId(opts.id ?? 'net0');
  const fdBase = opts.fdBase ?? 3;
  if (!Number.isInteger(fdBase) || fdBase < 3) throw invalidArg('fdBase must be an integer >= 3 (0-2 are stdio)');
  const tapFds = netdev.tapFds();
  const vhostFds = netdev.vhostFds();
  const n = tapFds.length;
  if (n === 0) throw new MqtapError({ op: 'QEMU_ARGS', code: ErrorCodes.CLOSED, ifname: netdev.name, message: `${netdev.name} has no open queues` });
  if (n > MAX_QUEUES) throw invalidArg(`${netdev.name}: ${n} queues; a tap (and so QEMU's -netdev tap) takes at most ${MAX_QUEUES}`);
  checkFdCounts(netdev.name, tapFds, vhostFds);
  if (opts.verifyFds !== false) verifyNetdevFds({ name: netdev.name, op: 'QEMU_ARGS' }, tapFds, vhostFds);
  const fds = tapFds.map((_, i) => fdBase + i);
  const vhostfds = vhostFds.map((_, i) => fdBase + n + i);
  const netdevOpts = ['tap', `id=${id}`, `fds=${fds.join(':')}`];
  if (vhostFds.length) netdevOpts.push('vhost=on', `vhostfds=${vhostfds.join(':')}`);
  else netdevOpts.push('vhost=off');
  checkTapNetdevOptions(parseNetdevArg(netdevOpts.join(',')).options);

  const model = opts.model ?? 'virtio-net-pci';
  if (!/^[A-Za-z0-9._-]+$/.test(model)) throw invalidArg(`device model ${JSON.stringify(model)} is not a QEMU device name`);
  const props = new Map<string, string>();
  if (n > 1) {
    props.set('mq', 'on');
    if (isPciModel(model)) props.set('vectors', String(2 * n + 2));
  }
  if (opts.mac !== undefined) props.set('mac', formatMac(parseMac(opts.mac)));
  for (const [k, v] of Object.entries(opts.deviceProps ?? {})) {
    if (!/^[A-Za-z0-9_.-]+$/.test(k)) throw invalidArg(`device property ${JSON.stringify(k)} is not a QEMU property name`);
    if (k === 'netdev') throw invalidArg('device property netdev= is set by mqtap (it is the netdev id)');
    props.set(k, typeof v === 'boolean' ? (v ? 'on' : 'off') : qemuEscape(String(v)));
  }
  const dev = [model, `netdev=${id}`, ...[...props].map(([k, v]) => `${k}=${v}`)];
  return {
    netdev: ['-netdev', netdevOpts.join(',')],
    device: ['-device', dev.join(',')],
    parentFds: [...tapFds, ...vhostFds],
    fds,
    vhostfds,
    nextFd: fdBase + tapFds.length + vhostFds.length,
  };
}

/** vhostfds= count = fds= count (or no vhost fds at all). */
export function checkFdCounts(name: string, tapFds: readonly number[], vhostFds: readonly number[]): void {
  if (vhostFds.length && vhostFds.length !== tapFds.length)
    throw invalidArg(`${name}: ${tapFds.length} tap fd(s) but ${vhostFds.length} vhost-net fd(s); QEMU needs exactly one vhost-net fd per tap queue (vhostfds= count = fds= count)`);
}

/** Who is checking: `name` labels the messages (a tap name, or e.g. 'hotplug nic1'), `op` goes into the error. */
export interface FdCheckContext {
  name: string;
  op: string;
  /** The tap the fds must belong to (default: `name` when it is a plain tap name). */
  ifname?: string;
}

/**
 * The checks QEMU's `-netdev tap,fds=...,vhostfds=...` (at launch or through
 * netdev_add) needs, before anything is handed over: as many vhost fds as
 * tap fds (or none), no fd twice, every tap fd an attached queue of one tap
 * (see verifyTapFds), every vhost fd /dev/vhost-net.  Used by
 * qemuNetdevArgs (launch) and hotplugFds (QMP).  Throws MqtapError with
 * `op` = ctx.op; reads only (TUNGETIFF, fstat): nothing to undo.
 */
export function verifyNetdevFds(ctx: FdCheckContext, tapFds: readonly number[], vhostFds: readonly number[]): void {
  checkFdCounts(ctx.name, tapFds, vhostFds);
  const all = [...tapFds, ...vhostFds];
  const dup = all.find((fd, i) => all.indexOf(fd) !== i);
  if (dup !== undefined) throw invalidArg(`${ctx.name}: fd ${dup} is handed twice`);
  verifyTapFds(ctx, tapFds);
  vhostFds.forEach((fd, i) => verifyVhostFd(ctx, i, fd));
}

/**
 * Every tap fd must be a queue of the same tap (TUNGETIFF answers), a tap
 * and not a tun, multi-queue when there are several, attached (QEMU aborts
 * on a detached one at reset), with the same vnet_hdr flag (QEMU refuses
 * "vnet_hdr not consistent across given tap fds").
 */
/** The tap the fds must belong to, when known: ctx.ifname, or ctx.name when it is a plain tap name (not a template, not a label). */
function expectedTap(ctx: FdCheckContext): string | undefined {
  return ctx.ifname ?? (ctx.name !== '' && !ctx.name.includes('%') && !ctx.name.includes(' ') ? ctx.name : undefined);
}

function verifyTapFds(ctx: FdCheckContext, fds: readonly number[]): void {
  const { name, op } = ctx;
  const want = expectedTap(ctx);
  let first: { ifname: string; vnetHdr: boolean } | undefined;
  const fail = (i: number, _fd: number, code: string, message: string, hint?: string): never => {
    throw new MqtapError({ op, code, ifname: want ?? first?.ifname ?? name, queue: i, message, ...(hint ? { hint } : {}) });
  };
  fds.forEach((fd, i) => {
    let info: { name: string; flags: number };
    try {
      info = native.tunGetIff(fd);
    } catch (err) {
      const code = (err as MqtapError).code ?? 'EBADF';
      const why =
        code === 'EBADF'
          ? 'it is not an open fd (closed?)'
          : code === 'ENOTTY' || code === 'EINVAL'
            ? 'it is not a /dev/net/tun fd'
            : code === 'EBADFD'
              ? 'it is a /dev/net/tun fd not attached to any tap'
              : (err as Error).message;
      return fail(i, fd, code, `${name} queue ${i} (fd ${fd}) is not a tap queue: ${why}`, 'hand QEMU the fds of an open Netdev/Tap (openNetdev), nothing else');
    }
    if ((info.flags & K.IFF_TAP) === 0) fail(i, fd, 'EINVAL', `${name} queue ${i} (fd ${fd}) belongs to ${info.name}, a tun (layer 3) device; QEMU's -netdev tap needs a tap`);
    if (i === 0 && want !== undefined && info.name !== want)
      fail(i, fd, 'EINVAL', `${name} queue ${i} (fd ${fd}) is a queue of ${info.name}, not of ${want}`);
    if (first !== undefined && info.name !== first.ifname)
      fail(i, fd, 'EINVAL', `fd ${fd} is a queue of ${info.name} but fd ${fds[0]} is a queue of ${first.ifname}: one -netdev takes the queues of one tap`);
    if (fds.length > 1 && (info.flags & K.IFF_MULTI_QUEUE) === 0) fail(i, fd, 'EINVAL', `${info.name} is a single-queue tap; ${fds.length} fds need a multi-queue tap`);
    if ((info.flags & K.IFF_DETACH_QUEUE) !== 0)
      fail(
        i,
        fd,
        'EINVAL',
        `${info.name} queue ${i} (fd ${fd}) is disabled (detached); QEMU assumes every queue it is handed is enabled and aborts ("could not disable queue") when it resets the device`,
        'enable every queue before the launch (setActivePairs(N) / no --active); QEMU itself detaches the pairs the guest does not use and re-attaches them when the guest asks (ethtool -L)',
      );
    const vnetHdr = (info.flags & K.IFF_VNET_HDR) !== 0;
    if (first === undefined) first = { ifname: info.name, vnetHdr };
    else if (vnetHdr !== first.vnetHdr)
      fail(i, fd, 'EINVAL', `vnet_hdr is not consistent across the fds of ${info.name} (fd ${fd} ${vnetHdr ? 'has' : 'lacks'} it, fd ${fds[0]} ${first.vnetHdr ? 'has' : 'lacks'} it); QEMU would refuse them`);
  });
}

const VHOST_NET_MAJOR = 10;
const VHOST_NET_MINOR = 238;

/** A vhost fd must be an open /dev/vhost-net (misc char device 10:238). */
function verifyVhostFd(ctx: FdCheckContext, i: number, fd: number): void {
  const { name, op } = ctx;
  const ifname = expectedTap(ctx);
  let st;
  try {
    st = fstatSync(fd);
  } catch (err) {
    throw new MqtapError({ op, code: (err as NodeJS.ErrnoException).code ?? 'EBADF', ...(ifname !== undefined ? { ifname } : {}), queue: i, message: `${name} vhost fd ${i} (fd ${fd}) is not open (closed?)` });
  }
  const major = Number((BigInt(st.rdev) >> 8n) & 0xfffn);
  const minor = Number((BigInt(st.rdev) & 0xffn) | ((BigInt(st.rdev) >> 12n) & ~0xffn));
  if (!st.isCharacterDevice() || major !== VHOST_NET_MAJOR || minor !== VHOST_NET_MINOR)
    throw new MqtapError({ op, code: 'EINVAL', ...(ifname !== undefined ? { ifname } : {}), queue: i, message: `${name} vhost fd ${i} (fd ${fd}) is not /dev/vhost-net` });
}

export interface LaunchNetdev {
  netdev: ClosableNetdev;
  options?: Omit<QemuNetdevOptions, 'fdBase'>;
}

export interface LaunchOptions {
  /** The netdevs to hand over.  launchQemu owns them from the call on: see closeOnExit. */
  netdevs: readonly LaunchNetdev[];
  /**
   * [binary, ...args].  `${MQTAP_FDS_<ID>}` / `${MQTAP_VHOSTFDS_<ID>}` in a
   * `-netdev` of args are replaced by the child's fd lists (ID upper-cased,
   * other characters as '_'); otherwise `-netdev` is appended.  `-device` is
   * appended unless args have a `-device ...,netdev=ID`.
   */
  qemu: readonly string[];
  /** QEMU's stdin/stdout/stderr.  Default 'inherit'. */
  stdio?: 'inherit' | 'pipe';
  logger?: Logger;
  /**
   * Close the netdevs when QEMU exits, and when it cannot be started (bad
   * arguments, missing binary).  Default true.
   */
  closeOnExit?: boolean;
  /** Kill QEMU (SIGKILL) if this process dies, even by SIGKILL (`setpriv --pdeathsig`, util-linux).  Default false. */
  killWithParent?: boolean;
  /** Extra environment for QEMU. */
  env?: Record<string, string | undefined>;
}

export interface LaunchPlanNetdev {
  id: string;
  ifname: string;
  fds: number[];
  vhostfds: number[];
  /** The -netdev value QEMU gets (mqtap's, or the user's with the placeholders filled). */
  netdevArg: string;
  /** The -device value for this netdev (mqtap's, or the user's). */
  deviceArg: string;
}

export interface LaunchPlan {
  /** The final argv: [binary, ...args]. */
  argv: string[];
  /** Parent fds, in child order from fd 3. */
  parentFds: number[];
  netdevs: LaunchPlanNetdev[];
  /** Things QEMU accepts but that are probably not meant (e.g. too few MSI-X vectors on the user's -device). */
  warnings: string[];
}

function placeholderKey(id: string): string {
  return id.toUpperCase().replace(/[^A-Z0-9]/g, '_');
}

const isOpt = (a: string | undefined, name: string): boolean => a === `-${name}` || a === `--${name}`;

/** The final argv and fd mapping for a launch, without starting anything. */
export function planLaunch(opts: Pick<LaunchOptions, 'netdevs' | 'qemu'>): LaunchPlan {
  if (!Array.isArray(opts.qemu) || !opts.qemu.length || !opts.qemu[0]) throw invalidArg('qemu: give the QEMU binary and its arguments', 'e.g. mqtap launch --queues 4 -- qemu-system-x86_64 -m 1G ...');
  if (!Array.isArray(opts.netdevs) || opts.netdevs.length === 0) throw invalidArg('netdevs: at least one netdev');
  let fdBase = 3;
  const argv = [...opts.qemu];
  const parentFds: number[] = [];
  const netdevs: LaunchPlanNetdev[] = [];
  const warnings: string[] = [];
  const ids = new Set<string>();
  const netdevIndexWithId = (id: string): number =>
    argv.findIndex((x, i) => i > 0 && isOpt(argv[i - 1], 'netdev') && (() => {
      try {
        return parseNetdevArg(x).options.get('id') === id;
      } catch {
        return false;
      }
    })());
  for (const { netdev, options } of opts.netdevs) {
    const id = validateQemuId(options?.id ?? 'net0');
    if (ids.has(id)) throw invalidArg(`netdev id ${id} is used twice; give each netdev its own id`);
    ids.add(id);
    const a = qemuNetdevArgs(netdev, { ...options, fdBase });
    fdBase = a.nextFd;
    parentFds.push(...a.parentFds);
    const key = placeholderKey(id);
    const fdsToken = `\${MQTAP_FDS_${key}}`;
    const vhostToken = `\${MQTAP_VHOSTFDS_${key}}`;
    const withToken = argv.map((x, i) => (i > 0 && x.includes(fdsToken) ? i : -1)).filter((i) => i >= 0);
    let netdevArg: string;
    if (withToken.length > 1) throw invalidArg(`${fdsToken} appears ${withToken.length} times in the QEMU arguments; use it in one -netdev`);
    if (withToken.length === 1) {
      const at = withToken[0]!;
      if (!isOpt(argv[at - 1], 'netdev')) throw invalidArg(`${fdsToken} must be in a -netdev value (found in ${JSON.stringify(argv[at])})`);
      const user = argv[at]!;
      const usesVhost = user.includes(vhostToken);
      if (a.vhostfds.length && !usesVhost)
        throw invalidArg(`vhost-net fds were opened for ${id} but your -netdev has no vhostfds=${vhostToken}`, `add ,vhost=on,vhostfds=${vhostToken} to it, or open no vhost fds (--vhost off)`);
      if (!a.vhostfds.length && usesVhost)
        throw invalidArg(`your -netdev uses ${vhostToken} but no vhost-net fds were opened for ${id}`, 'use --vhost on (needs /dev/vhost-net), or drop vhost=on,vhostfds= from it');
      const filled = user.split(fdsToken).join(a.fds.join(':')).split(vhostToken).join(a.vhostfds.join(':'));
      const parsed = parseNetdevArg(filled);
      if (parsed.type !== 'tap') throw invalidArg(`the -netdev with ${fdsToken} is of type ${JSON.stringify(parsed.type)}; pre-opened fds need -netdev tap`);
      if (parsed.options.get('id') !== id) throw invalidArg(`the -netdev with ${fdsToken} has id=${parsed.options.get('id') ?? '(none)'}; it must be id=${id}`);
      checkTapNetdevOptions(parsed.options);
      argv[at] = filled;
      netdevArg = filled;
    } else {
      if (argv.some((x, i) => i > 0 && x.includes(vhostToken))) throw invalidArg(`${vhostToken} is used without ${fdsToken} in the same -netdev`);
      const clash = netdevIndexWithId(id);
      if (clash >= 0)
        throw invalidArg(
          `the QEMU arguments already define -netdev id=${id} (${argv[clash]}); mqtap would add a second one`,
          `write fds=${fdsToken}${a.vhostfds.length ? ` and vhostfds=${vhostToken}` : ''} in your -netdev, or drop it and let mqtap add its own`,
        );
      argv.push(...a.netdev);
      netdevArg = a.netdev[1]!;
    }
    const devRe = new RegExp(`(^|,)netdev=${id.replace(/[.]/g, '\\.')}(,|$)`);
    const userDev = argv.findIndex((x, i) => i > 0 && isOpt(argv[i - 1], 'device') && devRe.test(x));
    let deviceArg: string;
    if (userDev >= 0) {
      deviceArg = argv[userDev]!;
      const vec = /(^|,)vectors=(\d+)(,|$)/.exec(deviceArg);
      const n = a.fds.length;
      if (n > 1 && vec && Number(vec[2]) < 2 * n + 2)
        warnings.push(`-device ${deviceArg}: vectors=${vec[2]} is fewer than 2N+2 = ${2 * n + 2} for ${n} queue pairs; the guest then shares interrupts between queues`);
      if (n > 1 && /(^|,)mq=(off|false|no)(,|$)/.test(deviceArg)) warnings.push(`-device ${deviceArg}: mq=off: the guest will use one queue pair of ${n}`);
    } else {
      argv.push(...a.device);
      deviceArg = a.device[1]!;
    }
    netdevs.push({ id, ifname: netdev.name, fds: a.fds, vhostfds: a.vhostfds, netdevArg, deviceArg });
  }
  const stray = argv.slice(1).find((x) => /\$\{MQTAP_(VHOST)?FDS_[A-Z0-9_]*\}/.test(x));
  if (stray !== undefined)
    throw invalidArg(`${stray}: a placeholder for a netdev id that is not launched (ids: ${[...ids].join(', ')})`, 'the placeholder is ${MQTAP_FDS_<ID>} with the netdev id upper-cased, e.g. ${MQTAP_FDS_NET0} for --id net0');
  return { argv, parentFds, netdevs, warnings };
}

let pdeathsigCache: Map<string, string[]> | undefined;

/**
 * `['setpriv', '--pdeathsig', SIG, '--']` when util-linux's setpriv supports
 * it, else [] — prefixed to a command, it dies with this process (even when
 * this process is SIGKILLed).  The wrapper execs the command: same pid, same fds.
 */
export function pdeathsigWrapper(signal: NodeJS.Signals = 'SIGKILL'): string[] {
  pdeathsigCache ??= new Map();
  const hit = pdeathsigCache.get(signal);
  if (hit) return hit;
  const r = spawnSync('setpriv', ['--help'], { encoding: 'utf8' });
  const w = !r.error && /--pdeathsig/.test(`${r.stdout}${r.stderr}`) ? ['setpriv', '--pdeathsig', signal.replace(/^SIG/, ''), '--'] : [];
  pdeathsigCache.set(signal, w);
  return w;
}

function findExecutable(bin: string): { path?: string; code?: 'ENOENT' | 'EACCES' } {
  const check = (p: string): 'ok' | 'ENOENT' | 'EACCES' => {
    try {
      accessSync(p, fsConstants.X_OK);
      return 'ok';
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'EACCES' ? 'EACCES' : 'ENOENT';
    }
  };
  if (bin.includes('/')) {
    const c = check(bin);
    return c === 'ok' ? { path: bin } : { code: c };
  }
  let denied = false;
  for (const dir of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, bin);
    const c = check(p);
    if (c === 'ok') return { path: p };
    if (c === 'EACCES') denied = true;
  }
  return { code: denied ? 'EACCES' : 'ENOENT' };
}

/**
 * Throws the error launchQemu would (op 'SPAWN', code ENOENT or EACCES, with
 * a hint; the CLI maps them to exit 127 / 126) when `bin` cannot be run.
 * Lets a caller check before it opens anything.  Returns the resolved path.
 */
export function assertExecutable(bin: string): string {
  const found = findExecutable(bin);
  if (found.path) return found.path;
  throw new MqtapError({
    op: 'SPAWN',
    code: found.code!,
    syscall: 'spawn',
    message: `cannot run ${bin}: ${found.code === 'EACCES' ? 'permission denied (not executable)' : 'command not found'}`,
    hint:
      found.code === 'EACCES'
        ? `make ${bin} executable, or give the right path`
        : /qemu-system-/.test(bin)
          ? 'install QEMU (Debian/Ubuntu: apt-get install -y qemu-system-x86) or give its full path'
          : `install ${bin} or give its full path`,
  });
}

export interface LaunchedQemu {
  pid: number | undefined;
  plan: LaunchPlan;
  /** Settles when QEMU exits (and, with closeOnExit, after the netdevs are closed). */
  exited: Promise<ChildExit>;
  /** The child process (stdout/stderr streams when stdio is 'pipe'). */
  child: ChildProcess;
}

/**
 * Spawns QEMU with exactly the netdevs' fds mapped from fd 3 (every other fd
 * of this process is made close-on-exec first, so nothing else leaks into
 * it), relays SIGINT/SIGTERM/SIGHUP, and closes the netdevs when it exits (a
 * non-persistent tap then disappears; a persistent one keeps no queue).
 *
 * launchQemu owns the netdevs from the call on: when it throws (bad
 * arguments or fds, QEMU binary missing or not executable) they are closed
 * before the error reaches the caller, unless closeOnExit is false.
 * `exited` resolves with QEMU's status (128+N when signal N killed it),
 * after the netdevs are closed and (stdio 'pipe') QEMU's output pipes have
 * closed (waited for up to 2 s).
 */
export function launchQemu(opts: LaunchOptions): LaunchedQemu {
  const log = opts.logger ?? silentLogger;
  const closeAll = (): void => {
    if (opts.closeOnExit === false) return;
    for (const { netdev } of opts.netdevs ?? []) {
      try {
        netdev.close();
      } catch (err) {
        log.error({ err, ifname: netdev.name }, 'closing netdev after QEMU failed');
      }
    }
  };
  let plan: LaunchPlan;
  let spawned;
  try {
    plan = planLaunch(opts);
    for (const w of plan.warnings) log.warn(w);
    assertExecutable(plan.argv[0]!);
    const wrapper = opts.killWithParent ? pdeathsigWrapper('SIGKILL') : [];
    if (opts.killWithParent && !wrapper.length) log.warn('setpriv --pdeathsig is not available (util-linux): QEMU will not die with mqtap if mqtap is killed');
    spawned = spawnWithFds({ argv: [...wrapper, ...plan.argv], fds: plan.parentFds, stdio: opts.stdio ?? 'inherit', ...(opts.env ? { env: opts.env } : {}) });
  } catch (err) {
    closeAll();
    throw err;
  }
  const { child } = spawned;
  // With stdio 'pipe', 'exit' may come before the pipes are drained and closed: wait for them (bounded),
  // so that when `exited` settles no fd of this launch is open any more.
  const streamsClosed = new Promise<void>((resolve) => {
    if (opts.stdio !== 'pipe') return resolve();
    child.once('close', () => resolve());
  });
  log.info({ pid: child.pid, argv: plan.argv, netdevs: plan.netdevs.map(({ id, ifname, fds, vhostfds }) => ({ id, ifname, fds, vhostfds })) }, 'qemu started');
  const exited = spawned.exited.then(
    async (st) => {
      log.info({ pid: child.pid, ...st }, 'qemu exited');
      closeAll();
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([streamsClosed, new Promise<void>((resolve) => (timer = setTimeout(resolve, 2_000)))]);
      clearTimeout(timer);
      return st;
    },
    (err: unknown) => {
      closeAll();
      throw err;
    },
  );
  return { pid: child.pid, plan, exited, child };
}

// ---------------------------------------------------------------------------
// vhost-user: what QEMU needs around a backend listening on a UNIX socket.

/** QEMU's default guest RAM for x86 machines when no -m is given (hw/i386: 128 MiB). */
export const QEMU_DEFAULT_RAM_BYTES = 128 * 1024 * 1024;

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/**
 * Parses the value of QEMU's `-m`: `512` (MiB), `512M`, `1G`, `1.5G`,
 * `size=1G[,slots=N,maxmem=...]` (a number without suffix is MiB, as QEMU
 * reads it).  Returns bytes.
 */
export function parseQemuMemSize(value: string): number {
  let size: string | undefined;
  for (const [i, part] of splitQemuOpts(value).entries()) {
    const eq = part.indexOf('=');
    if (eq < 0) {
      if (i === 0) size = part;
      else throw invalidArg(`-m ${value}: "${part}" is not key=value`);
    } else if (part.slice(0, eq) === 'size') size = part.slice(eq + 1);
    else if (!['slots', 'maxmem'].includes(part.slice(0, eq))) throw invalidArg(`-m ${value}: unknown option ${part.slice(0, eq)}= (QEMU knows size=, slots=, maxmem=)`);
  }
  const m = size === undefined ? null : /^(\d+(?:\.\d+)?)([bBkKmMgGtT]?)$/.exec(size.trim());
  if (!m) throw invalidArg(`-m ${value}: no size QEMU would accept`, 'give -m 512 (MiB), -m 512M, -m 1G or -m size=1G');
  const unit = m[2] ? SIZE_UNITS[m[2].toLowerCase()]! : SIZE_UNITS.m!;
  const bytes = Math.round(Number(m[1]) * unit);
  if (!Number.isFinite(bytes) || bytes < 2 ** 20) throw invalidArg(`-m ${value}: ${bytes} bytes is less than 1 MiB`);
  return bytes;
}

/** A memory size as QEMU reads it, in the largest whole unit (1073741824 -> '1G', 536870912 -> '512M'). */
export function formatQemuSize(bytes: number): string {
  for (const [u, f] of [['T', 2 ** 40], ['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) if (bytes % f === 0) return `${bytes / f}${u}`;
  return String(bytes);
}

/** The values of every `-NAME VALUE` (or `--NAME VALUE`) in args (args[0] is the binary). */
function optionValues(args: readonly string[], name: string): string[] {
  const out: string[] = [];
  for (let i = 1; i < args.length - 1; i++) if (isOpt(args[i], name)) out.push(args[i + 1]!);
  return out;
}

/**
 * The accelerator QEMU will use, from its arguments: `-enable-kvm`,
 * `-accel kvm[,...]` (several -accel are tried in order),
 * `-machine ...,accel=kvm:tcg`.  KVM counts only when `kvmUsable` (QEMU
 * falls back to the next accelerator, or fails, without /dev/kvm).  No
 * accelerator given: TCG (QEMU's default for x86 system emulation).
 */
export function qemuAccel(args: readonly string[], kvmUsable: boolean): 'kvm' | 'tcg' {
  const wanted: string[] = [];
  if (args.slice(1).some((a) => a === '-enable-kvm' || a === '--enable-kvm')) wanted.push('kvm');
  for (const v of optionValues(args, 'accel')) wanted.push(parseNetdevArg(v).type || (parseNetdevArg(v).options.get('accel') ?? ''));
  for (const v of [...optionValues(args, 'machine'), ...optionValues(args, 'M')]) {
    const acc = parseNetdevArg(v).options.get('accel');
    if (acc) wanted.push(...acc.split(':'));
  }
  for (const a of wanted) {
    if (a === 'kvm' && kvmUsable) return 'kvm';
    if (a === 'tcg') return 'tcg';
  }
  return 'tcg';
}

export interface VhostUserLaunchOptions {
  /** [binary, ...args]: the user's QEMU command line. */
  qemu: readonly string[];
  /** The backend's UNIX socket (it listens; QEMU connects, and reconnects after 1 s if it goes away). */
  socket: string;
  /** Queue pairs (1..256). */
  queues: number;
  /** netdev id (default 'net0'); the chardev is ID-vu, the memory backend mqtap-mem. */
  id?: string;
  mac?: string;
  model?: string;
  deviceProps?: Record<string, string | number | boolean>;
  /** Whether KVM works here (/dev/kvm openable read-write); decides vectors with qemuAccel. */
  kvmUsable: boolean;
}

export interface VhostUserLaunchPlan {
  argv: string[];
  accel: 'kvm' | 'tcg';
  /** Guest RAM in bytes (from -m, or QEMU's default), shared through the memfd backend. */
  memBytes: number;
  netdevArg: string;
  deviceArg: string;
  chardevArg: string;
  memArgs: string[];
  warnings: string[];
}

export const VHOST_USER_MEM_ID = 'mqtap-mem';

/**
 * The QEMU command line for a vhost-user netdev served by mqtap at `socket`:
 * the user's args plus
 *
 *   -object memory-backend-memfd,id=mqtap-mem,size=<-m>,share=on -numa node,memdev=mqtap-mem
 *   -chardev socket,id=ID-vu,path=SOCKET,reconnect=1
 *   -netdev vhost-user,id=ID,chardev=ID-vu,queues=N
 *   -device virtio-net-pci,netdev=ID,mq=on,vectors=V[,mac=..][,props]
 *
 * Guest RAM must be shared for the backend to map it: the memfd is sized
 * like the -m given (the last one, as QEMU does; 128M without).  V is 0
 * under TCG: QEMU 7.2 segfaults in kvm_virtio_pci_irqfd_use when a
 * vhost-user device with MSI-X vectors starts without KVM (INTx then; the
 * guest works the same, slower); 2N+2 with KVM (one vector per virtqueue,
 * config, control queue).  Refused: the user's args already choosing guest
 * memory (-numa, -machine memory-backend=, -mem-path, an object with id
 * mqtap-mem), a -netdev with the same id, or a -device for it with MSI-X
 * vectors under TCG.
 */
export function planVhostUserLaunch(opts: VhostUserLaunchOptions): VhostUserLaunchPlan {
  if (!Array.isArray(opts.qemu) || !opts.qemu.length || !opts.qemu[0]) throw invalidArg('qemu: give the QEMU binary and its arguments', 'e.g. mqtap launch --backend vhost-user --queues 4 -- qemu-system-x86_64 -m 1G ...');
  if (typeof opts.socket !== 'string' || !opts.socket.startsWith('/')) throw invalidArg(`socket must be an absolute path (got ${String(opts.socket)})`);
  const n = opts.queues;
  if (!Number.isInteger(n) || n < 1 || n > MAX_QUEUES) throw invalidArg(`queues: ${String(n)}; 1 to ${MAX_QUEUES} queue pairs`);
  const id = validateQemuId(opts.id ?? 'net0');
  const chr = `${id}-vu`;
  const argv = [...opts.qemu];
  const warnings: string[] = [];
  const hint = 'mqtap adds guest memory QEMU shares with the backend (-object memory-backend-memfd,...,share=on -numa node,memdev=mqtap-mem): leave guest memory to it, give only -m SIZE';

  // Guest memory: the backend must be able to map it.
  if (optionValues(argv, 'numa').length) throw invalidArg(`the QEMU arguments already have -numa ${optionValues(argv, 'numa')[0]}; vhost-user needs all guest RAM in one shared backend`, hint);
  for (const v of [...optionValues(argv, 'machine'), ...optionValues(argv, 'M')]) {
    const mb = parseNetdevArg(v).options.get('memory-backend');
    if (mb !== undefined) throw invalidArg(`the QEMU arguments already set -machine memory-backend=${mb}; mqtap would add a second memory backend for guest RAM`, hint);
  }
  if (argv.slice(1).some((a) => isOpt(a, 'mem-path'))) throw invalidArg('-mem-path: guest RAM from a file cannot be shared with the vhost-user backend the way mqtap sets it up', hint);
  for (const v of optionValues(argv, 'object')) {
    if (parseNetdevArg(v).options.get('id') === VHOST_USER_MEM_ID) throw invalidArg(`the QEMU arguments already define an object with id=${VHOST_USER_MEM_ID}`, hint);
  }
  const ms = optionValues(argv, 'm');
  const memBytes = ms.length ? parseQemuMemSize(ms[ms.length - 1]!) : QEMU_DEFAULT_RAM_BYTES;
  const memArgs = ['-object', `memory-backend-memfd,id=${VHOST_USER_MEM_ID},size=${formatQemuSize(memBytes)},share=on`, '-numa', `node,memdev=${VHOST_USER_MEM_ID}`];

  for (const v of optionValues(argv, 'netdev')) {
    let nid: string | undefined;
    try {
      nid = parseNetdevArg(v).options.get('id');
    } catch {
      /* not ours to judge */
    }
    if (nid === id) throw invalidArg(`the QEMU arguments already define -netdev id=${id} (${v}); mqtap adds -netdev vhost-user,id=${id}`, 'drop it, or give mqtap another --id');
  }
  for (const v of optionValues(argv, 'chardev')) {
    if (splitQemuOpts(v).includes(`id=${chr}`)) throw invalidArg(`the QEMU arguments already define -chardev id=${chr}; mqtap adds its own`, 'drop it, or give mqtap another --id');
  }

  const accel = qemuAccel(argv, opts.kvmUsable);
  const chardevArg = `socket,id=${chr},path=${qemuEscape(opts.socket)},reconnect=1`;
  const netdevArg = `vhost-user,id=${id},chardev=${chr},queues=${n}`;
  const model = opts.model ?? 'virtio-net-pci';
  if (!/^[A-Za-z0-9._-]+$/.test(model)) throw invalidArg(`device model ${JSON.stringify(model)} is not a QEMU device name`);
  const pci = isPciModel(model);
  const props = new Map<string, string>();
  if (n > 1) props.set('mq', 'on');
  if (pci && accel === 'tcg') props.set('vectors', '0');
  else if (pci && n > 1) props.set('vectors', String(2 * n + 2));
  if (opts.mac !== undefined) props.set('mac', formatMac(parseMac(opts.mac)));
  for (const [k, v] of Object.entries(opts.deviceProps ?? {})) {
    if (!/^[A-Za-z0-9_.-]+$/.test(k)) throw invalidArg(`device property ${JSON.stringify(k)} is not a QEMU property name`);
    if (k === 'netdev') throw invalidArg('device property netdev= is set by mqtap (it is the netdev id)');
    if (k === 'vectors' && pci && accel === 'tcg' && String(v) !== '0') throw tcgVectorsError(`--device-prop vectors=${String(v)}`);
    props.set(k, typeof v === 'boolean' ? (v ? 'on' : 'off') : qemuEscape(String(v)));
  }
  const devRe = new RegExp(`(^|,)netdev=${id.replace(/[.]/g, '\\.')}(,|$)`);
  const userDev = argv.findIndex((x, i) => i > 0 && isOpt(argv[i - 1], 'device') && devRe.test(x));
  let deviceArg: string;
  argv.push(...memArgs, '-chardev', chardevArg, '-netdev', netdevArg);
  if (userDev >= 0) {
    deviceArg = argv[userDev]!;
    const vec = /(^|,)vectors=(\d+)(,|$)/.exec(deviceArg);
    if (accel === 'tcg' && isPciModel(deviceArg.split(',')[0]!) && (!vec || vec[2] !== '0')) throw tcgVectorsError(`-device ${deviceArg}${vec ? '' : ' (QEMU\'s default vectors)'}`);
    if (accel === 'kvm' && n > 1 && vec && Number(vec[2]) < 2 * n + 2)
      warnings.push(`-device ${deviceArg}: vectors=${vec[2]} is fewer than 2N+2 = ${2 * n + 2} for ${n} queue pairs; the guest then shares interrupts between queues`);
    if (n > 1 && /(^|,)mq=(off|false|no)(,|$)/.test(deviceArg)) warnings.push(`-device ${deviceArg}: mq=off: the guest will use one queue pair of ${n}`);
  } else {
    deviceArg = [model, `netdev=${id}`, ...[...props].map(([k, v]) => `${k}=${v}`)].join(',');
    argv.push('-device', deviceArg);
  }
  return { argv, accel, memBytes, netdevArg, deviceArg, chardevArg, memArgs, warnings };
}

function tcgVectorsError(what: string): MqtapError {
  return invalidArg(
    `${what}: MSI-X vectors on a vhost-user virtio-net-pci without KVM crash QEMU 7.2 (SIGSEGV in kvm_virtio_pci_irqfd_use when the guest starts the NIC)`,
    'under TCG use vectors=0 (mqtap sets it when it adds the -device); with KVM (-accel kvm and a usable /dev/kvm) vectors=2N+2',
  );
}

/** Whether KVM can be used here: /dev/kvm exists and is readable and writable by this process. */
export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', fsConstants.R_OK | fsConstants.W_OK);
    return true;
  } catch {
    return false;
  }
}
