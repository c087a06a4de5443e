/**
 * The netdevs a daemon holds, and every operation on them.  Synchronous
 * syscalls (lib/vhost/netdev.ts, lib/tap/tap.ts) except hotplug/unplug, which talk to
 * QEMU; operations on one netdev run one at a time (a per-netdev queue), so
 * an unplug waiting for the guest cannot interleave with a set-active.
 *
 * Leases: a netdev's fds are either only the daemon's, lent to a client
 * (`acquire` ... `release`), or plugged into a QEMU (`hotplug` ... `unplug`).
 * While lent or plugged, acquire/hotplug/delete refuse with EBUSY (delete
 * unless `force`), and set-active refuses for a plugged netdev (the guest
 * controls its queue pairs).  When a lease ends, the daemon brings the queues
 * back under its control: vhost-net fds that another process owned
 * (VHOST_SET_OWNER) cannot be reused, so a vhost netdev is reopened (new
 * queues attached before the old ones close, so the tap never disappears);
 * for a tap-only netdev each queue's attach state is read back (TUNGETIFF
 * reports IFF_DETACH_QUEUE per fd) and reset to the daemon's.
 */
import { lstatSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCodes, MqtapError } from '../sys/errors';
import { withContext } from '../sys/errors';
import { getTap, listTaps, type TapLinkInfo } from '../tap/links';
import type { Logger } from '../sys/log';
import { K, native } from '../sys/native';
import type { VnetHdrSize } from '../sys/validate';
import { openNetdev, type Netdev } from '../vhost/netdev';
import { hotplugNetdev, unplugNetdev } from '../qemu/hotplug';
import { QmpClient } from '../qemu/qmp';
import { deleteTap } from '../tap/tap';
import { serveVhostUser, type VhostUserBackend } from '../vhost-user/backend';
import type { DataPlane } from '../vhost-user/dataplane-api';
import { daemonError, type CreateArgs, type DeleteArgs, type HotplugArgs, type OpenArgs, type ServeVhostUserArgs, type SetActiveArgs, type UnplugArgs, type VhostArg } from './protocol';
import { STATE_VERSION, type Lease, type NetdevState, type StateStore } from './state';

export interface Peer {
  pid: number;
  uid: number;
  gid: number;
}

export interface RegistryOptions {
  state: StateStore;
  logger: Logger;
  /** Connect + each QMP command.  Default 10 000 ms. */
  qmpTimeoutMs?: number;
  /** How long unplug waits for the guest (DEVICE_DELETED).  Default 60 000 ms. */
  unplugTimeoutMs?: number;
  /** Default 1024. */
  maxNetdevs?: number;
  /** For tests: the tun / vhost-net device nodes. */
  devicePath?: string;
  vhostDevicePath?: string;
  /** vhost-user sockets: also serve this gid (mode 0660) and these uids (as the daemon's own socket). */
  group?: number;
  allowUids?: number[];
  /** For tests: the vhost-user data plane (default the native one). */
  vhostUserDataPlane?: (pairs: number) => DataPlane;
}

/** What serve-vhost-user changed on the tap, put back when serving stops. */
interface Served {
  backend: VhostUserBackend;
  vnetHdrSize: number;
}

interface Entry {
  name: string;
  /** The daemon's fds; undefined while a lease taken before a restart is in force. */
  netdev: Netdev | undefined;
  pairs: number;
  vhost: boolean;
  active: number;
  netns: string | undefined;
  created: boolean;
  persist: boolean;
  createdAt: string;
  lease: (Lease & { pending?: boolean }) | undefined;
  queue: Promise<unknown>;
  gone: boolean;
  /** Set while the daemon serves the netdev over vhost-user (lease kind 'vhost-user'). */
  served?: Served;
}

export type PairView = 'enabled' | 'disabled' | 'closed';

function now(): string {
  return new Date().toISOString();
}

function notFound(name: string): MqtapError {
  return daemonError('ENODEV', `the daemon holds no netdev named ${name}`, 'list them with `mqtap client list`', name);
}

