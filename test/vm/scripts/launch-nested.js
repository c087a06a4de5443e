'use strict';
/**
 * Runs INSIDE the outer guest (which has a real /dev/vhost-net) for
 * test/vm/launch-nested.test.ts: `mqtap launch --vhost on --queues 2 --
 * qemu-system-x86_64 <inner guest args>` boots the same kernel/initramfs
 * once more (TCG inside TCG), the inner guest runs vm/guest-mq.sh, and this
 * script looks at the outer side while it runs: the tap's queue state at each
 * checkpoint, the inner QEMU's fds (tap queues and /dev/vhost-net), the
 * vhost worker threads ("vhost-<QEMU pid>") and how much CPU they used while
 * the inner guest pinged and sent flows.  One JSON document on stdout; the
 * assertions are in the test.
 *
 * Plain CommonJS on the repo's dist/ (no build step in the guest).
 */
const { spawn, spawnSync } = require('node:child_process');
const { existsSync, readFileSync, readdirSync, readlinkSync } = require('node:fs');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const D = path.join(REPO, 'dist', 'lib');
const { isolateNetns, getTap, listTaps, deleteTap, probeVhostNet } = require(path.join(D, 'index.js'));
const guest = require(path.join(D, 'qemu', 'guest.js'));
const CLI = path.join(REPO, 'dist', 'bin', 'mqtap.js');

const TAP = 'nv0';
const HOST_IP = '169.254.78.1';
const GUEST_IP = '169.254.78.2';
const INNER_TIMEOUT_MS = Number(process.env.MQTAP_NESTED_INNER_TIMEOUT_MS || 600_000);

const read = (f) => {
  try {
    return readFileSync(f, 'utf8');
  } catch {
    return '';
  }
};
const view = () => {
  const t = getTap(TAP);
  return t ? { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues } : null;
};

/** What the inner QEMU (pid) holds and which vhost workers serve it. */
function qemuSide(pid) {
  const fds = {};
  let kvm = false;
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const target = readlinkSync(`/proc/${pid}/fd/${n}`);
      if (target === '/dev/kvm' || target === 'anon_inode:kvm-vm') kvm = true;
      if (target === '/dev/net/tun' || target === '/dev/vhost-net') {
        const iff = /^iff:\s*(\S+)/m.exec(read(`/proc/${pid}/fdinfo/${n}`));
        fds[n] = iff ? `${target} (${iff[1]})` : target;
      }
    } catch {
      /* closed meanwhile */
    }
  }
  // vhost workers: kernel threads "vhost-<pid>" (Linux < 6.4), or threads of QEMU itself (>= 6.4).
  const workers = [];
  const seen = new Set();
  const scan = (dir) => {
    for (const t of readdirSync(dir)) {
      if (!/^\d+$/.test(t) || seen.has(t)) continue;
      const comm = read(`${dir}/${t}/comm`).trim();
      if (comm === `vhost-${pid}`) {
        seen.add(t);
        const ns = Number(read(`${dir}/${t}/schedstat`).split(' ')[0] || 0);
        workers.push({ tid: Number(t), comm, cpuNs: ns, kernelThread: dir === '/proc' && !existsSync(`/proc/${pid}/task/${t}`) });
      }
    }
  };
  scan('/proc');
  scan(`/proc/${pid}/task`);
  workers.sort((a, b) => a.tid - b.tid);
  return { fds, workers, kvm };
}

