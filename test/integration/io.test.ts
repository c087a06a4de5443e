/**
 * Batched frame I/O (lib/datapath/io.ts) on real taps, inside a throw-away network
 * namespace with link-local addresses only and no default route:
 *
 *   - kernel -> tap: datagrams sent with node:dgram to a neighbour behind the
 *     tap arrive on the queues' frame streams, byte-exact, exactly once;
 *   - tap -> kernel: writeBatch on every queue, received byte-exact by a
 *     dgram socket; 10- and 12-byte headers and no header;
 *   - backpressure: a writer faster than the path (a bridge to a second tap
 *     behind a tbf qdisc, the writer's send buffer lowered) waits on POLLOUT
 *     after EAGAIN and loses nothing; a reader slower than the kernel loses
 *     nothing the kernel queued (the kernel counts its own drops);
 *   - the stream ends on close (QueueIO, TapQueue, Tap), errors when the
 *     device is deleted under it, truncated frames are counted as drops;
 *   - no fd (and no io_uring instance) leaks.
 *
 * Both engines (poll, uring).  No timing is asserted: waits are bounded
 * only so that a broken build fails instead of hanging.
 */
import dgram from 'node:dgram';
import { readlinkSync } from 'node:fs';
import { release } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames.js';
import { getSendBuffer, kernelVersion, openFdIO, openQueueIO, openTapIO, setSendBuffer, type IoEngine, type QueueIO } from '../../lib/datapath/io.js';
import { getLink } from '../../lib/tap/links.js';
import { native } from '../../lib/sys/native.js';
import { deleteTap, openTap, type OpenTapOptions, type Tap } from '../../lib/tap/tap.js';
import { need, needCommand, netnsSysctls, openFds, reuseFdNumber, run, skipNote, tapEnv, tryRun, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { bindUdp, sendUdp } from '../helpers/net.js';
import { mshotMissingReason, uringAvailable, uringMissingReason } from '../helpers/probes.js';

const env = tapEnv();

const LOCAL = '169.254.81.1';
const PEER = '169.254.81.2';
const PEER_MAC = '02:00:00:00:51:02';
const TAP_MAC = '02:00:00:00:51:01';

const URING = env.ok && uringAvailable();
const MSHOT = env.ok && URING && need('io_uring-mshot', mshotMissingReason()).ok;
const ENGINES: IoEngine[] = URING ? (MSHOT ? ['poll', 'uring', 'uring-mshot'] : ['poll', 'uring']) : ['poll'];
if (env.ok && !URING) need('io_uring', uringMissingReason());

/** Ethernet + IPv4 + UDP (checksum 0) from PEER to LOCAL. */
function udpFrame(srcPort: number, dstPort: number, payload: Buffer): Buffer {
  return udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort, dstPort, payload });
}

/** UDP payload of an IPv4 frame from LOCAL to PEER (undefined for anything else). */
function parseUdp(f: Buffer): { dport: number; payload: Buffer } | undefined {
  const u = parseUdp4Frame(f);
  return u?.dstIp === PEER ? { dport: u.dstPort, payload: u.payload } : undefined;
}

function send(s: dgram.Socket, payload: Buffer, port: number): Promise<void> {
  return sendUdp(s, payload, port, PEER);
}

/** Polls `done` for up to ~10 s (a bound for broken builds; no timing is asserted). */
async function until(done: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !done(); i++) await sleep(20);
}

