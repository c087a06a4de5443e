/**
 * CPU affinity of the calling thread, for CPU locality on the data path: a
 * queue's reader (a worker_thread running openQueueIO) pinned to the CPU that
 * produces its frames reads them from a warm cache (docs/datapath.md "CPU
 * locality").  Only the calling thread changes: the rest of the process (the
 * main thread, libuv's pool, other workers) keeps its CPUs.
 */
import { cpus } from 'node:os';
import { MqtapError, invalidArg } from './errors';
import { native } from './native';

/** The CPUs the calling thread may run on now (sched_getaffinity), ascending. */
export function threadAffinity(): number[] {
  return native.schedGetAffinity();
}

function validateCpus(cpu: number | readonly number[]): number[] {
  const list = typeof cpu === 'number' ? [cpu] : Array.isArray(cpu) ? [...(cpu as readonly unknown[])] : undefined;
  if (!list || list.length === 0) throw invalidArg(`pinThread(cpu): cpu must be a CPU index or a non-empty array of them (got ${JSON.stringify(cpu)})`);
  const n = cpus().length;
  for (const c of list) {
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 0)
      throw invalidArg(`pinThread: a CPU index is an integer from 0 (got ${JSON.stringify(c)})`, 'CPUs are numbered as in /proc/cpuinfo and `lscpu`');
    if (n > 0 && c >= n)
      throw invalidArg(`pinThread: CPU ${c} does not exist (this machine has CPUs 0..${n - 1})`, `pick a CPU from \`nproc --all\` / os.cpus(); this thread may use ${threadAffinity().join(',')}`);
  }
  return [...new Set(list as number[])].sort((a, b) => a - b);
}

/**
 * Pins the calling thread to `cpu` (one index, or a set of them) with
 * sched_setaffinity(2) and returns the CPUs it could use before, so that
 * `pinThread(previous)` undoes it.  Call it from the thread to pin, e.g. at
 * the start of a queue's worker_thread.  A CPU outside this process's cpuset
 * (a container's or systemd's `AllowedCPUs`) fails with EINVAL and a hint.
 */
export function pinThread(cpu: number | readonly number[]): number[] {
  const want = validateCpus(cpu);
  const before = threadAffinity();
  try {
    native.schedSetAffinity(want);
  } catch (err) {
    if (err instanceof MqtapError && err.code === 'EINVAL')
      err.hint = `CPU ${want.join(',')} is not allowed for this process (its cpuset: see Cpus_allowed_list in /proc/self/status; a container or systemd unit may restrict it): pick one of ${before.join(',')}`;
    throw err;
  }
  return before;
}
