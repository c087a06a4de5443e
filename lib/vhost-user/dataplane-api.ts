/**
 * lib/vhost-user/ — mqtap as the userspace vhost backend (vhost-user) QEMU
 * talks to over a UNIX socket: the protocol and the connection's state
 * machine in TypeScript, the per-pair data plane in C++ (native/vhost_user.cc).
 *
 * This file is the contract between the two halves: what the connection
 * (protocol side) asks of the data plane.  The data plane has no policy: it
 * maps what it is told to map, runs the rings it is told to run, and stops a
 * ring on its own only when the guest's ring is malformed (and then says why).
 *
 * Address spaces (docs/interop/vhost-user.rst): descriptor addresses inside the
 * rings are guest-physical (translated through the regions' guestPhysAddr);
 * the ring addresses of SET_VRING_ADDR are in QEMU's virtual address space
 * (translated through the regions' userAddr).
 */

/** One guest memory region, as SET_MEM_TABLE / ADD_MEM_REG describe it. */
export interface MemRegion {
  guestPhysAddr: bigint;
  size: bigint;
  /** QEMU's virtual address of the region's start. */
  userAddr: bigint;
  /** Offset into `fd` where the region starts. */
  mmapOffset: bigint;
  /** The region's fd (memfd).  addRegion maps it; the caller keeps ownership and may close it afterwards. */
  fd: number;
}

/** A split virtqueue as SET_VRING_NUM / ADDR / BASE / KICK / CALL / ERR set it up. */
export interface RingConfig {
  /** Ring size: a power of two, 1..32768. */
  num: number;
  /** QEMU virtual addresses (userAddr space) of the descriptor table, avail ring and used ring. */
  descAddr: bigint;
  availAddr: bigint;
  usedAddr: bigint;
  /** Where to start: the next avail index to process (SET_VRING_BASE). */
  base: number;
  /** eventfds; the caller owns them and keeps them open until stopRing() returned.  -1: none (polling not supported: kick is required). */
  kickFd: number;
  /** -1: never signal. */
  callFd: number;
  /** -1: none.  Signalled when the data plane stops this ring because the guest's ring is malformed. */
  errFd: number;
}

/** Negotiated features the data plane needs (everything else is the connection's business). */
export interface DataPlaneFeatures {
  /** VIRTIO_RING_F_EVENT_IDX: used_event / avail_event instead of the flags. */
  eventIdx: boolean;
  /** VIRTIO_NET_F_MRG_RXBUF: an RX frame may span several chains (num_buffers). */
  mrgRxbuf: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC. */
  indirectDesc: boolean;
  /** Bytes of virtio-net header at the start of every chain: 12 with VERSION_1 or MRG_RXBUF (the tap's vnet header size must match). */
  vnetHdrSize: 10 | 12;
}

/** Virtqueue 2*pair is RX (device -> guest: frames read from the tap), 2*pair+1 is TX (guest -> tap). */
export type RingDir = 'rx' | 'tx';

export interface RingStatus {
  state: 'stopped' | 'running' | 'failed';
  /** Why a 'failed' ring stopped (descriptor out of range, loop, index jump ...). */
  reason?: string;
  /** The next avail index the ring would process: what GET_VRING_BASE replies. */
  lastAvailIdx: number;
}

/**
 * How a pair's worker does its tap I/O.  'uring': an io_uring per pair used
 * as a batching syscall (a batch of TX frames is one io_uring_enter of
 * WRITEV SQEs, a batch of RX frames one of READ SQEs); 'writev': one
 * writev(2) per TX frame and one read(2) per RX frame.
 */
export type TapEngine = 'uring' | 'writev';

/** What the caller asks for: 'auto' (io_uring where it can be set up, else writev), or one of them ('uring' fails startRing where io_uring cannot be set up). */
export type TapEngineChoice = 'auto' | TapEngine;

export interface DataPlaneOptions {
  /** Default 'auto'. */
  tapEngine?: TapEngineChoice;
}

export interface PairCounters {
  /** guest -> tap */
  txFrames: bigint;
  txBytes: bigint;
  txDropped: bigint;
  /** tap -> guest */
  rxFrames: bigint;
  rxBytes: bigint;
  /** Frames read from the tap with no guest buffer to put them in (dropped). */
  rxDropped: bigint;
  /** Kick wake-ups and call signals. */
  kicks: bigint;
  calls: bigint;
  /** Tap syscalls of the worker, each one counted: writev(2) or io_uring_enter(2) for TX, read(2) or io_uring_enter(2) for RX. */
  txSyscalls: bigint;
  rxSyscalls: bigint;
  /** Times the worker woke up with a kick or tap event (commands from JavaScript alone are not counted). */
  wakeups: bigint;
  /** The tap engine the pair's worker uses now ('none': no tap, or no ring started yet). */
  tapEngine: TapEngine | 'none';
  /** Why it is not 'uring' (io_uring_setup/register's errno, or io_uring_enter's when it failed mid-run); 0 when writev was asked for. */
  tapEngineErrno: number;
  /**
   * The syscall tapEngineErrno comes from ('' when it is 0): 'io_uring_setup' (the ring could not be set
   * up: setup, mmap or register), 'io_uring_enter' (it failed mid-run: the pair went on with writev/read
   * and the data plane signalled notifyFd).
   */
  tapEngineSyscall: '' | 'io_uring_setup' | 'io_uring_enter';
}

/**
 * The per-connection data plane: one worker thread per queue pair, started
 * when its first ring starts.  All methods are synchronous: when stopRing()
 * returns, the worker no longer touches that ring's memory or eventfds.
 */
export interface DataPlane {
  /** Maps a region (MAP_SHARED).  Throws MqtapError (ERR_INVALID_ARG or the mmap errno) for a zero-size, overlapping or out-of-fd region. */
  addRegion(r: MemRegion): void;
  /** Unmaps the region starting at guestPhysAddr.  Throws if a running ring uses it. */
  removeRegion(guestPhysAddr: bigint): void;
  /** The tap queue fd of a pair (-1: none; frames the guest sends are dropped and counted). */
  setTap(pair: number, fd: number): void;
  startRing(pair: number, dir: RingDir, cfg: RingConfig, features: DataPlaneFeatures): void;
  /** Stops the ring (waits for the worker to let go of it) and returns its status (lastAvailIdx for GET_VRING_BASE). */
  stopRing(pair: number, dir: RingDir): RingStatus;
  ringStatus(pair: number, dir: RingDir): RingStatus;
  counters(pair: number): PairCounters;
  /**
   * An eventfd that becomes readable when some ring stopped on its own ('failed') or a pair's io_uring
   * failed mid-run (counters().tapEngineSyscall 'io_uring_enter'); read it, then look at ringStatus()
   * and counters().
   */
  readonly notifyFd: number;
  /** What was asked for (openDataPlane's tapEngine); the connection treats a mid-run io_uring failure as an error with 'uring'.  Default 'auto'. */
  readonly tapEngine?: TapEngineChoice;
  /** Stops every ring, unmaps every region, closes notifyFd. */
  close(): void;
}
