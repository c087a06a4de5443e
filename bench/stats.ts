/** Numbers and tables shared by the benchmarks (bench/control.ts, bench/data.ts, bench/run.ts). */

/** The median of `xs` (the mean of the two middle values for an even count); NaN for none. */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * `head` and `rows` as aligned text columns separated by two spaces: the
 * first `leftColumns` columns padded on the right (labels), the others on
 * the left (numbers).
 */
export function textTable(head: readonly string[], rows: ReadonlyArray<readonly string[]>, leftColumns = 0): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: readonly string[]): string => r.map((c, i) => (i < leftColumns ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  ');
  return [line(head), ...rows.map(line)].join('\n');
}
