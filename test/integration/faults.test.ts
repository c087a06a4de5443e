/**
 * Faults under load, on the real kernel in a throw-away namespace: a peer
 * process SIGKILLed in the middle of a transfer, 100 times in a row.
 *
 * 1. The daemon (a real `mqtap daemon`): each round a client process
 *    acquires a 4-pair netdev's fds (SCM_RIGHTS) and loops
 *    acquire/show/release flat out, detaching and attaching the lent queues
 *    at random, until it is killed (every other round it
 *    SIGKILLs itself right after sending an acquire, so that the daemon
 *    sometimes replies to a peer that is gone and must drop the lease it had
 *    just taken: "N acquire replies undelivered" in the output says how
 *    often that race was hit).  After each kill the
 *    daemon drops the connection; a lease the dead client held stays (by
 *    design, docs/daemon.md) and is released by the test's client; the next
 *    client's first acquire is served.  At the end the daemon's fd count and
 *    the kernel's view of the tap are what they were before the kills.
 * 2. The vhost-user backend (serveVhostUser in this process): each round a
 *    front-end process sets up guest memory in a memfd, one queue pair, and
 *    moves frames through the TX ring until it is killed.  After each kill
 *    the backend notices the disconnect, unmaps that memfd (no line of it in
 *    this process's /proc/self/maps), closes the eventfds (fd count back),
 *    keeps the tap, and serves the next front-end.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { deleteTap, openTap } from '../../lib/tap/tap.js';
import { serveVhostUser } from '../../lib/vhost-user/backend.js';
import { ROOT, childHelpersReason, cliBuiltReason } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { need, openFds, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { stopChild } from '../helpers/proc';
import { countMappings } from '../helpers/vu-driver.js';
import { waitFor } from '../helpers/wait';

const ROUNDS = 100;
const DIST = join(ROOT, 'dist');
const HELPERS_JS = join(DIST, 'test', 'helpers');
const env = tapEnv();
// The children run the CLI and the front-end helpers compiled (CHILD_HELPERS:
// tsconfig.json compiles them).  Missing or stale: a skip, or a failure where
// the run requires everything (MQTAP_REQUIRE=all, as .ci/run sets).
const built = need('build', cliBuiltReason() || childHelpersReason());
const reason = !env.ok ? env.reason : built.reason;
if (reason) console.warn(`fault tests skipped: ${reason}`);

const children = new Set<ChildProcess>();
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of children) await stopChild(c, 'SIGKILL', 5000);
  children.clear();
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* best effort */
    }
  }
});

/** Runs `script` in a node child; resolves once it wrote `marker` on stdout (rejects if it exits or stays silent). */
async function startChild(script: string, marker: string, ms = 20_000): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`the child did not say "${marker}" within ${ms} ms: ${out} ${err}`)), ms);
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes(marker)) {
        clearTimeout(t);
        resolve();
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(t);
      reject(new Error(`the child exited (${code ?? signal}) before "${marker}": ${out} ${err}`));
    });
  });
  return child;
}

/** SIGKILLs `child` after 0..maxMs ms (mid-transfer: it never stops sending) and waits for it to be gone; it must die of SIGKILL. */
async function killSoon(child: ChildProcess, maxMs: number): Promise<void> {
  await new Promise((r) => setTimeout(r, Math.floor(Math.random() * (maxMs + 1))));
  if (child.exitCode === null && child.signalCode === null) {
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL'); // may race with a child that kills itself
    await gone;
  }
  expect(child.signalCode, 'the child died of SIGKILL, not of an error of its own').toBe('SIGKILL');
  children.delete(child);
}

