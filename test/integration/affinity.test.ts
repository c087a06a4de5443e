/**
 * pinThread / threadAffinity (lib/sys/affinity.ts) on the real kernel: the
 * calling thread's CPUs change (as /proc/self/task/TID/status says) and no
 * other thread's do; the previous set comes back; bad CPU indices (beyond the
 * kernel's possible CPUs, not integers: in lib/ and in the addon) are refused
 * before any syscall.  Needs at least two CPUs this process may use, to see a
 * change at all.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { maxPossibleCpu, parseCpuList, pinThread, threadAffinity } from '../../lib/sys/affinity';
import { MqtapError } from '../../lib/sys/errors';
import { native } from '../../lib/sys/native';
import { ROOT } from '../helpers/cli';
import { catchError, need, skipNote } from '../helpers/env';

/** Cpus_allowed_list of one thread of this process, e.g. '0-1' or '1'. */
function allowedList(tid: number): string {
  const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync(`/proc/self/task/${tid}/status`, 'utf8'));
  if (!m) throw new Error(`no Cpus_allowed_list for thread ${tid}`);
  return m[1]!;
}

/** '0-2,5' -> [0, 1, 2, 5] */
function parseList(s: string): number[] {
  return s.split(',').flatMap((part) => {
    const [a, b] = part.split('-').map(Number) as [number, number | undefined];
    return b === undefined ? [a] : Array.from({ length: b - a + 1 }, (_, i) => a + i);
  });
}

const start = threadAffinity();
const env = need('smp', start.length >= 2 ? '' : `this process may use only CPU ${start.join(',')}: pinning cannot be seen to change anything`);
const DIST = join(ROOT, 'dist', 'lib', 'sys', 'affinity.js');

describe.skipIf(!env.ok)(`pinThread${skipNote(env)}`, () => {
  afterEach(() => {
    native.schedSetAffinity(start); // whatever a failed test left
  });

  it('pins the calling thread only: its Cpus_allowed_list is the CPU, then the previous set again', () => {
    const tid = native.gettid();
    expect(parseList(allowedList(tid))).toEqual(start);
    const cpu = start[start.length - 1]!;
    const before = pinThread(cpu);
    expect(before).toEqual(start);
    expect(allowedList(tid)).toBe(String(cpu));
    expect(threadAffinity()).toEqual([cpu]);
    // a set works too
    pinThread([start[1]!, start[0]!]);
    expect(parseList(allowedList(tid))).toEqual([start[0], start[1]]);
    pinThread(before);
    expect(parseList(allowedList(tid))).toEqual(start);
  });

  it.skipIf(!existsSync(DIST))(`a worker_thread pins itself; the main thread keeps its CPUs${existsSync(DIST) ? '' : ' (skipped: dist/ not built: npm run build)'}`, async () => {
    const mainTid = native.gettid();
    const cpu = start[0]!;
    const w = new Worker(
      `const { parentPort } = require('node:worker_threads');
       const { pinThread, threadAffinity } = require(${JSON.stringify(DIST)});
       const { native } = require(${JSON.stringify(join(ROOT, 'dist', 'lib', 'sys', 'native.js'))});
       const before = pinThread(${cpu});
       parentPort.postMessage({ tid: native.gettid(), before, now: threadAffinity() });
       parentPort.once('message', () => process.exit(0));`,
      { eval: true },
    );
    try {
      const m = await new Promise<{ tid: number; before: number[]; now: number[] }>((resolve, reject) => {
        w.once('message', resolve);
        w.once('error', reject);
      });
      expect(m.before).toEqual(start);
      expect(m.now).toEqual([cpu]);
      expect(m.tid).not.toBe(mainTid);
      expect(allowedList(m.tid)).toBe(String(cpu));
      expect(parseList(allowedList(mainTid))).toEqual(start);
      w.postMessage('exit');
    } finally {
      await w.terminate();
    }
  });

  it('bad CPU indices: ERR_INVALID_ARG with a hint, nothing changed', () => {
    // The bound is the kernel's last possible CPU, not the count of online ones (numbers may have gaps).
    const max = maxPossibleCpu();
    expect(max).toBe(parseList(readFileSync('/sys/devices/system/cpu/possible', 'utf8').trim()).at(-1));
    const n = max! + 1;
    for (const bad of [-1, 1.5, n, n + 1000, [], [0, -2], 'a', Number.NaN]) {
      const e = catchError(() => pinThread(bad as number));
      expect(e, String(bad)).toBeInstanceOf(MqtapError);
      expect(e).toMatchObject({ code: 'ERR_INVALID_ARG' });
    }
    const e = catchError(() => pinThread(n)) as MqtapError;
    expect(e.message).toMatch(new RegExp(`CPU ${n} does not exist`));
    expect(e.hint).toMatch(/this thread may use/);
    expect(threadAffinity()).toEqual(start);
  });

  it('the addon itself refuses CPU indices that are not integers (1.5 is not CPU 1, NaN not CPU 0)', () => {
    const cpu = start[start.length - 1]!;
    for (const bad of [cpu + 0.5, Number.NaN, -0.5, 2 ** 21]) {
      // The addon's argument errors are TypeErrors (lib/ validates first and throws MqtapErrors).
      expect(() => native.schedSetAffinity([bad]), String(bad)).toThrow(/schedSetAffinity: a CPU index is an integer/);
      expect(threadAffinity(), String(bad)).toEqual(start);
    }
  });
});

describe('CPU lists', () => {
  it('parseCpuList reads the kernel\'s range lists; maxPossibleCpu takes the last CPU, gaps and all', () => {
    expect(parseCpuList('0-3,8,10-11\n')).toEqual([0, 1, 2, 3, 8, 10, 11]);
    expect(parseCpuList('0')).toEqual([0]);
    expect(parseCpuList('3-1')).toBeUndefined();
    expect(parseCpuList('x')).toBeUndefined();
    const dir = mkdtempSync(join(tmpdir(), 'mqtap-cpus-'));
    try {
      writeFileSync(join(dir, 'possible'), '0-3,8-11\n');
      expect(maxPossibleCpu(join(dir, 'possible'))).toBe(11); // CPU 11 exists though only 8 are numbered
      expect(maxPossibleCpu(join(dir, 'missing'))).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
