/**
 * Batched frame I/O (lib/datapath/io.ts, native/io.cc) without a tap and without
 * root: a SOCK_SEQPACKET socketpair keeps message boundaries the way a tap
 * queue keeps frame boundaries, so a QueueIO on each end exercises batching,
 * byte-exact delivery, order, backpressure (EAGAIN -> POLLOUT), the batch
 * lifetime rules and the end of the stream, with both engines.
 * test/integration/io.test.ts does the same against real taps.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { openFdIO, totalStats, type FrameBatch, type IoEngine, type QueueIO } from '../../lib/datapath/io.js';
import { native } from '../../lib/sys/native.js';
import { need } from '../helpers/env.js';
import { mshotMissingReason, uringMissingReason } from '../helpers/probes.js';

const SOCK_SEQPACKET = (native.constants as unknown as { SOCK_SEQPACKET?: number }).SOCK_SEQPACKET ?? 5;
const havePair = typeof (native as { unixSocketPair?: unknown }).unixSocketPair === 'function';

let uringOk = true;
try {
  const [a, b] = native.unixSocketPair(SOCK_SEQPACKET);
  try {
    openFdIO(a, { hdrLen: 0, engine: 'uring' }).close();
  } finally {
    native.close(a);
    native.close(b);
  }
} catch {
  uringOk = false;
}
const mshotOk = uringOk && need('io_uring-mshot', mshotMissingReason()).ok;
const ENGINES: IoEngine[] = uringOk ? (mshotOk ? ['poll', 'uring', 'uring-mshot'] : ['poll', 'uring']) : ['poll'];
if (!uringOk) need('io_uring', uringMissingReason());

const fds: number[] = [];
const ios: QueueIO[] = [];
afterEach(() => {
  for (const io of ios.splice(0)) io.close();
  for (const fd of fds.splice(0)) native.close(fd);
});

function pair(engine: IoEngine, hdrLen = 0, opts: { batch?: number; yieldEvery?: number } = {}): [QueueIO, QueueIO] {
  const [a, b] = native.unixSocketPair(SOCK_SEQPACKET);
  fds.push(a, b);
  const x = openFdIO(a, { hdrLen, engine, ...opts });
  const y = openFdIO(b, { hdrLen, engine, ...opts });
  ios.push(x, y);
  return [x, y];
}

/** Frame i: 14..1514 bytes, its index in the first 4 bytes, the rest a pattern. */
function frame(i: number, len = 14 + ((i * 37) % 1500)): Buffer {
  const f = Buffer.alloc(len);
  f.writeUInt32BE(i, 0);
  for (let j = 4; j < len; j++) f[j] = (i + j) & 0xff;
  return f;
}

/** Reads until `n` frames arrived (copies), or the stream ends. */
async function collect(io: QueueIO, n: number, raw = false): Promise<Buffer[]> {
  const got: Buffer[] = [];
  if (n === 0) return got;
  for await (const b of io) {
    got.push(...b.copy({ raw }));
    if (got.length >= n) break;
  }
  return got;
}

