/**
 * The multishot receive engine ('uring-mshot', native/io.cc) on real taps, in
 * a throw-away network namespace with link-local addresses only:
 *
 *   - frames read through the armed multishot are counted exactly (the
 *     kernel's tx_packets delta, every datagram once, in order);
 *   - drain after ENOBUFS: more frames queued than the queue has slots
 *     (batch) while the multishot is armed: the backlog is read with
 *     RWF_NOWAIT batches and the multishot re-armed once it is caught up,
 *     every frame once and in order (also with a bursty sender, where
 *     drains and re-arms alternate);
 *   - truncation guard: frames longer than a slot are counted as drops (not
 *     delivered cut short) and their slots go back at once;
 *   - a batch stops at the 512 KiB receive byte budget like the other
 *     engines, the rest following in the next batches;
 *   - the addon refuses the engine on a blocking fd (O_NONBLOCK is what keeps
 *     the kernel's writes to the slab inside rxRead), leaving no ring;
 *   - closing with the multishot armed leaves no fd behind and the tap's
 *     queue can be detached and closed at once (the kernel's queue count
 *     drops: no reference to the file is left in io_uring).
 *
 * Skipped, with the reason, where the kernel has no multishot read (< 6.7)
 * or io_uring is unavailable.
 */
import dgram from 'node:dgram';
import { readlinkSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { constants as osConstants } from 'node:os';
import { parseUdp4Frame } from '../../lib/datapath/frames.js';
import { MqtapError } from '../../lib/sys/errors.js';
import { native } from '../../lib/sys/native.js';
import { openQueueIO, type FrameBatch, type QueueIO } from '../../lib/datapath/io.js';
import { getLink, getTap } from '../../lib/tap/links.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import { need, netnsSysctls, openFds, run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { bindUdp, sendUdp } from '../helpers/net.js';
import { mshotMissingReason } from '../helpers/probes.js';

const env = tapEnv();
const mshot = env.ok ? need('io_uring-mshot', mshotMissingReason()) : env;

const EINVAL = osConstants.errno.EINVAL;
const LOCAL = '169.254.83.1';
const PEER = '169.254.83.2';
const PEER_MAC = '02:00:00:00:53:02';

function readlinkOr(fd: number): string {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return '';
  }
}

function ioFds(): string[] {
  return openFds()
    .map(readlinkOr)
    .filter((l) => l === 'anon_inode:[io_uring]' || l === 'anon_inode:[eventfd]');
}


/**
 * Reads batches into `onBatch` until it returns true or a second passes
 * without a batch (then the stream is ended with return()).
 */
async function readUntilIdle(io: QueueIO, onBatch: (b: FrameBatch) => boolean | void): Promise<void> {
  const it = io[Symbol.asyncIterator]();
  let idle = 0;
  const watchdog = setInterval(() => {
    if (++idle > 10) void it.return!();
  }, 100);
  try {
    for (;;) {
      const r = await it.next();
      if (r.done) break;
      idle = 0;
      if (onBatch(r.value) === true) break;
    }
  } finally {
    clearInterval(watchdog);
  }
}

