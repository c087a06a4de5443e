/**
 * `mqtap demo`: the whole mission in one command, in throw-away network
 * namespaces.
 *
 * Host part (a second, needs only the tun driver): probe, open a
 * multi-queue tap, change the active queue count, move frames both ways on
 * every queue, hand the queues to a child, and clean up.
 *
 * Guest part (`--no-guest` skips it): open a 4-queue tap (vhost-net fds too
 * where the host has /dev/vhost-net), boot the small guest of vm/ through
 * launchQemu (what `mqtap launch` does) and show what the guest sees (queue
 * pairs, `ethtool -L`, pings both ways, traffic per queue) next to the host's
 * view of the tap at each step, then shut down and clean up.  Where QEMU,
 * busybox or the guest kernel is missing it says how to get them (`--fetch`
 * as root installs the packages; the kernel is fetched into the cache).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { appendFileSync, closeSync, mkdtempSync, openSync, readFileSync, writeSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Command } from 'commander';
import { MqtapError } from '../lib/sys/errors';
import { drainFrames, ethernetFrame, ETH_ZLEN, ETHERTYPE, IPPROTO } from '../lib/datapath/frames';
import {
  bootMqGuest,
  checkGuestRequirements,
  ensureGuestImage,
  hostPing,
  qemuBinary,
  type Checkpoint,
  type MqGuestReport,
  type PingResult,
} from '../lib/qemu/guest';
import { getLink, getTap } from '../lib/tap/links';
import { type Logger } from '../lib/sys/log';
import { native } from '../lib/sys/native';
import { openNetdev, type Netdev } from '../lib/vhost/netdev';
import { isolateNetns } from '../lib/sys/netns';
import { probeTun } from '../lib/tap/probe';
import { launchQemu, type LaunchedQemu } from '../lib/qemu/qemu';
import { spawnWithFds } from '../lib/sys/spawn';
import { openTap, type Tap } from '../lib/tap/tap';
import { validateQueueCount } from '../lib/sys/validate';
import { probeVhostNet } from '../lib/vhost/vhost';
import { EXIT, intArg, json, logger, out, type CliContext, type GlobalOpts } from './context';

export interface DemoStep {
  step: string;
  ok: boolean;
  /** The step could not run here (e.g. no QEMU); `detail.reason` and `detail.fix` say why and what to do. */
  skipped?: boolean;
  detail: Record<string, unknown>;
}

export interface DemoResult {
  tap: string;
  queues: number;
  steps: DemoStep[];
  /** The guest part, when it ran. */
  guest?: {
    tap: string;
    vhost: boolean;
    argv: string[];
    report: MqGuestReport;
    /** The host's view of the tap at each guest checkpoint. */
    checkpoints: Checkpoint[];
    hostViews: Record<string, { numQueues: number; numDisabledQueues: number } | null>;
    pingGuest: PingResult | null;
    qemuStatus: number | null;
    guestExitCode: number | null;
    durationMs: number;
  };
}

export interface DemoOptions {
  queues: number;
  log: (line: string) => void;
  /** Raw text to the terminal (partial lines: --fetch's progress); default: whole lines through `log`. */
  write?: (text: string) => void;
  logger: Logger;
  /** Run the guest part (default true). */
  guest?: boolean;
  /** As root, apt-get install what the guest part is missing (default false). */
  fetch?: boolean;
  /** Kill the guest after this long (default 300 000 ms). */
  guestTimeoutMs?: number;
}

const VNET_HDR = 10;

/** A minimum-size Ethernet frame (local experimental EtherType 0x88b5) to `dst`, tagged with the queue number, after a zeroed virtio-net header. */
function demoFrame(dst: string, queue: number): Buffer {
  const frame = ethernetFrame({
    dstMac: dst,
    srcMac: Buffer.from([0x02, 0, 0, 0, 0xde, queue]),
    etherType: ETHERTYPE.LOCAL_EXPERIMENTAL,
    payload: Buffer.from(`mqtap demo frame on queue ${queue}`),
    minLength: ETH_ZLEN,
  });
  return Buffer.concat([Buffer.alloc(VNET_HDR), frame]);
}

