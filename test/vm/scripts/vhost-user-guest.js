'use strict';
/**
 * For test/vm/vhost-user.test.ts: serveVhostUser (native data plane) on a
 * 2-queue tap in a namespace of its own, and QEMU with KVM booting the test
 * guest with `-netdev vhost-user,queues=2` on it.  The guest runs
 * vm/guest-mq.sh (ethtool -L 1 then 2, ping the host, flows, per-queue
 * counters).  Runs on a host with /dev/kvm, or inside the outer test guest
 * (MQTAP_E2E_NESTED=1: KVM on QEMU's emulated SVM).  One JSON document on
 * stdout; the assertions are in the test.
 *
 * Plain CommonJS on the repo's dist/ (no build step in the guest).
 */
const { spawnSync } = require('node:child_process');
const { mkdtempSync, rmSync } = require('node:fs');
const { tmpdir } = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const D = path.join(REPO, 'dist', 'lib');
const { isolateNetns, openTap, getTap, serveVhostUser } = require(path.join(D, 'index.js'));
const guest = require(path.join(D, 'qemu', 'guest.js'));

const TAP = 'nvu0';
const HOST_IP = '169.254.82.1';
const GUEST_IP = '169.254.82.2';
const MEM_MIB = 512;
const TIMEOUT_MS = Number(process.env.MQTAP_VU_GUEST_TIMEOUT_MS || 420_000);

function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
}

async function main() {
  const out = {};
  const ns = isolateNetns();
  const dir = mkdtempSync(path.join(tmpdir(), 'mqtap-vu-guest-'));
  let tap;
  let be;
  let sampler;
  try {
    tap = openTap({ name: TAP, queues: 2 });
    sh('sysctl', ['-qw', `net.ipv6.conf.${TAP}.disable_ipv6=1`]);
    sh('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', TAP]);
    sh('ip', ['link', 'set', 'dev', TAP, 'up']);
    const socket = path.join(dir, 'vu.sock');
    be = await serveVhostUser({ socket, tap, queues: 2 });
    out.pairs = [];
    out.kernel = [];
    out.features = [];
    out.disconnected = [];
    be.on('pairs', (s) => {
      out.pairs.push(s);
      const t = getTap(TAP);
      out.kernel.push(t ? `${t.tun.numQueues}/${t.tun.numDisabledQueues}` : 'gone');
    });
    be.on('features', (_f, names) => out.features.push(names));
    be.on('disconnected', (d) => out.disconnected.push(d.reason ?? null));
    // counters() is the live connection's: sample it while QEMU runs (QEMU's quit ends the connection).
    const num = (c) => Object.fromEntries(Object.entries(c).map(([k, v]) => [k, Number(v)]));
    out.counters = [];
    sampler = setInterval(() => {
      if (be.connected) out.counters = be.counters().map(num);
    }, 200);
    const { cmd, env } = guest.mqGuestCommand({ hostIp: HOST_IP, guestIp: GUEST_IP, sync: false, flowsPerCpu: 4 });
    const started = Date.now();
    const r = await guest.runInGuest({
      cmd,
      env,
      memMiB: MEM_MIB,
      smp: 2,
      accel: ['kvm'],
      timeoutMs: TIMEOUT_MS,
      qemuExtraArgs: [
        '-object', `memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on`,
        '-numa', 'node,memdev=mem',
        '-chardev', `socket,id=vu0,path=${socket}`,
        '-netdev', 'vhost-user,id=n0,chardev=vu0,queues=2',
        '-device', 'virtio-net-pci,netdev=n0,mq=on,vectors=6,romfile=',
      ],
    });
    clearInterval(sampler);
    out.innerMs = Date.now() - started;
    out.exitCode = r.exitCode;
    out.timedOut = r.timedOut;
    out.innerStdout = r.stdout;
    out.innerStderr = r.stderr.slice(-3000);
    out.innerConsole = r.console.slice(-3000);
    out.qemuStderr = r.qemuStderr.slice(-3000);
    out.report = guest.parseMqGuestOutput(r.stdout);
    out.connectedAfter = be.connected;
    out.connections = be.connections;
  } catch (err) {
    out.fatal = err && err.stack ? err.stack : String(err);
  } finally {
    clearInterval(sampler);
    try {
      if (be) await be.close();
      if (tap) tap.close();
      out.tapAfterClose = Boolean(getTap(TAP));
    } catch (err) {
      out.cleanupError = String(err);
    }
    rmSync(dir, { recursive: true, force: true });
    ns.restore();
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  process.stdout.write(`${JSON.stringify({ fatal: String(err && err.stack ? err.stack : err) })}\n`);
  process.exitCode = 1;
});
