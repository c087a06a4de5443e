/**
 * Permissions, with the kernel deciding: a small Node script (using the built
 * library in dist/) runs as a child process with fewer privileges — root
 * without CAP_NET_ADMIN (setpriv --bounding-set=-net_admin), or uid nobody —
 * and prints openTap's result or error as JSON.  The child is spawned after
 * the test entered its throw-away network namespace, so it runs in it too
 * (checked).
 *
 *  - creating a tap without CAP_NET_ADMIN: EPERM, hint names CAP_NET_ADMIN
 *  - uid nobody opening /dev/net/tun (mode 0600): EACCES, /dev/net/tun hint
 *  - a tap with owner/group: the kernel reports them (rtnetlink and ip), the
 *    owner (or a group member) may attach without CAP_NET_ADMIN, others get
 *    EPERM.  For uid nobody the test makes its own 0666 node of the tun
 *    device (mknod c 10 200 in a temp dir) and passes it as devicePath.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getLink, getTap } from '../../lib/tap/links.js';
import { deleteTap, openTap, type OpenTapOptions } from '../../lib/tap/tap.js';
import { CAP_NET_ADMIN, haveCommand, ipLink, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env.js';

const DIST = resolve(__dirname, '../../dist/lib/index.js');
const NOBODY = 65534;
const NOGROUP = 65534;
const OTHER = 23456;

function permEnv(): { ok: boolean; reason: string } {
  const base = tapEnv();
  if (!base.ok) return base;
  let reason = '';
  if (process.getuid?.() !== 0) reason = 'not running as root (setpriv needs to change uid)';
  else if (!haveCommand('setpriv')) reason = 'setpriv (util-linux) is missing';
  else if (!haveCommand('mknod')) reason = 'mknod is missing';
  else if (!existsSync(DIST)) reason = `${DIST} is missing: build it with \`npx tsc -p tsconfig.json\` (npm test does)`;
  if (reason) console.warn(`mqtap permission tests skipped: ${reason}`);
  return { ok: reason === '', reason };
}

const env = permEnv();
/** This process's namespace before the test isolates itself (read at import, before beforeAll). */
const ORIGINAL_NETNS = readlinkSync('/proc/self/task/' + process.pid + '/ns/net');

interface ChildResult {
  uid: number;
  gid: number;
  capEff: string;
  netns: string;
  ok?: { name: string; created: boolean; queues: number; numQueues: number | undefined };
  error?: { name: string; message: string; code: string; errno?: number; op: string; hint?: string; queue?: number; ifname?: string };
}

