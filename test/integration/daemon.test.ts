/**
 * The management daemon as a real process (`node dist/bin/mqtap.js daemon`)
 * with real clients, inside a throw-away network namespace (the daemon is
 * spawned after isolateNetns() and inherits it); sockets and state dirs live
 * in a temp dir removed afterwards.  Every result is cross-checked with the
 * kernel (rtnetlink numqueues/numdisabled, TUNGETIFF on received fds).
 *
 * Covers: socket mode and SO_PEERCRED, create/open/list/show/set-active,
 * acquire (fds over SCM_RIGHTS, > 64 fds in chunks), leases and resync,
 * release, delete, SIGTERM + restart re-adopting persistent taps, and
 * authorization (file mode, SO_PEERCRED refusal, --group).
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonClient } from '../../lib/daemon/client.js';
import { getTap, listTaps } from '../../lib/tap/links.js';
import { K, native } from '../../lib/sys/native.js';
import { deleteTap, openTap } from '../../lib/tap/tap.js';
import { probeVhostNet } from '../../lib/vhost/vhost.js';
import { ROOT, CLI, cliBuiltReason, runCli } from '../helpers/cli';
import { DaemonProcess } from '../helpers/daemon';
import { cannotLoadAs, need, needCommand, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { rejection, waitFor } from '../helpers/wait';

/** Loaded by children running as uid 65534 (the checkout must be readable by them). */
const CLIENT_JS = join(ROOT, 'dist', 'lib', 'daemon', 'client.js');
const env = tapEnv();
const reason = !env.ok ? env.reason : cliBuiltReason();
if (reason) console.warn(`daemon integration tests skipped: ${reason}`);

/** A daemon whose socket, state dir and log are in `dir`. */
const startDaemon = (dir: string, args: string[] = []): Promise<DaemonProcess> => DaemonProcess.start({ dir, args });

/** Runs a node script as another user (setpriv), with dist/ on hand; returns its stdout JSON. */
function runAs(uid: number, extra: string[], script: string): { status: number | null; out: Record<string, unknown>; stderr: string } {
  const r = spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, ...extra, process.execPath, '-e', script], { encoding: 'utf8', timeout: 30_000 });
  let out: Record<string, unknown> = {};
  try {
    out = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    out = { raw: r.stdout };
  }
  return { status: r.status, out, stderr: r.stderr };
}

function clientScript(socket: string): string {
  return `
const { DaemonClient } = require(${JSON.stringify(join(ROOT, 'dist', 'lib', 'daemon', 'client.js'))});
DaemonClient.connect(${JSON.stringify(socket)}, { timeoutMs: 10000 }).then(
  async (c) => { const h = c.server; const l = await c.list().catch((e) => ({ code: e.code })); c.close(); console.log(JSON.stringify({ ok: true, uid: h.peer.uid, list: l })); },
  (e) => console.log(JSON.stringify({ ok: false, code: e.code, message: e.message, hint: e.hint })),
);`;
}

