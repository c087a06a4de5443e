/**
 * lib/sys/ — the system layer, at the bottom: the addon's typed face (this file),
 * the one error class, validation, namespaces, child processes, fd passing,
 * logging.  It imports nothing else from lib/.
 *
 * The typed face of the native addon (native/*.cc).  Nothing outside lib/
 * imports the addon directly; every function here is one syscall (or one
 * rtnetlink exchange) with no policy.  See docs/architecture.md.
 */
import bindings from 'bindings';
import { resolve } from 'node:path';
import { MqtapError, _setErrnoDescriber, type NativeErrorProps } from './errors';

/** Kernel constants read from the kernel headers when the addon was built. */
export interface NativeConstants {
  readonly IFF_TUN: number;
  readonly IFF_TAP: number;
  readonly IFF_NAPI: number;
  readonly IFF_NAPI_FRAGS: number;
  readonly IFF_NO_CARRIER: number;
  readonly IFF_NO_PI: number;
  readonly IFF_ONE_QUEUE: number;
  readonly IFF_VNET_HDR: number;
  readonly IFF_TUN_EXCL: number;
  readonly IFF_MULTI_QUEUE: number;
  readonly IFF_ATTACH_QUEUE: number;
  readonly IFF_DETACH_QUEUE: number;
  readonly IFF_PERSIST: number;
  readonly IFF_NOFILTER: number;
  readonly TUN_F_CSUM: number;
  readonly TUN_F_TSO4: number;
  readonly TUN_F_TSO6: number;
  readonly TUN_F_TSO_ECN: number;
  readonly TUN_F_UFO: number;
  /** Absent when the headers predate Linux 6.2. */
  /** Always present: the UAPI values are supplied when the build's headers predate Linux 6.2. */
  readonly TUN_F_USO4: number;
  readonly TUN_F_USO6: number;
  readonly IFNAMSIZ: number;
  readonly IFF_UP: number;
  readonly IFF_RUNNING: number;
  readonly ARPHRD_ETHER: number;
  readonly IF_OPER_UNKNOWN: number;
  readonly IF_OPER_NOTPRESENT: number;
  readonly IF_OPER_DOWN: number;
  readonly IF_OPER_LOWERLAYERDOWN: number;
  readonly IF_OPER_TESTING: number;
  readonly IF_OPER_DORMANT: number;
  readonly IF_OPER_UP: number;
  /** tcm_parent of a root qdisc / the ingress (clsact) pseudo-qdisc (<linux/pkt_sched.h>). */
  readonly TC_H_ROOT: number;
  readonly TC_H_INGRESS: number;
  readonly CLONE_NEWNET: number;
  readonly PAGE_SIZE: number;
  // virtio / vhost-net (native/virtio_consts.c)
  readonly VHOST_FILE_UNBIND: number;
  readonly VIRTIO_F_NOTIFY_ON_EMPTY: number;
  readonly VIRTIO_F_ANY_LAYOUT: number;
  readonly VIRTIO_F_VERSION_1: number;
  readonly VIRTIO_F_ACCESS_PLATFORM: number;
  readonly VIRTIO_F_RING_PACKED: number;
  readonly VIRTIO_F_IN_ORDER: number;
  readonly VIRTIO_RING_F_INDIRECT_DESC: number;
  readonly VIRTIO_RING_F_EVENT_IDX: number;
  readonly VHOST_F_LOG_ALL: number;
  readonly VHOST_NET_F_VIRTIO_NET_HDR: number;
  readonly VIRTIO_NET_F_CSUM: number;
  readonly VIRTIO_NET_F_GUEST_CSUM: number;
  readonly VIRTIO_NET_F_MAC: number;
  readonly VIRTIO_NET_F_GUEST_TSO4: number;
  readonly VIRTIO_NET_F_GUEST_TSO6: number;
  readonly VIRTIO_NET_F_GUEST_ECN: number;
  readonly VIRTIO_NET_F_GUEST_UFO: number;
  readonly VIRTIO_NET_F_HOST_TSO4: number;
  readonly VIRTIO_NET_F_HOST_TSO6: number;
  readonly VIRTIO_NET_F_HOST_ECN: number;
  readonly VIRTIO_NET_F_HOST_UFO: number;
  readonly VIRTIO_NET_F_MRG_RXBUF: number;
  readonly VIRTIO_NET_F_STATUS: number;
  readonly VIRTIO_NET_F_CTRL_VQ: number;
  readonly VIRTIO_NET_F_MQ: number;
  readonly VIRTIO_NET_HDR_F_NEEDS_CSUM: number;
  readonly VIRTIO_NET_HDR_F_DATA_VALID: number;
  readonly VIRTIO_NET_HDR_GSO_NONE: number;
  readonly VIRTIO_NET_HDR_GSO_TCPV4: number;
  readonly VIRTIO_NET_HDR_GSO_UDP: number;
  readonly VIRTIO_NET_HDR_GSO_TCPV6: number;
  readonly VIRTIO_NET_HDR_GSO_ECN: number;
  readonly VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN: number;
  readonly VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX: number;
  readonly VRING_DESC_F_NEXT: number;
  readonly VRING_DESC_F_WRITE: number;
  readonly VRING_DESC_F_INDIRECT: number;
  readonly VRING_USED_F_NO_NOTIFY: number;
  readonly VRING_AVAIL_F_NO_INTERRUPT: number;
  readonly SIZEOF_VIRTIO_NET_HDR: number;
  readonly SIZEOF_VIRTIO_NET_HDR_MRG_RXBUF: number;
  readonly SIZEOF_VRING_DESC: number;
  readonly SIZEOF_VRING_USED_ELEM: number;
  readonly FD_CLOEXEC: number;
  readonly O_NONBLOCK: number;
  /** flock(2) operations (<sys/file.h>). */
  readonly LOCK_SH: number;
  readonly LOCK_EX: number;
  readonly LOCK_NB: number;
  readonly LOCK_UN: number;
}

