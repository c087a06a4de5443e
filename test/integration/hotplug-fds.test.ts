/**
 * hotplugFds with raw fds runs launch's checks (qemu.ts verifyNetdevFds)
 * before anything reaches QEMU: real taps in a throw-away namespace, a fake
 * QEMU speaking QMP (test/helpers/fake-qmp.ts).  Queues of two different
 * taps, a detached queue, a non-tap fd, a vhost fd that is not
 * /dev/vhost-net and a count mismatch are refused with a clear MqtapError;
 * QEMU sees no getfd, and no fd is left open.  Good fds still go through.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { hotplugFds } from '../../lib/qemu/hotplug.js';
import { native } from '../../lib/sys/native.js';
import { QmpClient } from '../../lib/qemu/qmp.js';
import { openTap } from '../../lib/tap/tap.js';
import { fakeQemu, type Fake } from '../helpers/fake-qmp.js';
import { fdCount, openFds, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { rejection } from '../helpers/wait.js';

const env = tapEnv();

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

const ok = (): unknown => ({ return: {} });

async function qemu(): Promise<{ fake: Fake; q: QmpClient }> {
  const fake = await fakeQemu(ok, {}, cleanups);
  const q = await QmpClient.connect(fake.path, { timeoutMs: 5000 });
  cleanups.push(() => q.close());
  return { fake, q };
}

/** hotplugFds must fail before any command, leaving the fd count unchanged. */
async function refused(opts: Parameters<typeof hotplugFds>[1]): Promise<MqtapError> {
  const { fake, q } = await qemu();
  const before = fdCount();
  const e = await rejection(hotplugFds(q, opts));
  expect(fdCount()).toBe(before);
  expect(fake.commands()).toEqual(['qmp_capabilities']);
  expect(e).toBeInstanceOf(MqtapError);
  return e as MqtapError;
}

describe.skipIf(!env.ok)(`hotplugFds checks the fds like launch${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();

  it('fds of two different taps: refused, naming both taps', async () => {
    const a = track(openTap({ name: 'hpa', queues: 2 }));
    const b = track(openTap({ name: 'hpb', queues: 2 }));
    const e = await refused({ id: 'nic1', tapFds: [a.queues[0]!.fd, b.queues[1]!.fd] });
    expect(e.op).toBe('HOTPLUG');
    expect(e.code).toBe('EINVAL');
    expect(e.message).toMatch(/is a queue of hpb but fd \d+ is a queue of hpa: one -netdev takes the queues of one tap/);
  });

  it('a detached (disabled) queue: refused with the hint to enable it', async () => {
    const t = track(openTap({ name: 'hpd', queues: 3 }));
    t.queues[2]!.disable();
    const e = await refused({ id: 'nic1', tapFds: t.fds() });
    expect(e.code).toBe('EINVAL');
    expect(e.queue).toBe(2);
    expect(e.message).toMatch(/hpd queue 2 .* is disabled \(detached\)/);
    expect(e.hint).toMatch(/enable every queue/);
  });

  it('an fd that is not a tap queue (an eventfd; no fd at all): refused', async () => {
    const t = track(openTap({ name: 'hpn', queues: 2 }));
    const efd = native.eventfdOpen();
    cleanups.push(() => native.close(efd));
    const e = await refused({ id: 'nic1', tapFds: [t.queues[0]!.fd, efd] });
    expect(e.queue).toBe(1);
    expect(e.message).toMatch(/is not a tap queue: it is not a \/dev\/net\/tun fd/);
    expect(e.hint).toMatch(/openNetdev/);
    const closed = Math.max(...openFds()) + 1000; // no fd by that number (the QMP socket may reuse a just-closed one)
    const e2 = await refused({ id: 'nic1', tapFds: [closed] });
    expect(e2.code).toBe('EBADF');
  });

  it('a vhost fd that is not /dev/vhost-net, and a vhost/tap count mismatch: refused', async () => {
    const t = track(openTap({ name: 'hpv', queues: 2 }));
    const efds = [native.eventfdOpen(), native.eventfdOpen()];
    cleanups.push(() => efds.forEach((fd) => native.close(fd)));
    const e = await refused({ id: 'nic1', tapFds: t.fds(), vhostFds: efds });
    expect(e.code).toBe('EINVAL');
    expect(e.message).toMatch(/vhost fd 0 .* is not \/dev\/vhost-net/);
    const e2 = await refused({ id: 'nic1', tapFds: t.fds(), vhostFds: [efds[0]!] });
    expect(e2.code).toBe('ERR_INVALID_ARG');
    expect(e2.message).toMatch(/2 tap fd\(s\) but 1 vhost-net fd\(s\)/);
  });

  it('attached queues of one tap go through: one getfd per fd, then netdev_add and device_add', async () => {
    const t = track(openTap({ name: 'hpok', queues: 2 }));
    const { fake, q } = await qemu();
    const r = await hotplugFds(q, { id: 'nic1', tapFds: t.fds() });
    expect(r.queues).toBe(2);
    expect(fake.commands()).toEqual(['qmp_capabilities', 'getfd', 'getfd', 'netdev_add', 'device_add']);
    for (const l of fake.log.slice(1, 3)) expect(l.fds[0]).toMatch(/tun/);
  });
});
