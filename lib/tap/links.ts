/**
 * The kernel's own view of links, read over rtnetlink (RTM_GETLINK with the
 * tun driver's IFLA_TUN_* attributes), never by parsing `ip` output.
 */
import { MqtapError } from '../sys/errors';
import { K, native, type LinkStats, type RawLink } from '../sys/native';

export type { LinkStats };
import { withNetns } from '../sys/netns';
import { validateIfName } from '../sys/validate';

export type OperState = 'unknown' | 'notpresent' | 'down' | 'lowerlayerdown' | 'testing' | 'dormant' | 'up';

/** What the tun driver reports about a tun/tap device. */
export interface TunInfo {
  /** 'tap' (Ethernet, IFF_TAP) or 'tun' (IP, IFF_TUN). */
  type: 'tap' | 'tun';
  /** Packet information header (IFF_NO_PI unset). */
  pi: boolean;
  vnetHdr: boolean;
  multiQueue: boolean;
  persist: boolean;
  /** uid allowed to attach without CAP_NET_ADMIN, or null. */
  owner: number | null;
  /** gid allowed to attach without CAP_NET_ADMIN, or null. */
  group: number | null;
  /** Enabled (attached) queues. */
  numQueues: number;
  /** Disabled (detached) queues whose fds are still open. */
  numDisabledQueues: number;
}

export interface LinkInfo {
  name: string;
  index: number;
  /** rtnl_link_ops kind: 'tun' for tun/tap devices, 'veth', 'bridge', ...; null for devices without one. */
  kind: string | null;
  mtu: number;
  /** tx_queue_len (IFLA_TXQLEN): for a tap, the frames each queue's ring holds before the kernel drops (tx_dropped). */
  txQueueLen: number;
  address: string | null;
  /** IFF_UP is set. */
  up: boolean;
  operstate: OperState;
  /** Queues the netdev was allocated with (256 for multi-queue taps). */
  numTxQueues: number;
  numRxQueues: number;
  /** Present for kind 'tun'. */
  tun?: TunInfo;
  /** Device counters (IFLA_STATS64). */
  stats: LinkStats | null;
}

/** A tun/tap link. */
export type TapLinkInfo = LinkInfo & { kind: 'tun'; tun: TunInfo };

const OPERSTATES: Array<[number, OperState]> = [
  [K.IF_OPER_UNKNOWN, 'unknown'],
  [K.IF_OPER_NOTPRESENT, 'notpresent'],
  [K.IF_OPER_DOWN, 'down'],
  [K.IF_OPER_LOWERLAYERDOWN, 'lowerlayerdown'],
  [K.IF_OPER_TESTING, 'testing'],
  [K.IF_OPER_DORMANT, 'dormant'],
  [K.IF_OPER_UP, 'up'],
];

function toLinkInfo(raw: RawLink): LinkInfo {
  const info: LinkInfo = {
    name: raw.name ?? '',
    index: raw.index,
    kind: raw.kind ?? null,
    mtu: raw.mtu ?? 0,
    txQueueLen: raw.txqlen ?? 0,
    address: raw.address ?? null,
    up: (raw.flags & K.IFF_UP) !== 0,
    operstate: OPERSTATES.find(([v]) => v === raw.operstate)?.[1] ?? 'unknown',
    numTxQueues: raw.numTxQueues ?? 1,
    numRxQueues: raw.numRxQueues ?? 1,
    stats: raw.stats ?? null,
  };
  if (raw.tun) {
    const t = raw.tun;
    info.tun = {
      type: t.type === K.IFF_TUN ? 'tun' : 'tap',
      pi: t.pi ?? false,
      vnetHdr: t.vnetHdr ?? false,
      multiQueue: t.multiQueue ?? false,
      persist: t.persist ?? false,
      owner: t.owner ?? null,
      group: t.group ?? null,
      numQueues: t.numQueues ?? 0,
      numDisabledQueues: t.numDisabledQueues ?? 0,
    };
  }
  return info;
}

export interface LookupOptions {
  /** Network namespace (name under /run/netns, or a path) to look in. */
  netns?: string;
}

/** One link by name, or undefined when there is none (the kernel's ENODEV; any other error is thrown). */
export function getLink(name: string, opts: LookupOptions = {}): LinkInfo | undefined {
  validateIfName(name);
  let raw: RawLink[];
  try {
    raw = withNetns(opts.netns, () => native.rtnlGetLinks(name));
  } catch (err) {
    if (err instanceof MqtapError && err.op === 'RTM_GETLINK' && err.code === 'ENODEV') return undefined;
    throw err;
  }
  return raw[0] ? toLinkInfo(raw[0]) : undefined;
}

/** Every link in the namespace. */
export function listLinks(opts: LookupOptions = {}): LinkInfo[] {
  return withNetns(opts.netns, () => native.rtnlGetLinks()).map(toLinkInfo);
}

export function isTapLink(link: LinkInfo | undefined): link is TapLinkInfo {
  return link?.kind === 'tun' && link.tun !== undefined;
}

/** Every tun/tap device in the namespace (both types; filter on `tun.type` for taps only). */
export function listTaps(opts: LookupOptions = {}): TapLinkInfo[] {
  return listLinks(opts).filter(isTapLink);
}

/** One tun/tap device by name, or undefined (also when the name is some other kind of device). */
export function getTap(name: string, opts: LookupOptions = {}): TapLinkInfo | undefined {
  const link = getLink(name, opts);
  return isTapLink(link) ? link : undefined;
}
