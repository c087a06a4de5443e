/**
 * The vhost-user data plane's tap I/O engines (native/vhost_user.cc,
 * chosen through lib/vhost-user/dataplane.ts `tapEngine`), on a real
 * 1-queue tap in a namespace this file creates, link-local addresses only:
 *
 *   'uring'   a TX batch is one io_uring_enter of WRITEV SQEs, an RX batch
 *             one of READ SQEs: far fewer tap syscalls than frames.
 *   'writev'  one writev(2) per TX frame, one read(2) per RX frame.
 *   'auto'    io_uring, or writev where the worker cannot set up its ring
 *             (forced here with RLIMIT_NOFILE: io_uring_setup gets EMFILE),
 *             which counters() reports with the errno; 'uring' then fails
 *             with that errno and leaves the pair as it was.
 *
 * Each case sends frames both ways and checks them against the kernel's own
 * link counters and a UDP socket on the tap, and the engine and syscall
 * counts the pair reports.
 */
import dgram from 'node:dgram';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames.js';
import { MqtapError } from '../../lib/sys/errors.js';
import { getLink } from '../../lib/tap/links.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import type { DataPlaneFeatures, TapEngineChoice } from '../../lib/vhost-user/dataplane-api.js';
import { openDataPlane, type NativeDataPlane } from '../../lib/vhost-user/dataplane.js';
import { serveVhostUser } from '../../lib/vhost-user/backend.js';
import { fdCount, limitFreeFds, need, needCommand, run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { bindUdp, sendUdp } from '../helpers/net.js';
import { uringAvailable, uringMissingReason } from '../helpers/probes.js';
import { DriverRing, F_WRITE, GuestMem } from '../helpers/vu-driver.js';

const env = tapEnv();

const uring = env.ok ? need('io_uring', uringAvailable() ? '' : uringMissingReason()) : env;
const prlimit = env.ok ? needCommand('prlimit') : env;
// The EMFILE cases take io_uring_setup's EMFILE for "cannot be set up": where io_uring is off anyway, they prove nothing.
const emfile = !uring.ok ? uring : prlimit;

const LOCAL = '169.254.79.1';
const PEER = '169.254.79.2';
const TAP_MAC = '02:00:00:00:02:01';
const PEER_MAC = '02:00:00:00:02:02';
const HDR = 12;
const TX_N = 200; // one batch: fewer than the worker's budget (256) and the ring (256)
const RX_N = 100; // waiting in the tap queue before the guest posts its buffers
const EMFILE = 24;

async function until(done: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!done() && Date.now() < end) await sleep(5);
}

const feats: DataPlaneFeatures = { eventIdx: true, mrgRxbuf: false, indirectDesc: false, vnetHdrSize: 12 };