/** IFLA_TUN_* attributes as the kernel reports them (raw values). */
export interface RawTunInfo {
  owner?: number;
  group?: number;
  type?: number;
  pi?: boolean;
  vnetHdr?: boolean;
  persist?: boolean;
  multiQueue?: boolean;
  numQueues?: number;
  numDisabledQueues?: number;
}

/** One RTM_NEWLINK message, decoded. */
export interface RawLink {
  index: number;
  flags: number;
  type: number;
  name?: string;
  mtu?: number;
  txqlen?: number;
  operstate?: number;
  numTxQueues?: number;
  numRxQueues?: number;
  address?: string;
  kind?: string;
  tun?: RawTunInfo;
  stats?: LinkStats;
}

/** One RTM_NEWQDISC message, decoded (native/rtnl.cc rtnlGetQdiscs). */
export interface RawQdisc {
  ifindex: number;
  /** tcm_handle: major in the upper 16 bits (0 for default qdiscs). */
  handle: number;
  /** tcm_parent: TC_H_ROOT for the root qdisc, major:minor of the parent class otherwise (`:1` = 0x00000001). */
  parent: number;
  /** TCA_KIND ('mq', 'pfifo_fast', 'fq_codel', 'noqueue', ...); absent if the kernel sent none. */
  kind?: string;
  /** TCA_STATS2 basic counters (TCA_STATS_PKT64 when present): what the qdisc handed on. */
  bytes: number;
  packets: number;
  /** TCA_STATS_QUEUE. */
  drops: number;
  overlimits: number;
  requeues: number;
  qlen: number;
  backlog: number;
}

/** IFLA_STATS64 counters, from the device's point of view (rx = frames the kernel received from the tap's queues). */
export interface LinkStats {
  rxPackets: number;
  txPackets: number;
  rxBytes: number;
  txBytes: number;
  rxErrors: number;
  txErrors: number;
  rxDropped: number;
  txDropped: number;
}