function describeFrame(frame: Buffer): string {
  const type = frame.readUInt16BE(12);
  // IPv6 next header at 14+6; ICMPv6 right after the 40-byte header, or after an 8-byte hop-by-hop header (MLD).
  if (type === ETHERTYPE.IPV6 && frame[20] === IPPROTO.ICMPV6) {
    const icmp = frame[54];
    const names: Record<number, string> = { 133: 'router solicitation', 135: 'neighbour solicitation', 143: 'MLDv2 report' };
    return `IPv6 ICMPv6 ${names[icmp ?? 0] ?? `type ${icmp}`}`;
  }
  if (type === ETHERTYPE.IPV6 && frame[20] === 0 && frame[62] === 143) return 'IPv6 MLDv2 report';
  if (type === ETHERTYPE.IPV6) return 'IPv6';
  if (type === ETHERTYPE.ARP) return 'ARP';
  return `EtherType 0x${type.toString(16)}`;
}

async function readFrames(tap: Tap, ms: number, want: number): Promise<Array<{ queue: number; what: string }>> {
  const got: Array<{ queue: number; what: string }> = [];
  const buf = Buffer.alloc(65536);
  for (const q of tap.openQueues()) native.setNonBlocking(q.fd, true);
  const deadline = Date.now() + ms;
  while (Date.now() < deadline && got.length < want) {
    for (const q of tap.openQueues()) drainFrames(q.fd, buf, (f) => void got.push({ queue: q.index, what: describeFrame(f.subarray(VNET_HDR)) }));
    await sleep(50);
  }
  return got;
}

/** The host-only part: the core in about a second. */
async function hostPart(opts: DemoOptions, result: DemoResult, step: StepFn): Promise<void> {
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

      const mac = tap.info()!.address!;
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
}

type StepFn = (name: string, ok: boolean, detail: Record<string, unknown>, line: string, extra?: { skipped?: boolean }) => void;

async function runDemo(opts: DemoOptions): Promise<DemoResult> {
  const { log } = opts;
  const result: DemoResult = { tap: '', queues: opts.queues, steps: [] };
  const step: StepFn = (name, ok, detail, line, extra) => {
    result.steps.push({ step: name, ok, ...(extra?.skipped ? { skipped: true } : {}), detail });
    log(`${extra?.skipped ? '–' : ok ? '✔' : '✘'} ${line}`);
  };
  await hostPart(opts, result, step);
  if (opts.guest !== false) {
    log('');
    // SIGINT/SIGTERM/SIGHUP during the guest part: stop the guest, clean up, then die of the signal.
    const interrupt: Interrupt = { signal: undefined, listeners: new Set() };
    const handlers = (['SIGINT', 'SIGTERM', 'SIGHUP'] as const).map((sig) => {
      const h = (): void => {
        interrupt.signal ??= sig;
        for (const l of interrupt.listeners) l();
      };
      process.on(sig, h);
      return [sig, h] as const;
    });
    try {
      await guestPart(opts, result, step, interrupt);
    } finally {
      for (const [sig, h] of handlers) process.off(sig, h);
    }
    if (interrupt.signal) process.kill(process.pid, interrupt.signal);
  }
  return result;
}

/** A signal that arrived during the guest part, and what to do about it at once. */
interface Interrupt {
  signal: NodeJS.Signals | undefined;
  listeners: Set<() => void>;
}

// ---------------------------------------------------------------------------
// Guest part

const HOST_IP = '169.254.77.1';
const GUEST_IP = '169.254.77.2';
const GUEST_MAC = '52:54:00:6d:71:01';
const GUEST_TOOLS = ['ethtool', 'ip'];

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

// ---------------------------------------------------------------------------
// --fetch: apt-get, one line per step; apt's own output goes to a log file.

/** One command run as a step of --fetch. */
export interface FetchStep {
  /** What the line says, e.g. 'apt-get update' or 'installing qemu-system-x86 busybox-static'. */
  label: string;
  argv: string[];
  env?: Record<string, string>;
  /** Kill it after this long (default 20 min). */
  timeoutMs?: number;
}

