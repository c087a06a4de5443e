/**
 * `mqtap vhost-user` as a process, in the test's own network namespace:
 * it opens the tap, listens (0600), reports on stderr, and on SIGTERM
 * closes everything (tap and socket file gone) and exits 0.  Bad options
 * are usage errors with nothing left behind.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { getTap } from '../../lib/tap/links.js';
import { skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { until } from '../helpers/vhost-user.js';

const CLI = resolve(__dirname, '..', '..', 'dist', 'bin', 'mqtap.js');
const base = tapEnv();
const env = base.ok && !existsSync(CLI) ? { ok: false, reason: 'dist/bin/mqtap.js is not built (npm run build)' } : base;

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

describe.skipIf(!env.ok)(`mqtap vhost-user${skipNote(env)}`, () => {
  useIsolatedNetns();

  it('serves until SIGTERM, then closes the tap and removes the socket; events as JSON lines', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vucli-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    const child = spawn(process.execPath, [CLI, 'vhost-user', '--socket', socket, '--name', 'vucli0', '--queues', '3', '--offloads', 'csum,tso4', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => child.kill('SIGKILL'));
    let stderr = '';
    let stdout = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
    await until(() => stderr.includes('"event":"ready"'), 15_000);
    const ready = JSON.parse(stderr.split('\n').find((l) => l.includes('"event":"ready"'))!);
    expect(ready).toEqual({ event: 'ready', socket, tap: 'vucli0', queues: 3, client: false });
    expect(lstatSync(socket).mode & 0o777).toBe(0o600);
    expect(getTap('vucli0')?.tun).toMatchObject({ numQueues: 3, numDisabledQueues: 0, vnetHdr: true, multiQueue: true });
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(stderr).toContain('"event":"stopped"');
    expect(stdout).toBe('');
    expect(existsSync(socket)).toBe(false);
    expect(getTap('vucli0')).toBeUndefined();
  });

  it('SIGTERM the moment "ready" is written is a clean stop (signals are handled from start-up on)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vucli-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    for (let round = 0; round < 3; round++) {
      const child = spawn(process.execPath, [CLI, 'vhost-user', '--socket', socket, '--name', 'vucli2', '--queues', '1', '--json'], { stdio: ['ignore', 'ignore', 'pipe'] });
      cleanups.push(() => child.kill('SIGKILL'));
      let stderr = '';
      let sent = false;
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        if (!sent && stderr.includes('"event":"ready"')) {
          sent = true;
          child.kill('SIGTERM'); // in the same tick the line arrives
        }
      });
      const code = await new Promise<number | null>((res) => child.on('exit', (c) => res(c)));
      expect(code, stderr).toBe(0);
      expect(existsSync(socket)).toBe(false);
      expect(getTap('vucli2')).toBeUndefined();
    }
  });

  it('bad options are usage errors and open nothing', () => {
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-vucli-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socket = join(dir, 'vu.sock');
    for (const args of [
      ['--socket', socket, '--name', 'vucli1', '--queues', '0'],
      ['--socket', socket, '--name', 'vucli1', '--queues', '2', '--offloads', 'bogus'],
      ['--socket', 'relative.sock', '--name', 'vucli1', '--queues', '2'],
      ['--socket', socket, '--name', 'bad name!', '--queues', '2'],
      ['--socket', socket, '--name', 'vucli1', '--queues', '2', '--tap-engine', 'fast'],
    ]) {
      const r = spawnSync(process.execPath, [CLI, 'vhost-user', ...args], { encoding: 'utf8', timeout: 30_000 });
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(/mqtap:|error:/);
    }
    expect(getTap('vucli1')).toBeUndefined();
    expect(existsSync(socket)).toBe(false);
  });
});