describe.skipIf(!!reason)(`faults under load: SIGKILL mid-transfer, ${ROUNDS} times${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();

  afterAll(() => {
    for (const t of listTaps()) deleteTap(t.name);
  });

  it(`daemon: ${ROUNDS} clients killed while acquiring/releasing a 4-pair netdev; each next one is served; fds and kernel state unchanged`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-faults-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const d = await DaemonProcess.start({ dir });
    cleanups.push(() => d.dispose());
    const c = await DaemonClient.connect(d.socket);
    cleanups.push(() => c.close());
    await c.create({ name: 'fl0', pairs: 4, vhost: 'off' });
    const before = await c.show('fl0');
    expect(before.lease).toBeNull();
    const kernelBefore = getTap('fl0')!.tun;
    const baseline = d.fdCount(); // with our own client connected

    const script = `
const { DaemonClient } = require(${JSON.stringify(join(DIST, 'lib', 'daemon', 'client.js'))});
const { K, native } = require(${JSON.stringify(join(DIST, 'lib', 'sys', 'native.js'))});
(async () => {
  const c = await DaemonClient.connect(${JSON.stringify(d.socket)});
  for (let n = 0; ; n++) {
    const a = await c.acquire('fl0');
    if (a.tapFds.length !== 4) throw new Error('acquire gave ' + a.tapFds.length + ' tap fds');
    // Use the lent queues as a borrower may: detach/attach them (the daemon must take them back on release).
    for (const fd of a.tapFds) {
      try { native.tunSetQueue(fd, Math.random() < 0.5 ? K.IFF_DETACH_QUEUE : K.IFF_ATTACH_QUEUE); } catch { /* already so */ }
    }
    if (n === 0) process.stdout.write('busy\\n');
    await c.show('fl0');
    a.fds.close();
    await c.release('fl0');
  }
})().catch((e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });`;

    // Every other round the client SIGKILLs itself the moment its acquire is sent: the daemon then serves a
    // request from a peer that is gone, its reply (with the fds) cannot be delivered, and it must drop the lease.
    const suicide = `
const { UnixSocket } = require(${JSON.stringify(join(DIST, 'lib', 'sys', 'scm.js'))});
UnixSocket.connect(${JSON.stringify(d.socket)}, { type: 'seqpacket' }).then(async (s) => {
  process.stdout.write('busy\\n');
  await s.send(JSON.stringify({ id: 1, op: 'acquire', args: { name: 'fl0' } }));
  process.kill(process.pid, 'SIGKILL');
}).catch((e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });`;

    let heldByDead = 0;
    for (let i = 0; i < ROUNDS; i++) {
      // Its first acquire must be served: a lease left by the previous (dead) client was released below.
      const child = await startChild(i % 2 === 1 ? suicide : script, 'busy');
      await killSoon(child, 25);
      // The daemon notices the hang-up: the connection's fd is closed...
      await waitFor(`round ${i}: the daemon's fd count back to ${baseline}`, () => d.fdCount() === baseline, 10_000);
      // ...and an acquire whose reply died with the client was dropped again (no lease stays pending).
      let shown = await c.show('fl0');
      await waitFor(`round ${i}: no pending lease`, async () => !(shown = await c.show('fl0')).lease?.pending, 10_000);
      if (shown.lease) {
        // A lease the dead client did receive stays (docs/daemon.md): it is its, and another client can release it.
        expect(shown.lease, `round ${i}`).toMatchObject({ kind: 'client', pid: child.pid });
        heldByDead++;
        expect((await c.release('fl0')).lease).toBeNull();
      }
      // The queues the dead client detached or attached are the daemon's again, in the kernel too.
      expect(getTap('fl0')!.tun, `round ${i}: the kernel's view`).toMatchObject({ numQueues: kernelBefore.numQueues, numDisabledQueues: kernelBefore.numDisabledQueues });
      expect(d.alive).toBe(true);
    }
    const undelivered = d.logLines().filter((l) => l.op === 'acquire' && l.code === 'EPIPE').length;
    console.log(`daemon: ${ROUNDS} kills, ${heldByDead} left a lease that was released, ${ROUNDS - heldByDead} died without one, ${undelivered} acquire replies undelivered`);

    const after = await c.show('fl0');
    expect(after).toMatchObject({ lease: null, active: before.active, numQueues: before.numQueues, numDisabledQueues: before.numDisabledQueues });
    expect(after.kernelPairStates).toEqual(before.kernelPairStates);
    expect(getTap('fl0')!.tun).toMatchObject({ numQueues: kernelBefore.numQueues, numDisabledQueues: kernelBefore.numDisabledQueues });
    expect(d.fdCount()).toBe(baseline);
    // One more client after all the kills: served at once.
    const last = await DaemonClient.connect(d.socket);
    const a = await last.acquire('fl0');
    expect(a.tapFds).toHaveLength(4);
    a.fds.close();
    expect((await last.release('fl0')).lease).toBeNull();
    last.close();
    await waitFor('the last client gone', () => d.fdCount() === baseline);
    c.close();
    const exit = await d.stop('SIGTERM', 20_000);
    expect(exit).toEqual({ code: 0, signal: null });
    expect(d.logLines().filter((l) => Number(l.level) >= 50), 'no error-level log lines').toEqual([]);
  }, 300_000);

  it(`vhost-user: ${ROUNDS} front-ends killed while moving frames; memory unmapped, eventfds closed, tap kept, next one served`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-faults-vu-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    const TAP_MAC = '02:00:00:00:03:01';
    const tap = openTap({ name: 'flv0', queues: 1, mac: TAP_MAC });
    cleanups.push(() => tap.close());
    run('sysctl', ['-qw', 'net.ipv6.conf.flv0.disable_ipv6=1']);
    run('ip', ['link', 'set', 'dev', 'flv0', 'up']);
    const be = await serveVhostUser({ socket, tap, queues: 1 });
    cleanups.push(() => be.close());
    const fdsBefore = openFds().length;
    const kernelBefore = getTap('flv0')!.tun;

    const script = (memName: string): string => `
const { UnixSocket } = require(${JSON.stringify(join(DIST, 'lib', 'sys', 'scm.js'))});
const { FEATURE, PROTOCOL_FEATURE, bit } = require(${JSON.stringify(join(DIST, 'lib', 'vhost-user', 'protocol.js'))});
const { udp4Frame } = require(${JSON.stringify(join(DIST, 'lib', 'datapath', 'frames.js'))});
const { NEED_REPLY, ScriptedFrontend } = require(${JSON.stringify(join(HELPERS_JS, 'vhost-user.js'))});
const { DriverRing, F_WRITE, GuestMem } = require(${JSON.stringify(join(HELPERS_JS, 'vu-driver.js'))});
const PROTO = bit(PROTOCOL_FEATURE.MQ) | bit(PROTOCOL_FEATURE.REPLY_ACK) | bit(PROTOCOL_FEATURE.CONFIGURE_MEM_SLOTS) | bit(PROTOCOL_FEATURE.STATUS);
const ACKED = bit(FEATURE.VIRTIO_F_VERSION_1) | bit(FEATURE.VHOST_USER_F_PROTOCOL_FEATURES) | bit(FEATURE.VIRTIO_NET_F_MQ);
const HDR = 12;
(async () => {
  const mem = new GuestMem(${JSON.stringify(memName)}, 1 << 20);
  const rx = new DriverRing(mem, 64), tx = new DriverRing(mem, 64);
  const fe = new ScriptedFrontend(await UnixSocket.connect(${JSON.stringify(socket)}, { type: 'stream' }));
  await fe.u64('GET_FEATURES');
  await fe.send('SET_PROTOCOL_FEATURES', { kind: 'u64', value: PROTO });
  await fe.send('SET_OWNER');
  await fe.enableVector(1, 1);
  await fe.send('SET_FEATURES', { kind: 'u64', value: ACKED });
  for (const r of mem.regions()) {
    await fe.send('ADD_MEM_REG', { kind: 'memRegion', region: { guestPhysAddr: r.guestPhysAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset } }, [r.fd], NEED_REPLY);
    const rep = await fe.reply();
    if (rep.payload.value !== 0n) throw new Error('ADD_MEM_REG refused');
  }
  for (const [index, r] of [[0, rx], [1, tx]]) {
    const c = r.config();
    await fe.send('SET_VRING_NUM', { kind: 'vringState', index, num: r.num });
    await fe.send('SET_VRING_BASE', { kind: 'vringState', index, num: 0 });
    await fe.send('SET_VRING_ADDR', { kind: 'vringAddr', index, flags: 0, descAddr: c.descAddr, usedAddr: c.usedAddr, availAddr: c.availAddr, logAddr: 0n });
    await fe.send('SET_VRING_KICK', { kind: 'vringFd', index, noFd: false }, [r.kick]);
    await fe.send('SET_VRING_CALL', { kind: 'vringFd', index, noFd: false }, [r.call]);
  }
  await fe.enableVector(1, 1);
  await fe.u64('GET_STATUS');
  const heads = [];
  for (let i = 0; i < rx.num; i++) { rx.setDesc(i, mem.gpa(rx.bufOffset(i)), rx.bufSize, F_WRITE); heads.push(i); }
  rx.publish(heads);
  const frame = udp4Frame({ dstMac: ${JSON.stringify(TAP_MAC)}, srcMac: '02:00:00:00:03:02', srcIp: '169.254.80.2', dstIp: '169.254.80.1', srcPort: 4000, dstPort: 9, payload: Buffer.alloc(512, 0x61) });
  const free = [];
  for (let i = 0; i < tx.num; i++) {
    const off = tx.bufOffset(i);
    mem.u8.fill(0, off, off + HDR);
    mem.u8.set(frame, off + HDR);
    tx.setDesc(i, mem.gpa(off), HDR + frame.length, 0);
    free.push(i);
  }
  let done = 0;
  const pump = () => {
    for (const u of tx.collect()) { free.push(u.id); done++; }
    for (const u of rx.collect()) rx.publish([u.id], false);
    if (free.length) tx.publish(free.splice(0));
    if (done > 0 && !pump.said) { pump.said = true; process.stdout.write('busy\\n'); }
    setImmediate(pump);
  };
  pump();
})().catch((e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });`;

    for (let i = 0; i < ROUNDS; i++) {
      const memName = `mqtap-faults-${process.pid}-${i}`;
      const child = await startChild(script(memName), 'busy');
      expect(be.connected, `round ${i}: served`).toBe(true);
      expect(countMappings(memName), `round ${i}: the backend mapped the guest memory`).toBeGreaterThan(0);
      await killSoon(child, 20);
      await waitFor(`round ${i}: the backend to notice the disconnect`, () => !be.connected, 10_000);
      // The teardown is synchronous: once the connection reads as closed the memory must already be unmapped
      // (no waiting, so a garbage-collection finalizer cannot stand in for the unmap).
      expect(countMappings(memName), `round ${i}: the guest memory unmapped at the disconnect`).toBe(0);
      expect(be.connections, `round ${i}: a new connection each round`).toBe(i + 1);
      await waitFor(`round ${i}: the fd count back to ${fdsBefore}`, () => openFds().length === fdsBefore, 10_000);
      expect(be.closed).toBe(false);
      expect(getTap('flv0'), `round ${i}: the tap is kept`).toBeDefined();
    }
    console.log(`vhost-user: ${ROUNDS} front-ends killed mid-transfer`);
    expect(openFds().length).toBe(fdsBefore);
    expect(getTap('flv0')!.tun.numQueues).toBe(kernelBefore.numQueues);
  }, 300_000);
});