export interface FetchStepResult {
  ok: boolean;
  /** Exit status; null when killed (see signal) or when it could not start (see error). */
  status: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  error?: string;
  durationMs: number;
}

export interface FetchIo {
  /** The log file every step appends its command line and output to (kept afterwards). */
  logFile: string;
  /** Raw text to the terminal (partial lines allowed). */
  write: (text: string) => void;
  /** Lines of the log's tail shown when the fetch fails (default 20). */
  tailLines?: number;
  /** Seconds between progress dots while a step runs (default 5; 0: none). */
  dotEverySec?: number;
}

const seconds = (ms: number): string => (ms < 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`);

/**
 * Runs one step: `fetch: LABEL … ` (a dot every few seconds), then `ok (12 s)`
 * or `failed (exit 100, 3.4 s)` on the same line.  The command's stdout and
 * stderr go to the end of `io.logFile`, after a `$ argv` line; nothing of it
 * reaches the terminal.
 */
export async function runFetchStep(step: FetchStep, io: FetchIo): Promise<FetchStepResult> {
  const started = Date.now();
  appendFileSync(io.logFile, `\n$ ${step.argv.join(' ')}\n`);
  io.write(`fetch: ${step.label} … `);
  const fd = openSync(io.logFile, 'a');
  const dotMs = (io.dotEverySec ?? 5) * 1000;
  const dots = dotMs > 0 ? setInterval(() => io.write('.'), dotMs) : undefined;
  let r: Omit<FetchStepResult, 'durationMs' | 'ok'>;
  try {
    r = await new Promise((resolve) => {
      let timedOut = false;
      const child = spawn(step.argv[0]!, step.argv.slice(1), { stdio: ['ignore', fd, fd], env: { ...process.env, ...step.env } });
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, step.timeoutMs ?? 20 * 60_000);
      child.once('error', (err) => {
        clearTimeout(timer);
        resolve({ status: null, signal: null, timedOut, error: err.message });
      });
      child.once('close', (status, signal) => {
        clearTimeout(timer);
        resolve({ status, signal, timedOut });
      });
    });
  } finally {
    if (dots) clearInterval(dots);
    closeSync(fd);
  }
  const durationMs = Date.now() - started;
  const ok = r.status === 0;
  if (r.error) appendFileSync(io.logFile, `(could not run ${step.argv[0]}: ${r.error})\n`);
  const why = r.error ? `cannot run ${step.argv[0]}: ${r.error}` : r.timedOut ? 'timed out' : r.signal ? `killed by ${r.signal}` : `exit ${r.status}`;
  io.write(ok ? `ok (${seconds(durationMs)})\n` : `failed (${why}, ${seconds(durationMs)})\n`);
  return { ok, ...r, durationMs };
}

/** The last `n` lines of a file ('' if unreadable). */
function fileTail(file: string, n: number): string {
  return tail(readPartial(file), n);
}

/**
 * apt-get install `pkgs` as steps: install; if that fails, apt-get update and
 * install again.  Prints one line per step and, when it fails in the end, the
 * tail of the log with a hint.  `aptGet` is the command (tests pass a fake).
 */
export async function aptFetch(pkgs: string[], io: FetchIo, aptGet: string[] = ['apt-get']): Promise<{ ok: boolean; steps: Array<FetchStep & FetchStepResult> }> {
  const steps: Array<FetchStep & FetchStepResult> = [];
  const env = { DEBIAN_FRONTEND: 'noninteractive' };
  const run = async (s: FetchStep): Promise<boolean> => {
    const r = await runFetchStep(s, io);
    steps.push({ ...s, ...r });
    return r.ok;
  };
  const install: FetchStep = { label: `installing ${pkgs.join(' ')}`, argv: [...aptGet, 'install', '-y', '--no-install-recommends', ...pkgs], env };
  io.write(`fetch: apt-get output goes to ${io.logFile}\n`);
  const ok =
    (await run(install)) ||
    ((await run({ label: 'apt-get update', argv: [...aptGet, 'update'], env })) && (await run({ ...install, label: `${install.label} again` })));
  if (!ok) {
    const n = io.tailLines ?? 20;
    const body = fileTail(io.logFile, n)
      .split('\n')
      .map((l) => `  | ${l}`)
      .join('\n');
    io.write(
      `fetch: FAILED; the last ${n} lines of ${io.logFile}:\n${body}\n` +
        `  hint: read the whole log above; check the network and /etc/apt/sources.list*, then run \`apt-get update && apt-get install -y --no-install-recommends ${pkgs.join(' ')}\` by hand\n`,
    );
  }
  return { ok, steps };
}

