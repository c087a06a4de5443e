/**
 * `node dist/bench/heap-diff.js A.heapsnapshot B.heapsnapshot [N]`: what
 * differs between two V8 heap snapshots (e.g. the daemon's at two soak
 * checkpoints, `npm run soak -- --heap-snapshots DIR`), by node type and
 * constructor name: count and self size in A and B, the N (default 30)
 * largest count changes first.  Objects whose count grows with the number of
 * sessions between A and B are what a leak looks like; compiled code and
 * feedback settle after a warm-up.
 */
import { readFileSync } from 'node:fs';

interface HeapSnapshotFile {
  snapshot: { meta: { node_fields: string[]; node_types: [string[], ...unknown[]] } };
  nodes: number[];
  strings: string[];
}

interface Tally {
  count: number;
  bytes: number;
}

/** Count and self size per "type name" (strings and code are grouped by type only). */
export function tally(file: string): { byKey: Map<string, Tally>; total: Tally } {
  const snap = JSON.parse(readFileSync(file, 'utf8')) as HeapSnapshotFile;
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0];
  const stride = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const byKey = new Map<string, Tally>();
  const total: Tally = { count: 0, bytes: 0 };
  for (let i = 0; i < snap.nodes.length; i += stride) {
    const type = types[snap.nodes[i + typeAt]!]!;
    const grouped = type.includes('string') || type === 'code' || type === 'number' || type === 'hidden';
    const key = grouped ? type : `${type} ${snap.strings[snap.nodes[i + nameAt]!]!.slice(0, 60)}`;
    const size = snap.nodes[i + sizeAt]!;
    const t = byKey.get(key) ?? { count: 0, bytes: 0 };
    t.count++;
    t.bytes += size;
    byKey.set(key, t);
    total.count++;
    total.bytes += size;
  }
  return { byKey, total };
}

function main(): void {
  const [a, b, n = '30'] = process.argv.slice(2);
  if (!a || !b) {
    process.stderr.write('usage: node dist/bench/heap-diff.js A.heapsnapshot B.heapsnapshot [N]\n');
    process.exitCode = 2;
    return;
  }
  const A = tally(a);
  const B = tally(b);
  const zero: Tally = { count: 0, bytes: 0 };
  const keys = new Set([...A.byKey.keys(), ...B.byKey.keys()]);
  const rows = [...keys]
    .map((k) => ({ k, a: A.byKey.get(k) ?? zero, b: B.byKey.get(k) ?? zero }))
    .filter((r) => r.a.count !== r.b.count || r.a.bytes !== r.b.bytes)
    .sort((x, y) => Math.abs(y.b.count - y.a.count) - Math.abs(x.b.count - x.a.count) || Math.abs(y.b.bytes - y.a.bytes) - Math.abs(x.b.bytes - x.a.bytes))
    .slice(0, Number(n));
  process.stdout.write(`total: ${A.total.count} -> ${B.total.count} objects, ${A.total.bytes} -> ${B.total.bytes} bytes\n`);
  process.stdout.write('count A\tcount B\tbytes B-A\ttype name\n');
  for (const r of rows) process.stdout.write(`${r.a.count}\t${r.b.count}\t${r.b.bytes - r.a.bytes}\t${r.k}\n`);
}

if (require.main === module) main();
