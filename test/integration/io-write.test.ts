/**
 * The write path (native/io.cc TxWrite / TxUring, lib/datapath/io.ts
 * writeBatch) on a real tap in a throw-away network namespace:
 *  - the uring engine reads the (buffer, offset, length) triples straight
 *    into its SQEs, 256 per io_uring_enter; a bad triple anywhere in the call
 *    (in the only chunk, or in the last of several) is refused before the
 *    first frame is submitted: nothing reaches the kernel, nothing is counted;
 *  - a good call of several chunks writes every frame, in as many enters as
 *    chunks, with TX_FRAMES / TX_BYTES exact (bytes without the header) and
 *    the kernel's own count of frames received on the tap agreeing;
 *  - writeBatch's descriptor building: runs of the same view (a template
 *    frame sent N times, whose triple is reused without reading the view
 *    again) mixed with other views, of other buffers and lengths, go out
 *    byte-exact and in order (over a SOCK_SEQPACKET socketpair, which keeps
 *    frame boundaries as a tap does, so they can be read back);
 *  - writeBatch: a batch written at once settles (resolved or rejected) with
 *    the same result and counters as before the fast path, and batches
 *    queued behind one still settle in order.
 */
import { describe, expect, it } from 'vitest';
import { native } from '../../lib/sys/native.js';
import { openFdIO, openQueueIO, type QueueIO } from '../../lib/datapath/io.js';
import { deleteTap, openTap } from '../../lib/tap/tap.js';
import { need, skipNote, tapEnv, tryRun, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { uringAvailable, uringMissingReason } from '../helpers/probes.js';

const env = tapEnv();
const IOC = native.ioConstants;
const HDR = 12;
const C = { TX_FRAMES: 6, TX_BYTES: 7, TX_SYSCALLS: 12 };
/** '' where the io_uring engine can be set up here, else why not (need() fails on it in CI). */
const URING_MISSING = uringAvailable() ? '' : uringMissingReason();

/** Frames the kernel counted as received on `ifname` (our writes). */
function rxPackets(ifname: string): number {
  const r = tryRun('ip', ['-s', '-j', 'link', 'show', 'dev', ifname]);
  if (r.status !== 0) throw new Error(`ip -s link show ${ifname}: ${r.stderr}`);
  return (JSON.parse(r.stdout) as Array<{ stats64: { rx: { packets: number } } }>)[0]!.stats64.rx.packets;
}

/** A 60-byte Ethernet frame (local experimental ethertype) behind a zeroed 12-byte virtio-net header. */
function frameWithHdr(): Buffer {
  const f = Buffer.alloc(HDR + 60);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5], HDR);
  return f;
}

