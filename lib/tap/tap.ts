/**
 * lib/tap/ — multi-queue taps, their lifecycle (this file), the kernel's view
 * of them over rtnetlink (links.ts) and what the kernel can do (probe.ts).
 *
 * Multi-queue taps: open N queues of one device, enable/disable them, add
 * more, and close them, all or nothing.
 *
 * Ownership: every fd belongs to exactly one TapQueue from the moment open(2)
 * returns it.  An operation that fails part-way closes what it opened (and so
 * removes a device it created) before it throws.  A closed queue keeps its
 * index, reports fd -1 and is never passed to a syscall again: fd numbers are
 * reused by the kernel at once.
 *
 * Queue indices are the library's and stay stable.  The kernel's own slot
 * numbers are not: detaching a queue moves the kernel's last queue into the
 * freed slot, so nothing here relies on kernel slot order.
 */
import { readFileSync } from 'node:fs';
import { ErrorCodes, MqtapError, invalidArg, withContext } from '../sys/errors';
import { getLink, isTapLink, type LinkInfo, type TapLinkInfo } from './links';
import { silentLogger, type Logger } from '../sys/log';
import { K, native } from '../sys/native';
import { withNetns } from '../sys/netns';
import {
  MAX_QUEUES,
  isTemplate,
  parseMac,
  rejectUnknownKeys,
  validateBoolean,
  validateId,
  validateIfName,
  validateInt,
  validateMtu,
  validateOneOf,
  validateQueueCount,
  validateTxQueueLen,
  validateVnetHdrSize,
  type VnetHdrSize,
} from '../sys/validate';

export type QueueState = 'enabled' | 'disabled' | 'closed';
export type ExistingPolicy = 'forbid' | 'allow' | 'require';

/** Offloads the reader of the tap accepts (TUNSETOFFLOAD); need `vnetHdr`. */
export interface Offloads {
  csum?: boolean;
  tso4?: boolean;
  tso6?: boolean;
  tsoEcn?: boolean;
  uso4?: boolean;
  uso6?: boolean;
}

export interface OpenTapOptions {
  /** Interface name ('tap0') or kernel template ('mqt%d'). */
  name: string;
  /** Number of queues to open, 1..256.  Default 1. */
  queues?: number;
  /** Open with IFF_VNET_HDR (frames carry a virtio-net header).  Default true. */
  vnetHdr?: boolean;
  /** virtio-net header size: 10, 12 or 20.  Default: leave the device's (10 on a new tap). */
  vnetHdrSize?: VnetHdrSize;
  /** Keep the device after the last queue closes.  Default: leave as is (false on a new tap). */
  persist?: boolean;
  /** uid allowed to attach queues without CAP_NET_ADMIN. */
  owner?: number;
  /** gid allowed to attach queues without CAP_NET_ADMIN. */
  group?: number;
  mtu?: number;
  /**
   * The device's tx_queue_len (IFLA_TXQLEN), 1..2^32-1: how many frames each
   * queue's ring holds for its reader before the kernel drops (and counts
   * tx_dropped).  Default: leave the device's (the tun driver makes 500 or
   * 1000, depending on the kernel).  The kernel refuses lengths it cannot
   * allocate a ring for (524288 frames is the limit on x86-64) while queues
   * are attached.  See docs/datapath.md "Sizing txQueueLen against the batch".
   */
  txQueueLen?: number;
  /** Ethernet address, e.g. '52:54:00:12:34:56'. */
  mac?: string;
  /** Bring the link up (true) or down (false).  Default: leave as is. */
  up?: boolean;
  offloads?: Offloads;
  /**
   * What to do when a device with this name exists.  'allow' (default):
   * attach to it if it is a multi-queue tap, else create it.  'forbid':
   * always create (fails if the name is taken).  'require': only attach to an
   * existing persistent multi-queue tap (e.g. one made by `ip tuntap add ...
   * multi_queue` or `mqtap create`).
   */
  existing?: ExistingPolicy;
  /** Network namespace (name under /run/netns, or a path) to open the tap in. */
  netns?: string;
  /** The tun device node.  Default '/dev/net/tun'. */
  devicePath?: string;
  logger?: Logger;
}

const OPEN_KEYS = [
  'name', 'queues', 'vnetHdr', 'vnetHdrSize', 'persist', 'owner', 'group', 'mtu', 'txQueueLen', 'mac', 'up', 'offloads', 'existing', 'netns', 'devicePath', 'logger',
] as const;
export const OFFLOAD_KEYS = ['csum', 'tso4', 'tso6', 'tsoEcn', 'uso4', 'uso6'] as const;

/** Validated options: everything checked before the first syscall. */
interface Plan {
  name: string;
  queues: number;
  vnetHdr: boolean;
  vnetHdrSize: VnetHdrSize | undefined;
  persist: boolean | undefined;
  owner: number | undefined;
  group: number | undefined;
  mtu: number | undefined;
  txQueueLen: number | undefined;
  mac: Buffer | undefined;
  up: boolean | undefined;
  offloads: number | undefined;
  existing: ExistingPolicy;
  netns: string | undefined;
  devicePath: string;
  logger: Logger;
}

/**
 * TUN_F_* flags for an Offloads object; validated (TSO/USO need CSUM, USO4
 * and USO6 come as a pair).  USO needs Linux 6.2+: an older kernel answers
 * TUNSETOFFLOAD with EINVAL (error hint says so).
 */
