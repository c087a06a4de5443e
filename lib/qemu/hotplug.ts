/**
 * Hot-adding a multi-queue tap (and vhost-net) netdev to a running QEMU over
 * QMP, and removing it again.
 *
 * Hot-add, all or nothing:
 *   0. the fds are checked as launch checks them (qemu.ts verifyNetdevFds):
 *      attached queues of one tap, vhost fds /dev/vhost-net, one per queue;
 *      nothing is sent to QEMU when they are not;
 *   1. `getfd` each tap queue fd, then each vhost-net fd, one command per fd
 *      with the fd attached (SCM_RIGHTS) to that command's bytes, under a
 *      unique name (`mqtap-<id>-<nonce>-t<i>` / `...-v<i>`);
 *   2. `netdev_add` type tap with `fds`/`vhostfds` as ':'-separated name
 *      lists and `vhost` a JSON boolean (QEMU takes the named fds out of the
 *      monitor: they are QEMU's from then on);
 *   3. `device_add` virtio-net-pci with `mq` (boolean), `vectors` = 2N+2
 *      (a config + a control-queue vector and one per virtqueue) and
 *      `romfile: ''`.
 *   A failure undoes what was done (netdev_del, closefd of every name still
 *   registered) and the error says so; if the undo fails too the error has
 *   code ERR_PARTIAL_STATE and lists what is left in QEMU.
 *
 * Hot-remove: `device_del`, wait (bounded) for `DEVICE_DELETED` of that id
 * (the guest has to let go of the device), `netdev_del` (QEMU closes its
 * fds), `closefd` of any names the caller still knows.
 *
 * QEMU keeps its own copies of the fds (SCM_RIGHTS duplicates them).  A tap
 * device lives while any of its queue fds is open anywhere, so a
 * non-persistent tap outlives the process that hot-added it, and disappears
 * when QEMU closes its copies on `netdev_del` (if nobody else holds one).
 */
import { randomBytes } from 'node:crypto';
import { ErrorCodes, MqtapError, invalidArg } from '../sys/errors';
import { silentLogger, type Logger } from '../sys/log';
import type { Netdev } from '../vhost/netdev';
import { QmpError, type QmpClient } from './qmp';
import { MAX_QUEUES, parseMac } from '../sys/validate';
import { checkFdCounts, validateQemuId, verifyNetdevFds } from './qemu';

/** QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */

export interface HotplugFdsOptions {
  /** Device id (virtio-net-pci). */
  id: string;
  /** Netdev id.  Default `<id>-netdev`. */
  netdevId?: string;
  /** Tap queue fds, one per queue pair: attached queues of one tap (QEMU assumes so; checked, see verifyFds). */
  tapFds: readonly number[];
  /** vhost-net fds, one per pair; omit (or empty) for no vhost. */
  vhostFds?: readonly number[];
  /** Guest MAC, e.g. '52:54:00:12:34:56'. */
  mac?: string;
  /** Bus for device_add, e.g. a pcie-root-port id on q35 (pcie.0 itself does not take hot-plugged devices). */
  bus?: string;
  /** Slot/function on the bus, e.g. '0.0'. */
  addr?: string;
  /** Per QMP command.  Default: the client's. */
  timeoutMs?: number;
  logger?: Logger;
  /**
   * Check the fds before anything is sent to QEMU, as launch does (default
   * true): tap fds are attached queues of one tap with consistent vnet_hdr,
   * vhost fds are /dev/vhost-net, one vhost fd per tap fd.  false only for
   * tests with stand-in fds.
   */
  verifyFds?: boolean;
}

export interface HotplugResult {
  id: string;
  netdevId: string;
  queues: number;
  vhost: boolean;
  /** The getfd names used (all consumed by netdev_add). */
  fdNames: string[];
}

/** The getfd names for one hot-add: unique per call, never starting with a digit. */
export function fdNamesFor(id: string, queues: number, vhost: boolean, nonce: string = randomBytes(4).toString('hex')): { tap: string[]; vhost: string[] } {
  const base = `mqtap-${id}-${nonce}`;
  return {
    tap: Array.from({ length: queues }, (_, i) => `${base}-t${i}`),
    vhost: vhost ? Array.from({ length: queues }, (_, i) => `${base}-v${i}`) : [],
  };
}

/** Arguments of `netdev_add` (QAPI Netdev, type tap): typed JSON, vhost a boolean. */
export function netdevAddArgs(netdevId: string, tapNames: readonly string[], vhostNames: readonly string[]): Record<string, unknown> {
  const args: Record<string, unknown> = { type: 'tap', id: netdevId, fds: tapNames.join(':'), vhost: vhostNames.length > 0 };
  if (vhostNames.length > 0) args.vhostfds = vhostNames.join(':');
  return args;
}

/** Arguments of `device_add` for a virtio-net-pci with `queues` pairs. */
export function deviceAddArgs(o: { id: string; netdevId: string; queues: number; mac?: string; bus?: string; addr?: string }): Record<string, unknown> {
  const args: Record<string, unknown> = {
    driver: 'virtio-net-pci',
    id: o.id,
    netdev: o.netdevId,
    mq: o.queues > 1,
    vectors: 2 * o.queues + 2,
    romfile: '',
  };
  if (o.mac !== undefined) args.mac = o.mac;
  if (o.bus !== undefined) args.bus = o.bus;
  if (o.addr !== undefined) args.addr = o.addr;
  return args;
}