export interface NativeBinding {
  readonly constants: NativeConstants;
  setErrorClass(ctor: new (props: NativeErrorProps) => Error): void;
  /** [name, text] from strerrorname_np/strerror, or null for an unknown errno. */
  errnoDescribe(errno: number): [string, string] | null;
  // /dev/net/tun
  tunOpen(path?: string): number;
  tunSetIff(fd: number, name: string, flags: number): string;
  tunGetIff(fd: number): { name: string; flags: number };
  tunSetQueue(fd: number, flags: number): void;
  tunGetFeatures(fd: number): number;
  tunSetPersist(fd: number, on: boolean): void;
  tunSetOwner(fd: number, uid: number): void;
  tunSetGroup(fd: number, gid: number): void;
  tunSetVnetHdrSz(fd: number, size: number): void;
  tunGetVnetHdrSz(fd: number): number;
  tunSetOffload(fd: number, flags: number): void;
  tunSetCarrier(fd: number, on: boolean): void;
  // link settings (SIOCxIF*)
  ifSetMtu(name: string, mtu: number): void;
  ifSetMac(name: string, mac: Buffer): void;
  ifGetFlags(name: string): number;
  ifSetFlags(name: string, flags: number): void;
  ifNameToIndex(name: string): number;
  // rtnetlink
  /** Every link, or the one named (a missing one: MqtapError op RTM_GETLINK, code ENODEV, detail = the name). */
  rtnlGetLinks(name?: string): RawLink[];
  rtnlDelLink(index: number): void;
  /** RTM_NEWLINK with IFLA_TXQLEN: the device's tx_queue_len (for a tap, each queue's ring length in frames). */
  rtnlSetTxQueueLen(index: number, len: number): void;
  /** RTM_GETQDISC dump: every qdisc of the device with this ifindex, with its counters. */
  rtnlGetQdiscs(ifindex: number): RawQdisc[];
  // process
  close(fd: number): void;
  setNonBlocking(fd: number, on: boolean): void;
  getFdFlags(fd: number): number;
  getFlFlags(fd: number): number;
  setCloexec(fd: number, on: boolean): void;
  cloexecFrom(first: number): void;
  openNs(path: string): number;
  setns(fd: number, nstype: number): void;
  unshare(flags: number): void;
  gettid(): number;
  /** sched_setaffinity(0, cpus): the CPUs the calling thread (not the process) may run on. */
  schedSetAffinity(cpus: readonly number[]): void;
  /** sched_getaffinity(0): the CPUs the calling thread may run on. */
  schedGetAffinity(): number[];
  /** flock(fd, operation): LOCK_SH/LOCK_EX (| LOCK_NB) or LOCK_UN.  A lock held elsewhere with LOCK_NB: MqtapError op 'FLOCK', code EAGAIN (EWOULDBLOCK). */
  flock(fd: number, operation: number): void;
  // vhost-net
  vhostOpen(path?: string): number;
  vhostSetOwner(fd: number): void;
  vhostResetOwner(fd: number): void;
  vhostGetFeatures(fd: number): bigint;
  vhostSetFeatures(fd: number, features: bigint): void;
  vhostGetBackendFeatures(fd: number): bigint;
  vhostSetBackendFeatures(fd: number, features: bigint): void;
  vhostSetMemTable(fd: number, regions: VhostMemRegion[]): void;
  vhostSetVringNum(fd: number, index: number, num: number): void;
  vhostSetVringBase(fd: number, index: number, num: number): void;
  vhostGetVringBase(fd: number, index: number): number;
  vhostSetVringAddr(fd: number, index: number, addr: VhostVringAddr): void;
  vhostSetVringKick(fd: number, index: number, eventfd: number): void;
  vhostSetVringCall(fd: number, index: number, eventfd: number): void;
  vhostSetVringErr(fd: number, index: number, eventfd: number): void;
  vhostNetSetBackend(fd: number, index: number, tapFd: number): void;
  // memory and eventfds
  allocPages(bytes: number): ArrayBuffer;
  /** The address of allocPages memory (the buffer or a view into it); any other memory is a TypeError. */
  addressOf(buf: ArrayBuffer | ArrayBufferView): bigint;
  eventfdOpen(initval?: number): number;
  eventfdRead(fd: number): bigint | null;
  eventfdWrite(fd: number, value?: bigint): void;
  // ---- BEGIN SCM section (native/scm.cc; owner: daemon/QMP, see lib/sys/scm.ts) ----
  /** socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0). */
  unixSocket(type: number): number;
  /** socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK): [a, b]. */
  unixSocketPair(type: number): [number, number];
  unixBind(fd: number, path: string): void;
  unixListen(fd: number, backlog: number): void;
  /** accept4(SOCK_CLOEXEC | SOCK_NONBLOCK): the new fd, or -1 when none is pending. */
  unixAccept(fd: number): number;
  /** true when connected, false when the listener's backlog is full (try again). */
  unixConnect(fd: number, path: string): boolean;
  /** sendmsg with fds as SCM_RIGHTS: bytes sent, or -1 when the socket buffer is full (nothing sent). */
  scmSend(fd: number, data: Buffer, fds?: readonly number[], offset?: number, length?: number): number;
  /** recvmsg with up to maxFds fds (MSG_CMSG_CLOEXEC); null when nothing is queued; EMSGSIZE (fds closed) on MSG_CTRUNC/MSG_TRUNC. */
  scmRecv(fd: number, buf: Buffer, maxFds: number): { bytes: number; fds: number[] } | null;
  /** getsockopt(SO_PEERCRED). */
  peerCred(fd: number): { pid: number; uid: number; gid: number };
  /** getsockopt(SO_ERROR). */
  sockError(fd: number): number;
  /** libuv uv_poll_t on an fd; callback(status, events) with UV_READABLE/UV_WRITABLE/UV_DISCONNECT bits. */
  FdPoll: new (fd: number, callback: (status: number, events: number) => void) => { start(events: number): void; stop(): void; close(): void; ref(): void; unref(): void };
  // ---- END SCM section ----
  // ---- BEGIN DATA PATH section (native/io.cc, native/bpf.cc; owner: data path, see lib/datapath/io.ts, lib/datapath/bpf.ts) ----
  /** Batched frame I/O on one queue fd (never closes it); see native/io.cc. */
  QueueIo: new (
    fd: number,
    /** rxDropErrnos/txDropErrnos: errnos that drop one frame (counted) instead of stopping the call: lib/ decides (lib/datapath/io.ts). */
    options: { rx: 'poll' | 'uring' | 'uring-mshot'; tx: 'poll' | 'uring'; batch: number; slotSize: number; hdrLen: number; rxDropErrnos: number[]; txDropErrnos: number[] },
    onPoll: (status: number, events: number) => void,
  ) => {
    /** `batch` slots of `slotSize` bytes each. */
    readonly slab: ArrayBuffer;
    /** Float64 counters[COUNTERS] | Int32 state[STATES] | Uint32 rxDesc[2 * batch]. */
    readonly control: ArrayBuffer;
    /** The engines in use (io_uring_enter failing is reported in state word 6, RING_ERRNO; lib/ then calls stopUring()). */
    readonly engine: { rx: 'poll' | 'uring' | 'uring-mshot'; tx: 'poll' | 'uring' };
    /** False while the uring engine writes unordered batches (see TxUring in native/io.cc). */
    readonly ordered: boolean;
    rxRead(): number;
    txWrite(buffers: ArrayBuffer[], desc: Uint32Array, start: number, count: number, withHdr: boolean): number;
    pollSet(events: number): void;
    /** No io_uring from now on: plain read/write syscalls, in order. */
    stopUring(): void;
    /** uv_ref / uv_unref of the poll handle. */
    pollRef(on: boolean): void;
    close(): void;
  };
  /**
   * What the running kernel's io_uring offers (native/uring.h ProbeUring): io_uring_setup's errno
   * (0: it works), SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG, IORING_REGISTER_PROBE's opcodes, and
   * whether a provided-buffer ring can be registered (errno, 0, or -1: not tried), IORING_FEAT_EXT_ARG.
   */
  ioUringProbe(): {
    setupErrno: number;
    deferTaskrun: boolean;
    /** errno of the SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG setup (0: accepted). */
    deferErrno: number;
    /** IORING_FEAT_EXT_ARG (Linux 5.11+): the engines' bounded waits need it. */
    extArg: boolean;
    probeErrno: number;
    lastOp: number;
    ops: { read: boolean; write: boolean; writev: boolean; readMultishot: boolean };
    pbufRingErrno: number;
  };
  /** TUNGETSNDBUF: the per-device send buffer a queue's writes are charged against (INT_MAX: never EAGAIN). */
  tunGetSndbuf(fd: number): number;
  /** TUNSETSNDBUF (device-wide). */
  tunSetSndbuf(fd: number, bytes: number): void;
  readonly ioConstants: {
    readonly UV_READABLE: number;
    readonly UV_WRITABLE: number;
    readonly UV_DISCONNECT: number;
    readonly EAGAIN: number;
    readonly EMSGSIZE: number;
    readonly EINVAL: number;
    readonly EFAULT: number;
    readonly ENOMEM: number;
    readonly ENOBUFS: number;
    readonly ENOSYS: number;
    readonly EPERM: number;
    readonly EMFILE: number;
    readonly ENFILE: number;
    readonly COUNTERS: number;
    readonly STATES: number;
    readonly MAX_BATCH: number;
    readonly INT_MAX: number;
  };
  /** bpf(BPF_PROG_LOAD): a new program fd (O_CLOEXEC).  With logBuf, the verifier's log is written there (NUL-terminated). */
  bpfProgLoad(progType: number, insns: Uint8Array, license: string, name: string, logBuf: Uint8Array | null, logLevel: number, expectedAttachType?: number): number;
  /** bpf(BPF_MAP_CREATE): a new map fd (O_CLOEXEC). */
  bpfMapCreate(mapType: number, keySize: number, valueSize: number, maxEntries: number, mapFlags: number, name: string): number;
  /** bpf(BPF_MAP_LOOKUP_ELEM) into `value` (per-CPU maps: round_up(value_size, 8) bytes per possible CPU); false when the key is absent. */
  /** false: no such key.  key/value smaller than the map's key size / value size (per possible CPU for per-CPU maps): TypeError. */
  bpfMapLookupElem(mapFd: number, key: Uint8Array, value: Uint8Array): boolean;
  /** bpf(BPF_LINK_CREATE) on a device (tcx): a new link fd (O_CLOEXEC); closing it detaches the program. */
  bpfLinkCreate(progFd: number, targetIfindex: number, attachType: number, flags: number): number;
  /** bpf(BPF_PROG_QUERY) of a device's attach point: the kernel's count and up to maxIds program ids, in order. */
  bpfProgQuery(targetIfindex: number, attachType: number, maxIds: number): { count: number; progIds: number[] };
  /** bpf(BPF_PROG_TEST_RUN) on one packet. */
  bpfProgTestRun(progFd: number, data: Uint8Array, repeat?: number): { retval: number; duration: number };
  /** TUNSETSTEERINGEBPF; -1 detaches. */
  tunSetSteeringEbpf(fd: number, progFd: number): void;
  readonly bpfConstants: {
    readonly BPF_PROG_TYPE_SOCKET_FILTER: number;
    readonly BPF_PROG_TYPE_SCHED_CLS: number;
    readonly BPF_MAP_TYPE_ARRAY: number;
    readonly BPF_MAP_TYPE_PERCPU_ARRAY: number;
    readonly BPF_FUNC_get_prandom_u32: number;
    readonly BPF_FUNC_get_smp_processor_id: number;
    readonly BPF_FUNC_map_lookup_elem: number;
    readonly BPF_PSEUDO_MAP_FD: number;
    readonly BPF_MAXINSNS: number;
    /** tcx attach points (Linux 6.6+; supplied by the addon when its build headers are older). */
    readonly BPF_TCX_INGRESS: number;
    readonly BPF_TCX_EGRESS: number;
    readonly BPF_F_BEFORE: number;
    /** tcx return code "go on with the next program" (== TC_ACT_UNSPEC, -1). */
    readonly TCX_NEXT: number;
    readonly SIZEOF_BPF_INSN: number;
    /** offsetof(struct __sk_buff, len / queue_mapping). */
    readonly SKB_LEN: number;
    readonly SKB_QUEUE_MAPPING: number;
  };
  // ---- END DATA PATH section ----
  // ---- BEGIN VHOST-USER section (native/vhost_user.cc; owner: vhost-user data plane, see lib/vhost-user/dataplane.ts) ----
  /** The per-connection vhost-user data plane: one worker thread per queue pair (see native/vhost_user.cc). */
  /** tapEngine: 'uring' (the default: io_uring where it can be set up, else writev; see counters().tapEngine) or 'writev'. */
  VhostUserDataPlane: new (pairs: number, tapEngine?: 'uring' | 'writev') => NativeVhostUserDataPlane;
  /** memfd_create(name, MFD_CLOEXEC). */
  memfdCreate(name: string): number;
  ftruncate(fd: number, bytes: number): void;
  /** fstat(fd).st_size. */
  fdSize(fd: number): bigint;
  /** mmap(MAP_SHARED, read/write) of fd at a page-aligned offset, as an ArrayBuffer that unmaps it when collected. */
  mmapShared(fd: number, bytes: number, offset?: number): ArrayBuffer;
  // ---- END VHOST-USER section ----
}

