/**
 * `mqtap launch --vhost on`: QEMU with vhost=on,vhostfds=... end to end.
 * That needs /dev/vhost-net where QEMU runs, and the only one here is the
 * guest's, so it runs nested: the outer guest (vm/, QEMU TCG) runs
 * test/vm/scripts/launch-nested.js, which creates a persistent 2-queue tap
 * in a namespace of the outer guest and runs
 * `mqtap launch --vhost on --queues 2 -- qemu-system-x86_64 <inner args>`,
 * the inner guest booting the same kernel and initramfs (TCG inside TCG)
 * with vm/guest-mq.sh.  The inner args come from the same
 * vm/run-in-guest.sh --print-qemu-args, run in the outer guest against the
 * host's image cache (read-only there; vm/build.sh uses it as it is).
 *
 * Proves: the inner QEMU got vhost=on,vhostfds=5:6 after fds=3:4 and holds
 * two /dev/vhost-net fds; the inner guest's eth0 has 2 queue pairs and
 * ethtool -L works (the outer tap's numqueues follows); pings both ways go
 * through the tap, and the vhost workers ("vhost-<QEMU pid>") exist, two of
 * them, and used CPU time while the traffic ran; everything is gone after.
 *
 * The outer guest loads kvm_amd: QEMU's TCG emulates AMD SVM (-cpu max), so
 * the inner QEMU runs its guest with KVM (the production path for vhost:
 * ioeventfd/irqfd) at TCG speed instead of TCG inside TCG (which took ~8
 * minutes to boot and ~100 s per guest command here); MQTAP_NESTED_ACCEL=tcg
 * forces the slow way.  ~2 minutes in all (112 s idle), so it runs only with
 * MQTAP_E2E_NESTED=1 (`npm run test:e2e:nested`; CI runs it once).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestImage, runNestedKvmGuest, vmAvailable, type GuestImage, type RunInGuestResult } from './harness.js';

const enabled = process.env.MQTAP_E2E_NESTED === '1';
const vm = enabled ? vmAvailable() : { ok: false as const, reason: 'set MQTAP_E2E_NESTED=1 to run it (npm run test:e2e:nested; ~2 minutes)' };
if (!vm.ok) console.warn(`test/vm/launch-nested.test.ts skipped: ${vm.reason}`);

const OUTER_TIMEOUT = 900_000;

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

describe.skipIf(!vm.ok)(`mqtap launch --vhost on, nested in the vhost-capable guest${vm.ok ? '' : ` (skipped: ${vm.reason})`}`, () => {
  let r: Json;
  let run: RunInGuestResult;
  let diag: string;

  beforeAll(async () => {
    const image: GuestImage = await ensureGuestImage();
    run = await runNestedKvmGuest({
      cmd: ['node', 'test/vm/scripts/launch-nested.js'],
      env: { MQTAP_VM_CACHE: image.cacheDir },
      // kvm_amd: QEMU's TCG emulates AMD SVM (-cpu max), so the inner QEMU can use KVM and its guest
      // runs at TCG speed (~1 min) instead of TCG inside TCG (~8 min to boot, ~100 s per command).
      modules: ['kvm_amd'],
      memMiB: 2048,
      timeoutMs: OUTER_TIMEOUT - 60_000,
    });
    diag = `outer exit ${run.exitCode} after ${run.durationMs} ms\nstdout:\n${run.stdout.slice(-6000)}\nstderr:\n${run.stderr.slice(-3000)}\nconsole:\n${run.console.slice(-3000)}`;
    const last = run.stdout.trim().split('\n').pop() ?? '';
    try {
      r = JSON.parse(last);
    } catch {
      throw new Error(`no JSON from launch-nested.js: ${diag}`);
    }
    if (r.fatal) throw new Error(`launch-nested.js failed: ${r.fatal}\n${diag}`);
    console.log(`outer side: ${JSON.stringify({ views: r.views, fds: r.sides?.traffic?.fds, workers: r.sides?.traffic?.workers, innerQueues: r.report?.queues })}`);
    console.log(`nested run: outer ${run.durationMs} ms, inner launch ${r.innerMs} ms (inner args ${r.innerArgsMs} ms), inner accel ${r.sides?.traffic?.kvm ? 'kvm (emulated SVM)' : 'tcg'}, checkpoints ${JSON.stringify(r.checkpoints)}`);
  }, OUTER_TIMEOUT);

  it('the outer guest has a usable /dev/vhost-net; launch exits 0 with QEMU given fds=3:4,vhost=on,vhostfds=5:6', () => {
    expect(run.exitCode, diag).toBe(0);
    expect(r.vhostProbe).toEqual({ present: true, openable: true, usable: true });
    expect(r.create.status, r.create.stderr).toBe(0);
    expect(r.launch, r.launchStderr).toEqual({ code: 0, signal: null, timedOut: false });
    expect(r.started).toMatchObject({ tap: 'nv0', queues: 2, fds: [3, 4], vhostfds: [5, 6], vhost: true });
    expect(r.started.argv).toContain('tap,id=net0,fds=3:4,vhost=on,vhostfds=5:6');
    expect(r.exited).toMatchObject({ status: 0, tapGone: false });
  });

  it('the inner guest sees eth0 with 2 queue pairs; ethtool -L 1 then 2 works and the outer tap follows', () => {
    expect(r.report.nics, `${r.innerStderr}\n${r.innerConsole}`).toEqual([{ name: 'eth0', mac: expect.any(String), driver: 'virtio_net', maxCombined: 2, combined: 1 }]);
    expect(r.report.setChannels).toEqual([
      { want: 1, rc: 0, combined: 1 },
      { want: 2, rc: 0, combined: 2 },
    ]);
    expect(r.views).toMatchObject({
      beforeLaunch: { numQueues: 0, numDisabledQueues: 0 },
      boot: { numQueues: 1, numDisabledQueues: 1 },
      'combined-1': { numQueues: 1, numDisabledQueues: 1 },
      'combined-2': { numQueues: 2, numDisabledQueues: 0 },
    });
  });

  it('the inner QEMU holds the two tap queues and two /dev/vhost-net fds (3, 4 and 5, 6)', () => {
    const fds = r.sides.traffic.fds;
    expect(fds).toMatchObject({ 3: '/dev/net/tun (nv0)', 4: '/dev/net/tun (nv0)', 5: '/dev/vhost-net', 6: '/dev/vhost-net' });
    expect(Object.values(fds).filter((t) => t === '/dev/vhost-net')).toHaveLength(2);
  });

  it('pings go both ways through the tap, served by the vhost workers (vhost-<QEMU pid>, one per pair), which used CPU meanwhile', () => {
    expect(r.report.pingHost?.received, `${r.innerStderr}\n${r.innerConsole}`).toBeGreaterThan(0);
    expect(r.pingGuest?.received).toBeGreaterThan(0);
    const before = r.sides.addr.workers;
    const after = r.sides.traffic.workers;
    expect(after.map((w: Json) => w.comm)).toEqual([`vhost-${r.started.pid}`, `vhost-${r.started.pid}`]);
    const busy = after.filter((w: Json) => w.cpuNs > (before.find((b: Json) => b.tid === w.tid)?.cpuNs ?? 0));
    expect(busy.length, JSON.stringify({ before, after })).toBeGreaterThan(0);
    // the flows used both pairs, as the inner guest counted them
    expect(r.report.queues.filter((q: Json) => q.rxPackets > 0 && q.txPackets > 0).length, JSON.stringify(r.report.queues)).toBe(2);
  });

  it('afterwards: the inner guest passed every step, QEMU is gone, the tap released its queues, nothing is left', () => {
    expect(r.report.failures).toEqual([]);
    expect(r.innerExit).toBe('0');
    expect(r.qemuAlive).toBe(false);
    expect(r.afterExit).toEqual({ numQueues: 0, numDisabledQueues: 0 });
    expect(r.tapsLeft).toEqual([]);
  });
});