const CHILD = `
'use strict';
const fs = require('fs');
const m = require(process.env.MQTAP_DIST);
const status = fs.readFileSync('/proc/self/status', 'utf8');
const out = {
  uid: process.getuid(),
  gid: process.getgid(),
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
  let dir = '';
  let script = '';
  let tunCopy = '';

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'mqtap-perm-'));
    chmodSync(dir, 0o755);
    script = join(dir, 'child.js');
    writeFileSync(script, CHILD, { mode: 0o644 });
    // Our own node for the tun device, usable by anyone (the real one is 0600).
    const { rdev } = statSync('/dev/net/tun');
    tunCopy = join(dir, 'tun');
    execFileSync('mknod', ['-m', '0666', tunCopy, 'c', String(Math.floor(rdev / 256) & 0xfff), String(rdev & 0xff)]);
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Runs the child script under `setpriv ARGS`, returns its JSON. */
  function child(setprivArgs: string[], opts: OpenTapOptions): ChildResult {
    const stdout = execFileSync('setpriv', [...setprivArgs, process.execPath, script, JSON.stringify(opts)], {
      encoding: 'utf8',
      env: { ...process.env, MQTAP_DIST: DIST },
      cwd: dir,
    });
    return JSON.parse(stdout) as ChildResult;
  }

  const NO_NET_ADMIN = ['--bounding-set=-net_admin', '--inh-caps=-net_admin'];
  const AS = (uid: number, gid: number): string[] => [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups'];

  function hasBit(hex: string, bit: number): boolean {
    return ((BigInt(`0x${hex}`) >> BigInt(bit)) & 1n) === 1n;
  }

  it('the child runs in the test namespace', () => {
    const r = child(NO_NET_ADMIN, { name: 'x', queues: 0 } as never);
    expect(r.netns).toBe(readlinkSync(holder.ns!.path));
    expect(r.netns).not.toBe(ORIGINAL_NETNS);
  });

  it('root without CAP_NET_ADMIN cannot create a tap: EPERM at TUNSETIFF, hint names CAP_NET_ADMIN', () => {
    const r = child(NO_NET_ADMIN, { name: 'perm0', queues: 2 });
    expect(r.uid).toBe(0);
    expect(hasBit(r.capEff, CAP_NET_ADMIN), `child CapEff ${r.capEff}`).toBe(false);
    expect(r.ok).toBeUndefined();
    expect(r.error).toMatchObject({ name: 'MqtapError', code: 'EPERM', errno: 1, op: 'TUNSETIFF', ifname: 'perm0', queue: 0 });
    expect(r.error!.hint).toMatch(/CAP_NET_ADMIN/);
    expect(getLink('perm0')).toBeUndefined();
  });

  it('uid nobody cannot open /dev/net/tun (mode 0600): EACCES with the /dev/net/tun hint', () => {
    expect(statSync('/dev/net/tun').mode & 0o006).toBe(0); // otherwise this case tests nothing
    const r = child(AS(NOBODY, NOGROUP), { name: 'perm1' });
    expect([r.uid, r.capEff]).toEqual([NOBODY, '0000000000000000']);
    expect(r.error).toMatchObject({ code: 'EACCES', errno: 13, op: 'TUN_OPEN' });
    expect(r.error!.hint).toMatch(/\/dev\/net\/tun/);
    expect(r.error!.hint).toMatch(/permission|mode/);
    expect(getLink('perm1')).toBeUndefined();
  });

  it('uid nobody cannot create a tap even with an open tun node: EPERM, CAP_NET_ADMIN hint', () => {
    const r = child(AS(NOBODY, NOGROUP), { name: 'perm2', devicePath: tunCopy });
    expect(r.error).toMatchObject({ code: 'EPERM', op: 'TUNSETIFF' });
    expect(r.error!.hint).toMatch(/CAP_NET_ADMIN/);
    expect(getLink('perm2')).toBeUndefined();
  });

  describe('owner and group', () => {
    it('a tap owned by nobody: reported by the kernel; nobody may attach, root without CAP_NET_ADMIN may not', () => {
      track(openTap({ name: 'own0', owner: NOBODY, persist: true })).close();
      try {
        expect(getTap('own0')!.tun).toMatchObject({ owner: NOBODY, group: null, persist: true, numQueues: 0 });
        const user = ipLink('own0')!.linkinfo!.info_data!.user;
        expect(['nobody', NOBODY, String(NOBODY)]).toContain(user);

        const mine = child(AS(NOBODY, NOGROUP), { name: 'own0', existing: 'require', queues: 3, devicePath: tunCopy });
        expect(mine.error).toBeUndefined();
        expect(mine.ok).toEqual({ name: 'own0', created: false, queues: 3, numQueues: 3 });

        const rootNoCap = child(NO_NET_ADMIN, { name: 'own0', existing: 'require' });
        expect(rootNoCap.error).toMatchObject({ code: 'EPERM', op: 'TUNSETIFF', ifname: 'own0' });
        expect(rootNoCap.error!.hint).toMatch(/owner/);
        expect(rootNoCap.error!.hint).toMatch(/CAP_NET_ADMIN/);

        const other = child(AS(OTHER, OTHER), { name: 'own0', existing: 'require', devicePath: tunCopy });
        expect(other.error).toMatchObject({ code: 'EPERM', op: 'TUNSETIFF' });

        // Untouched by the children: still persistent, no queues left open.
        expect(getTap('own0')!.tun).toMatchObject({ owner: NOBODY, persist: true, numQueues: 0, numDisabledQueues: 0 });
      } finally {
        deleteTap('own0');
      }
    });

    it('a tap with a group: members may attach, others may not', () => {
      track(openTap({ name: 'grp0', group: NOGROUP, persist: true })).close();
      try {
        expect(getTap('grp0')!.tun).toMatchObject({ owner: null, group: NOGROUP });
        expect(['nogroup', NOGROUP, String(NOGROUP)]).toContain(ipLink('grp0')!.linkinfo!.info_data!.group);
        const member = child(AS(OTHER, NOGROUP), { name: 'grp0', existing: 'require', queues: 2, devicePath: tunCopy });
        expect(member.ok).toEqual({ name: 'grp0', created: false, queues: 2, numQueues: 2 });
        const outsider = child(AS(OTHER, OTHER), { name: 'grp0', existing: 'require', devicePath: tunCopy });
        expect(outsider.error).toMatchObject({ code: 'EPERM', op: 'TUNSETIFF' });
      } finally {
        deleteTap('grp0');
      }
    });

    it('a tap with neither owner nor group may be attached by anyone who can open the tun node', () => {
      track(openTap({ name: 'open0', persist: true })).close();
      try {
        const r = child(AS(OTHER, OTHER), { name: 'open0', existing: 'require', devicePath: tunCopy });
        expect(r.ok).toMatchObject({ created: false, numQueues: 1 });
      } finally {
        deleteTap('open0');
      }
    });
  });

  it('the parent still has CAP_NET_ADMIN (the children did not change it)', () => {
    expect(hasBit(/^CapEff:\s*(\S+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]!, CAP_NET_ADMIN)).toBe(true);
  });
});
