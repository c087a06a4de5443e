/**
 * One error class for everything mqtap throws.
 *
 * The native addon constructs MqtapError itself (the class is registered with
 * it at load time, as better-sqlite3 does), passing the raw errno, the libc
 * call and the step (`op`, e.g. 'TUNSETQUEUE').  This module turns that into
 * Node's usual `code` ('EBUSY'), a readable message and a `hint` a person can
 * act on.  The library adds context (device name, queue index) on the way out.
 */
import { getSystemErrorMap } from 'node:util';

/** What the addon passes when a syscall fails. */
export interface NativeErrorProps {
  op: string;
  syscall: string;
  errno: number;
  detail?: string;
}

/** Everything an MqtapError may carry. */
export interface MqtapErrorInit {
  /** The step that failed, e.g. 'TUNSETIFF', 'TUNSETQUEUE', 'VALIDATE'. */
  op: string;
  /** Node-style code: an errno name ('EBUSY') or an ERR_* code for checks done in JS. */
  code?: string;
  /** Positive errno, when a syscall failed. */
  errno?: number;
  /** The libc call that failed ('ioctl', 'open', 'netlink'). */
  syscall?: string;
  message?: string;
  hint?: string;
  /** Extra text from the failing call: a path, a name, the kernel's extack message. */
  detail?: string;
  ifname?: string;
  queue?: number;
  cause?: unknown;
}

/** Codes used for failures detected in JavaScript, before or instead of a syscall. */
export const ErrorCodes = {
  /** A bad argument (name, count, MAC, ...).  Nothing was changed. */
  INVALID_ARG: 'ERR_INVALID_ARG',
  /** The object (tap, queue) is closed. */
  CLOSED: 'ERR_CLOSED',
  /** The kernel lacks a feature the caller asked for. */
  UNSUPPORTED: 'ERR_UNSUPPORTED',
  /** A multi-step change failed and could not be fully undone; see `state`. */
  PARTIAL: 'ERR_PARTIAL_STATE',
} as const;

const systemErrors: Map<number, [string, string]> = getSystemErrorMap();

/** Set by lib/sys/native.ts: glibc's strerrorname_np/strerror, which know every Linux errno (libuv lacks EBADFD, calls EOPNOTSUPP ENOTSUP). */
let nativeErrno: ((errno: number) => [string, string] | null) | undefined;

/** @internal */
export function _setErrnoDescriber(fn: (errno: number) => [string, string] | null): void {
  nativeErrno = fn;
}

function describeErrno(errno: number): [string, string] | undefined {
  return nativeErrno?.(errno) ?? systemErrors.get(-errno);
}

/** errno number -> 'EBUSY' (the kernel's own name). */
export function errnoName(errno: number): string {
  return describeErrno(errno)?.[0] ?? `errno ${errno}`;
}

function errnoText(errno: number): string {
  return describeErrno(errno)?.[1]?.toLowerCase() ?? 'unknown error';
}

type HintFn = (e: MqtapError) => string | undefined;

const PRIV = 'run as root or give the process CAP_NET_ADMIN (e.g. `sudo`, or `setcap cap_net_admin+ep` on the binary)';

const DEFAULT_TUN = '/dev/net/tun';

/** The tun node an open failed on: the path the addon reports (openTap's devicePath), else the default. */
function tunPath(e: MqtapError): string {
  return e.detail?.startsWith('/') ? e.detail : DEFAULT_TUN;
}

