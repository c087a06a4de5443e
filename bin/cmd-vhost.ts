/**
 * vhost-net commands: `mqtap vhost-selftest`, the quick way to check that a
 * host's /dev/vhost-net really moves frames.
 *
 * In a throw-away network namespace it opens a multi-queue tap with one
 * vhost-net fd per queue pair, drives every pair from this process (split
 * vrings in process memory, VhostPairDriver) and moves K UDP frames each way
 * on every pair:
 *
 *   TX ring -> vhost -> tap -> kernel: frames from a static link-local
 *   neighbour (PEER) to the tap's address are received by a UDP socket, which
 *   checks each payload byte for byte and the source port (= the pair);
 *
 *   kernel -> tap -> vhost -> RX ring: the socket answers each frame; the tap
 *   sends a flow's replies on the queue it last received the flow on
 *   (rx-follows-tx), so pair i's replies must come back on pair i's RX ring,
 *   byte for byte.
 *
 * Nothing is left behind: the namespace, tap and fds go away at the end.
 */
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import { writeFileSync } from 'node:fs';
import { release } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { Option, type Command } from 'commander';
import { MqtapError } from '../lib/sys/errors';
import { parseUdp4Frame, udp4Frame } from '../lib/datapath/frames';
import type { Logger } from '../lib/sys/log';
import { isolateNetns } from '../lib/sys/netns';
import { openNetdev, type Netdev } from '../lib/vhost/netdev';
import { validateInt, validateQueueCount } from '../lib/sys/validate';
import { probeVhostNet, type VhostPairDriver, type VhostProbe } from '../lib/vhost/vhost';
import { EXIT, intArg, json, logger, out, type CliContext, type GlobalOpts } from './context';
import { table } from './format';

const LOCAL = '169.254.86.1';
const PEER = '169.254.86.2';
const TAP_MAC = '02:6d:71:56:00:01';
const PEER_MAC = '02:6d:71:56:00:02';
const LOCAL_PORT = 7786;
/** Pair i's frames come from PEER:PEER_PORT_BASE+i. */
const PEER_PORT_BASE = 41000;

export interface SelftestPair {
  pair: number;
  /** TX ring -> kernel: frames queued, frames the socket received intact, payload bytes. */
  tx: { sent: number; ok: number; bytes: number; completed: boolean };
  /** kernel -> RX ring: replies sent, replies received intact on this pair, payload bytes, replies that came back on another pair. */
  rx: { sent: number; ok: number; bytes: number; misrouted: number };
  ok: boolean;
}

export interface SelftestResult {
  ok: boolean;
  kernel: string;
  devicePath: string;
  features: string[];
  tap: string;
  pairs: SelftestPair[];
  /** Frames that matched nothing we sent (corrupted payloads, strays). */
  unexpected: number;
}

export interface SelftestOptions {
  pairs: number;
  frames: number;
  devicePath?: string;
  logger?: Logger;
  /** Per phase (TX, RX).  Default 15 s. */
  timeoutMs?: number;
}

/** Ethernet + IPv4 + UDP (checksum 0) from PEER:srcPort to LOCAL:LOCAL_PORT. */
function selftestFrame(srcPort: number, payload: Buffer): Buffer {
  return udp4Frame({ dstMac: TAP_MAC, srcMac: PEER_MAC, srcIp: PEER, dstIp: LOCAL, srcPort, dstPort: LOCAL_PORT, payload });
}

/** The UDP payload and destination port of an IPv4/UDP frame from LOCAL to PEER, else undefined. */
function selftestReply(frame: Buffer): { dstPort: number; payload: Buffer } | undefined {
  const u = parseUdp4Frame(frame);
  return u?.dstIp === PEER ? { dstPort: u.dstPort, payload: u.payload } : undefined;
}

function ip(args: string[]): void {
  try {
    execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    throw new MqtapError({
      op: 'SELFTEST',
      code: e.code === 'ENOENT' ? 'ENOENT' : 'ERR_IP',
      message: `ip ${args.join(' ')} failed: ${e.code === 'ENOENT' ? 'the ip command was not found' : (e.stderr?.toString().trim() ?? e.message)}`,
      ...(e.code === 'ENOENT' ? { hint: 'install iproute2 (the selftest configures a link-local address with `ip`)' } : {}),
    });
  }
}

async function bindSocket(): Promise<dgram.Socket> {
  const sock = dgram.createSocket('udp4');
  await new Promise<void>((resolve, reject) => {
    sock.once('error', reject);
    sock.bind(LOCAL_PORT, LOCAL, () => {
      sock.off('error', reject);
      resolve();
    });
  });
  return sock;
}

