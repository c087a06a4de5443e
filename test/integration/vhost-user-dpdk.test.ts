/**
 * A front-end nobody here wrote: DPDK's virtio-user PMD (dpdk-testpmd) as
 * the vhost-user front-end of serveVhostUser with the native data plane,
 * in the test's own network namespace.  testpmd forwards whatever it
 * receives straight back (io mode): datagrams the kernel sends through the
 * tap travel tap -> RX rings -> testpmd -> TX rings -> tap, on both pairs.
 * Then testpmd is stopped: the connection ends cleanly and the backend is
 * ready for the next front-end.
 *
 * The datagrams go out only once testpmd forwards, not as soon as both
 * pairs are live: testpmd flushes its RX queues after the last ring is
 * enabled and before it starts forwarding, and frames that land in that
 * window are dropped by testpmd (test/helpers/testpmd.ts).  They go out
 * while testpmd is stopped (SIGSTOP), so the test does not depend on the
 * machine's timing: they wait in the RX rings until it runs again.
 *
 * Needs dpdk-testpmd and the virtio PMD (Debian: dpdk-dev, librte-net-virtio23,
 * librte-mempool-ring23); skipped with the reason when missing, a failure
 * when MQTAP_VM_REQUIRED=1.
 */
import dgram from 'node:dgram';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { getLink, getTap } from '../../lib/tap/links.js';
import { openTap } from '../../lib/tap/tap.js';
import { serveVhostUser } from '../../lib/vhost-user/backend.js';
import { run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { TESTPMD_MISSING, haveTestpmd, startTestpmd as spawnTestpmd } from '../helpers/testpmd.js';
import { until } from '../helpers/vhost-user.js';

const base = tapEnv();
const env = base.ok && !haveTestpmd() ? { ok: false, reason: TESTPMD_MISSING } : base;
if (!env.ok && process.env.MQTAP_VM_REQUIRED === '1') throw new Error(`vhost-user DPDK test cannot run (MQTAP_VM_REQUIRED=1): ${env.reason}`);

const LOCAL = '169.254.81.1';
const PEER = '169.254.81.2';
const TAP_MAC = '02:00:00:00:03:01';
const PEER_MAC = '02:00:00:00:03:02';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* best effort */
    }
  }
});

