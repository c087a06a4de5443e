/**
 * What this kernel's tun driver supports (TUNGETFEATURES on a fresh fd).
 */
import { release } from 'node:os';
import { MqtapError } from '../sys/errors';
import { K, native } from '../sys/native';
import { MAX_QUEUES, VNET_HDR_SIZES } from '../sys/validate';
import { OFFLOAD_KEYS } from './tap';

export interface TunFeatures {
  /** The raw IFF_* mask TUNGETFEATURES returned. */
  raw: number;
  tun: boolean;
  tap: boolean;
  noPi: boolean;
  oneQueue: boolean;
  vnetHdr: boolean;
  multiQueue: boolean;
  napi: boolean;
  napiFrags: boolean;
  noCarrier: boolean;
  persist: boolean;
}

export interface TunProbe {
  /** /dev/net/tun could be opened and answered TUNGETFEATURES. */
  available: boolean;
  devicePath: string;
  kernel: string;
  /** Present when available. */
  features?: TunFeatures;
  /** True when multi-queue taps with virtio-net headers can be made here. */
  multiQueueTap: boolean;
  /** The kernel's limit on queues per tap. */
  maxQueues: number;
  vnetHdrSizes: readonly number[];
  /** TUN_F_* offloads this build can request (uso4/uso6 together, and only kernels 6.2+ take them). */
  offloads: string[];
  /** Why it is not available, with what to do. */
  error?: { code: string; message: string; hint?: string };
}

export function decodeTunFeatures(raw: number): TunFeatures {
  const has = (bit: number): boolean => (raw & bit) !== 0;
  return {
    raw,
    tun: has(K.IFF_TUN),
    tap: has(K.IFF_TAP),
    noPi: has(K.IFF_NO_PI),
    oneQueue: has(K.IFF_ONE_QUEUE),
    vnetHdr: has(K.IFF_VNET_HDR),
    multiQueue: has(K.IFF_MULTI_QUEUE),
    napi: has(K.IFF_NAPI),
    napiFrags: has(K.IFF_NAPI_FRAGS),
    noCarrier: has(K.IFF_NO_CARRIER),
    // TUNSETPERSIST is an ioctl, not a TUNSETIFF flag: always there.
    persist: true,
  };
}

/** Opens /dev/net/tun, asks TUNGETFEATURES and closes it.  Never throws for a missing device. */
export function probeTun(opts: { devicePath?: string } = {}): TunProbe {
  const devicePath = opts.devicePath ?? '/dev/net/tun';
  const offloads: string[] = [...OFFLOAD_KEYS];
  const base = { devicePath, kernel: release(), maxQueues: MAX_QUEUES, vnetHdrSizes: VNET_HDR_SIZES, offloads };
  let fd: number;
  try {
    fd = native.tunOpen(devicePath);
  } catch (err) {
    if (!(err instanceof MqtapError)) throw err;
    return { ...base, available: false, multiQueueTap: false, error: { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) } };
  }
  try {
    const features = decodeTunFeatures(native.tunGetFeatures(fd));
    return { ...base, available: true, features, multiQueueTap: features.tap && features.multiQueue && features.vnetHdr && features.noPi };
  } catch (err) {
    if (!(err instanceof MqtapError)) throw err;
    return { ...base, available: false, multiQueueTap: false, error: { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) } };
  } finally {
    native.close(fd);
  }
}
