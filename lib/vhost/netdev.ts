/**
 * Multi-queue netdevs: queue pair i = tap queue i + vhost-net fd i, the unit
 * QEMU's `-netdev tap,fds=...,vhostfds=...` takes and virtio-net's
 * VQ_PAIRS_SET counts.
 */
import { ErrorCodes, MqtapError, invalidArg, withContext } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import { native } from '../sys/native';
import { openTap, type OpenTapOptions, type Tap, type TapQueue } from '../tap/tap';
import { validateIfName, validateInt, validateOneOf, validateQueueCount } from '../sys/validate';
import { VhostPairDriver, probeVhostNet, type PairDriverOptions } from './vhost';

export type VhostMode = 'on' | 'off' | 'auto';

export interface OpenNetdevOptions extends Omit<OpenTapOptions, 'queues'> {
  /** Queue pairs, 1..256. */
  pairs: number;
  /** 'on': vhost-net required; 'off': none; 'auto' (default): use it when it can be opened, else log a warning. */
  vhost?: VhostMode;
  /** Default '/dev/vhost-net'. */
  vhostDevicePath?: string;
}

export type PairState = 'enabled' | 'disabled' | 'closed';

/** Tap queue i and (when vhost is on) vhost-net fd i. */
export class QueuePair {
  readonly index: number;
  readonly tapQueue: TapQueue;
  #vhostFd: number;
  #driver: VhostPairDriver | undefined;
  /** Removes the driver's hooks from the tap queue. */
  #unhook: Array<() => void> = [];

  /** @internal */
  constructor(index: number, tapQueue: TapQueue, vhostFd: number) {
    this.index = index;
    this.tapQueue = tapQueue;
    this.#vhostFd = vhostFd;
  }

  /** The vhost-net fd, or -1 (no vhost, closed, or handed away). */
  get vhostFd(): number {
    return this.#vhostFd;
  }

  /** The tap queue's state: 'closed' once the tap queue fd is closed (the vhost fd may still be open). */
  get state(): PairState {
    return this.tapQueue.state;
  }

  /** The in-process vring driver, when this process drives the pair (Netdev.drive) and it was not stopped. */
  get driver(): VhostPairDriver | undefined {
    return this.#driver?.stopped ? undefined : this.#driver;
  }

  /**
   * @internal Makes `d` this pair's driver and ties it to the tap queue, so
   * that whoever changes the queue (queue.enable()/disable()/close(),
   * tap.setActiveQueues(), tap.close(), setActivePairs) goes through it: the
   * backend is unbound before the queue is detached or closed, and bound
   * again after the queue is attached.
   */
  _setDriver(d: VhostPairDriver | undefined): void {
    this.#dropDriver();
    if (!d) return;
    this.#driver = d;
    // A driver stopped by hand (d.stop()) has nothing left to bind or unbind.
    this.#unhook = [
      this.tapQueue._onEnableDisable({
        afterEnable: () => {
          if (!d.stopped) d.bind();
        },
        beforeDisable: () => {
          if (!d.stopped) d.unbind();
        },
      }),
      this.tapQueue._onBeforeClose(() => {
        if (this.#driver === d) this.stopDriver();
      }),
    ];
  }

  /** Forgets the driver and removes its hooks; returns it. */
  #dropDriver(): VhostPairDriver | undefined {
    for (const u of this.#unhook.splice(0)) u();
    const d = this.#driver;
    this.#driver = undefined;
    return d;
  }

  /**
   * Stops the in-process driver, if any (backend unbound, owner reset, ring
   * memory freed).  The vhost fd stays open and owner-less: it can be driven
   * again or handed to another process.
   */
  stopDriver(): void {
    this.#dropDriver()?.stop();
  }

  /**
   * Stops the driver (if any) and closes the vhost-net fd; the tap queue
   * stays.  Harmless when there is none.  Once the tap queue is closed too,
   * the kernel releases the queue (a vhost backend holds a reference to the
   * tap queue's file until it is unbound or its vhost fd is closed).
   */
  closeVhost(): void {
    let first: unknown;
    try {
      this.stopDriver();
    } catch (err) {
      first = err;
    }
    if (this.#vhostFd >= 0) {
      const fd = this.#vhostFd;
      this.#vhostFd = -1;
      try {
        native.close(fd);
      } catch (err) {
        first ??= err;
      }
    }
    if (first) throw first;
  }

  /** Closes the pair: driver stopped, vhost fd closed, then the tap queue.  Idempotent. */
  close(): void {
    let first: unknown;
    try {
      this.closeVhost();
    } catch (err) {
      first = err;
    }
    try {
      this.tapQueue.close();
    } catch (err) {
      first ??= err;
    }
    if (first) throw first;
  }

