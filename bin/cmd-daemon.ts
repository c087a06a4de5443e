/**
 * Management daemon and QMP commands:
 *   mqtap daemon [--socket PATH] [--state-dir DIR] [--group G] ...
 *   mqtap hotplug --qmp PATH --queues N --id ID [--name TAP] [--vhost on|off|auto] ...
 *   mqtap unplug --qmp PATH --id ID
 *   mqtap client [--socket PATH] <hello|create|open|list|show|set-active|acquire|release|hotplug|unplug|delete|serve-vhost-user|stop-vhost-user> ...
 * docs/daemon.md describes the daemon and its protocol.
 */
import { Option, type Command } from 'commander';
import { invalidArg } from '../lib/sys/errors';
import { hotplugNetdev, unplugNetdev } from '../lib/qemu/hotplug';
import { stderrLogger, type Logger } from '../lib/sys/log';
import { openNetdev, type Netdev, type VhostMode } from '../lib/vhost/netdev';
import { withQmp } from '../lib/qemu/qmp';
import { spawnWithFds } from '../lib/sys/spawn';
import { deleteTap } from '../lib/tap/tap';
import { DaemonClient, type NetdevDetail, type NetdevSummary } from '../lib/daemon/client';
import { DEFAULT_SOCKET, DEFAULT_STATE_DIR, OPS } from '../lib/daemon/protocol';
import { MqtapDaemon } from '../lib/daemon/server';
import { EXIT, childFds, hdrSizeArg, intArg, json, logger, netnsOpt, out, type CliContext, type GlobalOpts } from './context';
import { keyValues, table } from './format';
import { resolveId } from './ids';

// ------------------------------------------------------------------ daemon

interface DaemonCmdOpts {
  socket?: string;
  stateDir: string;
  group?: string;
  allowUid?: string[];
  maxClients?: number;
  qmpTimeout?: number;
  unplugTimeout?: number;
}

function defaultSocket(): string {
  return process.env.MQTAP_SOCKET || DEFAULT_SOCKET;
}

function daemonLogger(g: GlobalOpts): Logger {
  return stderrLogger((g.logLevel ?? (g.debug ? 'debug' : 'info')) as 'info');
}

