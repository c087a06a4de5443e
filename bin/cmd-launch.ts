/**
 * `mqtap launch`: open (or create) a multi-queue tap (+ vhost-net fds) and
 * start QEMU with them, the way libvirt does: `-netdev tap,fds=...,vhostfds=...`
 * with the fds mapped into the child and nothing else inherited.  See
 * docs/launch.md.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { invalidArg } from '../lib/sys/errors';
import { spawnWithFds } from '../lib/sys/spawn';
import { openTap, type Tap } from '../lib/tap/tap';
import { serveVhostUser } from '../lib/vhost-user/backend';
import type { PairsState } from '../lib/vhost-user/connection';
import { getTap } from '../lib/tap/links';
import { openNetdev, type Netdev, type VhostMode } from '../lib/vhost/netdev';
import { withNetns } from '../lib/sys/netns';
import { assertExecutable, kvmUsable, launchQemu, pdeathsigWrapper, planLaunch, planVhostUserLaunch, validateQemuId, type VhostUserLaunchPlan, type LaunchPlan, type NetdevFds, type QemuNetdevOptions } from '../lib/qemu/qemu';
import { isTemplate, parseMac, validateIfName, validateQueueCount } from '../lib/sys/validate';
import { probeVhostNet } from '../lib/vhost/vhost';
import { EXIT, intArg, json, logger, netnsOpt, out, type CliContext, type GlobalOpts } from './context';

interface LaunchOpts {
  backend: 'tap' | 'vhost-user';
  name: string;
  queues: number;
  vhost: VhostMode;
  id: string;
  mac?: string;
  model: string;
  deviceProp: Record<string, string>;
  active?: number;
  dryRun?: boolean;
  existing: 'allow' | 'require' | 'forbid';
  persist?: boolean;
  json?: boolean;
}

function shellQuote(a: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

function devicePropArg(value: string, prev: Record<string, string>): Record<string, string> {
  const eq = value.indexOf('=');
  if (eq <= 0) throw new InvalidArgumentError('expected KEY=VALUE, e.g. romfile=efi-virtio.rom');
  return { ...prev, [value.slice(0, eq)]: value.slice(eq + 1) };
}

function summary(plan: LaunchPlan, vhost: boolean): Record<string, unknown> {
  const n = plan.netdevs[0]!;
  return { tap: n.ifname, id: n.id, queues: n.fds.length, fds: n.fds, vhostfds: n.vhostfds, vhost, argv: plan.argv };
}

/** Checks everything that needs no kernel before anything is opened. */
function validate(qemu: string[], o: LaunchOpts): QemuNetdevOptions {
  validateIfName(o.name, '--name', { template: true });
  validateQueueCount(o.queues, '--queues');
  validateQemuId(o.id);
  if (o.mac !== undefined) parseMac(o.mac);
  if (o.active !== undefined) {
    if (o.active < 1 || o.active > o.queues) throw invalidArg(`--active ${o.active}: must be 1..${o.queues} (--queues)`);
    if (o.active !== o.queues)
      throw invalidArg(
        `--active ${o.active} < --queues ${o.queues}: QEMU must be handed every queue enabled`,
        'QEMU detaches the queue pairs the guest does not use by itself (at device reset) and re-attaches them when the guest asks (ethtool -L); ' +
          'a queue that is already detached makes QEMU abort ("could not disable queue"). Leave --active out; see docs/launch.md',
      );
  }
  if (!qemu.length || !qemu[0]) throw invalidArg('no QEMU command given', 'put it after --: mqtap launch --queues 4 -- qemu-system-x86_64 ...');
  return { id: o.id, model: o.model, deviceProps: { romfile: '', ...o.deviceProp }, ...(o.mac !== undefined ? { mac: o.mac } : {}) };
}

/** A stand-in netdev with `pairs` placeholder fds, to plan a launch before (or without) opening anything. */
function fakeNetdev(name: string, pairs: number, vhost: boolean): NetdevFds & { close(): void } {
  return {
    name: isTemplate(name) ? name.replace('%d', '0') : name,
    tapFds: () => Array.from({ length: pairs }, (_, i) => 1000 + i),
    vhostFds: () => (vhost ? Array.from({ length: pairs }, (_, i) => 2000 + i) : []),
    close: () => undefined,
  };
}