function leased(e: Entry, what: string): MqtapError {
  const l = e.lease!;
  const by =
    l.kind === 'qmp' ? `plugged into QEMU (${l.qmp}, device ${l.id})` : l.kind === 'vhost-user' ? `served over vhost-user at ${l.socket}` : `lent to a client (pid ${l.pid}, uid ${l.uid})`;
  const hint =
    l.kind === 'qmp'
      ? `unplug it first (\`mqtap client unplug ${e.name}\`)`
      : l.kind === 'vhost-user'
        ? `stop serving it first (\`mqtap client stop-vhost-user ${e.name}\`)`
        : `release it first (\`mqtap client release ${e.name}\`)`;
  return daemonError('EBUSY', `cannot ${what} ${e.name}: it is ${by}`, hint, e.name);
}

export class Registry {
  readonly #entries = new Map<string, Entry>();
  readonly #opts: RegistryOptions;
  readonly #log: Logger;
  #closed = false;

  constructor(opts: RegistryOptions) {
    this.#opts = opts;
    this.#log = opts.logger;
  }

  get size(): number {
    return this.#entries.size;
  }

  names(): string[] {
    return [...this.#entries.keys()];
  }

  // ------------------------------------------------------------ lifecycle

  /** Re-adopts the persistent netdevs listed in the state dir (at start). */
  adopt(): { adopted: string[]; dropped: string[]; failed: string[] } {
    const adopted: string[] = [];
    const dropped: string[] = [];
    const failed: string[] = [];
    const states = this.#opts.state.load((file, why) => this.#log.error({ file, why }, 'unreadable state file left alone'));
    for (const s of states) {
      let link;
      try {
        link = getTap(s.name, s.netns !== undefined ? { netns: s.netns } : {});
      } catch (err) {
        this.#log.error({ ifname: s.name, netns: s.netns, err }, 'cannot look up a netdev from the state dir; left alone');
        failed.push(s.name);
        continue;
      }
      if (!link) {
        this.#log.warn({ ifname: s.name }, 'a netdev in the state dir no longer exists; its state file is removed');
        this.#opts.state.remove(s.name);
        dropped.push(s.name);
        continue;
      }
      const e: Entry = {
        name: s.name,
        netdev: undefined,
        pairs: s.pairs,
        vhost: s.vhost,
        active: s.active,
        netns: s.netns,
        created: true,
        persist: true,
        createdAt: s.createdAt,
        lease: s.lease,
        queue: Promise.resolve(),
        gone: false,
      };
      if (!s.lease) {
        try {
          e.netdev = this.#openExisting(e);
        } catch (err) {
          this.#log.error({ ifname: s.name, err }, 'cannot re-adopt a netdev from the state dir; left alone');
          failed.push(s.name);
          continue;
        }
      }
      this.#entries.set(e.name, e);
      adopted.push(e.name);
      this.#log.info({ ifname: e.name, pairs: e.pairs, vhost: e.vhost, active: e.active, lease: e.lease ?? null, holding: e.netdev !== undefined }, 'netdev re-adopted');
    }
    return { adopted, dropped, failed };
  }

  /** Closes every netdev (persistent taps stay, with their state files).  For shutdown. */
  closeAll(): void {
    this.#closed = true;
    for (const e of this.#entries.values()) {
      this.#stopServing(e);
      try {
        e.netdev?.close();
      } catch (err) {
        this.#log.error({ ifname: e.name, err }, 'closing a netdev at shutdown failed');
      }
      e.netdev = undefined;
    }
    this.#entries.clear();
  }

  // ------------------------------------------------------------ helpers

  #entry(name: string): Entry {
    const e = this.#entries.get(name);
    if (!e || e.gone) throw notFound(name);
    return e;
  }

  /** Runs `fn` after every earlier operation on the same netdev finished. */
  #serial<T>(name: string, fn: (e: Entry) => T | Promise<T>): Promise<T> {
    const e = this.#entry(name);
    const run = e.queue.then(() => fn(this.#entry(name)));
    e.queue = run.catch(() => undefined);
    return run;
  }

  #netnsOpt(e: { netns: string | undefined }): { netns?: string } {
    return e.netns !== undefined ? { netns: e.netns } : {};
  }