export function offloadFlags(o: Offloads): number {
  if (typeof o !== 'object' || o === null) throw invalidArg('offloads must be an object such as { csum: true, tso4: true }');
  rejectUnknownKeys(o, OFFLOAD_KEYS, 'offloads');
  for (const k of OFFLOAD_KEYS) if (o[k] !== undefined) validateBoolean(o[k], `offloads.${k}`);
  const needsCsum = o.tso4 || o.tso6 || o.tsoEcn || o.uso4 || o.uso6;
  if (needsCsum && !o.csum) throw invalidArg('offloads: TSO/USO need csum: true as well', 'the kernel refuses segmentation offloads without checksum offload');
  if (o.tsoEcn && !(o.tso4 || o.tso6)) throw invalidArg('offloads: tsoEcn needs tso4 or tso6');
  let flags = 0;
  if (o.csum) flags |= K.TUN_F_CSUM;
  if (o.tso4) flags |= K.TUN_F_TSO4;
  if (o.tso6) flags |= K.TUN_F_TSO6;
  if (o.tsoEcn) flags |= K.TUN_F_TSO_ECN;
  // tun takes USO only as a pair (tun_set_offload: EINVAL for one alone).
  if (Boolean(o.uso4) !== Boolean(o.uso6))
    throw invalidArg('offloads: uso4 and uso6 go together (the kernel accepts UDP segmentation offload only for both)', 'set both uso4: true and uso6: true, or neither');
  if (o.uso4) flags |= K.TUN_F_USO4 | K.TUN_F_USO6;
  return flags;
}

function plan(opts: OpenTapOptions): Plan {
  if (typeof opts !== 'object' || opts === null) throw invalidArg('openTap(options): options must be an object with at least { name }');
  rejectUnknownKeys(opts, OPEN_KEYS, 'openTap');
  const name = validateIfName(opts.name, 'name', { template: true });
  const existing = opts.existing === undefined ? 'allow' : validateOneOf(opts.existing, 'existing', ['forbid', 'allow', 'require'] as const);
  if (existing === 'require' && isTemplate(name)) throw invalidArg(`existing: 'require' needs a device name, not the template "${name}"`);
  const vnetHdr = opts.vnetHdr === undefined ? true : validateBoolean(opts.vnetHdr, 'vnetHdr');
  const vnetHdrSize = opts.vnetHdrSize === undefined ? undefined : validateVnetHdrSize(opts.vnetHdrSize);
  const offloads = opts.offloads === undefined ? undefined : offloadFlags(opts.offloads);
  if (!vnetHdr && vnetHdrSize !== undefined) throw invalidArg('vnetHdrSize needs vnetHdr: true');
  if (!vnetHdr && offloads) throw invalidArg('offloads need vnetHdr: true', 'without a virtio-net header the kernel cannot describe offloaded frames');
  if (opts.devicePath !== undefined && (typeof opts.devicePath !== 'string' || !opts.devicePath.startsWith('/')))
    throw invalidArg('devicePath must be an absolute path');
  if (opts.netns !== undefined && typeof opts.netns !== 'string') throw invalidArg('netns must be a namespace name or path');
  return {
    name,
    queues: opts.queues === undefined ? 1 : validateQueueCount(opts.queues),
    vnetHdr,
    vnetHdrSize,
    persist: opts.persist === undefined ? undefined : validateBoolean(opts.persist, 'persist'),
    owner: opts.owner === undefined ? undefined : validateId(opts.owner, 'owner'),
    group: opts.group === undefined ? undefined : validateId(opts.group, 'group'),
    mtu: opts.mtu === undefined ? undefined : validateMtu(opts.mtu),
    txQueueLen: opts.txQueueLen === undefined ? undefined : validateTxQueueLen(opts.txQueueLen),
    mac: opts.mac === undefined ? undefined : parseMac(opts.mac),
    up: opts.up === undefined ? undefined : validateBoolean(opts.up, 'up'),
    offloads,
    existing,
    netns: opts.netns,
    devicePath: opts.devicePath ?? '/dev/net/tun',
    logger: opts.logger ?? silentLogger,
  };
}

/** Explains a failed TUNSETIFF by looking at what owns the name now. */
function explainSetIff(err: unknown, name: string): unknown {
  if (!(err instanceof MqtapError) || (err.code !== 'EINVAL' && err.code !== 'EBUSY')) return err;
  let link: LinkInfo | undefined;
  try {
    link = isTemplate(name) ? undefined : getLink(name);
  } catch {
    return err;
  }
  if (!link) return err;
  const recreate = `delete it (\`mqtap delete ${name}\` or \`ip link del ${name}\`) and re-create it with \`mqtap create ${name} --queues N\``;
  if (!isTapLink(link)) {
    err.hint = `"${name}" is taken by ${link.kind ? `a ${link.kind} device` : 'a device that is not a tap'}: pick another name`;
  } else if (link.tun.type !== 'tap') {
    err.hint = `"${name}" is a tun (layer 3) device, not a tap: pick another name or ${recreate}`;
  } else if (!link.tun.multiQueue) {
    err.hint = `"${name}" is a single-queue tap (made without multi_queue): ${recreate} (or \`ip tuntap add ${name} mode tap multi_queue\`)`;
  } else if (link.tun.pi) {
    err.hint = `"${name}" was made with a packet-information header (no IFF_NO_PI): ${recreate}`;
  }
  return err;
}

/**
 * @internal Work tied to a queue's state changes (TapQueue._onEnableDisable).
 * A hook that throws makes the state change fail (and be undone).
 */
export interface QueueStateHook {
  /** Runs right after the queue is attached (TUNSETQUEUE IFF_ATTACH_QUEUE). */
  afterEnable(): void;
  /** Runs right before the queue is detached (TUNSETQUEUE IFF_DETACH_QUEUE). */
  beforeDisable(): void;
}