/** Hints keyed by 'OP:CODE', then by 'CODE'.  Library code may override with context. */
const HINTS: Record<string, HintFn> = {
  'TUN_OPEN:ENOENT': (e) =>
    tunPath(e) === DEFAULT_TUN
      ? '/dev/net/tun does not exist: load the tun driver (`modprobe tun`); in a container, pass the device in (e.g. `--device /dev/net/tun`)'
      : `${tunPath(e)} does not exist: devicePath must name the tun device's node (character device 10:200, normally /dev/net/tun; if that is missing too, \`modprobe tun\`)`,
  'TUN_OPEN:ENODEV': () => 'the tun driver is not available in this kernel: load it with `modprobe tun`',
  'TUN_OPEN:ENXIO': () => 'the tun driver is not available in this kernel: load it with `modprobe tun`',
  'TUN_OPEN:EACCES': (e) => {
    const path = tunPath(e);
    const fs = path === DEFAULT_TUN ? '' : `, on a filesystem not mounted nodev (findmnt -T ${path})`;
    return (
      `no permission to open ${path}: opening it needs read and write access to the device node (CAP_NET_ADMIN alone does not give it): ` +
      `run as root, or check the node's mode (ls -l ${path}; most distributions make it 0666)${fs}; creating a tap then still needs CAP_NET_ADMIN`
    );
  },
  'TUN_OPEN:EPERM': (e) => `no permission to open ${tunPath(e)}: ${PRIV}`,
  'TUN_OPEN:EMFILE': () => 'this process is out of file descriptors: raise the limit (`ulimit -n`) or open fewer queues',
  'TUN_OPEN:ENFILE': () => 'the system is out of file descriptors (fs.file-max)',
  'TUNSETIFF:EPERM': () =>
    `creating a tap needs CAP_NET_ADMIN; attaching to an existing tap needs CAP_NET_ADMIN or being its owner/group: ${PRIV}, or create the tap with \`mqtap create NAME --owner USER\``,
  'TUNSETIFF:E2BIG': () => 'a tap has at most 256 queues (enabled + disabled): close queues or use fewer',
  'TUNSETIFF:EBUSY': () => 'the name is taken by a device that cannot take another queue: pick another name or delete that device',
  'TUNSETIFF:EINVAL': () =>
    'the name is taken by a device that is not a multi-queue tap: pick another name, or delete it (`mqtap delete NAME` / `ip link del NAME`) and create it with `mqtap create NAME --queues N`',
  'TUNSETIFF:ENFILE': () => 'the name template has no free number left: delete unused devices or choose another template',
  'TUNSETQUEUE:EINVAL': () => 'the queue is already in that state, or the tap is not multi-queue',
  'TUNSETQUEUE:EPERM': () => `enabling a queue needs CAP_NET_ADMIN or being the tap's owner/group: ${PRIV}`,
  'TUNSETQUEUE:E2BIG': () => 'the tap already has 256 queues enabled',
  'TUNSETPERSIST:EPERM': () => `changing persistence needs CAP_NET_ADMIN: ${PRIV}`,
  'TUNSETOWNER:EPERM': () => `changing the owner needs CAP_NET_ADMIN: ${PRIV}`,
  'TUNSETGROUP:EPERM': () => `changing the group needs CAP_NET_ADMIN: ${PRIV}`,
  'TUNSETVNETHDRSZ:EINVAL': () => 'the virtio-net header size must be at least 10 (10 or 12 are the useful values)',
  'TUNSETOFFLOAD:EINVAL': () => 'this kernel does not accept that offload combination (TSO needs CSUM; USO needs Linux 6.2+)',
  'SIOCSIFMTU:EINVAL': () => 'the MTU is out of range for a tap (68..65521)',
  'SIOCSIFHWADDR:EADDRNOTAVAIL': () => 'the MAC must be a unicast address (first octet even) and not all zeros',
  'SIOCSIFHWADDR:EBUSY': () => 'the MAC of a running device cannot be changed here: bring it down first',
  'IFLA_TXQLEN:EPERM': () =>
    `setting the queue length needs CAP_NET_ADMIN (${PRIV}); as root, EPERM means the tun driver could not make each queue's ring that long (a ring is an array of one pointer per frame, limited by the kernel's largest allocation: 524288 frames on x86-64 with 4 KiB pages): use a smaller txQueueLen`,
  'IFLA_TXQLEN:ENOMEM': () => "the kernel could not allocate each queue's ring at that length: use a smaller txQueueLen",
  'RTM_DELLINK:EOPNOTSUPP': () => 'this device cannot be deleted over rtnetlink',
  'SETNS:EINVAL': () => 'that file is not a network namespace',
  'NS_OPEN:ENOENT': () => 'no such network namespace: list them with `ip netns list`',
  'VHOST_OPEN:ENOENT': () =>
    '/dev/vhost-net does not exist: load the module (`modprobe vhost_net`); in a container, pass the device in',
  'VHOST_OPEN:ENODEV': () => 'vhost-net is not available in this kernel: `modprobe vhost_net` (CONFIG_VHOST_NET)',
  'VHOST_OPEN:EACCES': () =>
    "no permission to open /dev/vhost-net: check its mode and group (`ls -l /dev/vhost-net`, often root:kvm 0660), add the user to that group, or run as root",
  'VHOST_OPEN:EPERM': () => 'no permission to open /dev/vhost-net: run as root or grant access to the device node',
  'VHOST_SET_OWNER:EBUSY': () =>
    'this vhost-net fd already has an owner (VHOST_SET_OWNER was called before, maybe by the process it was handed to): use a fresh fd, or VHOST_RESET_OWNER first',
  'VHOST_SET_FEATURES:EOPNOTSUPP': () => 'vhost-net does not offer one of those feature bits: ask VHOST_GET_FEATURES (`mqtap features`) and negotiate a subset',
  'VHOST_NET_SET_BACKEND:ENOTSOCK': () => 'the backend fd is not a tap queue (nor a macvtap/packet socket)',
  'VHOST_NET_SET_BACKEND:EFAULT': () => 'the rings are not set up (VHOST_SET_VRING_ADDR / memory table) for that virtqueue',
  'VHOST_NET_SET_BACKEND:ENOBUFS': () => 'the virtqueue index is out of range: vhost-net has virtqueues 0 (RX) and 1 (TX)',
  'VHOST_USER_REM_MEM_REG:EBUSY': () => 'a running ring lives in that region: stop its rings (GET_VRING_BASE) before removing it',
  'VHOST_USER_REM_MEM_REG:ENOENT': () => 'no region starts at that guest-physical address: the frontend removed one it never added',
  'VHOST_USER_START_RING:EBUSY': () => 'the ring is already running: stop it first (stopRing, as GET_VRING_BASE does)',
  'VHOST_USER_START_RING:EFAULT': () => 'the ring addresses are not inside the mapped memory: send the memory table before SET_VRING_ADDR',
  'VHOST_USER_ADD_MEM_REG:EINVAL': () => 'the region is empty, overlaps another, or ends past the end of its fd: refuse the frontend\'s message',
  'RECVMSG:EMSGSIZE': () => 'the message (or its fds) did not fit and was refused; every fd that arrived with it was closed',
  'CONNECT:ECONNREFUSED': () => 'nothing listens on that socket: is the daemon (or QEMU with -qmp ...,server=on) running?',
  'CONNECT:ENOENT': () => 'no socket at that path: start the daemon (`mqtap daemon --socket PATH`) or check the path',
  EBADFD: () => 'the fd is not attached to a tap: the device was deleted, or the fd is a fresh /dev/net/tun fd',
  EBADF: () => 'the fd is not open: the queue was closed (or the number was never an fd)',
  ENOTTY: () => 'the fd is not a /dev/net/tun fd',
  EPERM: () => PRIV,
  EACCES: () => PRIV,
  ENODEV: (e) => (e.ifname ? `there is no network device named ${e.ifname}: list taps with \`mqtap show\`` : undefined),
};