describe.skipIf(!env.ok)(`vhost-user with DPDK virtio-user as the front-end${skipNote(env)}`, () => {
  useIsolatedNetns();

  it('testpmd (io forwarding, 2 queue pairs): frames both ways on both pairs; a clean end; the next front-end is served', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vudpdk-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    const tap = openTap({ name: 'vud0', queues: 2, mac: TAP_MAC });
    cleanups.push(() => tap.close());
    run('sysctl', ['-qw', 'net.ipv6.conf.vud0.disable_ipv6=1']);
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', 'vud0']);
    run('ip', ['link', 'set', 'dev', 'vud0', 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', 'vud0', 'nud', 'permanent']);
    const be = await serveVhostUser({ socket, tap, queues: 2 });
    cleanups.push(() => be.close());
    const features: string[][] = [];
    be.on('features', (_f: bigint, names: string[]) => features.push(names));

    // A prefix of its own: its runtime directory (/var/run/dpdk/PREFIX) is removed afterwards.
    const prefix = `mqtap-vu-${process.pid}`;
    cleanups.push(() => rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true }));
    const startTestpmd = (): ReturnType<typeof spawnTestpmd> => spawnTestpmd(socket, prefix, (child) => cleanups.push(() => child.kill('SIGKILL')));

    const t = startTestpmd();
    await until(() => be.pairsState().live.length === 2, 30_000).catch(() => {
      throw new Error(`testpmd did not bring both pairs up; its output:\n${t.output()}`);
    });
    expect(features[0]).toEqual(expect.arrayContaining(['VIRTIO_F_VERSION_1', 'VIRTIO_NET_F_MQ', 'VHOST_USER_F_PROTOCOL_FEATURES']));
    expect(getTap('vud0')!.tun).toMatchObject({ numQueues: 2, numDisabledQueues: 0 });
    // Live pairs are not yet a forwarding testpmd: it flushes its RX queues first (frames sent now would be dropped).
    await t.forwarding();

    const s = dgram.createSocket('udp4');
    cleanups.push(() => s.close());
    await new Promise<void>((res) => s.bind(0, LOCAL, () => res()));
    const stats = (): { rx: bigint; tx: bigint } => {
      const st = getLink('vud0')!.stats!;
      return { rx: BigInt(st.rxPackets), tx: BigInt(st.txPackets) };
    };
    const before = stats();
    const N = 64;
    const rxSum = (): bigint => be.counters().reduce((a, pc) => a + pc.rxFrames, 0n);
    // Frames the tap already handed over (IPv6 ND/MLD before disable_ipv6, ...) are not ours: count from here.
    const rx0 = rxSum();
    const txSum = (): bigint => be.counters().reduce((a, pc) => a + pc.txFrames, 0n);
    const tx0 = txSum();
    // testpmd is frozen while the datagrams go out, whatever the machine's timing: they must wait in the
    // RX rings (the backend has put all of them there) and come back once it polls again.  Had it not
    // been forwarding yet, it would flush them when it starts.
    t.child.kill('SIGSTOP'); // (a stopped testpmd still dies of the cleanup's SIGKILL)
    // 64 flows: the tap spreads them over both attached queues by flow hash.
    for (let i = 0; i < N; i++) await new Promise<void>((res, rej) => s.send(Buffer.from(`flow ${i}`), 7000 + i, PEER, (e) => (e ? rej(e) : res())));
    await until(() => rxSum() - rx0 >= BigInt(N), 15_000).catch(() => {
      throw new Error(`the backend did not put the frames into testpmd's RX rings: ${JSON.stringify(be.counters(), (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
    });
    t.child.kill('SIGCONT');
    // The backend counts a batch of TX frames once the whole batch is written, after the kernel has counted
    // them on the tap: wait for both.
    await until(() => stats().rx - before.rx >= BigInt(N) && txSum() - tx0 >= BigInt(N), 15_000).catch(async () => {
      const counters = JSON.stringify(be.counters(), (_k, v) => (typeof v === 'bigint' ? String(v) : v));
      t.child.kill('SIGINT'); // its forward statistics: what its forwarding engine saw of the frames its port received
      await Promise.race([t.exited, new Promise((r) => setTimeout(r, 5000))]);
      throw new Error(`the frames did not come back: ${counters}\n${t.output().slice(-3000)}`);
    });
    expect(stats().tx - before.tx).toBeGreaterThanOrEqual(BigInt(N)); // kernel -> tap -> guest
    const c = be.counters();
    expect(c[0]!.rxFrames + c[1]!.rxFrames - rx0).toBeGreaterThanOrEqual(BigInt(N));
    expect(c[0]!.txFrames + c[1]!.txFrames - tx0).toBeGreaterThanOrEqual(BigInt(N));
    for (const [p, pc] of c.entries()) {
      expect(pc.rxFrames, `pair ${p} carried frames to the guest`).toBeGreaterThan(0n);
      expect(pc.txFrames, `pair ${p} carried frames from the guest`).toBeGreaterThan(0n);
    }

    // testpmd quits (SIGINT: it stops its ports, GET_VRING_BASE, closes the socket).
    t.child.kill('SIGINT');
    const code = await t.exited;
    expect(code, t.output().slice(-2000)).toBe(0);
    // Its forwarding engine saw every frame (none flushed before forwarding started) and sent each one back.
    const fwd = t.forwardStats();
    expect(fwd, t.output().slice(-2000)).toBeDefined();
    expect(fwd!.rxPackets).toBeGreaterThanOrEqual(N);
    expect(fwd!.txPackets).toBe(fwd!.rxPackets);
    expect(fwd!.txDropped).toBe(0);
    await until(() => !be.connected, 10_000);
    expect(getTap('vud0')!.tun.numQueues).toBeGreaterThanOrEqual(1); // the tap stays, never without a queue
    // The next front-end is served.
    const t2 = startTestpmd();
    await until(() => be.pairsState().live.length === 2, 30_000);
    await t2.forwarding();
    expect(be.connections).toBe(2);
    t2.child.kill('SIGINT');
    expect(await t2.exited).toBe(0);
    await until(() => !be.connected, 10_000);
  });
});
