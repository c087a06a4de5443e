/**
 * Permissions, with the kernel deciding: a small Node script (using the built
 * library in dist/) runs as a child process with fewer privileges — root
 * without CAP_NET_ADMIN (setpriv --bounding-set=-net_admin), or another uid
 * (the script loads the library as root, then drops to that uid and gid with
 * no groups, which clears every capability; so the checkout need not be
 * readable by that uid) — and prints openTap's result or error as JSON.  The
 * child is spawned after the test entered its throw-away network namespace,
 * so it runs in it too (checked).
 *
 * The tun node's mode is a fixture, not an assumption about the host: the
 * test makes its own nodes of the tun device (mknod c 10 200, test/helpers/
 * devnode.ts) and passes them as devicePath:
 *  - 0666 (most distributions): anyone opens it; creating a tap needs
 *    CAP_NET_ADMIN (EPERM at TUNSETIFF, hint names CAP_NET_ADMIN and --owner);
 *    attaching to a tap with an owner/group needs being that owner/group.
 *  - 0600: uid nobody fails at open with EACCES and a hint naming that node;
 *    even the tap's owner does.
 * And once with the host's own /dev/net/tun, expecting what its actual mode
 * implies.  `.ci/run` runs this file again with a 0666 and a 0600 node
 * bind-mounted over /dev/net/tun (private mount namespace) and sets
 * MQTAP_EXPECT_TUN_MODE, which the test checks it really sees.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getLink, getTap } from '../../lib/tap/links.js';
import { deleteTap, openTap, type OpenTapOptions } from '../../lib/tap/tap.js';
import { makeNodeDir, modeAllowsRw, type NodeDir } from '../helpers/devnode.js';
import { CAP_NET_ADMIN, catchError, ipLink, need, needCommand, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';

const DIST = resolve(__dirname, '../../dist/lib/index.js');
const DEFAULT_TUN = '/dev/net/tun';
const NOBODY = 65534;
const NOGROUP = 65534;
const OTHER = 23456;

function permEnv(): { ok: boolean; reason: string } {
  const base = tapEnv();
  if (!base.ok) return base;
  if (process.getuid?.() !== 0) return need('root', 'not running as root (the child changes uid, mknod needs root)');
  for (const cmd of ['setpriv', 'mknod']) {
    const c = needCommand(cmd);
    if (!c.ok) return c;
  }
  return need('dist', existsSync(DIST) ? '' : `${DIST} is missing: build it with \`npx tsc -p tsconfig.json\` (npm test does)`);
}

const env = permEnv();
/** This process's namespace before the test isolates itself (read at import, before beforeAll). */
const ORIGINAL_NETNS = readlinkSync('/proc/self/task/' + process.pid + '/ns/net');
/** The host's /dev/net/tun as this process sees it (a bind mount of .ci/run's, in CI). */
const DEFAULT_MODE = existsSync(DEFAULT_TUN) ? statSync(DEFAULT_TUN).mode & 0o7777 : undefined;
const octal = (m: number | undefined): string => (m === undefined ? 'missing' : `0${m.toString(8).padStart(3, '0')}`);
/** Set by .ci/run when it bind-mounts a node of that mode over /dev/net/tun. */
const EXPECT_MODE = process.env.MQTAP_EXPECT_TUN_MODE;

/** Names iproute2 may print for a uid/gid (the name the host's NSS gives, or the number). */
function idNames(db: 'passwd' | 'group', id: number): (string | number)[] {
  const r = spawnSync('getent', [db, String(id)], { encoding: 'utf8' });
  const name = r.status === 0 ? r.stdout.split(':')[0] : undefined;
  return [id, String(id), ...(name ? [name] : [])];
}

interface ChildResult {
  uid: number;
  gid: number;
  /** Supplementary groups (/proc/self/status Groups:). */
  groups: number[];
  capEff: string;
  netns: string;
  ok?: { name: string; created: boolean; queues: number; numQueues: number | undefined };
  error?: { name: string; message: string; code: string; errno?: number; op: string; hint?: string; queue?: number; ifname?: string };
}

