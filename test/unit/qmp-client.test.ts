/**
 * QmpClient and the hotplug/unplug sequences against a scripted fake QEMU
 * (a UNIX stream server in this process speaking QMP): capability
 * negotiation, ids, events, errors, timeouts, a peer that goes away, fds
 * attached to exactly the getfd command they belong to, and the rollback of
 * a hot-add that fails at each step.  No QEMU, no root (eventfds stand in
 * for tap fds).
 */
import { readdirSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../lib/sys/errors.js';
import { hotplugFds, unplugNetdev } from '../../lib/qemu/hotplug.js';
import { native } from '../../lib/sys/native.js';
import { QmpClient, QmpError } from '../../lib/qemu/qmp.js';
import { fakeQemu as startFakeQemu, type Fake, type Handler, type Logged } from '../helpers/fake-qmp';
import { rejection } from '../helpers/wait';

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

const fakeQemu = (handler: Handler, opts: { greeting?: unknown } = {}): Promise<Fake> => startFakeQemu(handler, opts, cleanups);

async function connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
  const q = await QmpClient.connect(path, { timeoutMs });
  cleanups.push(() => q.close());
  return q;
}

function eventfds(n: number): number[] {
  const fds = Array.from({ length: n }, () => native.eventfdOpen());
  cleanups.push(() => fds.forEach((fd) => native.close(fd)));
  return fds;
}

const ok = (): unknown => ({ return: {} });

