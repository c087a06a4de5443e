/**
 * `mqtap stats NAME` against the real kernel, in a throw-away network
 * namespace (the CLI child starts in it too):
 *
 *   - a persistent tap nobody reads: mqtap attaches --queues N itself and
 *     reports per-queue rates; the counts add up to exactly the frames the
 *     kernel sent, spread over several queues; on SIGINT it detaches again;
 *   - a tap whose queues are held elsewhere: device counters only, with the
 *     reason, and no queue is attached;
 *   - the human view has a bar per queue; an unknown name exits 3.
 */
import { spawn, spawnSync } from 'node:child_process';
import dgram from 'node:dgram';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { getTap } from '../../lib/links.js';
import { openTap } from '../../lib/tap.js';
import { run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';

const CLI = join(__dirname, '..', '..', 'dist', 'bin', 'mqtap.js');
const base = tapEnv();
const env = base.ok && !existsSync(CLI) ? { ok: false, reason: 'dist/bin/mqtap.js is not built (npx tsc -p tsconfig.json)' } : base;

const NAME = 'sts0';
const LOCAL = '169.254.93.1';
const PEER = '169.254.93.2';

interface Sample {
  name: string;
  mode: 'queues' | 'device';
  intervalMs: number;
  queues?: Array<{ queue: number; rxFrames: number; rxPps: number; txFrames: number }>;
  device: { rxPps: number };
  note?: string;
}

describe.skipIf(!env.ok)(`mqtap stats${skipNote(env)}`, () => {
  useIsolatedNetns();
  const sockets: dgram.Socket[] = [];
  beforeAll(() => {
    run('sysctl', ['-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
    // a persistent tap with no queue attached
    openTap({ name: NAME, queues: 1, persist: true, mac: '02:00:00:00:5d:01', up: true }).close();
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', NAME]);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', '02:00:00:00:5d:02', 'dev', NAME, 'nud', 'permanent']);
    // useIsolatedNetns deletes it (and every other tap) in afterAll
  });
  afterEach(() => {
    for (const s of sockets.splice(0)) s.close();
  });

  it('attaches its own queues to an idle tap and counts every frame per queue', async () => {
    expect(getTap(NAME)!.tun.numQueues).toBe(0);
    const child = spawn(process.execPath, [CLI, 'stats', NAME, '--queues', '4', '--interval', '200', '--watch', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const samples: Sample[] = [];
    let buf = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        samples.push(JSON.parse(buf.slice(0, i)) as Sample);
        buf = buf.slice(i + 1);
      }
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      for (let i = 0; i < 500 && getTap(NAME)!.tun.numQueues < 4; i++) await sleep(20);
      expect(getTap(NAME)!.tun.numQueues, stderr).toBe(4);
      const s = dgram.createSocket('udp4');
      sockets.push(s);
      await new Promise<void>((resolve) => s.bind(0, LOCAL, () => resolve()));
      const SENT = 400;
      for (let i = 0; i < SENT; i++) await new Promise<void>((resolve, reject) => s.send(Buffer.from(`stats ${i}`), 20000 + i, PEER, (e) => (e ? reject(e) : resolve())));
      const counted = (): number => samples.reduce((a, x) => a + (x.queues ?? []).reduce((b, q) => b + q.rxFrames, 0), 0);
      for (let i = 0; i < 500 && counted() < SENT; i++) await sleep(20);
      child.kill('SIGINT');
      expect(await exited, stderr).toBe(0);
      expect(samples.length).toBeGreaterThan(0);
      for (const x of samples) {
        expect(x.mode).toBe('queues');
        expect(x.queues!.map((q) => q.queue)).toEqual([0, 1, 2, 3]);
        expect(x.queues!.every((q) => q.txFrames === 0)).toBe(true);
      }
      expect(counted(), 'every frame the kernel sent, counted once').toBe(SENT);
      const perQueue = [0, 1, 2, 3].map((q) => samples.reduce((a, x) => a + x.queues![q]!.rxFrames, 0));
      expect(perQueue.filter((n) => n > 0).length, `spread ${perQueue.join('/')}`).toBeGreaterThan(1);
      // it detached again
      expect(getTap(NAME)!.tun.numQueues).toBe(0);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });

  it('shows device counters only when someone else holds the queues, and says why', () => {
    const holder = openTap({ name: NAME, existing: 'require', queues: 1 });
    try {
      const r = spawnSync(process.execPath, [CLI, 'stats', NAME, '--interval', '150', '--json'], { encoding: 'utf8', timeout: 30_000 });
      expect(r.status, r.stderr).toBe(0);
      const sample = JSON.parse(r.stdout.trim()) as Sample;
      expect(sample.mode).toBe('device');
      expect(sample.queues).toBeUndefined();
      expect(sample.note).toMatch(/per-queue counters: unavailable/);
      expect(getTap(NAME)!.tun.numQueues).toBe(1);
    } finally {
      holder.close();
    }
  });

  it('draws a bar per queue, and exits 3 for an unknown tap', () => {
    const r = spawnSync(process.execPath, [CLI, 'stats', NAME, '--queues', '2', '--interval', '150'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^QUEUE\s+RX FRAMES\/S/m);
    expect(r.stdout.split('\n').filter((l) => /^[01]\s/.test(l))).toHaveLength(2);
    expect(r.stdout).toMatch(/\|/);
    const missing = spawnSync(process.execPath, [CLI, 'stats', 'nosuch0'], { encoding: 'utf8', timeout: 30_000 });
    expect(missing.status).toBe(3);
    expect(missing.stderr).toMatch(/no tap named nosuch0/);
  });
});