async function main() {
  const out = { outerKernel: read('/proc/sys/kernel/osrelease').trim() };
  out.vhostProbe = (({ present, openable, usable }) => ({ present, openable, usable }))(probeVhostNet());
  const ns = isolateNetns();
  const resultsDir = await guest.makeResultsDir('mqtap-inner-');
  try {
    const mk = spawnSync(process.execPath, [CLI, 'create', TAP, '--queues', '2'], { encoding: 'utf8' });
    out.create = { status: mk.status, stderr: mk.stderr };
    spawnSync('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', TAP]);
    spawnSync('ip', ['link', 'set', TAP, 'up']);
    const t0 = Date.now();
    // /dev/kvm here is QEMU's TCG emulating AMD SVM for this guest (--modules kvm_amd): the inner
    // guest then runs at TCG speed instead of TCG inside TCG (~10x slower; MQTAP_NESTED_ACCEL=tcg forces it).
    out.kvm = existsSync('/dev/kvm');
    const accel = process.env.MQTAP_NESTED_ACCEL === 'tcg' || !out.kvm ? ['tcg'] : ['kvm', 'tcg'];
    const args = await guest.guestQemuArgs({
      ...guest.mqGuestCommand({ hostIp: HOST_IP, guestIp: GUEST_IP, flowsPerCpu: 16 }),
      resultsDir,
      consoleFile: path.join(resultsDir, 'console.log'),
      memMiB: 512,
      smp: 1,
      accel,
    });
    out.innerArgsMs = Date.now() - t0;

    let pid;
    const views = { beforeLaunch: view() };
    const sides = {};
    let pingGuest;
    const watcher = guest.watchCheckpoints(resultsDir, async (cp) => {
      views[cp.name] = view();
      process.stderr.write(`launch-nested: +${((Date.now() - t0) / 1000).toFixed(0)} s checkpoint ${cp.name} ${JSON.stringify(views[cp.name])}\n`);
      if (pid && (cp.name === 'addr' || cp.name === 'traffic')) sides[cp.name] = qemuSide(pid);
      if (cp.name === 'addr') pingGuest = await guest.hostPing(GUEST_IP, { count: 3, deadlineSec: 60 });
    });
    const c = spawn(process.execPath, [CLI, 'launch', '--name', TAP, '--existing', 'require', '--vhost', 'on', '--queues', '2', '--json', '--', guest.qemuBinary(), ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    c.stderr.on('data', (d) => {
      stderr += d.toString();
      const m = /"event":"started","pid":(\d+)/.exec(stderr);
      if (m) pid = Number(m[1]);
    });
    const st = await new Promise((resolve) => {
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        c.kill('SIGKILL');
      }, INNER_TIMEOUT_MS);
      c.once('exit', (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal, timedOut });
      });
    });
    await watcher.stop();
    const line = (ev) => JSON.parse(stderr.split('\n').find((l) => l.includes(`"event":"${ev}"`)) || '{}');
    Object.assign(out, {
      launch: st,
      innerMs: Date.now() - t0,
      started: line('started'),
      exited: line('exited'),
      views,
      checkpoints: watcher.seen.map((c) => ({ name: c.name, atMs: c.atMs })),
      sides,
      pingGuest: pingGuest && { sent: pingGuest.sent, received: pingGuest.received },
      report: guest.parseMqGuestOutput(read(path.join(resultsDir, 'stdout'))),
      innerExit: read(path.join(resultsDir, 'exitcode')).trim(),
      qemuAlive: pid ? existsSync(`/proc/${pid}`) : null,
      afterExit: view(),
      launchStderr: stderr.slice(-4000),
      innerStderr: read(path.join(resultsDir, 'stderr')).slice(-2000),
      innerConsole: read(path.join(resultsDir, 'console.log')).replace(/\r/g, '').slice(-3000),
    });
  } catch (err) {
    out.fatal = String(err && err.stack ? err.stack : err);
  } finally {
    for (const t of listTaps()) {
      try {
        deleteTap(t.name);
      } catch {
        /* gone with the namespace */
      }
    }
    out.tapsLeft = listTaps().map((t) => t.name);
    guest.removeTree(resultsDir);
    ns.restore();
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  process.stdout.write(`${JSON.stringify({ fatal: String(err && err.stack ? err.stack : err) })}\n`);
  process.exitCode = 1;
});