describe.skipIf(!havePair)(`QueueIO over a socketpair${havePair ? '' : ' (skipped: the addon has no unixSocketPair)'}`, () => {
  describe.each(ENGINES)('engine %s', (engine) => {
    it('writes batches and reads them back byte-exact, in order, many frames per call', async () => {
      const [a, b] = pair(engine);
      const frames = Array.from({ length: 300 }, (_, i) => frame(i));
      const reading = collect(b, frames.length);
      for (let i = 0; i < frames.length; i += 100) {
        const r = await a.writeBatch(frames.slice(i, i + 100));
        expect(r.frames).toBe(100);
        expect(r.bytes).toBe(frames.slice(i, i + 100).reduce((s, f) => s + f.length, 0));
      }
      const got = await reading;
      expect(got).toHaveLength(frames.length);
      got.forEach((g, i) => expect(g.equals(frames[i]!), `frame ${i}`).toBe(true));
      const s = b.stats();
      expect(s.rx.frames).toBe(300);
      expect(s.rx.batches).toBeLessThan(300); // several frames per read call
      expect(a.stats().tx.frames).toBe(300);
      expect(a.stats().tx.batches).toBe(3); // writeBatch calls
    });

    it('frames that are views into one buffer (and into several) go out as they are', async () => {
      const [a, b] = pair(engine);
      const big = Buffer.alloc(10_000);
      for (let i = 0; i < big.length; i++) big[i] = i & 0xff;
      const views = [big.subarray(0, 100), big.subarray(500, 600), frame(7), big.subarray(9000, 10_000), new Uint8Array(frame(8))];
      const reading = collect(b, views.length);
      await a.writeBatch(views);
      const got = await reading;
      got.forEach((g, i) => expect(g.equals(Buffer.from(views[i]!)), `view ${i}`).toBe(true));
    });

    it('writePacked: frames back to back in one buffer, with the same guarantees', async () => {
      const [a, b] = pair(engine);
      const frames = Array.from({ length: 200 }, (_, i) => frame(i));
      const data = Buffer.concat([Buffer.alloc(3), ...frames]).subarray(3); // not at offset 0 of its ArrayBuffer
      const reading = collect(b, frames.length);
      const r = await a.writePacked(data, frames.map((f) => f.length));
      expect(r.frames).toBe(200);
      const got = await reading;
      got.forEach((g, i) => expect(g.equals(frames[i]!), `frame ${i}`).toBe(true));
      await expect(a.writePacked(data, [data.length + 1])).rejects.toThrow(/runs past/);
      await expect(a.writePacked(data, [10])).rejects.toThrow(/shorter than 14/);
      await expect(a.writePacked('x' as unknown as Buffer, [14])).rejects.toThrow(/Buffer/);
    });

    it('prepends a zeroed header of hdrLen bytes unless the frames carry one', async () => {
      const [a, b] = pair(engine, 12);
      const f = frame(1, 60);
      const withHdr = Buffer.concat([Buffer.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), f]);
      const reading = collect(b, 2, true);
      await a.writeBatch([f]);
      await a.writeBatch([withHdr], { withHeader: true });
      const [r0, r1] = await reading;
      expect(r0!.equals(Buffer.concat([Buffer.alloc(12), f]))).toBe(true);
      expect(r1!.equals(withHdr)).toBe(true);
      expect(a.stats().tx.bytes).toBe(120); // Ethernet bytes: headers excluded
    });

    it('forwards a FrameBatch as it was read, headers included, without copying it first', async () => {
      const [a, b] = pair(engine, 10);
      const [c, d] = pair(engine, 10);
      const frames = Array.from({ length: 20 }, (_, i) => frame(i, 64));
      await a.writeBatch(frames);
      const out = collect(d, 20, true);
      let n = 0;
      for await (const batch of b) {
        await c.writeBatch(batch);
        n += batch.count;
        if (n >= 20) break;
      }
      const got = await out;
      got.forEach((g, i) => expect(g.equals(Buffer.concat([Buffer.alloc(10), frames[i]!])), `frame ${i}`).toBe(true));
    });

    it('a forwarded FrameBatch that has to wait is copied first: the source may read on, the bytes stay', async () => {
      const [a, b] = pair(engine);
      const [c, d] = pair(engine);
      // Fill c's socket so that writes on c say EAGAIN and wait.
      const filler = Array.from({ length: 4000 }, (_, i) => frame(100000 + i, 1000));
      const filling = c.writeBatch(filler);
      const frames = Array.from({ length: 30 }, (_, i) => frame(i, 200));
      await a.writeBatch(frames);
      const it = b[Symbol.asyncIterator]();
      const first = (await it.next()).value as FrameBatch;
      const forwarded = c.writeBatch(first); // queued behind the waiting filler
      await a.writeBatch(Array.from({ length: 30 }, (_, i) => Buffer.alloc(200, 0xbb + (i & 1)))); // overwrite material
      await it.next(); // the source reads on: its slab now holds the 0xbb frames
      const got = collect(d, filler.length + first.count);
      await Promise.all([filling, forwarded]);
      const all = await got;
      const tail = all.slice(filler.length);
      expect(tail).toHaveLength(first.count);
      tail.forEach((g, i) => expect(g.equals(frames[i]!), `forwarded frame ${i}`).toBe(true));
      await it.return!();
    });

    it('return() ends a next() that is still waiting for frames', async () => {
      const [, b] = pair(engine);
      const it = b[Symbol.asyncIterator]();
      const pending = it.next();
      await new Promise((r) => setTimeout(r, 10));
      await it.return!();
      await expect(pending).resolves.toMatchObject({ done: true });
    });

    it('waits for POLLOUT when the peer is slow (EAGAIN), loses nothing and keeps the order', async () => {
      const [a, b] = pair(engine);
      // ~4 MB: far more than a unix socket buffers, so writes must say EAGAIN.
      const frames = Array.from({ length: 4000 }, (_, i) => frame(i, 1000));
      const writes = [];
      for (let i = 0; i < frames.length; i += 250) writes.push(a.writeBatch(frames.slice(i, i + 250)));
      // the writer is ahead of the reader before the reader starts
      await new Promise((r) => setTimeout(r, 20));
      const reading = collect(b, frames.length);
      const results = await Promise.all(writes);
      const got = await reading;
      expect(got).toHaveLength(frames.length);
      for (let i = 0; i < got.length; i++) if (!got[i]!.equals(frames[i]!)) throw new Error(`frame ${i} differs (got #${got[i]!.readUInt32BE(0)})`);
      const tx = a.stats().tx;
      expect(tx.eagain, 'EAGAIN seen').toBeGreaterThan(0);
      expect(tx.waits, 'POLLOUT waits').toBeGreaterThan(0);
      expect(results.reduce((s, r) => s + r.waits, 0)).toBe(tx.waits);
      expect(tx.frames).toBe(frames.length);
      expect(tx.drops).toBe(0);
      expect(tx.reordered).toBe(0);
      expect(b.stats().rx.waits).toBeGreaterThanOrEqual(0);
    });

    it('a batch is valid until the next one is requested; copies stay', async () => {
      const [a, b] = pair(engine);
      await a.writeBatch([frame(1), frame(2)]);
      const it = b[Symbol.asyncIterator]();
      const first = (await it.next()).value as FrameBatch;
      expect(first.valid).toBe(true);
      const kept = first.copy();
      const view = first.frame(0);
      expect(view.equals(frame(1))).toBe(true);
      await a.writeBatch([frame(3)]);
      const second = (await it.next()).value as FrameBatch;
      expect(first.valid).toBe(false);
      const err = (() => {
        try {
          first.frame(0);
        } catch (e) {
          return e as MqtapError;
        }
        return undefined;
      })();
      expect(err?.code).toBe('ERR_BATCH_RELEASED');
      expect(kept[0]!.equals(frame(1))).toBe(true);
      expect(second.frame(0).equals(frame(3))).toBe(true);
      expect([...second].length).toBe(second.count);
      expect(() => second.frame(second.count)).toThrow(RangeError);
    });

    it('close() ends a waiting stream cleanly and rejects writes still waiting', async () => {
      const [a, b] = pair(engine);
      // a reader waiting for frames that never come
      const pending = a[Symbol.asyncIterator]().next();
      // a writer waiting for room that never comes (nobody reads b)
      const big = Array.from({ length: 3000 }, (_, i) => frame(i, 1400));
      const w = a.writeBatch(big);
      const later = a.writeBatch([frame(1)]);
      await new Promise((r) => setTimeout(r, 10));
      expect(a.stats().tx.waits).toBeGreaterThan(0);
      a.close();
      expect(await pending).toEqual({ done: true, value: undefined });
      const err = await w.then(
        () => undefined,
        (e: unknown) => e as MqtapError & { written: number },
      );
      expect(err?.code).toBe('ERR_CLOSED');
      expect(err!.written).toBeGreaterThan(0);
      expect(err!.written).toBeLessThan(big.length);
      await expect(later).rejects.toMatchObject({ code: 'ERR_CLOSED', written: 0 });
      await expect(a.writeBatch([frame(1)])).rejects.toMatchObject({ code: 'ERR_CLOSED' });
      expect(() => a.tryRead()).toThrow(/closed/);
      a.close(); // harmless twice
      expect(a.closed).toBe(true);
      // b got exactly the frames a reported written, in order
      const got = await collect(b, err!.written);
      got.forEach((g, i) => expect(g.equals(big[i]!)).toBe(true));
      expect(b.tryRead()).toBeUndefined();
    });

    it('ends the stream when the peer goes away (end of file)', async () => {
      const [a, b] = pair(engine);
      await a.writeBatch([frame(1)]);
      const reading = collect(b, 10);
      await new Promise((r) => setTimeout(r, 10));
      a.close();
      // the peer's socket closes: b sees its last frame, then the end
      const fd = fds.shift()!;
      native.close(fd);
      const got = await reading;
      expect(got).toHaveLength(1);
    });

    it('yields to the event loop while frames keep coming', async () => {
      const [a, b] = pair(engine, 0, { batch: 4 });
      let stop = false;
      const feeder = (async (): Promise<void> => {
        while (!stop) await a.writeBatch(Array.from({ length: 64 }, (_, i) => frame(i, 64)));
      })();
      let timerFired = false;
      setTimeout(() => (timerFired = true), 0);
      let batches = 0;
      for await (const batch of b) {
        void batch;
        if (++batches >= 400 || timerFired) break;
      }
      stop = true;
      a.close(); // rejects the write the feeder may be waiting on
      b.close();
      await feeder.catch(() => undefined);
      expect(timerFired).toBe(true);
      expect(batches).toBeLessThan(400);
    });
  });

  it('default yield: at most 1024 frames (plus the batch that crossed it) between turns of the event loop; an explicit yieldEvery counts batches only', async () => {
    // Frames read between two turns of the event loop (a setImmediate chain), by reader.
    const perTurn = async (opts: { yieldEvery?: number }): Promise<{ most: number; batchMost: number }> => {
      const [a, b] = pair('poll', 0, opts);
      let stop = false;
      const feeder = (async (): Promise<void> => {
        const frames = Array.from({ length: 256 }, (_, i) => frame(i, 64));
        while (!stop) await a.writeBatch(frames);
      })();
      let inTurn = 0;
      let most = 0;
      let batchMost = 0;
      let turns = 0;
      const tick = (): void => {
        most = Math.max(most, inTurn);
        inTurn = 0;
        turns++;
        if (!stop) setImmediate(tick);
      };
      setImmediate(tick);
      let frames = 0;
      for await (const batch of b) {
        inTurn += batch.count;
        batchMost = Math.max(batchMost, batch.count);
        frames += batch.count;
        if (frames >= 200_000 || turns >= 200) break;
      }
      stop = true;
      a.close();
      b.close();
      await feeder.catch(() => undefined);
      return { most, batchMost };
    };
    const dflt = await perTurn({});
    expect(dflt.most, `largest batch ${dflt.batchMost}`).toBeLessThan(1024 + dflt.batchMost);
    if (dflt.batchMost * 16 >= 1024 + dflt.batchMost) {
      // Batches big enough that 16 of them pass 1024 frames: only the frame budget keeps a turn under that.
      const eight = await perTurn({ yieldEvery: 8 });
      expect(eight.most, `largest batch ${eight.batchMost}`).toBeLessThanOrEqual(8 * eight.batchMost);
      // ... and no 1024-frame budget then: 8 batches of this size pass it.
      if (eight.batchMost * 8 > 1024 + eight.batchMost) expect(eight.most, `largest batch ${eight.batchMost}`).toBeGreaterThan(1024);
    } else {
      console.warn(`io yield test: batches of at most ${dflt.batchMost} frames here (the socket buffer): the 1024-frame budget was not reached`);
    }
  });

  it('a stream nobody waits on does not keep the process alive', () => {
    const dist = join(__dirname, '..', '..', 'dist', 'lib');
    // The compiled modules (npm test builds them first: pretest); a run without them says so.
    if (!existsSync(join(dist, 'datapath', 'io.js'))) {
      console.warn('io unit test "a stream nobody waits on": dist/ not built (npm run build:ts), not run');
      return;
    }
    // one batch taken by hand, then the reader walks away without return()
    const script = `
      const { openFdIO } = require(${JSON.stringify(join(dist, 'datapath', 'io.js'))});
      const { native } = require(${JSON.stringify(join(dist, 'sys', 'native.js'))});
      const [a, b] = native.unixSocketPair(5);
      const x = openFdIO(a, { hdrLen: 0, engine: process.argv[1] });
      const y = openFdIO(b, { hdrLen: 0, engine: process.argv[1] });
      (async () => {
        const it = y[Symbol.asyncIterator]();
        setTimeout(() => x.writeBatch([Buffer.alloc(64, 1)]), 20);
        const r = await it.next();
        process.stdout.write('got ' + r.value.count + '\\n');
        // READABLE stays armed for a reader that does not come back: it must not hold the loop
      })();`;
    for (const engine of ENGINES) {
      const r = spawnSync(process.execPath, ['-e', script, engine], { encoding: 'utf8', timeout: 20_000 });
      expect(r.error, `${engine}: the process must exit by itself`).toBeUndefined();
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe('got 1\n');
    }
  });

  it('rejects bad frames and options before any syscall', async () => {
    const [a] = pair('poll');
    await expect(a.writeBatch([Buffer.alloc(5)])).rejects.toThrow(/at least 14/);
    await expect(a.writeBatch(['nope' as unknown as Buffer])).rejects.toThrow(/not a Buffer/);
    await expect(a.writeBatch([undefined as unknown as Buffer])).rejects.toThrow(/frame 0 is not a Buffer/);
    await expect(a.writeBatch([frame(1, 60), undefined as unknown as Buffer])).rejects.toThrow(/frame 1 is not a Buffer/);
    await expect(a.writeBatch('x' as unknown as Buffer[])).rejects.toThrow(/array/);
    const [x, y] = native.unixSocketPair(SOCK_SEQPACKET);
    fds.push(x, y);
    expect(() => openFdIO(x, { hdrLen: 0, engine: 'fast' as IoEngine })).toThrow(/'auto', 'poll', 'uring' or 'uring-mshot'/);
    expect(() => openFdIO(x, { hdrLen: 0, engine: { tx: 'uring-mshot' as 'uring' } })).toThrow(/'uring-mshot' is a receive engine/);
    expect(() => openFdIO(x, { hdrLen: 0, batch: 0 })).toThrow(/batch/);
    expect(() => openFdIO(x, { hdrLen: 0, bogus: 1 } as object)).toThrow(/unknown QueueIO option/);
    expect(() => openFdIO(x)).toThrow(MqtapError); // not a tap: TUNGETVNETHDRSZ fails, hdrLen is needed
  });

  it('the receive slab cannot be taken away by transferring it: reads go on into the same memory', async () => {
    const [a, b] = pair('poll');
    await a.writeBatch([frame(1, 64), frame(2, 64)]);
    const batch = b.tryRead()!;
    expect(batch.count).toBe(2);
    const ab = batch.slab.buffer as ArrayBuffer;
    const size = ab.byteLength;
    try {
      structuredClone(ab, { transfer: [ab] });
    } catch {
      /* refused outright is fine too */
    }
    // Either the transfer was refused (the addon's memory is not detachable)
    // or the addon refuses to go on (Live() checks): never freed memory.
    if (ab.byteLength === size) {
      await a.writeBatch([frame(3, 64)]);
      expect(b.tryRead()!.frame(0).equals(frame(3, 64))).toBe(true);
    } else {
      await a.writeBatch([frame(3, 64)]);
      expect(() => b.tryRead()).toThrow(/detached/);
    }
  });

  it("chooses plain syscalls for writes on an fd that is not a tap ('auto')", () => {
    const [a] = pair('poll');
    void a;
    const [x, y] = native.unixSocketPair(SOCK_SEQPACKET);
    fds.push(x, y);
    const io = openFdIO(x, { hdrLen: 0 });
    ios.push(io);
    expect(io.engine.tx).toBe('poll');
  });

  it('totalStats sums queues', () => {
    const [a, b] = pair('poll');
    const t = totalStats([a.stats(), b.stats()]);
    expect(t.rx.frames).toBe(0);
    expect(Object.keys(t.tx)).toContain('eagain');
  });
});
