/**
 * The data path's policy lives in lib/datapath/io.ts, not in native/io.cc:
 *  - io_uring unavailable (here: io_uring_setup fails with EMFILE because no
 *    fd is free, RLIMIT_NOFILE lowered with prlimit for this process only):
 *    'auto' picks the poll engine, says why (engineNote) and logs the
 *    reason; an explicit 'uring' fails with IO_URING_SETUP.
 *  - which errnos drop one frame: the list lib/ passes in; the addon applies
 *    exactly that list (a refused frame with an empty list stops the call).
 * Real taps in a throw-away network namespace.
 */
import { readlinkSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import type { Logger } from '../../lib/sys/log.js';
import { native } from '../../lib/sys/native.js';
import { openQueueIO, RX_DROP_ERRNOS, TX_DROP_ERRNOS } from '../../lib/datapath/io.js';
import { openTap } from '../../lib/tap/tap.js';
import { catchError, fdCount, haveCommand, limitFreeFds, openFds, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';

const env = tapEnv();
const IOC = native.ioConstants;

function uringAvailable(): boolean {
  if (!env.ok) return false;
  const [a, b] = native.unixSocketPair(5);
  try {
    new native.QueueIo(a, { rx: 'uring', tx: 'uring', batch: 4, slotSize: 256, hdrLen: 0, rxDropErrnos: [], txDropErrnos: [] }, () => undefined).close();
    return true;
  } catch {
    return false;
  } finally {
    native.close(a);
    native.close(b);
  }
}

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
    const before = fdCount();
    // A few fds free, then all taken: io_uring_setup gets EMFILE, and
    // closing the fillers frees what restoring the limit (prlimit, a child) needs.
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
      fillers.forEach((fd) => native.close(fd));
      restore();
    }
    expect(auto.engine).toEqual({ rx: 'poll', tx: 'poll' });
    expect(auto.engineNote).toBe('io_uring is unavailable (io_uring_setup: EMFILE): poll engine');
    const line = lines.find((l) => l.msg === 'io_uring unavailable; using the poll engine');
    expect(line?.level).toBe('warn');
    expect(line?.obj).toMatchObject({ ifname: 'ioe0', queue: 0, err: { code: 'EMFILE' }, wanted: { rx: 'poll', tx: 'uring' }, engine: { rx: 'poll', tx: 'poll' } });
    expect(explicit).toBeInstanceOf(MqtapError);
    expect(explicit).toMatchObject({ op: 'IO_URING_SETUP', code: 'EMFILE' });
    expect(fdCount()).toBe(before);
    // With fds to spare, 'auto' gets its io_uring writer and no note.
    const io = openQueueIO(q, { logger });
    expect(io.engine).toEqual({ rx: 'poll', tx: 'uring' });
    expect(io.engineNote).toBeUndefined();
    io.close();
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
