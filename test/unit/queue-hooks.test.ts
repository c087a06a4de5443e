/**
 * The hooks around a tap queue's state changes (TapQueue._onEnableDisable,
 * _onBeforeClose) and the vhost pair driver that registers into them, without
 * a kernel: TUNSETQUEUE and close(2) are replaced by spies that record the
 * order of events, and the driver by a fake with the same bind/unbind/stop.
 * The real kernel and the real driver are covered in the guest
 * (test/vm/scripts/lifecycle.js).  What must hold, whoever changes the queue:
 *
 *   enable:  TUNSETQUEUE attach, then afterEnable (hooks in the order added)
 *   disable: beforeDisable (last added first), then TUNSETQUEUE detach
 *   close:   close hooks, then close(2)
 *
 * and a failing step undoes the steps before it (ERR_PARTIAL_STATE when the
 * undo fails as well).
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ErrorCodes, MqtapError } from '../../lib/sys/errors.js';
import { silentLogger } from '../../lib/sys/log.js';
import { K, native } from '../../lib/sys/native.js';
import { Tap, type TapQueue } from '../../lib/tap/tap.js';
import { Netdev, QueuePair } from '../../lib/vhost/netdev.js';
import type { VhostPairDriver } from '../../lib/vhost/vhost.js';
import { catchError } from '../helpers/errors.js';

/** Fake fd numbers: the spies below make sure none reaches a syscall. */
const FD0 = 900_000;

let events: string[];
/** Fd -> queue index, for readable events. */
let byFd: Map<number, number>;
/** TUNSETQUEUE on these queue indices fails (EINVAL), as many times as listed. */
let failSetQueue: number[];

function errno(op: string, code: number): MqtapError {
  return new MqtapError({ op, syscall: 'ioctl', errno: code });
}

beforeEach(() => {
  events = [];
  byFd = new Map();
  failSetQueue = [];
  vi.spyOn(native, 'tunSetQueue').mockImplementation((fd: number, flag: number) => {
    const q = byFd.get(fd)!;
    const what = flag === K.IFF_ATTACH_QUEUE ? 'attach' : 'detach';
    const i = failSetQueue.indexOf(q);
    if (i >= 0) {
      failSetQueue.splice(i, 1);
      events.push(`${what} ${q} FAILED`);
      throw errno('TUNSETQUEUE', 22);
    }
    events.push(`${what} ${q}`);
  });
  vi.spyOn(native, 'close').mockImplementation((fd: number) => {
    events.push(`close(2) ${byFd.get(fd)}`);
  });
});

afterEach(() => {
  vi.restoreAllMocks();
});

/** A Tap of `n` enabled queues over fake fds (nothing opened). */
function fakeTap(n: number): Tap {
  const tap = new Tap({ name: 'hk0', created: true, vnetHdr: true, flags: 0, devicePath: '/dev/net/tun', netns: undefined, logger: silentLogger });
  for (let i = 0; i < n; i++) {
    byFd.set(FD0 + i, i);
    tap._push(FD0 + i, 'enabled');
  }
  return tap;
}

/** A hook that records its calls; `fail` makes the named call throw (once). */
function hook(q: TapQueue, name: string, fail: { afterEnable?: boolean; beforeDisable?: boolean } = {}): () => void {
  return q._onEnableDisable({
    afterEnable: () => {
      if (fail.afterEnable) {
        fail.afterEnable = false;
        events.push(`${name}.afterEnable ${q.index} FAILED`);
        throw errno('VHOST_NET_SET_BACKEND', 5);
      }
      events.push(`${name}.afterEnable ${q.index}`);
    },
    beforeDisable: () => {
      if (fail.beforeDisable) {
        fail.beforeDisable = false;
        events.push(`${name}.beforeDisable ${q.index} FAILED`);
        throw errno('VHOST_NET_SET_BACKEND', 5);
      }
      events.push(`${name}.beforeDisable ${q.index}`);
    },
  });
}

const states = (tap: Tap): string => tap.queues.map((q) => q.state[0]!.toUpperCase()).join('');

