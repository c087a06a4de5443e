/**
 * No fd leaks over 1,000 open / toggle / close cycles, failing cycles
 * included (bad names, existing: 'forbid' conflicts, 'require' on a missing
 * name, E2BIG on a full tap, ERR_CLOSED).  Counts /proc/self/fd before and
 * after and checks the kernel is left with exactly the devices the test
 * holds.  Runs in a throw-away network namespace.
 */
import { describe, expect, it } from 'vitest';
import { ErrorCodes, MqtapError } from '../../lib/sys/errors.js';
import { getLink, getTap, listTaps } from '../../lib/tap/links.js';
import { deleteTap, openTap } from '../../lib/tap/tap.js';
import { fdCount, openFds, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';

const env = tapEnv();

function expectCode(fn: () => unknown, code: string): void {
  try {
    fn();
  } catch (err) {
    if (err instanceof MqtapError && err.code === code) return;
    throw err;
  }
  throw new Error(`expected ${code}`);
}

describe.skipIf(!env.ok)(`fd leaks${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();

  it('1,000 open/toggle/close cycles, failing ones included, leave no fd and no device behind', () => {
    // A persistent tap to attach to, and a full one (256 queues) for E2BIG.
    track(openTap({ name: 'lk0', persist: true })).close();
    const full = track(openTap({ name: 'lkfull', queues: 256 }));
    const fdsBefore = openFds();
    const countBefore = fdCount();

    for (let i = 0; i < 1000; i++) {
      switch (i % 10) {
        case 0: {
          // Create and destroy a device (the slow path: keep it to 1 in 10).
          const t = openTap({ name: 'lkc%d', queues: 3, existing: 'forbid' });
          t.setActiveQueues(1);
          t.setActiveQueues(3);
          t.close();
          break;
        }
        case 1:
          expectCode(() => openTap({ name: `bad/${i}` }), ErrorCodes.INVALID_ARG);
          expectCode(() => openTap({ name: 'lk0', queues: 257 }), ErrorCodes.INVALID_ARG);
          break;
        case 2:
          expectCode(() => openTap({ name: 'lk0', existing: 'forbid' }), 'EEXIST');
          break;
        case 3:
          expectCode(() => full.addQueue(), 'E2BIG');
          expectCode(() => full.addQueue({ enabled: false }), 'E2BIG');
          break;
        case 4:
          expectCode(() => openTap({ name: 'lknone', existing: 'require' }), 'ENODEV');
          break;
        default: {
          const t = openTap({ name: 'lk0', existing: 'require', queues: 4 });
          t.queues[3]!.disable();
          t.queues[3]!.enable();
          t.setActiveQueues(1);
          t.setActiveQueues(4);
          const extra = t.addQueue({ enabled: i % 2 === 0 });
          t.queues[1]!.close();
          expectCode(() => t.queues[1]!.enable(), ErrorCodes.CLOSED);
          extra.close();
          if (i % 3 === 0) t[Symbol.dispose]();
          else t.close();
          t.close();
        }
      }
    }

    expect(fdCount()).toBe(countBefore);
    expect(openFds()).toEqual(fdsBefore);
    expect(listTaps().map((t) => t.name).sort()).toEqual(['lk0', 'lkfull']);
    expect(getTap('lk0')!.tun).toMatchObject({ persist: true, numQueues: 0, numDisabledQueues: 0 });
    expect(getTap('lkfull')!.tun.numQueues).toBe(256);
    full.close();
    deleteTap('lk0');
    expect(getLink('lk0')).toBeUndefined();
    expect(fdCount()).toBe(countBefore - 256);
  });
});