async function cmdLaunch(qemu: string[], o: LaunchOpts, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  const devOpts = validate(qemu, o);
  if (o.backend === 'vhost-user') return cmdLaunchVhostUser(qemu, o, g, devOpts);
  // Plan with stand-in fds first: argument mistakes are found before any tap exists.
  const guessVhost = o.vhost === 'on' || (o.vhost === 'auto' && withNetns(g.netns, () => probeVhostNet()).usable);
  const dry = planLaunch({ netdevs: [{ netdev: fakeNetdev(o.name, o.queues, guessVhost), options: { ...devOpts, verifyFds: false } }], qemu });
  if (o.dryRun) {
    if (g.json) json({ dryRun: true, ...summary(dry, guessVhost), warnings: dry.warnings });
    else {
      for (const w of dry.warnings) process.stderr.write(`mqtap: warning: ${w}\n`);
      if (isTemplate(o.name)) process.stderr.write(`mqtap: dry run: the tap name is picked when it is created (${o.name})\n`);
      out(dry.argv.map(shellQuote).join(' '));
    }
    return EXIT.OK;
  }

  assertExecutable(qemu[0]!);
  const nd: Netdev = openNetdev({
    name: o.name,
    pairs: o.queues,
    // auto: decided by the probe above, so the summary line says it once.
    vhost: o.vhost === 'auto' ? (guessVhost ? 'on' : 'off') : o.vhost,
    existing: o.existing,
    ...(o.persist ? { persist: true } : {}),
    ...netnsOpt(g),
    logger: log,
  });
  const ifname = nd.name;
  // launchQemu owns nd from here: it closes it on every failure and after QEMU exits.
  const launched = launchQemu({ netdevs: [{ netdev: nd, options: devOpts }], qemu, logger: log, killWithParent: true });
  const started = Date.now();
  const vhostNote = nd.vhost ? 'vhost on' : o.vhost === 'off' ? 'vhost off' : 'vhost off: /dev/vhost-net is not usable here';
  if (g.json) process.stderr.write(`${JSON.stringify({ event: 'started', pid: launched.pid, ...summary(launched.plan, nd.vhost) })}\n`);
  else process.stderr.write(`mqtap: ${ifname}: ${o.queues} queue pair(s), ${vhostNote}; starting: ${launched.plan.argv.map(shellQuote).join(' ')}\n`);

  const st = await launched.exited;
  const after = getTap(ifname, netnsOpt(g));
  const tapState = after ? `${ifname} stays (persistent, ${after.tun.numQueues + after.tun.numDisabledQueues} queue(s) attached)` : `${ifname} is gone`;
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  if (g.json) process.stderr.write(`${JSON.stringify({ event: 'exited', pid: launched.pid, tap: ifname, code: st.code, signal: st.signal, status: st.status, seconds: Number(secs), tapGone: !after })}\n`);
  else if (st.status !== 0 || g.debug)
    process.stderr.write(`mqtap: ${qemu[0]} ${st.signal ? `was killed by ${st.signal}` : `exited with status ${st.code}`} after ${secs} s; closed its queues: ${tapState}\n`);
  return st.status;
}

function vhostUserSummary(plan: VhostUserLaunchPlan, o: LaunchOpts, tap: string, socket: string): Record<string, unknown> {
  return { backend: 'vhost-user', tap, id: o.id, queues: o.queues, socket, accel: plan.accel, memBytes: plan.memBytes, argv: plan.argv };
}

/**
 * --backend vhost-user: this process serves the tap as QEMU's vhost-user
 * backend (serveVhostUser, in-process) on a socket in a private temp dir
 * (0700), and QEMU gets a shared memfd for guest RAM, the chardev (reconnect=1)
 * and -netdev vhost-user (lib/qemu/qemu.ts planVhostUserLaunch).  When QEMU
 * exits: the backend stops (rings, mappings), the tap closes, the dir goes.
 */
