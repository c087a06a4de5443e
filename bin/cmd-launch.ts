/**
 * `mqtap launch`: open (or create) a multi-queue tap (+ vhost-net fds) and
 * start QEMU with them, the way libvirt does: `-netdev tap,fds=...,vhostfds=...`
 * with the fds mapped into the child and nothing else inherited.
 */
import { Option, type Command } from 'commander';
import { openNetdev, type VhostMode } from '../lib/netdev';
import { launchQemu, planLaunch, type LaunchPlan } from '../lib/qemu';
import { withNetns } from '../lib/netns';
import { isTemplate } from '../lib/validate';
import { probeVhostNet } from '../lib/vhost';
import { EXIT, intArg, json, logger, netnsOpt, out, type CliContext, type GlobalOpts } from './context';

interface LaunchOpts {
  name: string;
  queues: number;
  vhost: VhostMode;
  id: string;
  mac?: string;
  active?: number;
  dryRun?: boolean;
  existing: 'allow' | 'require' | 'forbid';
  persist?: boolean;
}

function shellQuote(a: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

function summary(plan: LaunchPlan, vhost: boolean): Record<string, unknown> {
  const n = plan.netdevs[0]!;
  return { tap: n.ifname, id: n.id, fds: n.fds, vhostfds: n.vhostfds, vhost, argv: plan.argv };
}

async function cmdLaunch(qemu: string[], o: LaunchOpts, g: GlobalOpts): Promise<number> {
  const log = logger(g);
  if (o.dryRun) {
    // Nothing is opened: the fd numbers the child would see are known from the counts.
    const pairs = o.queues;
    const vhost = o.vhost === 'on' || (o.vhost === 'auto' && withNetns(g.netns, () => probeVhostNet()).openable);
    const fake = {
      name: isTemplate(o.name) ? o.name.replace('%d', '0') : o.name,
      tapFds: () => Array.from({ length: pairs }, () => -1),
      vhostFds: () => (vhost ? Array.from({ length: pairs }, () => -1) : []),
    };
    const plan = planLaunch({ netdevs: [{ netdev: fake as never, options: { id: o.id, verifyFds: false, ...(o.mac ? { mac: o.mac } : {}), deviceProps: { romfile: '' } } }], qemu });
    if (g.json) json({ dryRun: true, ...summary(plan, vhost) });
    else out(plan.argv.map(shellQuote).join(' '));
    return EXIT.OK;
  }
  const nd = openNetdev({ name: o.name, pairs: o.queues, vhost: o.vhost, existing: o.existing, ...(o.persist ? { persist: true } : {}), ...netnsOpt(g), logger: log });
  let launched;
  try {
    if (o.active !== undefined) nd.setActivePairs(o.active);
    launched = launchQemu({
      netdevs: [{ netdev: nd, options: { id: o.id, ...(o.mac ? { mac: o.mac } : {}), deviceProps: { romfile: '' } } }],
      qemu,
      logger: log,
    });
  } catch (err) {
    nd.close();
    throw err;
  }
  if (g.json) process.stderr.write(`${JSON.stringify(summary(launched.plan, nd.vhost))}\n`);
  else process.stderr.write(`mqtap: ${launched.plan.argv.map(shellQuote).join(' ')}\n`);
  const st = await launched.exited;
  return st.status;
}

export function register(program: Command, ctx: CliContext): void {
  program
    .command('launch')
    .description('open (or create) a multi-queue tap and its vhost-net fds and start QEMU with them')
    .argument('<qemu...>', 'the QEMU command line, after --')
    .option('-n, --name <tap>', 'tap name or template', 'mqt%d')
    .option('-q, --queues <n>', 'queue pairs', intArg('--queues'), 1)
    .addOption(new Option('--vhost <mode>', 'vhost-net fds: on (required), off, auto (when available)').choices(['on', 'off', 'auto']).default('auto'))
    .option('--id <id>', 'QEMU netdev id', 'net0')
    .option('--mac <mac>', 'guest MAC address')
    .option('-a, --active <k>', 'enable pairs 0..k-1 before QEMU starts (the guest driver decides later: see docs/launch.md)', intArg('--active'))
    .addOption(new Option('--existing <policy>', 'if the tap exists').choices(['allow', 'require', 'forbid']).default('allow'))
    .option('--persist', 'keep the tap after QEMU exits')
    .option('--dry-run', 'print the final QEMU command line and open nothing')
    .option('--json', 'machine-readable summary (on stderr while QEMU runs; stdout stays QEMU\'s)')
    .addHelpText(
      'after',
      '\nmqtap appends -netdev tap,id=ID,fds=...[,vhost=on,vhostfds=...] and -device virtio-net-pci,netdev=ID,mq=on,vectors=2N+2\n' +
        'unless ARGS already contain them: write fds=${MQTAP_FDS_NET0} (and vhostfds=${MQTAP_VHOSTFDS_NET0}) in your own -netdev,\n' +
        'or your own -device ...,netdev=ID.  QEMU gets exactly stdio and these fds; mqtap exits with QEMU\'s status and closes the tap.\n\n' +
        'Example: mqtap launch --queues 4 -- qemu-system-x86_64 -m 1G -nographic -kernel bzImage ...',
    )
    .action((qemu: string[], o: LaunchOpts, cmd: Command) => ctx.run(() => cmdLaunch(qemu, o, ctx.globals(cmd)), ctx.globals(cmd)));
}
