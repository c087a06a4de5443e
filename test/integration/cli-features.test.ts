/**
 * `mqtap features` as a person reads it: a table of `key: value` rows, one
 * per line, then (after a blank line) notes.  The vhost-net note once went to
 * stderr right after the last row, so a capture of both streams could show
 * `vhost backend features: -vhost-net: ...` on one line; now the notes are
 * part of the report on stdout and stderr carries only an error.
 *
 * Run with stdout and stderr on one pipe (as a terminal or `2>&1` shows
 * them) and separately, with this host's /dev and with a /dev of our own
 * without /dev/vhost-net (so the note is there on any host).
 */
import { describe, expect, it } from 'vitest';
import { CLI, cliBuiltReason, runCli, type CliRun } from '../helpers/cli';
import { ownDev, wrapperProblem } from '../helpers/devnode';
import { haveCommand, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env';

const REQUIRED = process.env.MQTAP_VM_REQUIRED === '1';
const env = tapEnv();
const base = !env.ok ? env : cliBuiltReason() ? { ok: false, reason: cliBuiltReason() } : { ok: true, reason: '' };

const ROWS = [
  'kernel',
  '/dev/net/tun',
  'tap (IFF_TAP)',
  'multi-queue (IFF_MULTI_QUEUE)',
  'virtio-net header (IFF_VNET_HDR)',
  'no packet info (IFF_NO_PI)',
  'NAPI (IFF_NAPI)',
  'no carrier (IFF_NO_CARRIER)',
  'max queues per tap',
  'vnet header sizes',
  'offloads',
  'multi-queue taps usable',
  '/dev/vhost-net',
  'vhost-net features',
  'vhost backend features',
];

interface Parsed {
  rows: Array<[string, string]>;
  notes: string[];
}

/** The table (rows up to the first blank line, each `key: value` with a known key) and the lines after it. */
function parse(text: string): Parsed {
  expect(text.endsWith('\n'), 'output ends with a newline').toBe(true);
  const lines = text.slice(0, -1).split('\n');
  const blank = lines.indexOf('');
  const table = blank < 0 ? lines : lines.slice(0, blank);
  const rows = table.map((l): [string, string] => {
    const m = /^(.+?):\s+(\S.*)$/.exec(l);
    expect(m, `a table row: ${JSON.stringify(l)}`).not.toBeNull();
    return [m![1]!, m![2]!];
  });
  return { rows, notes: blank < 0 ? [] : lines.slice(blank + 1) };
}

/** `mqtap features` behind `prefix`; `merged`: its stderr goes to the same pipe as its stdout. */
function features(prefix: string[], merged: boolean): CliRun {
  return runCli(['features'], { timeoutMs: 30_000, wrapper: merged ? [...prefix, 'sh', '-c', 'exec "$@" 2>&1', 'sh'] : prefix });
}

describe.skipIf(!base.ok && !REQUIRED)(`mqtap features: one row per line, notes apart${skipNote(base)}`, () => {
  if (!base.ok) {
    it('can run here', () => {
      throw new Error(`MQTAP_VM_REQUIRED=1 but: ${base.reason}`);
    });
    return;
  }
  useIsolatedNetns();

  it("this host's /dev: every row on its own line, with the keys in order; stderr empty", () => {
    for (const merged of [false, true]) {
      const r = features([], merged);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const p = parse(r.stdout);
      expect(p.rows.map(([k]) => k)).toEqual(ROWS);
      expect(Object.fromEntries(p.rows)['multi-queue taps usable']).toBe('yes');
      const vhost = Object.fromEntries(p.rows)['/dev/vhost-net']!;
      if (vhost === 'ok') expect(p.notes).toEqual([]);
      else expect(p.notes).toEqual([expect.stringMatching(/^note: vhost-net is optional .*: \S/)]);
    }
  });

  const noVhost = ownDev('666');
  const why = !haveCommand('unshare') ? 'unshare (util-linux) is missing' : process.getuid?.() !== 0 ? 'not running as root' : wrapperProblem(noVhost, CLI);
  it.skipIf(!!why && !REQUIRED)(`a host without /dev/vhost-net: the last row is "-", the note on a line of its own after a blank line${why ? ` (skipped: ${why})` : ''}`, () => {
    if (why) throw new Error(`MQTAP_VM_REQUIRED=1 but: ${why}`);
    for (const merged of [false, true]) {
      const r = features(noVhost, merged);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const p = parse(r.stdout);
      expect(p.rows.map(([k]) => k)).toEqual(ROWS);
      const rows = Object.fromEntries(p.rows);
      expect(rows['/dev/vhost-net']).toBe('unavailable (ENOENT)');
      expect(rows['vhost-net features']).toBe('-');
      expect(rows['vhost backend features']).toBe('-');
      expect(p.notes).toEqual([expect.stringMatching(/^note: vhost-net is optional .*modprobe vhost_net/)]);
    }
  });
});
