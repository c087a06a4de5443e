/**
 * Prints one plain closing line, "N passed, N failed, N skipped", after
 * vitest's own summary, so any CI log reader can count the tests.
 */
import type { Reporter } from 'vitest/reporters' with { 'resolution-mode': 'import' };

type Task = { type: string; mode?: string; result?: { state?: string }; tasks?: Task[] };

function count(tasks: readonly Task[], acc: { passed: number; failed: number; skipped: number }): void {
  for (const t of tasks) {
    if (t.type === 'suite' || t.tasks) count(t.tasks ?? [], acc);
    else if (t.mode === 'skip' || t.mode === 'todo' || t.result?.state === 'skip') acc.skipped++;
    else if (t.result?.state === 'fail') acc.failed++;
    else if (t.result?.state === 'pass') acc.passed++;
  }
}

export default class SummaryReporter implements Reporter {
  onFinished(files: readonly unknown[] = []): void {
    const acc = { passed: 0, failed: 0, skipped: 0 };
    count(files as Task[], acc);
    process.stdout.write(`\n${acc.passed} passed, ${acc.failed} failed, ${acc.skipped} skipped\n`);
  }
}