const CHILD = `
'use strict';
const fs = require('fs');
const m = require(process.env.MQTAP_DIST);
if (process.env.MQTAP_AS) {
  const [uid, gid] = process.env.MQTAP_AS.split(':').map(Number);
  process.setgroups([]);
  process.setgid(gid);
  process.setuid(uid);
}
const status = fs.readFileSync('/proc/self/status', 'utf8');
const out = {
  uid: process.getuid(),
  gid: process.getgid(),
  groups: /^Groups:([^\\n]*)$/m.exec(status)[1].trim().split(/\\s+/).filter(Boolean).map(Number),
  capEff: /^CapEff:\\s*(\\S+)/m.exec(status)[1],
  netns: fs.readlinkSync('/proc/self/ns/net'),
};
try {
  const tap = m.openTap(JSON.parse(process.argv[2]));
  const info = tap.info();
  out.ok = { name: tap.name, created: tap.created, queues: tap.queues.length, numQueues: info && info.tun.numQueues };
  tap.close();
} catch (err) {
  out.error = typeof err.toJSON === 'function' ? err.toJSON() : { name: err.name, message: String(err.message) };
}
process.stdout.write(JSON.stringify(out));
`;

describe.skipIf(!env.ok)(`permissions${skipNote(env)}`, () => {
  const holder = useIsolatedNetns();
  const track = useTapTracker();
  let nodes: NodeDir | undefined;
  let script = '';
  /** Private tun nodes: world read-write, and owner (root) only. */
  let tun0666 = '';
  let tun0600 = '';

  beforeAll(() => {
    nodes = makeNodeDir('mqtap-perm-');
    script = join(nodes.dir, 'child.js');
    writeFileSync(script, CHILD, { mode: 0o644 });
    tun0666 = nodes.tunNode('tun0666', 0o666);
    tun0600 = nodes.tunNode('tun0600', 0o600);
    console.info(`permissions: private tun nodes in ${nodes.dir}; host ${DEFAULT_TUN} mode ${octal(DEFAULT_MODE)}`);
  });
  afterAll(() => {
    nodes?.remove();
  });

  /** Runs the child script, as `as` (uid, gid, no groups, no capabilities) or under `setpriv ARGS`; returns its JSON. */
  function child(who: { as: [number, number] } | { setpriv: string[] }, opts: OpenTapOptions): ChildResult {
    const argv = [script, JSON.stringify(opts)];
    const [cmd, args] = 'as' in who ? [process.execPath, argv] : ['setpriv', [...who.setpriv, process.execPath, ...argv]];
    const stdout = execFileSync(cmd, args, {
      encoding: 'utf8',
      env: { ...process.env, MQTAP_DIST: DIST, ...('as' in who ? { MQTAP_AS: who.as.join(':') } : {}) },
      cwd: nodes!.dir,
    });
    const r = JSON.parse(stdout) as ChildResult;
    if ('as' in who) {
      expect([r.uid, r.gid, r.groups, r.capEff]).toEqual([who.as[0], who.as[1], [], '0000000000000000']);
    } else {
      expect(r.uid).toBe(0);
      expect(hasBit(r.capEff, CAP_NET_ADMIN), `child CapEff ${r.capEff}`).toBe(false);
    }
    return r;
  }

  const ROOT_NO_NET_ADMIN = { setpriv: ['--bounding-set=-net_admin', '--inh-caps=-net_admin'] };
  const AS = (uid: number, gid: number): { as: [number, number] } => ({ as: [uid, gid] });

  function hasBit(hex: string, bit: number): boolean {
    return ((BigInt(`0x${hex}`) >> BigInt(bit)) & 1n) === 1n;
  }

  /** The EPERM an unprivileged user gets at TUNSETIFF, with the hint that says what to do. */
  function expectTunsetiffEperm(r: ChildResult, ifname: string): void {
    expect(r.ok).toBeUndefined();
    expect(r.error).toMatchObject({ name: 'MqtapError', code: 'EPERM', errno: 1, op: 'TUNSETIFF', ifname });
    expect(r.error!.hint).toMatch(/CAP_NET_ADMIN/);
    expect(r.error!.hint).toMatch(/--owner/);
  }

  /** The EACCES at open, with a hint that names the node that was refused. */
  function expectOpenEacces(r: ChildResult, path: string): void {
    expect(r.ok).toBeUndefined();
    expect(r.error).toMatchObject({ name: 'MqtapError', code: 'EACCES', errno: 13, op: 'TUN_OPEN' });
    expect(r.error!.message).toContain(path);
    expect(r.error!.hint).toContain(`open ${path}:`);
    expect(r.error!.hint).toContain(`ls -l ${path}`);
    expect(r.error!.hint).toMatch(/mode/);
  }

  /** A persistent tap made by this (privileged) process, deleted after `fn`. */
  function withTap(opts: OpenTapOptions & { name: string }, fn: () => void): void {
    track(openTap({ ...opts, persist: true })).close();
    try {
      fn();
    } finally {
      deleteTap(opts.name);
    }
  }

  it('the child runs in the test namespace', () => {
    const r = child(ROOT_NO_NET_ADMIN, { name: 'x', queues: 0 } as never);
    expect(r.netns).toBe(readlinkSync(holder.ns!.path));
    expect(r.netns).not.toBe(ORIGINAL_NETNS);
    expect(child(AS(NOBODY, NOGROUP), { name: 'x', queues: 0 } as never).netns).toBe(r.netns);
  });

  it('root without CAP_NET_ADMIN cannot create a tap: EPERM at TUNSETIFF, hint names CAP_NET_ADMIN', () => {
    const r = child(ROOT_NO_NET_ADMIN, { name: 'perm0', queues: 2 });
    expectTunsetiffEperm(r, 'perm0');
    expect(r.error!.queue).toBe(0);
    expect(getLink('perm0')).toBeUndefined();
  });

  describe('a tun node of mode 0666 (most distributions)', () => {
    it('uid nobody opens it, but creating a tap is EPERM at TUNSETIFF with the CAP_NET_ADMIN / --owner hint', () => {
      expect(statSync(tun0666).mode & 0o777).toBe(0o666);
      const r = child(AS(NOBODY, NOGROUP), { name: 'perm2', devicePath: tun0666 });
      expectTunsetiffEperm(r, 'perm2');
      expect(getLink('perm2')).toBeUndefined();
    });

    it('a tap owned by nobody: reported by the kernel; nobody may attach, root without CAP_NET_ADMIN and others may not', () => {
      withTap({ name: 'own0', owner: NOBODY }, () => {
        expect(getTap('own0')!.tun).toMatchObject({ owner: NOBODY, group: null, persist: true, numQueues: 0 });
        expect(idNames('passwd', NOBODY)).toContain(ipLink('own0')!.linkinfo!.info_data!.user);

        const mine = child(AS(NOBODY, NOGROUP), { name: 'own0', existing: 'require', queues: 3, devicePath: tun0666 });
        expect(mine.error).toBeUndefined();
        expect(mine.ok).toEqual({ name: 'own0', created: false, queues: 3, numQueues: 3 });

        const rootNoCap = child(ROOT_NO_NET_ADMIN, { name: 'own0', existing: 'require', devicePath: tun0666 });
        expectTunsetiffEperm(rootNoCap, 'own0');
        expect(rootNoCap.error!.hint).toMatch(/owner/);

        const other = child(AS(OTHER, OTHER), { name: 'own0', existing: 'require', devicePath: tun0666 });
        expectTunsetiffEperm(other, 'own0');

        // Untouched by the children: still persistent, no queues left open.
        expect(getTap('own0')!.tun).toMatchObject({ owner: NOBODY, persist: true, numQueues: 0, numDisabledQueues: 0 });
      });
    });

    it('a tap with a group: members may attach, others may not', () => {
      withTap({ name: 'grp0', group: NOGROUP }, () => {
        expect(getTap('grp0')!.tun).toMatchObject({ owner: null, group: NOGROUP });
        expect(idNames('group', NOGROUP)).toContain(ipLink('grp0')!.linkinfo!.info_data!.group);
        const member = child(AS(OTHER, NOGROUP), { name: 'grp0', existing: 'require', queues: 2, devicePath: tun0666 });
        expect(member.ok).toEqual({ name: 'grp0', created: false, queues: 2, numQueues: 2 });
        const outsider = child(AS(OTHER, OTHER), { name: 'grp0', existing: 'require', devicePath: tun0666 });
        expectTunsetiffEperm(outsider, 'grp0');
      });
    });

    it('a tap with neither owner nor group may be attached by anyone who can open the tun node', () => {
      withTap({ name: 'open0' }, () => {
        const r = child(AS(OTHER, OTHER), { name: 'open0', existing: 'require', devicePath: tun0666 });
        expect(r.ok).toMatchObject({ created: false, numQueues: 1 });
      });
    });
  });

  describe('a tun node of mode 0600 (root only)', () => {
    it('uid nobody cannot open it: EACCES at TUN_OPEN, the hint names that node, not /dev/net/tun', () => {
      expect(statSync(tun0600).mode & 0o777).toBe(0o600);
      const r = child(AS(NOBODY, NOGROUP), { name: 'perm1', devicePath: tun0600 });
      expectOpenEacces(r, tun0600);
      expect(r.error!.hint).not.toContain(DEFAULT_TUN);
      expect(getLink('perm1')).toBeUndefined();
    });

    it("not even the tap's owner: the node's mode is checked before the tap's owner", () => {
      withTap({ name: 'own1', owner: NOBODY }, () => {
        expectOpenEacces(child(AS(NOBODY, NOGROUP), { name: 'own1', existing: 'require', devicePath: tun0600 }), tun0600);
        // The same tap through a 0666 node: the owner gets in.
        expect(child(AS(NOBODY, NOGROUP), { name: 'own1', existing: 'require', devicePath: tun0666 }).ok).toMatchObject({ numQueues: 1 });
      });
    });

    it('root without CAP_NET_ADMIN opens it (CAP_DAC_OVERRIDE), then gets EPERM at TUNSETIFF', () => {
      const r = child(ROOT_NO_NET_ADMIN, { name: 'perm3', devicePath: tun0600 });
      expectTunsetiffEperm(r, 'perm3');
      expect(getLink('perm3')).toBeUndefined();
    });
  });

  it('a devicePath that does not exist: ENOENT at TUN_OPEN, the hint names that path', () => {
    const missing = join(nodes!.dir, 'no-such-node');
    const e = catchError(() => openTap({ name: 'perm5', devicePath: missing }));
    expect(e).toMatchObject({ code: 'ENOENT', op: 'TUN_OPEN', detail: missing });
    expect(e.hint).toContain(`${missing} does not exist`);
    expect(e.hint).toMatch(/10:200/);
    expect(getLink('perm5')).toBeUndefined();
  });

  describe(`the host's ${DEFAULT_TUN} (mode ${octal(DEFAULT_MODE)})`, () => {
    it.runIf(EXPECT_MODE !== undefined)(`is the node .ci/run bind-mounted (MQTAP_EXPECT_TUN_MODE=${EXPECT_MODE})`, () => {
      expect(octal(statSync(DEFAULT_TUN).mode & 0o7777)).toBe(octal(Number.parseInt(EXPECT_MODE!, 8)));
    });

    // What the mode implies for uid nobody (no groups, no capabilities): read-write
    // for it means the open works and TUNSETIFF decides; otherwise the open fails.
    const nobodyOpens = DEFAULT_MODE !== undefined && modeAllowsRw(DEFAULT_TUN, NOBODY, NOGROUP);
    const what = nobodyOpens ? 'EPERM at TUNSETIFF' : 'EACCES at TUN_OPEN';

    it(`uid nobody creating a tap with the default devicePath: ${what}`, () => {
      const r = child(AS(NOBODY, NOGROUP), { name: 'perm4' });
      if (nobodyOpens) expectTunsetiffEperm(r, 'perm4');
      else {
        expectOpenEacces(r, DEFAULT_TUN);
        expect(r.error!.hint).not.toMatch(/nodev/);
      }
      expect(getLink('perm4')).toBeUndefined();
    });

    it(`the tap's owner attaching with the default devicePath: ${nobodyOpens ? 'succeeds' : 'EACCES at TUN_OPEN'}`, () => {
      withTap({ name: 'own2', owner: NOBODY }, () => {
        const r = child(AS(NOBODY, NOGROUP), { name: 'own2', existing: 'require', queues: 2 });
        if (nobodyOpens) expect(r.ok).toEqual({ name: 'own2', created: false, queues: 2, numQueues: 2 });
        else expectOpenEacces(r, DEFAULT_TUN);
      });
    });
  });

  it('the parent still has CAP_NET_ADMIN (the children did not change it)', () => {
    expect(hasBit(/^CapEff:\s*(\S+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]!, CAP_NET_ADMIN)).toBe(true);
  });
});