/** native/vhost_user.cc's class; lib/vhost-user/dataplane.ts is its typed, validated face. */
export interface NativeVhostUserDataPlane {
  addRegion(guestPhysAddr: bigint, size: bigint, userAddr: bigint, mmapOffset: bigint, fd: number): void;
  removeRegion(guestPhysAddr: bigint): void;
  setTap(pair: number, fd: number): void;
  startRing(
    pair: number, tx: boolean, num: number, descAddr: bigint, availAddr: bigint, usedAddr: bigint, base: number,
    kickFd: number, callFd: number, errFd: number, eventIdx: boolean, mrgRxbuf: boolean, indirectDesc: boolean, vnetHdrSize: number,
  ): void;
  stopRing(pair: number, tx: boolean): { state: 'stopped' | 'failed'; reason?: string; lastAvailIdx: number };
  ringStatus(pair: number, tx: boolean): { state: 'stopped' | 'running' | 'failed'; reason?: string; lastAvailIdx: number };
  counters(pair: number): {
    txFrames: bigint; txBytes: bigint; txDropped: bigint; rxFrames: bigint; rxBytes: bigint; rxDropped: bigint; kicks: bigint; calls: bigint;
    txSyscalls: bigint; rxSyscalls: bigint; wakeups: bigint; tapEngine: 'uring' | 'writev' | 'none'; tapEngineErrno: number; tapEngineSyscall: '' | 'io_uring_setup' | 'io_uring_enter';
  };
  readonly notifyFd: number;
  close(): void;
}