describe('TapQueue enable/disable hooks', () => {
  it('disable: hooks (last added first) run before the detach; enable: the attach runs before the hooks (in the order added)', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    hook(q, 'a');
    hook(q, 'b');
    q.disable();
    expect(events).toEqual(['b.beforeDisable 1', 'a.beforeDisable 1', 'detach 1']);
    events = [];
    q.enable();
    expect(events).toEqual(['attach 1', 'a.afterEnable 1', 'b.afterEnable 1']);
    // No-ops call nothing.
    events = [];
    q.enable();
    expect(events).toEqual([]);
  });

  it('a removed hook is not called; a closed queue takes no hook and drops the ones it had', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    const remove = hook(q, 'a');
    hook(q, 'b');
    remove();
    q.disable();
    expect(events).toEqual(['b.beforeDisable 1', 'detach 1']);
    events = [];
    q.close();
    expect(events).toEqual(['close(2) 1']);
    expect(catchError(() => hook(q, 'c')).code).toBe(ErrorCodes.CLOSED);
  });

  it('a beforeDisable hook that throws cancels the disable: hooks already run are re-enabled, no TUNSETQUEUE', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    hook(q, 'a', { beforeDisable: true });
    hook(q, 'b');
    const e = catchError(() => q.disable());
    expect(e).toMatchObject({ op: 'VHOST_NET_SET_BACKEND', code: 'EIO', queue: 1, ifname: 'hk0' });
    expect(events).toEqual(['b.beforeDisable 1', 'a.beforeDisable 1 FAILED', 'b.afterEnable 1']);
    expect(q.state).toBe('enabled');
  });

  it('a detach that fails re-enables every hook (last one first undone last); the queue stays enabled', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    hook(q, 'a');
    hook(q, 'b');
    failSetQueue = [1];
    const e = catchError(() => q.disable());
    expect(e).toMatchObject({ op: 'TUNSETQUEUE', code: 'EINVAL', queue: 1 });
    expect(events).toEqual(['b.beforeDisable 1', 'a.beforeDisable 1', 'detach 1 FAILED', 'a.afterEnable 1', 'b.afterEnable 1']);
    expect(q.state).toBe('enabled');
  });

  it('an afterEnable hook that throws undoes the enable: earlier hooks disabled again, then the queue detached', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    hook(q, 'a');
    hook(q, 'b', { afterEnable: true });
    q.disable();
    events = [];
    const e = catchError(() => q.enable());
    expect(e).toMatchObject({ op: 'VHOST_NET_SET_BACKEND', queue: 1 });
    expect(events).toEqual(['attach 1', 'a.afterEnable 1', 'b.afterEnable 1 FAILED', 'a.beforeDisable 1', 'detach 1']);
    expect(q.state).toBe('disabled');
  });

  it('when the undo fails too: ERR_PARTIAL_STATE naming both failures and the state the queue is in', () => {
    const tap = fakeTap(2);
    const q = tap.queues[1]!;
    hook(q, 'a', { afterEnable: true });
    q.disable();
    events = [];
    failSetQueue = [1]; // the attach (mocked once below) works, the detach of the undo fails
    vi.mocked(native.tunSetQueue).mockImplementationOnce((fd: number) => {
      events.push(`attach ${byFd.get(fd)}`);
    });
    const e = catchError(() => q.enable());
    expect(e.code).toBe(ErrorCodes.PARTIAL);
    expect(e).toMatchObject({ op: 'TUNSETQUEUE', queue: 1, ifname: 'hk0' });
    expect(e.message).toMatch(/becoming enabled failed \(.*VHOST_NET_SET_BACKEND.*\) and could not be undone \(.*TUNSETQUEUE.*\); queue now enabled/);
    expect(e.cause).toMatchObject({ op: 'VHOST_NET_SET_BACKEND' });
    expect(events).toEqual(['attach 1', 'a.afterEnable 1 FAILED', 'detach 1 FAILED']);
    expect(q.state).toBe('enabled');
  });

  it('close hooks run before close(2), also through Tap.close()', () => {
    const tap = fakeTap(2);
    tap.queues[0]!._onBeforeClose(() => events.push('hook 0'));
    tap.queues[1]!._onBeforeClose(() => events.push('hook 1'));
    tap.close();
    expect(events).toEqual(['hook 1', 'close(2) 1', 'hook 0', 'close(2) 0']);
  });
});