interface Fields {
  op: string;
  code: string;
  errno: number | undefined;
  syscall: string | undefined;
  detail: string | undefined;
  ifname: string | undefined;
  queue: number | undefined;
}

function describe(f: Fields): string {
  const where = [f.ifname, f.queue !== undefined ? `queue ${f.queue}` : undefined].filter(Boolean).join(' ');
  const detail = f.detail && f.detail !== f.ifname ? ` ${f.detail}` : '';
  const what =
    f.errno !== undefined ? `${f.op}${detail} failed: ${f.code} (${errnoText(f.errno)})` : `${f.op}${detail} failed: ${f.code}`;
  return where ? `${where}: ${what}` : what;
}

export class MqtapError extends Error {
  override name = 'MqtapError';
  code: string;
  errno: number | undefined;
  syscall: string | undefined;
  op: string;
  hint: string | undefined;
  detail: string | undefined;
  ifname: string | undefined;
  queue: number | undefined;

  constructor(init: MqtapErrorInit | NativeErrorProps) {
    const i = init as MqtapErrorInit;
    const f: Fields = {
      op: i.op,
      code: i.code ?? (i.errno !== undefined ? errnoName(i.errno) : 'ERR_MQTAP'),
      errno: i.errno,
      syscall: i.syscall,
      detail: i.detail,
      ifname: i.ifname,
      queue: i.queue,
    };
    super(i.message ?? describe(f), i.cause !== undefined ? { cause: i.cause } : undefined);
    this.op = f.op;
    this.code = f.code;
    this.errno = f.errno;
    this.syscall = f.syscall;
    this.detail = f.detail;
    this.ifname = f.ifname;
    this.queue = f.queue;
    this.hint = i.hint ?? defaultHint(this);
  }