describe.skipIf(!env.ok)(`write path${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const uring = env.ok ? need('io_uring', URING_MISSING) : env;

  it.skipIf(!uring.ok)(`uring: a bad frame anywhere is refused before anything is submitted; 600 good frames take 3 enters${skipNote(uring)}`, () => {
    const tap = track(openTap({ name: 'iow0', queues: 1, up: true, vnetHdrSize: HDR }));
    const io = new native.QueueIo(tap.queues[0]!.fd, { rx: 'poll', tx: 'uring', batch: 64, slotSize: 2048, hdrLen: HDR, rxDropErrnos: [], txDropErrnos: [] }, () => undefined);
    try {
      const ctr = new Float64Array(io.control, 0, IOC.COUNTERS);
      const buf = new ArrayBuffer(4096);
      new Uint8Array(buf).set(frameWithHdr(), 128);
      const triples = (n: number, bad: number): Uint32Array => {
        const d = new Uint32Array(3 * n);
        for (let i = 0; i < n; i++) d.set(i === bad ? [0, 4090, 72] : [0, 128, HDR + 60], 3 * i); // 4090 + 72 runs past the buffer
        return d;
      };
      const rx0 = rxPackets('iow0');
      // One chunk (100 frames, the last bad) and three chunks (600, the last bad).
      for (const n of [100, 600]) {
        expect(() => io.txWrite([buf], triples(n, n - 1), 0, n, true)).toThrow(`txWrite: frame ${n - 1} is outside its buffer`);
        // A bad buffer index is caught the same way.
        const d = triples(n, -1);
        d[3 * (n - 1)] = 1;
        expect(() => io.txWrite([buf], d, 0, n, true)).toThrow(`txWrite: frame ${n - 1} is outside its buffer`);
      }
      expect([ctr[C.TX_FRAMES], ctr[C.TX_SYSCALLS]]).toEqual([0, 0]);
      expect(rxPackets('iow0')).toBe(rx0);

      expect(io.txWrite([buf], triples(600, -1), 0, 600, true)).toBe(600);
      expect(ctr[C.TX_FRAMES]).toBe(600);
      expect(ctr[C.TX_BYTES]).toBe(600 * 60); // the header is not counted
      expect(ctr[C.TX_SYSCALLS]).toBe(3); // io_uring_enter calls: one per chunk of 256 + 256 + 88, no extra wait
      expect(rxPackets('iow0') - rx0).toBe(600);

      // From an offset into the list: frames start..count-1 only.
      expect(io.txWrite([buf], triples(300, -1), 290, 300, true)).toBe(300);
      expect(ctr[C.TX_FRAMES]).toBe(610);
      expect(rxPackets('iow0') - rx0).toBe(610);
    } finally {
      io.close();
    }
  });

  it.skipIf(!uring.ok)(`uring: a write the kernel refuses is reported as the write's own syscall (write / writev), not io_uring_enter${skipNote(uring)}`, () => {
    const tap = track(openTap({ name: 'iow2', queues: 1, up: true, vnetHdrSize: HDR }));
    const io = new native.QueueIo(tap.queues[0]!.fd, { rx: 'poll', tx: 'uring', batch: 64, slotSize: 2048, hdrLen: HDR, rxDropErrnos: [], txDropErrnos: [] }, () => undefined);
    try {
      const buf = new ArrayBuffer(4096);
      new Uint8Array(buf).set(frameWithHdr(), 0);
      deleteTap('iow2'); // every write on its queue fd now fails with EBADFD
      // With the header in the frame: IORING_OP_WRITE; without: a zeroed header in front (IORING_OP_WRITEV).
      for (const [withHdr, syscall] of [[true, 'write'], [false, 'writev']] as const) {
        const desc = new Uint32Array(withHdr ? [0, 0, HDR + 60] : [0, HDR, 60]);
        let err: unknown;
        try {
          io.txWrite([buf], desc, 0, 1, withHdr);
        } catch (e) {
          err = e;
        }
        expect(err).toMatchObject({ op: 'WRITE', code: 'EBADFD', syscall });
      }
    } finally {
      io.close();
    }
  });

  it('writeBatch: written at once, it settles with the same result as before; a refused batch rejects; queued batches settle in order', async () => {
    const tap = track(openTap({ name: 'iow1', queues: 1, up: true, vnetHdrSize: HDR }));
    for (const engine of uring.ok ? (['poll', 'uring'] as const) : (['poll'] as const)) {
      const io = openQueueIO(tap.queues[0]!, { engine: { rx: 'poll', tx: engine } });
      try {
        const f = frameWithHdr();
        const batch = new Array<Buffer>(256).fill(f);
        const rx0 = rxPackets('iow1');
        const r = await io.writeBatch(batch, { withHeader: true });
        expect(r).toEqual({ frames: 256, bytes: 256 * 60, waits: 0 });
        // Two more, the second queued behind the first only if the first has to wait: both settle, in order.
        const order: number[] = [];
        const p1 = io.writeBatch(batch, { withHeader: true }).then((x) => order.push(1) && x);
        const p2 = io.writeBatch([f, f], { withHeader: true }).then((x) => order.push(2) && x);
        expect(await p1).toEqual({ frames: 256, bytes: 256 * 60, waits: 0 });
        expect(await p2).toEqual({ frames: 2, bytes: 120, waits: 0 });
        expect(order).toEqual([1, 2]);
        // One frame the kernel refuses (a virtio-net header with an unknown gso_type: EINVAL, a per-frame
        // drop) between two good ones: the batch rejects after the others were written.
        const refused = Buffer.from(f);
        refused[1] = 0x77;
        const e = await io.writeBatch([f, refused, f], { withHeader: true }).then(
          () => undefined,
          (err: unknown) => err,
        );
        expect(e).toMatchObject({ op: 'WRITE', code: 'EINVAL', written: 2, dropped: 1 });
        expect(io.stats().tx.frames).toBe(256 + 256 + 2 + 2);
        expect(rxPackets('iow1') - rx0).toBe(256 + 256 + 2 + 2);
        // Bad input rejects (an MqtapError) before anything is written.
        const bad = await io.writeBatch([f, Buffer.alloc(4)], { withHeader: true }).catch((err: unknown) => err);
        expect(bad).toMatchObject({ op: 'VALIDATE', code: 'ERR_INVALID_ARG' });
        expect(io.stats().tx.frames).toBe(516);
      } finally {
        io.close();
      }
    }
  });
});

