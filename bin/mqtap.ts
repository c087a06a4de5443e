#!/usr/bin/env node
/**
 * mqtap: the command-line face of the library.  Human tables by default,
 * --json for scripts, exit codes that mean something (docs/cli.md), and no
 * stack trace for a user error unless --debug.
 */
import './addon-check'; // first: a missing addon is reported as a user error, not a stack trace
import { Command, CommanderError, Option } from 'commander';
import { MqtapError } from '../lib/sys/errors';
import { getLink, isTapLink, listTaps, type TapLinkInfo } from '../lib/tap/links';
import { probeTun } from '../lib/tap/probe';
import { spawnWithFds } from '../lib/sys/spawn';
import { openNetdev, type VhostMode } from '../lib/vhost/netdev';
import { deleteTap, openTap, requireMultiQueueTap, type ExistingPolicy } from '../lib/tap/tap';
import { probeVhostNet } from '../lib/vhost/vhost';
import { register as registerDemo } from './demo';
import { EXIT, childFds, exitCodeFor, hdrSizeArg, intArg, json, logger, netnsOpt, out, version, type CliContext, type GlobalOpts, type Runner } from './context';
import { register as registerVhost } from './cmd-vhost';
import { register as registerLaunch } from './cmd-launch';
import { register as registerDaemon, routeGlobalSocket } from './cmd-daemon';
import { register as registerData } from './cmd-data';
import { register as registerVhostUser } from './cmd-vhost-user';
import { keyValues, table } from './format';

export { EXIT, exitCodeFor };
import { resolveId } from './ids';

const TAP_HEADERS = ['NAME', 'TYPE', 'MQ', 'VNET_HDR', 'PERSIST', 'OWNER', 'GROUP', 'QUEUES', 'DISABLED', 'MTU', 'MAC', 'STATE'];

function tapRow(t: TapLinkInfo): Array<string | number | boolean | null> {
  return [
    t.name,
    t.tun.type,
    t.tun.multiQueue,
    t.tun.vnetHdr,
    t.tun.persist,
    t.tun.owner,
    t.tun.group,
    t.tun.numQueues,
    t.tun.numDisabledQueues,
    t.mtu,
    t.address,
    t.up ? t.operstate : 'down',
  ];
}

function cmdFeatures(g: GlobalOpts): number {
  const p = probeTun();
  const v = probeVhostNet();
  if (g.json) json({ tun: p, vhostNet: v });
  else {
    const f = p.features;
    out(
      keyValues([
        ['kernel', p.kernel],
        ['/dev/net/tun', p.available ? 'ok' : `unavailable (${p.error?.code ?? 'unknown'})`],
        ['tap (IFF_TAP)', f?.tap],
        ['multi-queue (IFF_MULTI_QUEUE)', f?.multiQueue],
        ['virtio-net header (IFF_VNET_HDR)', f?.vnetHdr],
        ['no packet info (IFF_NO_PI)', f?.noPi],
        ['NAPI (IFF_NAPI)', f?.napi],
        ['no carrier (IFF_NO_CARRIER)', f?.noCarrier],
        ['max queues per tap', p.maxQueues],
        ['vnet header sizes', p.vnetHdrSizes.join(', ')],
        ['offloads', p.offloads.join(', ')],
        ['multi-queue taps usable', p.multiQueueTap],
        ['/dev/vhost-net', v.usable ? 'ok' : `unavailable (${v.error?.code ?? 'unknown'})`],
        ['vhost-net features', v.features ? `${v.features.hex} ${v.features.names.join(' ')}` : null],
        ['vhost backend features', v.backendFeatures ? v.backendFeatures.names.join(' ') || v.backendFeatures.hex : null],
      ]),
    );
    // Part of the report, so on stdout: after the table and a blank line, never
    // glued to its last row however stdout and stderr are captured.
    if (!v.usable && v.error?.hint) out(`\nnote: vhost-net is optional (mqtap launch --vhost auto goes on without it); to use it: ${v.error.hint}`);
  }
  if (p.multiQueueTap) return EXIT.OK;
  const why = p.error
    ? { message: `multi-queue taps are not usable here: ${p.error.message}`, hint: p.error.hint }
    : {
        message: `multi-queue taps are not usable here: the tun driver lacks ${[lacking(p, 'tap', 'IFF_TAP'), lacking(p, 'multiQueue', 'IFF_MULTI_QUEUE'), lacking(p, 'vnetHdr', 'IFF_VNET_HDR'), lacking(p, 'noPi', 'IFF_NO_PI')].filter(Boolean).join(', ')}`,
        hint: 'multi-queue taps need Linux 3.8 or later',
      };
  process.stderr.write(`mqtap: ${why.message}\nhint: ${why.hint ?? 'load the tun driver (`modprobe tun`)'}\n`);
  return p.error?.code === 'EACCES' || p.error?.code === 'EPERM' ? EXIT.PERMISSION : EXIT.UNAVAILABLE;
}