  toJSON(): { index: number; state: PairState; tapFd: number; vhostFd: number; driven: boolean; bound: boolean } {
    return { index: this.index, state: this.state, tapFd: this.tapQueue.fd, vhostFd: this.#vhostFd, driven: this.driver !== undefined, bound: this.driver?.bound ?? false };
  }
}

export class Netdev {
  readonly tap: Tap;
  readonly pairs: readonly QueuePair[];
  readonly vhost: boolean;
  readonly logger: Logger;

  /** @internal use openNetdev(). */
  constructor(tap: Tap, pairs: QueuePair[], vhost: boolean, logger: Logger) {
    this.tap = tap;
    this.pairs = pairs;
    this.vhost = vhost;
    this.logger = logger;
  }

  get name(): string {
    return this.tap.name;
  }

  /** Tap queue fds of the open pairs, in pair order. */
  tapFds(): number[] {
    return this.pairs.filter((p) => p.state !== 'closed').map((p) => p.tapQueue.fd);
  }

  /** vhost-net fds of the open pairs, in pair order (empty without vhost). */
  vhostFds(): number[] {
    return this.vhost ? this.pairs.filter((p) => p.state !== 'closed' && p.vhostFd >= 0).map((p) => p.vhostFd) : [];
  }

  activePairCount(): number {
    return this.pairs.filter((p) => p.state === 'enabled').length;
  }

  /**
   * Drives pair `index` from this process with a userspace vring driver
   * (vhost-net needed): VHOST_SET_OWNER on the pair's vhost fd, rings in this
   * process's memory, backend bound to the tap queue.  The tap's header size
   * must match the features (12 for VERSION_1 or MRG_RXBUF, the default;
   * openNetdev sets 12 when vhost is used).  Returns the existing driver when
   * the pair is already driven.
   */
  drive(index: number, opts: PairDriverOptions = {}): VhostPairDriver {
    const pair = this.pairs[validateInt(index, 'pair', 0, this.pairs.length - 1)]!;
    if (pair.state === 'closed')
      throw new MqtapError({ op: 'VHOST_DRIVER', code: ErrorCodes.CLOSED, ifname: this.name, queue: index, message: `${this.name} pair ${index} is closed` });
    if (!this.vhost || pair.vhostFd < 0)
      throw new MqtapError({ op: 'VHOST_DRIVER', code: ErrorCodes.UNSUPPORTED, ifname: this.name, queue: index, message: `${this.name} pair ${index} has no vhost-net fd`, hint: "open the netdev with vhost: 'on'" });
    if (pair.driver) return pair.driver;
    if (pair.state !== 'enabled') throw invalidArg(`${this.name} pair ${index} is ${pair.state}; enable it first (setActivePairs)`);
    try {
      const d = new VhostPairDriver(pair.vhostFd, pair.tapQueue.fd, opts);
      pair._setDriver(d);
      this.logger.info({ ifname: this.name, pair: index, features: `0x${d.features.toString(16)}`, hdrLen: d.hdrLen }, 'vhost pair driven');
      return d;
    } catch (err) {
      throw withContext(err, { ifname: this.name, queue: index });
    }
  }

  /**
   * Makes pairs 0..k-1 enabled and the rest disabled (virtio-net's
   * VQ_PAIRS_SET): tap.setActiveQueues(k), with its order (enable before
   * disable, so there is always an enabled pair), its undo and its
   * ERR_PARTIAL_STATE.  For a pair this process drives, the driver's hooks on
   * the tap queue unbind the vhost backend before the queue is detached and
   * bind it after the queue is attached (as they do for queue.enable(),
   * queue.disable() and tap.setActiveQueues() called directly).
   */
  setActivePairs(k: number): void {
    const open = this.pairs.filter((p) => p.state !== 'closed');
    if (open.length === 0) throw new MqtapError({ op: 'SET_ACTIVE', code: ErrorCodes.CLOSED, ifname: this.name, message: `${this.name} is closed` });
    validateInt(k, 'active pairs', 1, open.length, `${this.name} has ${open.length} open pair(s)`);
    this.tap.setActiveQueues(k);
    this.logger.info({ ifname: this.name, active: k }, 'active pairs set');
  }