async function cmdDaemon(o: DaemonCmdOpts, g: GlobalOpts): Promise<number> {
  const log = daemonLogger(g);
  const d = await MqtapDaemon.start({
    socketPath: o.socket ?? defaultSocket(),
    stateDir: o.stateDir,
    logger: log,
    ...(o.group !== undefined ? { group: resolveId(o.group, 'group') } : {}),
    ...(o.allowUid?.length ? { allowUids: o.allowUid.map((u) => resolveId(u, 'owner')) } : {}),
    ...(o.maxClients !== undefined ? { maxClients: o.maxClients } : {}),
    ...(o.qmpTimeout !== undefined ? { qmpTimeoutMs: o.qmpTimeout } : {}),
    ...(o.unplugTimeout !== undefined ? { unplugTimeoutMs: o.unplugTimeout } : {}),
  });
  const onSignal = (sig: NodeJS.Signals): void => {
    log.info({ signal: sig }, 'signal received');
    void d.stop();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', onSignal);
  try {
    await d.stopped;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    process.off('SIGHUP', onSignal);
  }
  return EXIT.OK;
}

// ------------------------------------------------------------------ hotplug / unplug

interface HotplugCmdOpts {
  qmp: string;
  queues: number;
  id: string;
  name: string;
  vhost: VhostMode;
  netdevId?: string;
  bus?: string;
  addr?: string;
  mac?: string;
  persist?: boolean;
  vnetHdrSize?: number;
  timeout: number;
  json?: boolean;
}

async function cmdHotplug(o: HotplugCmdOpts, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  const nd: Netdev = openNetdev({
    name: o.name,
    pairs: o.queues,
    vhost: o.vhost,
    ...(o.persist ? { persist: true } : {}),
    ...(o.vnetHdrSize !== undefined ? { vnetHdrSize: o.vnetHdrSize as 10 } : {}),
    ...netnsOpt(g),
    logger: log,
  });
  let r;
  try {
    r = await withQmp(o.qmp, { timeoutMs: o.timeout, logger: log }, async (qmp) => ({
      qemu: qmp.qemuVersion,
      ...(await hotplugNetdev(qmp, nd, {
        id: o.id,
        timeoutMs: o.timeout,
        logger: log,
        ...(o.netdevId !== undefined ? { netdevId: o.netdevId } : {}),
        ...(o.bus !== undefined ? { bus: o.bus } : {}),
        ...(o.addr !== undefined ? { addr: o.addr } : {}),
        ...(o.mac !== undefined ? { mac: o.mac } : {}),
      })),
    }));
  } catch (err) {
    const created = nd.tap.created;
    nd.close();
    if (created && o.persist) {
      try {
        deleteTap(nd.name, netnsOpt(g));
      } catch {
        /* report the hotplug error */
      }
    }
    throw err;
  }
  // QEMU holds its own copies now; ours go.  A non-persistent tap lives on
  // through QEMU's fds and disappears when QEMU closes them (unplug).
  nd.close();
  const res = { tap: nd.name, persist: !!o.persist, ...r };
  if (g.json) json(res);
  else
    out(
      `hot-added ${nd.name} (${r.queues} queue pair${r.queues === 1 ? '' : 's'}, vhost ${r.vhost ? 'on' : 'off'}) to QEMU ${r.qemu} as device ${r.id} (netdev ${r.netdevId})` +
        (o.persist ? '' : `\n${nd.name} is not persistent: it lives while QEMU holds its queues and goes away on unplug`),
    );
  return EXIT.OK;
}

async function cmdUnplug(o: { qmp: string; id: string; netdevId?: string; timeout: number; unplugTimeout: number; json?: boolean }, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  const r = await withQmp(o.qmp, { timeoutMs: o.timeout, logger: log }, (qmp) =>
    unplugNetdev(qmp, { id: o.id, timeoutMs: o.timeout, unplugTimeoutMs: o.unplugTimeout, logger: log, ...(o.netdevId !== undefined ? { netdevId: o.netdevId } : {}) }),
  );
  if (g.json) json({ unplugged: r.id, netdevId: r.netdevId });
  else out(`removed device ${r.id} and netdev ${r.netdevId}`);
  return EXIT.OK;
}

// ------------------------------------------------------------------ client

type ClientOpts = GlobalOpts & { socket?: string; timeout?: number };

async function withClient<T>(g: ClientOpts, fn: (c: DaemonClient) => Promise<T>): Promise<T> {
  const c = await DaemonClient.connect(g.socket ?? defaultSocket(), { ...(g.timeout !== undefined ? { timeoutMs: g.timeout } : {}) });
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

const SUMMARY_HEADERS = ['NAME', 'PAIRS', 'ACTIVE', 'VHOST', 'PERSIST', 'LEASE', 'QUEUES', 'DISABLED'];

function leaseText(l: Record<string, unknown> | null): string {
  if (!l) return '-';
  return l.kind === 'qmp' ? `qmp:${String(l.id)}` : l.kind === 'vhost-user' ? `vhost-user:${String(l.socket)}` : `pid ${String(l.pid)}`;
}

function summaryRow(n: NetdevSummary): Array<string | number | boolean | null> {
  return [n.name, n.pairs, n.active, n.vhost, n.persist, leaseText(n.lease), n.numQueues, n.numDisabledQueues];
}

function printDetail(d: NetdevDetail, g: GlobalOpts): void {
  if (g.json) {
    json(d);
    return;
  }
  out(
    keyValues([
      ['name', d.name],
      ['pairs', d.pairs],
      ['active (daemon)', d.active],
      ['vhost', d.vhost],
      ['persistent', d.persist],
      ['created by the daemon', d.created],
      ['netns', d.netns],
      ['held by the daemon', d.holding],
      ['lease', d.lease ? JSON.stringify(d.lease) : null],
      ['pair states (daemon)', d.pairStates?.join(' ') ?? null],
      ['pair states (kernel)', d.kernelPairStates?.join(' ') ?? null],
      ['kernel numqueues', d.numQueues],
      ['kernel numdisabled', d.numDisabledQueues],
      ...(d.vhostUser
        ? ([
            ['vhost-user socket', d.vhostUser.socket],
            ['vhost-user front-end', d.vhostUser.connected ? `connected, live pairs ${d.vhostUser.livePairs.join(' ') || '-'}` : 'none'],
            ['vhost-user frames', `from guest ${d.vhostUser.txFrames}, to guest ${d.vhostUser.rxFrames}, dropped ${d.vhostUser.txDropped}/${d.vhostUser.rxDropped}`],
          ] as Array<[string, string]>)
        : []),
    ]),
  );
}

/** --pairs, or its alias --queues (so `mqtap --socket P create NAME -q 4` reads as the local create does). */
function pairsOf(o: { pairs?: number; queues?: number }): number {
  const n = o.pairs ?? o.queues;
  if (n === undefined) throw invalidArg('--pairs <n> is required', 'the number of queue pairs, e.g. --pairs 4');
  return n;
}

interface ClientCreateOpts {
  pairs?: number;
  queues?: number;
  vhost: VhostMode;
  persist?: boolean;
  active?: number;
  mtu?: number;
  mac?: string;
  up?: boolean;
  owner?: string;
  group?: string;
  vnetHdrSize?: number;
  json?: boolean;
}

function registerClient(program: Command, ctx: CliContext): void {
  const client = program
    .command('client')
    .description('talk to a running mqtap daemon (see docs/daemon.md)')
    .option('--socket <path>', `the daemon's socket (default $MQTAP_SOCKET or ${DEFAULT_SOCKET})`)
    .option('--timeout <ms>', 'per-request timeout', intArg('--timeout'));
  // `--socket`/`--timeout` work before the operation (on `client`) and after it
  // (on each operation): the program's positional options stop commander from
  // passing the group's options down, so every operation declares them too.
  const sub = (name: string): Command =>
    client
      .command(name)
      .addOption(new Option('--socket <path>', "the daemon's socket").hideHelp())
      .addOption(new Option('--timeout <ms>', 'per-request timeout').argParser(intArg('--timeout')).hideHelp());
  const g = (cmd: Command): ClientOpts => cmd.optsWithGlobals<ClientOpts>();
  const run = (cmd: Command, fn: (g: ClientOpts) => Promise<number>): void => ctx.run(() => fn(g(cmd)), g(cmd));
  const vhostOpt = (): Option => new Option('--vhost <mode>', 'vhost-net: on, off or auto').choices(['on', 'off', 'auto']).default('auto');

  sub('hello')
    .description("the daemon's version and your credentials as it sees them")
    .option('--json', 'machine-readable output')
    .action((_o, cmd: Command) =>
      run(cmd, async (o) => {
        const h = await withClient(o, (c) => c.hello());
        if (o.json) json(h);
        else out(keyValues([['protocol', h.protocol], ['version', h.version], ['daemon pid', h.pid], ['you', `pid ${h.peer.pid} uid ${h.peer.uid} gid ${h.peer.gid}`], ['netdevs', h.netdevs]]));
        return EXIT.OK;
      }),
    );

  sub('create')
    .description('create a tap (+ vhost-net fds) held by the daemon')
    .argument('<name>', 'interface name or template (mqt%d)')
    .option('-p, --pairs <n>', 'queue pairs (required)', intArg('--pairs'))
    .addOption(new Option('-q, --queues <n>', 'same as --pairs (as in `mqtap create`)').argParser(intArg('--queues')).hideHelp())
    .addOption(vhostOpt())
    .option('--persist', 'persistent tap: survives the daemon, re-adopted on restart')
    .option('-a, --active <k>', 'active pairs (default all)', intArg('--active'))
    .option('--mtu <bytes>', 'MTU', intArg('--mtu'))
    .option('--mac <mac>', 'Ethernet address of the tap')
    .option('--up', 'bring the link up')
    .option('--owner <user>', 'uid or user name that may attach queues')
    .option('--group <group>', 'gid or group name that may attach queues')
    .option('--vnet-hdr-size <bytes>', 'virtio-net header size: 10, 12 or 20', hdrSizeArg)
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const c = cmd.opts<ClientCreateOpts>();
        const d = await withClient(o, (cl) =>
          cl.create({
            name,
            pairs: pairsOf(c),
            vhost: c.vhost,
            persist: !!c.persist,
            ...(c.active !== undefined ? { active: c.active } : {}),
            ...(c.mtu !== undefined ? { mtu: c.mtu } : {}),
            ...(c.mac !== undefined ? { mac: c.mac } : {}),
            ...(c.up ? { up: true } : {}),
            ...(c.owner !== undefined ? { owner: resolveId(c.owner, 'owner') } : {}),
            ...(c.group !== undefined ? { group: resolveId(c.group, 'group') } : {}),
            ...(c.vnetHdrSize !== undefined ? { vnetHdrSize: c.vnetHdrSize as 10 } : {}),
            ...netnsOpt(o),
          }),
        );
        printDetail(d, o);
        return EXIT.OK;
      }),
    );

  sub('open')
    .description('have the daemon hold queues of an existing multi-queue tap')
    .argument('<name>')
    .option('-p, --pairs <n>', 'queue pairs (required)', intArg('--pairs'))
    .addOption(new Option('-q, --queues <n>', 'same as --pairs (as in `mqtap create`)').argParser(intArg('--queues')).hideHelp())
    .addOption(vhostOpt())
    .option('-a, --active <k>', 'active pairs (default all)', intArg('--active'))
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const c = cmd.opts<{ pairs?: number; queues?: number; vhost: VhostMode; active?: number }>();
        const d = await withClient(o, (cl) => cl.open({ name, pairs: pairsOf(c), vhost: c.vhost, ...(c.active !== undefined ? { active: c.active } : {}), ...netnsOpt(o) }));
        printDetail(d, o);
        return EXIT.OK;
      }),
    );

  sub('list')
    .description('the netdevs the daemon holds')
    .option('--json', 'machine-readable output')
    .action((_o, cmd: Command) =>
      run(cmd, async (o) => {
        const l = await withClient(o, (c) => c.list());
        if (o.json) json(l);
        else out(l.length === 0 ? 'no netdevs' : table(SUMMARY_HEADERS, l.map(summaryRow)));
        return EXIT.OK;
      }),
    );

  sub('show')
    .description("one netdev: the daemon's view and the kernel's (numqueues/numdisabled)")
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        printDetail(await withClient(o, (c) => c.show(name)), o);
        return EXIT.OK;
      }),
    );

  sub('set-active')
    .description('make pairs 0..K-1 active and the rest inactive')
    .argument('<name>')
    .argument('<k>', 'active pairs', intArg('K'))
    .option('--json', 'machine-readable output')
    .action((name: string, k: number, _o, cmd: Command) =>
      run(cmd, async (o) => {
        printDetail(await withClient(o, (c) => c.setActive(name, k)), o);
        return EXIT.OK;
      }),
    );

  sub('acquire')
    .description('borrow the fds and run a command with them as fds 3, 4, ... (tap queues, then vhost-net fds)')
    .argument('<name>')
    .argument('<command...>', 'the command, after --')
    .option('--keep', 'do not release the netdev when the command exits')
    .addHelpText('after', '\nThe command gets MQTAP_FDS (tap queues, e.g. 3:4:5:6), MQTAP_VHOSTFDS (with vhost fds), MQTAP_IFNAME and MQTAP_QUEUES.\nExample: mqtap client acquire vm1 -- qemu-system-x86_64 -netdev tap,id=n0,fds=3:4,vhost=on,vhostfds=5:6 ...')
    .action((name: string, argv: string[], _o, cmd: Command) =>
      run(cmd, async (o) => {
        const keep = !!cmd.opts<{ keep?: boolean }>().keep;
        return withClient(o, async (c) => {
          const a = await c.acquire(name);
          let status: number;
          try {
            const m = childFds(a.name, a.tapFds, a.vhostFds);
            const { exited } = spawnWithFds({ argv, fds: m.fds, env: m.env });
            a.fds.close(); // the child has its copies (spawn dup2'ed them)
            status = (await exited).status;
          } catch (err) {
            a.fds.close();
            if (!keep) await c.release(name).catch(() => undefined); // the spawn error is the one to report
            throw err;
          }
          // The child's status is the result; a failed release is reported besides it.
          if (!keep) await c.release(name).catch((err: unknown) => process.stderr.write(`mqtap: release ${name} failed: ${(err as Error).message}\n`));
          return status;
        });
      }),
    );

  sub('release')
    .description('end a lease taken with acquire (the daemon takes the queues back)')
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        printDetail(await withClient(o, (c) => c.release(name)), o);
        return EXIT.OK;
      }),
    );

  sub('hotplug')
    .description('hot-plug the netdev into a running QEMU (the daemon connects to its QMP socket)')
    .argument('<name>')
    .requiredOption('--qmp <path>', "QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)")
    .requiredOption('--id <id>', 'device id in QEMU')
    .option('--netdev-id <id>', 'netdev id in QEMU (default ID-netdev)')
    .option('--bus <bus>', 'e.g. a pcie-root-port id on q35')
    .option('--addr <slot>', 'PCI slot[.function]')
    .option('--mac <mac>', 'guest MAC')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const c = cmd.opts<{ qmp: string; id: string; netdevId?: string; bus?: string; addr?: string; mac?: string }>();
        const d = await withClient(o, (cl) =>
          cl.hotplug(name, {
            qmp: c.qmp,
            id: c.id,
            ...(c.netdevId !== undefined ? { netdevId: c.netdevId } : {}),
            ...(c.bus !== undefined ? { bus: c.bus } : {}),
            ...(c.addr !== undefined ? { addr: c.addr } : {}),
            ...(c.mac !== undefined ? { mac: c.mac } : {}),
          }),
        );
        if (o.json) json(d);
        else out(`${d.name} plugged into QEMU ${d.qemu} as ${d.device} (netdev ${d.netdevId})`);
        return EXIT.OK;
      }),
    );

  sub('unplug')
    .description('hot-unplug the netdev from its QEMU (waits for the guest)')
    .argument('<name>')
    .option('--wait <ms>', 'how long the guest may take (default 60000)', intArg('--wait'))
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const w = cmd.opts<{ wait?: number }>().wait;
        const d = await withClient(o, (c) => c.unplug(name, w !== undefined ? { timeoutMs: w } : {}));
        if (o.json) json(d);
        else out(`${d.name} unplugged; the daemon holds its queues again`);
        return EXIT.OK;
      }),
    );

  sub('serve-vhost-user')
    .description('serve the netdev over a vhost-user socket (pair i = tap queue i) for QEMU\'s -netdev vhost-user')
    .argument('<name>')
    .option('--vu-socket <path>', 'where to listen (root / the daemon\'s uid only; default STATE_DIR/vhost-user/NAME.sock)')
    .option('--json', 'machine-readable output')
    .addHelpText('after', '\nQEMU: -chardev socket,id=c0,path=SOCKET -netdev vhost-user,id=n0,chardev=c0,queues=PAIRS (guest RAM shared: memory-backend-memfd,share=on)')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const s = cmd.opts<{ vuSocket?: string }>().vuSocket;
        const d = await withClient(o, (c) => c.serveVhostUser(name, s !== undefined ? { socket: s } : {}));
        if (o.json) json(d);
        else out(`${d.name}: vhost-user at ${d.socket} (${d.pairs} pairs)`);
        return EXIT.OK;
      }),
    );

  sub('stop-vhost-user')
    .description('stop serving the netdev over vhost-user (the socket is removed; the daemon holds the queues again)')
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const d = await withClient(o, (c) => c.stopVhostUser(name));
        if (o.json) json(d);
        else out(`${d.name}: no longer served${d.stopped ? ` (${d.stopped} removed)` : ''}`);
        return EXIT.OK;
      }),
    );

  sub('delete')
    .description('close the netdev; a tap the daemon created is deleted')
    .argument('<name>')
    .option('--force', 'even while lent or plugged')
    .option('--json', 'machine-readable output')
    .action((name: string, _o, cmd: Command) =>
      run(cmd, async (o) => {
        const r = await withClient(o, (c) => c.delete(name, { force: !!cmd.opts<{ force?: boolean }>().force }));
        if (o.json) json(r);
        else out(`deleted ${r.name}${r.deviceDeleted ? ' (and its tap device)' : ''}`);
        return EXIT.OK;
      }),
    );
}