async function cmdLaunchVhostUser(qemu: string[], o: LaunchOpts, g: GlobalOpts, devOpts: QemuNetdevOptions): Promise<number> {
  const log = logger(g);
  if (o.vhost === 'on') throw invalidArg('--vhost on: vhost-net fds are for --backend tap; with --backend vhost-user mqtap itself is the backend');
  const kvm = kvmUsable();
  const planFor = (socket: string): VhostUserLaunchPlan =>
    planVhostUserLaunch({ qemu, socket, queues: o.queues, id: o.id, model: o.model, kvmUsable: kvm, ...(devOpts.deviceProps ? { deviceProps: devOpts.deviceProps } : {}), ...(o.mac !== undefined ? { mac: o.mac } : {}) });
  // Planned with a stand-in socket path first: argument mistakes are found before anything exists.
  const dry = planFor(path.join(tmpdir(), 'mqtap-launch-XXXXXX', 'vu.sock'));
  const tapName = isTemplate(o.name) ? o.name.replace('%d', '0') : o.name;
  if (o.dryRun) {
    if (g.json) json({ dryRun: true, ...vhostUserSummary(dry, o, tapName, path.join(tmpdir(), 'mqtap-launch-XXXXXX', 'vu.sock')), warnings: dry.warnings });
    else {
      for (const w of dry.warnings) process.stderr.write(`mqtap: warning: ${w}\n`);
      process.stderr.write(`mqtap: dry run: the socket is created in a private temp dir at launch${isTemplate(o.name) ? `; the tap name is picked when it is created (${o.name})` : ''}\n`);
      out(dry.argv.map(shellQuote).join(' '));
    }
    return EXIT.OK;
  }
  assertExecutable(qemu[0]!);
  for (const w of dry.warnings) log.warn(w);
  const report = (event: string, data: Record<string, unknown>, text: string): void => {
    if (g.json) process.stderr.write(`${JSON.stringify({ event, ...data })}\n`);
    else if (g.debug) process.stderr.write(`mqtap: ${text}\n`);
  };
  const dir = mkdtempSync(path.join(tmpdir(), 'mqtap-launch-'));
  let tap: Tap | undefined;
  let be: Awaited<ReturnType<typeof serveVhostUser>> | undefined;
  const cleanup = async (): Promise<void> => {
    try {
      await be?.close();
    } finally {
      try {
        tap?.close();
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  };
  let plan: VhostUserLaunchPlan;
  let spawned: ReturnType<typeof spawnWithFds>;
  try {
    const socket = path.join(dir, 'vu.sock');
    plan = planFor(socket);
    tap = openTap({ name: o.name, queues: o.queues, vnetHdr: true, existing: o.existing, ...(o.persist ? { persist: true } : {}), ...netnsOpt(g), logger: log });
    be = await serveVhostUser({ socket, tap, queues: o.queues, logger: log });
    be.on('connected', (peer: { pid: number; uid: number }) => report('connected', { peer }, `QEMU connected (pid ${peer.pid})`));
    be.on('pairs', (s: PairsState) => report('pairs', { ...s }, `pairs: tap queues attached [${s.enabled.join(',')}], running [${s.live.join(',')}]`));
    be.on('disconnected', (d: { reason?: string }) => report('disconnected', { reason: d.reason ?? null }, `QEMU disconnected${d.reason ? `: ${d.reason}` : ''}`));
    const wrapper = pdeathsigWrapper('SIGKILL');
    spawned = spawnWithFds({ argv: [...wrapper, ...plan.argv], fds: [], stdio: 'inherit' });
  } catch (err) {
    await cleanup();
    throw err;
  }
  const started = Date.now();
  const ifname = tap.name;
  const socket = be.socket;
  if (g.json) process.stderr.write(`${JSON.stringify({ event: 'started', pid: spawned.child.pid, ...vhostUserSummary(plan, o, ifname, socket) })}\n`);
  else process.stderr.write(`mqtap: ${ifname}: ${o.queues} queue pair(s), vhost-user backend on ${socket} (${plan.accel}); starting: ${plan.argv.map(shellQuote).join(' ')}\n`);
  let st;
  try {
    st = await spawned.exited;
  } finally {
    await cleanup();
  }
  const after = getTap(ifname, netnsOpt(g));
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  if (g.json) process.stderr.write(`${JSON.stringify({ event: 'exited', pid: spawned.child.pid, tap: ifname, code: st.code, signal: st.signal, status: st.status, seconds: Number(secs), tapGone: !after, connections: be.connections })}\n`);
  else if (st.status !== 0 || g.debug)
    process.stderr.write(`mqtap: ${qemu[0]} ${st.signal ? `was killed by ${st.signal}` : `exited with status ${st.code}`} after ${secs} s; backend stopped after ${be.connections} connection(s), ${ifname} ${after ? 'stays (persistent)' : 'is gone'}\n`);
  return st.status;
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('launch')
    .description('open (or create) a multi-queue tap and its vhost-net fds and start QEMU with them')
    .argument('<qemu...>', 'the QEMU command line, after --')
    .addOption(new Option('--backend <kind>', 'tap: hand QEMU the tap (and vhost-net) fds; vhost-user: serve the tap as QEMU\'s vhost-user backend from this process').choices(['tap', 'vhost-user']).default('tap'))
    .option('-n, --name <tap>', 'tap name or template', 'mqt%d')
    .option('-q, --queues <n>', 'queue pairs (1..256)', intArg('--queues'), 1)
    .addOption(new Option('--vhost <mode>', 'vhost-net fds: on (required), off, auto (when /dev/vhost-net is usable)').choices(['on', 'off', 'auto']).default('auto'))
    .option('--id <id>', 'QEMU netdev id', 'net0')
    .option('--mac <mac>', 'guest MAC address')
    .option('--model <model>', 'QEMU device model', 'virtio-net-pci')
    .option('--device-prop <key=value>', 'extra -device property (repeatable; default romfile= : no PXE option ROM)', devicePropArg, {})
    .option('-a, --active <k>', 'only --active N (= --queues) is accepted: QEMU must get every queue enabled (see docs/launch.md)', intArg('--active'))
    .addOption(new Option('--existing <policy>', 'if the tap exists').choices(['allow', 'require', 'forbid']).default('allow'))
    .option('--persist', 'create the tap persistent (it stays after QEMU exits)')
    .option('--dry-run', 'print the final QEMU command line and open nothing')
    .option('--json', "machine-readable: the plan on stdout with --dry-run; otherwise JSON lines on stderr (stdout stays QEMU's)")
    .addHelpText(
      'after',
      '\nmqtap appends -netdev tap,id=ID,fds=...[,vhost=on,vhostfds=...] and -device virtio-net-pci,netdev=ID,mq=on,vectors=2N+2\n' +
        "unless ARGS already contain them: write fds='${MQTAP_FDS_NET0}' (and vhostfds='${MQTAP_VHOSTFDS_NET0}') in your own -netdev\n" +
        '(single quotes: the shell must not expand them), or your own -device ...,netdev=ID.  QEMU gets exactly stdio and these\n' +
        "fds; SIGINT/SIGTERM/SIGHUP are relayed; QEMU is killed if mqtap is; mqtap exits with QEMU's status and closes the tap.\n\n" +
        'With --backend vhost-user mqtap serves the tap itself on a socket in a private temp dir and appends\n' +
        '-object memory-backend-memfd,id=mqtap-mem,size=<-m>,share=on -numa node,memdev=mqtap-mem, -chardev socket,...,reconnect=1,\n' +
        '-netdev vhost-user,...,queues=N and -device virtio-net-pci,netdev=ID,mq=on,vectors=0 (TCG) or 2N+2 (KVM); see docs/vhost-user.md.\n\n' +
        'Example: mqtap launch --queues 4 -- qemu-system-x86_64 -m 1G -nographic -kernel bzImage ...',
    )
    .action((qemu: string[], o: LaunchOpts, cmd: Command) => ctx.run(() => cmdLaunch(qemu, o, ctx.globals(cmd)), ctx.globals(cmd)));
}
