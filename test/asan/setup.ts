/**
 * Loaded by vitest (vitest.config.ts setupFiles) only when the suites run
 * against the sanitizer build (`npm run test:asan` sets MQTAP_ADDON): after
 * each test file, a leak check in this worker, which the runner ends without
 * an exit-time check.  Reports go to the sanitizer log that test/asan/leaks.js
 * reads.
 */
import { afterAll } from 'vitest';
import { native } from '../../lib/sys/native';

afterAll(() => {
  const check = (native as unknown as { lsanCheck?: () => number }).lsanCheck;
  if (!check) throw new Error('MQTAP_ADDON is not the sanitizer build (no lsanCheck): npm run build:asan');
  // Let pending finalizers (allocPages, FdPoll ...) run first, so memory
  // released by garbage collection is not reported.
  (globalThis as { gc?: () => void }).gc?.();
  check();
});
