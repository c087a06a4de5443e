/**
 * VhostPairDriver's ring memory when VHOST_RESET_OWNER fails, without a vhost
 * device: the vhost ioctls are spies (the memory and the eventfds are real).
 * A failed reset leaves the kernel worker owning the memory table, so the
 * pages must stay mapped even when nothing in the program refers to the
 * driver any more (the allocPages finalizer would munmap them).  Checked
 * with a WeakRef on the ArrayBuffer and a forced full GC; the control cases
 * (reset works) show the same check sees the memory being freed.
 */
import { readdirSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { K, native } from '../../lib/sys/native.js';
import { VhostPairDriver, _keptRingMemoryBytes } from '../../lib/vhost/vhost.js';
import { catchError } from '../helpers/errors.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;
const fdCount = (): number => readdirSync('/proc/self/fd').length;

/** Fake fd numbers for the vhost fd and the tap fd: only spies see them. */
const VHOST_FD = 910_000;
const TAP_FD = 910_001;

const realAlloc = native.allocPages;
/** WeakRefs to every ring memory the driver allocated (no strong reference kept here). */
let allocated: Array<WeakRef<ArrayBuffer>>;
let resetFails: boolean;
let bindFails: boolean;

beforeEach(() => {
  allocated = [];
  resetFails = false;
  bindFails = false;
  // Not vi.spyOn: a spy keeps every return value (mock.results), which would keep the memory alive.
  native.allocPages = (size: number): ArrayBuffer => {
    const mem = realAlloc(size);
    allocated.push(new WeakRef(mem));
    return mem;
  };
  vi.spyOn(native, 'vhostGetFeatures').mockReturnValue(1n << BigInt(K.VIRTIO_F_VERSION_1));
  vi.spyOn(native, 'tunGetIff').mockReturnValue({ name: 'vd0', flags: K.IFF_TAP | K.IFF_VNET_HDR });
  vi.spyOn(native, 'tunGetVnetHdrSz').mockReturnValue(12);
  for (const name of ['vhostSetOwner', 'vhostSetFeatures', 'vhostSetMemTable', 'vhostSetVringNum', 'vhostSetVringBase', 'vhostSetVringAddr', 'vhostSetVringKick', 'vhostSetVringCall', 'vhostSetVringErr'] as const)
    vi.spyOn(native, name).mockImplementation(() => undefined as never);
  vi.spyOn(native, 'vhostGetVringBase').mockReturnValue(0);
  vi.spyOn(native, 'vhostNetSetBackend').mockImplementation(() => {
    if (bindFails) throw new MqtapError({ op: 'VHOST_NET_SET_BACKEND', syscall: 'ioctl', errno: 5 });
  });
  vi.spyOn(native, 'vhostResetOwner').mockImplementation(() => {
    if (resetFails) throw new MqtapError({ op: 'VHOST_RESET_OWNER', syscall: 'ioctl', errno: 12 });
  });
});

afterEach(() => {
  native.allocPages = realAlloc;
  vi.restoreAllMocks();
});

/** Lets the WeakRefs of this job go (they hold their target until the job ends), then a full GC. */
async function collect(): Promise<void> {
  for (let i = 0; i < 3; i++) {
    await new Promise((r) => setImmediate(r));
    gc();
  }
}

/** Starts a driver whose bind fails; returns the error (no reference to anything else). */
function failedStart(): MqtapError {
  const e = catchError(() => new VhostPairDriver(VHOST_FD, TAP_FD, { queueSize: 8 }));
  // V8 keeps the frames' receivers (the half-built driver) until the stack is formatted.
  void e.stack;
  return e;
}

describe('VhostPairDriver ring memory when VHOST_RESET_OWNER fails', () => {
  it('constructor error path, reset fails: the memory is kept (never unmapped), the eventfds are closed, the first error is thrown', async () => {
    bindFails = true;
    resetFails = true;
    const kept = _keptRingMemoryBytes();
    const fds = fdCount();
    const e = failedStart();
    expect(e).toMatchObject({ op: 'VHOST_NET_SET_BACKEND', code: 'EIO' });
    expect(fdCount()).toBe(fds);
    expect(native.vhostResetOwner).toHaveBeenCalledWith(VHOST_FD);
    expect(allocated).toHaveLength(1);
    await collect();
    expect(allocated[0]!.deref(), 'ring memory after GC').toBeInstanceOf(ArrayBuffer);
    expect(_keptRingMemoryBytes() - kept).toBe(allocated[0]!.deref()!.byteLength);
  });

  it('control: constructor error path, reset works: the memory is freed', async () => {
    bindFails = true;
    const kept = _keptRingMemoryBytes();
    expect(failedStart()).toMatchObject({ op: 'VHOST_NET_SET_BACKEND' });
    await collect();
    expect(allocated[0]!.deref(), 'ring memory after GC').toBeUndefined();
    expect(_keptRingMemoryBytes()).toBe(kept);
  });

  /** Starts a driver, stops it, drops it; returns stop()'s error, if any. */
  function startStopDrop(): unknown {
    const d = new VhostPairDriver(VHOST_FD, TAP_FD, { queueSize: 8 });
    try {
      d.stop();
      return undefined;
    } catch (err) {
      return err;
    }
  }

  it('stop(), reset fails: the memory outlives the driver object (a pair drops its driver when its queue closes)', async () => {
    resetFails = true;
    const fds = fdCount();
    const err = startStopDrop();
    expect(err).toMatchObject({ op: 'VHOST_RESET_OWNER', code: 'ENOMEM' });
    expect(fdCount()).toBe(fds);
    await collect();
    expect(allocated[0]!.deref(), 'ring memory after GC').toBeInstanceOf(ArrayBuffer);
  });

  it('control: stop(), reset works: the memory is freed with the driver', async () => {
    expect(startStopDrop()).toBeUndefined();
    await collect();
    expect(allocated[0]!.deref(), 'ring memory after GC').toBeUndefined();
  });
});