describe.skipIf(!!reason)(`mqtap daemon${reason ? ` (skipped: ${reason})` : skipNote(env)}`, () => {
  useIsolatedNetns();
  let dir: string;
  let daemon: DaemonProcess | undefined;
  const clients: DaemonClient[] = [];
  const extraDaemons: DaemonProcess[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-daemon-'));
    daemon = await startDaemon(dir);
  }, 30_000);

  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });

  afterAll(async () => {
    for (const d of [...extraDaemons, ...(daemon ? [daemon] : [])]) await d.stop().catch(() => d.proc.kill('SIGKILL'));
    for (const t of listTaps()) deleteTap(t.name);
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  async function connect(socket = daemon!.socket): Promise<DaemonClient> {
    const c = await DaemonClient.connect(socket, { timeoutMs: 15_000 });
    clients.push(c);
    return c;
  }

  it('listens on a 0600 socket; hello reports this process as SO_PEERCRED saw it; each request is logged with the peer', async () => {
    const st = lstatSync(daemon!.socket);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    const c = await connect();
    expect(c.server).toMatchObject({ protocol: 1, pid: daemon!.pid, peer: { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() }, maxFdsPerMessage: 64 });
    await c.list();
    await waitFor('the log line', () => daemon!.logLines().some((l) => l.op === 'list' && l.ok === true));
    const line = daemon!.logLines().find((l) => l.op === 'list')!;
    expect(line.peer).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    expect(typeof line.ms).toBe('number');
  });

  it('create / list / show / set-active agree with the kernel; errors for duplicates, bad counts, unknown names', async () => {
    const c = await connect();
    const d = await c.create({ name: 'dt%d', pairs: 4, vhost: 'off', active: 2 });
    expect(d.name).toMatch(/^dt\d+$/);
    expect(d).toMatchObject({ pairs: 4, active: 2, vhost: false, persist: false, created: true, holding: true, lease: null, numQueues: 2, numDisabledQueues: 2 });
    expect(d.pairStates).toEqual(['enabled', 'enabled', 'disabled', 'disabled']);
    expect(d.kernelPairStates).toEqual(d.pairStates);
    let k = getTap(d.name)!;
    expect([k.tun.numQueues, k.tun.numDisabledQueues, k.tun.persist]).toEqual([2, 2, false]);

    const s = await c.setActive(d.name, 3);
    expect(s).toMatchObject({ active: 3, numQueues: 3, numDisabledQueues: 1 });
    k = getTap(d.name)!;
    expect([k.tun.numQueues, k.tun.numDisabledQueues]).toEqual([3, 1]);
    await c.setActive(d.name, 1);
    expect(getTap(d.name)!.tun.numQueues).toBe(1);

    expect((await rejection(c.setActive(d.name, 5))).code).toBe('ERR_INVALID_ARG');
    expect((await rejection(c.create({ name: d.name, pairs: 1, vhost: 'off' }))).code).toBe('EEXIST');
    expect((await rejection(c.show('nope0'))).code).toBe('ENODEV');
    expect((await rejection(c.request('create', { name: 'x', pairs: 0 }))).code).toBe('ERR_INVALID_ARG');

    const l = await c.list();
    expect(l.map((n) => n.name)).toContain(d.name);
    await c.delete(d.name);
    expect(getTap(d.name)).toBeUndefined();
    expect((await c.list()).map((n) => n.name)).not.toContain(d.name);
  });

  it.skipIf(existsSync('/dev/vhost-net'))("vhost 'on' without /dev/vhost-net fails and leaves no tap", async () => {
    const c = await connect();
    const e = await rejection(c.create({ name: 'dv0', pairs: 2, vhost: 'on' }));
    expect(e.op).toBe('VHOST_OPEN');
    expect(getTap('dv0')).toBeUndefined();
  });

  it("vhost 'auto' uses vhost-net where it is, falls back to tap-only where not", async () => {
    const c = await connect();
    const hasVhost = probeVhostNet().usable; // a node that exists but does not open (no module, a container) means fallback too
    const a = await c.create({ name: 'dv1', pairs: 2, vhost: 'auto' });
    expect(a.vhost).toBe(hasVhost);
    await c.delete('dv1');
  });

  it('acquire hands out working queue fds (SCM_RIGHTS); a second acquire is EBUSY; release resyncs queues changed behind the daemon', async () => {
    const c = await connect();
    const other = await connect();
    await c.create({ name: 'da0', pairs: 4, vhost: 'off', active: 3 });
    const before = process.pid ? readdirSync('/proc/self/fd').length : 0;
    const a = await c.acquire('da0');
    expect(a.pairs).toBe(4);
    expect(a.tapFds.length).toBe(4);
    expect(a.vhostFds).toEqual([]);
    for (const fd of a.tapFds) {
      expect(native.tunGetIff(fd).name).toBe('da0');
      expect(native.getFdFlags(fd) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
    }
    expect(readdirSync('/proc/self/fd').length).toBe(before + 4);
    // The fds are the daemon's queues themselves: their attach state is shared.
    expect(a.tapFds.map((fd) => (native.tunGetIff(fd).flags & K.IFF_DETACH_QUEUE ? 'disabled' : 'enabled'))).toEqual(['enabled', 'enabled', 'enabled', 'disabled']);
    const shown = await c.show('da0');
    expect(shown.lease).toMatchObject({ kind: 'client', pid: process.pid, uid: process.getuid!() });

    const busy = await rejection(other.acquire('da0'));
    expect(busy.code).toBe('EBUSY');
    expect(busy.hint).toMatch(/release it first/);
    expect((await rejection(other.hotplug('da0', { qmp: '/nonexistent.sock', id: 'nic1' }))).code).toBe('EBUSY');
    expect((await rejection(other.delete('da0'))).code).toBe('EBUSY');

    // The borrower detaches queue 1 behind the daemon's back...
    native.tunSetQueue(a.tapFds[1]!, K.IFF_DETACH_QUEUE);
    expect(getTap('da0')!.tun.numQueues).toBe(2);
    const view = await c.show('da0');
    expect(view.pairStates).toEqual(['enabled', 'enabled', 'enabled', 'disabled']);
    expect(view.kernelPairStates).toEqual(['enabled', 'disabled', 'enabled', 'disabled']);
    a.fds.close();
    expect(readdirSync('/proc/self/fd').length).toBe(before);
    // ...and release puts the kernel back in line with the daemon.
    const r = await other.release('da0');
    expect(r.lease).toBeNull();
    expect(r.kernelPairStates).toEqual(['enabled', 'enabled', 'enabled', 'disabled']);
    expect(getTap('da0')!.tun.numQueues).toBe(3);
    expect((await rejection(c.release('da0'))).code).toBe('EINVAL');
    await c.delete('da0');
  });

  it('acquire of 100 pairs sends 100 fds in chunks of at most 64, all distinct queues of the tap', async () => {
    const c = await connect();
    await c.create({ name: 'dbig', pairs: 100, vhost: 'off' });
    const before = readdirSync('/proc/self/fd').length;
    const a = await c.acquire('dbig');
    expect(a.tapFds.length).toBe(100);
    expect(new Set(a.tapFds).size).toBe(100);
    for (const fd of a.tapFds) expect(native.tunGetIff(fd).name).toBe('dbig');
    expect(readdirSync('/proc/self/fd').length).toBe(before + 100);
    a.fds.close();
    expect(readdirSync('/proc/self/fd').length).toBe(before);
    await c.release('dbig');
    await c.delete('dbig');
    expect(getTap('dbig')).toBeUndefined();
  });

  it('open attaches to an existing tap it did not create: delete closes its queues but leaves the device', async () => {
    openTap({ name: 'dext', queues: 1, persist: true }).close();
    const c = await connect();
    const d = await c.open({ name: 'dext', pairs: 2, vhost: 'off' });
    expect(d).toMatchObject({ created: false, persist: false, numQueues: 2 });
    const r = await c.delete('dext');
    expect(r).toMatchObject({ deleted: true, deviceDeleted: false });
    expect(getTap('dext')!.tun.numQueues).toBe(0);
    deleteTap('dext');
  });

  it('a lent netdev resists delete unless forced', async () => {
    const c = await connect();
    await c.create({ name: 'dl0', pairs: 2, vhost: 'off', persist: true });
    const a = await c.acquire('dl0');
    expect((await rejection(c.delete('dl0'))).hint).toMatch(/force/);
    const r = await c.delete('dl0', { force: true });
    expect(r).toMatchObject({ deleted: true, deviceDeleted: true });
    expect(getTap('dl0')).toBeUndefined();
    expect(existsSync(join(dir, 'state', 'netdevs', 'dl0.json'))).toBe(false);
    a.fds.close();
  });

  it('SIGTERM: exit 0, socket gone, non-persistent taps gone, persistent stay; a restart re-adopts them (state dir), leases included', async () => {
    const c = await connect();
    await c.create({ name: 'dp0', pairs: 4, vhost: 'off', persist: true, active: 2 });
    await c.create({ name: 'dp1', pairs: 2, vhost: 'off', persist: true });
    await c.create({ name: 'dp2', pairs: 1, vhost: 'off', persist: true });
    await c.create({ name: 'dn0', pairs: 2, vhost: 'off' });
    const lent = await c.acquire('dp1');
    c.close();
    const stateFile = join(dir, 'state', 'netdevs', 'dp0.json');
    expect(JSON.parse(readFileSync(stateFile, 'utf8'))).toMatchObject({ version: 1, name: 'dp0', pairs: 4, active: 2, vhost: false, persist: true });
    expect(existsSync(join(dir, 'state', 'netdevs', 'dn0.json'))).toBe(false);

    const exit = await daemon!.stop('SIGTERM');
    expect(exit).toEqual({ code: 0, signal: null });
    expect(existsSync(daemon!.socket)).toBe(false);
    expect(getTap('dn0')).toBeUndefined();
    expect(getTap('dp0')!.tun).toMatchObject({ persist: true, numQueues: 0, numDisabledQueues: 0 });
    expect(getTap('dp1')!.tun.numQueues, 'our borrowed fds keep dp1 queues').toBe(2);
    expect(daemon!.log()).toMatch(/daemon stopped; persistent taps stay/);
    // dp2 vanishes while no daemon runs: its state file must be dropped on restart.
    deleteTap('dp2');

    daemon = await startDaemon(dir);
    const c2 = await connect();
    const l = await c2.list();
    expect(l.map((n) => n.name).sort()).toEqual(['dp0', 'dp1']);
    const dp0 = await c2.show('dp0');
    expect(dp0).toMatchObject({ pairs: 4, active: 2, persist: true, created: true, holding: true, lease: null, numQueues: 2, numDisabledQueues: 2 });
    const dp1 = await c2.show('dp1');
    expect(dp1).toMatchObject({ holding: false, lease: { kind: 'client', pid: process.pid } });
    expect(existsSync(join(dir, 'state', 'netdevs', 'dp2.json'))).toBe(false);
    expect((await rejection(c2.setActive('dp1', 1))).code).toBe('EBUSY');
    lent.fds.close();
    const released = await c2.release('dp1');
    expect(released).toMatchObject({ holding: true, lease: null, numQueues: 2 });
    await c2.delete('dp0');
    await c2.delete('dp1');
    expect(getTap('dp0')).toBeUndefined();
    expect(readdirSync(join(dir, 'state', 'netdevs'))).toEqual([]);
  }, 60_000);

  it.skipIf(!needCommand('setpriv').ok || !need('checkout readable by uid 65534', cannotLoadAs(65534, CLIENT_JS)).ok)('authorization: file mode keeps other uids out; SO_PEERCRED refuses them even past the file mode; --group admits members', async () => {
    // Let other uids traverse the temp dir, so that the socket's own mode is what stops them.
    chmodSync(dir, 0o711);
    // 0600 socket: uid 65534 cannot even connect.
    const noPerm = runAs(65534, ['--clear-groups'], clientScript(daemon!.socket));
    expect(noPerm.out, noPerm.stderr).toMatchObject({ ok: false, code: 'EACCES' });
    expect(String(noPerm.out.message)).toMatch(/CONNECT/);

    // With CAP_DAC_OVERRIDE the file check passes; SO_PEERCRED still says uid 65534: one error, then the daemon hangs up.
    const before = daemon!.fdCount();
    const tapsBefore = listTaps().length;
    const capped = runAs(65534, ['--clear-groups', '--inh-caps=+dac_override', '--ambient-caps=+dac_override'], clientScript(daemon!.socket));
    expect(capped.out, capped.stderr).toMatchObject({ ok: false, code: 'EACCES' });
    expect(String(capped.out.message)).toMatch(/uid 65534 .* not allowed/);
    await waitFor('the refusal in the log', () => /connection refused: uid 65534/.test(daemon!.log()));
    await waitFor('the daemon to close the refused connection', () => daemon!.fdCount() === before, 5000);
    expect(listTaps().length).toBe(tapsBefore);

    // A daemon serving gid 4242: socket 0660 root:4242; a uid 65534 member is served.
    const gdir = join(dir, 'group');
    const g = await startDaemon(gdir, ['--group', '4242']);
    extraDaemons.push(g);
    const st = lstatSync(g.socket);
    expect(st.mode & 0o777).toBe(0o660);
    expect(st.gid).toBe(4242);
    const member = runAs(65534, ['--groups=4242'], clientScript(g.socket));
    expect(member.out, member.stderr).toMatchObject({ ok: true, uid: 65534, list: { length: 0 } });
    const outsider = runAs(65534, ['--clear-groups'], clientScript(g.socket));
    expect(outsider.out).toMatchObject({ ok: false, code: 'EACCES' });
  }, 60_000);

  it.skipIf(!needCommand('setpriv').ok || !need('checkout readable by uid 65534', cannotLoadAs(65534, CLIENT_JS)).ok)('a state dir it may not create: exit 4 with the path and a hint, no stack trace, nothing left', () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-ro-'));
    chmodSync(dir, 0o755); // root's: nobody may not create state/ in it
    try {
      const r = runCli(['daemon', '--socket', join(dir, 's.sock'), '--state-dir', join(dir, 'state')], { wrapper: ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] });
      expect(r.code, r.stderr).toBe(4);
      expect(r.stderr).toMatch(/STATE_DIR: mkdir .*\/state: permission denied/);
      expect(r.stderr).toMatch(/hint: .*writable --state-dir/);
      expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a second daemon on the same socket and state dir fails before it touches the first one's taps", async () => {
    const c = await connect();
    await c.create({ name: 'dq0', pairs: 2, vhost: 'off', persist: true });
    c.close();
    const before = getTap('dq0')!.tun;
    const r = runCli(['daemon', '--socket', daemon!.socket, '--state-dir', join(dir, 'state')], { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(6);
    expect(r.stderr).toMatch(/state directory .* is in use by another mqtap daemon/);
    expect(getTap('dq0')!.tun).toMatchObject({ numQueues: before.numQueues, numDisabledQueues: before.numDisabledQueues });
    const c2 = await connect();
    await c2.delete('dq0');
  });

  it('a second daemon on ANOTHER socket with the same state dir: exit 6 naming the dir and the first pid; it adopts nothing, creates no socket; the first is unaffected', async () => {
    const c = await connect();
    await c.create({ name: 'dl0', pairs: 2, vhost: 'off', persist: true, active: 1 });
    const stateDir = join(dir, 'state');
    const stateFile = join(stateDir, 'netdevs', 'dl0.json');
    const lockFile = join(stateDir, 'daemon.lock');
    const saved = readFileSync(stateFile, 'utf8');
    const mtime = lstatSync(stateFile).mtimeMs;
    expect(readFileSync(lockFile, 'utf8').trim()).toBe(String(daemon!.pid));
    // The first daemon holds the lock on an O_CLOEXEC fd (a QEMU it spawned must not inherit it).
    const lockFd = readdirSync(`/proc/${daemon!.pid}/fd`).find((fd) => {
      try {
        return readlinkSync(`/proc/${daemon!.pid}/fd/${fd}`) === lockFile;
      } catch {
        return false;
      }
    });
    expect(lockFd, 'the daemon holds an fd on its lock file').toBeDefined();
    const flags = parseInt(/^flags:\s+([0-7]+)/m.exec(readFileSync(`/proc/${daemon!.pid}/fdinfo/${lockFd}`, 'utf8'))![1]!, 8);
    expect(flags & 0o2000000).toBe(0o2000000);
    const before = getTap('dl0')!.tun;

    const other = join(dir, 'other.sock');
    const r = spawnSync(process.execPath, [CLI, '--log-level', 'debug', 'daemon', '--socket', other, '--state-dir', stateDir], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status, r.stderr).toBe(6);
    expect(r.stderr).toContain(`the state directory ${stateDir} is in use by another mqtap daemon (pid ${daemon!.pid})`);
    expect(r.stderr).toMatch(new RegExp(`hint: stop that daemon first \\(kill ${daemon!.pid}\\), or give this one its own --state-dir`));
    expect(r.stderr).not.toMatch(/adopt|listening|\n\s+at /);
    expect(existsSync(other)).toBe(false);
    expect(readFileSync(stateFile, 'utf8')).toBe(saved);
    expect(lstatSync(stateFile).mtimeMs).toBe(mtime);
    expect(readFileSync(lockFile, 'utf8').trim()).toBe(String(daemon!.pid));
    expect(getTap('dl0')!.tun).toMatchObject({ numQueues: before.numQueues, numDisabledQueues: before.numDisabledQueues });
    expect(daemon!.proc.exitCode).toBeNull();
    const c2 = await connect();
    expect((await c2.show('dl0')).active).toBe(1);
    await c2.delete('dl0');
  });

  it('a state file that is not valid JSON is reported and left alone; the daemon still starts', async () => {
    const sdir = join(dir, 'badstate');
    const nd = join(sdir, 'state', 'netdevs');
    await startDaemon(sdir).then((d) => d.stop());
    writeFileSync(join(nd, 'junk.json'), '{not json');
    const d = await startDaemon(sdir);
    extraDaemons.push(d);
    await waitFor('the log line', () => /unreadable state file left alone/.test(d.log()));
    expect(existsSync(join(nd, 'junk.json'))).toBe(true);
    const c = await connect(d.socket);
    expect(await c.list()).toEqual([]);
  }, 30_000);
});