/** A payload of 16..1400 bytes: a readable tag, then random bytes. */
function payload(tag: string, k: number): Buffer {
  const sizes = [16, 64, 300, 1400];
  const head = Buffer.from(`${tag}:`);
  const size = Math.max(sizes[k % sizes.length]!, head.length + 4);
  return Buffer.concat([head, randomBytes(size - head.length)]);
}

async function exchange(nd: Netdev, drivers: VhostPairDriver[], frames: number, timeoutMs: number): Promise<{ pairs: SelftestPair[]; unexpected: number }> {
  const n = drivers.length;
  const pairs: SelftestPair[] = drivers.map((_, i) => ({
    pair: i,
    tx: { sent: 0, ok: 0, bytes: 0, completed: false },
    rx: { sent: 0, ok: 0, bytes: 0, misrouted: 0 },
    ok: false,
  }));
  let unexpected = 0;
  const sock = await bindSocket();
  try {
    const received: Array<{ msg: Buffer; port: number }> = [];
    sock.on('message', (msg, rinfo) => received.push({ msg, port: rinfo.port }));

    // TX: pair i sends `frames` frames from PEER:PEER_PORT_BASE+i.
    const txExpect = new Map<string, number>();
    for (let i = 0; i < n; i++) {
      const batch: Buffer[] = [];
      for (let k = 0; k < frames; k++) {
        const p = payload(`mqtap vhost-selftest tx pair ${i} frame ${k}`, k);
        txExpect.set(`${PEER_PORT_BASE + i}|${p.toString('hex')}`, i);
        batch.push(selftestFrame(PEER_PORT_BASE + i, p));
      }
      let queued = 0;
      const deadline = Date.now() + timeoutMs;
      while (queued < batch.length && Date.now() < deadline) {
        queued += drivers[i]!.send(batch.slice(queued));
        if (queued < batch.length) await drivers[i]!.flushTx(50);
      }
      pairs[i]!.tx.sent = queued;
    }
    await Promise.all(drivers.map(async (d, i) => (pairs[i]!.tx.completed = await d.flushTx(timeoutMs))));
    const txDeadline = Date.now() + timeoutMs;
    while (received.length < n * frames && Date.now() < txDeadline) await sleep(5);

    // RX: answer every intact datagram; the reply's flow follows its request's queue.
    const rxExpect = new Map<string, number>();
    for (const { msg, port } of received.splice(0)) {
      const key = `${port}|${msg.toString('hex')}`;
      const i = txExpect.get(key);
      if (i === undefined) {
        unexpected++;
        continue;
      }
      txExpect.delete(key);
      pairs[i]!.tx.ok++;
      pairs[i]!.tx.bytes += msg.length;
      const k = pairs[i]!.rx.sent++;
      const r = payload(`mqtap vhost-selftest rx pair ${i} frame ${k}`, k);
      rxExpect.set(`${port}|${r.toString('hex')}`, i);
      await new Promise<void>((resolve, reject) => sock.send(r, port, PEER, (err) => (err ? reject(err) : resolve())));
    }
    const rxDeadline = Date.now() + timeoutMs;
    let pending = rxExpect.size;
    while (pending > 0 && Date.now() < rxDeadline) {
      let got = 0;
      for (let j = 0; j < n; j++) {
        for (const f of drivers[j]!.receive()) {
          got++;
          const r = selftestReply(f);
          const key = r ? `${r.dstPort}|${r.payload.toString('hex')}` : '';
          const i = rxExpect.get(key);
          if (!r || i === undefined) {
            unexpected++;
            continue;
          }
          rxExpect.delete(key);
          pending--;
          if (i === j) {
            pairs[i]!.rx.ok++;
            pairs[i]!.rx.bytes += r.payload.length;
          } else pairs[i]!.rx.misrouted++;
        }
      }
      if (got === 0) await sleep(5);
    }
  } finally {
    await new Promise<void>((resolve) => sock.close(() => resolve()));
  }
  for (const p of pairs) p.ok = p.tx.sent === frames && p.tx.completed && p.tx.ok === frames && p.rx.ok === frames;
  nd.logger.debug({ ifname: nd.name, pairs }, 'vhost selftest exchange done');
  return { pairs, unexpected };
}

/**
 * Runs the selftest.  Throws an MqtapError when vhost-net is unusable (see
 * the probe) or the setup fails; otherwise returns per-pair results.
 */