/** The flag's name when TUNGETFEATURES did not offer it. */
function lacking(p: ReturnType<typeof probeTun>, key: 'tap' | 'multiQueue' | 'vnetHdr' | 'noPi', flag: string): string | undefined {
  return p.features?.[key] ? undefined : flag;
}

interface CreateOpts {
  queues: number;
  owner?: string;
  group?: string;
  mtu?: number;
  txqueuelen?: number;
  mac?: string;
  up?: boolean;
  vnetHdr: boolean;
  vnetHdrSize?: number;
}

/**
 * `create` on a name that exists: when it is not a multi-queue tap (a
 * single-queue tap, a tun device, another kind), say what it is and how to
 * re-create it, as `exec` does, rather than only "already exists".
 */
function explainExisting(err: unknown, name: string, g: GlobalOpts): unknown {
  if (!(err instanceof MqtapError) || err.op !== 'LOOKUP' || err.code !== 'EEXIST') return err;
  let link;
  try {
    link = getLink(name, netnsOpt(g));
  } catch {
    return err;
  }
  if (!link) return err;
  try {
    requireMultiQueueTap(name, link);
  } catch (why) {
    return why;
  }
  return err;
}

function cmdCreate(name: string, o: CreateOpts, g: GlobalOpts): number {
  let tap;
  try {
    tap = openTap({
      name,
      queues: o.queues,
      existing: 'forbid',
      persist: true,
      vnetHdr: o.vnetHdr,
      ...(o.vnetHdrSize !== undefined ? { vnetHdrSize: o.vnetHdrSize as 10 } : {}),
      ...(o.owner !== undefined ? { owner: resolveId(o.owner, 'owner') } : {}),
      ...(o.group !== undefined ? { group: resolveId(o.group, 'group') } : {}),
      ...(o.mtu !== undefined ? { mtu: o.mtu } : {}),
      ...(o.txqueuelen !== undefined ? { txQueueLen: o.txqueuelen } : {}),
      ...(o.mac !== undefined ? { mac: o.mac } : {}),
      ...(o.up ? { up: true } : {}),
      ...netnsOpt(g),
      logger: logger(g),
    });
  } catch (err) {
    throw explainExisting(err, name, g);
  }
  const created = tap.name;
  tap.close();
  const info = getLink(created, netnsOpt(g));
  if (g.json) json(info);
  else out(`created persistent multi-queue tap ${created} (${o.queues} queue${o.queues === 1 ? '' : 's'} attached and released)\n${isTapLink(info) ? table(TAP_HEADERS, [tapRow(info)]) : ''}`);
  return EXIT.OK;
}

function cmdDelete(name: string, g: GlobalOpts): number {
  deleteTap(name, { ...netnsOpt(g), logger: logger(g) });
  if (g.json) json({ deleted: name });
  else out(`deleted ${name}`);
  return EXIT.OK;
}

function cmdShow(name: string | undefined, o: { all?: boolean }, g: GlobalOpts): number {
  if (name !== undefined) {
    const link = getLink(name, netnsOpt(g));
    if (!isTapLink(link))
      throw new MqtapError({
        op: 'LOOKUP',
        code: 'ENODEV',
        errno: 19,
        ifname: name,
        message: link ? `${name} is not a tun/tap device (kind: ${link.kind ?? 'none'})` : `no tap named ${name}`,
        hint: 'list taps with `mqtap show`',
      });
    if (g.json) json(link);
    else out(table(TAP_HEADERS, [tapRow(link)]));
    return EXIT.OK;
  }
  const taps = listTaps(netnsOpt(g)).filter((t) => o.all || t.tun.type === 'tap');
  if (g.json) json(taps);
  else if (taps.length === 0) out('no taps');
  else out(table(TAP_HEADERS, taps.map(tapRow)));
  return EXIT.OK;
}

interface ExecOpts {
  queues: number;
  active?: number;
  existing: ExistingPolicy;
  vnetHdr: boolean;
  vnetHdrSize?: number;
  vhost: VhostMode;
}

