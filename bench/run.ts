/**
 * `npm run bench`: benchmarks, never tests.  Everything runs in a throw-away
 * network namespace that this process creates (and that disappears with it).
 *
 *   npm run bench                  control plane (library vs C)
 *   npm run bench -- --repeats 9   more repeats
 *
 * Results are printed as a table and written to bench/out/*.json.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isolateNetns } from '../lib/netns';
import { buildCControl, compareControl, type ControlRow } from './control';

const ROOT = join(__dirname, '..', '..');
const SRC = join(ROOT, 'bench', 'c');
const OUT = join(ROOT, 'bench', 'out');

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}

function fmt(us: number): string {
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(1)} µs`;
}

function controlTable(lib: ControlRow[], c: ControlRow[]): string {
  const head = ['queues', 'create lib', 'create C', 'ratio', 'toggle lib', 'toggle C', 'ratio', 'close lib', 'close C', 'ratio'];
  const rows = lib.map((l) => {
    const k = c.find((r) => r.queues === l.queues)!;
    return [
      String(l.queues),
      fmt(l.createUs),
      fmt(k.createUs),
      `${(l.createUs / k.createUs).toFixed(2)}x`,
      fmt(l.toggleUs),
      fmt(k.toggleUs),
      `${(l.toggleUs / k.toggleUs).toFixed(2)}x`,
      fmt(l.closeUs),
      fmt(k.closeUs),
      `${(l.closeUs / k.closeUs).toFixed(2)}x`,
    ];
  });
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => c.padStart(w[i]!)).join('  ');
  return [line(head), ...rows.map(line)].join('\n');
}

function main(): void {
  if (process.getuid?.() !== 0) {
    process.stderr.write('bench: needs root (it creates taps in a throw-away network namespace)\n');
    process.exitCode = 4;
    return;
  }
  const repeats = Number(arg('repeats', '5'));
  const rounds = Number(arg('rounds', '4'));
  const queues = arg('queues', '1,2,4,8,16,32,64,128,256').split(',').map(Number);
  mkdirSync(OUT, { recursive: true });
  const ns = isolateNetns();
  try {
    process.stdout.write(
      `control plane: create a tap with Q queues, detach+attach each queue, close\n` +
        `(median of ${rounds} alternating rounds x ${repeats} repeats; ratio = library / C)\n`,
    );
    const { library: lib, c } = compareControl(buildCControl(OUT, SRC), queues, repeats, rounds);
    process.stdout.write(`${controlTable(lib, c)}\n`);
    const worst = Math.max(...lib.map((l) => {
      const k = c.find((r) => r.queues === l.queues)!;
      return (l.createUs + l.toggleUs + l.closeUs) / (k.createUs + k.toggleUs + k.closeUs);
    }));
    process.stdout.write(`worst whole-cycle ratio: ${worst.toFixed(2)}x (target <= 1.2x)\n`);
    writeFileSync(join(OUT, 'control.json'), JSON.stringify({ date: new Date().toISOString(), repeats, rounds, library: lib, c }, null, 2));
  } finally {
    ns.restore();
  }
}

main();