/** A new log file for --fetch (in a fresh private temp dir, kept afterwards). */
function fetchLogFile(): string {
  return path.join(mkdtempSync(path.join(os.tmpdir(), 'mqtap-fetch-')), 'apt.log');
}

function qemuVersion(bin: string): string {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  return /version ([^\s(]+)/.exec(r.stdout ?? '')?.[1] ?? 'unknown';
}

function hostView(tap: string): { numQueues: number; numDisabledQueues: number } | null {
  const t = getTap(tap);
  return t ? { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues } : null;
}

const viewText = (v: { numQueues: number; numDisabledQueues: number } | null | undefined): string =>
  v ? `numqueues ${v.numQueues}, numdisabled ${v.numDisabledQueues}` : 'tap gone';

/** A raw writer on top of a line logger: text is held until its line is complete. */
function lineWriter(log: (line: string) => void): (text: string) => void {
  let held = '';
  return (text) => {
    held += text;
    const lines = held.split('\n');
    held = lines.pop()!;
    for (const l of lines) log(l);
  };
}

function readPartial(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

function tail(text: string, lines: number): string {
  return text.replace(/\r/g, '').trimEnd().split('\n').slice(-lines).join('\n');
}

/** The guest part.  Everything it creates is gone when it returns (netns, tap, QEMU, temp dir). */
async function guestPart(opts: DemoOptions, result: DemoResult, step: StepFn, interrupt: Interrupt): Promise<void> {
  const { log } = opts;
  const n = opts.queues;
  const required = process.env.MQTAP_VM_REQUIRED === '1';

  // 1. What the guest needs.
  let req = checkGuestRequirements({ tools: GUEST_TOOLS });
  let fetched = false;
  let fetchLog: string | undefined;
  if (!req.ok && req.aptPackages.length && opts.fetch) {
    if (!isRoot()) log(`  --fetch needs root to run: ${req.fix}`);
    else if ((await aptFetch(req.aptPackages, { logFile: (fetchLog = fetchLogFile()), write: opts.write ?? lineWriter(log) })).ok) {
      fetched = true;
      req = checkGuestRequirements({ tools: GUEST_TOOLS });
    }
  }
  if (!req.ok) {
    const fix = fetched
      ? `still missing after apt-get install; set MQTAP_VM_QEMU or PATH, or see vm/README.md`
      : fetchLog
        ? `${req.fix}   (--fetch failed: apt-get's output is in ${fetchLog})`
        : req.aptPackages.length
          ? `${req.fix}   (or: ${isRoot() ? '' : 'as root, '}mqtap demo --fetch)`
        : (req.fix ?? 'see vm/README.md');
    step(
      'guest',
      !required,
      { reason: req.reason, fix, missing: req.items.filter((i) => !i.ok).map((i) => i.what), required, ...(fetchLog ? { fetchLog } : {}) },
      `guest part not run: ${req.reason}\n    to get it: ${fix}${required ? '\n    (MQTAP_VM_REQUIRED=1: this is a failure)' : ''}`,
      required ? {} : { skipped: true },
    );
    return;
  }
  const vhostProbe = probeVhostNet();
  const vhost = vhostProbe.usable;
  if (req.image === 'buildable') log(`  fetching the guest kernel and building the initramfs (first run only, ~70 MB download, cached): vm/build.sh`);
  let image;
  try {
    image = await ensureGuestImage({ onProgress: (l) => log(`    ${l}`) });
  } catch (err) {
    step('guest', false, { reason: (err as Error).message }, `cannot build the guest image: ${(err as Error).message.split('\n')[0]}\n    see: bash ${path.join('vm', 'build.sh')}`);
    return;
  }
  const qver = qemuVersion(qemuBinary());
  step(
    'guest-check',
    true,
    { qemu: qemuBinary(), qemuVersion: qver, kernel: image.kernelVersion, image, hostVhostNet: vhost, vhostReason: vhostProbe.error?.message },
    `guest: Debian kernel ${image.kernelVersion ?? '?'} under QEMU ${qver} (TCG, no KVM needed); vhost-net on this host: ${
      vhost ? 'yes, so QEMU gets vhost fds too' : `no (${vhostProbe.error?.code ?? 'unavailable'}), so vhost off: QEMU's own virtio-net backend moves the frames`
    }`,
  );

  const checkInterrupt = (): void => {
    if (interrupt.signal) throw new Error(`interrupted by ${interrupt.signal}`);
  };
  if (interrupt.signal) {
    step('guest', false, { interrupted: interrupt.signal }, `interrupted by ${interrupt.signal} before the guest started`);
    return;
  }

  // 2. A fresh namespace, the tap, QEMU.
  const ns = isolateNetns();
  let nd: Netdev | undefined;
  let launched: LaunchedQemu | undefined;
  const started = Date.now();
  try {
    nd = openNetdev({ name: 'mqdemo%d', pairs: n, vhost: vhost ? 'on' : 'off', up: true, logger: opts.logger });
    const tap = nd.name;
    execFileSync('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', tap], { stdio: ['ignore', 'ignore', 'pipe'] });
    checkInterrupt();
    const hostViews: Record<string, { numQueues: number; numDisabledQueues: number } | null> = { opened: hostView(tap) };
    let pingGuest: PingResult | null = null;
    let hostStats: { rxPackets: number; txPackets: number } | undefined;
    let qemuErr = '';

    // Every checkpoint: the guest stopped after a change; look at the tap from here.
    const onCheckpoint = async (cp: Checkpoint, report: () => MqGuestReport): Promise<string> => {
      const view = hostView(tap);
      hostViews[cp.name] = view;
      const so = report();
      if (cp.name === 'boot') {
        const nic = so.nics[0];
        const ok = !!nic && nic.driver === 'virtio_net' && nic.maxCombined === n && view?.numQueues === nic.combined && view?.numDisabledQueues === n - (nic.combined ?? 0);
        step(
          'guest-boot',
          ok,
          { nic, cpus: so.cpus, host: view, bootMs: cp.atMs },
          nic
            ? `guest booted (${(cp.atMs / 1000).toFixed(1)} s): ${nic.name} (${nic.driver}, ${nic.mac}) has ${nic.maxCombined} queue pairs, ${nic.combined} in use ` +
                `(the driver takes one per vCPU: ${so.cpus}); host's view of ${tap}: ${viewText(view)} (QEMU detached the pairs the guest does not use)`
            : `the guest has no virtio-net NIC (host's view: ${viewText(view)})`,
        );
      } else if (cp.name.startsWith('combined-')) {
        const want = Number(cp.name.slice('combined-'.length));
        const set = so.setChannels.find((s) => s.want === want);
        const ok = set?.rc === 0 && set.combined === want && view?.numQueues === want && view.numDisabledQueues === n - want;
        step(
          `ethtool-L-${want}`,
          ok,
          { want, guest: set, host: view },
          `guest: ethtool -L ${so.nics[0]?.name ?? 'eth0'} combined ${want} -> ${set ? `exit ${set.rc}, ${set.combined} in use` : 'no answer'}; host's view: ${viewText(view)}`,
        );
      } else if (cp.name === 'addr') {
        pingGuest = await hostPing(GUEST_IP, { count: 3, deadlineSec: 30 });
      } else if (cp.name === 'traffic') {
        const st = getTap(tap)?.stats;
        if (st) hostStats = { rxPackets: st.rxPackets, txPackets: st.txPackets };
      }
      return `host: ${viewText(view)}`;
    };

    const timeoutMs = opts.guestTimeoutMs ?? 300_000;
    const boot = await bootMqGuest({
      mq: { hostIp: HOST_IP, guestIp: GUEST_IP },
      resultsPrefix: 'mqtap-demo-',
      timeoutMs,
      onCheckpoint,
      start: (args) => {
        checkInterrupt();
        const l = launchQemu({
          netdevs: [{ netdev: nd!, options: { id: 'net0', mac: GUEST_MAC, deviceProps: { romfile: '' } } }],
          qemu: [qemuBinary(), ...args],
          stdio: 'pipe',
          killWithParent: true,
          logger: opts.logger,
        });
        launched = l;
        nd = undefined; // launchQemu owns it now
        // (the signal itself is relayed to QEMU by launchQemu; make sure it does not linger)
        interrupt.listeners.add(() => void setTimeout(() => l.child.kill('SIGKILL'), 10_000).unref());
        l.child.stdout?.resume();
        l.child.stderr?.on('data', (d: Buffer) => (qemuErr += d.toString()));
        const p = l.plan.netdevs[0]!;
        step(
          'launch',
          l.pid !== undefined,
          { tap, pid: l.pid, fds: p.fds, vhostfds: p.vhostfds, vhost, netdev: p.netdevArg, device: p.deviceArg, argv: l.plan.argv, host: hostViews.opened },
          `launched QEMU (pid ${l.pid}) with ${tap}'s ${n} queues as fds ${p.fds.join(':')}${p.vhostfds.length ? ` and vhost fds ${p.vhostfds.join(':')}` : ''}:\n` +
            `      -netdev ${p.netdevArg}\n      -device ${p.deviceArg}\n    host side: ${tap} has ${HOST_IP}/24 (link-local, this namespace only); booting the guest (QEMU TCG: ~10-40 s) ...`,
        );
        return l;
      },
    });
    const qemu = launched!;
    const status = (await qemu.exited).status;
    const timedOut = boot.timedOut;
    if (interrupt.signal) {
      const gone = getTap(tap) === undefined;
      step('guest', false, { interrupted: interrupt.signal, qemuStatus: status, tapGone: gone }, `interrupted by ${interrupt.signal}: QEMU stopped (status ${status}); ${tap} ${gone ? 'is gone' : 'is STILL THERE'}; cleaning up`);
      return;
    }
    const so = boot.report;
    const guestExit = boot.guestExitCode;
    const consoleTail = tail(boot.console, 25);
    const seen = new Set(result.steps.map((s) => s.step));
    const diag = { console: consoleTail, guestStderr: tail(boot.stderr, 20), qemuStderr: tail(qemuErr, 10), timedOut };
    if (!seen.has('guest-boot')) step('guest-boot', false, diag, `the guest did not get to its first checkpoint${timedOut ? ` within ${timeoutMs / 1000} s` : ''}; console:\n${consoleTail}`);

    // Pings both ways.
    const pg = pingGuest as PingResult | null;
    const ph = so.pingHost;
    step(
      'ping',
      !!ph && ph.received > 0 && !!pg && pg.received > 0,
      { guestToHost: ph, hostToGuest: pg && { sent: pg.sent, received: pg.received } },
      `ping guest -> host ${HOST_IP}: ${ph ? `${ph.received}/${ph.sent}` : 'not run'}; host -> guest ${GUEST_IP}: ${pg ? `${pg.received}/${pg.sent}` : 'not run'}`,
    );

    // Traffic per queue pair, as the guest counted it.
    const both = so.queues.filter((q) => q.rxPackets > 0 && q.txPackets > 0).length;
    const rxQ = so.queues.filter((q) => q.rxPackets > 0).length;
    const txQ = so.queues.filter((q) => q.txPackets > 0).length;
    const flows = so.flows.map((f) => f.attempts).reduce((a, b) => a + b, 0);
    const table = so.queues.map((q) => `      ${String(q.queue).padStart(5)}  ${String(q.rxPackets).padStart(10)}  ${String(q.txPackets).padStart(10)}`).join('\n');
    const hs = hostStats as { rxPackets: number; txPackets: number } | undefined;
    step(
      'queues',
      rxQ > 1 && txQ > 1,
      { queues: so.queues, flows: so.flows, queuesWithRx: rxQ, queuesWithTx: txQ, host: hostViews.traffic, hostTapStats: hs },
      `traffic per queue pair in the guest (ethtool -S; ${flows} TCP flows from ${so.flows.length} vCPU(s), pinned with taskset; XPS maps vCPU -> TX queues, the tap answers on the flow's queue):\n` +
        `      queue  rx_packets  tx_packets\n${table || '      (no counters)'}\n    ${both} of ${so.queues.length} queue pairs carried traffic both ways` +
        (hs ? `; host's view of ${tap} (all queues): rx ${hs.rxPackets}, tx ${hs.txPackets} packets` : ''),
    );

    // Shutdown and cleanup.
    const gone = getTap(tap) === undefined;
    const durationMs = Date.now() - started;
    step(
      'shutdown',
      status === 0 && guestExit === 0 && so.done && gone,
      { qemuStatus: status, guestExitCode: guestExit, failures: so.failures, syncTimeouts: so.syncTimeouts, tapGone: gone, durationMs, ...(status === 0 && guestExit === 0 ? {} : diag) },
      `guest powered off (${so.failures.length ? `failures: ${so.failures.join('; ')}` : 'its script passed every step'}); QEMU exited ${status === null ? 'abnormally' : `with status ${status}`} after ${(durationMs / 1000).toFixed(1)} s; ` +
        `closed every fd: ${tap} ${gone ? 'is gone' : 'is STILL THERE'}` +
        (status === 0 ? '' : `\n    QEMU stderr: ${tail(qemuErr, 5) || '(none)'}\n    console:\n${consoleTail}`),
    );
    result.guest = {
      tap,
      vhost,
      argv: qemu.plan.argv,
      report: so,
      checkpoints: boot.checkpoints,
      hostViews,
      pingGuest: pg,
      qemuStatus: status,
      guestExitCode: guestExit,
      durationMs,
    };
  } catch (err) {
    if (interrupt.signal) step('guest', false, { interrupted: interrupt.signal }, `interrupted by ${interrupt.signal}; cleaning up`);
    else step('guest', false, { error: err instanceof MqtapError ? err.toJSON() : String(err) }, `guest part failed: ${(err as Error).message}`);
  } finally {
    // bootMqGuest has stopped QEMU and removed its results dir, whatever happened.
    try {
      nd?.close();
    } catch {
      /* closing a netdev launchQemu did not take */
    }
    ns.restore();
  }
}

