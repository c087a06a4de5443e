/**
 * `mqtap demo`: the whole core mission in one command, in a throw-away
 * network namespace: probe, open a multi-queue tap, change the active queue
 * count, move frames both ways on every queue, hand the queues to a child,
 * and clean up.
 */
import { readSync, writeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { MqtapError } from '../lib/errors';
import { getLink } from '../lib/links';
import { type Logger } from '../lib/log';
import { native } from '../lib/native';
import { isolateNetns } from '../lib/netns';
import { probeTun } from '../lib/probe';
import { spawnWithFds } from '../lib/spawn';
import { openTap, type Tap } from '../lib/tap';

export interface DemoResult {
  tap: string;
  queues: number;
  steps: Array<{ step: string; ok: boolean; detail: Record<string, unknown> }>;
}

const VNET_HDR = 10;

/** An Ethernet frame (local experimental EtherType 0x88b5) to `dst`, tagged with the queue number. */
function demoFrame(dst: Buffer, queue: number): Buffer {
  const f = Buffer.alloc(VNET_HDR + 60);
  dst.copy(f, VNET_HDR);
  Buffer.from([0x02, 0, 0, 0, 0xde, queue]).copy(f, VNET_HDR + 6);
  f.writeUInt16BE(0x88b5, VNET_HDR + 12);
  f.write(`mqtap demo frame on queue ${queue}`, VNET_HDR + 14);
  return f;
}

function describeFrame(frame: Buffer): string {
  const type = frame.readUInt16BE(12);
  if (type === 0x86dd && frame[20] === 58) {
    const icmp = frame[54];
    const names: Record<number, string> = { 133: 'router solicitation', 135: 'neighbour solicitation', 143: 'MLDv2 report' };
    return `IPv6 ICMPv6 ${names[icmp ?? 0] ?? `type ${icmp}`}`;
  }
  if (type === 0x86dd && frame[20] === 0 && frame[62] === 143) return 'IPv6 MLDv2 report';
  if (type === 0x86dd) return 'IPv6';
  if (type === 0x0806) return 'ARP';
  return `EtherType 0x${type.toString(16)}`;
}

async function readFrames(tap: Tap, ms: number, want: number): Promise<Array<{ queue: number; what: string }>> {
  const got: Array<{ queue: number; what: string }> = [];
  const buf = Buffer.alloc(65536);
  for (const q of tap.openQueues()) native.setNonBlocking(q.fd, true);
  const deadline = Date.now() + ms;
  while (Date.now() < deadline && got.length < want) {
    for (const q of tap.openQueues()) {
      for (;;) {
        let n: number;
        try {
          n = readSync(q.fd, buf, 0, buf.length, null);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EAGAIN') break;
          throw err;
        }
        got.push({ queue: q.index, what: describeFrame(buf.subarray(VNET_HDR, n)) });
      }
    }
    await sleep(50);
  }
  return got;
}

export async function runDemo(opts: { queues: number; log: (line: string) => void; logger: Logger }): Promise<DemoResult> {
  const { log } = opts;
  const result: DemoResult = { tap: '', queues: opts.queues, steps: [] };
  const step = (name: string, ok: boolean, detail: Record<string, unknown>, line: string): void => {
    result.steps.push({ step: name, ok, detail });
    log(`${ok ? '✔' : '✘'} ${line}`);
  };

  const probe = probeTun();
  if (!probe.multiQueueTap) {
    throw new MqtapError({
      op: 'PROBE',
      code: probe.error?.code ?? 'ERR_UNSUPPORTED',
      message: `multi-queue taps are not usable here: ${probe.error?.message ?? 'the kernel lacks IFF_MULTI_QUEUE'}`,
      ...(probe.error?.hint ? { hint: probe.error.hint } : {}),
    });
  }
  step('probe', true, { features: probe.features?.raw, kernel: probe.kernel }, `kernel ${probe.kernel}: multi-queue taps supported (TUNGETFEATURES 0x${probe.features!.raw.toString(16)})`);

  const ns = isolateNetns();
  try {
    step('netns', true, {}, 'entered a throw-away network namespace (unshare CLONE_NEWNET): nothing here touches the host network');
    const tap = openTap({ name: 'mqdemo%d', queues: opts.queues, up: true, logger: opts.logger });
    try {
      result.tap = tap.name;
      let k = tap.info()!.tun;
      step('open', k.numQueues === opts.queues, { fds: tap.fds(), numQueues: k.numQueues }, `opened ${tap.name} (link up) with ${opts.queues} queues, fds ${tap.fds().join(',')} (kernel: numqueues ${k.numQueues}, numdisabled ${k.numDisabledQueues})`);

      const half = Math.max(1, opts.queues >> 1);
      tap.setActiveQueues(half);
      k = tap.info()!.tun;
      const downOk = k.numQueues === half && k.numDisabledQueues === opts.queues - half;
      tap.setActiveQueues(opts.queues);
      const k2 = tap.info()!.tun;
      step(
        'active',
        downOk && k2.numQueues === opts.queues,
        { down: k, up: k2 },
        `setActiveQueues(${half}) -> numqueues ${k.numQueues}, numdisabled ${k.numDisabledQueues}; setActiveQueues(${opts.queues}) -> numqueues ${k2.numQueues}, numdisabled ${k2.numDisabledQueues}`,
      );

      const mac = Buffer.from(tap.info()!.address!.split(':').map((h) => parseInt(h, 16)));
      const before = tap.info()!.stats!.rxPackets;
      for (const q of tap.openQueues()) writeSync(q.fd, demoFrame(mac, q.index));
      const after = tap.info()!.stats!.rxPackets;
      step('tx', after - before === opts.queues, { rxPackets: after - before }, `wrote one frame on each queue: the kernel counted ${after - before} received frames on ${tap.name}`);

      const frames = await readFrames(tap, 4000, 3);
      const perQueue = tap.openQueues().map((q) => frames.filter((f) => f.queue === q.index).length);
      const kinds = [...new Set(frames.map((f) => f.what))];
      step(
        'rx',
        frames.length > 0,
        { perQueue, kinds, txPackets: tap.info()!.stats!.txPackets },
        `the kernel sent ${frames.length} frame(s) to the tap (${kinds.join(', ') || 'none'}); per queue: ${perQueue.map((n, i) => `q${i}=${n}`).join(' ')}`,
      );

      const { exited, child } = spawnWithFds({
        argv: ['sh', '-c', 'for f in $(echo "$MQTAP_FDS" | tr : " "); do printf "%s=%s " "$f" "$(readlink /proc/self/fd/$f)"; done'],
        fds: tap.fds(),
        env: { MQTAP_FDS: tap.fds().map((_, i) => 3 + i).join(':') },
        stdio: 'pipe',
        forwardSignals: [],
      });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      const status = await exited;
      const handed = out.trim().split(' ').filter(Boolean);
      step('handoff', status.status === 0 && handed.length === opts.queues && handed.every((h) => h.endsWith('/dev/net/tun')), { child: handed }, `handed the queues to a child process as fds: ${handed.join(' ')}`);
    } finally {
      tap.close();
    }
    const gone = getLink(result.tap) === undefined;
    step('close', gone, {}, `closed every queue: ${result.tap} ${gone ? 'is gone' : 'is STILL THERE'} (not persistent)`);
  } finally {
    ns.restore();
  }
  return result;
}