describe.skipIf(!mshot.ok)(`multishot receive engine${skipNote(env)}${mshot.ok ? '' : ` (skipped: ${mshot.reason})`}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const sockets: dgram.Socket[] = [];
  const ios: QueueIO[] = [];
  beforeAll(() => netnsSysctls()); // no IPv6: no DAD/MLD frames among the ones counted
  afterEach(() => {
    for (const io of ios.splice(0)) io.close();
    for (const s of sockets.splice(0)) s.close();
  });

  function upTap(name: string, queues: number): Tap {
    const tap = track(openTap({ name, queues, vnetHdr: false }));
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    return tap;
  }

  async function sender(): Promise<dgram.Socket> {
    const s = await bindUdp(LOCAL);
    sockets.push(s);
    return s;
  }

  /** Destination ports of the UDP frames to PEER in a batch's frames. */
  function ports(frames: Iterable<Buffer>): number[] {
    const out: number[] = [];
    for (const f of frames) {
      const u = parseUdp4Frame(f);
      if (u?.dstIp === PEER) out.push(u.dstPort);
    }
    return out;
  }

  it('frames read through the armed multishot are counted exactly, each once and in order', async () => {
    const tap = upTap('ms0', 1);
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' }, batch: 16 });
    ios.push(io);
    expect(io.engine.rx).toBe('uring-mshot');
    const s = await sender();
    const before = getLink('ms0')!.stats!;
    const got: number[] = [];
    let frames = 0;
    const N = 300;
    const reading = (async () => {
      for await (const b of io) {
        frames += b.count;
        got.push(...ports(b));
        expect(b.count).toBeLessThanOrEqual(16);
        if (got.length >= N) break;
      }
    })();
    for (let i = 0; i < N; i++) await sendUdp(s, Buffer.alloc(1 + (i % 1400), i & 0xff), 20000 + i, PEER);
    // a bound for broken builds, cleared as soon as reading settles (its rejection is awaited below)
    let timer: NodeJS.Timeout | undefined;
    const bound = new Promise<void>((resolve) => (timer = setTimeout(resolve, 10_000)));
    await Promise.race([reading.catch(() => undefined), bound]);
    clearTimeout(timer);
    expect(got.length, 'every frame read within 10 s').toBeGreaterThanOrEqual(N);
    await reading;
    const after = getLink('ms0')!.stats!;
    expect(got).toEqual(Array.from({ length: N }, (_, i) => 20000 + i));
    expect(frames, 'every frame the kernel handed over, once').toBe(after.txPackets - before.txPackets);
    expect(after.txDropped - before.txDropped).toBe(0);
    const st = io.stats().rx;
    expect(st.frames).toBe(frames);
    expect(st.drops).toBe(0);
    expect(io.engine.rx, 'still multishot').toBe('uring-mshot');
  });

  it('a steady sender in the same thread: every wakeup comes in time, nothing is lost (readiness is the tap fd)', async () => {
    const tap = upTap('ms0', 1);
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' } });
    ios.push(io);
    const s = await sender();
    const before = getLink('ms0')!.stats!;
    const N = 10000;
    let sent = 0;
    // 20 datagrams per event-loop turn: the tap's ring (500) overflows only if the reader sleeps through ~25 turns
    const pump = (): void => {
      for (let i = 0; i < 20 && sent < N; i++, sent++) s.send(Buffer.alloc(18), 9, PEER);
      if (sent < N) setImmediate(pump);
    };
    pump();
    let frames = 0;
    await readUntilIdle(io, (b) => (frames += b.count) >= N);
    const after = getLink('ms0')!.stats!;
    expect(after.txDropped - before.txDropped, 'frames the kernel dropped because the reader slept').toBe(0);
    expect(frames).toBe(N);
    expect(io.stats().rx.waits, 'the reader did wait between bursts').toBeGreaterThan(0);
  });

  it('a backlog larger than the slots: the multishot ends with ENOBUFS, the backlog is drained with RWF_NOWAIT reads, then it is re-armed; every frame read once, in order', async () => {
    const tap = upTap('ms0', 1);
    const BATCH = 8;
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' }, batch: BATCH });
    ios.push(io);
    expect(io.tryRead(), 'nothing waiting yet; this arms the multishot').toBeUndefined();
    const s = await sender();
    const before = getLink('ms0')!.stats!;
    const N = 100; // < txqueuelen (500): the kernel queues them all
    for (let i = 0; i < N; i++) await sendUdp(s, Buffer.from(`rearm ${i}`), 21000 + i, PEER);
    await sleep(20); // each send was queued in the tap by the time its callback ran; this only adds margin
    const got: number[] = [];
    const counts: number[] = [];
    for (;;) {
      const b = io.tryRead();
      if (!b) break;
      counts.push(b.count);
      got.push(...ports(b));
    }
    const after = getLink('ms0')!.stats!;
    expect(got).toEqual(Array.from({ length: N }, (_, i) => 21000 + i));
    expect(Math.max(...counts)).toBe(BATCH);
    const st = io.stats().rx;
    expect(st.frames).toBe(N);
    expect(st.frames, "the kernel's tx_packets delta: every frame it handed over, once").toBe(after.txPackets - before.txPackets);
    expect(st.drops).toBe(0);
    expect(after.txDropped - before.txDropped).toBe(0);
    // The first full batch used every slot: the next frame found no buffer (ENOBUFS, frame left
    // queued) and ended the multishot.  Then the backlog is read by RWF_NOWAIT batches (one drain),
    // and the multishot is re-armed once, when a drain read finds the tap empty, not after every
    // batch (re-arming after each ENOBUFS took >= 11 re-arms here).
    expect(st.drains, `drains (batches ${counts.join(',')})`).toBeGreaterThanOrEqual(1);
    expect(st.rearms, `re-arms (batches ${counts.join(',')}, drains ${st.drains})`).toBeLessThanOrEqual(st.drains + 1);
    expect(st.rearms, 'the drain caught up and the multishot waits again').toBeGreaterThanOrEqual(1);
    expect(st.syscalls, 'one io_uring_enter per batch, plus the re-arm and the final empty read').toBeLessThanOrEqual(counts.length + 4);
  });

  it('a sender in bursts against a small batch: drains and re-arms alternate, every frame the kernel handed over is read once, in order', async () => {
    const tap = upTap('ms0', 1);
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' }, batch: 4 });
    ios.push(io);
    const s = await sender();
    const before = getLink('ms0')!.stats!;
    const N = 3000;
    let sent = 0;
    let burst = 0;
    // bursts of 40 datagrams (10 x the slots) one event-loop turn apart
    const pump = (): void => {
      for (let i = 0; i < 40 && sent < N; i++, sent++) s.send(Buffer.from(`b${burst}`), 20000 + sent, PEER);
      burst++;
      if (sent < N) setImmediate(pump);
    };
    pump();
    const got: number[] = [];
    await readUntilIdle(io, (b) => void got.push(...ports(b))); // until the sender is done and the tap empty
    const after = getLink('ms0')!.stats!;
    const handed = after.txPackets - before.txPackets;
    const dropped = after.txDropped - before.txDropped;
    expect(got.length, "the kernel's tx_packets delta").toBe(handed);
    expect(handed + dropped, 'sent = handed over + dropped by the kernel').toBe(N);
    for (let i = 1; i < got.length; i++) if (!(got[i]! > got[i - 1]!)) expect.fail(`frame ${i}: port ${got[i]} after ${got[i - 1]} (order or duplicate)`);
    const st = io.stats().rx;
    expect(st.frames).toBe(handed);
    expect(st.drops).toBe(0);
    expect(st.drains, 'the reader fell behind at least once').toBeGreaterThanOrEqual(1);
    expect(st.rearms, 'and caught up again').toBeGreaterThanOrEqual(1);
    expect(st.rearms).toBeLessThanOrEqual(st.drains + 1);
  });

  it('frames longer than a slot are counted as truncated drops, never delivered cut short; their slots go back at once', async () => {
    const tap = upTap('ms0', 1);
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' }, batch: 4, slotSize: 256 });
    ios.push(io);
    expect(io.tryRead()).toBeUndefined();
    const s = await sender();
    // 12 long frames (more than the 4 slots) around 5 short ones
    const short: number[] = [];
    for (let i = 0; i < 17; i++) {
      const long = i % 3 !== 0 || i > 12;
      if (!long) short.push(22000 + i);
      await sendUdp(s, long ? Buffer.alloc(1000, 7) : Buffer.from('short'), 22000 + i, PEER);
    }
    await sleep(20);
    const got: number[] = [];
    let maxLen = 0;
    for (let tries = 0; tries < 100 && io.stats().rx.drops + got.length < 17; tries++) {
      const b = io.tryRead();
      if (!b) continue;
      for (let i = 0; i < b.count; i++) maxLen = Math.max(maxLen, b.rawLength(i));
      got.push(...ports(b));
    }
    expect(got).toEqual(short);
    expect(io.stats().rx.drops).toBe(17 - short.length);
    expect(io.stats().rx.truncated, "named as truncated (EMSGSIZE)").toBe(17 - short.length);
    expect(maxLen).toBeLessThan(256);
  });

  it('a batch stops at the receive byte budget (512 KiB) like the other engines; the rest comes in the next batches, each frame once, in order', async () => {
    const tap = upTap('ms0', 1);
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'uring-mshot' }, batch: 1024 });
    ios.push(io);
    expect(io.tryRead(), 'arms the multishot').toBeUndefined();
    const s = await sender();
    const before = getLink('ms0')!.stats!;
    const N = 450; // < txqueuelen (500); 450 x ~1442 bytes is ~630 KiB, over the budget
    for (let i = 0; i < N; i++) await sendUdp(s, Buffer.alloc(1400, i & 0xff), 23000 + i, PEER);
    await sleep(20);
    const got: number[] = [];
    const sizes: number[] = [];
    for (;;) {
      const b = io.tryRead();
      if (!b) break;
      let bytes = 0;
      for (let i = 0; i < b.count; i++) bytes += b.rawLength(i);
      sizes.push(bytes);
      got.push(...ports(b));
    }
    const after = getLink('ms0')!.stats!;
    expect(after.txPackets - before.txPackets).toBe(N);
    expect(got).toEqual(Array.from({ length: N }, (_, i) => 23000 + i));
    expect(sizes.length, `batches of ${sizes.join(', ')} bytes`).toBeGreaterThanOrEqual(2);
    // a batch stops at the first frame that reaches the budget
    for (const b of sizes) expect(b).toBeLessThan(512 * 1024 + 1600);
    expect(io.stats().rx.drops).toBe(0);
  });

  it('the native engine refuses a blocking fd (the slab is written only inside rxRead on an O_NONBLOCK file), leaving no ring behind', () => {
    const [a, b] = native.unixSocketPair(5) as [number, number]; // SOCK_SEQPACKET, O_NONBLOCK
    const opts = { rx: 'uring-mshot' as const, tx: 'poll' as const, batch: 4, slotSize: 256, hdrLen: 0, rxDropErrnos: [], txDropErrnos: [] };
    try {
      const ioBefore = ioFds();
      // non-blocking: accepted (the refusal below is about the flag, not the socket)
      new native.QueueIo(a, opts, () => undefined).close();
      native.setNonBlocking(a, false);
      let err: unknown;
      try {
        new native.QueueIo(a, opts, () => undefined).close();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(MqtapError);
      expect(err).toMatchObject({ op: 'IO_URING_SETUP', syscall: 'fcntl', errno: EINVAL, ring: 'rx' });
      expect(String((err as MqtapError).hint ?? (err as Error).message)).toMatch(/O_NONBLOCK/);
      expect(ioFds(), 'no ring left open').toEqual(ioBefore);
    } finally {
      native.close(a);
      native.close(b);
    }
  });

  it('close with the multishot armed leaves no fd and the queue detachable and closable at once', async () => {
    const tap = upTap('ms1', 3);
    const tapFds = [tap.queues[1]!.fd, tap.queues[2]!.fd];
    const namesBefore = openFds().map((fd) => `${fd}:${readlinkOr(fd)}`).filter((x) => !x.endsWith(':'));
    const ioBefore = ioFds();
    const io1 = openQueueIO(tap.queues[1]!, { engine: { rx: 'uring-mshot', tx: 'uring' } });
    const io2 = openQueueIO(tap.queues[2]!, { engine: { rx: 'uring-mshot', tx: 'uring' } });
    expect(io1.engine).toMatchObject({ rx: 'uring-mshot', tx: 'uring' });
    expect(ioFds().length, 'two rx rings and two tx rings').toBe(ioBefore.length + 4);
    expect(io1.tryRead(), 'arms the multishot').toBeUndefined();
    expect(io2.tryRead()).toBeUndefined();
    const waiting1 = io1[Symbol.asyncIterator]().next(); // armed, waiting
    const waiting2 = io2[Symbol.asyncIterator]().next();
    await sleep(10);
    io1.close();
    expect(await waiting1).toEqual({ done: true, value: undefined });
    // detach (TUNSETQUEUE IFF_DETACH_QUEUE) and close the queue right away
    tap.queues[1]!.disable();
    expect(getTap('ms1')!.tun).toMatchObject({ numQueues: 2, numDisabledQueues: 1 });
    tap.queues[1]!.close();
    // at once (no await in between): no io_uring request or registration kept the file
    expect(getTap('ms1')!.tun).toMatchObject({ numQueues: 2, numDisabledQueues: 0 });
    // closing a queue whose QueueIO is still armed (its close hook closes the QueueIO first)
    tap.queues[2]!.close();
    expect(getTap('ms1')!.tun).toMatchObject({ numQueues: 1, numDisabledQueues: 0 });
    expect(await waiting2).toEqual({ done: true, value: undefined });
    expect(io2.closed).toBe(true);
    // (fd, what) pairs; the directory fd openFds() itself used is gone by the time it is looked at
    const named = (fds: number[]): string[] => fds.map((fd) => `${fd}:${readlinkOr(fd)}`).filter((x) => !x.endsWith(':'));
    expect(named(openFds())).toEqual(namesBefore.filter((x) => !tapFds.some((fd) => x.startsWith(`${fd}:`))));
    expect(ioFds()).toEqual(ioBefore);
  });
});
