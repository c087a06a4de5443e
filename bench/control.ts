/**
 * Control-plane benchmark: create a tap with Q queues, detach+attach every
 * queue, close — through the library, and through bench/c/ctl.c doing the
 * same syscalls, in the same run and the same throw-away namespace.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { openTap } from '../lib/tap/tap';
import { median } from './stats';

export interface ControlRow {
  queues: number;
  createUs: number;
  toggleUs: number;
  closeUs: number;
}

function nowUs(): number {
  return Number(process.hrtime.bigint()) / 1000;
}

let warmedUp = false;

/**
 * JIT warm-up: the library's JavaScript runs interpreted for its first calls
 * (tens of µs each), which a long-running daemon pays once.  Measure the
 * steady state, as the C program (compiled) always is.
 */
function warmUp(): void {
  if (warmedUp) return;
  warmedUp = true;
  for (let i = 0; i < 40; i++) {
    const tap = openTap({ name: 'mqbw0', queues: 2, existing: 'forbid' });
    for (const queue of tap.queues) {
      queue.disable({ allowNone: true });
      queue.enable();
    }
    tap.close();
  }
}

/** The library doing what ctl.c does, medians over `repeats`. */
export function libraryControl(queueCounts: number[], repeats: number): ControlRow[] {
  warmUp();
  return queueCounts.map((q) => {
    const create: number[] = [];
    const toggle: number[] = [];
    const close: number[] = [];
    // one warm-up round, as ctl.c does
    for (let r = -1; r < repeats; r++) {
      let t = nowUs();
      const tap = openTap({ name: 'mqbl0', queues: q, existing: 'forbid' });
      const c = nowUs() - t;
      t = nowUs();
      for (const queue of tap.queues) {
        queue.disable({ allowNone: true });
        queue.enable();
      }
      const g = nowUs() - t;
      t = nowUs();
      tap.close();
      const x = nowUs() - t;
      if (r >= 0) {
        create.push(c);
        toggle.push(g);
        close.push(x);
      }
    }
    return { queues: q, createUs: median(create), toggleUs: median(toggle), closeUs: median(close) };
  });
}

/** Compiles bench/c/ctl.c into outDir; returns the binary's path. */
export function buildCControl(outDir: string, srcDir: string): string {
  const bin = join(outDir, 'ctl');
  execFileSync(process.env.CC ?? 'cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, join(srcDir, 'ctl.c')], { stdio: 'inherit' });
  return bin;
}

/** Runs the C benchmark (in this process's current network namespace). */
export function cControl(bin: string, queueCounts: number[], repeats: number): ControlRow[] {
  const out = execFileSync(bin, ['-q', queueCounts.join(','), '-r', String(repeats), '-n', 'mqbc0'], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as ControlRow);
}

/**
 * Alternates C and library rounds for each queue count, so both see the same
 * machine state (closing a tap leaves RCU work behind that slows whatever
 * runs next); returns the medians of the per-round medians.
 */
export function compareControl(bin: string, queueCounts: number[], repeats: number, rounds: number): { library: ControlRow[]; c: ControlRow[] } {
  const library: ControlRow[] = [];
  const c: ControlRow[] = [];
  for (const q of queueCounts) {
    const lib: ControlRow[] = [];
    const cc: ControlRow[] = [];
    for (let r = 0; r < rounds; r++) {
      if (r % 2 === 0) {
        cc.push(...cControl(bin, [q], repeats));
        lib.push(...libraryControl([q], repeats));
      } else {
        lib.push(...libraryControl([q], repeats));
        cc.push(...cControl(bin, [q], repeats));
      }
    }
    const med = (rows: ControlRow[]): ControlRow => ({
      queues: q,
      createUs: median(rows.map((x) => x.createUs)),
      toggleUs: median(rows.map((x) => x.toggleUs)),
      closeUs: median(rows.map((x) => x.closeUs)),
    });
    library.push(med(lib));
    c.push(med(cc));
  }
  return { library, c };
}
