/**
 * The daemon serves a netdev it holds over vhost-user (serve-vhost-user /
 * stop-vhost-user): a real `mqtap daemon` process in the test's network
 * namespace, DPDK's virtio-user PMD (dpdk-testpmd, io forwarding, 2 pairs)
 * as the front-end, as in vhost-user-dpdk.test.ts.  Datagrams the kernel
 * sends through the tap come back through testpmd; `mqtap stats` reads the
 * tap meanwhile; stop / release / delete --force / SIGTERM each remove the
 * socket and give the queues back; errors for an unknown netdev, a netdev
 * already served, and a leased one.
 *
 * Needs dpdk-testpmd and the virtio PMD (Debian: dpdk-dev, librte-net-virtio23,
 * librte-mempool-ring23); skipped with the reason when missing, a failure
 * when MQTAP_VM_REQUIRED=1.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { chmodSync, existsSync, lstatSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getLink, getTap, listTaps } from '../../lib/tap/links.js';
import { deleteTap } from '../../lib/tap/tap.js';
import { ROOT, cliBuiltReason, runCli } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { cannotLoadAs, need, needCommand, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { TESTPMD_MISSING, haveTestpmd, startTestpmd as spawnTestpmd, type Testpmd } from '../helpers/testpmd';
import { rejection, waitFor } from '../helpers/wait';

const base = tapEnv();
const env = base.ok && !haveTestpmd() ? { ok: false, reason: TESTPMD_MISSING } : base;
if (!env.ok && process.env.MQTAP_VM_REQUIRED === '1') throw new Error(`daemon vhost-user test cannot run (MQTAP_VM_REQUIRED=1): ${env.reason}`);
const built = cliBuiltReason();
const reason = !env.ok ? env.reason : built;

const LOCAL = '169.254.82.1';
const PEER = '169.254.82.2';
const TAP_MAC = '02:00:00:00:04:01';
const PEER_MAC = '02:00:00:00:04:02';

describe.skipIf(!!reason)(`daemon serve-vhost-user${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let daemon: DaemonProcess | undefined;
  const clients: DaemonClient[] = [];
  const children: ChildProcess[] = [];
  const prefix = `mqtap-dvu-${process.pid}`;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-dvu-'));
    daemon = await DaemonProcess.start({ dir });
  }, 30_000);

  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
    for (const ch of children.splice(0)) if (ch.exitCode === null && ch.signalCode === null) ch.kill('SIGKILL');
  });

  afterAll(async () => {
    if (daemon) await daemon.stop().catch(() => daemon!.proc.kill('SIGKILL'));
    for (const t of listTaps()) deleteTap(t.name);
    rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  async function connect(): Promise<DaemonClient> {
    const c = await DaemonClient.connect(daemon!.socket, { timeoutMs: 15_000 });
    clients.push(c);
    return c;
  }

  function startTestpmd(socket: string): Testpmd {
    return spawnTestpmd(socket, prefix, (child) => children.push(child));
  }

  it('serve: DPDK virtio-user connects to the socket the reply names, frames flow through the tap both ways, `mqtap stats` reads the tap; stop: socket gone, the daemon\'s active pairs back', async () => {
    const c = await connect();
    // One active pair as the daemon holds it: the guest attaches both, stop gives the daemon's one back.
    const created = await c.create({ name: 'dvu0', pairs: 2, vhost: 'off', mac: TAP_MAC, active: 1 });
    expect(created.kernelPairStates).toEqual(['enabled', 'disabled']);
    run('sysctl', ['-qw', 'net.ipv6.conf.dvu0.disable_ipv6=1']);
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', 'dvu0']);
    run('ip', ['link', 'set', 'dev', 'dvu0', 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', 'dvu0', 'nud', 'permanent']);

    const served = await c.serveVhostUser('dvu0');
    expect(served.socket).toBe(join(daemon!.stateDir, 'vhost-user', 'dvu0.sock'));
    const st = lstatSync(served.socket);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(served.lease).toMatchObject({ kind: 'vhost-user', socket: served.socket, pid: process.pid });
    expect(served.vhostUser).toMatchObject({ socket: served.socket, connected: false });

    const t = startTestpmd(served.socket);
    await waitFor('both pairs live', async () => (await c.show('dvu0')).vhostUser?.livePairs.length === 2, 30_000).catch(() => {
      throw new Error(`testpmd did not bring both pairs up; its output:\n${t.output()}\ndaemon log:\n${daemon!.log().slice(-3000)}`);
    });
    expect(getTap('dvu0')!.tun).toMatchObject({ numQueues: 2, numDisabledQueues: 0 });
    // Live pairs are not yet a forwarding testpmd: it flushes its RX queues first (test/helpers/testpmd.ts).
    await t.forwarding();

    const s = dgram.createSocket('udp4');
    try {
      await new Promise<void>((res) => s.bind(0, LOCAL, () => res()));
      const stats = (): { rx: bigint; tx: bigint } => {
        const x = getLink('dvu0')!.stats!;
        return { rx: BigInt(x.rxPackets), tx: BigInt(x.txPackets) };
      };
      const before = stats();
      const N = 64;
      for (let i = 0; i < N; i++) await new Promise<void>((res, rej) => s.send(Buffer.from(`flow ${i}`), 7000 + i, PEER, (e) => (e ? rej(e) : res())));
      await waitFor('the frames back through the tap', () => stats().rx - before.rx >= BigInt(N), 15_000).catch(async () => {
        throw new Error(`the frames did not come back: ${JSON.stringify((await c.show('dvu0')).vhostUser)}\n${t.output().slice(-2000)}`);
      });
      expect(stats().tx - before.tx).toBeGreaterThanOrEqual(BigInt(N));
    } finally {
      s.close();
    }
    // The backend counts a TX batch once all of it is written, after the kernel counted it on the tap.
    await waitFor('the backend to count the frames', async () => {
      const v = (await c.show('dvu0')).vhostUser!;
      return v.rxFrames >= 64 && v.txFrames >= 64;
    }, 10_000).catch(() => undefined);
    const vu = (await c.show('dvu0')).vhostUser!;
    expect(vu.connected).toBe(true);
    expect(vu.rxFrames).toBeGreaterThanOrEqual(64);
    expect(vu.txFrames).toBeGreaterThanOrEqual(64);
    const listed = (await c.list()).find((n) => n.name === 'dvu0')!;
    expect(listed.lease).toMatchObject({ kind: 'vhost-user' });

    // `mqtap stats` on the tap while the daemon serves it: the queues are held, so the kernel's counters are read.
    const r = runCli(['stats', 'dvu0', '--json', '--interval', '300'], { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n')[0]!)).toMatchObject({ name: 'dvu0' });

    // stop while testpmd is still connected.
    const stopped = await c.stopVhostUser('dvu0');
    expect(stopped.stopped).toBe(served.socket);
    expect(stopped.lease).toBeNull();
    expect(stopped.vhostUser).toBeNull();
    expect(existsSync(served.socket)).toBe(false);
    expect(stopped.kernelPairStates).toEqual(['enabled', 'disabled']);
    expect(stopped.pairStates).toEqual(['enabled', 'disabled']);
    expect(getTap('dvu0')!.tun).toMatchObject({ numQueues: 1, numDisabledQueues: 1 });
    // The netdev is free again: a lease works.
    const a = await c.acquire('dvu0');
    a.fds.close();
    await c.release('dvu0');
    t.child.kill('SIGINT');
    await t.exited;
    expect(existsSync(served.socket)).toBe(false);
  }, 120_000);

  it('errors: unknown netdev (ENODEV), already served (EBUSY), leased (EBUSY), a socket path that exists (EEXIST); served: acquire, set-active and delete refuse; release and delete --force stop serving', async () => {
    const c = await connect();
    await c.create({ name: 'dvu1', pairs: 2, vhost: 'off' });
    await c.create({ name: 'dvu2', pairs: 1, vhost: 'off' });

    const unknown = await rejection(c.serveVhostUser('nosuch0'));
    expect(unknown).toMatchObject({ code: 'ENODEV' });
    expect(unknown.hint).toBeTruthy();

    const sock = join(dir, 'dvu1.sock');
    const served = await c.serveVhostUser('dvu1', { socket: sock });
    expect(served.socket).toBe(sock);
    expect(lstatSync(sock).mode & 0o777).toBe(0o600);
    const again = await rejection(c.serveVhostUser('dvu1'));
    expect(again).toMatchObject({ code: 'EBUSY' });
    expect(again.hint).toContain('stop-vhost-user');
    expect(await rejection(c.acquire('dvu1'))).toMatchObject({ code: 'EBUSY' });
    expect(await rejection(c.setActive('dvu1', 1))).toMatchObject({ code: 'EBUSY' });
    expect(await rejection(c.delete('dvu1'))).toMatchObject({ code: 'EBUSY' });
    // Another netdev on a path that exists.
    const exists = await rejection(c.serveVhostUser('dvu2', { socket: sock }));
    expect(exists).toMatchObject({ code: 'EEXIST' });
    expect((await c.show('dvu2')).lease).toBeNull();
    // stop-vhost-user of a netdev not served.
    expect(await rejection(c.stopVhostUser('dvu2'))).toMatchObject({ code: 'EINVAL' });

    // release stops serving.
    const rel = await c.release('dvu1');
    expect(rel.lease).toBeNull();
    expect(existsSync(sock)).toBe(false);

    // A leased netdev cannot be served.
    const a = await c.acquire('dvu2');
    try {
      const leased = await rejection(c.serveVhostUser('dvu2'));
      expect(leased).toMatchObject({ code: 'EBUSY' });
      expect(leased.hint).toContain('release');
    } finally {
      a.fds.close();
      await c.release('dvu2');
    }

    // delete --force stops serving and removes the socket.
    const s2 = await c.serveVhostUser('dvu2');
    expect(existsSync(s2.socket)).toBe(true);
    await c.delete('dvu2', { force: true });
    expect(existsSync(s2.socket)).toBe(false);
    expect(getTap('dvu2')).toBeUndefined();
    await c.delete('dvu1');
  }, 60_000);

  it('CLI: `mqtap client serve-vhost-user NAME --json` prints the socket, `show` names it, `stop-vhost-user` removes it', async () => {
    const c = await connect();
    await c.create({ name: 'dvu4', pairs: 1, vhost: 'off' });
    const r = runCli(['client', '--socket', daemon!.socket, 'serve-vhost-user', 'dvu4', '--json'], { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(0);
    const socket = (JSON.parse(r.stdout) as { socket: string }).socket;
    expect(lstatSync(socket).isSocket()).toBe(true);
    const show = runCli(['client', '--socket', daemon!.socket, 'show', 'dvu4'], { timeoutMs: 20_000 });
    expect(show.stdout).toContain(`vhost-user socket:`);
    expect(show.stdout).toContain(socket);
    const stop = runCli(['client', '--socket', daemon!.socket, 'stop-vhost-user', 'dvu4'], { timeoutMs: 20_000 });
    expect(stop.code, stop.stderr).toBe(0);
    expect(stop.stdout).toContain('no longer served');
    expect(existsSync(socket)).toBe(false);
    const again = runCli(['client', '--socket', daemon!.socket, 'stop-vhost-user', 'dvu4'], { timeoutMs: 20_000 });
    expect(again.code).not.toBe(0);
    expect(again.stderr).toContain('not served');
    await c.delete('dvu4');
  }, 60_000);

  const CLIENT_JS = join(ROOT, 'dist', 'lib', 'daemon', 'client.js');
  it.skipIf(!needCommand('setpriv').ok || !need('checkout readable by uid 65534', cannotLoadAs(65534, CLIENT_JS)).ok)(
    "with --group: a member's serve gets the default socket, 0660 and the group's; a member may not choose the path (EACCES)",
    async () => {
      chmodSync(dir, 0o711);
      const g = await DaemonProcess.start({ dir: join(dir, 'group'), args: ['--group', '4242'] });
      try {
        const root = await DaemonClient.connect(g.socket, { timeoutMs: 15_000 });
        clients.push(root);
        await root.create({ name: 'dvu5', pairs: 1, vhost: 'off' });
        const script = (socket?: string): string => `
const { DaemonClient } = require(${JSON.stringify(CLIENT_JS)});
DaemonClient.connect(${JSON.stringify(g.socket)}, { timeoutMs: 10000 }).then(
  async (c) => { const r = await c.serveVhostUser('dvu5', ${socket ? JSON.stringify({ socket }) : '{}'}).then((d) => ({ ok: true, socket: d.socket }), (e) => ({ ok: false, code: e.code, hint: e.hint })); c.close(); console.log(JSON.stringify(r)); },
  (e) => console.log(JSON.stringify({ ok: false, code: e.code, message: e.message })),
);`;
        const runAs = (socket?: string): Record<string, unknown> => {
          const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--groups=4242', process.execPath, '-e', script(socket)], { encoding: 'utf8', timeout: 30_000 });
          return JSON.parse(r.stdout || '{}') as Record<string, unknown>;
        };
        const chosen = runAs(join(dir, 'member.sock'));
        expect(chosen).toMatchObject({ ok: false, code: 'EACCES' });
        expect(String(chosen.hint)).toContain('vhost-user');
        expect(existsSync(join(dir, 'member.sock'))).toBe(false);
        const ok = runAs();
        expect(ok).toMatchObject({ ok: true, socket: join(g.stateDir, 'vhost-user', 'dvu5.sock') });
        const st = lstatSync(ok.socket as string);
        expect(st.mode & 0o777).toBe(0o660);
        expect(st.gid).toBe(4242);
        await root.stopVhostUser('dvu5');
        expect(existsSync(ok.socket as string)).toBe(false);
      } finally {
        await g.stop().catch(() => g.proc.kill('SIGKILL'));
      }
    },
    60_000,
  );

  it('daemon shutdown (SIGTERM) stops serving and removes the socket', async () => {
    const c = await connect();
    await c.create({ name: 'dvu3', pairs: 2, vhost: 'off' });
    const served = await c.serveVhostUser('dvu3');
    expect(existsSync(served.socket)).toBe(true);
    c.close();
    const st = await daemon!.stop();
    expect(st.code).toBe(0);
    expect(existsSync(served.socket)).toBe(false);
    daemon = await DaemonProcess.start({ dir });
  }, 60_000);
});
