/**
 * CPU affinity of the calling thread, for CPU locality on the data path: a
 * queue's reader (a worker_thread running openQueueIO) pinned to the CPU that
 * produces its frames reads them from a warm cache (docs/datapath.md "CPU
 * locality").  Only the calling thread changes: the rest of the process (the
 * main thread, libuv's pool, other workers) keeps its CPUs.
 */
import { existsSync, readFileSync } from 'node:fs';
import { MqtapError, invalidArg } from './errors';
import { native } from './native';

/** The CPUs the calling thread may run on now (sched_getaffinity), ascending. */
export function threadAffinity(): number[] {
  return native.schedGetAffinity();
}

/** '0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; undefined when it is not such a list. */
export function parseCpuList(text: string): number[] | undefined {
  const out: number[] = [];
  for (const part of text.trim().split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) return undefined;
    const a = Number(m[1]);
    const b = m[2] !== undefined ? Number(m[2]) : a;
    if (b < a) return undefined;
    for (let c = a; c <= b; c++) out.push(c);
  }
  return out;
}

const POSSIBLE = '/sys/devices/system/cpu/possible';

/**
 * The highest CPU number the kernel could ever bring online (the last of
 * /sys/devices/system/cpu/possible), or undefined where that cannot be read.
 * Not os.cpus().length: CPU numbers need not be contiguous (offline or
 * hot-pluggable CPUs), so a valid CPU can be >= the count of online ones.
 */
export function maxPossibleCpu(path = POSSIBLE): number | undefined {
  if (!existsSync(path)) return undefined;
  const list = parseCpuList(readFileSync(path, 'utf8'));
  return list && list.length > 0 ? list[list.length - 1] : undefined;
}

function validateCpus(cpu: number | readonly number[]): number[] {
  const list = typeof cpu === 'number' ? [cpu] : Array.isArray(cpu) ? [...(cpu as readonly unknown[])] : undefined;
  if (!list || list.length === 0) throw invalidArg(`pinThread(cpu): cpu must be a CPU index or a non-empty array of them (got ${JSON.stringify(cpu)})`);
  const max = maxPossibleCpu();
  for (const c of list) {
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 0)
      throw invalidArg(`pinThread: a CPU index is an integer from 0 (got ${JSON.stringify(c)})`, 'CPUs are numbered as in /proc/cpuinfo and `lscpu`');
    if (max !== undefined && c > max)
      throw invalidArg(`pinThread: CPU ${c} does not exist (this kernel's CPUs are numbered 0..${max}, ${POSSIBLE})`, `pick a CPU from \`lscpu -e\`; this thread may use ${threadAffinity().join(',')}`);
  }
  return [...new Set(list as number[])].sort((a, b) => a - b);
}

/**
 * Pins the calling thread to `cpu` (one index, or a set of them) with
 * sched_setaffinity(2) and returns the CPUs it could use before, so that
 * `pinThread(previous)` undoes it.  Call it from the thread to pin, e.g. at
 * the start of a queue's worker_thread.  Threads the pinned thread creates
 * afterwards inherit its mask: a Worker it starts, and the kernel's io-wq
 * workers of io_uring rings it sets up (libuv's pool is started once per
 * process, by whichever thread uses it first: pinning the main thread before
 * that pins the pool too).
 *
 * The kernel answers for CPUs that exist but cannot be used (offline, or
 * outside this process's cpuset: a container's or systemd's `AllowedCPUs`):
 * EINVAL when none of them can, with a hint.  When the kernel keeps only
 * some of them (it intersects the mask with the cpuset), the thread's
 * previous CPUs are restored and an ERR_INVALID_ARG names the ones refused.
 */
export function pinThread(cpu: number | readonly number[]): number[] {
  const want = validateCpus(cpu);
  const before = threadAffinity();
  const hint = `see Cpus_allowed_list in /proc/self/status (a container or systemd unit may restrict this process) and the online CPUs (/sys/devices/system/cpu/online): pick among ${before.join(',')}`;
  try {
    native.schedSetAffinity(want);
  } catch (err) {
    if (err instanceof MqtapError && err.code === 'EINVAL') err.hint = `CPU ${want.join(',')} is offline or not allowed for this process: ${hint}`;
    throw err;
  }
  const got = threadAffinity();
  if (got.length !== want.length || got.some((c, i) => c !== want[i])) {
    native.schedSetAffinity(before);
    const refused = want.filter((c) => !got.includes(c));
    throw new MqtapError({
      op: 'SCHED_SETAFFINITY',
      code: 'ERR_INVALID_ARG',
      message: `pinThread: the kernel kept only CPU ${got.join(',')} of ${want.join(',')} (CPU ${refused.join(',')} offline or outside this process's cpuset); the thread's CPUs are unchanged`,
      hint,
    });
  }
  return before;
}