// ------------------------------------------------------------------ global --socket

/** The operations of `mqtap client`. */
export const CLIENT_OPS: readonly string[] = OPS;

/**
 * For a global `--socket PATH` (bin/mqtap.ts): rewrites
 * `mqtap [globals] --socket P OP ...` into `mqtap [globals] client --socket P OP ...`
 * when OP is a daemon operation, so `mqtap --socket P create vm1 -p 4` talks to
 * the daemon.  The global options are the program's own (so one added there
 * is known here).  Arguments without a global --socket come back unchanged.
 */
export function routeGlobalSocket(args: readonly string[], program: Command): string[] {
  const flags = new Set<string>(['-h', '--help']);
  const withValue = new Set<string>();
  for (const o of program.options) {
    const set = o.required || o.optional ? withValue : flags;
    if (o.long) set.add(o.long);
    if (o.short) set.add(o.short);
  }
  const globals: string[] = [];
  let socket: string | undefined;
  let i = 0;
  for (; i < args.length; i++) {
    const a = args[i]!;
    const eq = a.indexOf('=');
    const name = a.startsWith('--') && eq > 0 ? a.slice(0, eq) : a;
    if (a === '--socket' && i + 1 < args.length) socket = args[++i];
    else if (name === '--socket' && name !== a) socket = a.slice(eq + 1);
    else if (withValue.has(a) && i + 1 < args.length) globals.push(a, args[++i]!);
    else if (flags.has(a) || (name !== a && withValue.has(name))) globals.push(a);
    else break;
  }
  const op = args[i];
  if (socket === undefined || op === undefined || !CLIENT_OPS.includes(op)) return [...args];
  return [...globals, 'client', '--socket', socket, ...args.slice(i)];
}