// ---------------------------------------------------------------------------
// The command

export interface DemoCmdOpts {
  queues: number;
  guest: boolean;
  fetch?: boolean;
  guestTimeout: number;
  json?: boolean;
}

async function cmdDemo(o: DemoCmdOpts, g: GlobalOpts): Promise<number> {
  validateQueueCount(o.queues);
  const r = await runDemo({
    queues: o.queues,
    guest: o.guest,
    fetch: !!o.fetch,
    guestTimeoutMs: o.guestTimeout * 1000,
    log: g.json ? () => undefined : out,
    write: g.json ? () => undefined : (text) => void process.stdout.write(text),
    logger: logger(g),
  });
  if (g.json) json(r);
  const ok = r.steps.every((s) => s.ok);
  const skipped = r.steps.filter((s) => s.skipped);
  if (!g.json) {
    if (!ok) out('\nsome steps FAILED');
    else if (skipped.length) out(`\nthe host part passed; the guest part was skipped (${String(skipped[0]!.detail.reason)})`);
    else out('\nall steps passed');
  }
  return ok ? EXIT.OK : EXIT.FAILURE;
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('demo')
    .description('show the whole thing working, in throw-away network namespaces: a multi-queue tap, then a guest booted through launch (needs root)')
    .option('-q, --queues <n>', 'queue pairs', intArg('--queues'), 4)
    .option('--no-guest', 'host part only (no QEMU)')
    .option('--fetch', 'as root, apt-get install what the guest part is missing (qemu-system-x86 busybox-static ethtool) first')
    .option('--guest-timeout <seconds>', 'stop the guest after this long', intArg('--guest-timeout'), 300)
    .option('--json', 'every step with ok and detail, as JSON')
    .action((o: DemoCmdOpts, cmd: Command) => ctx.run(() => cmdDemo(o, ctx.globals(cmd)), ctx.globals(cmd)));
}