describe('Tap.setActiveQueues runs the hooks of every queue it changes', () => {
  it('4 -> 2 -> 4: each queue unhooked before its detach (last first), hooked after its attach', () => {
    const tap = fakeTap(4);
    for (const q of tap.queues) hook(q, 'h');
    tap.setActiveQueues(2);
    expect(events).toEqual(['h.beforeDisable 3', 'detach 3', 'h.beforeDisable 2', 'detach 2']);
    events = [];
    tap.setActiveQueues(4);
    expect(events).toEqual(['attach 2', 'h.afterEnable 2', 'attach 3', 'h.afterEnable 3']);
  });

  it('a hook failing at queue 3 undoes queue 3 and queue 2 (hooks included): previous state restored', () => {
    const tap = fakeTap(4);
    hook(tap.queues[2]!, 'h');
    hook(tap.queues[3]!, 'h', { afterEnable: true });
    tap.setActiveQueues(2);
    events = [];
    const e = catchError(() => tap.setActiveQueues(4));
    expect(e).toMatchObject({ op: 'VHOST_NET_SET_BACKEND', queue: 3 });
    expect(e.message).toMatch(/previous state restored/);
    expect(events).toEqual(['attach 2', 'h.afterEnable 2', 'attach 3', 'h.afterEnable 3 FAILED', 'detach 3', 'h.beforeDisable 2', 'detach 2']);
    expect(states(tap)).toBe('EEDD');
  });

  it('a step that cannot undo its own hook makes the whole call ERR_PARTIAL_STATE with every queue state', () => {
    const tap = fakeTap(4);
    hook(tap.queues[3]!, 'h', { afterEnable: true });
    tap.setActiveQueues(2);
    events = [];
    // queue 2: attach works; queue 3: attach works, hook fails, its detach fails.
    failSetQueue = [3];
    vi.mocked(native.tunSetQueue)
      .mockImplementationOnce((fd: number) => void events.push(`attach ${byFd.get(fd)}`))
      .mockImplementationOnce((fd: number) => void events.push(`attach ${byFd.get(fd)}`));
    const e = catchError(() => tap.setActiveQueues(4)) as MqtapError & { state?: unknown };
    expect(e.code).toBe(ErrorCodes.PARTIAL);
    expect(e.op).toBe('SET_ACTIVE');
    expect(e.message).toMatch(/could not be undone/);
    expect(e.state).toEqual([
      { index: 0, state: 'enabled' },
      { index: 1, state: 'enabled' },
      { index: 2, state: 'disabled' },
      { index: 3, state: 'enabled' },
    ]);
    expect(events).toEqual(['attach 2', 'attach 3', 'h.afterEnable 3 FAILED', 'detach 3 FAILED', 'detach 2']);
  });
});

/** A stand-in for VhostPairDriver: records bind/unbind/stop in the event log. */
function fakeDriver(index: number, fail: { bind?: boolean } = {}): VhostPairDriver & { stops: number } {
  let bound = true;
  let stopped = false;
  const d = {
    stops: 0,
    get bound() {
      return bound;
    },
    get stopped() {
      return stopped;
    },
    bind() {
      if (stopped) throw new Error('bind on a stopped driver');
      if (fail.bind) {
        fail.bind = false;
        events.push(`bind ${index} FAILED`);
        throw errno('VHOST_NET_SET_BACKEND', 5);
      }
      events.push(`bind ${index}`);
      bound = true;
    },
    unbind() {
      if (stopped) throw new Error('unbind on a stopped driver');
      events.push(`unbind ${index}`);
      bound = false;
    },
    stop() {
      if (stopped) return undefined;
      stopped = true;
      d.stops++;
      events.push(`stop ${index}`);
      bound = false;
      return { rx: 0, tx: 0 };
    },
  };
  return d as unknown as VhostPairDriver & { stops: number };
}

/** A Netdev of `n` pairs over a fake tap; every pair driven by a fake driver. */
function fakeNetdev(n: number, fail: Array<{ bind?: boolean }> = []): { nd: Netdev; drivers: Array<VhostPairDriver & { stops: number }> } {
  const tap = fakeTap(n);
  const pairs = tap.queues.map((q, i) => new QueuePair(i, q, -1));
  const drivers = pairs.map((p, i) => {
    const d = fakeDriver(i, fail[i]);
    p._setDriver(d);
    return d;
  });
  return { nd: new Netdev(tap, pairs, true, silentLogger), drivers };
}