describe('txWrite: JavaScript run by a getter on the buffers array', () => {
  const uring = need('io_uring', URING_MISSING);
  for (const engine of uring.ok ? (['poll', 'uring'] as const) : (['poll'] as const)) {
    it(`cannot leave the call with a stale descriptor or buffer pointer (${engine})`, () => {
      const [a, b] = native.unixSocketPair(5); // SOCK_SEQPACKET
      const io = new native.QueueIo(a, { rx: 'poll', tx: engine, batch: 4, slotSize: 256, hdrLen: 0, rxDropErrnos: [], txDropErrnos: [] }, () => undefined);
      try {
        const ctr = new Float64Array(io.control, 0, IOC.COUNTERS);
        const detach = (ab: ArrayBuffer): void => void structuredClone(ab, { transfer: [ab] });
        // The getter for element 1 detaches the descriptor array's buffer: it has no triples left.
        const buf = new ArrayBuffer(64);
        const desc = new Uint32Array([0, 0, 60]);
        const bufs: ArrayBuffer[] = [buf];
        Object.defineProperty(bufs, 1, { enumerable: true, get: () => (detach(desc.buffer as ArrayBuffer), buf) });
        expect(() => io.txWrite(bufs, desc, 0, 1, true)).toThrow('txWrite: start/count out of range');
        // The getter for element 1 detaches element 0, fetched before it: its frame is outside it now.
        const buf0 = new ArrayBuffer(64);
        const bufs2: ArrayBuffer[] = [buf0];
        Object.defineProperty(bufs2, 1, { enumerable: true, get: () => (detach(buf0), new ArrayBuffer(8)) });
        expect(() => io.txWrite(bufs2, new Uint32Array([0, 0, 60]), 0, 1, true)).toThrow('txWrite: frame 0 is outside its buffer');
        expect(ctr[C.TX_FRAMES]).toBe(0);
      } finally {
        io.close();
        native.close(a);
        native.close(b);
      }
    });
  }
});

describe('writeBatch: repeated views mixed with others', () => {
  const uring = need('io_uring', URING_MISSING);
  const engines = uring.ok ? (['poll', 'uring'] as const) : (['poll'] as const);
  for (const engine of engines) {
    it(`go out byte-exact and in order (${engine})`, async () => {
      const [a, b] = native.unixSocketPair(5); // SOCK_SEQPACKET
      const x = openFdIO(a, { hdrLen: 0, engine });
      const y = openFdIO(b, { hdrLen: 0, engine: 'poll' });
      try {
        const pool = Buffer.alloc(4096);
        for (let i = 0; i < pool.length; i++) pool[i] = (i * 7) & 0xff;
        const A = pool.subarray(100, 160); // 60 bytes of the pool
        const B = Buffer.alloc(99, 0xbb); // its own buffer, another length
        const C2 = pool.subarray(1000, 1514); // the pool again, another offset and length
        const frames = [A, A, A, B, B, A, C2, C2, C2, A, B, A, A];
        const batch: Uint8Array[] = [];
        for (let k = 0; k < 25; k++) batch.push(...frames); // 325 frames: two chunks on uring
        const reading = readN(y, batch.length);
        const r = await x.writeBatch(batch);
        expect(r.frames).toBe(batch.length);
        expect(r.bytes).toBe(batch.reduce((s, f) => s + f.length, 0));
        const got = await reading;
        expect(got).toHaveLength(batch.length);
        got.forEach((g, i) => expect(g.equals(batch[i]!), `frame ${i}`).toBe(true));
      } finally {
        x.close();
        y.close();
        native.close(a);
        native.close(b);
      }
    });
  }
});

async function readN(io: QueueIO, n: number): Promise<Buffer[]> {
  const got: Buffer[] = [];
  for await (const batch of io) {
    got.push(...batch.copy());
    if (got.length >= n) break;
  }
  return got;
}