  #openExisting(e: Entry): Netdev {
    const nd = openNetdev({
      name: e.name,
      pairs: e.pairs,
      vhost: e.vhost ? 'on' : 'off',
      existing: 'require',
      logger: this.#log,
      ...this.#netnsOpt(e),
      ...(this.#opts.devicePath ? { devicePath: this.#opts.devicePath } : {}),
      ...(this.#opts.vhostDevicePath ? { vhostDevicePath: this.#opts.vhostDevicePath } : {}),
    });
    try {
      if (e.active < e.pairs) nd.setActivePairs(e.active);
    } catch (err) {
      nd.close();
      throw err;
    }
    return nd;
  }

  #save(e: Entry): void {
    if (!e.created || !e.persist || e.gone) return;
    const s: NetdevState = {
      version: STATE_VERSION,
      name: e.name,
      pairs: e.pairs,
      vhost: e.vhost,
      active: e.active,
      persist: true,
      created: true,
      createdAt: e.createdAt,
      ...(e.netns !== undefined ? { netns: e.netns } : {}),
    };
    if (e.lease && !e.lease.pending && e.lease.kind !== 'vhost-user') {
      const { pending: _p, ...lease } = e.lease;
      s.lease = lease as Lease;
    }
    this.#opts.state.save(s);
  }

