/**
 * bench/heap-diff.ts, the tool that compares the daemon's heap snapshots at
 * two soak checkpoints: it must count objects by constructor as V8 wrote them.
 * Uses a real snapshot of this worker's heap.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeHeapSnapshot } from 'node:v8';
import { afterAll, describe, expect, it } from 'vitest';
import { tally } from '../../bench/heap-diff.js';

class HeapDiffProbeObject {
  constructor(readonly n: number) {}
}

const dir = mkdtempSync(join(tmpdir(), 'mqtap-heapdiff-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('heap-diff tally', () => {
  it('counts live objects per constructor: 1,234 kept objects of a class are 1,234 in the snapshot', () => {
    const kept = Array.from({ length: 1234 }, (_, i) => new HeapDiffProbeObject(i));
    const t = tally(writeHeapSnapshot(join(dir, 'a.heapsnapshot')));
    expect(t.byKey.get('object HeapDiffProbeObject')?.count).toBe(1234);
    expect(t.total.count).toBeGreaterThan(1234);
    expect(kept.length).toBe(1234);
  });
});
