/**
 * The guest VM harness for the tests.  The implementation moved to
 * lib/qemu/guest.ts (compiled into dist/, used by `mqtap demo`) and the scripts to
 * vm/ (shipped with the npm package); this module re-exports the same API
 * (VM_DIR now names vm/, where the scripts are).  See vm/README.md.
 */
export * from '../../lib/qemu/guest';

import { runInGuest, type RunInGuestOptions, type RunInGuestResult } from '../../lib/qemu/guest';

/** Whether a runInGuest error is an outer guest that vanished without a word (see runNestedKvmGuest). */
export function silentGuestReset(err: unknown): boolean {
  const r = (err as { result?: RunInGuestResult } | null)?.result;
  if (!r || r.timedOut || r.exitCode !== null) return false;
  if (!/QEMU exit status 0\b/.test(String((err as Error).message))) return false;
  // A kernel that panicked, oopsed or BUGed says so at loglevel 4: that is a real failure.
  return !/Kernel panic|Oops|BUG:|general protection|Call Trace/.test(r.console);
}

/**
 * runInGuest for the outer guests that run an inner one with KVM on QEMU
 * TCG's emulation of AMD SVM (modules: ['kvm_amd']).  Now and then (1 run
 * in ~5 on 2026-12-06) such an outer guest is gone ~40 s in: QEMU exits 0
 * (-no-reboot turns a reset into an exit), the console has no panic or
 * oops at loglevel 4 and no line from init, only KVM's "Unhandled WRMSR"
 * notes: a reset of the outer machine under emulated SVM (a triple fault
 * in TCG's nested virtualization), not something the code under test can
 * cause from userspace in either guest.  That case is run once more, with
 * a warning that carries the first run's console; any other failure (a
 * panic, a timeout, init's own error, a non-zero exit) is not retried.
 */
export async function runNestedKvmGuest(opts: RunInGuestOptions): Promise<RunInGuestResult> {
  try {
    return await runInGuest(opts);
  } catch (err) {
    if (!silentGuestReset(err)) throw err;
    console.warn(`runNestedKvmGuest: the outer guest reset without a word (TCG's emulated SVM); running it once more. First run:\n${String((err as Error).message).slice(-2000)}`);
    return runInGuest(opts);
  }
}