  /** True for errors caused by the caller's input, found before any change was made. */
  get isUsageError(): boolean {
    return this.code === ErrorCodes.INVALID_ARG;
  }

  /** Replaces the message (and the first line of the stack with it). */
  setMessage(message: string): void {
    if (this.stack?.startsWith(`${this.name}: ${this.message}`)) {
      this.stack = `${this.name}: ${message}${this.stack.slice(this.name.length + 2 + this.message.length)}`;
    }
    this.message = message;
  }

  /** Plain data for logs and `--json` output. */
  toJSON(): Record<string, unknown> {
    return {
      name: this.name,
      message: this.message,
      code: this.code,
      errno: this.errno,
      syscall: this.syscall,
      op: this.op,
      hint: this.hint,
      ifname: this.ifname,
      queue: this.queue,
    };
  }
}

function defaultHint(e: MqtapError): string | undefined {
  return (HINTS[`${e.op}:${e.code}`] ?? HINTS[e.code])?.(e);
}

/**
 * Adds context to an error thrown by a lower layer and returns it (so callers
 * can `throw withContext(err, {...})`).  Non-mqtap errors pass through.
 */
export function withContext<T>(err: T, ctx: { ifname?: string; queue?: number; hint?: string }): T {
  if (err instanceof MqtapError) {
    const rebuild = err.message === describe(err);
    if (ctx.ifname !== undefined && err.ifname === undefined) err.ifname = ctx.ifname;
    if (ctx.queue !== undefined && err.queue === undefined) err.queue = ctx.queue;
    if (ctx.hint !== undefined) err.hint = ctx.hint;
    else if (err.hint === undefined) err.hint = defaultHint(err);
    if (rebuild) err.setMessage(describe(err));
  }
  return err;
}

/**
 * Runs a Node filesystem call and turns its system error (EACCES, ENOENT, ...)
 * into an MqtapError with the step, the path and a hint, so callers and the
 * CLI treat it like the addon's errors (exit codes, no "internal error").
 */
export function fsStep<T>(op: string, path: string, fn: () => T, hint?: string): T {
  try {
    return fn();
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (err instanceof MqtapError || typeof e?.code !== 'string' || typeof e.errno !== 'number') throw err;
    const denied = e.code === 'EACCES' || e.code === 'EPERM';
    throw new MqtapError({
      op,
      code: e.code,
      errno: Math.abs(e.errno),
      ...(e.syscall ? { syscall: e.syscall } : {}),
      message: `${op}: ${e.syscall ?? 'fs'} ${path}: ${e.message.replace(/^[A-Z]+: /, '')}`,
      ...(hint !== undefined ? { hint } : denied ? { hint: `no permission for ${path}: run as root, or choose a path this user may write` } : {}),
      cause: err,
    } as ConstructorParameters<typeof MqtapError>[0]);
  }
}

/** A validation failure: thrown before any syscall, so nothing needs undoing. */
export function invalidArg(message: string, hint?: string): MqtapError {
  return new MqtapError({ op: 'VALIDATE', code: ErrorCodes.INVALID_ARG, message, ...(hint !== undefined ? { hint } : {}) });
}
