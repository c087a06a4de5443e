/**
 * What a user sees when a command fails: for every command, the error cases
 * this host can reach (bad arguments, unknown names, conflicts, missing
 * permission, missing devices, missing programs), run as `node dist/bin/mqtap.js`
 * inside a network namespace this file makes.
 *
 * Each case checks the exit code docs/cli.md gives, that stderr holds exactly
 * one `mqtap: ` line and one `hint: ` line (the library logs an error it also
 * throws at debug level only, so it is not printed twice), no stack, no pino
 * `"err"` JSON and no `at file:line:col`; and that with --debug the stack is
 * shown.
 *
 * Missing devices are made, not hoped for: a mount namespace with a /dev of
 * our own (tmpfs) gives "a host without /dev/vhost-net" (or without
 * /dev/net/tun, or with a root-only one) on any host; setpriv drops
 * CAP_NET_ADMIN or becomes uid 65534.
 */
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listTaps } from '../../lib/tap/links';
import { CLI, cliBuiltReason, runCliAsync, type CliRun } from '../helpers/cli';
import { ownDev, wrapperProblem } from '../helpers/devnode';
import { fakeQemu } from '../helpers/fake-qmp';
import { haveCommand, ipLink, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env';

const REQUIRED = process.env.MQTAP_VM_REQUIRED === '1';

const env = tapEnv();
const base = !env.ok ? env : cliBuiltReason() ? { ok: false, reason: cliBuiltReason() } : { ok: true, reason: '' };

const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
const NO_NET_ADMIN = ['setpriv', '--bounding-set=-net_admin', '--inh-caps=-all'];

type Wrapper = 'no-vhost-net' | 'no-tun' | 'tun-root-only' | 'no-net-admin' | 'nobody';
const WRAPPERS: Record<Wrapper, string[]> = {
  'no-vhost-net': ownDev('666'),
  'no-tun': ownDev(null),
  'tun-root-only': [...ownDev('600'), ...NOBODY],
  'no-net-admin': NO_NET_ADMIN,
  nobody: NOBODY,
};

/** Why a wrapper cannot run here ('' when it can): tried once, with node reading the CLI. */
const wrapperReason = new Map<Wrapper, string>();
function whyNot(w: Wrapper): string {
  if (!base.ok) return base.reason;
  if (!wrapperReason.has(w)) {
    const tools = w === 'no-net-admin' || w === 'nobody' ? ['setpriv'] : w === 'tun-root-only' ? ['unshare', 'setpriv'] : ['unshare'];
    const missing = tools.filter((t) => !haveCommand(t));
    let reason = missing.length ? `${missing.join(', ')} (util-linux) is missing` : '';
    if (!reason && process.getuid?.() !== 0) reason = 'not running as root';
    if (!reason) reason = wrapperProblem(WRAPPERS[w], CLI);
    wrapperReason.set(w, reason);
    if (reason && !REQUIRED) console.warn(`cli-errors: cases needing ${w} skipped: ${reason}`);
  }
  return wrapperReason.get(w)!;
}

interface Case {
  /** Arguments after `mqtap` (--debug goes first when added). */
  args: string[] | ((tmp: string) => string[]);
  exit: number;
  /** What the message must say. */
  says: RegExp;
  /** What the hint must say, where it matters. */
  hintSays?: RegExp;
  wrap?: Wrapper;
  /** Commander found it while parsing (no code of ours ran, so there is no stack of ours to show). */
  parser?: boolean;
  /** A probe result reported without an exception (features): no stack exists. */
  noStack?: boolean;
  env?: NodeJS.ProcessEnv;
}

// Exit codes: docs/cli.md "Exit codes".
const CASES: Record<string, Case> = {
  // features
  'features: no /dev/net/tun': { args: ['features'], exit: 5, says: /not usable here.*\/dev\/net\/tun.*ENOENT/, wrap: 'no-tun', noStack: true },
  'features: /dev/net/tun only root may open (uid 65534)': { args: ['features'], exit: 4, says: /not usable here.*EACCES/, wrap: 'tun-root-only', noStack: true },
  'features: unknown option': { args: ['features', '--bogus'], exit: 2, says: /unknown option '--bogus'/, parser: true },
  // create
  'create: bad name': { args: ['create', 'bad/name'], exit: 2, says: /must not contain "\/"/ },
  'create: --queues 0': { args: ['create', 'ok0', '--queues', '0'], exit: 2, says: /queues must be between 1 and 256/ },
  'create: --queues not a number': { args: ['create', 'ok0', '--queues', 'four'], exit: 2, says: /--queues must be a whole number/, parser: true },
  'create: no name': { args: ['create'], exit: 2, says: /missing required argument 'name'/, parser: true },
  'create: an existing multi-queue tap': { args: ['create', 'mq0'], exit: 6, says: /mq0 already exists/ },
  'create: an existing single-queue tap': {
    args: ['create', 'sq0'],
    exit: 6,
    says: /sq0 exists but is not a multi-queue tap/,
    hintSays: /"sq0" is a single-queue tap \(made without multi_queue\): delete it .* re-create it with `mqtap create sq0 --queues N`/,
  },
  'create: a device that is not a tap': { args: ['create', 'lo'], exit: 6, says: /lo exists but is not a multi-queue tap/, hintSays: /"lo" is taken by a device that is not a tap/ },
  'create: without CAP_NET_ADMIN': { args: ['create', 'ok0'], exit: 4, says: /TUNSETIFF failed: EPERM/, wrap: 'no-net-admin' },
  // delete, show
  'delete: unknown tap': { args: ['delete', 'nope0'], exit: 3, says: /no device named nope0/ },
  'delete: not a tun/tap': { args: ['delete', 'lo'], exit: 6, says: /lo is not a tun\/tap device/ },
  'show: unknown tap': { args: ['show', 'nope0'], exit: 3, says: /no tap named nope0/ },
  'show: --netns names no namespace': { args: ['--netns', 'mqtap-no-such-ns', 'show'], exit: 3, says: /NS_OPEN .* ENOENT/ },
  // exec
  'exec: single-queue tap': { args: ['exec', 'sq0', '--queues', '2', '--', 'true'], exit: 6, says: /sq0 exists but is not a multi-queue tap/, hintSays: /"sq0" is a single-queue tap \(made without multi_queue\)/ },
  'exec: --existing require, unknown tap': { args: ['exec', 'nope0', '--existing', 'require', '--', 'true'], exit: 3, says: /no tap named nope0/ },
  'exec: --active > --queues': { args: ['exec', 'ok0', '--queues', '2', '--active', '3', '--', 'true'], exit: 2, says: /active pairs must be between 1 and 2/ },
  'exec: command not found': { args: ['exec', 'xq%d', '--', '/nonexistent/mqtap-cmd'], exit: 127, says: /cannot run \/nonexistent\/mqtap-cmd: command not found/ },
  'exec: command not executable': { args: (tmp) => ['exec', 'xq%d', '--', join(tmp, 'not-executable')], exit: 126, says: /cannot run .*not-executable/ },
  'exec: --vhost on, no /dev/vhost-net': { args: ['exec', 'xq%d', '--vhost', 'on', '--', 'true'], exit: 5, says: /vhost-net is required .* ENOENT/, wrap: 'no-vhost-net' },
  // vhost-selftest
  'vhost-selftest: --pairs 0': { args: ['vhost-selftest', '--pairs', '0'], exit: 2, says: /pairs must be between 1 and 256/ },
  'vhost-selftest: no /dev/vhost-net': { args: ['vhost-selftest'], exit: 5, says: /vhost-net is not available.*ENOENT/, wrap: 'no-vhost-net', noStack: true },
  // launch
  'launch: no QEMU binary': {
    args: ['launch', '--queues', '2', '--', 'qemu-system-x86_64', '-m', '64'],
    exit: 127,
    says: /cannot run qemu-system-x86_64: command not found/,
    env: { ...process.env, PATH: '/nonexistent-mqtap-path' },
  },
  'launch: --active < --queues': { args: ['launch', '--queues', '2', '--active', '1', '--', 'qemu-system-x86_64'], exit: 2, says: /QEMU must be handed every queue enabled/ },
  'launch: --vhost on, no /dev/vhost-net': { args: ['launch', '--vhost', 'on', '--queues', '2', '--', 'true'], exit: 5, says: /vhost-net is required .* ENOENT/, wrap: 'no-vhost-net' },
  // stats
  'stats: unknown tap': { args: ['stats', 'nope0'], exit: 3, says: /no tap named nope0/ },
  'stats: --interval out of range': { args: ['stats', 'mq0', '--interval', '5'], exit: 2, says: /--interval must be 100\.\.3600000/ },
  // daemon, hotplug, unplug, client
  'daemon: relative socket path': { args: ['daemon', '--socket', 'rel.sock'], exit: 2, says: /socket path must be absolute/ },
  'daemon: a state dir it may not create (uid 65534)': { args: (tmp) => ['daemon', '--socket', join(tmp, 'd.sock'), '--state-dir', join(tmp, 'state')], exit: 4, says: /STATE_DIR: mkdir .* permission denied/, wrap: 'nobody' },
  'hotplug: no QMP socket': { args: (tmp) => ['hotplug', '--qmp', join(tmp, 'qmp.sock'), '--queues', '2', '--id', 'n1', '--vhost', 'off'], exit: 1, says: /CONNECT .*qmp\.sock failed: ENOENT/ },
  'hotplug: --qmp missing': { args: ['hotplug', '--queues', '2', '--id', 'n1'], exit: 2, says: /required option '--qmp <path>' not specified/, parser: true },
  'unplug: no QMP socket': { args: (tmp) => ['unplug', '--qmp', join(tmp, 'qmp.sock'), '--id', 'n1'], exit: 1, says: /CONNECT .*qmp\.sock failed: ENOENT/ },
  'client: daemon socket missing': { args: (tmp) => ['client', '--socket', join(tmp, 'daemon.sock'), 'list'], exit: 1, says: /CONNECT .*daemon\.sock failed: ENOENT/ },
  'global --socket: daemon socket missing': { args: (tmp) => ['--socket', join(tmp, 'daemon.sock'), 'show', 'vm1'], exit: 1, says: /CONNECT .*daemon\.sock failed: ENOENT/ },
  'unknown command': { args: ['shwo'], exit: 2, says: /unknown command 'shwo'/, parser: true },
};

/** The taps the fixtures make; every case must leave exactly these. */
const FIXTURES = ['mq0', 'sq0'];

describe.skipIf(!base.ok && !REQUIRED)(`CLI errors: one message, one hint, no stack unless --debug${skipNote(base)}`, () => {
  if (!base.ok) {
    it('can run here', () => {
      throw new Error(`MQTAP_VM_REQUIRED=1 but: ${base.reason}`);
    });
    return;
  }
  useIsolatedNetns();
  let tmp: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'mqtap-cli-errors-'));
    writeFileSync(join(tmp, 'not-executable'), '#!/bin/sh\nexit 0\n');
    chmodSync(join(tmp, 'not-executable'), 0o644);
    for (const args of [
      ['tuntap', 'add', 'dev', 'mq0', 'mode', 'tap', 'multi_queue', 'vnet_hdr'],
      ['tuntap', 'add', 'dev', 'sq0', 'mode', 'tap'],
    ]) {
      run('ip', args);
    }
  });
  afterAll(() => {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  /** Without blocking the worker (vitest's RPC times out behind a long spawnSync). */
  function mqtap(c: Case, debug: boolean): Promise<CliRun> {
    const args = typeof c.args === 'function' ? c.args(tmp) : c.args;
    return runCliAsync([...(debug ? ['--debug'] : []), ...args], { timeoutMs: 30_000, ...(c.wrap ? { wrapper: WRAPPERS[c.wrap] } : {}), ...(c.env ? { env: c.env } : {}) });
  }

  for (const [title, c] of Object.entries(CASES)) {
    const reason = c.wrap ? whyNot(c.wrap) : '';
    it.skipIf(!!reason && !REQUIRED)(`${title}: exit ${c.exit}${reason ? ` (skipped: ${reason})` : ''}`, async () => {
      if (reason) throw new Error(`MQTAP_VM_REQUIRED=1 but: ${reason}`);
      const r = await mqtap(c, false);
      const lines = r.stderr.split('\n');
      expect(r.code, r.stderr).toBe(c.exit);
      expect(lines.filter((l) => l.startsWith('mqtap: ')), r.stderr).toHaveLength(1);
      expect(lines.filter((l) => l.startsWith('hint: ')), r.stderr).toHaveLength(1);
      expect(lines.find((l) => l.startsWith('mqtap: '))).toMatch(c.says);
      expect(lines.find((l) => l.startsWith('hint: '))!.length, 'a hint that says something').toBeGreaterThan('hint: '.length + 10);
      if (c.hintSays) expect(lines.find((l) => l.startsWith('hint: '))).toMatch(c.hintSays);
      expect(r.stderr).not.toMatch(/stack/i);
      expect(r.stderr).not.toMatch(/"err"/);
      expect(r.stderr).not.toMatch(/\bat .+:\d+:\d+/);
      expect(listTaps().map((t) => t.name).sort(), 'nothing left behind').toEqual(FIXTURES);
      expect(ipLink('sq0')?.linkinfo?.info_data).toMatchObject({ multi_queue: false, persist: true });

      if (c.parser || c.noStack) return;
      const d = await mqtap(c, true);
      expect(d.code, d.stderr).toBe(c.exit);
      expect(d.stderr).toMatch(c.says);
      expect(d.stderr, 'with --debug the stack is shown').toMatch(/^\w*Error: .*\n(\s+at .+:\d+:\d+\)?\n)+/m);
      expect(listTaps().map((t) => t.name).sort()).toEqual(FIXTURES);
    });
  }

  it('hotplug: QEMU refuses netdev_add (a fake QMP server): exit 1, the undone hotplug reported once', async () => {
    // A fake QEMU (test/helpers/fake-qmp) that greets, accepts capabilities and getfd, refuses netdev_add
    // and takes the closefd of the undo: hotplugFds logs the failure (debug)
    // and throws it; only the CLI reports it.
    const fake = await fakeQemu((cmd) => (cmd.execute === 'netdev_add' ? { error: { class: 'GenericError', desc: 'Duplicate ID' } } : { return: {} }), {
      greeting: { QMP: { version: { qemu: { major: 8, minor: 0, micro: 0 }, package: 'fake' }, capabilities: [] } },
    });
    try {
      for (const debug of [false, true]) {
        fake.log.length = 0;
        const r = await mqtap({ args: ['hotplug', '--qmp', fake.path, '--queues', '2', '--id', 'n1', '--vhost', 'off'], exit: 1, says: /./ }, debug);
        expect(r.code, r.stderr).toBe(1);
        expect(fake.commands()).toEqual(['qmp_capabilities', 'getfd', 'getfd', 'netdev_add', 'closefd', 'closefd']);
        const lines = r.stderr.split('\n');
        const reports = lines.filter((l) => l.startsWith('mqtap: ') && !l.startsWith('mqtap: debug: ') && !l.startsWith('mqtap: info: '));
        expect(reports, r.stderr).toEqual([expect.stringMatching(/^mqtap: hotplug n1: netdev_add failed: QMP netdev_add failed: Duplicate ID .*undone$/)]);
        expect(lines.filter((l) => l.startsWith('hint: '))).toHaveLength(1);
        if (!debug) expect(r.stderr).not.toMatch(/stack|"err"|\bat .+:\d+:\d+/);
        else expect(r.stderr).toMatch(/^\w*Error: .*\n(\s+at .+:\d+:\d+\)?\n)+/m);
        expect(listTaps().map((t) => t.name).sort()).toEqual(FIXTURES);
      }
    } finally {
      fake.close();
    }
  });

  it('--json: the error as JSON on stdout (with its hint), the same two lines on stderr', async () => {
    const r = await mqtap({ args: ['show', 'nope0', '--json'], exit: 3, says: /./ }, false);
    expect(r.code).toBe(3);
    expect(JSON.parse(r.stdout).error).toMatchObject({ code: 'ENODEV', op: 'LOOKUP', hint: expect.stringMatching(/mqtap show/) });
    expect(r.stderr).toMatch(/^mqtap: no tap named nope0\nhint: .*\n$/);
  });
});
