/**
 * The tests' own skip-or-fail rule (test/helpers/env.ts): a missing
 * capability skips with its reason printed, unless this run requires it
 * (MQTAP_REQUIRE, as .ci/run sets; MQTAP_VM_REQUIRED=1 implies 'qemu'),
 * where it fails.  No kernel, no root.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { isRequired, need, needCommand } from '../helpers/env.js';

describe('isRequired', () => {
  it('nothing is required outside CI', () => {
    expect(isRequired('tcx', {})).toBe(false);
    expect(isRequired('qemu', {})).toBe(false);
  });
  it("MQTAP_REQUIRE=all requires everything; a list only what it names", () => {
    expect(isRequired('tcx', { MQTAP_REQUIRE: 'all' })).toBe(true);
    expect(isRequired('tcx', { MQTAP_REQUIRE: 'bpf, tcx' })).toBe(true);
    expect(isRequired('io_uring', { MQTAP_REQUIRE: 'bpf,tcx' })).toBe(false);
    expect(isRequired('tc', { MQTAP_REQUIRE: 'tcx' })).toBe(false);
  });
  it("MQTAP_VM_REQUIRED=1 requires 'qemu' and nothing else", () => {
    expect(isRequired('qemu', { MQTAP_VM_REQUIRED: '1' })).toBe(true);
    expect(isRequired('tcx', { MQTAP_VM_REQUIRED: '1' })).toBe(false);
  });
});

describe('need', () => {
  const saved = { req: process.env.MQTAP_REQUIRE, vm: process.env.MQTAP_VM_REQUIRED };
  afterEach(() => {
    for (const [k, v] of [['MQTAP_REQUIRE', saved.req], ['MQTAP_VM_REQUIRED', saved.vm]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    vi.restoreAllMocks();
  });

  it('present: ok, nothing printed', () => {
    process.env.MQTAP_REQUIRE = 'all';
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    expect(need('tcx', '')).toEqual({ ok: true, reason: '' });
    expect(warn).not.toHaveBeenCalled();
  });

  it('missing and not required: skip, with the reason printed', () => {
    delete process.env.MQTAP_REQUIRE;
    delete process.env.MQTAP_VM_REQUIRED;
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    expect(need('tcx', 'no tcx here')).toEqual({ ok: false, reason: 'no tcx here' });
    expect(warn).toHaveBeenCalledWith(expect.stringContaining('no tcx here'));
  });

  it('missing and required: throws, naming the capability and why', () => {
    process.env.MQTAP_REQUIRE = 'tcx';
    delete process.env.MQTAP_VM_REQUIRED;
    expect(() => need('tcx', 'no tcx here')).toThrow(/tcx is required here \(MQTAP_REQUIRE=tcx\) but missing: no tcx here/);
  });

  it('needCommand: a command that is not on PATH, with its package in the reason', () => {
    process.env.MQTAP_REQUIRE = 'all';
    expect(needCommand('sh').ok).toBe(true);
    expect(() => needCommand('mqtap-no-such-command')).toThrow(/mqtap-no-such-command is not installed/);
    delete process.env.MQTAP_REQUIRE;
    vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    expect(needCommand('mqtap-no-such-command')).toMatchObject({ ok: false });
  });
});
