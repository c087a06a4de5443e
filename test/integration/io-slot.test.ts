/**
 * Default receive slot size (lib/datapath/io.ts defaultSlotSize) on real taps,
 * in a throw-away network namespace with link-local addresses only:
 *
 *   - without offloads: header + 18 + MTU (+ the guard byte), in 64-byte
 *     units; a full-MTU frame is read whole;
 *   - with TSO (openTap's offloads, applyOffloads) or offloads unknown (a
 *     device this process did not create): 64 KiB + header;
 *   - an explicit slotSize wins;
 *   - the default receive batch (defaultBatch): 256 for every default slot,
 *     64 KiB ones included (a 400-frame backlog comes in batches of more
 *     than 64), 64 for slots over 128 KiB; an explicit batch wins;
 *   - the MTU raised after the QueueIO opened: a frame longer than the slot
 *     is a truncated drop (rx.truncated and rx.drops, logged with reason
 *     EMSGSIZE), the frames around it are delivered; with every engine the
 *     host has ('poll' always, 'uring' and 'uring-mshot' where io_uring has them).
 */
import dgram from 'node:dgram';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { parseUdp4Frame } from '../../lib/datapath/frames.js';
import { applyOffloads, openQueueIO, type IoEngine, type QueueIO } from '../../lib/datapath/io.js';
import type { Logger } from '../../lib/sys/log.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import { netnsSysctls, run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';
import { bindUdp, sendUdp } from '../helpers/net.js';
import { mshotMissingReason, uringAvailable } from '../helpers/probes.js';

const env = tapEnv();
const LOCAL = '169.254.84.1';
const PEER = '169.254.84.2';
const PEER_MAC = '02:00:00:00:54:02';
const GSO_SLOT_12 = Math.ceil((12 + 65550) / 64) * 64; // 64 KiB + a 12-byte header

function recorder(): { logger: Logger; lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> } {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  const at = (level: string) => (obj: unknown, msg?: string): void => void lines.push({ level, obj: (obj ?? {}) as Record<string, unknown>, msg: msg ?? '' });
  const logger = { trace: at('trace'), debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), fatal: at('fatal') } as unknown as Logger;
  return { logger, lines };
}

const engines: IoEngine[] = ['poll'];
if (env.ok && uringAvailable()) engines.push('uring');
if (env.ok && mshotMissingReason() === '') engines.push('uring-mshot');
else if (env.ok) console.warn(`io-slot: only ${engines.join(', ')}: ${uringAvailable() ? mshotMissingReason() : 'no io_uring'}`);

