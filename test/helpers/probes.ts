/**
 * Probes for kernel features some tests need, asked of the kernel itself (no
 * version numbers, no guesses from the distribution): each returns '' when
 * the feature works here, else why not, for need() in env.ts.
 */
import { existsSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { loadProgram, queueCountProgram, QUEUE_COUNT_ENTRIES, QUEUE_COUNT_VALUE_SIZE } from '../../lib/datapath/bpf.js';
import { defaultEngines, ioCapabilities } from '../../lib/datapath/io.js';
import { isolateNetns } from '../../lib/sys/netns.js';
import { native } from '../../lib/sys/native.js';

/**
 * tcx (Linux 6.6+, CONFIG_NET_XGRESS) with BPF: the per-queue counter program
 * is loaded and linked to the tcx ingress of `lo` in a throw-away network
 * namespace (so no device of the host is touched), then everything is closed.
 */
export function tcxMissing(): string {
  const BC = native.bpfConstants;
  let ns: ReturnType<typeof isolateNetns> | undefined;
  let map = -1;
  try {
    ns = isolateNetns();
    const lo = 1; // loopback is always ifindex 1 in a new namespace
    map = native.bpfMapCreate(BC.BPF_MAP_TYPE_PERCPU_ARRAY, 4, QUEUE_COUNT_VALUE_SIZE, QUEUE_COUNT_ENTRIES, 0, 'mqtap_probe');
    const prog = loadProgram(queueCountProgram(map));
    try {
      native.close(native.bpfLinkCreate(prog.fd, lo, BC.BPF_TCX_INGRESS, 0));
    } finally {
      prog.close();
    }
    return '';
  } catch (err) {
    return `no tcx ingress program on this kernel (${release()}; tcx needs Linux 6.6+ with BPF): ${(err as Error).message}`;
  } finally {
    if (map >= 0) native.close(map);
    ns?.restore();
  }
}

/** kernel.io_uring_disabled (0 allowed, 1 only for a group, 2 off), or undefined where the sysctl does not exist (before 6.6). */
export function ioUringDisabled(): string | undefined {
  const p = '/proc/sys/kernel/io_uring_disabled';
  return existsSync(p) ? readFileSync(p, 'utf8').trim() : undefined;
}

/**
 * Whether this process can set up the data path's io_uring engine (probed on a
 * socket pair: kernel.io_uring_disabled, seccomp, old kernels, no fd left).
 */
export function uringAvailable(): boolean {
  let pair: [number, number];
  try {
    pair = native.unixSocketPair(5) as [number, number];
  } catch {
    return false;
  }
  try {
    new native.QueueIo(pair[0], { rx: 'uring', tx: 'uring', batch: 4, slotSize: 256, hdrLen: 0, rxDropErrnos: [], txDropErrnos: [] }, () => undefined).close();
    return true;
  } catch {
    return false;
  } finally {
    native.close(pair[0]);
    native.close(pair[1]);
  }
}

/** The reason the io_uring engine failed its probe, with the sysctl that usually explains it. */
export function uringMissingReason(): string {
  const sysctl = ioUringDisabled();
  return `io_uring unavailable on ${release()}${sysctl !== undefined ? ` (kernel.io_uring_disabled=${sysctl})` : ''}: the uring engine cases are skipped`;
}

/**
 * Why the multishot receive engine ('uring-mshot') is not what 'auto' picks
 * here, or '': the very predicate lib/datapath/io.ts defaultEngines uses, on
 * the kernel's answers (IORING_OP_READ_MULTISHOT, Linux 6.7+, preferred only
 * from 6.12: earlier kernels had multishot-read stalls; DEFER_TASKRUN;
 * provided-buffer ring registration).  MQTAP_IO_DISABLE is not applied.
 */
export function mshotMissingReason(): string {
  const caps = ioCapabilities();
  const chosen = defaultEngines(native.ioConstants.INT_MAX, caps, { mshot: false, uring: false });
  if (chosen.rx === 'uring-mshot') return '';
  if (caps.setupErrno !== 0) return uringMissingReason();
  return `${chosen.fallbacks.map((f) => f.reason).join('; ')}: the uring-mshot cases are skipped`;
}