async function runVhostSelftest(opts: SelftestOptions, probe: VhostProbe = probeVhostNet(opts.devicePath !== undefined ? { devicePath: opts.devicePath } : {})): Promise<SelftestResult> {
  const pairCount = validateQueueCount(opts.pairs, 'pairs');
  const frames = validateInt(opts.frames, 'frames', 1, 128);
  const timeoutMs = opts.timeoutMs ?? 15_000;
  if (!probe.usable)
    throw new MqtapError({
      op: 'VHOST_OPEN',
      code: probe.error?.code ?? 'ENOENT',
      message: `vhost-net is not usable here: ${probe.error?.message ?? 'unknown reason'}`,
      ...(probe.error?.hint ? { hint: probe.error.hint } : {}),
    });
  const ns = isolateNetns();
  try {
    try {
      // No IPv6 on the new tap: no router solicitations or MLD reports on its queues.
      writeFileSync('/proc/sys/net/ipv6/conf/default/disable_ipv6', '1');
    } catch {
      /* a kernel without IPv6 sends none anyway */
    }
    const nd = openNetdev({
      name: 'mqst%d',
      pairs: pairCount,
      vhost: 'on',
      up: true,
      mac: TAP_MAC,
      existing: 'forbid',
      ...(opts.devicePath !== undefined ? { vhostDevicePath: opts.devicePath } : {}),
      ...(opts.logger ? { logger: opts.logger } : {}),
    });
    try {
      ip(['addr', 'add', `${LOCAL}/24`, 'dev', nd.name]);
      ip(['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', nd.name, 'nud', 'permanent']);
      const drivers = nd.pairs.map((p) => nd.drive(p.index));
      const { pairs, unexpected } = await exchange(nd, drivers, frames, timeoutMs);
      return {
        ok: pairs.every((p) => p.ok),
        kernel: release(),
        devicePath: probe.devicePath,
        features: probe.features?.names ?? [],
        tap: nd.name,
        pairs,
        unexpected,
      };
    } finally {
      nd.close();
    }
  } finally {
    ns.restore();
  }
}

interface SelftestCliOpts {
  pairs: number;
  frames: number;
  json?: boolean;
}

async function cmdSelftest(o: SelftestCliOpts, g: GlobalOpts): Promise<number> {
  validateQueueCount(o.pairs, 'pairs');
  validateInt(o.frames, '--frames', 1, 128);
  const probe = probeVhostNet();
  if (!probe.usable) {
    const denied = probe.error?.code === 'EACCES' || probe.error?.code === 'EPERM';
    const message = `vhost-net is not available: ${probe.error?.message ?? 'unknown reason'}`;
    if (g.json) json({ ok: false, error: { ...probe.error, message } });
    process.stderr.write(`mqtap: ${message}\n`);
    if (probe.error?.hint) process.stderr.write(`hint: ${probe.error.hint}\n`);
    return denied ? EXIT.PERMISSION : EXIT.UNAVAILABLE;
  }
  const r = await runVhostSelftest({ pairs: o.pairs, frames: o.frames, logger: logger(g) }, probe);
  if (g.json) json(r);
  else {
    out(`vhost-net selftest: ${r.devicePath} on ${r.kernel}, tap ${r.tap}, ${r.pairs.length} pair(s), ${o.frames} frame(s) each way per pair`);
    out(`features offered: ${r.features.join(', ')}`);
    out(
      table(
        ['PAIR', 'TX_OK', 'RX_OK', 'TX_BYTES', 'RX_BYTES', 'RESULT'],
        r.pairs.map((p) => [
          p.pair,
          `${p.tx.ok}/${o.frames}`,
          `${p.rx.ok}/${o.frames}${p.rx.misrouted ? ` (+${p.rx.misrouted} on other pairs)` : ''}`,
          p.tx.bytes,
          p.rx.bytes,
          p.ok ? 'ok' : 'FAILED',
        ]),
      ),
    );
    if (r.unexpected) out(`${r.unexpected} frame(s) matched nothing that was sent`);
    out(r.ok ? 'all pairs passed' : 'some pairs FAILED');
  }
  return r.ok ? EXIT.OK : EXIT.FAILURE;
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('vhost-selftest')
    .description('drive every queue pair of a throw-away tap through /dev/vhost-net and move frames both ways (needs root)')
    .addOption(new Option('-p, --pairs <n>', 'queue pairs (1..256)').argParser(intArg('--pairs')).default(2))
    .addOption(new Option('-k, --frames <k>', 'frames each way per pair (1..128)').argParser(intArg('--frames')).default(8))
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      '\nRuns in a throw-away network namespace with link-local addresses; nothing is left behind.\n' +
        'Exit 0: every pair moved every frame both ways; 1: some did not; 5: /dev/vhost-net is missing\n' +
        '(hint: modprobe vhost_net); 4: no permission to open it.',
    )
    .action((o: SelftestCliOpts, cmd: Command) => ctx.run(() => cmdSelftest(o, ctx.globals(cmd)), ctx.globals(cmd)));
}
