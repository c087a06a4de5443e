/**
 * Multi-queue taps against the real kernel, inside a throw-away network
 * namespace: queue counts, fd flags, the 256-queue limit, name templates,
 * enabling/disabling queues, setActiveQueues (including real failures),
 * closing and disposal.  Every expectation about the device is checked
 * against the kernel's own view (rtnetlink IFLA_TUN_* via getTap).
 */
import { describe, expect, it } from 'vitest';
import { ErrorCodes, MqtapError } from '../../lib/sys/errors.js';
import { getLink, getTap, listTaps } from '../../lib/tap/links.js';
import type { Logger } from '../../lib/sys/log.js';
import { K, native } from '../../lib/sys/native.js';
import { deleteTap, openTap, type Tap } from '../../lib/tap/tap.js';
import { catchError, fdCount, skipNote, tapEnv, useIsolatedNetns, useTapTracker, reuseFdNumber } from '../helpers/env.js';

const env = tapEnv();

/** The kernel's queue counts for a tap (throws when the device is gone). */
function counts(name: string): { numQueues: number; numDisabledQueues: number } {
  const t = getTap(name);
  if (!t) throw new Error(`${name} does not exist`);
  return { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues };
}

/** The library's states, compact: 'EED' = enabled, enabled, disabled; 'C' = closed. */
function states(tap: Tap): string {
  return tap.queues.map((q) => q.state[0]!.toUpperCase()).join('');
}

/** Library and kernel agree on the number of enabled and disabled queues. */
function expectConsistent(tap: Tap): void {
  const open = tap.openQueues();
  expect(counts(tap.name)).toEqual({
    numQueues: open.filter((q) => q.state === 'enabled').length,
    numDisabledQueues: open.filter((q) => q.state === 'disabled').length,
  });
}

/** A logger that records and can run a hook on each record (to act between library steps). */
function hookLogger(onRecord: (obj: Record<string, unknown>, msg: string) => void): Logger {
  const log = (obj: unknown, msg?: string): void => onRecord((obj ?? {}) as Record<string, unknown>, msg ?? '');
  return { debug: log, info: log, warn: log, error: log, trace: log, fatal: log } as unknown as Logger;
}