describe('QmpClient', () => {
  it('negotiates capabilities first and reports the version', async () => {
    const fake = await fakeQemu((c) => (c.execute === 'query-name' ? { return: { name: 'vm' } } : ok()));
    const q = await connect(fake.path);
    expect(q.qemuVersion).toBe('7.2.99');
    expect(await q.execute('query-name')).toEqual({ name: 'vm' });
    expect(fake.commands()).toEqual(['qmp_capabilities', 'query-name']);
    const ids = fake.log.map((l) => l.id);
    expect(new Set(ids).size).toBe(ids.length);
  });

  it('turns error replies into QmpError with class and description', async () => {
    const fake = await fakeQemu(() => ({ error: { class: 'CommandNotFound', desc: 'The command nope has not been found' } }));
    const q = await connect(fake.path);
    const e = await rejection(q.execute('nope'));
    expect(e).toBeInstanceOf(QmpError);
    expect((e as QmpError).qmpClass).toBe('CommandNotFound');
    expect((e as QmpError).command).toBe('nope');
    expect(e.message).toMatch(/has not been found/);
  });

  it('delivers events and lets a wait subscribe before the command that causes the event', async () => {
    const fake = await fakeQemu((c, send) => {
      if (c.execute === 'device_del') {
        send({ event: 'DEVICE_DELETED', data: { path: '/machine/peripheral/nic1/virtio-backend' }, timestamp: { seconds: 1, microseconds: 0 } });
        send({ event: 'DEVICE_DELETED', data: { device: 'nic1', path: '/machine/peripheral/nic1' }, timestamp: { seconds: 1, microseconds: 1 } });
      }
      return ok();
    });
    const q = await connect(fake.path);
    const seen: string[] = [];
    q.on('event', (ev: { event: string }) => seen.push(ev.event));
    const wait = q.waitForEvent('DEVICE_DELETED', (d) => d.device === 'nic1', 5000);
    await q.execute('device_del', { id: 'nic1' });
    const ev = await wait.promise;
    expect(ev.data).toEqual({ device: 'nic1', path: '/machine/peripheral/nic1' });
    expect(seen).toEqual(['DEVICE_DELETED', 'DEVICE_DELETED']);
  });

  it('times out a command that gets no reply and drops the late reply; the next command works', async () => {
    let slow: Logged | undefined;
    let sendLater: ((m: unknown) => void) | undefined;
    const fake = await fakeQemu((c, send) => {
      if (c.execute === 'slow') {
        slow = c;
        sendLater = send;
        return undefined;
      }
      return { return: c.execute };
    });
    const q = await connect(fake.path);
    const e = await rejection(q.execute('slow', undefined, { timeoutMs: 200 }));
    expect(e.code).toBe('ETIMEDOUT');
    sendLater!({ return: 'late', id: slow!.id });
    expect(await q.execute('fast')).toBe('fast');
  });

  it('a server that never greets: connect fails with ETIMEDOUT and leaves no fd', async () => {
    const fake = await fakeQemu(ok, { greeting: null });
    const before = readdirSync('/proc/self/fd').length;
    const e = await rejection(QmpClient.connect(fake.path, { timeoutMs: 300 }));
    expect(e.code).toBe('ETIMEDOUT');
    expect(e.hint).toMatch(/one at a time/);
    // The client closed its socket; the fake's end sees EOF and closes too (bounded wait).
    const deadline = Date.now() + 3000;
    while (readdirSync('/proc/self/fd').length !== before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(readdirSync('/proc/self/fd').length).toBe(before);
  });

  it('a first message that is no greeting is a protocol error', async () => {
    const fake = await fakeQemu(ok, { greeting: { hello: 1 } });
    expect((await rejection(QmpClient.connect(fake.path, { timeoutMs: 2000 }))).code).toBe('EPROTO');
  });

  it('a peer that goes away mid-command rejects the command (ERR_CLOSED), and later ones at once', async () => {
    const fake = await fakeQemu((c, _send, sock) => {
      if (c.execute === 'quit') sock.close();
      return undefined;
    });
    const q = await connect(fake.path);
    const e = await rejection(q.execute('quit', undefined, { timeoutMs: 5000 }));
    expect(e.code).toBe(ErrorCodes.CLOSED);
    expect(q.closed).toBe(true);
    expect((await rejection(q.execute('query-status'))).code).toBe(ErrorCodes.CLOSED);
    expect((await rejection(q.waitForEvent('STOP').promise)).code).toBe(ErrorCodes.CLOSED);
  });

  it('connect to a missing socket explains how to start QEMU', async () => {
    const e = await rejection(QmpClient.connect('/nonexistent/qmp.sock'));
    expect(e.code).toBe('ENOENT');
    expect(e.hint).toMatch(/-qmp unix:/);
  });

  it('runs commands one at a time, in call order', async () => {
    const order: string[] = [];
    const fake = await fakeQemu((c, send) => {
      order.push(c.execute);
      setTimeout(() => send({ return: c.execute, id: c.id }), c.execute === 'a' ? 50 : 0);
      return undefined;
    });
    const q = await connect(fake.path);
    const results = await Promise.all([q.execute('a'), q.execute('b'), q.execute('c')]);
    expect(results).toEqual(['a', 'b', 'c']);
    expect(order).toEqual(['a', 'b', 'c']);
    expect(fake.log.filter((l) => l.execute !== 'qmp_capabilities').map((l) => l.execute)).toEqual(['a', 'b', 'c']);
  });
});

describe('hotplug sequence (fake QEMU)', () => {
  it('getfd with exactly one fd on its own bytes, then netdev_add and device_add with typed arguments', async () => {
    const fake = await fakeQemu(ok);
    const q = await connect(fake.path);
    const tap = eventfds(3);
    const vhost = eventfds(3);
    const r = await hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: tap, vhostFds: vhost, bus: 'rp0' });
    expect(r).toMatchObject({ id: 'nic1', netdevId: 'nic1-netdev', queues: 3, vhost: true });
    const cmds = fake.log.filter((l) => l.execute !== 'qmp_capabilities');
    expect(cmds.map((l) => l.execute)).toEqual(['getfd', 'getfd', 'getfd', 'getfd', 'getfd', 'getfd', 'netdev_add', 'device_add']);
    for (const l of cmds) expect(l.fds.length).toBe(l.execute === 'getfd' ? 1 : 0);
    for (const l of cmds.slice(0, 6)) expect(l.fds[0]).toMatch(/eventfd/);
    const names = cmds.slice(0, 6).map((l) => l.arguments!.fdname as string);
    expect(new Set(names).size).toBe(6);
    expect(r.fdNames).toEqual(names);
    expect(cmds[6]!.arguments).toEqual({ type: 'tap', id: 'nic1-netdev', fds: names.slice(0, 3).join(':'), vhost: true, vhostfds: names.slice(3).join(':') });
    expect(cmds[7]!.arguments).toEqual({ driver: 'virtio-net-pci', id: 'nic1', netdev: 'nic1-netdev', mq: true, vectors: 8, romfile: '', bus: 'rp0' });
  });

  it('device_add fails: netdev_del undoes the netdev (QEMU closes the fds), the error says so', async () => {
    const fake = await fakeQemu((c) => (c.execute === 'device_add' ? { error: { class: 'GenericError', desc: "Bus 'nope' not found" } } : ok()));
    const q = await connect(fake.path);
    const e = await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(2), bus: 'nope' }));
    expect(e).toBeInstanceOf(QmpError);
    expect(e.message).toMatch(/device_add failed.*Bus 'nope' not found.*undone/);
    const cmds = fake.commands().slice(1);
    expect(cmds).toEqual(['getfd', 'getfd', 'netdev_add', 'device_add', 'netdev_del']);
    expect(fake.log.at(-1)!.arguments).toEqual({ id: 'nic1-netdev' });
  });

  it('netdev_add fails: closefd of every registered name ("not found" for names QEMU took is fine)', async () => {
    let closefds = 0;
    const fake = await fakeQemu((c) => {
      if (c.execute === 'netdev_add') return { error: { class: 'GenericError', desc: 'Duplicate ID' } };
      if (c.execute === 'closefd' && closefds++ === 0) return { error: { class: 'GenericError', desc: `File descriptor named '${String(c.arguments!.fdname)}' not found` } };
      return ok();
    });
    const q = await connect(fake.path);
    const e = await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(3) }));
    expect(e.message).toMatch(/netdev_add failed.*undone/);
    const cmds = fake.log.slice(1);
    expect(cmds.map((l) => l.execute)).toEqual(['getfd', 'getfd', 'getfd', 'netdev_add', 'closefd', 'closefd', 'closefd']);
    expect(cmds.slice(4).map((l) => l.arguments!.fdname)).toEqual(cmds.slice(0, 3).map((l) => l.arguments!.fdname));
  });

  it('getfd fails half-way: the names registered so far are closed', async () => {
    let n = 0;
    const fake = await fakeQemu((c) => (c.execute === 'getfd' && ++n === 3 ? { error: { class: 'GenericError', desc: 'No file descriptor supplied via SCM_RIGHTS' } } : ok()));
    const q = await connect(fake.path);
    await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(4) }));
    const cmds = fake.log.slice(1);
    expect(cmds.map((l) => l.execute)).toEqual(['getfd', 'getfd', 'getfd', 'closefd', 'closefd']);
    expect(cmds.slice(3).map((l) => l.arguments!.fdname)).toEqual(cmds.slice(0, 2).map((l) => l.arguments!.fdname));
  });

  it('a step that timed out is undone as if it had run: netdev_add -> netdev_del and closefd ("not found" is fine)', async () => {
    const fake = await fakeQemu((c) => {
      if (c.execute === 'netdev_add') return undefined; // never answered
      if (c.execute === 'netdev_del') return { error: { class: 'DeviceNotFound', desc: "Device 'nic1-netdev' not found" } };
      return ok();
    });
    const q = await connect(fake.path, 300);
    const e = await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(2) }));
    expect(e.code).toBe('ETIMEDOUT');
    expect(e.message).toMatch(/netdev_add failed.*undone/);
    expect(fake.commands().slice(1)).toEqual(['getfd', 'getfd', 'netdev_add', 'netdev_del', 'closefd', 'closefd']);
  });

  it('device_add that timed out: device_del, then netdev_del; the device is reported as left to the guest', async () => {
    const fake = await fakeQemu((c) => (c.execute === 'device_add' ? undefined : ok()));
    const q = await connect(fake.path, 300);
    const e = await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(1) }));
    expect(e.code).toBe(ErrorCodes.PARTIAL);
    expect(e.message).toMatch(/device_add failed.*left in QEMU: device nic1 \(device_add timed out/);
    expect(fake.commands().slice(1)).toEqual(['getfd', 'netdev_add', 'device_add', 'device_del', 'netdev_del']);
  });

  it('an undo that fails too is ERR_PARTIAL_STATE naming what is left', async () => {
    const fake = await fakeQemu((c) => {
      if (c.execute === 'device_add') return { error: { class: 'GenericError', desc: 'no' } };
      if (c.execute === 'netdev_del') return { error: { class: 'GenericError', desc: 'busy' } };
      return ok();
    });
    const q = await connect(fake.path);
    const e = await rejection(hotplugFds(q, { id: 'nic1', verifyFds: false, tapFds: eventfds(1) }));
    expect(e.code).toBe(ErrorCodes.PARTIAL);
    expect(e.message).toMatch(/left in QEMU: netdev nic1-netdev/);
  });

  it('refuses bad input before talking to QEMU', async () => {
    const fake = await fakeQemu(ok);
    const q = await connect(fake.path);
    for (const opts of [
      { id: '1bad', tapFds: [3] },
      { id: 'nic1', tapFds: [] },
      { id: 'nic1', tapFds: [3, 4], vhostFds: [5] },
      { id: 'nic1', tapFds: [-1] },
      { id: 'nic1', tapFds: [3], mac: 'zz' },
      { id: 'nic1', tapFds: [3], addr: 'slot1' },
    ]) {
      expect((await rejection(hotplugFds(q, opts))).code).toBe('ERR_INVALID_ARG');
    }
    expect(fake.commands()).toEqual(['qmp_capabilities']);
  });
});

