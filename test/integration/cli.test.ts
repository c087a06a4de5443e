/**
 * The mqtap CLI against the real kernel, inside a throw-away network
 * namespace (children spawned after isolateNetns() start in it too).
 */
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns';
import { getTap, listTaps } from '../../lib/tap/links';
import { deleteTap } from '../../lib/tap/tap';
import { CLI, ROOT, cliBuiltReason, runCli, type CliRun, type RunCliOptions } from '../helpers/cli';


function capNetAdmin(): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? (BigInt(`0x${m[1]}`) & (1n << 12n)) !== 0n : false;
}

const reason = !existsSync('/dev/net/tun')
  ? '/dev/net/tun is missing'
  : !capNetAdmin()
    ? 'needs CAP_NET_ADMIN (run as root)'
    : cliBuiltReason();
if (reason) console.warn(`cli integration tests skipped: ${reason}`);

/** `mqtap ARGS` to completion (30 s at most). */
const mqtap = (args: string[], opts: RunCliOptions = {}): CliRun => runCli(args, { timeoutMs: 30_000, ...opts });

function ipLink(name: string): Record<string, unknown> & { linkinfo: { info_kind: string; info_data: Record<string, unknown> } } {
  const r = spawnSync('ip', ['-d', '-j', 'link', 'show', name], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout)[0];
}