describe('a driven pair: every way of changing its tap queue goes through the driver', () => {
  it('queue.disable() directly: backend unbound before the detach; queue.enable(): attached before the bind', () => {
    const { nd } = fakeNetdev(2);
    nd.pairs[1]!.tapQueue.disable();
    expect(events).toEqual(['unbind 1', 'detach 1']);
    events = [];
    nd.pairs[1]!.tapQueue.enable();
    expect(events).toEqual(['attach 1', 'bind 1']);
  });

  it('tap.setActiveQueues() directly and setActivePairs() do the same, in the same order', () => {
    const { nd } = fakeNetdev(4);
    nd.tap.setActiveQueues(2);
    const viaTap = events.splice(0);
    nd.tap.setActiveQueues(4);
    const upViaTap = events.splice(0);
    nd.setActivePairs(2);
    expect(events.splice(0)).toEqual(viaTap);
    nd.setActivePairs(4);
    expect(events.splice(0)).toEqual(upViaTap);
    expect(viaTap).toEqual(['unbind 3', 'detach 3', 'unbind 2', 'detach 2']);
    expect(upViaTap).toEqual(['attach 2', 'bind 2', 'attach 3', 'bind 3']);
  });

  it('setActivePairs: a bind that fails is undone with the tap\'s one undo logic (previous state restored)', () => {
    const { nd, drivers } = fakeNetdev(4, [{}, {}, {}, { bind: true }]);
    nd.setActivePairs(2);
    events = [];
    const e = catchError(() => nd.setActivePairs(4));
    expect(e).toMatchObject({ op: 'VHOST_NET_SET_BACKEND', queue: 3, ifname: 'hk0' });
    expect(e.message).toMatch(/previous state restored/);
    expect(events).toEqual(['attach 2', 'bind 2', 'attach 3', 'bind 3 FAILED', 'detach 3', 'unbind 2', 'detach 2']);
    expect(nd.pairs.map((p) => p.state)).toEqual(['enabled', 'enabled', 'disabled', 'disabled']);
    expect(drivers.map((d) => d.bound)).toEqual([true, true, false, false]);
  });

  it('queue.close() or tap.close() directly: the driver is stopped (backend unbound) before close(2)', () => {
    const { nd, drivers } = fakeNetdev(3);
    nd.pairs[2]!.tapQueue.close();
    expect(events).toEqual(['stop 2', 'close(2) 2']);
    expect(nd.pairs[2]!.driver).toBeUndefined();
    events = [];
    nd.tap.close();
    expect(events).toEqual(['stop 1', 'close(2) 1', 'stop 0', 'close(2) 0']);
    expect(drivers.map((d) => d.stops)).toEqual([1, 1, 1]);
  });

  it('a driver stopped by the pair or by hand leaves the queue alone afterwards', () => {
    const { nd, drivers } = fakeNetdev(3);
    nd.pairs[2]!.stopDriver();
    drivers[1]!.stop();
    events = [];
    nd.tap.setActiveQueues(1);
    nd.tap.setActiveQueues(3);
    nd.tap.close();
    expect(events).toEqual(['detach 2', 'detach 1', 'attach 1', 'attach 2', 'close(2) 2', 'close(2) 1', 'stop 0', 'close(2) 0']);
  });

  it('_setDriver(undefined) forgets the driver and its hooks (without stopping it)', () => {
    const { nd, drivers } = fakeNetdev(2);
    nd.pairs[1]!._setDriver(undefined);
    expect(nd.pairs[1]!.driver).toBeUndefined();
    nd.pairs[1]!.tapQueue.disable();
    nd.pairs[1]!.tapQueue.close();
    expect(events).toEqual(['detach 1', 'close(2) 1']);
    expect(drivers[1]!.stops).toBe(0);
  });

  it('a new driver on the same pair replaces the old one\'s hooks', () => {
    const { nd, drivers } = fakeNetdev(2);
    drivers[1]!.stop();
    const d2 = fakeDriver(1);
    nd.pairs[1]!._setDriver(d2);
    events = [];
    nd.pairs[1]!.tapQueue.disable();
    expect(events).toEqual(['unbind 1', 'detach 1']);
  });
});