async function cmdExec(name: string, argv: string[], o: ExecOpts, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  const nd = openNetdev({
    name,
    pairs: o.queues,
    vhost: o.vhost,
    existing: o.existing,
    vnetHdr: o.vnetHdr,
    ...(o.vnetHdrSize !== undefined ? { vnetHdrSize: o.vnetHdrSize as 10 } : {}),
    ...netnsOpt(g),
    logger: log,
  });
  try {
    if (o.active !== undefined) nd.setActivePairs(o.active);
    const m = childFds(nd.name, nd.tapFds(), nd.vhostFds());
    const { child, exited } = spawnWithFds({ argv, fds: m.fds, env: m.env });
    log.info({ ifname: nd.name, pid: child.pid, fds: m.tap, vhostfds: m.vhost, argv }, 'child started');
    const status = await exited;
    log.info({ ifname: nd.name, ...status }, 'child exited');
    return status.status;
  } finally {
    nd.close();
  }
}

/** `mqtap client list`: a command's full name, for hints. */
function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

/** The command being run (set before its action), for the fallback hint. */
let activeCommand = 'mqtap';

/**
 * Every error is reported as one `mqtap: MESSAGE` line and one `hint: HINT`
 * line on stderr (with --json, also as {"error": ...} on stdout), the stack
 * only with --debug.  The library logs an error it throws at debug level
 * only, so nothing else repeats it.
 */
function reportError(err: unknown, g: GlobalOpts): number {
  const code = exitCodeFor(err);
  if (err instanceof CommanderError) return code; // printed by commanderOutput()
  if (err instanceof MqtapError) {
    err.hint ??= err.isUsageError ? `see \`${activeCommand} --help\`` : 'run again with --debug to see each step mqtap took';
    if (g.json) json({ error: err.toJSON() });
    process.stderr.write(`mqtap: ${err.message}\nhint: ${err.hint}\n`);
    if (g.debug) process.stderr.write(`${err.stack ?? ''}\n`);
  } else {
    if (g.json) json({ error: { message: String(err) } });
    process.stderr.write(`mqtap: internal error: ${(err as Error)?.message ?? String(err)}\n`);
    process.stderr.write(g.debug ? `hint: please report it, with this stack trace\n${(err as Error)?.stack ?? ''}\n` : 'hint: run again with --debug for the stack trace, and please report it\n');
  }
  return code;
}

/**
 * Commander's own errors (unknown command or option, missing argument, a
 * value an option's parser refused) in the same form: `mqtap: ...` and
 * `hint: see \`mqtap COMMAND --help\`` (with commander's "Did you mean" in it).
 */
function commanderOutput(cmd: Command): { outputError: (str: string, write: (str: string) => void) => void } {
  return {
    outputError: (str, write) => {
      const [first = '', ...rest] = str.trim().replace(/^error: /, '').split('\n');
      const suggestion = rest.map((l) => l.trim().replace(/^\((.*)\)$/, '$1')).filter(Boolean).join(' ');
      write(`mqtap: ${first}\nhint: ${suggestion ? `${suggestion} ` : ''}see \`${commandPath(cmd)} --help\`\n`);
    },
  };
}

