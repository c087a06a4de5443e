/**
 * Parameters of the property-based (fast-check) tests in test/fuzz/: a fixed
 * seed and a bounded number of runs inside `npm test`; `npm run fuzz -- --runs N
 * [--seed S]` (test/fuzz/run.js) sets MQTAP_FUZZ_RUNS / MQTAP_FUZZ_SEED for
 * long runs.  A failure prints the seed and path that reproduce it; each
 * failure found becomes a regression case next to its property.
 */
import fc from 'fast-check';

export function fuzzParams(defaultRuns = 200): fc.Parameters<unknown> {
  const runs = Number(process.env.MQTAP_FUZZ_RUNS ?? defaultRuns);
  const seed = Number(process.env.MQTAP_FUZZ_SEED ?? 0x6d717461);
  return { numRuns: Number.isInteger(runs) && runs > 0 ? runs : defaultRuns, seed: Number.isInteger(seed) ? seed : 0x6d717461 };
}

/** Timeout for one property test: long runs get time in proportion. */
export function fuzzTimeout(perRunMs = 5, floorMs = 60_000): number {
  return Math.max(floorMs, (fuzzParams().numRuns ?? 0) * perRunMs);
}