/** One queue of a tap: an fd from /dev/net/tun attached to the device. */
export class TapQueue {
  readonly index: number;
  #fd: number;
  #state: QueueState;
  readonly #tap: Tap;
  #beforeClose: Set<() => void> | undefined;
  #stateHooks: QueueStateHook[] | undefined;

  /** @internal */
  constructor(tap: Tap, index: number, fd: number, state: 'enabled' | 'disabled') {
    this.#tap = tap;
    this.index = index;
    this.#fd = fd;
    this.#state = state;
  }

  /** The queue's fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  get state(): QueueState {
    return this.#state;
  }

  get tap(): Tap {
    return this.#tap;
  }

  #live(what: string): number {
    if (this.#state === 'closed')
      throw new MqtapError({ op: what, code: ErrorCodes.CLOSED, ifname: this.#tap.name, queue: this.index, message: `${this.#tap.name} queue ${this.index} is closed`, hint: 'open a new queue with tap.addQueue()' });
    return this.#fd;
  }

  /** Attaches the queue (TUNSETQUEUE IFF_ATTACH_QUEUE).  No-op when enabled. */
  enable(): void {
    const fd = this.#live('TUNSETQUEUE');
    if (this.#state === 'enabled') return;
    this.#transition(fd, 'enabled');
  }

  /**
   * Detaches the queue (TUNSETQUEUE IFF_DETACH_QUEUE): the kernel stops
   * steering frames to it; the fd and the device stay.  No-op when disabled.
   * Refuses to disable the tap's last enabled queue (the kernel would then
   * drop every frame sent to the tap) unless `allowNone` is set.
   */
  disable(opts: { allowNone?: boolean } = {}): void {
    const fd = this.#live('TUNSETQUEUE');
    if (this.#state === 'disabled') return;
    if (!opts.allowNone && this.#tap.activeQueueCount() <= 1)
      throw invalidArg(`${this.#tap.name} queue ${this.index} is the last enabled queue; a tap needs at least one`, 'enable another queue first, close the tap, or pass { allowNone: true } to pause the whole tap');
    this.#transition(fd, 'disabled');
  }

  /** @internal one TUNSETQUEUE, state updated only on success. */
  #setQueue(fd: number, flag: number, next: 'enabled' | 'disabled'): void {
    try {
      native.tunSetQueue(fd, flag);
    } catch (err) {
      throw withContext(err, { ifname: this.#tap.name, queue: this.index });
    }
    this.#state = next;
    this.#tap.logger.debug({ ifname: this.#tap.name, queue: this.index, state: next }, 'queue state');
  }

  /**
   * @internal One state change with its hooks, all or nothing.  Enabling:
   * TUNSETQUEUE attach, then every hook's afterEnable (in the order they
   * were added).  Disabling: every hook's beforeDisable (last added first),
   * then TUNSETQUEUE detach.  When a step fails the steps already taken are
   * undone in reverse order and the error is thrown; when undoing fails too,
   * the error has code ERR_PARTIAL_STATE.
   */
  #transition(fd: number, next: 'enabled' | 'disabled'): void {
    const hooks = this.#stateHooks ? [...this.#stateHooks] : [];
    const undo: Array<() => void> = [];
    try {
      if (next === 'enabled') {
        this.#setQueue(fd, K.IFF_ATTACH_QUEUE, 'enabled');
        undo.push(() => this.#setQueue(fd, K.IFF_DETACH_QUEUE, 'disabled'));
        for (const h of hooks) {
          h.afterEnable();
          undo.push(() => h.beforeDisable());
        }
      } else {
        for (const h of hooks.reverse()) {
          h.beforeDisable();
          undo.push(() => h.afterEnable());
        }
        this.#setQueue(fd, K.IFF_DETACH_QUEUE, 'disabled');
      }
    } catch (err) {
      const failures: string[] = [];
      for (const u of undo.reverse()) {
        try {
          u();
        } catch (undoErr) {
          failures.push((undoErr as Error).message);
        }
      }
      const e = withContext(err, { ifname: this.#tap.name, queue: this.index });
      if (failures.length === 0) throw e;
      throw new MqtapError({
        op: 'TUNSETQUEUE',
        code: ErrorCodes.PARTIAL,
        ifname: this.#tap.name,
        queue: this.index,
        message: `${this.#tap.name} queue ${this.index}: becoming ${next} failed (${(err as Error).message}) and could not be undone (${failures.join('; ')}); queue now ${this.#state}`,
        hint: 'inspect with `mqtap show`, then enable or disable the queue again, or close it',
        cause: err,
      });
    }
  }

  /** @internal used by Tap.setActiveQueues: no last-queue check. */
  _set(next: 'enabled' | 'disabled'): void {
    const fd = this.#live('TUNSETQUEUE');
    if (this.#state === next) return;
    this.#transition(fd, next);
  }

  /**
   * Closes the fd.  Harmless when already closed.  Closing the last open
   * queue of a non-persistent tap removes the device.
   */
  close(): void {
    if (this.#state === 'closed') return;
    // Whoever polls the fd (QueueIO) must stop before the number is freed:
    // libuv would otherwise watch whatever the kernel gives that number next.
    if (this.#beforeClose) {
      const hooks = [...this.#beforeClose];
      this.#beforeClose = undefined;
      for (const h of hooks) {
        try {
          h();
        } catch (err) {
          this.#tap.logger.warn({ ifname: this.#tap.name, queue: this.index, err }, 'close hook failed; closing anyway');
        }
      }
    }
    this.#stateHooks = undefined;
    const fd = this.#fd;
    this.#fd = -1;
    this.#state = 'closed';
    native.close(fd);
    this.#tap.logger.debug({ ifname: this.#tap.name, queue: this.index, fd }, 'queue closed');
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * @internal Runs `fn` once, right before close() closes the fd (also when
   * Tap.close() or Symbol.dispose closes it).  Returns a function that
   * removes the hook.  Used by lib/datapath/io.ts to stop polling first.
   */
  _onBeforeClose(fn: () => void): () => void {
    if (this.#state === 'closed') throw new MqtapError({ op: 'HOOK', code: ErrorCodes.CLOSED, ifname: this.#tap.name, queue: this.index, message: `${this.#tap.name} queue ${this.index} is closed` });
    (this.#beforeClose ??= new Set()).add(fn);
    return () => {
      this.#beforeClose?.delete(fn);
    };
  }

  /**
   * @internal Adds work that must happen around this queue's state changes,
   * whoever asks for them (enable(), disable(), Tap.setActiveQueues):
   * `afterEnable` right after the queue is attached, `beforeDisable` right
   * before it is detached (see #transition for the order and the undo).
   * Returns a function that removes the hook.  Used by lib/vhost/netdev.ts:
   * a driven pair's backend is unbound before its queue is detached and
   * bound again after it is attached.
   */
  _onEnableDisable(hook: QueueStateHook): () => void {
    if (this.#state === 'closed') throw new MqtapError({ op: 'HOOK', code: ErrorCodes.CLOSED, ifname: this.#tap.name, queue: this.index, message: `${this.#tap.name} queue ${this.index} is closed` });
    (this.#stateHooks ??= []).push(hook);
    return () => {
      const i = this.#stateHooks?.indexOf(hook) ?? -1;
      if (i >= 0) this.#stateHooks!.splice(i, 1);
    };
  }

  toJSON(): { index: number; fd: number; state: QueueState } {
    return { index: this.index, fd: this.#fd, state: this.#state };
  }
}

/** Per-queue states, for error reports. */
export type QueueStates = Array<{ index: number; state: QueueState }>;

/** A multi-queue tap opened by this process. */
export class Tap {
  /** The device name (a template is resolved to the kernel's choice). */
  readonly name: string;
  /** True when this process created the device (it did not exist before). */
  readonly created: boolean;
  readonly vnetHdr: boolean;
  readonly netns: string | undefined;
  /** @internal */
  readonly logger: Logger;
  readonly #queues: TapQueue[] = [];
  readonly #flags: number;
  readonly #devicePath: string;
  #offloads: number | undefined;

  /** @internal use openTap(). */
  constructor(init: { name: string; created: boolean; vnetHdr: boolean; flags: number; devicePath: string; netns: string | undefined; logger: Logger }) {
    this.name = init.name;
    this.created = init.created;
    this.vnetHdr = init.vnetHdr;
    this.#flags = init.flags;
    this.#devicePath = init.devicePath;
    this.netns = init.netns;
    this.logger = init.logger;
    // A device this process created starts with none; on an existing one
    // they are unknown (there is no TUNGETOFFLOAD; another program may have set them).
    this.#offloads = init.created ? 0 : undefined;
  }

  /**
   * The TUN_F_* offload flags last set through this Tap (openTap's `offloads`,
   * setOffloads, applyOffloads), 0 on a device it created without any, or
   * undefined when unknown: an existing device (the kernel has no
   * TUNGETOFFLOAD).  Offloads set through another fd of the device (another
   * process holding a queue) are not seen.  openQueueIO sizes its slots by it.
   */
  get offloads(): number | undefined {
    return this.#offloads;
  }

  /** @internal records what a TUNSETOFFLOAD on this device took (applyOffloads). */
  _offloadsSet(flags: number): void {
    this.#offloads = flags;
  }

  /** Every queue this Tap opened, by index (closed ones included: indices are stable). */
  get queues(): readonly TapQueue[] {
    return this.#queues;
  }

  /** Queues that are not closed, by index. */
  openQueues(): TapQueue[] {
    return this.#queues.filter((q) => q.state !== 'closed');
  }

  /** Number of enabled queues. */
  activeQueueCount(): number {
    return this.#queues.filter((q) => q.state === 'enabled').length;
  }

  /** True once every queue is closed. */
  get closed(): boolean {
    return this.#queues.every((q) => q.state === 'closed');
  }

  /** Fds of the open queues, by index. */
  fds(): number[] {
    return this.openQueues().map((q) => q.fd);
  }

  /** @internal opens one more fd and attaches it; closes it again on failure. */
  _attachNew(): number {
    const fd = native.tunOpen(this.#devicePath);
    try {
      native.tunSetIff(fd, this.name, this.#flags);
      return fd;
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /** @internal */
  _push(fd: number, state: 'enabled' | 'disabled'): TapQueue {
    const q = new TapQueue(this, this.#queues.length, fd, state);
    this.#queues.push(q);
    return q;
  }

  /**
   * Opens one more queue of this device (index = queues.length).  Enabled
   * unless `{ enabled: false }`.
   */
  addQueue(opts: { enabled?: boolean } = {}): TapQueue {
    const enabled = opts.enabled === undefined ? true : validateBoolean(opts.enabled, 'enabled');
    if (this.closed) throw new MqtapError({ op: 'TUNSETIFF', code: ErrorCodes.CLOSED, ifname: this.name, message: `${this.name} is closed`, hint: 'open it again with openTap()' });
    if (this.#queues.length >= MAX_QUEUES * 4)
      throw invalidArg(`${this.name}: this Tap has opened ${this.#queues.length} queues; close the Tap and open a new one`);
    const index = this.#queues.length;
    const q = withNetns(this.netns, () => {
      let fd: number;
      try {
        fd = this._attachNew();
      } catch (err) {
        throw withContext(explainSetIff(err, this.name), { ifname: this.name, queue: index });
      }
      const queue = this._push(fd, 'enabled');
      if (!enabled) {
        try {
          queue._set('disabled');
        } catch (err) {
          queue.close();
          throw err;
        }
      }
      return queue;
    });
    this.logger.info({ ifname: this.name, queue: index, fd: q.fd, state: q.state }, 'queue added');
    return q;
  }

  /**
   * Makes queues 0..k-1 (of the open queues, by index) enabled and the rest
   * disabled, like virtio-net's VQ_PAIRS_SET.  Enables before it disables so
   * the device never has zero enabled queues.  On failure every step already
   * taken is undone and the error says so; if undoing fails too, the error
   * has code ERR_PARTIAL_STATE and `state` lists every queue's actual state.
   */
  setActiveQueues(k: number): void {
    const open = this.openQueues();
    if (open.length === 0) throw new MqtapError({ op: 'SET_ACTIVE', code: ErrorCodes.CLOSED, ifname: this.name, message: `${this.name} is closed` });
    validateInt(k, 'active queues', 1, open.length, `${this.name} has ${open.length} open queue(s)`);
    const toEnable = open.slice(0, k).filter((q) => q.state === 'disabled');
    const toDisable = open.slice(k).filter((q) => q.state === 'enabled').reverse();
    const steps: Array<{ q: TapQueue; to: 'enabled' | 'disabled' }> = [
      ...toEnable.map((q) => ({ q, to: 'enabled' as const })),
      ...toDisable.map((q) => ({ q, to: 'disabled' as const })),
    ];
    const done: typeof steps = [];
    try {
      for (const s of steps) {
        s.q._set(s.to);
        done.push(s);
      }
    } catch (err) {
      const undoFailures: string[] = [];
      // A step that could not undo its own half (a hook ran, the queue did not follow).
      if (err instanceof MqtapError && err.code === ErrorCodes.PARTIAL) undoFailures.push(err.message);
      for (const s of done.reverse()) {
        try {
          s.q._set(s.to === 'enabled' ? 'disabled' : 'enabled');
        } catch (undoErr) {
          undoFailures.push(`queue ${s.q.index}: ${(undoErr as Error).message}`);
        }
      }
      const e = withContext(err, { ifname: this.name });
      const state = this.#queues.map((q) => ({ index: q.index, state: q.state }));
      if (undoFailures.length === 0) {
        if (e instanceof MqtapError) e.setMessage(`setActiveQueues(${k}): ${e.message}; previous state restored`);
        throw e;
      }
      const summary = state.map((s) => `${s.index}=${s.state}`).join(' ');
      const partial = new MqtapError({
        op: 'SET_ACTIVE',
        code: ErrorCodes.PARTIAL,
        ifname: this.name,
        message: `setActiveQueues(${k}) on ${this.name} failed (${(err as Error).message}) and could not be undone (${undoFailures.join('; ')}); queues now: ${summary}`,
        hint: 'inspect with `mqtap show`, then call setActiveQueues again or close the tap',
        cause: err,
      });
      (partial as MqtapError & { state: QueueStates }).state = state;
      throw partial;
    }
    this.logger.info({ ifname: this.name, active: k, enabled: toEnable.map((q) => q.index), disabled: toDisable.map((q) => q.index) }, 'active queues set');
  }

  /** @internal the fd of the first open queue, for device-wide ioctls. */
  #anyFd(op: string): number {
    const q = this.#queues.find((x) => x.state !== 'closed');
    if (!q) throw new MqtapError({ op, code: ErrorCodes.CLOSED, ifname: this.name, message: `${this.name} is closed` });
    return q.fd;
  }

  /** @internal one device-wide ioctl through any open queue, with context on failure. */
  #device<T>(op: string, fn: (fd: number) => T): T {
    const fd = this.#anyFd(op);
    try {
      return fn(fd);
    } catch (err) {
      throw withContext(err, { ifname: this.name });
    }
  }

  /** The device's virtio-net header size (TUNGETVNETHDRSZ). */
  vnetHdrSize(): number {
    return this.#device('TUNGETVNETHDRSZ', (fd) => native.tunGetVnetHdrSz(fd));
  }

  /** Sets the device's virtio-net header size (TUNSETVNETHDRSZ): 10, 12 or 20. */
  setVnetHdrSize(size: VnetHdrSize): void {
    const n = validateVnetHdrSize(size);
    if (!this.vnetHdr) throw invalidArg(`${this.name} was opened without vnetHdr; a header size has no effect`);
    this.#device('TUNSETVNETHDRSZ', (fd) => native.tunSetVnetHdrSz(fd, n));
  }

  /** Sets the offloads the reader accepts (TUNSETOFFLOAD); `{}` turns them all off. */
  setOffloads(offloads: Offloads): void {
    const flags = offloadFlags(offloads);
    if (!this.vnetHdr && flags) throw invalidArg('offloads need a tap opened with vnetHdr: true');
    this.#device('TUNSETOFFLOAD', (fd) => native.tunSetOffload(fd, flags));
    this.#offloads = flags;
  }

  /**
   * Sets the device's tx_queue_len (IFLA_TXQLEN over rtnetlink): the frames
   * each queue's ring holds; the kernel resizes the rings of open queues.
   */
  setTxQueueLen(len: number): void {
    const n = validateTxQueueLen(len);
    this.#anyFd('IFLA_TXQLEN');
    try {
      withNetns(this.netns, () => native.rtnlSetTxQueueLen(native.ifNameToIndex(this.name), n));
    } catch (err) {
      throw withContext(txQueueLenError(err, n), { ifname: this.name });
    }
  }

  /** Reports carrier up or down to the stack (TUNSETCARRIER). */
  setCarrier(on: boolean): void {
    validateBoolean(on, 'carrier');
    this.#device('TUNSETCARRIER', (fd) => native.tunSetCarrier(fd, on));
  }

  /** Keeps the device after the last queue closes, or not (TUNSETPERSIST). */
  setPersist(on: boolean): void {
    validateBoolean(on, 'persist');
    this.#device('TUNSETPERSIST', (fd) => native.tunSetPersist(fd, on));
  }

  /** The kernel's current view of this device (rtnetlink). */
  info(): TapLinkInfo | undefined {
    const link = getLink(this.name, this.netns !== undefined ? { netns: this.netns } : {});
    return isTapLink(link) ? link : undefined;
  }

  /**
   * Closes every queue (last index first).  Harmless when already closed.  A
   * non-persistent device disappears with its last queue; a persistent one
   * stays (delete it with deleteTap()).
   */
  close(): void {
    let first: unknown;
    for (const q of [...this.#queues].reverse()) {
      try {
        q.close();
      } catch (err) {
        first ??= err;
      }
    }
    this.logger.info({ ifname: this.name }, 'tap closed');
    if (first) throw first;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  toJSON(): { name: string; created: boolean; vnetHdr: boolean; queues: ReturnType<TapQueue['toJSON']>[] } {
    return { name: this.name, created: this.created, vnetHdr: this.vnetHdr, queues: this.#queues.map((q) => q.toJSON()) };
  }
}

function notFound(name: string): MqtapError {
  return new MqtapError({
    op: 'LOOKUP',
    code: 'ENODEV',
    errno: 19,
    ifname: name,
    message: `no tap named ${name} exists (existing: 'require')`,
    hint: `create it first: \`mqtap create ${name} --queues N\` or \`ip tuntap add ${name} mode tap multi_queue vnet_hdr\``,
  });
}

function alreadyExists(name: string): MqtapError {
  return new MqtapError({
    op: 'LOOKUP',
    code: 'EEXIST',
    errno: 17,
    ifname: name,
    message: `a device named ${name} already exists (existing: 'forbid')`,
    hint: `pick another name, use a template such as "mqt%d", or delete it with \`mqtap delete ${name}\``,
  });
}

/** Throws unless `link` is a multi-queue tap this library can attach to. */
export function requireMultiQueueTap(name: string, link: LinkInfo): void {
  if (isTapLink(link) && link.tun.multiQueue && link.tun.type === 'tap' && !link.tun.pi) return;
  // Refuse before TUNSETIFF: the kernel would answer EINVAL/EBUSY, less clearly.
  throw explainSetIff(new MqtapError({ op: 'LOOKUP', code: 'EINVAL', errno: 22, ifname: name, message: `${name} exists but is not a multi-queue tap` }), name);
}

/** Every TUNSETIFF sets the device-wide flags: say so when that changes vnet_hdr for other queues. */
function warnFlagChange(p: Plan, link: LinkInfo): void {
  if (isTapLink(link) && link.tun.vnetHdr !== p.vnetHdr)
    p.logger.warn({ ifname: p.name, deviceVnetHdr: link.tun.vnetHdr, vnetHdr: p.vnetHdr }, 'attaching changes the device-wide vnet_hdr flag for every queue');
}

/**
 * Rollback for an existing device: our TUNSETIFF replaced its flags with ours.
 * When nobody else holds a queue (it had none), re-attach one fd with the
 * device's original flags and close it, so the device is as we found it.
 */
function restoreDeviceFlags(p: Plan, link: LinkInfo): void {
  if (!isTapLink(link) || link.tun.vnetHdr === p.vnetHdr) return;
  if (link.tun.numQueues + link.tun.numDisabledQueues !== 0) {
    p.logger.warn({ ifname: link.name }, 'rollback cannot restore the vnet_hdr flag: other queues of the device are open');
    return;
  }
  const fd = native.tunOpen(p.devicePath);
  try {
    native.tunSetIff(fd, link.name, K.IFF_TAP | K.IFF_NO_PI | K.IFF_MULTI_QUEUE | (link.tun.vnetHdr ? K.IFF_VNET_HDR : 0));
  } finally {
    native.close(fd);
  }
}

/**
 * Attaches the first queue (fd) and finds out whether the device existed.
 * Creating uses IFF_TUN_EXCL, so "did this call create it" needs no separate
 * lookup and has no race; the device is looked up only when the kernel says
 * the name is taken, or when it must already exist.
 */
function attachFirst(fd: number, p: Plan, flags: number): { name: string; existing: LinkInfo | undefined } {
  if (p.existing === 'require') {
    const link = getLink(p.name);
    if (!link) throw notFound(p.name);
    requireMultiQueueTap(p.name, link);
    warnFlagChange(p, link);
    return { name: native.tunSetIff(fd, p.name, flags), existing: link };
  }
  try {
    return { name: native.tunSetIff(fd, p.name, flags | K.IFF_TUN_EXCL), existing: undefined };
  } catch (err) {
    if (!(err instanceof MqtapError) || err.code !== 'EBUSY' || isTemplate(p.name)) throw err;
    const link = getLink(p.name);
    if (!link) throw err;
    if (p.existing === 'forbid') throw alreadyExists(p.name);
    requireMultiQueueTap(p.name, link);
    warnFlagChange(p, link);
    return { name: native.tunSetIff(fd, p.name, flags), existing: link };
  }
}

/**
 * How to put back one setting openTap changed on a device that existed before
 * it (`restore` undefined: the old value cannot be put back).
 */
interface SettingUndo {
  what: string;
  restore: (() => void) | undefined;
}

/**
 * Applies the settings, recording in `undo` (for a device that existed
 * before) how to put each one back, so that openTap's rollback can restore
 * them in reverse order.  The previous values come from the kernel
 * (rtnetlink and TUNGETVNETHDRSZ) right before the changes.
 *
 * Order: settings whose old value can be restored first (header size,
 * owner/group when the device had one, mtu, txQueueLen, mac, up), then those that cannot
 * be undone (offloads: there is no TUNGETOFFLOAD; owner/group on a device
 * without one: TUNSETOWNER/TUNSETGROUP cannot clear them), then persistence
 * (until then, closing the fds removes a device this call created).  So a
 * failure before the last steps leaves nothing changed for good.
 */
function applySettings(tap: Tap, fd0: number, p: Plan, created: boolean, undo: SettingUndo[]): void {
  const step = (what: string, fn: () => void, restore?: () => void): void => {
    try {
      fn();
    } catch (err) {
      throw withContext(err, { ifname: tap.name });
    }
    if (!created) undo.push({ what, restore });
    p.logger.debug({ ifname: tap.name, step: what }, 'tap setting applied');
  };
  const before = created ? undefined : getLink(tap.name);
  const was = before && isTapLink(before) ? before : undefined;
  if (!created && !was)
    throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: tap.name, message: `${tap.name} disappeared while it was being opened`, hint: 'another program deleted or renamed it; try again' });
  const setUp = (up: boolean): void => {
    const flags = native.ifGetFlags(tap.name);
    const want = up ? flags | K.IFF_UP : flags & ~K.IFF_UP;
    if (want !== flags) native.ifSetFlags(tap.name, want);
  };
  const owner = (): void => step('owner', () => native.tunSetOwner(fd0, p.owner!), was?.tun.owner != null ? () => native.tunSetOwner(fd0, was.tun.owner!) : undefined);
  const group = (): void => step('group', () => native.tunSetGroup(fd0, p.group!), was?.tun.group != null ? () => native.tunSetGroup(fd0, was.tun.group!) : undefined);
  const ownerUndoable = created || was?.tun.owner != null;
  const groupUndoable = created || was?.tun.group != null;
  if (p.vnetHdrSize !== undefined) {
    const size = created ? 0 : native.tunGetVnetHdrSz(fd0);
    step('vnetHdrSize', () => native.tunSetVnetHdrSz(fd0, p.vnetHdrSize!), () => native.tunSetVnetHdrSz(fd0, size));
  }
  if (p.owner !== undefined && ownerUndoable) owner();
  if (p.group !== undefined && groupUndoable) group();
  if (p.mtu !== undefined) step('mtu', () => native.ifSetMtu(tap.name, p.mtu!), () => native.ifSetMtu(tap.name, was!.mtu));
  if (p.txQueueLen !== undefined) {
    const setLen = (len: number): void => native.rtnlSetTxQueueLen(native.ifNameToIndex(tap.name), len);
    step(
      'txQueueLen',
      () => {
        try {
          setLen(p.txQueueLen!);
        } catch (err) {
          throw txQueueLenError(err, p.txQueueLen!);
        }
      },
      () => setLen(was!.txQueueLen),
    );
  }
  if (p.mac !== undefined) {
    const old = was?.address ? parseMac(was.address) : undefined;
    step('mac', () => native.ifSetMac(tap.name, p.mac!), old ? () => native.ifSetMac(tap.name, old) : undefined);
  }
  if (p.up !== undefined) step('up', () => setUp(p.up!), () => setUp(was!.up));
  // Not undoable: after every step that can be.
  if (p.offloads !== undefined) step('offloads', () => {
      native.tunSetOffload(fd0, p.offloads!);
      tap._offloadsSet(p.offloads!);
    });
  if (p.owner !== undefined && !ownerUndoable) owner();
  if (p.group !== undefined && !groupUndoable) group();
  // Persistence last: until here, closing the fds removes a device we created.
  if (p.persist !== undefined && (p.persist || !created)) step('persist', () => native.tunSetPersist(fd0, p.persist!), () => native.tunSetPersist(fd0, was!.tun.persist));
}

/**
 * openTap's rollback of the settings it changed on an existing device, last
 * first, while its fds are still open.  Returns what could not be put back.
 */
function restoreSettings(p: Plan, name: string, undo: SettingUndo[]): string[] {
  const left: string[] = [];
  for (const u of undo.reverse()) {
    if (!u.restore) {
      left.push(`${u.what} (its previous value cannot be set again)`);
      continue;
    }
    try {
      u.restore();
      p.logger.debug({ ifname: name, step: u.what }, 'tap setting restored');
    } catch (err) {
      left.push(`${u.what} (${(err as Error).message})`);
    }
  }
  if (left.length) p.logger.warn({ ifname: name, notRestored: left }, 'rollback could not restore every setting of the existing device');
  return left;
}

/**
 * Opens `queues` queues of the multi-queue tap `name` (creating it unless
 * `existing: 'require'`), applies the settings and returns the Tap.
 *
 * All or nothing: if any step fails, every fd opened so far is closed, a
 * device this call created is gone, and the error names the queue and the
 * step (`err.queue`, `err.op`).
 */
export function openTap(opts: OpenTapOptions): Tap {
  const p = plan(opts);
  const flags = K.IFF_TAP | K.IFF_NO_PI | K.IFF_MULTI_QUEUE | (p.vnetHdr ? K.IFF_VNET_HDR : 0);
  return withNetns(p.netns, () => {
    let tap: Tap | undefined;
    let queue = 0;
    let existing: LinkInfo | undefined;
    const undo: SettingUndo[] = [];
    try {
      const fd0 = native.tunOpen(p.devicePath);
      let first: { name: string; existing: LinkInfo | undefined };
      try {
        const features = native.tunGetFeatures(fd0);
        if (!(features & K.IFF_MULTI_QUEUE))
          throw new MqtapError({ op: 'TUNGETFEATURES', code: ErrorCodes.UNSUPPORTED, message: 'this kernel has no multi-queue tap support (IFF_MULTI_QUEUE)', hint: 'multi-queue taps need Linux 3.8 or later' });
        first = attachFirst(fd0, p, flags);
      } catch (err) {
        native.close(fd0);
        throw err;
      }
      existing = first.existing;
      tap = new Tap({ name: first.name, created: !existing, vnetHdr: p.vnetHdr, flags, devicePath: p.devicePath, netns: p.netns, logger: p.logger });
      tap._push(fd0, 'enabled');
      for (queue = 1; queue < p.queues; queue++) tap._push(tap._attachNew(), 'enabled');
      queue = -1;
      applySettings(tap, fd0, p, !existing, undo);
    } catch (err) {
      let notRestored: string[] = [];
      if (tap) {
        notRestored = restoreSettings(p, tap.name, undo);
        try {
          tap.close();
          if (existing) restoreDeviceFlags(p, existing);
        } catch {
          /* closing our own fds cannot fail but for EBADF; the first error is the one to report */
        }
      }
      const e = queue >= 0 && !(err instanceof MqtapError && err.op === 'LOOKUP') ? withContext(explainSetIff(err, tap?.name ?? p.name), { ifname: tap?.name ?? p.name, queue }) : err;
      if (notRestored.length && e instanceof MqtapError) e.setMessage(`${e.message}; the rollback could not restore: ${notRestored.join(', ')}`);
      p.logger.debug({ ifname: p.name, queue, err: e }, 'openTap failed; everything opened was closed'); // the caller gets `e` and reports it
      throw e;
    }
    p.logger.info({ ifname: tap.name, queues: p.queues, created: tap.created, fds: tap.fds() }, 'tap opened');
    return tap;
  });
}

/**
 * Deletes a tun/tap device by name (RTM_DELLINK), persistent or not.  Refuses
 * devices that are not tun/tap.  Queues still open elsewhere stop working.
 */
export function deleteTap(name: string, opts: { netns?: string; logger?: Logger } = {}): void {
  validateIfName(name);
  withNetns(opts.netns, () => {
    const link = getLink(name);
    if (!link)
      throw new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19, ifname: name, message: `no device named ${name}`, hint: 'list taps with `mqtap show`' });
    if (!isTapLink(link))
      throw new MqtapError({ op: 'LOOKUP', code: 'EINVAL', errno: 22, ifname: name, message: `${name} is not a tun/tap device (kind: ${link.kind ?? 'none'}); mqtap deletes only tun/tap devices` });
    try {
      native.rtnlDelLink(link.index);
    } catch (err) {
      throw withContext(err, { ifname: name });
    }
  });
  (opts.logger ?? silentLogger).info({ ifname: name }, 'tap deleted');
}

const CAP_NET_ADMIN = 12;

/** Whether the calling thread's effective capabilities include CAP_NET_ADMIN (CapEff in /proc/thread-self/status). */
function hasNetAdmin(): boolean {
  try {
    const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/thread-self/status', 'utf8'));
    return m !== null && (BigInt(`0x${m[1]}`) >> BigInt(CAP_NET_ADMIN)) % 2n === 1n;
  } catch {
    return false;
  }
}

/**
 * IFLA_TXQLEN's EPERM with CAP_NET_ADMIN held is not a permission problem:
 * the tun driver's NETDEV_CHANGE_TX_QUEUE_LEN notifier could not resize its
 * queues' rings (ptr_ring: one pointer per frame, at most KMALLOC_MAX_SIZE
 * bytes, 524288 frames on x86-64 with 4 KiB pages; more elsewhere) and the
 * notifier chain turns that into EPERM.  The length is the problem: a usage
 * error (ERR_INVALID_ARG, the kernel's errno kept), with the hint.  Other
 * errors are returned as they are.
 */
function txQueueLenError(err: unknown, len: number): unknown {
  if (!(err instanceof MqtapError) || err.op !== 'IFLA_TXQLEN' || err.code !== 'EPERM' || !hasNetAdmin()) return err;
  return new MqtapError({
    op: 'IFLA_TXQLEN',
    code: ErrorCodes.INVALID_ARG,
    errno: err.errno,
    ...(err.syscall !== undefined ? { syscall: err.syscall } : {}),
    message: `txQueueLen ${len}: the tun driver could not make each queue's ring that long (IFLA_TXQLEN failed with EPERM from its ring resize, not for want of privilege)`,
    hint: "each queue's ring is an array of one pointer per frame, limited by the kernel's largest allocation (524288 frames on x86-64 with 4 KiB pages): use a smaller txQueueLen",
    cause: err,
  });
}