export function buildProgram(run: Runner): Command {
  const program = new Command('mqtap')
    .description('Linux multi-queue tap + vhost-net backend: create, inspect and hand out tap queues')
    .version(version())
    .option('--debug', 'log debug details and show stack traces')
    .addOption(new Option('--log-level <level>', 'log level on stderr (default warn)').choices(['silent', 'fatal', 'error', 'warn', 'info', 'debug', 'trace']))
    .addOption(new Option('--log-format <format>', 'logs as readable text or pino JSON lines').choices(['text', 'json']).default('text'))
    .option('--netns <name|path>', 'work inside this network namespace (name under /run/netns, or a path)')
    .option('--socket <path>', 'send daemon operations (create, list, show, set-active, acquire, release, hotplug, unplug, delete, ...) to the mqtap daemon at PATH')
    .enablePositionalOptions()
    .exitOverride()
    .hook('preAction', (_program, action) => {
      activeCommand = commandPath(action);
    });

  const globals = (cmd: Command): GlobalOpts => cmd.optsWithGlobals<GlobalOpts>();

  program
    .command('features')
    .description('what the kernel supports for multi-queue taps')
    .option('--json', 'machine-readable output')
    .action((_o, cmd: Command) => run(() => cmdFeatures(globals(cmd)), globals(cmd)));

  program
    .command('create')
    .description('create a persistent multi-queue tap')
    .argument('<name>', 'interface name, or a template such as mqt%d')
    .option('-q, --queues <n>', 'queues to attach (and release) to prove the tap works', intArg('--queues'), 1)
    .option('--owner <user>', 'uid or user name allowed to attach queues without CAP_NET_ADMIN')
    .option('--group <group>', 'gid or group name allowed to attach queues without CAP_NET_ADMIN')
    .option('--mtu <bytes>', 'MTU', intArg('--mtu'))
    .option('--txqueuelen <frames>', "frames each queue's ring holds before the kernel drops (tx_queue_len)", intArg('--txqueuelen'))
    .option('--mac <mac>', 'Ethernet address, e.g. 52:54:00:12:34:56')
    .option('--up', 'bring the link up')
    .option('--no-vnet-hdr', 'without the virtio-net header (IFF_VNET_HDR)')
    .option('--vnet-hdr-size <bytes>', 'virtio-net header size: 10, 12 or 20', hdrSizeArg)
    .option('--json', 'machine-readable output')
    .action((name: string, o: CreateOpts, cmd: Command) => run(() => cmdCreate(name, o, globals(cmd)), globals(cmd)));

  program
    .command('delete')
    .description('delete a tun/tap device (persistent or not)')
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) => run(() => cmdDelete(name, globals(cmd)), globals(cmd)));

  program
    .command('show')
    .description("the kernel's view of one or all taps (rtnetlink), with enabled and disabled queue counts")
    .argument('[name]')
    .option('--all', 'include tun (layer 3) devices')
    .option('--json', 'machine-readable output')
    .action((name: string | undefined, o: { all?: boolean }, cmd: Command) => run(() => cmdShow(name, o, globals(cmd)), globals(cmd)));

  program
    .command('exec')
    .description('open (or create) the queues of a tap and run a command with them as fds 3, 4, ...')
    .argument('<name>', 'tap name or template')
    .argument('<command...>', 'the command, after --')
    .option('-q, --queues <n>', 'queues to open', intArg('--queues'), 1)
    .option('-a, --active <k>', 'enable queues 0..k-1 only (the rest stay open, disabled)', intArg('--active'))
    .addOption(new Option('--existing <policy>', 'if the tap exists').choices(['allow', 'require', 'forbid']).default('allow'))
    .option('--no-vnet-hdr', 'without the virtio-net header (IFF_VNET_HDR)')
    .option('--vnet-hdr-size <bytes>', 'virtio-net header size: 10, 12 or 20', hdrSizeArg)
    .addOption(new Option('--vhost <mode>', 'also open one /dev/vhost-net fd per queue and hand them after the queue fds').choices(['on', 'off', 'auto']).default('off'))
    .addHelpText(
      'after',
      '\nThe child gets the queue fds as 3, 4, ... and MQTAP_FDS=3:4:..., MQTAP_IFNAME, MQTAP_QUEUES in its\n' +
        'environment (with --vhost, the vhost-net fds follow and MQTAP_VHOSTFDS lists them); nothing else is inherited.  SIGINT, SIGTERM and SIGHUP are relayed.  mqtap exits with\n' +
        "the command's status (128+N if a signal N killed it) and closes every queue.\n\n" +
        'Example: mqtap exec mqt%d --queues 4 --active 2 -- qemu-system-x86_64 -netdev tap,id=n0,fds=3:4:5:6 ...',
    )
    .action((name: string, argv: string[], o: ExecOpts, cmd: Command) => run(() => cmdExec(name, argv, o, globals(cmd)), globals(cmd)));

  const ctx: CliContext = { run, globals };
  registerVhost(program, ctx);
  registerLaunch(program, ctx);
  registerDemo(program, ctx);
  registerDaemon(program, ctx);
  registerData(program, ctx);
  registerVhostUser(program, ctx);
  const errorsLikeOurs = (cmd: Command): void => {
    cmd.configureOutput(commanderOutput(cmd));
    cmd.commands.forEach(errorsLikeOurs);
  };
  errorsLikeOurs(program);
  return program;
}

export async function main(args: string[]): Promise<number> {
  let result: Promise<number> | undefined;
  let g: GlobalOpts = {};
  const program = buildProgram((fn, globals) => {
    g = globals;
    result = Promise.resolve().then(fn);
  }, );
  try {
    program.parse(routeGlobalSocket(args, program), { from: 'user' });
    if (!result) return EXIT.OK;
    return await result;
  } catch (err) {
    return reportError(err, g);
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`mqtap: internal error: ${String(err)}\n`);
      process.exitCode = EXIT.FAILURE;
    },
  );
}