  /**
   * Closes every pair (last first): drivers stopped, vhost fds closed, tap
   * queues closed (a non-persistent tap disappears).  Idempotent.
   */
  close(): void {
    let first: unknown;
    for (const p of [...this.pairs].reverse()) {
      try {
        p.close();
      } catch (err) {
        first ??= err;
      }
    }
    try {
      this.tap.close();
    } catch (err) {
      first ??= err;
    }
    if (first) throw first;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

const NETDEV_KEYS = ['pairs', 'vhost', 'vhostDevicePath'];

/**
 * Opens a multi-queue netdev of `pairs` queue pairs, all or nothing: tap
 * queues first (vnet_hdr on, checked consistent on every queue, 12-byte
 * header when vhost is used unless vnetHdrSize says otherwise), then one
 * /dev/vhost-net fd per pair (opened, not owned: the process that drives it
 * — this one via drive(), or QEMU — does VHOST_SET_OWNER).
 *
 * vhost 'auto' (the default) uses vhost-net when the device answers, and
 * otherwise logs a warning and opens the tap queues alone; with vnetHdr:
 * false it does not try.  vhost 'on' fails (before anything is opened) when
 * the device is missing or unusable.
 */
export function openNetdev(opts: OpenNetdevOptions): Netdev {
  if (typeof opts !== 'object' || opts === null) throw invalidArg('openNetdev(options): options must be an object with at least { name, pairs }');
  if ('queues' in opts) throw invalidArg('openNetdev: use pairs, not queues (one tap queue per pair)');
  validateIfName(opts.name, 'name', { template: true });
  const pairs = validateQueueCount(opts.pairs, 'pairs');
  const mode = opts.vhost === undefined ? 'auto' : validateOneOf(opts.vhost, 'vhost', ['on', 'off', 'auto'] as const);
  if (opts.vhostDevicePath !== undefined && (typeof opts.vhostDevicePath !== 'string' || !opts.vhostDevicePath.startsWith('/')))
    throw invalidArg('vhostDevicePath must be an absolute path');
  if (opts.vnetHdr !== undefined && typeof opts.vnetHdr !== 'boolean') throw invalidArg('vnetHdr must be a boolean');
  if (mode === 'on' && opts.vnetHdr === false) throw invalidArg("vhost needs the virtio-net header: drop vnetHdr: false or use vhost: 'off'");
  const logger = opts.logger ?? silentLogger;
  const tapOpts: OpenTapOptions = Object.fromEntries(Object.entries(opts).filter(([k]) => !NETDEV_KEYS.includes(k))) as unknown as OpenTapOptions;
  const vhostPath = opts.vhostDevicePath ?? '/dev/vhost-net';
  let useVhost = mode === 'on' || (mode === 'auto' && opts.vnetHdr !== false);
  if (mode === 'auto' && opts.vnetHdr === false) logger.info({ ifname: opts.name }, "vnetHdr: false: not using vhost-net (vhost: 'auto')");
  if (useVhost) {
    const probe = probeVhostNet({ devicePath: vhostPath });
    if (!probe.usable) {
      if (mode === 'on')
        throw new MqtapError({
          op: 'VHOST_OPEN',
          code: probe.error?.code ?? 'ENOENT',
          message: `vhost-net is required (vhost: 'on') but unusable: ${probe.error?.message ?? 'unknown'}`,
          ...(probe.error?.hint ? { hint: probe.error.hint } : {}),
        });
      logger.warn({ devicePath: vhostPath, reason: probe.error?.message, hint: probe.error?.hint }, "vhost-net unavailable; continuing without it (vhost: 'auto')");
      useVhost = false;
    }
  }
  // The vhost-net fds first (the device is not tied to a network
  // namespace): once the tap is open nothing is left to fail, so an existing
  // tap is never left with settings changed for a netdev that did not open.
  // The vnet_hdr flag and size are device-wide, so the queues of one tap
  // always agree on them (what QEMU checks across fds).
  const vhostFds: number[] = [];
  let tap: Tap;
  try {
    if (useVhost) {
      for (let i = 0; i < pairs; i++) {
        try {
          vhostFds.push(native.vhostOpen(vhostPath));
        } catch (err) {
          throw withContext(err, { queue: i });
        }
      }
    }
    tap = openTap({ ...tapOpts, queues: pairs, ...(useVhost && tapOpts.vnetHdrSize === undefined ? { vnetHdrSize: 12 } : {}) });
  } catch (err) {
    for (const fd of vhostFds) native.close(fd);
    throw err;
  }
  const qp = tap.queues.map((q, i) => new QueuePair(i, q, useVhost ? vhostFds[i]! : -1));
  logger.info({ ifname: tap.name, pairs, vhost: useVhost, tapFds: tap.fds(), vhostFds }, 'netdev opened');
  return new Netdev(tap, qp, useVhost, logger);
}