describe('unplug sequence (fake QEMU)', () => {
  it('asks QEMU for the netdev, device_del, waits for DEVICE_DELETED, netdev_del, closefd leftovers', async () => {
    const fake = await fakeQemu((c, send) => {
      if (c.execute === 'qom-get') return { return: 'nd-from-qemu' };
      if (c.execute === 'device_del') setTimeout(() => send({ event: 'DEVICE_DELETED', data: { device: 'nic1', path: '/machine/peripheral/nic1' } }), 30);
      if (c.execute === 'closefd') return { error: { class: 'GenericError', desc: 'File descriptor named x not found' } };
      return ok();
    });
    const q = await connect(fake.path);
    expect(await unplugNetdev(q, { id: 'nic1', fdNames: ['x'] })).toEqual({ id: 'nic1', netdevId: 'nd-from-qemu' });
    expect(fake.commands().slice(1)).toEqual(['qom-get', 'device_del', 'netdev_del', 'closefd']);
    expect(fake.log[1]!.arguments).toEqual({ path: '/machine/peripheral/nic1', property: 'netdev' });
    expect(fake.log[3]!.arguments).toEqual({ id: 'nd-from-qemu' });
  });

  it('a guest that never releases the device: ETIMEDOUT with a hint, and the netdev is left alone', async () => {
    const fake = await fakeQemu(ok);
    const q = await connect(fake.path);
    const e = await rejection(unplugNetdev(q, { id: 'nic1', netdevId: 'nd1', unplugTimeoutMs: 200 }));
    expect(e.code).toBe('ETIMEDOUT');
    expect(e.hint).toMatch(/did not release nic1/);
    expect(fake.commands().slice(1)).toEqual(['device_del']);
  });

  it('an unknown device is ENODEV', async () => {
    const fake = await fakeQemu((c) => (c.execute === 'qom-get' ? { error: { class: 'DeviceNotFound', desc: "Device 'nic9' not found" } } : ok()));
    const q = await connect(fake.path);
    const e = await rejection(unplugNetdev(q, { id: 'nic9' }));
    expect(e.code).toBe('ENODEV');
  });
});