  /**
   * Sets each held queue's kernel attach state back to the daemon's view
   * (another holder of the same fds may have attached/detached them).
   */
  #resync(e: Entry): void {
    const nd = e.netdev;
    if (!nd) return;
    for (const p of nd.pairs) {
      if (p.state === 'closed') continue;
      const fd = p.tapQueue.fd;
      const detached = (native.tunGetIff(fd).flags & K.IFF_DETACH_QUEUE) !== 0;
      const want = p.state === 'enabled';
      if (want === !detached) continue;
      try {
        native.tunSetQueue(fd, want ? K.IFF_ATTACH_QUEUE : K.IFF_DETACH_QUEUE);
      } catch (err) {
        throw withContext(err, { ifname: e.name, queue: p.index });
      }
      this.#log.info({ ifname: e.name, pair: p.index, state: p.state }, 'queue attach state restored after another holder changed it');
    }
  }

  /** After a lease ended: take the queues back (see the module comment). */
  #reclaim(e: Entry): void {
    if (!e.netdev) {
      e.netdev = this.#openExisting(e);
      return;
    }
    if (e.vhost) {
      const fresh = this.#openExisting(e);
      const old = e.netdev;
      e.netdev = fresh;
      try {
        old.close();
      } catch (err) {
        this.#log.warn({ ifname: e.name, err }, 'closing the previous fds of a reclaimed netdev failed');
      }
      return;
    }
    this.#resync(e);
  }

  #pairViews(e: Entry): { daemon: PairView[]; kernel: PairView[] } | null {
    const nd = e.netdev;
    if (!nd) return null;
    const daemon = nd.pairs.map((p) => p.state);
    const kernel = nd.pairs.map((p): PairView => {
      if (p.state === 'closed') return 'closed';
      try {
        return native.tunGetIff(p.tapQueue.fd).flags & K.IFF_DETACH_QUEUE ? 'disabled' : 'enabled';
      } catch {
        return 'closed';
      }
    });
    return { daemon, kernel };
  }

  #kernel(e: Entry, known?: Map<string, TapLinkInfo>): Record<string, unknown> | null {
    let t: TapLinkInfo | undefined;
    try {
      t = known ? known.get(e.name) : getTap(e.name, this.#netnsOpt(e));
    } catch {
      return null;
    }
    if (!t) return null;
    return {
      ifindex: t.index,
      numQueues: t.tun.numQueues,
      numDisabledQueues: t.tun.numDisabledQueues,
      persist: t.tun.persist,
      vnetHdr: t.tun.vnetHdr,
      up: t.up,
      operstate: t.operstate,
      mtu: t.mtu,
      address: t.address,
    };
  }

  #leaseView(e: Entry): Record<string, unknown> | null {
    if (!e.lease) return null;
    const { pending, ...rest } = e.lease;
    return pending ? { ...rest, pending: true } : rest;
  }

  #summary(e: Entry, known?: Map<string, TapLinkInfo>): Record<string, unknown> {
    const k = this.#kernel(e, known);
    return {
      name: e.name,
      pairs: e.pairs,
      active: e.active,
      vhost: e.vhost,
      persist: e.persist,
      created: e.created,
      netns: e.netns ?? null,
      holding: e.netdev !== undefined,
      lease: this.#leaseView(e),
      numQueues: k ? k.numQueues : null,
      numDisabledQueues: k ? k.numDisabledQueues : null,
    };
  }

  // ------------------------------------------------------------ operations

  #add(args: { name: string; pairs: number; vhost: VhostArg; netns?: string; active?: number }, created: boolean, persist: boolean, open: () => Netdev): Entry {
    if (this.#closed) throw daemonError('ERR_SHUTDOWN', 'the daemon is shutting down');
    if (this.#entries.size >= (this.#opts.maxNetdevs ?? 1024)) throw daemonError('ENOSPC', `the daemon already holds ${this.#entries.size} netdevs (its limit)`);
    if (!args.name.includes('%d') && this.#entries.has(args.name)) throw daemonError('EEXIST', `the daemon already holds a netdev named ${args.name}`, undefined, args.name);
    const nd = open();
    // Undoes open(): closes the fds and, for a persistent tap this call
    // created, removes the device too (closing alone would leave it).
    const undo = (): void => {
      try {
        nd.close();
      } catch {
        /* the first error is the one to report */
      }
      if (created && persist) {
        try {
          deleteTap(nd.name, this.#netnsOpt({ netns: args.netns }));
        } catch {
          /* the first error is the one to report */
        }
      }
    };
    if (this.#entries.has(nd.name)) {
      // A template resolved to a name the daemon holds in another namespace.
      undo();
      throw daemonError('EEXIST', `the daemon already holds a netdev named ${nd.name}`, 'the daemon keys netdevs by name across namespaces: pick another name', nd.name);
    }
    const e: Entry = {
      name: nd.name,
      netdev: nd,
      pairs: args.pairs,
      vhost: nd.vhost,
      active: args.pairs,
      netns: args.netns,
      created,
      persist,
      createdAt: now(),
      lease: undefined,
      queue: Promise.resolve(),
      gone: false,
    };
    try {
      if (args.active !== undefined && args.active < args.pairs) {
        nd.setActivePairs(args.active);
        e.active = args.active;
      }
      this.#entries.set(e.name, e);
      return e;
    } catch (err) {
      undo();
      throw err;
    }
  }

  create(a: CreateArgs): Record<string, unknown> {
    const added = this.#add(a, true, a.persist, () =>
      openNetdev({
        name: a.name,
        pairs: a.pairs,
        vhost: a.vhost,
        existing: 'forbid',
        persist: a.persist,
        logger: this.#log,
        ...(a.netns !== undefined ? { netns: a.netns } : {}),
        ...(a.mtu !== undefined ? { mtu: a.mtu } : {}),
        ...(a.mac !== undefined ? { mac: a.mac } : {}),
        ...(a.up !== undefined ? { up: a.up } : {}),
        ...(a.owner !== undefined ? { owner: a.owner } : {}),
        ...(a.group !== undefined ? { group: a.group } : {}),
        ...(a.vnetHdrSize !== undefined ? { vnetHdrSize: a.vnetHdrSize } : {}),
        ...(this.#opts.devicePath ? { devicePath: this.#opts.devicePath } : {}),
        ...(this.#opts.vhostDevicePath ? { vhostDevicePath: this.#opts.vhostDevicePath } : {}),
      }),
    );
    try {
      this.#save(added);
    } catch (err) {
      // Without its state file the daemon could not re-adopt it: undo.
      this.#entries.delete(added.name);
      added.gone = true;
      try {
        added.netdev?.close();
      } catch {
        /* the first error is the one to report */
      }
      try {
        if (a.persist) deleteTap(added.name, this.#netnsOpt(added));
      } catch {
        /* as above */
      }
      throw err;
    }
    return this.show(added.name);
  }

  open(a: OpenArgs): Record<string, unknown> {
    const added = this.#add(a, false, false, () =>
      openNetdev({
        name: a.name,
        pairs: a.pairs,
        vhost: a.vhost,
        existing: 'require',
        logger: this.#log,
        ...(a.netns !== undefined ? { netns: a.netns } : {}),
        ...(this.#opts.devicePath ? { devicePath: this.#opts.devicePath } : {}),
        ...(this.#opts.vhostDevicePath ? { vhostDevicePath: this.#opts.vhostDevicePath } : {}),
      }),
    );
    return this.show(added.name);
  }

  list(): Record<string, unknown> {
    // One rtnetlink dump per namespace, not one lookup per netdev.
    const byNs = new Map<string, Map<string, TapLinkInfo>>();
    const taps = (e: Entry): Map<string, TapLinkInfo> | undefined => {
      const key = e.netns ?? '';
      if (!byNs.has(key)) {
        try {
          byNs.set(key, new Map(listTaps(this.#netnsOpt(e)).map((t) => [t.name, t])));
        } catch {
          return undefined;
        }
      }
      return byNs.get(key);
    };
    return { netdevs: [...this.#entries.values()].filter((e) => !e.gone).map((e) => this.#summary(e, taps(e) ?? new Map())) };
  }

  show(name: string): Record<string, unknown> {
    const e = this.#entry(name);
    const views = this.#pairViews(e);
    return {
      ...this.#summary(e),
      createdAt: e.createdAt,
      pairStates: views?.daemon ?? null,
      kernelPairStates: views?.kernel ?? null,
      kernel: this.#kernel(e),
      vhostUser: this.#servedView(e),
    };
  }

  #servedView(e: Entry): Record<string, unknown> | null {
    const b = e.served?.backend;
    if (!b) return null;
    const c = b.counters();
    const sum = (k: 'txFrames' | 'rxFrames' | 'txDropped' | 'rxDropped'): number => Number(c.reduce((a, p) => a + p[k], 0n));
    return { socket: b.socket, connected: b.connected, connections: b.connections, livePairs: b.pairsState().live, txFrames: sum('txFrames'), rxFrames: sum('rxFrames'), txDropped: sum('txDropped'), rxDropped: sum('rxDropped') };
  }

  setActive(a: SetActiveArgs): Promise<Record<string, unknown>> {
    return this.#serial(a.name, (e) => {
      if (e.lease?.kind === 'qmp' || e.lease?.kind === 'vhost-user') {
        const err = leased(e, 'set the active pairs of');
        err.hint = `the guest controls the active queue pairs of a ${e.lease.kind === 'qmp' ? 'plugged' : 'served'} NIC (\`ethtool -L eth0 combined K\` in the guest)`;
        throw err;
      }
      if (!e.netdev) throw leased(e, 'set the active pairs of');
      if (a.pairs > e.pairs) throw daemonError(ErrorCodes.INVALID_ARG, `${e.name} has ${e.pairs} pairs; cannot make ${a.pairs} active`, undefined, e.name);
      this.#resync(e);
      e.netdev.setActivePairs(a.pairs);
      e.active = a.pairs;
      this.#save(e);
      return this.show(e.name);
    });
  }

  /**
   * Lends the netdev's fds: returns the fds to send (tap queues of every open
   * pair in order, then their vhost-net fds) with the lease already taken.
   * The caller sends them and then calls commit(), or abort() if the send
   * failed (the lease is dropped again).
   */
  acquire(name: string, peer: Peer): Promise<{ result: Record<string, unknown>; fds: number[]; commit: () => void; abort: () => void }> {
    return this.#serial(name, (e) => {
      if (e.lease || !e.netdev) throw leased(e, 'acquire');
      const tapFds = e.netdev.tapFds();
      const vhostFds = e.netdev.vhostFds();
      e.lease = { kind: 'client', pid: peer.pid, uid: peer.uid, since: now(), pending: true };
      const result = { name: e.name, pairs: tapFds.length, tapFds: tapFds.length, vhostFds: vhostFds.length, fdCount: tapFds.length + vhostFds.length, active: e.active };
      return {
        result,
        fds: [...tapFds, ...vhostFds],
        commit: (): void => {
          if (e.lease?.pending) {
            delete e.lease.pending;
            this.#save(e);
          }
        },
        abort: (): void => {
          if (e.lease?.pending) e.lease = undefined;
        },
      };
    });
  }

  release(name: string): Promise<Record<string, unknown>> {
    return this.#serial(name, (e) => {
      if (!e.lease) throw daemonError('EINVAL', `${e.name} is not lent to anyone`, undefined, e.name);
      if (e.lease.kind === 'qmp') throw daemonError('EBUSY', `${e.name} is plugged into QEMU, not lent to a client`, `unplug it: \`mqtap client unplug ${e.name}\``, e.name);
      if (e.lease.kind === 'vhost-user') return this.#stopServingOp(e);
      const was = e.lease;
      e.lease = undefined;
      try {
        this.#reclaim(e);
      } catch (err) {
        e.lease = was;
        throw err;
      }
      this.#save(e);
      return this.show(e.name);
    });
  }

  hotplug(a: HotplugArgs, peer: Peer): Promise<Record<string, unknown>> {
    return this.#serial(a.name, async (e) => {
      if (e.lease || !e.netdev) throw leased(e, 'hot-plug');
      const nd = e.netdev;
      const netdevId = a.netdevId ?? `${a.id}-netdev`;
      e.lease = { kind: 'qmp', qmp: a.qmp, id: a.id, netdevId, since: now(), pid: peer.pid, uid: peer.uid, pending: true };
      const timeoutMs = this.#opts.qmpTimeoutMs ?? 10_000;
      let qmp: QmpClient | undefined;
      try {
        qmp = await QmpClient.connect(a.qmp, { timeoutMs, logger: this.#log });
        if (this.#closed || e.gone) throw daemonError('ERR_SHUTDOWN', 'the daemon is shutting down');
        const r = await hotplugNetdev(qmp, nd, {
          id: a.id,
          netdevId,
          timeoutMs,
          logger: this.#log,
          ...(a.bus !== undefined ? { bus: a.bus } : {}),
          ...(a.addr !== undefined ? { addr: a.addr } : {}),
          ...(a.mac !== undefined ? { mac: a.mac } : {}),
        });
        e.lease = { kind: 'qmp', qmp: a.qmp, id: r.id, netdevId: r.netdevId, since: now(), pid: peer.pid, uid: peer.uid };
        e.active = e.pairs;
        this.#save(e);
        return { ...this.show(e.name), qemu: qmp.qemuVersion, device: r.id, netdevId: r.netdevId };
      } catch (err) {
        e.lease = undefined;
        if (!e.gone && e.netdev === nd) {
          try {
            if (nd.activePairCount() !== e.active) nd.setActivePairs(e.active);
          } catch (undo) {
            this.#log.warn({ ifname: e.name, err: undo }, 'restoring the active pairs after a failed hotplug failed');
          }
        }
        throw err;
      } finally {
        qmp?.close();
      }
    });
  }

  unplug(a: UnplugArgs): Promise<Record<string, unknown>> {
    return this.#serial(a.name, async (e) => {
      const l = e.lease;
      if (!l || l.kind !== 'qmp' || l.pending) throw daemonError('EINVAL', `${e.name} is not plugged into a QEMU`, undefined, e.name);
      const timeoutMs = this.#opts.qmpTimeoutMs ?? 10_000;
      const qmp = await QmpClient.connect(l.qmp, { timeoutMs, logger: this.#log });
      try {
        await unplugNetdev(qmp, { id: l.id, netdevId: l.netdevId, timeoutMs, unplugTimeoutMs: a.timeoutMs ?? this.#opts.unplugTimeoutMs ?? 60_000, logger: this.#log });
      } finally {
        qmp.close();
      }
      e.lease = undefined;
      e.active = e.pairs;
      try {
        this.#reclaim(e);
      } catch (err) {
        this.#log.error({ ifname: e.name, err }, 'taking the queues back after unplug failed');
        this.#save(e);
        throw err;
      }
      this.#save(e);
      return this.show(e.name);
    });
  }

  /**
   * Serves the netdev's tap queues over a vhost-user socket (pair i = tap
   * queue i): a lease of kind 'vhost-user' until stop-vhost-user, release,
   * delete or shutdown.  The socket is 0600 (0660 with the daemon's group),
   * every front-end is checked with SO_PEERCRED (the daemon's own rules).
   * Only root and the daemon's uid may choose the socket path; others get
   * <stateDir>/vhost-user/<name>.sock.
   */
  serveVhostUser(a: ServeVhostUserArgs, peer: Peer): Promise<Record<string, unknown>> {
    return this.#serial(a.name, async (e) => {
      if (e.lease || !e.netdev) throw leased(e, 'serve');
      const daemonUid = typeof process.geteuid === 'function' ? process.geteuid() : 0;
      let socket: string;
      if (a.socket !== undefined) {
        if (peer.uid !== 0 && peer.uid !== daemonUid)
          throw daemonError('EACCES', `uid ${peer.uid} may not choose where the daemon creates a socket`, `leave socket out: the daemon uses ${join(this.#opts.state.dir, 'vhost-user', `${e.name}.sock`)}`, e.name);
        let exists = false;
        try {
          lstatSync(a.socket);
          exists = true;
        } catch {
          /* nothing there: good */
        }
        if (exists) throw daemonError('EEXIST', `${a.socket} already exists`, 'remove it or choose another socket path', e.name);
        socket = a.socket;
      } else {
        const dir = join(this.#opts.state.dir, 'vhost-user');
        mkdirSync(dir, { recursive: true, mode: 0o755 });
        socket = join(dir, `${e.name}.sock`);
      }
      const nd = e.netdev;
      const vnetHdrSize = nd.tap.vnetHdrSize();
      e.lease = { kind: 'vhost-user', socket, since: now(), pid: peer.pid, uid: peer.uid, pending: true };
      let backend: VhostUserBackend;
      try {
        backend = await serveVhostUser({
          socket,
          tap: nd.tap,
          queues: e.pairs,
          logger: this.#log.child({ ifname: e.name, vhostUser: socket }),
          ...(this.#opts.group !== undefined ? { group: this.#opts.group } : {}),
          ...(this.#opts.allowUids?.length ? { allowUids: this.#opts.allowUids } : {}),
          ...(this.#opts.vhostUserDataPlane ? { dataPlane: this.#opts.vhostUserDataPlane } : {}),
        });
      } catch (err) {
        e.lease = undefined;
        throw withContext(err, { ifname: e.name });
      }
      if (this.#closed || e.gone) {
        await backend.close();
        e.lease = undefined;
        throw daemonError('ERR_SHUTDOWN', 'the daemon is shutting down');
      }
      e.served = { backend, vnetHdrSize };
      delete e.lease.pending;
      backend.on('connected', (p: Peer) => this.#log.info({ ifname: e.name, peer: p }, 'vhost-user front-end connected'));
      backend.on('disconnected', (d: { reason?: string }) => this.#log.info({ ifname: e.name, reason: d.reason ?? null }, 'vhost-user front-end disconnected'));
      return { ...this.show(e.name), socket };
    });
  }

  stopVhostUser(name: string): Promise<Record<string, unknown>> {
    return this.#serial(name, (e) => {
      if (e.lease?.kind !== 'vhost-user') throw daemonError('EINVAL', `${e.name} is not served over vhost-user`, `serve it with \`mqtap client serve-vhost-user ${e.name}\``, e.name);
      return this.#stopServingOp(e);
    });
  }

  #stopServingOp(e: Entry): Record<string, unknown> {
    const socket = e.served?.backend.socket;
    this.#stopServing(e);
    this.#save(e);
    return { ...this.show(e.name), stopped: socket ?? null };
  }

  /**
   * Stops serving (rings stopped, guest memory unmapped, socket removed) and
   * takes the tap queues back: the daemon's active pairs and header size
   * (the guest changed both).  Synchronous: backend.close() does its work
   * before its first await.
   */
  #stopServing(e: Entry): void {
    const s = e.served;
    if (!s) return;
    e.served = undefined;
    void s.backend.close();
    e.lease = undefined;
    const nd = e.netdev;
    if (!nd || e.gone || this.#closed) return;
    try {
      if (nd.tap.vnetHdrSize() !== s.vnetHdrSize) nd.tap.setVnetHdrSize(s.vnetHdrSize as VnetHdrSize);
      nd.tap.setOffloads({});
      nd.setActivePairs(e.active);
    } catch (err) {
      this.#log.warn({ ifname: e.name, err }, 'restoring the tap after vhost-user failed');
    }
  }

  delete(a: DeleteArgs): Promise<Record<string, unknown>> {
    return this.#serial(a.name, (e) => {
      if (e.lease && !a.force) {
        const err = leased(e, 'delete');
        err.hint = `${err.hint ?? ''}, or pass force: true`;
        throw err;
      }
      const lease = this.#leaseView(e);
      this.#stopServing(e);
      e.gone = true;
      this.#entries.delete(e.name);
      let first: unknown;
      try {
        e.netdev?.close();
      } catch (err) {
        first = err;
      }
      e.netdev = undefined;
      let deviceDeleted = false;
      if (e.created) {
        try {
          if (getTap(e.name, this.#netnsOpt(e))) {
            deleteTap(e.name, this.#netnsOpt(e));
            deviceDeleted = true;
          }
        } catch (err) {
          first ??= err;
        }
      }
      try {
        this.#opts.state.remove(e.name);
      } catch (err) {
        first ??= err;
      }
      if (first) throw first;
      return { name: e.name, deleted: true, deviceDeleted, created: e.created, leaseDropped: lease };
    });
  }
}
