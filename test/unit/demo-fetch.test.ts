/**
 * `mqtap demo --fetch`'s step runner (bin/demo.ts aptFetch/runFetchStep)
 * with fake apt-get scripts, without running apt: one line per step on the
 * terminal, the command's whole output in the log file (kept), and on
 * failure the log's tail with a hint, the exit status of each step.
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { aptFetch, runFetchStep } from '../../bin/demo';

const dir = mkdtempSync(join(tmpdir(), 'mqtap-fetch-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A fake apt-get: prints `lines` lines per call (stdout and stderr) and exits with what `exitFor` says for its first argument. */
function fakeApt(name: string, body: string): string[] {
  const file = join(dir, name);
  writeFileSync(
    file,
    `#!/bin/sh
i=1; while [ $i -le 300 ]; do echo "apt $1 line $i"; i=$((i+1)); done
echo "apt $1 says on stderr" >&2
${body}
`,
  );
  chmodSync(file, 0o755);
  return [file];
}

function terminal(): { write: (t: string) => void; text: () => string } {
  let text = '';
  return { write: (t) => void (text += t), text: () => text };
}

let n = 0;
const logFile = (): string => join(dir, `apt-${++n}.log`);

describe('demo --fetch', () => {
  it('a step that succeeds: one line "fetch: installing ... ok (N s)", none of its output on the terminal, all of it in the log', async () => {
    const t = terminal();
    const log = logFile();
    const r = await aptFetch(['qemu-system-x86', 'busybox-static'], { logFile: log, write: t.write, dotEverySec: 0 }, fakeApt('ok.sh', 'exit 0'));
    expect(r.ok).toBe(true);
    expect(r.steps.map((s) => [s.label, s.status])).toEqual([['installing qemu-system-x86 busybox-static', 0]]);
    expect(t.text()).toMatch(new RegExp(`^fetch: apt-get output goes to ${log}\\nfetch: installing qemu-system-x86 busybox-static … ok \\(\\d+\\.\\d s\\)\\n$`));
    const kept = readFileSync(log, 'utf8');
    expect(kept).toMatch(/^\n\$ \S+ok\.sh install -y --no-install-recommends qemu-system-x86 busybox-static\n/);
    expect(kept).toContain('apt install line 1\n');
    expect(kept).toContain('apt install line 300\n');
    expect(kept).toContain('apt install says on stderr\n');
  });

  it('install fails, update works, install again works: three lines, no tail', async () => {
    const t = terminal();
    const marker = join(dir, 'updated');
    const r = await aptFetch(['ethtool'], { logFile: logFile(), write: t.write, dotEverySec: 0 }, fakeApt('flaky.sh', `[ "$1" = update ] && : > ${marker}; [ -e ${marker} ] || exit 100; exit 0`));
    expect(r.ok).toBe(true);
    expect(r.steps.map((s) => [s.label, s.status])).toEqual([
      ['installing ethtool', 100],
      ['apt-get update', 0],
      ['installing ethtool again', 0],
    ]);
    const lines = t.text().trimEnd().split('\n');
    expect(lines.slice(1).map((l) => l.replace(/\(.*\)$/, '(…)'))).toEqual([
      'fetch: installing ethtool … failed (…)',
      'fetch: apt-get update … ok (…)',
      'fetch: installing ethtool again … ok (…)',
    ]);
    expect(lines[1]).toMatch(/failed \(exit 100, \d+\.\d s\)$/);
    expect(t.text()).not.toContain('apt install line');
  });

  it('everything fails: the exit status of each step, the last 20 lines of the log and a hint; the log is kept whole', async () => {
    const t = terminal();
    const log = logFile();
    const r = await aptFetch(['qemu-system-x86'], { logFile: log, write: t.write, dotEverySec: 0 }, fakeApt('fail.sh', 'exit 100'));
    expect(r.ok).toBe(false);
    expect(r.steps.map((s) => [s.label, s.status, s.ok])).toEqual([
      ['installing qemu-system-x86', 100, false],
      ['apt-get update', 100, false],
    ]);
    const text = t.text();
    expect(text).toContain(`fetch: FAILED; the last 20 lines of ${log}:\n`);
    // the tail: the update's last 19 output lines and its stderr line, nothing earlier
    expect(text).toContain('  | apt update line 282\n');
    expect(text).toContain('  | apt update line 300\n  | apt update says on stderr\n');
    expect(text).not.toContain('apt update line 281\n');
    expect(text).not.toContain('apt install line');
    expect(text).toMatch(/hint: .*apt-get update && apt-get install -y --no-install-recommends qemu-system-x86/);
    expect(existsSync(log)).toBe(true);
    const kept = readFileSync(log, 'utf8');
    expect(kept).toContain('apt install line 1\n');
    expect(kept).toContain('apt update line 300\n');
  });

  it('a command that cannot start, one killed by a signal, one that times out: failed, with the reason on its line', async () => {
    const t = terminal();
    const log = logFile();
    const missing = await runFetchStep({ label: 'missing', argv: [join(dir, 'no-such-apt-get')] }, { logFile: log, write: t.write, dotEverySec: 0 });
    expect(missing).toMatchObject({ ok: false, status: null, error: expect.stringContaining('ENOENT') });
    const killed = await runFetchStep({ label: 'killed', argv: ['sh', '-c', 'kill -TERM $$'] }, { logFile: log, write: t.write, dotEverySec: 0 });
    expect(killed).toMatchObject({ ok: false, status: null, signal: 'SIGTERM' });
    const slow = await runFetchStep({ label: 'slow', argv: ['sleep', '30'], timeoutMs: 200 }, { logFile: log, write: t.write, dotEverySec: 0 });
    expect(slow).toMatchObject({ ok: false, timedOut: true, signal: 'SIGKILL' });
    const lines = t.text().trimEnd().split('\n');
    expect(lines[0]).toMatch(/^fetch: missing … failed \(cannot run \S+no-such-apt-get: .*ENOENT.*, \d+\.\d s\)$/);
    expect(lines[1]).toMatch(/^fetch: killed … failed \(killed by SIGTERM, \d+\.\d s\)$/);
    expect(lines[2]).toMatch(/^fetch: slow … failed \(timed out, \d+\.\d s\)$/);
  });

  it('prints a progress dot every dotEverySec while a step runs', async () => {
    const t = terminal();
    await runFetchStep({ label: 'wait', argv: ['sleep', '1.2'] }, { logFile: logFile(), write: t.write, dotEverySec: 0.25 });
    expect(t.text()).toMatch(/^fetch: wait … \.{3,5}ok \(1\.\d s\)\n$/);
  });
});