function isNotFound(err: unknown): boolean {
  return err instanceof QmpError && /not found/i.test(err.desc);
}

/** A QMP command that timed out: QEMU may still have carried it out. */
function timedOut(err: unknown): boolean {
  return err instanceof MqtapError && err.op === 'QMP' && err.code === 'ETIMEDOUT';
}

function validateFds(fds: unknown, what: string): number[] {
  if (!Array.isArray(fds)) throw invalidArg(`${what} must be an array of fd numbers`);
  for (const fd of fds) if (!Number.isInteger(fd) || fd < 0) throw invalidArg(`${what}: ${String(fd)} is not an fd number`);
  return fds as number[];
}

/**
 * Hot-adds a tap netdev built from `tapFds` (and `vhostFds`) plus a
 * virtio-net-pci device.  All or nothing (see the module comment).
 */
export async function hotplugFds(qmp: QmpClient, opts: HotplugFdsOptions): Promise<HotplugResult> {
  const id = validateQemuId(opts.id, 'id');
  const netdevId = validateQemuId(opts.netdevId ?? `${id}-netdev`, 'netdevId');
  const tapFds = validateFds(opts.tapFds, 'tapFds');
  const vhostFds = validateFds(opts.vhostFds ?? [], 'vhostFds');
  if (tapFds.length < 1 || tapFds.length > MAX_QUEUES) throw invalidArg(`tapFds: 1 to ${MAX_QUEUES} queue fds (got ${tapFds.length})`);
  if (opts.mac !== undefined) parseMac(opts.mac);
  if (opts.bus !== undefined && (typeof opts.bus !== 'string' || opts.bus === '')) throw invalidArg('bus must be a non-empty string');
  if (opts.addr !== undefined && (typeof opts.addr !== 'string' || !/^[0-9a-fA-F]{1,2}(\.[0-7])?$/.test(opts.addr))) throw invalidArg('addr must look like "0" or "1f.0"');
  if (opts.verifyFds !== undefined && typeof opts.verifyFds !== 'boolean') throw invalidArg('verifyFds must be a boolean');
  // The same checks as launch, before the first getfd: QEMU aborts on a
  // detached queue and mixes queues of two taps without a word.
  const check = { name: `hotplug ${id}`, op: 'HOTPLUG' };
  if (opts.verifyFds === false) checkFdCounts(check.name, tapFds, vhostFds);
  else verifyNetdevFds(check, tapFds, vhostFds);
  const log = opts.logger ?? silentLogger;
  const queues = tapFds.length;
  const vhost = vhostFds.length > 0;
  const names = fdNamesFor(id, queues, vhost);
  const exec = { ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}) };
  const registered: string[] = [];
  // A step that timed out may still have been carried out (its reply can
  // come late): it is undone as if it had been, and "not found" is fine then.
  let netdevAdded: boolean | 'maybe' = false;
  let deviceMaybe = false;
  let step = 'getfd';
  try {
    const all: Array<[string, number]> = [...names.tap.map((n, i) => [n, tapFds[i]!] as [string, number]), ...names.vhost.map((n, i) => [n, vhostFds[i]!] as [string, number])];
    for (const [name, fd] of all) {
      try {
        await qmp.execute('getfd', { fdname: name }, { ...exec, fds: [fd] });
      } catch (e) {
        if (timedOut(e)) registered.push(name);
        throw e;
      }
      registered.push(name);
    }
    step = 'netdev_add';
    try {
      await qmp.execute('netdev_add', netdevAddArgs(netdevId, names.tap, names.vhost), exec);
    } catch (e) {
      if (timedOut(e)) netdevAdded = 'maybe';
      throw e;
    }
    netdevAdded = true;
    step = 'device_add';
    try {
      await qmp.execute('device_add', deviceAddArgs({ id, netdevId, queues, ...(opts.mac !== undefined ? { mac: opts.mac } : {}), ...(opts.bus !== undefined ? { bus: opts.bus } : {}), ...(opts.addr !== undefined ? { addr: opts.addr } : {}) }), exec);
    } catch (e) {
      deviceMaybe = timedOut(e);
      throw e;
    }
  } catch (err) {
    const left: string[] = [];
    if (deviceMaybe) {
      try {
        await qmp.execute('device_del', { id }, exec);
        left.push(`device ${id} (device_add timed out but had been carried out; device_del sent, the guest must release it)`);
      } catch (e) {
        if (!isNotFound(e)) left.push(`device ${id} (${(e as Error).message})`);
      }
    }
    if (netdevAdded) {
      try {
        await qmp.execute('netdev_del', { id: netdevId }, exec);
      } catch (e) {
        if (netdevAdded === true || !isNotFound(e)) left.push(`netdev ${netdevId} (${(e as Error).message})`);
      }
    }
    if (netdevAdded !== true) {
      // netdev_add may have taken some of the names before it failed; closefd
      // of a taken name answers "not found", which is fine.
      for (const name of registered) {
        try {
          await qmp.execute('closefd', { fdname: name }, exec);
        } catch (e) {
          if (!isNotFound(e)) left.push(`fd ${name} (${(e as Error).message})`);
        }
      }
    }
    log.debug({ qmp: qmp.path, id, netdevId, step, err, left }, 'hotplug failed'); // the caller gets the error (with `left`) and reports it
    if (left.length === 0) {
      if (err instanceof MqtapError) err.setMessage(`hotplug ${id}: ${step} failed: ${err.message}; everything done so far was undone`);
      throw err;
    }
    throw new MqtapError({
      op: 'HOTPLUG',
      code: ErrorCodes.PARTIAL,
      message: `hotplug ${id}: ${step} failed (${(err as Error).message}) and could not be fully undone; left in QEMU: ${left.join('; ')}`,
      hint: `remove them by hand over QMP (netdev_del / closefd), or stop the VM`,
      cause: err,
    });
  }
  log.info({ qmp: qmp.path, id, netdevId, queues, vhost }, 'netdev hot-added');
  return { id, netdevId, queues, vhost, fdNames: [...names.tap, ...names.vhost] };
}

