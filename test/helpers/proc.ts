/** Child processes in the tests: waiting for one to exit, and stopping one for sure. */
import { type ChildProcess } from 'node:child_process';

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Whether `c` is still running (not exited, not killed). */
export function running(c: ChildProcess): boolean {
  return c.exitCode === null && c.signalCode === null;
}

/** Resolves with `c`'s exit status (at once if it already exited); SIGKILLs it after `ms` (then timedOut is true). */
export function waitExit(c: ChildProcess, ms: number): Promise<ExitStatus & { timedOut: boolean }> {
  if (!running(c)) return Promise.resolve({ code: c.exitCode, signal: c.signalCode as NodeJS.Signals | null, timedOut: false });
  return new Promise((resolve) => {
    let timedOut = false;
    const t = setTimeout(() => {
      timedOut = true;
      c.kill('SIGKILL');
    }, ms);
    c.once('exit', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, timedOut });
    });
  });
}

/** Sends `signal` to `c` if it still runs and waits for it to exit, SIGKILLing it after `ms`. */
export async function stopChild(c: ChildProcess | undefined, signal: NodeJS.Signals = 'SIGTERM', ms = 20_000): Promise<ExitStatus & { timedOut: boolean }> {
  if (!c) return { code: null, signal: null, timedOut: false };
  if (running(c)) c.kill(signal);
  return waitExit(c, ms);
}