describe.skipIf(!!reason)(`mqtap CLI${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let ns: IsolatedNetns;
  beforeAll(() => {
    ns = isolateNetns();
  });
  afterEach(() => {
    for (const t of listTaps()) deleteTap(t.name);
  });
  afterAll(() => {
    ns?.restore();
  });

  it('features reports multi-queue support, as a table and as JSON', () => {
    const human = mqtap(['features']);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/multi-queue \(IFF_MULTI_QUEUE\):\s+yes/);
    const j = mqtap(['features', '--json']);
    expect(j.code).toBe(0);
    const parsed = JSON.parse(j.stdout) as { tun: { available: boolean; features: { multiQueue: boolean }; maxQueues: number } };
    expect(parsed.tun.available).toBe(true);
    expect(parsed.tun.features.multiQueue).toBe(true);
    expect(parsed.tun.maxQueues).toBe(256);
    const v = (JSON.parse(j.stdout) as { vhostNet: { present: boolean; openable: boolean; error?: { hint?: string } } }).vhostNet;
    expect(v.present).toBe(existsSync('/dev/vhost-net'));
    if (!v.openable) expect(v.error?.hint).toMatch(/modprobe vhost_net/);
    expect(human.stdout).toMatch(/^\/dev\/vhost-net:/m);
  });

  it('create makes a persistent multi-queue tap with the given settings; show and ip agree; delete removes it', () => {
    const c = mqtap(['create', 'cq0', '--queues', '4', '--mtu', '9000', '--mac', '52:54:00:12:34:56', '--owner', '0', '--group', '0', '--up', '--json']);
    expect(c.code, c.stderr).toBe(0);
    const created = JSON.parse(c.stdout) as { name: string; mtu: number; address: string; up: boolean; tun: Record<string, unknown> };
    expect(created).toMatchObject({ name: 'cq0', mtu: 9000, address: '52:54:00:12:34:56', up: true });
    expect(created.tun).toMatchObject({ type: 'tap', multiQueue: true, vnetHdr: true, persist: true, owner: 0, group: 0, numQueues: 0, numDisabledQueues: 0 });

    const viaIp = ipLink('cq0');
    expect(viaIp.linkinfo.info_kind).toBe('tun');
    expect(viaIp.linkinfo.info_data).toMatchObject({ type: 'tap', multi_queue: true, vnet_hdr: true, persist: true, numqueues: 0, numdisabled: 0 });
    expect(viaIp.mtu).toBe(9000);

    const table = mqtap(['show']);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/^NAME\s+TYPE\s+MQ\s+VNET_HDR\s+PERSIST/m);
    expect(table.stdout).toMatch(/^cq0\s+tap\s+yes\s+yes\s+yes\s+0\s+0\s+0\s+0\s+9000\s+52:54:00:12:34:56/m);

    const again = mqtap(['create', 'cq0']);
    expect(again.code).toBe(6);
    expect(again.stderr).toMatch(/already exists/);
    expect(again.stderr).not.toMatch(/\n\s+at /); // no stack trace for a user error

    const d = mqtap(['delete', 'cq0']);
    expect(d.code).toBe(0);
    expect(getTap('cq0')).toBeUndefined();
    const gone = mqtap(['delete', 'cq0']);
    expect(gone.code).toBe(3);
    expect(gone.stderr).toMatch(/no device named cq0/);
  });

  it('--no-vnet-hdr creates a tap without the virtio-net header', () => {
    expect(mqtap(['create', 'cq1', '--no-vnet-hdr']).code).toBe(0);
    expect(getTap('cq1')?.tun.vnetHdr).toBe(false);
  });

  it('create --txqueuelen sets each queue ring length (tx_queue_len); 0 is a usage error, a length the kernel refuses leaves no tap', () => {
    const c = mqtap(['create', 'cq3', '--queues', '2', '--txqueuelen', '2048', '--json']);
    expect(c.code, c.stderr).toBe(0);
    expect(JSON.parse(c.stdout)).toMatchObject({ name: 'cq3', txQueueLen: 2048 });
    expect(ipLink('cq3').txqlen).toBe(2048);
    const zero = mqtap(['create', 'cq4', '--txqueuelen', '0']);
    expect(zero.code).toBe(2);
    expect(zero.stderr).toMatch(/txQueueLen must be between 1 and 4294967295/);
    // The tun driver cannot allocate rings that long: a usage error (exit 2), not "permission" (exit 4), as root.
    const huge = mqtap(['create', 'cq4', '--txqueuelen', '4294967295']);
    expect(huge.code, huge.stderr).toBe(2);
    expect(huge.stderr).toMatch(/IFLA_TXQLEN/);
    expect(huge.stderr).toMatch(/hint: .*smaller txQueueLen/);
    expect(huge.stderr).not.toMatch(/\n\s+at /);
    expect(getTap('cq4')).toBeUndefined();
  });

  it('show NAME --json and errors for missing or non-tap names', () => {
    expect(mqtap(['create', 'cq2', '-q', '2']).code).toBe(0);
    const one = mqtap(['show', 'cq2', '--json']);
    expect(one.code).toBe(0);
    expect(JSON.parse(one.stdout)).toMatchObject({ name: 'cq2', kind: 'tun', tun: { multiQueue: true } });
    const missing = mqtap(['show', 'nope0', '--json']);
    expect(missing.code).toBe(3);
    expect(JSON.parse(missing.stdout).error).toMatchObject({ code: 'ENODEV' });
    const lo = mqtap(['show', 'lo']);
    expect(lo.code).toBe(3);
    expect(lo.stderr).toMatch(/not a tun\/tap device/);
    const delLo = mqtap(['delete', 'lo']);
    expect(delLo.code).toBe(6);
    expect(spawnSync('ip', ['link', 'show', 'lo']).status).toBe(0);
  });

  it('usage errors exit 2 before touching anything, with no stack trace', () => {
    for (const args of [
      ['create', 'bad name'],
      ['create', 'x'.repeat(16)],
      ['create', 'ok0', '--queues', '0'],
      ['create', 'ok0', '--queues', '257'],
      ['create', 'ok0', '--queues', 'four'],
      ['create', 'ok0', '--mac', '01:00:5e:00:00:01'],
      ['create', 'ok0', '--mtu', '10'],
      ['exec', 'ok0', '--queues', '2', '--active', '3', '--', 'true'],
      ['bogus'],
    ]) {
      const r = mqtap(args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
    expect(listTaps()).toEqual([]);
  });

  it('demo (host part) runs every step and leaves nothing behind', () => {
    const r = mqtap(['demo', '--json', '--no-guest']);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { tap: string; steps: Array<{ step: string; ok: boolean }> };
    expect(out.steps.map((s) => s.step)).toEqual(['probe', 'netns', 'open', 'active', 'tx', 'rx', 'handoff', 'close']);
    expect(out.steps.every((s) => s.ok)).toBe(true);
    expect(listTaps()).toEqual([]);
  });

  it('--debug shows the stack trace', () => {
    const r = mqtap(['--debug', 'delete', 'nope0']);
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(/\n\s+at /);
  });

  it('a single-queue tap of that name: clear error naming multi_queue, device untouched', () => {
    expect(spawnSync('ip', ['tuntap', 'add', 'dev', 'sq0', 'mode', 'tap']).status).toBe(0);
    const r = mqtap(['exec', 'sq0', '--queues', '2', '--', 'true']);
    expect(r.code).toBe(6);
    expect(r.stderr).toMatch(/single-queue tap/);
    expect(r.stderr).toMatch(/multi_queue/);
    expect(getTap('sq0')?.tun).toMatchObject({ multiQueue: false, persist: true });
  });

  describe('exec', () => {
    const probe = `
      const b = require(${JSON.stringify(join(ROOT, 'build', 'Release', 'mqtap.node'))});
      const fds = process.env.MQTAP_FDS.split(':').map(Number);
      const out = { ifname: process.env.MQTAP_IFNAME, queues: process.env.MQTAP_QUEUES, fds,
        owners: fds.map((fd) => b.tunGetIff(fd).name) };
      console.log(JSON.stringify(out));`;

    it('hands exactly the queue fds as 3.. and each is a queue of NAME (TUNGETIFF in the child)', () => {
      const r = mqtap(['exec', 'xq%d', '--queues', '4', '--', process.execPath, '-e', probe]);
      expect(r.code, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout) as { ifname: string; queues: string; fds: number[]; owners: string[] };
      expect(out.ifname).toMatch(/^xq\d+$/);
      expect(out.queues).toBe('4');
      expect(out.fds).toEqual([3, 4, 5, 6]);
      expect(out.owners).toEqual([out.ifname, out.ifname, out.ifname, out.ifname]);
      // non-persistent tap created by exec is gone once mqtap exits
      expect(getTap(out.ifname)).toBeUndefined();
    });

    it('nothing but stdio and the queue fds reaches the child, not even fds mqtap itself inherited', () => {
      // Give mqtap an extra inherited, non-CLOEXEC fd (3 = a pipe) and list the child's fds with ls.
      const r = spawnSync(process.execPath, [CLI, 'exec', 'xq%d', '--queues', '3', '--', 'ls', '-l', '/proc/self/fd'], {
        encoding: 'utf8',
        stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
        timeout: 30_000,
      });
      expect(r.status, String(r.stderr)).toBe(0);
      const fds = new Map<number, string>();
      for (const line of String(r.stdout).split('\n')) {
        const m = / (\d+) -> (.*)$/.exec(line);
        if (m) fds.set(Number(m[1]), m[2]!);
      }
      // ls opens /proc/self/fd itself: that is the only extra fd, numbered right after the queues
      const extra = [...fds.keys()].filter((fd) => fd > 5);
      expect(extra.length).toBe(1);
      expect(fds.get(extra[0]!)).toMatch(/^\/proc\/\d+\/fd$/);
      expect([0, 1, 2, 3, 4, 5].every((fd) => fds.has(fd))).toBe(true);
      expect([3, 4, 5].map((fd) => fds.get(fd))).toEqual(['/dev/net/tun', '/dev/net/tun', '/dev/net/tun']);
    });

    it('--active K enables K queues and disables the rest (kernel view from inside the child)', () => {
      expect(mqtap(['create', 'eq0']).code).toBe(0);
      const r = mqtap(['exec', 'eq0', '--queues', '4', '--active', '2', '--existing', 'require', '--', 'ip', '-d', '-j', 'link', 'show', 'eq0']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)[0].linkinfo.info_data).toMatchObject({ numqueues: 2, numdisabled: 2 });
      // persistent device stays, its queues are released
      expect(getTap('eq0')?.tun).toMatchObject({ persist: true, numQueues: 0, numDisabledQueues: 0 });
    });

    it("exits with the command's status, and 128+N when a signal kills it", () => {
      expect(mqtap(['exec', 'xq%d', '--', 'sh', '-c', 'exit 7']).code).toBe(7);
      expect(mqtap(['exec', 'xq%d', '--', 'sh', '-c', 'kill -KILL $$']).code).toBe(137);
      const missing = mqtap(['exec', 'xq%d', '--', '/nonexistent/program']);
      expect(missing.code).toBe(127);
      expect(missing.stderr).toMatch(/command not found/);
      expect(listTaps()).toEqual([]);
    });

    it('relays SIGTERM to the child and cleans up', async () => {
      const child = spawn(process.execPath, [CLI, 'exec', 'sq%d', '--queues', '2', '--', 'sh', '-c', 'trap "exit 42" TERM; echo ready; while :; do sleep 0.05; done'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      await new Promise<void>((resolve, reject) => {
        child.stdout!.on('data', (d: Buffer) => {
          stdout += d.toString();
          if (stdout.includes('ready')) resolve();
        });
        child.once('exit', (c, sig) => reject(new Error(`exited early (${c ?? sig}): ${stdout} ${stderr}`)));
      });
      expect(listTaps().map((t) => t.name), stderr).toHaveLength(1);
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
      expect(code, stderr).toBe(42);
      expect(listTaps()).toEqual([]);
    });

    it('relays a signal that arrives the moment the child starts (the relay exists before the child)', () => {
      // The child signals mqtap first thing; mqtap must relay it, not die of it.
      for (let i = 0; i < 5; i++) {
        const r = mqtap(['exec', 'eq%d', '--', 'sh', '-c', 'trap "exit 42" TERM; kill -TERM $PPID; while :; do sleep 0.05; done']);
        expect(r.code, r.stderr).toBe(42);
      }
      expect(listTaps()).toEqual([]);
    });

    it('--vhost on without vhost-net: exit 5 with the modprobe hint, nothing left; --vhost auto falls back with a warning', () => {
      const vhostHere = existsSync('/dev/vhost-net');
      const on = mqtap(['exec', 'vq%d', '--queues', '2', '--vhost', 'on', '--', 'true']);
      if (vhostHere) expect(on.code).toBe(0);
      else {
        expect(on.code).toBe(5);
        expect(on.stderr).toMatch(/modprobe vhost_net/);
      }
      expect(listTaps()).toEqual([]);
      const auto = mqtap(['exec', 'vq%d', '--queues', '2', '--vhost', 'auto', '--', 'sh', '-c', 'echo "$MQTAP_FDS|${MQTAP_VHOSTFDS-none}"']);
      expect(auto.code, auto.stderr).toBe(0);
      if (!vhostHere) {
        expect(auto.stdout.trim()).toBe('3:4|none');
        expect(auto.stderr).toMatch(/vhost-net unavailable; continuing without it/);
      } else expect(auto.stdout.trim()).toBe('3:4|5:6');
      expect(listTaps()).toEqual([]);
    });

    it('a failing open leaves nothing behind and names the step', () => {
      const r = mqtap(['exec', 'eq1', '--existing', 'require', '--', 'true']);
      expect(r.code).toBe(3);
      expect(r.stderr).toMatch(/no tap named eq1/);
      expect(r.stderr).toMatch(/mqtap create eq1/);
      expect(listTaps()).toEqual([]);
    });

    it('without a built addon: the message and the build hint, exit 1, no stack trace', () => {
      const dir = mkdtempSync(join(tmpdir(), 'mqtap-noaddon-'));
      try {
        cpSync(join(ROOT, 'dist'), join(dir, 'dist'), { recursive: true });
        cpSync(join(ROOT, 'package.json'), join(dir, 'package.json'));
        symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
        // No MQTAP_ADDON either (npm run test:asan sets it to the sanitizer build): no addon at all.
        const { MQTAP_ADDON: _addon, ...env } = process.env;
        const r = spawnSync(process.execPath, [join(dir, 'dist', 'bin', 'mqtap.js'), 'show'], { encoding: 'utf8', env });
        expect(r.status, r.stderr).toBe(1);
        expect(r.stderr).toMatch(/^mqtap: cannot load the mqtap native addon/);
        expect(r.stderr).toMatch(/hint: build it with `npm install`/);
        expect(r.stderr).not.toMatch(/\n\s+at /);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('--netns naming no namespace: exit 3 with the path, no stack trace', () => {
      const r = mqtap(['--netns', 'mqtap-no-such-ns', 'show']);
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).toMatch(/\/run\/netns\/mqtap-no-such-ns/);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    });
  });
});
