/**
 * The data path's policy lives in lib/datapath/io.ts, not in native/io.cc:
 *  - io_uring unavailable (here: io_uring_setup fails with EMFILE because no
 *    fd is free, RLIMIT_NOFILE lowered with prlimit for this process only):
 *    'auto' goes down its chain (multishot reads, one-shot io_uring, poll)
 *    to the poll engine, says why (engineNote) and logs the reason; an
 *    explicit 'uring' fails with IO_URING_SETUP.
 *  - the 'auto' chain forced level by level (MQTAP_IO_DISABLE=mshot, =uring):
 *    each fallback is noted and logged once per logger, with its reason;
 *    explicit engines are used as asked.
 *  - which errnos drop one frame: the list lib/ passes in; the addon applies
 *    exactly that list (a refused frame with an empty list stops the call).
 * Real taps in a throw-away network namespace.
 */
import { readlinkSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import type { Logger } from '../../lib/sys/log.js';
import { native } from '../../lib/sys/native.js';
import { defaultEngines, ioCapabilities, openQueueIO, openTapIO, RX_DROP_ERRNOS, TX_DROP_ERRNOS } from '../../lib/datapath/io.js';
import { openTap } from '../../lib/tap/tap.js';
import { catchError, fdCount, haveCommand, limitFreeFds, openFds, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { uringAvailable } from '../helpers/probes.js';

const env = tapEnv();
const IOC = native.ioConstants;

function readlinkOr(path: string): string {
  try {
    return readlinkSync(path);
  } catch {
    return '';
  }
}

/** A pino-shaped logger that records (level, object, message). */
function recorder(): { logger: Logger; lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> } {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  const at = (level: string) => (obj: unknown, msg?: string): void => void lines.push({ level, obj: (obj ?? {}) as Record<string, unknown>, msg: msg ?? '' });
  const logger = { trace: at('trace'), debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), fatal: at('fatal') } as unknown as Logger;
  return { logger, lines };
}


/**
 * Takes every fd this process may open but `free` (eventfds under a lowered
 * RLIMIT_NOFILE, via prlimit); the returned function closes them and puts the
 * limit back.  Closing the fillers first frees what prlimit (a child) needs.
 */
function exhaustFds(free: number): () => void {
  const restore = limitFreeFds(16);
  const fillers: number[] = [];
  for (;;) {
    try {
      fillers.push(native.eventfdOpen());
    } catch (e) {
      if ((e as MqtapError).code === 'EMFILE') break;
      throw e;
    }
  }
  for (let i = 0; i < free && fillers.length > 0; i++) native.close(fillers.pop()!);
  return () => {
    fillers.forEach((fd) => native.close(fd));
    restore();
  };
}

describe.skipIf(!env.ok)(`data path policy in lib/datapath/io.ts${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();

  const uring = uringAvailable();
  const prlimit = haveCommand('prlimit');
  const why = !uring ? 'io_uring is not available on this host at all' : !prlimit ? 'no prlimit (util-linux)' : '';
  if (why && process.env.MQTAP_VM_REQUIRED === '1') throw new Error(`io_uring fallback test cannot run: ${why} (MQTAP_VM_REQUIRED=1)`);
  if (why) console.warn(`io_uring fallback test skipped: ${why}`);

  it.skipIf(!!why)(`io_uring_setup failing: 'auto' chooses poll and logs why; explicit 'uring' fails${why ? ` (skipped: ${why})` : ''}`, () => {
    const tap = track(openTap({ name: 'ioe0', queues: 1, up: true }));
    const q = tap.queues[0]!;
    const { logger, lines } = recorder();
    ioCapabilities(); // asked with fds to spare (and remembered): what fails below is setting the rings up
    const top = defaultEngines(IOC.INT_MAX); // 'auto' here with a free fd
    const before = fdCount();
    // A few fds free, then all taken: io_uring_setup gets EMFILE, and
    // closing the fillers frees what restoring the limit (prlimit, a child) needs.
    const release = exhaustFds(0);
    let auto;
    let explicit: unknown;
    try {
      auto = openQueueIO(q, { logger }); // 'auto': tx would be 'uring' (send buffer INT_MAX)
      auto.close();
      try {
        openQueueIO(q, { engine: 'uring' }).close();
      } catch (e) {
        explicit = e;
      }
    } finally {
      release();
    }
    expect(auto.engine).toEqual({ rx: 'poll', tx: 'poll' });
    expect(auto.engineNote).toBe('io_uring is unavailable (io_uring_setup: EMFILE): poll engine');
    const line = lines.find((l) => l.msg === 'io_uring unavailable; using the poll engine');
    expect(line?.level).toBe('warn');
    expect(line?.obj).toMatchObject({ ifname: 'ioe0', queue: 0, err: { code: 'EMFILE' }, wanted: { rx: top.rx, tx: top.tx }, engine: { rx: 'poll', tx: 'poll' } });
    if (top.rx === 'uring-mshot') {
      // the level below multishot was tried first, and said so
      const ms = lines.find((l) => l.msg === 'multishot reads unavailable; one-shot io_uring reads');
      expect(ms?.obj).toMatchObject({ err: { code: 'EMFILE' }, reason: 'multishot reads are unavailable (io_uring_setup: EMFILE): one-shot io_uring reads' });
    }
    expect(explicit).toBeInstanceOf(MqtapError);
    expect(explicit).toMatchObject({ op: 'IO_URING_SETUP', code: 'EMFILE' });
    expect(fdCount()).toBe(before);
    // With fds to spare, 'auto' gets the top of its chain, and a note only if the kernel made it skip a level.
    const io = openQueueIO(q, { logger });
    expect(io.engine).toEqual({ rx: top.rx, tx: top.tx });
    if (top.fallbacks.length === 0) expect(io.engineNote).toBeUndefined();
    else expect(io.engineNote).toMatch(/unavailable/);
    io.close();
  });

  it.skipIf(!!why)(`a ring failing to set up steps down only its own direction, logs the engines really used; an explicit engine's failure does not cost the other direction its ring${why ? ` (skipped: ${why})` : ''}`, () => {
    const top = defaultEngines(IOC.INT_MAX, ioCapabilities(), { mshot: false, uring: false });
    if (top.rx !== 'uring-mshot' || top.tx !== 'uring') {
      console.warn(`one-free-fd step-down case not run: 'auto' here is ${top.rx}/${top.tx}, not uring-mshot/uring`);
      return;
    }
    const tap = track(openTap({ name: 'ioe4', queues: 1, up: true }));
    const q = tap.queues[0]!;
    const before = fdCount();
    // Exactly one fd free: the write ring (set up first) gets it, the multishot read ring then fails with EMFILE.
    const release = exhaustFds(1);
    const auto = recorder();
    const explicit = recorder();
    let io;
    let err: unknown;
    try {
      io = openQueueIO(q, { logger: auto.logger }); // auto: uring-mshot reads, uring writes
      io.close();
      try {
        openQueueIO(q, { engine: { rx: 'uring-mshot', tx: 'auto' }, logger: explicit.logger }).close();
      } catch (e) {
        err = e;
      }
    } finally {
      release();
    }
    // 'auto': only the reads stepped down (to one-shot reads on the write ring), and the log says so.
    expect(io.engine).toEqual({ rx: 'uring', tx: 'uring' });
    expect(io.engineNote).toBe('multishot reads are unavailable (io_uring_setup: EMFILE): one-shot io_uring reads');
    expect(auto.lines.map((l) => l.msg)).toEqual(['multishot reads unavailable; one-shot io_uring reads']);
    expect(auto.lines[0]!.obj).toMatchObject({ wanted: { rx: 'uring-mshot', tx: 'uring' }, engine: { rx: 'uring', tx: 'uring' }, err: { code: 'EMFILE' } });
    // Explicit multishot reads whose ring fails: the error, with the write ring not dropped to make room and nothing logged.
    expect(err).toBeInstanceOf(MqtapError);
    expect(err).toMatchObject({ op: 'IO_URING_SETUP', code: 'EMFILE' });
    expect(explicit.lines).toEqual([]);
    expect(fdCount()).toBe(before);
  });

  it("the 'auto' chain forced level by level: each fallback noted, logged once with its reason; explicit engines as asked", () => {
    const tap = track(openTap({ name: 'ioe3', queues: 2, up: true }));
    const saved = process.env.MQTAP_IO_DISABLE;
    const openAll = (disable: string | undefined, opts: Parameters<typeof openTapIO>[1] = {}) => {
      if (disable === undefined) delete process.env.MQTAP_IO_DISABLE;
      else process.env.MQTAP_IO_DISABLE = disable;
      try {
        return openTapIO(tap, opts);
      } finally {
        if (saved === undefined) delete process.env.MQTAP_IO_DISABLE;
        else process.env.MQTAP_IO_DISABLE = saved;
      }
    };
    const top = defaultEngines(IOC.INT_MAX, ioCapabilities(), { mshot: false, uring: false });
    const closeAll = (l: ReturnType<typeof openTapIO>): void => l.forEach((io) => io.close());

    // nothing forced: the top of the chain
    let list = openAll(undefined);
    expect(list.map((io) => io.engine)).toEqual([{ rx: top.rx, tx: top.tx }, { rx: top.rx, tx: top.tx }]);
    closeAll(list);

    // multishot forced off: one-shot io_uring reads (only where io_uring works at all)
    if (top.tx === 'uring') {
      const { logger, lines } = recorder();
      list = openAll('mshot', { logger });
      expect(list.map((io) => io.engine)).toEqual([{ rx: 'uring', tx: 'uring' }, { rx: 'uring', tx: 'uring' }]);
      const note = 'multishot reads are unavailable (disabled by MQTAP_IO_DISABLE=mshot): one-shot io_uring reads';
      expect(list.map((io) => io.engineNote)).toEqual([note, note]);
      const logged = lines.filter((l) => l.msg === 'multishot reads unavailable; one-shot io_uring reads');
      expect(logged.length, 'logged once for both queues').toBe(1);
      expect(logged[0]).toMatchObject({ level: 'info', obj: { ifname: 'ioe3', queue: 0, reason: note } });
      closeAll(list);
      // an explicit multishot engine is used as asked, forced off or not
      if (top.rx === 'uring-mshot') {
        list = openAll('mshot', { engine: { rx: 'uring-mshot' }, logger });
        expect(list[0]!.engine).toEqual({ rx: 'uring-mshot', tx: 'uring' });
        expect(list[0]!.engineNote).toBeUndefined();
        closeAll(list);
      }
    }

    // io_uring forced off: poll both ways, logged once as a warning
    const { logger, lines } = recorder();
    list = openAll('uring', { logger });
    expect(list.map((io) => io.engine)).toEqual([{ rx: 'poll', tx: 'poll' }, { rx: 'poll', tx: 'poll' }]);
    expect(list[1]!.engineNote).toBe('io_uring is unavailable (disabled by MQTAP_IO_DISABLE=uring): poll engine');
    const warned = lines.filter((l) => l.msg === 'io_uring unavailable; using the poll engine');
    expect(warned.length).toBe(1);
    expect(warned[0]).toMatchObject({ level: 'warn', obj: { reason: 'io_uring is unavailable (disabled by MQTAP_IO_DISABLE=uring): poll engine', engine: { rx: 'poll', tx: 'poll' } } });
    closeAll(list);

    // explicit engines, nothing forced: as asked, no note
    for (const rx of ['poll', 'uring'] as const) {
      if (rx === 'uring' && top.tx !== 'uring') continue;
      list = openAll(undefined, { engine: { rx, tx: 'poll' } });
      expect(list[0]!.engine).toEqual({ rx, tx: 'poll' });
      expect(list[0]!.engineNote).toBeUndefined();
      closeAll(list);
    }
  });

  it.skipIf(!uringAvailable())('io_uring_enter failing mid-write: the addon reports it, lib/ stops the ring, logs why, and the batch is written with plain syscalls', async () => {
    const tap = track(openTap({ name: 'ioe2', queues: 1, up: true, vnetHdr: false }));
    const { logger, lines } = recorder();
    const rings = (): number[] => openFds().filter((fd) => readlinkOr(`/proc/self/fd/${fd}`) === 'anon_inode:[io_uring]');
    const before = new Set(rings());
    const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'poll', tx: 'uring' }, logger });
    try {
      const ring = rings().find((fd) => !before.has(fd));
      expect(ring, 'the ring fd').toBeDefined();
      // Put an eventfd in the ring's place (same number: the lowest free one):
      // io_uring_enter on it fails (EOPNOTSUPP), as a broken ring would.  The
      // ring's teardown closes that number, so the eventfd is not closed here.
      native.close(ring!);
      const standIn = native.eventfdOpen();
      if (standIn !== ring) {
        native.close(standIn);
        console.warn('io_uring_enter failure case not run: the ring fd number was taken by another thread');
        return;
      }
      const frame = Buffer.alloc(60);
      frame.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
      const r = await io.writeBatch([frame, Buffer.from(frame), Buffer.from(frame)]);
      expect(r.frames).toBe(3);
      expect(r.waits).toBe(0); // not mistaken for an EAGAIN
      expect(io.engine).toEqual({ rx: 'poll', tx: 'poll' });
      expect(io.engineNote).toBe('io_uring_enter failed (EOPNOTSUPP): poll engine from then on');
      const line = lines.find((l) => l.msg === 'io_uring failed; this queue goes on with the poll engine');
      expect(line?.obj).toMatchObject({ ifname: 'ioe2', queue: 0, err: { code: 'EOPNOTSUPP' } });
      expect(readlinkOr(`/proc/self/fd/${ring!}`)).not.toBe('anon_inode:[eventfd]'); // closed by the teardown
      expect(io.stats().tx.frames).toBe(3);
    } finally {
      io.close();
    }
  });

  it('lib/ chooses which errnos drop a frame; the addon applies that list, on both engines', () => {
    expect(TX_DROP_ERRNOS).toEqual([IOC.EINVAL, IOC.EMSGSIZE, IOC.EFAULT, IOC.ENOMEM, IOC.ENOBUFS]);
    expect(RX_DROP_ERRNOS).toEqual([IOC.EINVAL]);
    const tap = track(openTap({ name: 'ioe1', queues: 1, up: true, vnetHdr: false }));
    const fd = tap.queues[0]!.fd;
    // Frame 0 is 10 bytes: shorter than an Ethernet header, tun refuses it (EINVAL); frame 1 is fine.
    const buf = new ArrayBuffer(128);
    new Uint8Array(buf, 16, 60).set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    const desc = (): Uint32Array => new Uint32Array([0, 0, 10, 0, 16, 60]);
    for (const engine of uringAvailable() ? (['poll', 'uring'] as const) : (['poll'] as const)) {
      const make = (txDropErrnos: number[]) => new native.QueueIo(fd, { rx: 'poll', tx: engine, batch: 4, slotSize: 2048, hdrLen: 0, rxDropErrnos: [], txDropErrnos }, () => undefined);
      const lenient = make([IOC.EINVAL]);
      try {
        expect(lenient.txWrite([buf], desc(), 0, 2, false)).toBe(2);
        const state = new Int32Array(lenient.control, IOC.COUNTERS * 8, IOC.STATES);
        expect([state[2], state[3], state[4]]).toEqual([1, IOC.EINVAL, 0]); // dropped, its errno, its index
      } finally {
        lenient.close();
      }
      const strict = make([]);
      try {
        const e = catchError(() => strict.txWrite([buf], desc(), 0, 2, false));
        expect(e).toMatchObject({ op: 'WRITE', code: 'EINVAL' });
      } finally {
        strict.close();
      }
      expect(() => make([0])).toThrow(/errno numbers are 1\.\./);
    }
  });
});
