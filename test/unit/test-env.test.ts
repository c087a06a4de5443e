/**
 * The tests' own skip-or-fail rule (test/helpers/env.ts): a missing
 * capability skips with its reason printed, unless this run requires it
 * (MQTAP_REQUIRE, as .ci/run sets; MQTAP_VM_REQUIRED=1 implies 'qemu'),
 * where it fails.  No kernel, no root.
 */
import { mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import ts from 'typescript';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { CHILD_HELPERS, ROOT, childHelpersReason } from '../helpers/cli.js';
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

describe('helpers that child processes load compiled (CHILD_HELPERS)', () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  /** A fake checkout: test/helpers/h.ts and, unless `js` is null, dist/test/helpers/h.js with that mtime. */
  function checkout(js: Date | null): string {
    const root = mkdtempSync(join(tmpdir(), 'mqtap-helpers-'));
    dirs.push(root);
    mkdirSync(join(root, 'test', 'helpers'), { recursive: true });
    const src = join(root, 'test', 'helpers', 'h.ts');
    writeFileSync(src, 'export {};\n');
    utimesSync(src, new Date(2_000_000_000_000), new Date(2_000_000_000_000));
    if (js) {
      mkdirSync(join(root, 'dist', 'test', 'helpers'), { recursive: true });
      const out = join(root, 'dist', 'test', 'helpers', 'h.js');
      writeFileSync(out, '');
      utimesSync(out, js, js);
    }
    return root;
  }

  it('are compiled by tsconfig.json for their own sake, not only through what bench/ imports', () => {
    const file = join(ROOT, 'tsconfig.json');
    const cfg = ts.readConfigFile(file, (f) => ts.sys.readFile(f));
    // fileNames holds what "include" matches, not what those files import.
    const parsed = ts.parseJsonConfigFileContent(cfg.config, ts.sys, ROOT, undefined, file);
    for (const name of CHILD_HELPERS) expect(parsed.fileNames).toContain(join(ROOT, 'test', 'helpers', `${name}.ts`));
  });

  it('missing or older than the source: a reason naming the file; built after it: none', () => {
    expect(childHelpersReason(['h'], checkout(null))).toBe('dist/test/helpers/h.js is not built (npm run build)');
    expect(childHelpersReason(['h'], checkout(new Date(1_000_000_000_000)))).toBe('dist/test/helpers/h.js is older than test/helpers/h.ts (npm run build)');
    expect(childHelpersReason(['h'], checkout(new Date(3_000_000_000_000)))).toBe('');
  });

  it('this checkout has them built (npm run build ran), so the fault tests run', () => {
    expect(childHelpersReason()).toBe('');
  });

  it('under MQTAP_REQUIRE=all a missing one fails the file instead of skipping it', () => {
    const saved = process.env.MQTAP_REQUIRE;
    process.env.MQTAP_REQUIRE = 'all';
    try {
      expect(() => need('build', childHelpersReason(['h'], checkout(null)))).toThrow(/build is required here .* dist\/test\/helpers\/h\.js is not built/);
    } finally {
      if (saved === undefined) delete process.env.MQTAP_REQUIRE;
      else process.env.MQTAP_REQUIRE = saved;
    }
  });
});