describe.skipIf(!env.ok)(`vhost-user tap engines${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const cleanup: Array<() => void> = [];
  afterEach(() => {
    for (const f of cleanup.splice(0).reverse()) {
      try {
        f();
      } catch {
        /* best effort */
      }
    }
  });

  let seq = 0;
  function setup(tapEngine: TapEngineChoice): { tap: Tap; mem: GuestMem; dp: NativeDataPlane } {
    const name = `vue${seq}`;
    const tap = track(openTap({ name, queues: 1, vnetHdrSize: 12, mac: TAP_MAC }));
    run('sysctl', ['-qw', `net.ipv6.conf.${name}.disable_ipv6=1`]);
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    const mem = new GuestMem(`mqtap-vue-test-${process.pid}-${seq++}`);
    cleanup.push(() => mem.close());
    const dp = openDataPlane(1, { tapEngine });
    cleanup.push(() => dp.close());
    for (const r of mem.regions()) dp.addRegion(r);
    return { tap, mem, dp };
  }

  function ring(mem: GuestMem, num: number): DriverRing {
    const r = new DriverRing(mem, num, 2048);
    cleanup.push(() => r.close());
    return r;
  }

  async function udpSocket(): Promise<dgram.Socket> {
    const s = await bindUdp(LOCAL);
    cleanup.push(() => s.close());
    return s;
  }

  /**
   * Both directions through pair 0 (its tap set already): TX_N frames queued
   * in the TX ring before it starts (one batch), RX_N datagrams waiting in
   * the tap queue before the RX ring starts with its buffers posted.
   */
  async function traffic(tap: Tap, mem: GuestMem, dp: NativeDataPlane): Promise<void> {
    const s = await udpSocket();
    const port = s.address().port;
    const got = new Set<number>();
    s.on('message', (_msg, rinfo) => got.add(rinfo.port));
    const link0 = getLink(tap.name)!.stats!;
    // guest -> tap
    const tx = ring(mem, 256);
    const heads: number[] = [];
    for (let i = 0; i < TX_N; i++) {
      const off = tx.bufOffset(i);
      const frame = udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort: 40000 + i, dstPort: port, payload: Buffer.from(`tx ${i}`) });
      mem.u8.fill(0, off, off + HDR);
      mem.u8.set(frame, off + HDR);
      tx.setDesc(i, mem.gpa(off), HDR + frame.length, 0);
      heads.push(i);
    }
    tx.publish(heads);
    dp.startRing(0, 'tx', tx.config(), feats);
    await until(() => got.size >= TX_N && tx.usedIdx() === TX_N);
    expect(tx.usedIdx()).toBe(TX_N);
    expect(got.size, 'datagrams the kernel delivered from the guest').toBe(TX_N);
    // tap -> guest: the frames wait in the tap queue until the guest posts buffers.
    for (let i = 0; i < RX_N; i++) await sendUdp(s, Buffer.from(`rx ${i}`), 41000 + i, PEER);
    const rx = ring(mem, 256);
    const rxHeads: number[] = [];
    for (let i = 0; i < 256; i++) {
      rx.setDesc(i, mem.gpa(rx.bufOffset(i)), 2048, F_WRITE);
      rxHeads.push(i);
    }
    rx.publish(rxHeads);
    dp.startRing(0, 'rx', rx.config(), feats);
    const ports = new Set<number>();
    await until(() => {
      for (const u of rx.collect()) {
        const d = parseUdp4Frame(Buffer.from(mem.u8.subarray(rx.bufOffset(u.id) + HDR, rx.bufOffset(u.id) + u.len)));
        if (d && d.dstIp === PEER && d.payload.toString() === `rx ${d.dstPort - 41000}`) ports.add(d.dstPort);
      }
      return ports.size >= RX_N;
    });
    expect(ports.size, 'datagrams that reached the guest, byte-exact').toBe(RX_N);
    const link1 = getLink(tap.name)!.stats!;
    expect(link1.rxPackets - link0.rxPackets, 'frames the tap took from the backend (kernel)').toBeGreaterThanOrEqual(TX_N);
    expect(link1.txPackets - link0.txPackets, 'frames the tap handed to the backend (kernel)').toBeGreaterThanOrEqual(RX_N);
    const c = dp.counters(0);
    expect(c).toMatchObject({ txFrames: BigInt(TX_N), txDropped: 0n, rxFrames: BigInt(RX_N), rxDropped: 0n });
  }

  it("'uring': a batch of frames is one io_uring_enter each way; frames counted by the kernel", async (ctx) => {
    const { tap, mem, dp } = setup('auto');
    dp.setTap(0, tap.queues[0]!.fd);
    await traffic(tap, mem, dp);
    const c = dp.counters(0);
    if (c.tapEngine !== 'uring') {
      need('io_uring', `${uringMissingReason()} (the worker's io_uring_setup failed: errno ${c.tapEngineErrno})`);
      ctx.skip();
    }
    expect(c.tapEngineErrno).toBe(0);
    // 200 TX frames in one batch: 1 io_uring_enter (a straggling kick may add one or two).
    expect(c.txSyscalls, `TX syscalls for ${TX_N} frames`).toBeLessThanOrEqual(4n);
    // 100 RX frames: reads 8, 16, 32, 64 deep (adaptive), then one that finds the tap empty.
    expect(c.rxSyscalls, `RX syscalls for ${RX_N} frames`).toBeLessThanOrEqual(8n);
    expect(c.wakeups).toBeGreaterThanOrEqual(1n);
  });

  it("'writev': one writev per TX frame and one read per RX frame; frames counted by the kernel", async () => {
    const { tap, mem, dp } = setup('writev');
    dp.setTap(0, tap.queues[0]!.fd);
    await traffic(tap, mem, dp);
    const c = dp.counters(0);
    expect(c.tapEngine).toBe('writev');
    expect(c.tapEngineErrno, 'asked for, not a fallback').toBe(0);
    expect(c.txSyscalls).toBe(BigInt(TX_N));
    // One read per frame, plus the reads that found the tap empty (at least one).
    expect(c.rxSyscalls).toBeGreaterThan(BigInt(RX_N));
    expect(c.rxSyscalls).toBeLessThanOrEqual(BigInt(RX_N) + 8n);
  });

  it.each(['auto', 'writev'] as const)("%s: commands from JavaScript (setTap, stopRing/startRing) are not counted as wake-ups; tap syscalls only when there is I/O", async (engine) => {
    const { tap, mem, dp } = setup(engine);
    const tx = ring(mem, 8);
    dp.startRing(0, 'tx', tx.config(), feats);
    dp.setTap(0, tap.queues[0]!.fd);
    await sleep(20);
    const c0 = dp.counters(0);
    for (let i = 0; i < 20; i++) {
      dp.setTap(0, tap.queues[0]!.fd); // each one runs on the worker (its control eventfd wakes it)
      dp.stopRing(0, 'tx');
      dp.startRing(0, 'tx', tx.config(), feats);
    }
    await sleep(20);
    const c1 = dp.counters(0);
    expect(c1.wakeups - c0.wakeups, '60 commands, no kick, no tap event').toBe(0n);
    expect(c1.txSyscalls + c1.rxSyscalls - c0.txSyscalls - c0.rxSyscalls, 'no frame, no tap syscall').toBe(0n);
  });

  /** Resident kB of this process's mappings the size of a pair's RX slots (64 x 68 KiB, anonymous), by address range. */
  function slotsMappings(): Map<string, number> {
    const SLOTS_KB = (64 * 69632) / 1024;
    const out = new Map<string, number>();
    let range = '';
    for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
      const head = /^([0-9a-f]+-[0-9a-f]+) /.exec(line);
      if (head) range = head[1]!;
      const m = /^Size:\s+(\d+) kB/.exec(line);
      if (m && Number(m[1]) !== SLOTS_KB) range = '';
      const r = /^Rss:\s+(\d+) kB/.exec(line);
      if (r && range) out.set(range, Number(r[1]));
    }
    return out;
  }

  it.each(['auto', 'writev'] as const)('%s: RX slots that held jumbo frames are given back (MADV_DONTNEED) once the pair is idle', async (engine) => {
    const { tap, mem, dp } = setup(engine);
    run('ip', ['link', 'set', 'dev', tap.name, 'mtu', '65000']);
    dp.setTap(0, tap.queues[0]!.fd);
    const rx = ring(mem, 8);
    const heads: number[] = [];
    for (let i = 0; i < 8; i++) {
      rx.setDesc(i, mem.gpa(rx.bufOffset(i)), 2048, F_WRITE);
      heads.push(i);
    }
    rx.publish(heads);
    const before = slotsMappings();
    dp.startRing(0, 'rx', rx.config(), feats); // starts the pair's worker: its slots are mapped
    const mine = [...slotsMappings().keys()].filter((k) => !before.has(k));
    expect(mine, 'the pair\'s slots mapping').toHaveLength(1);
    const slotsRssKb = (): number => slotsMappings().get(mine[0]!) ?? -1;
    const s = await udpSocket();
    const base = slotsRssKb();
    // 60000-byte datagrams: one 60042-byte frame each (MTU 65000, no offloads), read into a slot, too big for a 2 KiB buffer.
    for (let i = 0; i < 4; i++) await sendUdp(s, Buffer.alloc(60000, i), 42000 + i, PEER);
    await until(() => dp.counters(0).rxDropped >= 4n);
    expect(dp.counters(0).rxDropped).toBe(4n);
    const busy = slotsRssKb();
    expect(busy - base, 'the frames were read into the slots').toBeGreaterThanOrEqual(48);
    await until(() => slotsRssKb() < 16, 3000);
    expect(slotsRssKb(), `slots resident after 1 s idle (were ${busy} kB)`).toBeLessThan(16);
    // The pair still receives.
    await sendUdp(s, Buffer.from('small'), 42100, PEER);
    await until(() => dp.counters(0).rxFrames >= 1n);
    expect(dp.counters(0).rxFrames).toBeGreaterThanOrEqual(1n);
  });

  describe.skipIf(!emfile.ok)(`io_uring cannot be set up (no free fd for it)${skipNote(emfile)}`, () => {
    /** Sets pair 0's tap while no fd can be opened: the worker's io_uring_setup fails with EMFILE. */
    function setTapWithoutFds(dp: NativeDataPlane, fd: number): void {
      // Room for 8 more fds (restoring the limit spawns prlimit), all taken by /dev/null while setTap runs
      // (until EMFILE: the directory fd limitFreeFds listed /proc/self/fd with is free again).
      const restore = limitFreeFds(8);
      const held: number[] = [];
      try {
        for (let i = 0; i < 64; i++) {
          try {
            held.push(openSync('/dev/null', 'r'));
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === 'EMFILE') break;
            throw e;
          }
        }
        dp.setTap(0, fd);
      } finally {
        for (const h of held) closeSync(h);
        restore();
      }
    }

    /** Starts pair 0's worker (a TX ring, no tap yet) so that it needs no new fd later. */
    function startWorker(dp: NativeDataPlane, mem: GuestMem): void {
      const r = ring(mem, 8);
      dp.startRing(0, 'tx', r.config(), feats);
      expect(dp.counters(0).tapEngine, 'no tap: no engine yet').toBe('none');
      dp.stopRing(0, 'tx');
    }

    it("'auto' falls back to writev, says why (EMFILE), and both directions still work", async () => {
      const { tap, mem, dp } = setup('auto');
      startWorker(dp, mem);
      setTapWithoutFds(dp, tap.queues[0]!.fd);
      expect(dp.counters(0)).toMatchObject({ tapEngine: 'writev', tapEngineErrno: EMFILE });
      await traffic(tap, mem, dp);
      const c = dp.counters(0);
      expect(c.tapEngine).toBe('writev');
      expect(c.txSyscalls, 'one writev per frame').toBe(BigInt(TX_N));
      // A new tap fd (with fds to spare) gets its io_uring again (io_uring works here: the describe needs it).
      dp.setTap(0, -1);
      expect(dp.counters(0).tapEngine).toBe('none');
      dp.setTap(0, tap.queues[0]!.fd);
      expect(dp.counters(0)).toMatchObject({ tapEngine: 'uring', tapEngineErrno: 0 });
    });

    it("'uring' refuses: MqtapError EMFILE with a hint, the pair left without a tap and no fd leaked", async () => {
      const { tap, mem, dp } = setup('uring');
      startWorker(dp, mem);
      const fds = fdCount();
      let err: unknown;
      try {
        setTapWithoutFds(dp, tap.queues[0]!.fd);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(MqtapError);
      expect(err).toMatchObject({ code: 'EMFILE', errno: EMFILE, op: 'VHOST_USER_SET_TAP', syscall: 'io_uring_setup' });
      expect((err as MqtapError).hint).toMatch(/tapEngine 'auto'/);
      expect(dp.counters(0).tapEngine, 'the tap was taken back').toBe('none');
      expect(fdCount()).toBe(fds);
      // The same pair with fds to spare: io_uring (where the kernel has it), traffic both ways.
      dp.setTap(0, tap.queues[0]!.fd);
      expect(dp.counters(0)).toMatchObject({ tapEngine: 'uring', tapEngineErrno: 0 });
      await traffic(tap, mem, dp);
    });
  });

  it('a bad tapEngine is an ERR_INVALID_ARG before anything is opened (openDataPlane and serveVhostUser)', async () => {
    const fds = fdCount();
    expect(() => openDataPlane(1, { tapEngine: 'fast' as never })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/tapEngine must be one of 'auto', 'uring', 'writev'/) }));
    expect(() => openDataPlane(1, { engine: 'uring' } as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG' }));
    await expect(serveVhostUser({ socket: '/tmp/mqtap-vue-never.sock', name: 'vuenever', queues: 1, tapEngine: 'io_uring' as never })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' });
    await expect(serveVhostUser({ socket: '/tmp/mqtap-vue-never.sock', name: 'vuenever', queues: 1, tapEngine: 'writev', dataPlane: () => openDataPlane(1) })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' });
    expect(getLink('vuenever')).toBeUndefined();
    expect(fdCount()).toBe(fds);
  });
});
