/**
 * `mqtap vhost-user`: serve a multi-queue tap as QEMU's vhost-user net
 * backend over a UNIX socket until SIGINT/SIGTERM (docs/vhost-user.md).
 * Each connection, the negotiated features and every change of the guest's
 * active pairs are reported on stderr (one JSON line each with --json);
 * stdout stays empty.
 */
import { InvalidArgumentError, Option, type Command } from 'commander';
import type { ExistingPolicy } from '../lib/tap/tap';
import { countersForLog, serveVhostUser, type ServeVhostUserOptions } from '../lib/vhost-user/backend';
import type { PairCounters, TapEngineChoice } from '../lib/vhost-user/dataplane-api';
import type { PairsState, VhostUserOffloads } from '../lib/vhost-user/connection';
import { validateIfName, validateQueueCount } from '../lib/sys/validate';
import { EXIT, intArg, logger, netnsOpt, type CliContext, type GlobalOpts } from './context';
import { resolveId } from './ids';

interface VhostUserOpts {
  socket: string;
  name: string;
  queues: number;
  client?: boolean;
  offloads?: VhostUserOffloads;
  existing: ExistingPolicy;
  group?: string;
  json?: boolean;
  tapEngine?: TapEngineChoice;
}

const OFFLOADS = ['csum', 'tso4', 'tso6', 'ecn'] as const;

/** --offloads csum,tso4,tso6,ecn | none | all */
export function offloadsArg(value: string): VhostUserOffloads {
  if (value === 'none') return {};
  if (value === 'all') return { csum: true, tso4: true, tso6: true, ecn: true };
  const o: VhostUserOffloads = {};
  for (const part of value.split(',').map((s) => s.trim()).filter(Boolean)) {
    if (!(OFFLOADS as readonly string[]).includes(part)) throw new InvalidArgumentError(`unknown offload "${part}" (known: ${OFFLOADS.join(', ')}, or all / none)`);
    o[part as (typeof OFFLOADS)[number]] = true;
  }
  return o;
}

async function cmdVhostUser(o: VhostUserOpts, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  validateIfName(o.name, '--name', { template: true });
  validateQueueCount(o.queues, '--queues');
  const report = (event: string, data: Record<string, unknown>, text: string): void => {
    if (o.json) process.stderr.write(`${JSON.stringify({ event, ...data })}\n`);
    else process.stderr.write(`mqtap: ${text}\n`);
  };
  const opts: ServeVhostUserOptions = {
    socket: o.socket,
    name: o.name,
    queues: o.queues,
    existing: o.existing,
    offloads: o.offloads ?? offloadsArg('all'),
    ...(o.client ? { client: true } : {}),
    ...(o.tapEngine !== undefined ? { tapEngine: o.tapEngine } : {}),
    ...(o.group !== undefined ? { group: resolveId(o.group, 'group') } : {}),
    ...netnsOpt(g),
    logger: log,
  };
  // Signals are caught from before the socket exists: a SIGTERM right after "ready" (or during
  // start-up) is a clean stop, never the default action that would leave the socket file behind.
  let stopRequested: () => void = () => undefined;
  const stop = new Promise<void>((resolve) => (stopRequested = resolve));
  const onSignal = (sig: NodeJS.Signals): void => {
    log.info({ signal: sig }, 'stopping');
    stopRequested();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  let be: Awaited<ReturnType<typeof serveVhostUser>>;
  try {
    be = await serveVhostUser(opts);
  } catch (err) {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    throw err;
  }
  be.on('connected', (peer: { pid: number; uid: number; gid: number }) => report('connected', { peer }, `front-end connected (pid ${peer.pid}, uid ${peer.uid})`));
  be.on('features', (acked: bigint, names: string[]) => report('features', { features: `0x${acked.toString(16)}`, names }, `features negotiated: ${names.join(' ')}`));
  be.on('pairs', (s: PairsState) => report('pairs', { ...s }, `pairs: tap queues attached [${s.enabled.join(',')}], running [${s.live.join(',')}]`));
  be.on('disconnected', (d: { reason?: string; counters?: PairCounters[] }) =>
    report(
      'disconnected',
      { reason: d.reason ?? null, ...(d.counters ? { counters: d.counters.map(countersForLog) } : {}) },
      `front-end disconnected${d.reason ? `: ${d.reason}` : ''}${d.counters ? `; ${d.counters.map((c, p) => `pair ${p}: ${c.txFrames} frames from the guest, ${c.rxFrames} to it (${c.tapEngine})`).join(', ')}` : ''}`,
    ),
  );
  report(
    'ready',
    { socket: be.socket, tap: be.tap.name, queues: be.pairs, client: be.client },
    `${be.client ? 'connecting to' : 'listening on'} ${be.socket} for ${be.tap.name} (${be.pairs} pair(s)); QEMU: -chardev socket,id=vu0,path=${be.socket}${be.client ? ',server=on' : ',reconnect=1'} -netdev vhost-user,id=n0,chardev=vu0,queues=${be.pairs} -device virtio-net-pci,netdev=n0,mq=on,vectors=${be.pairs > 1 ? '0 (TCG) or ' + (2 * be.pairs + 2) + ' (KVM)' : '0'}`,
  );
  try {
    await stop;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  await be.close();
  report('stopped', { tap: be.tap.name, connections: be.connections }, `stopped after ${be.connections} connection(s); ${be.tap.name} closed`);
  return EXIT.OK;
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('vhost-user')
    .description("serve a multi-queue tap as QEMU's vhost-user net backend over a UNIX socket (docs/vhost-user.md)")
    .requiredOption('--socket <path>', 'UNIX socket: listened on (mode 0600), or connected to with --client')
    .option('-n, --name <tap>', 'tap name or template', 'mqt%d')
    .requiredOption('-q, --queues <n>', 'queue pairs (1..256): virtqueue pair i <-> tap queue i', intArg('--queues'))
    .option('--client', "connect to QEMU's socket (-chardev socket,...,server=on) and retry, instead of listening")
    .option('--offloads <list>', 'offloads offered to the guest: csum,tso4,tso6,ecn, all or none (default all)', offloadsArg)
    .addOption(new Option('--existing <policy>', 'if the tap exists').choices(['allow', 'require', 'forbid']).default('allow'))
    .option('--group <group>', 'socket group (mode 0660): its members may connect too')
    .option('--json', 'events as JSON lines on stderr')
    .addOption(new Option('--tap-engine <engine>', "tap I/O of the workers: io_uring batches where available (auto), always (uring: error where it cannot be set up), or one writev/read per frame").choices(['auto', 'uring', 'writev']).default('auto'))
    .addHelpText(
      'after',
      '\nServes one front-end after another until SIGINT/SIGTERM, then stops every ring, unmaps guest memory and closes the tap.\n\n' +
        'Example:\n  mqtap vhost-user --socket /run/vu0.sock --name vu0 --queues 4 &\n' +
        '  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n' +
        '    -chardev socket,id=vu0,path=/run/vu0.sock,reconnect=1 -netdev vhost-user,id=n0,chardev=vu0,queues=4 \\\n' +
        '    -device virtio-net-pci,netdev=n0,mq=on,vectors=10 -accel kvm ...\n' +
        'Under TCG (no KVM) give vectors=0: QEMU 7.2 crashes when vhost-user meets MSI-X vectors without KVM.\n' +
        '`mqtap launch --backend vhost-user` adds all of this itself.',
    )
    .action((o: VhostUserOpts, cmd: Command) => ctx.run(() => cmdVhostUser(o, ctx.globals(cmd)), ctx.globals(cmd)));
}