describe.skipIf(!env.ok)(`default receive slot size${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const ios: QueueIO[] = [];
  const sockets: dgram.Socket[] = [];
  beforeAll(() => netnsSysctls()); // no IPv6 frames among the ones counted
  afterEach(() => {
    for (const io of ios.splice(0)) io.close();
    for (const s of sockets.splice(0)) s.close();
  });

  function upTap(name: string, opts: { tso?: boolean; txQueueLen?: number } = {}): Tap {
    const tap = track(openTap({ name, vnetHdrSize: 12, ...(opts.tso ? { offloads: { csum: true, tso4: true, tso6: true } } : {}), ...(opts.txQueueLen ? { txQueueLen: opts.txQueueLen } : {}) }));
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
    run('ip', ['link', 'set', 'dev', name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
    return tap;
  }

  function open(tap: Tap, opts: Parameters<typeof openQueueIO>[1] = {}): QueueIO {
    const io = openQueueIO(tap.queues[0]!, opts);
    ios.push(io);
    return io;
  }

  it('MTU 1500, no offloads: header + 18 + 1500 (+1), in 64-byte units; a full-MTU frame is read whole', async () => {
    const tap = upTap('sl0');
    expect(tap.offloads, 'a tap this process created starts with none').toBe(0);
    const io = open(tap);
    expect(io.hdrLen).toBe(12);
    expect(io.slotSize).toBe(Math.ceil((12 + 18 + 1500 + 1) / 64) * 64); // 1536
    const s = await bindUdp(LOCAL);
    sockets.push(s);
    await sendUdp(s, Buffer.alloc(1472, 1), 9, PEER); // 1472 + 8 + 20 = 1500: a 1514-byte frame
    await sleep(20);
    let len = -1;
    for (let i = 0; i < 50 && len < 0; i++) {
      const b = io.tryRead();
      for (let j = 0; b && j < b.count; j++) if (parseUdp4Frame(b.frame(j))?.dstIp === PEER) len = b.length(j);
      if (len < 0) await sleep(10);
    }
    expect(len).toBe(1514);
    expect(io.stats().rx.drops).toBe(0);
  });

  it('a bigger MTU at open time gives bigger slots; an explicit slotSize wins', () => {
    const tap = upTap('sl0');
    run('ip', ['link', 'set', 'dev', 'sl0', 'mtu', '9000']);
    const io = open(tap);
    expect(io.slotSize).toBe(Math.ceil((12 + 18 + 9000 + 1) / 64) * 64);
    io.close();
    expect(open(tap, { slotSize: 4096 }).slotSize).toBe(4096);
  });

  it('TSO on (openTap offloads, applyOffloads) or offloads unknown (an existing device): 64 KiB + header', () => {
    const tso = upTap('sl1', { tso: true });
    expect(open(tso).slotSize).toBe(GSO_SLOT_12);
    const plain = upTap('sl2');
    expect(open(plain).slotSize).toBeLessThan(2048);
    ios.splice(0).forEach((io) => io.close());
    applyOffloads(plain, { csum: true, tso4: true });
    expect(open(plain).slotSize, 'after applyOffloads with TSO4').toBe(GSO_SLOT_12);
    ios.splice(0).forEach((io) => io.close());
    plain.setOffloads({ csum: true });
    expect(open(plain).slotSize, 'checksum offload alone hands over no GSO frames').toBeLessThan(2048);
    // A second Tap on the same device: it did not create it, so it cannot know the offloads.
    const again = track(openTap({ name: 'sl2', existing: 'allow' }));
    expect(again.created).toBe(false);
    expect(again.offloads).toBeUndefined();
    expect(open(again).slotSize).toBe(GSO_SLOT_12);
  });

  for (const engine of engines) {
    it(`default batch (${engine}): 256 frames for every default slot (a 400-frame backlog comes in batches over 64), 64 for slots over 128 KiB; an explicit batch wins`, async () => {
      const eng = engine === 'uring-mshot' ? { rx: 'uring-mshot' as const } : engine;
      const tap = upTap('sl4', { txQueueLen: 1000 }); // holds the whole backlog whatever the kernel's default
      const io = open(tap, { engine: eng });
      expect(io.slotSize).toBe(1536);
      expect(io.batchSize).toBe(256);
      const s = await bindUdp(LOCAL);
      sockets.push(s);
      // 400: the uring engine's reads ramp up (8, 16, 32, ...), so its batches pass 64 only after ~120 frames.
      for (let i = 0; i < 400; i++) await sendUdp(s, Buffer.from([i & 0xff]), 31000 + i, PEER);
      await sleep(20);
      const counts: number[] = [];
      let got = 0;
      for (let i = 0; i < 100 && got < 400; i++) {
        const b = io.tryRead();
        if (!b) {
          await sleep(10);
          continue;
        }
        let mine = 0;
        for (let j = 0; j < b.count; j++) if (parseUdp4Frame(b.frame(j))?.dstIp === PEER) mine++;
        counts.push(b.count);
        got += mine;
      }
      expect(got).toBe(400);
      expect(Math.max(...counts), `batches ${counts.join(',')}`).toBeGreaterThan(64);
      const gso = open(upTap('sl5', { tso: true }), { engine: eng });
      expect(gso.slotSize).toBe(GSO_SLOT_12);
      expect(gso.batchSize, '64 KiB slots').toBe(256);
      io.close();
      expect(open(tap, { engine: eng, slotSize: 256 * 1024 }).batchSize, 'slots over 128 KiB').toBe(64);
      ios.pop()!.close();
      expect(open(tap, { engine: eng, batch: 32 }).batchSize).toBe(32);
    });
  }

  for (const engine of engines) {
    it(`MTU raised after the QueueIO opened (${engine}): a frame longer than the slot is a truncated drop, named EMSGSIZE; the others are delivered`, async () => {
      const tap = upTap('sl3');
      const { logger, lines } = recorder();
      const io = open(tap, { engine: engine === 'uring-mshot' ? { rx: 'uring-mshot' } : engine, logger });
      expect(io.engine.rx).toBe(engine);
      const slot = io.slotSize;
      expect(slot).toBe(1536);
      run('ip', ['link', 'set', 'dev', 'sl3', 'mtu', '4000']);
      const s = await bindUdp(LOCAL);
      sockets.push(s);
      await sendUdp(s, Buffer.from('short'), 30001, PEER);
      await sendUdp(s, Buffer.alloc(3000, 2), 30002, PEER); // a 3042-byte frame: longer than the slot
      await sendUdp(s, Buffer.from('short'), 30003, PEER);
      await sleep(20);
      const ports: number[] = [];
      for (let i = 0; i < 100 && ports.length + io.stats().rx.truncated < 3; i++) {
        const b = io.tryRead();
        for (let j = 0; b && j < b.count; j++) {
          expect(b.length(j) + io.hdrLen).toBeLessThan(slot);
          const u = parseUdp4Frame(b.frame(j));
          if (u?.dstIp === PEER) ports.push(u.dstPort);
        }
        if (!b) await sleep(10);
      }
      expect(ports).toEqual([30001, 30003]);
      const st = io.stats().rx;
      expect(st.truncated).toBe(1);
      expect(st.drops).toBe(1);
      const warn = lines.filter((l) => l.level === 'warn' && /truncated/.test(l.msg));
      expect(warn).toHaveLength(1);
      expect(warn[0]!.obj).toMatchObject({ reason: 'EMSGSIZE', slotSize: slot, truncated: 1, ifname: 'sl3', queue: 0 });
      expect(String(warn[0]!.obj.hint)).toMatch(/reopen the QueueIO, or pass slotSize/);
    });
  }
});