describe.skipIf(!env.ok)(`queue I/O on taps${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const sockets: dgram.Socket[] = [];
  const ios: QueueIO[] = [];
  beforeAll(() => {
    // No IPv6 in this namespace: no DAD/MLD frames among the ones counted.
    netnsSysctls();
  });
  afterEach(() => {
    for (const io of ios.splice(0)) io.close();
    for (const s of sockets.splice(0)) s.close();
  });

  function upTap(name: string, opts: Omit<OpenTapOptions, 'name'>, addr = LOCAL): Tap {
    const tap = track(openTap({ name, mac: TAP_MAC, ...opts }));
    run('ip', ['addr', 'add', `${addr}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    expect(run('ip', ['-j', 'route', 'show', 'default']).trim()).toMatch(/^\[?\]?$/);
    return tap;
  }

  function openAll(tap: Tap, engine: IoEngine, opts: { slotSize?: number } = {}): QueueIO[] {
    const list = openTapIO(tap, { engine, ...opts });
    ios.push(...list);
    return list;
  }

  describe.each(ENGINES)('engine %s', (engine) => {
    const VARIANTS: Array<{ what: string; opts: Omit<OpenTapOptions, 'name'>; hdr: number }> = [
      { what: '10-byte header', opts: {}, hdr: 10 },
      { what: '12-byte header', opts: { vnetHdrSize: 12 }, hdr: 12 },
      { what: 'no header', opts: { vnetHdr: false }, hdr: 0 },
    ];

    describe.each(VARIANTS)('$what', ({ opts, hdr }) => {
      it('kernel -> tap: every datagram arrives on some queue, byte-exact, exactly once', async () => {
        const tap = upTap('io0', { queues: 4, ...opts });
        const list = openAll(tap, engine);
        expect(list.map((io) => io.hdrLen)).toEqual([hdr, hdr, hdr, hdr]);
        expect(list[0]!.engine.rx).toBe(engine);
        const s = await bindUdp(LOCAL);
        sockets.push(s);
        const want = new Map<number, Buffer>();
        const got = new Map<number, Buffer>();
        const dup: number[] = [];
        const readers = list.map(async (io) => {
          for await (const b of io) {
            for (let i = 0; i < b.count; i++) {
              const u = parseUdp(b.frame(i));
              if (!u) continue;
              if (got.has(u.dport)) dup.push(u.dport);
              got.set(u.dport, u.payload);
              if (hdr) expect(b.header(i).gsoType).toBe(0);
            }
          }
        });
        for (let i = 0; i < 200; i++) {
          const payload = Buffer.from(`kernel->tap ${i} ${'z'.repeat(i * 5)}`);
          want.set(41000 + i, payload);
          await send(s, payload, 41000 + i);
        }
        await until(() => got.size >= want.size);
        for (const io of list) io.close();
        await Promise.all(readers);
        expect(dup).toEqual([]);
        expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
        for (const [port, p] of want) expect(got.get(port)!.equals(p), `port ${port}`).toBe(true);
        const perQueue = list.map((io) => io.stats().rx);
        expect(perQueue.reduce((a, r) => a + r.frames, 0)).toBe(200);
        expect(perQueue.every((r) => r.drops === 0)).toBe(true);
        expect(perQueue.filter((r) => r.frames > 0).length, 'several queues used').toBeGreaterThan(1);
      });

      it('tap -> kernel: writeBatch on every queue is received byte-exact', async () => {
        const tap = upTap('io0', { queues: 4, ...opts });
        const list = openAll(tap, engine);
        const s = await bindUdp(LOCAL);
        sockets.push(s);
        const port = s.address().port;
        const received = new Map<number, Buffer>();
        s.on('message', (msg, r) => {
          expect(r.address).toBe(PEER);
          received.set(r.port, msg);
        });
        const sent = new Map<number, Buffer>();
        // One queue after the other, each batch small enough for the socket's receive buffer.
        for (const [q, io] of list.entries()) {
          const frames: Buffer[] = [];
          for (let i = 0; i < 50; i++) {
            const sport = 50000 + q * 100 + i;
            const payload = Buffer.from(`tap->kernel q${q} #${i} ${'y'.repeat(i * 7)}`);
            sent.set(sport, payload);
            frames.push(udpFrame(sport, port, payload));
          }
          const r = await io.writeBatch(frames);
          expect(r.frames).toBe(50);
          expect(r.bytes).toBe(frames.reduce((a, f) => a + f.length, 0));
          await until(() => received.size >= sent.size);
        }
        expect(received.size).toBe(sent.size);
        for (const [sport, p] of sent) expect(received.get(sport)?.equals(p), `from port ${sport}`).toBe(true);
        expect(list.map((io) => io.stats().tx.frames)).toEqual([50, 50, 50, 50]);
      });
    });

    it('a frame the kernel refuses is reported, the others are written', async () => {
      const tap = upTap('io0', { queues: 1 });
      const [io] = openAll(tap, engine);
      const s = await bindUdp(LOCAL);
      sockets.push(s);
      const port = s.address().port;
      const got: number[] = [];
      s.on('message', (_m, r) => got.push(r.port));
      // a header with an unknown GSO type: tun refuses it with EINVAL
      const bad = Buffer.concat([Buffer.from([0, 0x7f, 0, 0, 0x10, 0, 0, 0, 0, 0]), udpFrame(1, port, Buffer.from('bad'))]);
      const good = (sport: number): Buffer => Buffer.concat([Buffer.alloc(10), udpFrame(sport, port, Buffer.from('good'))]);
      const err = await io!.writeBatch([good(7001), bad, good(7002)], { withHeader: true }).then(
        () => undefined,
        (e: unknown) => e as MqtapError & { written: number; dropped: number },
      );
      expect(err?.code).toBe('EINVAL');
      expect(err?.written).toBe(2);
      expect(err?.dropped).toBe(1);
      await until(() => got.length >= 2);
      expect(got.sort()).toEqual([7001, 7002]);
      expect(io!.stats().tx.drops).toBe(1);
    });

    it('backpressure: a writer faster than the path waits on POLLOUT, loses nothing, keeps the order', async (ctx) => {
      if (!needCommand('tc').ok) return ctx.skip();
      // A -> bridge -> B, with B's qdisc a slow token bucket: frames wait in
      // the qdisc, still charged to A's send buffer, so A's writes say EAGAIN.
      const a = track(openTap({ name: 'bpa0', queues: 1, up: true, mac: '02:00:00:00:5a:01' }));
      const b = track(openTap({ name: 'bpb0', queues: 1, up: true, mac: '02:00:00:00:5b:01' }));
      run('ip', ['link', 'add', 'bpbr0', 'type', 'bridge']);
      try {
        run('ip', ['link', 'set', 'bpa0', 'master', 'bpbr0']);
        run('ip', ['link', 'set', 'bpb0', 'master', 'bpbr0']);
        run('ip', ['link', 'set', 'bpbr0', 'up']);
        const tbf = tryRun('tc', ['qdisc', 'replace', 'dev', 'bpb0', 'root', 'tbf', 'rate', '20mbit', 'burst', '16kb', 'limit', '8mb']);
        if (!need('tbf', tbf.status === 0 ? '' : `tc qdisc tbf refused (CONFIG_NET_SCH_TBF?): ${tbf.stderr.trim()}`).ok) return ctx.skip();
        setSendBuffer(a, 32 * 1024);
        expect(getSendBuffer(a)).toBe(32 * 1024);
        const [w] = openAll(a, engine);
        const [r] = openAll(b, engine);
        // sndbuf < INT_MAX: 'auto' would write in order with plain syscalls; with
        // engine 'uring' the queue switches to ordered writes at the first EAGAIN.
        const N = 1500;
        const frames = Array.from({ length: N }, (_, i) => {
          const f = Buffer.alloc(1000);
          Buffer.from([0x02, 0, 0, 0, 0x5c, 0x01]).copy(f, 0); // unknown unicast: flooded to B
          Buffer.from([0x02, 0, 0, 0, 0x5a, 0x02]).copy(f, 6);
          f.writeUInt16BE(0x88b5, 12); // local experimental ethertype
          f.writeUInt32BE(i, 14);
          for (let j = 18; j < f.length; j++) f[j] = (i * 7 + j) & 0xff;
          return f;
        });
        const got: Buffer[] = [];
        const reading = (async (): Promise<void> => {
          for await (const batch of r!) {
            for (const f of batch) if (f.readUInt16BE(12) === 0x88b5) got.push(Buffer.from(f));
            if (got.length >= N) break;
          }
        })();
        const dropsBefore = getLink('bpb0')!.stats!.txDropped;
        const writes = [];
        for (let i = 0; i < N; i += 100) writes.push(w!.writeBatch(frames.slice(i, i + 100)));
        const results = await Promise.all(writes);
        await Promise.race([reading, until(() => false)]);
        const tx = w!.stats().tx;
        expect(tx.eagain, 'the kernel said EAGAIN').toBeGreaterThan(0);
        expect(tx.waits, 'and the writer waited for POLLOUT').toBeGreaterThan(0);
        expect(results.reduce((s, x) => s + x.frames, 0)).toBe(N);
        expect(tx.frames).toBe(N);
        expect(tx.drops).toBe(0);
        expect(got.length).toBe(N);
        for (let i = 0; i < N; i++) if (!got[i]!.equals(frames[i]!)) throw new Error(`frame ${i} differs or is out of order (got #${got[i]!.readUInt32BE(14)})`);
        expect(getLink('bpb0')!.stats!.txDropped - dropsBefore).toBe(0);
        expect(r!.stats().rx.drops).toBe(0);
        if (engine === 'uring') expect(tx.reordered).toBe(0);
      } finally {
        run('ip', ['link', 'del', 'bpbr0']);
      }
    });

    it('a reader slower than the kernel loses nothing the kernel queued (the kernel counts its own drops)', async () => {
      const tap = upTap('io0', { queues: 1 });
      const s = await bindUdp(LOCAL);
      sockets.push(s);
      const before = getLink('io0')!.stats!;
      // Nobody reads yet: the queue's ring (txqueuelen frames) fills, the rest is dropped by the kernel.
      const SENT = 1500;
      for (let i = 0; i < SENT; i++) await send(s, Buffer.from(`slow reader ${i}`), 30000 + (i % 50));
      const [io] = openAll(tap, engine);
      const seen: number[] = [];
      let frames = 0;
      for (;;) {
        const b = io!.tryRead();
        if (!b) break;
        frames += b.count;
        for (const f of b) {
          const u = parseUdp(f);
          if (u) seen.push(Number(u.payload.toString().split(' ')[2]));
        }
      }
      const after = getLink('io0')!.stats!;
      const handedOver = after.txPackets - before.txPackets;
      const dropped = after.txDropped - before.txDropped;
      expect(frames, 'every frame the kernel handed over was delivered').toBe(handedOver);
      expect(io!.stats().rx.frames).toBe(frames);
      expect(io!.stats().rx.drops).toBe(0);
      expect(dropped, 'the ring was full: the kernel dropped and counted').toBeGreaterThan(0);
      expect(seen.length + dropped).toBeLessThanOrEqual(SENT);
      // what was delivered is in order (one flow per port, FIFO ring)
      expect([...seen].sort((x, y) => x - y)).toEqual(seen);
    });

    it('closing the QueueIO, the TapQueue or the Tap ends waiting streams cleanly', async () => {
      const tap = upTap('io0', { queues: 3 });
      const list = openAll(tap, engine);
      const pending = list.map((io) => io[Symbol.asyncIterator]().next());
      list[0]!.close();
      tap.queues[1]!.close(); // the close hook stops polling before the fd goes
      expect(list[1]!.closed).toBe(true);
      tap.close();
      expect(list[2]!.closed).toBe(true);
      expect(await Promise.all(pending)).toEqual([
        { done: true, value: undefined },
        { done: true, value: undefined },
        { done: true, value: undefined },
      ]);
      await expect(list[2]!.writeBatch([udpFrame(1, 2, Buffer.from('x'))])).rejects.toMatchObject({ code: 'ERR_CLOSED' });
    });

    it('a closed queue fd number reused at once is never polled by the old QueueIO', async () => {
      const tap = upTap('io0', { queues: 2 });
      const [io0, io1] = openAll(tap, engine);
      const waiting = io1![Symbol.asyncIterator]().next();
      const fd = tap.queues[1]!.fd;
      tap.queues[1]!.close();
      // The number comes back for an unrelated tun fd; nothing may touch it.
      const again = reuseFdNumber(fd);
      try {
        expect(await waiting).toEqual({ done: true, value: undefined });
        expect(native.getFlFlags(again) & native.constants.O_NONBLOCK).toBe(0);
      } finally {
        native.close(again);
      }
      expect(io0!.closed).toBe(false);
    });

    it('the stream fails with EBADFD when the device is deleted under it', async () => {
      const tap = upTap('io0', { queues: 1 });
      const [io] = openAll(tap, engine);
      const reading = (async (): Promise<unknown> => {
        try {
          for await (const b of io!) void b;
          return 'ended';
        } catch (err) {
          return err;
        }
      })();
      await sleep(20);
      deleteTap('io0');
      const err = (await reading) as MqtapError;
      expect(err).toBeInstanceOf(MqtapError);
      expect(err.code).toBe('EBADFD');
      expect(err.ifname).toBe('io0');
      // The read's own failure (read(2), a READ or READ_MULTISHOT op's completion), not io_uring_enter.
      expect(err.syscall).toBe('read');
    });

    it('a frame longer than a slot is counted as a drop, not delivered cut short', async () => {
      const tap = upTap('io0', { queues: 1 });
      const [io] = openAll(tap, engine, { slotSize: 256 });
      const s = await bindUdp(LOCAL);
      sockets.push(s);
      await send(s, Buffer.alloc(1000, 1), 40001);
      await send(s, Buffer.from('small'), 40002);
      const got: number[] = [];
      for await (const b of io!) {
        for (const f of b) {
          const u = parseUdp(f);
          if (u) got.push(u.dport);
        }
        if (got.length >= 1) break;
      }
      expect(got).toEqual([40002]);
      expect(io!.stats().rx.drops).toBe(1);
    });

    it('one QueueIO per queue; the fd is non-blocking while it lives and restored after', () => {
      const tap = upTap('io0', { queues: 1 });
      const q = tap.queues[0]!;
      expect(native.getFlFlags(q.fd) & native.constants.O_NONBLOCK).toBe(0);
      const io = openQueueIO(q, { engine });
      expect(native.getFlFlags(q.fd) & native.constants.O_NONBLOCK).not.toBe(0);
      expect(() => openQueueIO(q, { engine })).toThrow(/already has an open QueueIO/);
      io.close();
      expect(native.getFlFlags(q.fd) & native.constants.O_NONBLOCK).toBe(0);
      openQueueIO(q, { engine }).close();
      q.close();
      expect(() => openQueueIO(q)).toThrow(/closed/);
    });
  });

  it('openFdIO on a bare queue fd asks the kernel for the header size', () => {
    for (const [opts, hdr] of [[{}, 10], [{ vnetHdrSize: 12 as const }, 12], [{ vnetHdr: false }, 0]] as const) {
      const tap = track(openTap({ name: 'iofd0', ...opts }));
      const io = openFdIO(tap.queues[0]!.fd);
      expect(io.hdrLen).toBe(hdr);
      io.close();
      tap.close();
    }
  });

  it("'auto' reads with what the kernel offers and writes io_uring batches when the send buffer is unlimited, plain writes when it is not", () => {
    const tap = upTap('io0', { queues: 1 });
    expect(getSendBuffer(tap)).toBe(native.ioConstants.INT_MAX);
    const io = openQueueIO(tap.queues[0]!);
    ios.push(io);
    const [maj, min] = kernelVersion(release());
    const rx = !URING ? 'poll' : MSHOT && (maj > 6 || (maj === 6 && min >= 12)) ? 'uring-mshot' : 'uring';
    expect(io.engine).toEqual(URING ? { rx, tx: 'uring' } : { rx: 'poll', tx: 'poll' });
    io.close();
    setSendBuffer(tap, 65536);
    const io2 = openQueueIO(tap.queues[0]!);
    ios.push(io2);
    expect(io2.engine.tx).toBe('poll');
  });

  it('no fd and no io_uring instance leaks over 200 open/use/close cycles', async () => {
    const tap = upTap('io0', { queues: 2 });
    const s = await bindUdp(LOCAL);
    sockets.push(s);
    const uringFds = (): number => openFds().filter((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`).includes('io_uring');
      } catch {
        return false;
      }
    }).length;
    const before = openFds();
    for (let i = 0; i < 200; i++) {
      const engine = ENGINES[i % ENGINES.length]!;
      const list = openTapIO(tap, { engine });
      await list[0]!.writeBatch([udpFrame(9000, s.address().port, Buffer.from(`leak ${i}`))]);
      list[1]!.tryRead();
      if (i % 3 === 0) {
        // with a reader waiting
        const p = list[0]![Symbol.asyncIterator]().next();
        list[0]!.close();
        await p;
      }
      for (const io of list) io.close();
      if (i % 20 === 0) {
        const t = openTap({ name: 'iol%d', queues: 2 });
        const l2 = openTapIO(t, { engine });
        t.close(); // closes the QueueIOs first
        expect(l2.every((io) => io.closed)).toBe(true);
      }
    }
    expect(openFds()).toEqual(before);
    expect(uringFds()).toBe(0);
  });
});
