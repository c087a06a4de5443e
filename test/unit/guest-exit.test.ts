/**
 * guestExitStatus (lib/qemu/guest.ts): the guest command's exit status from
 * resultsDir/exitcode, or, when that file is missing, empty or garbled, from
 * the `mqtap-guest: exit=N` line vm/init.sh prints on the console right
 * after writing it.  test/vm/guest.test.ts does the same with a real guest
 * whose exitcode cannot be written.  silentGuestReset (test/vm/harness.ts):
 * which failed outer guests runNestedKvmGuest runs once more.
 */
import { describe, expect, it } from 'vitest';
import { guestExitStatus } from '../../lib/qemu/guest';
import type { RunInGuestResult } from '../../lib/qemu/guest';
import { initSpoke, silentGuestReset } from '../vm/harness';

const CONSOLE = '[    1.234] virtio_net virtio0 eth0: renamed\nmqtap-guest: exit=0\n[    2.000] reboot: Power down\n';

describe('guestExitStatus', () => {
  it('takes the exitcode file when it holds a number', () => {
    expect(guestExitStatus('7\n', CONSOLE)).toEqual({ code: 7, from: 'file', file: '"7"' });
    expect(guestExitStatus('0\n', '')).toEqual({ code: 0, from: 'file', file: '"0"' });
  });

  it("falls back to init's console line when the file is missing, empty or not a number", () => {
    expect(guestExitStatus(undefined, CONSOLE)).toEqual({ code: 0, from: 'console', file: 'missing' });
    expect(guestExitStatus('', 'mqtap-guest: exit=3\n')).toEqual({ code: 3, from: 'console', file: 'empty' });
    expect(guestExitStatus('\0\0', 'mqtap-guest: exit=125\n')).toMatchObject({ code: 125, from: 'console' });
  });

  it('takes the last console line, and only whole lines', () => {
    expect(guestExitStatus(undefined, 'mqtap-guest: exit=1\nmqtap-guest: exit=2\n').code).toBe(2);
    expect(guestExitStatus(undefined, 'echo says mqtap-guest: exit=0\nmqtap-guest: exit=0 and more\n')).toEqual({ code: null, from: null, file: 'missing' });
  });

  it('is null with what the file held when neither says anything', () => {
    expect(guestExitStatus(undefined, '')).toEqual({ code: null, from: null, file: 'missing' });
    expect(guestExitStatus('oops\n', 'Kernel panic\n')).toEqual({ code: null, from: null, file: '"oops"' });
  });
});

describe('silentGuestReset (runNestedKvmGuest retries only this)', () => {
  const result = (over: Partial<RunInGuestResult> = {}): RunInGuestResult => ({ exitCode: null, exitCodeFrom: null, stdout: '', stderr: '', console: '[   25.6] kvm [291]: vcpu0, guest rIP: 0xffffffff8107e744 Unhandled WRMSR(0xc0010007) = 0xffff\n', durationMs: 43_000, timedOut: false, qemuStderr: '', ...over });
  const err = (msg: string, r: RunInGuestResult | undefined): Error => Object.assign(new Error(msg), r ? { result: r } : {});
  const NO_EXIT = 'runInGuest(["node"]): the guest reported no exit code (exitcode file: missing; no "mqtap-guest: exit=N" on the console; QEMU exit status 0)';

  it('QEMU exited 0 with no exit code and no panic/oops on the console: a reset, retried', () => {
    expect(silentGuestReset(err(NO_EXIT, result()))).toBe(true);
  });
  it('not retried: a panic or oops on the console, a timeout, a QEMU error status or signal, init failing, an exit code, no result', () => {
    expect(silentGuestReset(err(NO_EXIT, result({ console: 'Kernel panic - not syncing: Fatal exception\n' })))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT, result({ console: 'BUG: kernel NULL pointer dereference\n' })))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT, result({ console: 'MQTAP-INIT-ERROR: cannot mount the results share\n' })))).toBe(false);
    // QEMU's status is read from the message's first line only: the same words in the console tail after it do not count.
    expect(silentGuestReset(err(`${NO_EXIT.replace('exit status 0', 'exit status 1')}\nconsole (tail):\nQEMU exit status 0)`, result()))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT.replace('exit status 0', 'exit status 1'), result()))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT.replace('exit status 0', 'signal SIGKILL'), result()))).toBe(false);
    expect(silentGuestReset(err('runInGuest(["node"]): guest init failed: no /mnt/results', result()))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT, result({ exitCode: 1 })))).toBe(false);
    expect(silentGuestReset(err(NO_EXIT, undefined))).toBe(false);
  });
});

describe('initSpoke (runNestedKvmGuest kills an outer guest whose init said nothing by the deadline)', () => {
  it("a line of vm/init.sh's, debug step, exit or error, counts; kernel lines and a line cut between chunks' ends do not", () => {
    expect(initSpoke('[    0.9] kvm: ...\nmqtap-init: [1.52] kernel 6.1.0, loading modules\n')).toBe(true);
    expect(initSpoke('mqtap-guest: exit=0\n')).toBe(true);
    expect(initSpoke('MQTAP-INIT-ERROR: modprobe failed\n')).toBe(true);
    expect(initSpoke('[   25.6] kvm [291]: vcpu0, guest rIP: 0xffffffff8107e744 Unhandled WRMSR(0xc0010007) = 0xffff\n')).toBe(false);
    expect(initSpoke('')).toBe(false);
    expect(initSpoke('mqtap-in')).toBe(false);
  });
});
