/**
 * How 'auto' chooses the data path's engines (lib/datapath/io.ts
 * defaultEngines): by what the kernel offers, given as capabilities, so every
 * level of the chain and every fallback reason is checked here, on any host.
 * The real kernel's answers are used by the integration tests
 * (test/integration/io-engine.test.ts, io-mshot.test.ts).
 */
import { release } from 'node:os';
import { describe, expect, it } from 'vitest';
import { defaultEngines, disabledLevels, ioCapabilities, kernelVersion, transientCaps, type IoCapabilities } from '../../lib/datapath/io.js';
import { native } from '../../lib/sys/native.js';
import { mshotMissingReason } from '../helpers/probes.js';

const IOC = native.ioConstants;
const UNLIMITED = IOC.INT_MAX;
const NONE = { mshot: false, uring: false };

/** A kernel that offers everything the chain can use. */
function caps(over: Partial<IoCapabilities> = {}): IoCapabilities {
  return {
    kernel: '6.12.0',
    ioUringDisabled: '0',
    setupErrno: 0,
    deferTaskrun: true,
    deferErrno: 0,
    extArg: true,
    probeErrno: 0,
    ops: { read: true, write: true, writev: true, readMultishot: true },
    pbufRingErrno: 0,
    ...over,
  };
}

describe("'auto' engine choice by capability", () => {
  it('everything offered (6.12+): multishot reads, io_uring writes, no fallback', () => {
    expect(defaultEngines(UNLIMITED, caps(), NONE)).toEqual({ rx: 'uring-mshot', tx: 'uring', fallbacks: [] });
    expect(defaultEngines(UNLIMITED, caps({ kernel: '7.1.0-rc2' }), NONE).rx).toBe('uring-mshot');
  });

  it('a limited send buffer writes in order with plain syscalls; reads are unaffected', () => {
    expect(defaultEngines(65536, caps(), NONE)).toMatchObject({ rx: 'uring-mshot', tx: 'poll' });
  });

  it('no multishot read (before 6.7): one-shot io_uring reads, with the reason', () => {
    const c = defaultEngines(UNLIMITED, caps({ kernel: '6.6.30', ops: { read: true, write: true, writev: true, readMultishot: false } }), NONE);
    expect(c).toEqual({ rx: 'uring', tx: 'uring', fallbacks: [{ level: 'multishot', reason: 'Linux 6.6.30: no multishot read (IORING_OP_READ_MULTISHOT needs Linux 6.7+)' }] });
  });

  it('multishot read offered but the kernel is older than 6.12: not preferred (multishot-read stalls)', () => {
    for (const k of ['6.7.0', '6.11.9-foo', '5.99.0']) {
      const c = defaultEngines(UNLIMITED, caps({ kernel: k }), NONE);
      expect(c.rx, k).toBe('uring');
      expect(c.fallbacks).toEqual([{ level: 'multishot', reason: `Linux ${k}: multishot reads are not used before 6.12 (earlier kernels had multishot-read stalls)` }]);
    }
  });

  it('no DEFER_TASKRUN or no provided-buffer ring: one-shot io_uring reads', () => {
    expect(defaultEngines(UNLIMITED, caps({ deferTaskrun: false }), NONE).fallbacks[0]!.reason).toMatch(/SINGLE_ISSUER\|DEFER_TASKRUN/);
    expect(defaultEngines(UNLIMITED, caps({ pbufRingErrno: IOC.EPERM }), NONE)).toMatchObject({ rx: 'uring', fallbacks: [{ reason: 'IORING_REGISTER_PBUF_RING: EPERM' }] });
  });

  it('io_uring unavailable: poll both ways, the reason names the cause', () => {
    const poll = (c: IoCapabilities): ReturnType<typeof defaultEngines> => defaultEngines(UNLIMITED, c, NONE);
    expect(poll(caps({ setupErrno: IOC.ENOSYS, kernel: '5.4.0' }))).toEqual({
      rx: 'poll',
      tx: 'poll',
      fallbacks: [{ level: 'io_uring', reason: 'io_uring_setup: ENOSYS (Linux 5.4.0 has no io_uring, or a seccomp filter hides it)' }],
    });
    expect(poll(caps({ setupErrno: IOC.EPERM, ioUringDisabled: '2' })).fallbacks[0]!.reason).toBe('io_uring_setup: EPERM (kernel.io_uring_disabled=2)');
    expect(poll(caps({ setupErrno: IOC.EPERM, ioUringDisabled: '1' })).fallbacks[0]!.reason).toMatch(/kernel\.io_uring_disabled=1: only members of kernel\.io_uring_group/);
    expect(poll(caps({ setupErrno: IOC.EPERM, ioUringDisabled: '0' })).fallbacks[0]!.reason).toBe('io_uring_setup: EPERM (a seccomp filter or an LSM refuses io_uring)');
    expect(poll(caps({ setupErrno: IOC.EPERM, ioUringDisabled: undefined })).fallbacks[0]!.reason).toMatch(/seccomp filter or an LSM/);
    expect(poll(caps({ setupErrno: IOC.EMFILE })).fallbacks[0]!.reason).toBe('io_uring_setup: EMFILE');
    expect(poll(caps({ ops: { read: true, write: false, writev: true, readMultishot: true } }))).toMatchObject({ rx: 'poll', tx: 'poll', fallbacks: [{ level: 'io_uring' }] });
  });

  it('io_uring without IORING_FEAT_EXT_ARG (5.6-5.10): poll both ways, not a uring whose every ring fails to open', () => {
    expect(defaultEngines(UNLIMITED, caps({ kernel: '5.10.0-28-amd64', extArg: false, deferTaskrun: false, ops: { read: true, write: true, writev: true, readMultishot: false } }), NONE)).toEqual({
      rx: 'poll',
      tx: 'poll',
      fallbacks: [{ level: 'io_uring', reason: 'Linux 5.10.0-28-amd64: io_uring lacks IORING_FEAT_EXT_ARG (bounded waits, Linux 5.11+), which every engine ring needs' }],
    });
  });

  it('the DEFER_TASKRUN setup errno is part of the multishot fallback reason', () => {
    expect(defaultEngines(UNLIMITED, caps({ deferTaskrun: false, deferErrno: IOC.EINVAL }), NONE).fallbacks).toEqual([
      { level: 'multishot', reason: 'Linux 6.12.0: io_uring refuses SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG (EINVAL)' },
    ]);
  });

  it('capabilities with a transient errno anywhere (EMFILE, ENFILE, ENOMEM) are not remembered', () => {
    const ok = { setupErrno: 0, deferErrno: 0, probeErrno: 0, pbufRingErrno: 0 };
    expect(transientCaps(ok)).toBe(false);
    expect(transientCaps({ ...ok, deferErrno: IOC.EINVAL, probeErrno: -1, pbufRingErrno: IOC.EPERM })).toBe(false);
    for (const key of ['setupErrno', 'deferErrno', 'probeErrno', 'pbufRingErrno'] as const)
      for (const e of [IOC.EMFILE, IOC.ENFILE, IOC.ENOMEM]) expect(transientCaps({ ...ok, [key]: e }), `${key}=${e}`).toBe(true);
  });

  it('levels forced off (MQTAP_IO_DISABLE) are skipped with that reason', () => {
    expect(disabledLevels({ MQTAP_IO_DISABLE: 'mshot' })).toEqual({ mshot: true, uring: false });
    expect(disabledLevels({ MQTAP_IO_DISABLE: ' uring , mshot' })).toEqual({ mshot: true, uring: true });
    expect(disabledLevels({})).toEqual(NONE);
    expect(() => disabledLevels({ MQTAP_IO_DISABLE: 'multishot' })).toThrow(/MQTAP_IO_DISABLE: unknown level "multishot"/);
    expect(defaultEngines(UNLIMITED, caps(), { mshot: true, uring: false })).toEqual({
      rx: 'uring',
      tx: 'uring',
      fallbacks: [{ level: 'multishot', reason: 'disabled by MQTAP_IO_DISABLE=mshot' }],
    });
    expect(defaultEngines(UNLIMITED, caps(), { mshot: false, uring: true })).toEqual({
      rx: 'poll',
      tx: 'poll',
      fallbacks: [{ level: 'io_uring', reason: 'disabled by MQTAP_IO_DISABLE=uring' }],
    });
  });

  it('kernel versions are read from the release string', () => {
    expect(kernelVersion('6.18.44-fc-v1272')).toEqual([6, 18]);
    expect(kernelVersion('5.10.0-28-amd64')).toEqual([5, 10]);
    expect(kernelVersion('weird')).toEqual([0, 0]);
  });

  it("this host's capabilities come from the kernel and are remembered", () => {
    const c = ioCapabilities();
    expect(c.kernel).toBe(release());
    expect(c.setupErrno).toBe(native.ioUringProbe().setupErrno);
    expect(c.extArg).toBe(native.ioUringProbe().extArg);
    if (!transientCaps(c)) expect(ioCapabilities()).toBe(c);
  });

  it("the tests' multishot probe (probes.ts) skips exactly where 'auto' would not pick multishot reads (e.g. 6.7-6.11)", () => {
    const picked = defaultEngines(UNLIMITED, ioCapabilities(), NONE).rx === 'uring-mshot';
    expect(mshotMissingReason() === '').toBe(picked);
  });
});

describe('defaultBatch (the receive batch when openQueueIO is not given one)', () => {
  it('256 for every default slot (MTU-sized, 64 KiB GSO) up to 128 KiB, 64 above; exported from the package root', async () => {
    const { defaultBatch } = await import('../../lib/index.js');
    expect(defaultBatch(1536)).toBe(256);
    expect(defaultBatch(65_600)).toBe(256);
    expect(defaultBatch(128 * 1024)).toBe(256);
    expect(defaultBatch(128 * 1024 + 1)).toBe(64);
    expect(defaultBatch(1 << 20)).toBe(64);
  });
});
