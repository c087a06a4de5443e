/**
 * bench/c/tapio.c, the C baseline of the data-path benchmark, on the real
 * kernel in a throw-away namespace: the best read loop (uring-mshot: a
 * multishot read into a provided-buffer ring) counts only frames the kernel
 * handed over, keeps reading across -ENOBUFS (re-armed after the refill:
 * with 4 buffers that happens every few frames, so a missing re-arm would
 * stall it), and truncates nothing; the best write loop (uring-write256)
 * writes 256 frames per submit; uring-batch (64 RWF_NOWAIT reads per enter
 * from the same buffer ring, a poll only when the ring ran dry) hands frames
 * over whole without io-wq threads and waits instead of spinning; the
 * per-thread CPU split (io-wq workers) is reported; the naive io_uring modes
 * still work.  io_uring
 * is made with raw syscalls, so no liburing is needed.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from '../helpers/cli';
import { haveCommand, need, netnsSysctls, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env';

const tap = tapEnv();
const cc = tap.ok ? need('cc', haveCommand('cc') ? '' : 'no C compiler (apt-get install gcc)') : tap;
const dir = cc.ok ? mkdtempSync(join(tmpdir(), 'mqtap-tapio-')) : '';
const TAPIO = join(dir, 'tapio');
if (cc.ok) execFileSync('cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', TAPIO, join(ROOT, 'bench', 'c', 'tapio.c')], { stdio: 'inherit' });

interface Probe {
  uring: boolean;
  deferTaskrun: boolean;
  readWrite: boolean;
  readMultishot: boolean;
  pbufRing: boolean;
  error: string;
}
const probe: Probe | undefined = cc.ok ? (JSON.parse(execFileSync(TAPIO, ['--mode', 'probe'], { encoding: 'utf8' })) as Probe) : undefined;
const uring = cc.ok ? need('io_uring', probe!.uring && probe!.readWrite ? '' : `io_uring unavailable (${probe!.error || 'no READ/WRITE ops'}; kernel.io_uring_disabled?)`) : cc;
const mshot = uring.ok
  ? need('io_uring_mshot', probe!.readMultishot && probe!.pbufRing && probe!.deferTaskrun ? '' : 'this kernel lacks IORING_OP_READ_MULTISHOT (Linux 6.7+), provided-buffer rings or DEFER_TASKRUN')
  : uring;

interface TapioOut {
  mode: string;
  frames: number;
  bytes: number;
  seconds: number;
  batches?: number;
  framesPerBatch?: number;
  rearms?: number;
  enobufs?: number;
  cpuSeconds: number;
  mainCpuSeconds: number;
  workerCpuSeconds: number;
  workers: number;
  workerCpus: number;
  enters?: number;
  polls?: number;
  drain?: boolean;
  drains?: number;
  kernelTxPackets?: number;
  kernelRxPackets?: number;
  errors?: number;
  timedOut: boolean;
}

function tapio(args: string[]): TapioOut {
  const r = spawnSync(TAPIO, ['--dev', 'tqio0', '--cpu', '0', '--gen-cpu', '1', '--timeout', '30', ...args], { encoding: 'utf8', timeout: 60_000 });
  expect(r.status, `tapio ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as TapioOut;
}

describe.skipIf(!uring.ok)(`bench/c/tapio io_uring modes${skipNote(uring)}`, () => {
  useIsolatedNetns();
  beforeAll(() => netnsSysctls());
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('probe reports what the kernel offers, as JSON', () => {
    expect(probe).toMatchObject({ uring: true, readWrite: true });
    expect(typeof probe!.readMultishot).toBe('boolean');
  });

  it.skipIf(!mshot.ok)(`uring-mshot with 4 buffers: -ENOBUFS every few frames, re-armed after the refill, no frame lost or invented${skipNote(mshot)}`, () => {
    const N = 20_000;
    const r = tapio(['--mode', 'uring-mshot', '--bufs', '4', '--size', '60', '--frames', String(N)]);
    expect(r.timedOut).toBe(false);
    expect(r.frames).toBeGreaterThanOrEqual(N);
    // Counted frames are frames the kernel handed over (plus the first batch, which only starts the clock).
    expect(r.frames).toBeLessThanOrEqual(r.kernelTxPackets!);
    expect(r.framesPerBatch!).toBeLessThanOrEqual(4);
    expect(r.enobufs!, 'the generator outpaces 4 buffers').toBeGreaterThan(0);
    expect(r.rearms!).toBeGreaterThanOrEqual(r.enobufs!);
    expect(r.bytes).toBe(r.frames * 60);
  });

  it.skipIf(!mshot.ok)(`uring-mshot hands over 1514-byte and 64 KB GSO frames whole (buffers sized for the vnet header + 64 KB)${skipNote(mshot)}`, () => {
    const mtu = tapio(['--mode', 'uring-mshot', '--size', '1514', '--frames', '5000']);
    expect(mtu.bytes).toBe(mtu.frames * 1514);
    const gso = tapio(['--mode', 'uring-mshot', '--size', 'gso', '--frames', '2000']);
    expect(gso.bytes).toBe(gso.frames * 65214);
    expect(gso.framesPerBatch!).toBeGreaterThan(1);
  });

  it('uring-write256: 256 writes per submit, every one received by the kernel', () => {
    const r = tapio(['--mode', 'uring-write256', '--size', '60', '--frames', String(256 * 40)]);
    expect(r).toMatchObject({ frames: 256 * 40, kernelRxPackets: 256 * 40, errors: 0, batches: 40, framesPerBatch: 256 });
  });

  it('reports where the CPU went: io-wq workers of the naive read (blocking fd) are counted, the multishot has none', () => {
    // Generator on the reader's CPU: the reader catches up, its 32 reads on the
    // blocking fd (tun has no FMODE_NOWAIT) find nothing and go to io-wq
    // worker threads, which block in tun_do_read.
    const x32 = tapio(['--mode', 'uring-read', '--size', '60', '--frames', '20000', '--gen-cpu', '0']);
    expect(x32.workers).toBeGreaterThan(0);
    expect(x32.workerCpuSeconds).toBeGreaterThan(0);
    // The per-thread split adds up to the process CPU the per-frame figure uses.
    expect(x32.mainCpuSeconds + x32.workerCpuSeconds).toBeLessThanOrEqual(x32.cpuSeconds * 1.05 + 0.002);
    expect(x32.mainCpuSeconds + x32.workerCpuSeconds).toBeGreaterThanOrEqual(x32.cpuSeconds * 0.8 - 0.002);
    expect(x32.enters).toBeGreaterThan(0);
    if (mshot.ok) {
      // O_NONBLOCK before registering: every read inline, no io-wq thread at all.
      const m = tapio(['--mode', 'uring-mshot', '--size', '60', '--frames', '20000', '--gen-cpu', '0']);
      expect(m.workers).toBe(0);
      expect(m.workerCpuSeconds).toBe(0);
      expect(m.mainCpuSeconds).toBeGreaterThanOrEqual(m.cpuSeconds * 0.8 - 0.002);
    }
  });

  it.skipIf(!mshot.ok)(`uring-batch: 64 RWF_NOWAIT reads per enter from the provided-buffer ring, frames whole, no io-wq; a poll only when the ring ran dry, no stall${skipNote(mshot)}`, () => {
    const r = tapio(['--mode', 'uring-batch', '--size', '1514', '--frames', '20000']);
    expect(r.frames).toBeGreaterThanOrEqual(20000);
    expect(r.frames).toBeLessThanOrEqual(r.kernelTxPackets!);
    expect(r.bytes).toBe(r.frames * 1514); // every buffer handed over whole
    expect(r.workers).toBe(0);
    expect(r.enters).toBeGreaterThanOrEqual(Math.ceil(r.frames / 64));
    // Paced generator (the reader is ahead): batches find the ring empty (-EAGAIN), the loop waits on a poll, none is lost.
    const paced = tapio(['--mode', 'uring-batch', '--size', '60', '--frames', '3000', '--gen-rate', '20000']);
    expect(paced.timedOut).toBe(false);
    expect(paced.polls).toBeGreaterThan(0);
    expect(paced.enters).toBeLessThan(paced.frames); // it waited, it did not spin on -EAGAIN
    expect(paced.frames).toBeGreaterThanOrEqual(3000);
    expect(paced.frames).toBeLessThanOrEqual(paced.kernelTxPackets!);
  });

  it.skipIf(!mshot.ok)(`uring-mshot-drain: behind, -ENOBUFS switches to RWF_NOWAIT batches instead of a re-arm; caught up, the multishot waits again; frames exact and whole${skipNote(mshot)}`, () => {
    // Flat-out generator, 8 buffers: the reader is behind, so every multishot ends in -ENOBUFS
    // and the loop drains; each drain ends when a batch meets -EAGAIN, then the multishot is re-armed.
    const r = tapio(['--mode', 'uring-mshot-drain', '--bufs', '8', '--size', '1514', '--frames', '20000']);
    expect(r.drain).toBe(true);
    expect(r.frames).toBeGreaterThanOrEqual(20000);
    expect(r.frames).toBeLessThanOrEqual(r.kernelTxPackets!);
    expect(r.bytes).toBe(r.frames * 1514);
    expect(r.drains!).toBeGreaterThan(0);
    expect(r.drains!).toBe(r.enobufs!); // every -ENOBUFS started a drain, none re-armed at once
    expect(r.workers).toBe(0);
    // Paced (the reader is ahead): the multishot does the waiting; no stall, nothing lost.
    const paced = tapio(['--mode', 'uring-mshot-drain', '--size', '60', '--frames', '3000', '--gen-rate', '20000']);
    expect(paced.timedOut).toBe(false);
    expect(paced.frames).toBeGreaterThanOrEqual(3000);
    expect(paced.frames).toBeLessThanOrEqual(paced.kernelTxPackets!);
    expect(paced.enters).toBeLessThan(paced.frames); // it waited on the multishot, it did not spin on -EAGAIN
  });

  it('--warmup-ms: every read loop measures only what it reads after the warm-up (frames, time and CPU), --frames of them', () => {
    // Paced at 20,000 frames/s: 300 ms of warm-up are ~6,000 frames read and not counted, then 3,000 frames in ~0.15 s.
    const modes = ['read', 'uring-read', ...(mshot.ok ? ['uring-mshot-drain', 'uring-batch'] : [])];
    for (const mode of modes) {
      const r = tapio(['--mode', mode, '--size', '60', '--frames', '3000', '--gen-rate', '20000', '--warmup-ms', '300']);
      const what = `${mode}: ${JSON.stringify(r)}`;
      expect(r.timedOut, what).toBe(false);
      expect(r.frames, what).toBeGreaterThanOrEqual(3000);
      expect(r.frames, what).toBeLessThan(3000 + 256);
      expect(r.bytes, what).toBe(r.frames * 60);
      expect(r.kernelTxPackets! - r.frames, `${what}: the warm-up's frames were read, not counted`).toBeGreaterThan(3000);
      expect(r.seconds, `${what}: the clock started after the warm-up`).toBeLessThan(0.4);
      expect(r.seconds, what).toBeGreaterThan(0.05);
      expect(r.cpuSeconds, `${what}: CPU from the clock's start`).toBeLessThanOrEqual(r.seconds * 1.1 + 0.01);
    }
    // Unpaced, the reader is busy all the time: 300 ms of warm-up would be >= 0.2 s of CPU if it
    // were counted; 20,000 measured frames are a few tens of ms even on a slow machine.
    for (const mode of ['read', ...(mshot.ok ? ['uring-mshot-drain'] : [])]) {
      const r = tapio(['--mode', mode, '--size', '60', '--frames', '20000', '--warmup-ms', '300']);
      expect(r.frames, mode).toBeGreaterThanOrEqual(20000);
      expect(r.kernelTxPackets! - r.frames, `${mode}: frames of the warm-up not counted`).toBeGreaterThan(20000);
      expect(r.cpuSeconds, `${mode}: the warm-up's CPU is not counted: ${JSON.stringify(r)}`).toBeLessThan(0.15);
    }
  });

  it('the naive io_uring loops (32 per submit) still run: uring-write and uring-read', () => {
    const w = tapio(['--mode', 'uring-write', '--size', '1514', '--frames', '3200']);
    expect(w).toMatchObject({ frames: 3200, kernelRxPackets: 3200, batches: 100, framesPerBatch: 32 });
    const rd = tapio(['--mode', 'uring-read', '--size', '60', '--frames', '5000']);
    expect(rd.frames).toBeGreaterThanOrEqual(4999);
    expect(rd.frames).toBeLessThanOrEqual(rd.kernelTxPackets!);
  });
});