// ------------------------------------------------------------------ registration

export function register(program: Command, ctx: CliContext): void {
  program
    .command('daemon')
    .description('run the management daemon: hold netdevs for local clients (docs/daemon.md)')
    .option('--socket <path>', `socket path (default $MQTAP_SOCKET or ${DEFAULT_SOCKET})`)
    .option('--state-dir <dir>', 'where persistent netdevs are recorded for re-adoption', DEFAULT_STATE_DIR)
    .option('--group <group>', 'also serve this group (socket mode 0660)')
    .option('--allow-uid <uid...>', 'also serve these uids/user names')
    .option('--max-clients <n>', 'concurrent connections (default 256)', intArg('--max-clients'))
    .option('--qmp-timeout <ms>', 'QMP connect/command timeout (default 10000)', intArg('--qmp-timeout'))
    .option('--unplug-timeout <ms>', 'how long unplug waits for the guest (default 60000)', intArg('--unplug-timeout'))
    .addHelpText('after', '\nLogs (pino JSON, level info unless --log-level) go to stderr.  SIGTERM/SIGINT: clean stop; persistent taps stay.')
    .action((o: DaemonCmdOpts, cmd: Command) => ctx.run(() => cmdDaemon(o, ctx.globals(cmd)), ctx.globals(cmd)));

  program
    .command('hotplug')
    .description('open a multi-queue tap (+ vhost-net) and hot-plug it into a running QEMU over QMP')
    .requiredOption('--qmp <path>', "QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)")
    .requiredOption('-q, --queues <n>', 'queue pairs', intArg('--queues'))
    .requiredOption('--id <id>', 'device id in QEMU')
    .option('--name <tap>', 'tap name or template', 'mqt%d')
    .addOption(new Option('--vhost <mode>', 'vhost-net').choices(['on', 'off', 'auto']).default('auto'))
    .option('--netdev-id <id>', 'netdev id in QEMU (default ID-netdev)')
    .option('--bus <bus>', 'e.g. a pcie-root-port id on q35 (pcie.0 does not take hot-plugged devices)')
    .option('--addr <slot>', 'PCI slot[.function]')
    .option('--mac <mac>', 'guest MAC')
    .option('--persist', 'make the tap persistent (default: it lives through QEMU\'s fds and goes away on unplug)')
    .option('--vnet-hdr-size <bytes>', 'virtio-net header size: 10, 12 or 20', hdrSizeArg)
    .option('--timeout <ms>', 'QMP connect/command timeout', intArg('--timeout'), 10_000)
    .option('--json', 'machine-readable output')
    .action((o: HotplugCmdOpts, cmd: Command) => ctx.run(() => cmdHotplug(o, ctx.globals(cmd)), ctx.globals(cmd)));

  program
    .command('unplug')
    .description('hot-unplug a NIC from a running QEMU: device_del, wait for DEVICE_DELETED, netdev_del')
    .requiredOption('--qmp <path>', "QEMU's QMP socket")
    .requiredOption('--id <id>', 'device id in QEMU')
    .option('--netdev-id <id>', "netdev id (default: asked from QEMU, the device's netdev property)")
    .option('--timeout <ms>', 'QMP connect/command timeout', intArg('--timeout'), 10_000)
    .option('--unplug-timeout <ms>', 'how long the guest may take to release the device', intArg('--unplug-timeout'), 60_000)
    .option('--json', 'machine-readable output')
    .action((o: { qmp: string; id: string; netdevId?: string; timeout: number; unplugTimeout: number; json?: boolean }, cmd: Command) =>
      ctx.run(() => cmdUnplug(o, ctx.globals(cmd)), ctx.globals(cmd)),
    );

  registerClient(program, ctx);
}
