import { defineConfig } from 'vitest/config';

// Integration tests enter network namespaces with setns()/unshare() on the
// calling thread, so every test file runs in its own child process (forks
// pool) on that process's main thread.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    poolOptions: { forks: { isolate: true } },
    testTimeout: 60_000,
    hookTimeout: 120_000,
    reporters: ['default', './test/summary-reporter.ts'],
    // npm run test:asan: a leak check in each worker after each file (test/asan/setup.ts).
    setupFiles: process.env.MQTAP_ADDON ? ['./test/asan/setup.ts'] : [],
  },
});
