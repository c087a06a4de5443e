/**
 * Loaded into the daemon the soak starts (`node --expose-gc --require
 * dist/bench/soak-daemon-probe.js ... daemon`), never into a real one.  On
 * 'stats' over the IPC channel it runs a full GC (twice, with a turn of the
 * event loop between so native finalizers run) and replies with
 * process.memoryUsage(): the soak then reads /proc for the same moment, so
 * the daemon's numbers are after a GC like the soak's own.
 */
import { getHeapStatistics } from 'node:v8';

process.channel?.unref(); // the channel must not keep a stopped daemon alive

process.on('message', (m: unknown) => {
  if (m !== 'stats') return;
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  setImmediate(() => {
    gc?.();
    const u = process.memoryUsage();
    process.send?.({ heapTotal: u.heapTotal, heapResident: getHeapStatistics().total_physical_size, heapUsed: u.heapUsed, external: u.external });
  });
});