export interface VhostMemRegion {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
}

export interface VhostVringAddr {
  descUserAddr: bigint;
  availUserAddr: bigint;
  usedUserAddr: bigint;
  logGuestAddr?: bigint;
  flags?: number;
}

function load(): NativeBinding {
  let binding: NativeBinding;
  try {
    // MQTAP_ADDON names another build of the same addon (the sanitizer build
    // that `npm run test:asan` runs the suites against).
    const override = process.env.MQTAP_ADDON;
    binding = (override ? require(resolve(override)) : bindings('mqtap')) as NativeBinding;
  } catch (cause) {
    throw new MqtapError({
      op: 'LOAD_ADDON',
      code: 'EADDON',
      // bindings' own message lists every path it tried: the first line is enough here
      message: `cannot load the mqtap native addon: ${String((cause as Error).message).split('\n')[0]!.replace(/\s*Tried:$/, '')}`,
      hint: 'build it with `npm install` (or `npm run build:native`); it needs python3, make and a C++ compiler',
      cause,
    });
  }
  binding.setErrorClass(MqtapError);
  _setErrnoDescriber((n) => binding.errnoDescribe(n));
  return binding;
}

/** The loaded addon.  Loaded once, on first import of lib/. */
export const native: NativeBinding = load();
export const K: NativeConstants = native.constants;