export interface HotplugNetdevOptions extends Omit<HotplugFdsOptions, 'tapFds' | 'vhostFds'> {}

/**
 * Hot-adds every open pair of `netdev`.  Enables all pairs first: QEMU
 * assumes the queues it is given are attached and detaches/attaches them
 * itself as the guest changes its queue count (`ethtool -L`).  From then on
 * the guest controls which pairs are active.
 */
export async function hotplugNetdev(qmp: QmpClient, netdev: Netdev, opts: HotplugNetdevOptions): Promise<HotplugResult> {
  const open = netdev.pairs.filter((p) => p.state !== 'closed');
  if (open.length === 0) throw new MqtapError({ op: 'HOTPLUG', code: ErrorCodes.CLOSED, ifname: netdev.name, message: `${netdev.name} is closed` });
  if (open.some((p) => p.driver !== undefined))
    throw invalidArg(`${netdev.name}: a pair is driven by this process (drive()); QEMU needs vhost fds nobody owns`);
  if (netdev.activePairCount() !== open.length) netdev.setActivePairs(open.length);
  return hotplugFds(qmp, { ...opts, tapFds: netdev.tapFds(), vhostFds: netdev.vhostFds() });
}

export interface UnplugOptions {
  id: string;
  /** Default: asked from QEMU (qom-get of the device's `netdev` property). */
  netdevId?: string;
  /** Names from getfd that may still be registered (closefd'ed, "not found" ignored). */
  fdNames?: readonly string[];
  /** How long the guest may take to release the device.  Default 60 000 ms. */
  unplugTimeoutMs?: number;
  timeoutMs?: number;
  logger?: Logger;
}

/**
 * Hot-removes device `id` and its netdev: device_del, wait for
 * DEVICE_DELETED, netdev_del, closefd of leftovers.  On ETIMEDOUT (the guest
 * did not release the device) nothing else is done: the device and netdev stay.
 */
export async function unplugNetdev(qmp: QmpClient, opts: UnplugOptions): Promise<{ id: string; netdevId: string }> {
  const id = validateQemuId(opts.id, 'id');
  const log = opts.logger ?? silentLogger;
  const exec = { ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}) };
  let netdevId: string;
  if (opts.netdevId !== undefined) netdevId = validateQemuId(opts.netdevId, 'netdevId');
  else {
    try {
      netdevId = String(await qmp.execute<string>('qom-get', { path: `/machine/peripheral/${id}`, property: 'netdev' }, exec));
    } catch (err) {
      if (err instanceof QmpError && (err.qmpClass === 'DeviceNotFound' || /not found/i.test(err.desc)))
        throw new MqtapError({ op: 'UNPLUG', code: 'ENODEV', errno: 19, message: `QEMU has no device with id ${id}`, hint: 'list devices with the QMP command query-pci or `info qtree`', cause: err });
      throw err;
    }
  }
  const timeout = opts.unplugTimeoutMs ?? 60_000;
  const deleted = qmp.waitForEvent('DEVICE_DELETED', (d) => d.device === id, timeout);
  try {
    await qmp.execute('device_del', { id }, exec);
  } catch (err) {
    deleted.cancel();
    throw err;
  }
  try {
    await deleted.promise;
  } catch (err) {
    if (err instanceof MqtapError && err.code === 'ETIMEDOUT')
      err.hint = `the guest did not release ${id} within ${timeout} ms (no PCI hotplug support or driver in the guest?); the device and netdev ${netdevId} stay; try again or stop the VM`;
    throw err;
  }
  await qmp.execute('netdev_del', { id: netdevId }, exec);
  for (const name of opts.fdNames ?? []) {
    try {
      await qmp.execute('closefd', { fdname: name }, exec);
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }
  log.info({ qmp: qmp.path, id, netdevId }, 'netdev hot-removed');
  return { id, netdevId };
}
