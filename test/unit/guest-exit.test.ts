/**
 * guestExitStatus (lib/qemu/guest.ts): the guest command's exit status from
 * resultsDir/exitcode, or, when that file is missing, empty or garbled, from
 * the `mqtap-guest: exit=N` line vm/init.sh prints on the console right
 * after writing it.  test/vm/guest.test.ts does the same with a real guest
 * whose exitcode cannot be written.
 */
import { describe, expect, it } from 'vitest';
import { guestExitStatus } from '../../lib/qemu/guest';

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