describe.skipIf(!env.ok)(`tap integration${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();

  describe('queue counts', () => {
    it.each([1, 2, 4, 8, 256])('%i queues: kernel numQueues, FD_CLOEXEC and TUNGETIFF on every fd', (n) => {
      const name = `q${n}`;
      const before = fdCount();
      const tap = track(openTap({ name, queues: n }));
      expect(tap.name).toBe(name);
      expect(tap.created).toBe(true);
      expect(tap.queues).toHaveLength(n);
      expect(tap.queues.map((q) => q.index)).toEqual([...Array(n).keys()]);
      expect(tap.queues.every((q) => q.state === 'enabled')).toBe(true);
      expect(new Set(tap.fds()).size).toBe(n);
      expect(fdCount()).toBe(before + n);

      const info = getTap(name)!;
      expect(info).toBeDefined();
      expect(info.kind).toBe('tun');
      expect(info.tun).toMatchObject({ type: 'tap', pi: false, vnetHdr: true, multiQueue: true, persist: false, numQueues: n, numDisabledQueues: 0 });
      expect(info.numTxQueues).toBe(256);

      const want = K.IFF_TAP | K.IFF_NO_PI | K.IFF_MULTI_QUEUE | K.IFF_VNET_HDR;
      for (const q of tap.queues) {
        expect(native.getFdFlags(q.fd) & K.FD_CLOEXEC, `queue ${q.index} FD_CLOEXEC`).toBe(K.FD_CLOEXEC);
        const iff = native.tunGetIff(q.fd);
        expect(iff.name).toBe(name);
        expect(iff.flags & want).toBe(want);
      }
      tap.close();
      expect(getLink(name)).toBeUndefined();
      expect(fdCount()).toBe(before);
    });

    it('the 257th queue fails with E2BIG, names the queue, and leaves 256 queues and no extra fd', () => {
      const tap = track(openTap({ name: 'full0', queues: 256 }));
      const before = fdCount();
      for (const enabled of [true, false]) {
        const e = catchError(() => tap.addQueue({ enabled }));
        expect(e.code).toBe('E2BIG');
        expect(e.errno).toBe(7);
        expect(e.op).toBe('TUNSETIFF');
        expect(e.queue).toBe(256);
        expect(e.ifname).toBe('full0');
        expect(e.hint).toMatch(/256/);
        expect(tap.queues).toHaveLength(256);
        expect(fdCount()).toBe(before);
        expect(counts('full0')).toEqual({ numQueues: 256, numDisabledQueues: 0 });
      }
      // Disabled queues count too: with one disabled, there is still no room.
      tap.queues[255]!.disable();
      expect(catchError(() => tap.addQueue()).code).toBe('E2BIG');
      expect(counts('full0')).toEqual({ numQueues: 255, numDisabledQueues: 1 });
      // Closing one makes room for exactly one more.
      tap.queues[255]!.close();
      const q = tap.addQueue();
      expect(q.index).toBe(256);
      expect(counts('full0')).toEqual({ numQueues: 256, numDisabledQueues: 0 });
      expect(catchError(() => tap.addQueue()).code).toBe('E2BIG');
    });

    it('openTap with 257 queues is refused by validation and creates nothing', () => {
      const before = fdCount();
      const e = catchError(() => openTap({ name: 'q257', queues: 257 }));
      expect(e.code).toBe(ErrorCodes.INVALID_ARG);
      expect(getLink('q257')).toBeUndefined();
      expect(fdCount()).toBe(before);
    });
  });

  describe('name templates', () => {
    it("'mqt%d' becomes mqt0, mqt1, ... and a freed number is reused", () => {
      const a = track(openTap({ name: 'mqt%d', queues: 2 }));
      const b = track(openTap({ name: 'mqt%d', existing: 'forbid' }));
      expect([a.name, b.name]).toEqual(['mqt0', 'mqt1']);
      expect(a.created && b.created).toBe(true);
      for (const q of a.queues) expect(native.tunGetIff(q.fd).name).toBe('mqt0');
      expect(counts('mqt0').numQueues).toBe(2);
      expect(counts('mqt1').numQueues).toBe(1);
      expect(listTaps().map((t) => t.name)).toEqual(expect.arrayContaining(['mqt0', 'mqt1']));
      // A queue added later attaches to the resolved name, not to a new device.
      a.addQueue();
      expect(counts('mqt0').numQueues).toBe(3);
      expect(getLink('mqt2')).toBeUndefined();
      a.close();
      const c = track(openTap({ name: 'mqt%d' }));
      expect(c.name).toBe('mqt0');
    });

    it('settings by name (mtu, mac, up) go to the device the template resolved to', () => {
      track(openTap({ name: 'set%d' }));
      const t = track(openTap({ name: 'set%d', mtu: 1280, mac: '02:00:00:00:00:77', up: true }));
      expect(t.name).toBe('set1');
      expect(getLink('set1')).toMatchObject({ mtu: 1280, address: '02:00:00:00:00:77', up: true });
      expect(getLink('set0')).toMatchObject({ mtu: 1500, up: false });
    });
  });

  describe('enable / disable', () => {
    it('disable and enable one queue; repeats are no-ops; the kernel follows', () => {
      const tap = track(openTap({ name: 'tog0', queues: 4 }));
      const q3 = tap.queues[3]!;
      q3.disable();
      expect(q3.state).toBe('disabled');
      expect(counts('tog0')).toEqual({ numQueues: 3, numDisabledQueues: 1 });
      q3.disable();
      expect(counts('tog0')).toEqual({ numQueues: 3, numDisabledQueues: 1 });
      // A disabled queue is still a queue of the device.
      expect(native.tunGetIff(q3.fd).name).toBe('tog0');
      tap.queues[0]!.disable();
      expect(counts('tog0')).toEqual({ numQueues: 2, numDisabledQueues: 2 });
      q3.enable();
      q3.enable();
      expect(counts('tog0')).toEqual({ numQueues: 3, numDisabledQueues: 1 });
      expect(states(tap)).toBe('DEEE');
      expectConsistent(tap);
    });

    it('refuses to disable the last enabled queue, and changes nothing', () => {
      const one = track(openTap({ name: 'last0' }));
      const e1 = catchError(() => one.queues[0]!.disable());
      expect(e1.code).toBe(ErrorCodes.INVALID_ARG);
      expect(e1.message).toMatch(/last enabled queue/);
      expect(counts('last0')).toEqual({ numQueues: 1, numDisabledQueues: 0 });

      const two = track(openTap({ name: 'last1', queues: 2 }));
      two.queues[1]!.disable();
      expect(catchError(() => two.queues[0]!.disable()).code).toBe(ErrorCodes.INVALID_ARG);
      expect(counts('last1')).toEqual({ numQueues: 1, numDisabledQueues: 1 });
      expect(states(two)).toBe('ED');
    });

    it('addQueue({ enabled: false }) adds a disabled queue with the next index', () => {
      const tap = track(openTap({ name: 'add0', queues: 2 }));
      const q = tap.addQueue({ enabled: false });
      expect([q.index, q.state]).toEqual([2, 'disabled']);
      expect(counts('add0')).toEqual({ numQueues: 2, numDisabledQueues: 1 });
      expect(native.getFdFlags(q.fd) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
      expect(native.tunGetIff(q.fd).name).toBe('add0');
      expect(catchError(() => tap.addQueue({ enabled: 'no' as never })).code).toBe(ErrorCodes.INVALID_ARG);
      expect(tap.queues).toHaveLength(3);
    });
  });

  describe('setActiveQueues', () => {
    it('down to 1, up to N, middle values and repeats match the kernel', () => {
      const tap = track(openTap({ name: 'act0', queues: 8 }));
      for (const k of [1, 8, 3, 3, 5, 1, 1, 8, 8, 2, 7]) {
        tap.setActiveQueues(k);
        expect(counts('act0'), `after setActiveQueues(${k})`).toEqual({ numQueues: k, numDisabledQueues: 8 - k });
        expect(states(tap)).toBe('E'.repeat(k) + 'D'.repeat(8 - k));
        expect(tap.activeQueueCount()).toBe(k);
      }
    });

    it('refuses 0, more than the open queues and non-integers, changing nothing', () => {
      const tap = track(openTap({ name: 'act1', queues: 4 }));
      tap.setActiveQueues(2);
      for (const bad of [0, 5, 1.5, -1, '2']) {
        const e = catchError(() => tap.setActiveQueues(bad as number));
        expect(e.code).toBe(ErrorCodes.INVALID_ARG);
      }
      expect(counts('act1')).toEqual({ numQueues: 2, numDisabledQueues: 2 });
      expect(states(tap)).toBe('EEDD');
    });

    it('counts open queues only (closed ones keep their index)', () => {
      const tap = track(openTap({ name: 'act2', queues: 4 }));
      tap.queues[1]!.close();
      expect(counts('act2')).toEqual({ numQueues: 3, numDisabledQueues: 0 });
      tap.setActiveQueues(2);
      expect(states(tap)).toBe('ECED');
      expectConsistent(tap);
      expect(catchError(() => tap.setActiveQueues(4)).code).toBe(ErrorCodes.INVALID_ARG);
    });

    it('a step that fails for real is undone: the error names the queue and the kernel is back where it was', () => {
      const tap = track(openTap({ name: 'fail0', queues: 4 }));
      tap.setActiveQueues(1);
      // Put a fresh /dev/net/tun fd (attached to nothing) behind queue 2's
      // number: TUNSETQUEUE on it fails with EINVAL in the kernel.
      const q2 = tap.queues[2]!;
      const fd = q2.fd;
      native.close(fd);
      expect(reuseFdNumber(fd)).toBe(fd);
      expect(counts('fail0')).toEqual({ numQueues: 1, numDisabledQueues: 2 });

      // Steps: enable 1 (works), enable 2 (fails) -> undo: disable 1.
      const e = catchError(() => tap.setActiveQueues(4));
      expect(e.code).toBe('EINVAL');
      expect(e.op).toBe('TUNSETQUEUE');
      expect(e.syscall).toBe('ioctl');
      expect(e.queue).toBe(2);
      expect(e.ifname).toBe('fail0');
      expect(e.message).toMatch(/^setActiveQueues\(4\): fail0 queue 2: TUNSETQUEUE failed: EINVAL/);
      expect(e.message).toMatch(/previous state restored/);
      expect(states(tap)).toBe('EDDD');
      // The kernel: queue 1 was re-detached; queue 2's real file is gone.
      expect(counts('fail0')).toEqual({ numQueues: 1, numDisabledQueues: 2 });
      expect(getTap('fail0')!.tun.numQueues).toBe(tap.activeQueueCount());
      // The library closes the number it holds (our fresh fd): nothing leaks.
      const before = fdCount();
      tap.close();
      expect(fdCount()).toBe(before - 4);
    });

    it('when the undo fails too (device deleted mid-way): ERR_PARTIAL_STATE with every queue state', () => {
      let armed = false;
      const logger = hookLogger((obj, msg) => {
        if (armed && msg === 'queue state') {
          armed = false;
          deleteTap('part0'); // someone deletes the device between two steps
        }
        void obj;
      });
      const tap = track(openTap({ name: 'part0', queues: 4, logger }));
      tap.setActiveQueues(1);
      armed = true;
      const e = catchError(() => tap.setActiveQueues(4)) as MqtapError & { state?: Array<{ index: number; state: string }> };
      expect(e.code).toBe(ErrorCodes.PARTIAL);
      expect(e.op).toBe('SET_ACTIVE');
      expect(e.ifname).toBe('part0');
      // Queue 1 was enabled before the deletion, queue 2 failed, undoing queue 1 failed.
      expect(e.state).toEqual([
        { index: 0, state: 'enabled' },
        { index: 1, state: 'enabled' },
        { index: 2, state: 'disabled' },
        { index: 3, state: 'disabled' },
      ]);
      expect(e.message).toMatch(/could not be undone/);
      expect(e.message).toMatch(/queue 1:/);
      expect(e.message).toMatch(/0=enabled 1=enabled 2=disabled 3=disabled/);
      expect(e.cause).toBeInstanceOf(MqtapError);
      expect((e.cause as MqtapError).queue).toBe(2);
      expect((e.cause as MqtapError).code).toBe('EINVAL');
      expect(states(tap)).toBe('EEDD');
      expect(getLink('part0')).toBeUndefined();
    });

    it('on a closed tap: ERR_CLOSED', () => {
      const tap = track(openTap({ name: 'act3', queues: 2 }));
      tap.close();
      expect(catchError(() => tap.setActiveQueues(1)).code).toBe(ErrorCodes.CLOSED);
    });
  });

  describe('device deleted while queues are open', () => {
    it('TUNSETQUEUE then fails with EINVAL naming the queue; the library state stays; close frees every fd', () => {
      const before = fdCount();
      const tap = track(openTap({ name: 'del0', queues: 4 }));
      tap.setActiveQueues(2);
      deleteTap('del0');
      expect(getLink('del0')).toBeUndefined();
      expect(listTaps()).not.toContainEqual(expect.objectContaining({ name: 'del0' }));

      const eUp = catchError(() => tap.setActiveQueues(4));
      expect([eUp.code, eUp.op, eUp.queue, eUp.ifname]).toEqual(['EINVAL', 'TUNSETQUEUE', 2, 'del0']);
      expect(eUp.message).toMatch(/previous state restored/);
      const eDown = catchError(() => tap.queues[1]!.disable());
      expect([eDown.code, eDown.op, eDown.queue]).toEqual(['EINVAL', 'TUNSETQUEUE', 1]);
      const eEn = catchError(() => tap.queues[3]!.enable());
      expect([eEn.code, eEn.queue]).toEqual(['EINVAL', 3]);
      expect(states(tap)).toBe('EEDD');

      // The fds are no longer attached to anything.
      const g = catchError(() => native.tunGetIff(tap.queues[0]!.fd));
      expect([g.errno, g.op]).toEqual([77, 'TUNGETIFF']);

      tap.close();
      expect(fdCount()).toBe(before);
      expect(tap.closed).toBe(true);
    });
  });

  describe('closing', () => {
    it('a closed queue reports fd -1, refuses enable/disable with ERR_CLOSED, and closing twice is harmless', () => {
      const before = fdCount();
      const tap = track(openTap({ name: 'cl0', queues: 3 }));
      const q = tap.queues[1]!;
      q.close();
      expect([q.fd, q.state]).toEqual([-1, 'closed']);
      expect(counts('cl0')).toEqual({ numQueues: 2, numDisabledQueues: 0 });
      for (const fn of [() => q.enable(), () => q.disable()]) {
        const e = catchError(fn);
        expect(e.code).toBe(ErrorCodes.CLOSED);
        expect(e.queue).toBe(1);
        expect(e.ifname).toBe('cl0');
      }
      q.close();
      expect(counts('cl0')).toEqual({ numQueues: 2, numDisabledQueues: 0 });
      expect(tap.fds()).toHaveLength(2);
      expect(tap.closed).toBe(false);

      tap.close();
      tap.close();
      expect(tap.closed).toBe(true);
      expect(tap.queues.map((x) => x.fd)).toEqual([-1, -1, -1]);
      expect(getLink('cl0')).toBeUndefined();
      expect(fdCount()).toBe(before);
      const e = catchError(() => tap.addQueue());
      expect(e.code).toBe(ErrorCodes.CLOSED);
      expect(fdCount()).toBe(before);
    });

    it('closing a disabled queue removes it from the kernel count', () => {
      const tap = track(openTap({ name: 'cl1', queues: 3 }));
      tap.setActiveQueues(1);
      tap.queues[2]!.close();
      expect(counts('cl1')).toEqual({ numQueues: 1, numDisabledQueues: 1 });
      expectConsistent(tap);
    });

    it('Symbol.dispose closes a queue / the whole tap', () => {
      const before = fdCount();
      const tap = track(openTap({ name: 'disp0', queues: 3 }));
      tap.queues[2]![Symbol.dispose]();
      expect(tap.queues[2]!.state).toBe('closed');
      expect(counts('disp0').numQueues).toBe(2);
      tap[Symbol.dispose]();
      expect(tap.closed).toBe(true);
      expect(getLink('disp0')).toBeUndefined();
      expect(fdCount()).toBe(before);
      tap[Symbol.dispose]();
    });

    it('toJSON lists the queues with fd and state', () => {
      const tap = track(openTap({ name: 'json0', queues: 2 }));
      tap.queues[1]!.disable();
      const j = JSON.parse(JSON.stringify(tap)) as ReturnType<Tap['toJSON']>;
      expect(j).toEqual({
        name: 'json0',
        created: true,
        vnetHdr: true,
        queues: [
          { index: 0, fd: tap.queues[0]!.fd, state: 'enabled' },
          { index: 1, fd: tap.queues[1]!.fd, state: 'disabled' },
        ],
      });
    });
  });
});
