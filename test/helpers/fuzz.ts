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

/** Runs per fc.assert call: a long run is split so the test worker can answer the runner in between. */
const CHUNK = 500;

/**
 * fc.assert with the suite's seed and run count, in chunks of CHUNK runs
 * (chunk k uses seed + k), yielding to the event loop between chunks: a
 * long synchronous run would starve the worker's messages to vitest
 * ("Timeout calling onTaskUpdate").  A failure names the seed that
 * reproduces it (`npm run fuzz -- --seed S`).
 */
export async function fuzzAssert<Ts>(prop: fc.IProperty<Ts> | fc.IAsyncProperty<Ts>, defaultRuns = 200): Promise<void> {
  const { numRuns = defaultRuns, seed = 0 } = fuzzParams(defaultRuns);
  for (let done = 0, k = 0; done < numRuns; done += CHUNK, k++) {
    await fc.assert(prop as fc.IAsyncProperty<Ts>, { numRuns: Math.min(CHUNK, numRuns - done), seed: seed + k });
    await new Promise((resolve) => setImmediate(resolve));
  }
}
