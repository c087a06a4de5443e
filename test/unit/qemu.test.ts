/**
 * lib/qemu/qemu.ts without a kernel: the QEMU arguments for pre-opened tap and
 * vhost fds (fd numbering, vectors = 2N+2, device properties), QEMU's
 * -netdev tap rules applied before QEMU sees them, the parser QEMU's option
 * syntax needs (',,', type=, JSON), and planLaunch (placeholders, several
 * netdevs, the user's own -netdev/-device).  Plus `mqtap launch --dry-run`,
 * which opens nothing.
 */
import { existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors';
import { checkTapNetdevOptions, formatQemuSize, parseNetdevArg, parseQemuMemSize, planLaunch, planVhostUserLaunch, qemuAccel, qemuEscape, qemuNetdevArgs, validateQemuId, type ClosableNetdev } from '../../lib/qemu/qemu';
import { cliBuiltReason, runCli, type CliRun } from '../helpers/cli';

/** A stand-in netdev: fd numbers only (verifyFds: false keeps them away from the kernel). */
function fake(name: string, tap: number[], vhost: number[] = []): ClosableNetdev {
  return { name, tapFds: () => tap, vhostFds: () => vhost, close: () => undefined };
}
const range = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => from + i);
const noVerify = { verifyFds: false } as const;

function err(fn: () => unknown): MqtapError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MqtapError);
    return e as MqtapError;
  }
  throw new Error('expected an MqtapError');
}

describe('qemuNetdevArgs', () => {
  it('4 tap fds: fds=3:4:5:6,vhost=off and virtio-net-pci with mq=on,vectors=10; parent fds in child order', () => {
    const a = qemuNetdevArgs(fake('mqt0', [40, 41, 42, 43]), noVerify);
    expect(a.netdev).toEqual(['-netdev', 'tap,id=net0,fds=3:4:5:6,vhost=off']);
    expect(a.device).toEqual(['-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=10']);
    expect(a).toMatchObject({ parentFds: [40, 41, 42, 43], fds: [3, 4, 5, 6], vhostfds: [], nextFd: 7 });
  });

  it('with vhost fds: vhost=on,vhostfds= after the tap fds, one per queue', () => {
    const a = qemuNetdevArgs(fake('mqt0', [40, 41], [50, 51]), { ...noVerify, id: 'hn0' });
    expect(a.netdev[1]).toBe('tap,id=hn0,fds=3:4,vhost=on,vhostfds=5:6');
    expect(a.device[1]).toBe('virtio-net-pci,netdev=hn0,mq=on,vectors=6');
    expect(a).toMatchObject({ parentFds: [40, 41, 50, 51], fds: [3, 4], vhostfds: [5, 6], nextFd: 7 });
  });

  it('vectors = 2N+2 for every N; a single queue gets neither mq nor vectors (QEMU defaults fit)', () => {
    for (const n of [2, 3, 8, 64, 256]) {
      const dev = qemuNetdevArgs(fake('t', range(100, n)), noVerify).device[1]!;
      expect(dev).toContain(`,mq=on,vectors=${2 * n + 2}`);
    }
    expect(qemuNetdevArgs(fake('t', [9]), noVerify).device[1]).toBe('virtio-net-pci,netdev=net0');
  });

  it('fdBase moves every number; it must be >= 3', () => {
    const a = qemuNetdevArgs(fake('t', [40, 41], [50, 51]), { ...noVerify, fdBase: 10 });
    expect(a).toMatchObject({ fds: [10, 11], vhostfds: [12, 13], nextFd: 14 });
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, fdBase: 2 })).message).toMatch(/fdBase/);
  });

  it('refuses 0 queues (closed), more than 256, and vhost fd counts that differ from the tap fd count', () => {
    expect(err(() => qemuNetdevArgs(fake('t', []), noVerify)).code).toBe('ERR_CLOSED');
    const big = err(() => qemuNetdevArgs(fake('t', range(100, 257)), noVerify));
    expect(big.message).toMatch(/at most 256/);
    const mis = err(() => qemuNetdevArgs(fake('t', [40, 41, 42], [50, 51]), noVerify));
    expect(mis.code).toBe('ERR_INVALID_ARG');
    expect(mis.message).toMatch(/3 tap fd\(s\) but 2 vhost-net fd\(s\).*one vhost-net fd per tap queue/);
  });

  it('MAC normalized, bad MAC and bad id refused', () => {
    expect(qemuNetdevArgs(fake('t', [40]), { ...noVerify, mac: '52:54:00:AB:CD:EF' }).device[1]).toBe('virtio-net-pci,netdev=net0,mac=52:54:00:ab:cd:ef');
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, mac: '01:00:5e:00:00:01' })).code).toBe('ERR_INVALID_ARG');
    for (const id of ['0net', 'net 0', 'a,b', '', 'x'.repeat(128)]) expect(() => validateQemuId(id)).toThrow(/not well-formed/);
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, id: 'n,0' })).message).toMatch(/not well-formed/);
  });

  it('device properties: added or overriding, booleans as on/off, commas escaped for QEMU; netdev= is mqtap\'s', () => {
    const a = qemuNetdevArgs(fake('t', [40, 41]), { ...noVerify, deviceProps: { romfile: '', vectors: 4, 'x-txburst': 64, packed: true, bootindex: 'a,b' } });
    expect(a.device[1]).toBe('virtio-net-pci,netdev=net0,mq=on,vectors=4,romfile=,x-txburst=64,packed=on,bootindex=a,,b');
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, deviceProps: { netdev: 'x' } })).message).toMatch(/netdev= is set by mqtap/);
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, deviceProps: { 'a=b': 1 } })).message).toMatch(/not a QEMU property name/);
  });

  it('non-PCI models get mq=on but no MSI-X vectors', () => {
    expect(qemuNetdevArgs(fake('t', [40, 41]), { ...noVerify, model: 'virtio-net-device' }).device[1]).toBe('virtio-net-device,netdev=net0,mq=on');
    expect(qemuNetdevArgs(fake('t', [40, 41]), { ...noVerify, model: 'virtio-net-pci-non-transitional' }).device[1]).toContain('vectors=6');
    expect(err(() => qemuNetdevArgs(fake('t', [40]), { ...noVerify, model: 'virtio-net-pci,foo=1' })).message).toMatch(/not a QEMU device name/);
  });
});

describe("QEMU's -netdev tap rules (checkTapNetdevOptions)", () => {
  const check = (arg: string): void => checkTapNetdevOptions(parseNetdevArg(arg).options);

  it('accepts what mqtap generates and what libvirt passes', () => {
    check('tap,id=n0,fds=3:4:5:6,vhost=off');
    check('tap,id=n0,fds=3:4,vhost=on,vhostfds=5:6');
    check('tap,id=hostnet0,fds=27:29,vhost=on,vhostfds=30:31');
  });

  it.each(['queues=4', 'ifname=tap0', 'vnet_hdr=on', 'vhostfd=7', 'fd=7', 'script=no', 'downscript=no', 'helper=/x'])('refuses %s beside fds=', (extra) => {
    const e = err(() => check(`tap,id=n0,fds=3:4,${extra}`));
    expect(e.message).toContain(`${extra.split('=')[0]}= cannot be used with fds=`);
    expect(e.hint).toMatch(/pre-opened fds/);
  });

  it('fds and vhostfds counts must match; vhostfds needs fds; vhostfds with vhost=off is refused', () => {
    expect(err(() => check('tap,id=n0,fds=3:4:5:6,vhost=on,vhostfds=7:8:9')).message).toMatch(/fds= lists 4 fd\(s\) but vhostfds= lists 3/);
    expect(err(() => check('tap,id=n0,vhost=on,vhostfds=7:8')).message).toMatch(/vhostfds= needs fds=/);
    expect(err(() => check('tap,id=n0,fds=3,vhost=off,vhostfds=4')).message).toMatch(/vhost=off/);
  });

  it('1..256 fds, no fd twice, none in both lists, numbers (or monitor fd names) only', () => {
    expect(err(() => check(`tap,id=n0,fds=${range(3, 257).join(':')}`)).message).toMatch(/257 fds; 1 to 256/);
    check(`tap,id=n0,fds=${range(3, 256).join(':')}`);
    expect(err(() => check('tap,id=n0,fds=3:3')).message).toMatch(/twice/);
    expect(err(() => check('tap,id=n0,fds=3:4,vhostfds=4:5')).message).toMatch(/fd 4 is in both/);
    expect(err(() => check('tap,id=n0,fds=3::4')).message).toMatch(/not a ':'-separated list/);
    expect(err(() => check('tap,id=n0,fds=')).message).toMatch(/not a ':'-separated list/);
    check('tap,id=n0,fds=fdq0:fdq1');
  });
});

describe('parseNetdevArg', () => {
  it("splits on single commas; ',,' is a literal comma; a bare key reads as on", () => {
    const p = parseNetdevArg('tap,id=n0,fds=3:4,script=/a,,b,vhost');
    expect(p.type).toBe('tap');
    expect([...p.options]).toEqual([
      ['id', 'n0'],
      ['fds', '3:4'],
      ['script', '/a,b'],
      ['vhost', 'on'],
    ]);
  });

  it('type=tap and the JSON form', () => {
    expect(parseNetdevArg('type=tap,id=n0,fds=3').type).toBe('tap');
    const j = parseNetdevArg('{"type":"tap","id":"n0","fds":"3:4","vhost":true,"vhostfds":"5:6"}');
    expect(j.type).toBe('tap');
    expect(Object.fromEntries(j.options)).toEqual({ id: 'n0', fds: '3:4', vhost: 'on', vhostfds: '5:6' });
    expect(err(() => parseNetdevArg('{"type":')).message).toMatch(/not valid JSON/);
  });

  it('qemuEscape doubles commas', () => {
    expect(qemuEscape('a,b,,c')).toBe('a,,b,,,,c');
  });
});

describe('planLaunch', () => {
  const qemu = ['qemu-system-x86_64', '-m', '1G'];

  it('appends -netdev and -device; the argv is otherwise untouched', () => {
    const p = planLaunch({ netdevs: [{ netdev: fake('mqt0', [40, 41, 42, 43]), options: noVerify }], qemu });
    expect(p.argv).toEqual([...qemu, '-netdev', 'tap,id=net0,fds=3:4:5:6,vhost=off', '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=10']);
    expect(p.parentFds).toEqual([40, 41, 42, 43]);
    expect(p.netdevs).toEqual([{ id: 'net0', ifname: 'mqt0', fds: [3, 4, 5, 6], vhostfds: [], netdevArg: 'tap,id=net0,fds=3:4:5:6,vhost=off', deviceArg: 'virtio-net-pci,netdev=net0,mq=on,vectors=10' }]);
    expect(p.warnings).toEqual([]);
  });

  it('two netdevs x 2 queues with vhost: fds numbered on, tap fds then vhost fds per netdev', () => {
    const p = planLaunch({
      netdevs: [
        { netdev: fake('a0', [40, 41], [50, 51]), options: { ...noVerify, id: 'n0' } },
        { netdev: fake('b0', [60, 61], [70, 71]), options: { ...noVerify, id: 'n1' } },
      ],
      qemu,
    });
    expect(p.parentFds).toEqual([40, 41, 50, 51, 60, 61, 70, 71]);
    expect(p.netdevs.map((n) => [n.id, n.fds, n.vhostfds])).toEqual([
      ['n0', [3, 4], [5, 6]],
      ['n1', [7, 8], [9, 10]],
    ]);
    expect(p.argv.slice(3)).toEqual([
      '-netdev',
      'tap,id=n0,fds=3:4,vhost=on,vhostfds=5:6',
      '-device',
      'virtio-net-pci,netdev=n0,mq=on,vectors=6',
      '-netdev',
      'tap,id=n1,fds=7:8,vhost=on,vhostfds=9:10',
      '-device',
      'virtio-net-pci,netdev=n1,mq=on,vectors=6',
    ]);
  });

  it('fills ${MQTAP_FDS_<ID>} / ${MQTAP_VHOSTFDS_<ID>} in the user\'s -netdev and keeps the user\'s -device', () => {
    const p = planLaunch({
      netdevs: [{ netdev: fake('t0', [40, 41], [50, 51]), options: { ...noVerify, id: 'host-net.0' } }],
      qemu: ['qemu', '--netdev', 'tap,id=host-net.0,fds=${MQTAP_FDS_HOST_NET_0},vhost=on,vhostfds=${MQTAP_VHOSTFDS_HOST_NET_0}', '-device', 'virtio-net-pci,netdev=host-net.0,mq=on,vectors=4,id=nic0'],
    });
    expect(p.argv).toEqual(['qemu', '--netdev', 'tap,id=host-net.0,fds=3:4,vhost=on,vhostfds=5:6', '-device', 'virtio-net-pci,netdev=host-net.0,mq=on,vectors=4,id=nic0']);
    expect(p.warnings).toEqual([expect.stringMatching(/vectors=4 is fewer than 2N\+2 = 6/)]);
  });

  it('placeholder mistakes are refused with what to write instead', () => {
    const one = (qemuArgs: string[], vhost: number[] = [], id = 'net0'): MqtapError =>
      err(() => planLaunch({ netdevs: [{ netdev: fake('t0', [40, 41], vhost), options: { ...noVerify, id } }], qemu: ['qemu', ...qemuArgs] }));
    expect(one(['-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0}'], [50, 51]).message).toMatch(/vhost-net fds were opened for net0 but your -netdev has no vhostfds=/);
    expect(one(['-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},vhost=on,vhostfds=${MQTAP_VHOSTFDS_NET0}']).message).toMatch(/no vhost-net fds were opened/);
    expect(one(['-netdev', 'tap,id=other,fds=${MQTAP_FDS_NET0}']).message).toMatch(/has id=other; it must be id=net0/);
    expect(one(['-netdev', 'user,id=net0,fds=${MQTAP_FDS_NET0}']).message).toMatch(/pre-opened fds need -netdev tap/);
    expect(one(['-device', 'x,fds=${MQTAP_FDS_NET0}']).message).toMatch(/must be in a -netdev value/);
    expect(one(['-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0}', '-netdev', 'tap,id=x,fds=${MQTAP_FDS_NET0}']).message).toMatch(/appears 2 times/);
    expect(one(['-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},queues=2']).message).toMatch(/queues= cannot be used with fds=/);
    expect(one(['-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},vhostfds=7:8:9']).message).toMatch(/fds= lists 2 fd\(s\) but vhostfds= lists 3/);
    expect(one(['-netdev', 'tap,id=n9,fds=${MQTAP_FDS_N9}']).message).toMatch(/placeholder for a netdev id that is not launched/);
    const dup = one(['-netdev', 'tap,id=net0,fds=3:4']);
    expect(dup.message).toMatch(/already define -netdev id=net0/);
    expect(dup.hint).toContain('fds=${MQTAP_FDS_NET0}');
  });

  it('refuses a missing binary argument, no netdevs and a duplicate id', () => {
    expect(err(() => planLaunch({ netdevs: [{ netdev: fake('t', [40]), options: noVerify }], qemu: [] })).message).toMatch(/QEMU binary/);
    expect(err(() => planLaunch({ netdevs: [], qemu })).message).toMatch(/at least one netdev/);
    expect(
      err(() =>
        planLaunch({
          netdevs: [
            { netdev: fake('a', [40]), options: noVerify },
            { netdev: fake('b', [41]), options: noVerify },
          ],
          qemu,
        }),
      ).message,
    ).toMatch(/netdev id net0 is used twice/);
  });
});

describe('vhost-user launch arguments (planVhostUserLaunch)', () => {
  const Q = 'qemu-system-x86_64';
  const SOCK = '/tmp/d/vu.sock';
  const plan = (qemu: string[], more: Partial<Parameters<typeof planVhostUserLaunch>[0]> = {}): ReturnType<typeof planVhostUserLaunch> =>
    planVhostUserLaunch({ qemu: [Q, ...qemu], socket: SOCK, queues: 4, kvmUsable: false, ...more });

  it('every -m form QEMU takes: bare MiB, suffixes K/M/G/T (any case), fractions, size=... with slots/maxmem', () => {
    const cases: Array<[string, number]> = [
      ['512', 512 * 2 ** 20],
      ['512M', 512 * 2 ** 20],
      ['512m', 512 * 2 ** 20],
      ['1G', 2 ** 30],
      ['1.5G', 1.5 * 2 ** 30],
      ['2097152K', 2 ** 31],
      ['1T', 2 ** 40],
      ['size=1G', 2 ** 30],
      ['size=768', 768 * 2 ** 20],
      ['size=2G,slots=4,maxmem=8G', 2 ** 31],
      ['1G,slots=2,maxmem=4G', 2 ** 30],
    ];
    for (const [v, bytes] of cases) expect(parseQemuMemSize(v), v).toBe(bytes);
    for (const v of ['', 'lots', '1Q', 'size=', 'slots=2', '1G,foo=1', '0', '512K'])
      expect(err(() => parseQemuMemSize(v)).code, v).toBe('ERR_INVALID_ARG');
    expect([2 ** 30, 512 * 2 ** 20, 1.5 * 2 ** 30, 2 ** 40].map(formatQemuSize)).toEqual(['1G', '512M', '1536M', '1T']);
  });

  it('TCG (no accelerator given): shared memfd sized like -m, numa node on it, chardev with reconnect=1, queues=N, vectors=0', () => {
    const p = plan(['-m', '512', '-nographic']);
    expect(p.accel).toBe('tcg');
    expect(p.memBytes).toBe(512 * 2 ** 20);
    expect(p.argv).toEqual([
      Q, '-m', '512', '-nographic',
      '-object', 'memory-backend-memfd,id=mqtap-mem,size=512M,share=on',
      '-numa', 'node,memdev=mqtap-mem',
      '-chardev', `socket,id=net0-vu,path=${SOCK},reconnect=1`,
      '-netdev', 'vhost-user,id=net0,chardev=net0-vu,queues=4',
      '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=0',
    ]);
  });

  it('the last -m wins (as in QEMU); none: QEMU default 128M; a comma in the socket path is escaped', () => {
    expect(plan(['-m', '256M', '-m', 'size=1G']).memArgs[1]).toBe('memory-backend-memfd,id=mqtap-mem,size=1G,share=on');
    expect(plan([]).memArgs[1]).toBe('memory-backend-memfd,id=mqtap-mem,size=128M,share=on');
    expect(plan([], { socket: '/tmp/a,b/vu.sock' }).chardevArg).toBe('socket,id=net0-vu,path=/tmp/a,,b/vu.sock,reconnect=1');
  });

  it('KVM (usable /dev/kvm and -accel kvm, -enable-kvm or -machine accel=kvm): vectors=2N+2; without /dev/kvm the same args mean TCG: vectors=0', () => {
    for (const args of [['-accel', 'kvm'], ['-enable-kvm'], ['-machine', 'q35,accel=kvm:tcg'], ['-accel', 'kvm', '-accel', 'tcg'], ['-M', 'accel=kvm']]) {
      expect(qemuAccel([Q, ...args], true), args.join(' ')).toBe('kvm');
      expect(qemuAccel([Q, ...args], false), args.join(' ')).toBe('tcg');
      expect(plan(args, { kvmUsable: true }).deviceArg).toBe('virtio-net-pci,netdev=net0,mq=on,vectors=10');
      expect(plan(args, { kvmUsable: false }).deviceArg).toBe('virtio-net-pci,netdev=net0,mq=on,vectors=0');
    }
    expect(qemuAccel([Q, '-accel', 'tcg', '-accel', 'kvm'], true)).toBe('tcg');
    expect(qemuAccel([Q], true)).toBe('tcg');
    expect(plan(['-accel', 'kvm'], { kvmUsable: true, queues: 2 }).deviceArg).toBe('virtio-net-pci,netdev=net0,mq=on,vectors=6');
  });

  it('1 pair: no mq; id, mac and device properties go where they belong', () => {
    expect(plan([], { queues: 1 }).deviceArg).toBe('virtio-net-pci,netdev=net0,vectors=0');
    const p = plan([], { id: 'vn1', mac: '52:54:00:00:00:09', deviceProps: { romfile: '' } });
    expect(p.netdevArg).toBe('vhost-user,id=vn1,chardev=vn1-vu,queues=4');
    expect(p.deviceArg).toBe('virtio-net-pci,netdev=vn1,mq=on,vectors=0,mac=52:54:00:00:00:09,romfile=');
  });

  it("the user's own -device for the netdev is kept; under TCG it must say vectors=0", () => {
    const p = plan(['-device', 'virtio-net-pci,netdev=net0,vectors=0,mac=52:54:00:00:00:01']);
    expect(p.argv.filter((a) => a === '-device')).toHaveLength(1);
    expect(p.deviceArg).toBe('virtio-net-pci,netdev=net0,vectors=0,mac=52:54:00:00:00:01');
    for (const dev of ['virtio-net-pci,netdev=net0,vectors=10', 'virtio-net-pci,netdev=net0']) expect(err(() => plan(['-device', dev])).message).toMatch(/kvm_virtio_pci_irqfd_use/);
    expect(err(() => plan([], { deviceProps: { vectors: 10 } })).hint).toMatch(/vectors=0/);
    expect(plan(['-accel', 'kvm', '-device', 'virtio-net-pci,netdev=net0,vectors=4'], { kvmUsable: true }).warnings[0]).toMatch(/fewer than 2N\+2 = 10/);
  });

  it('refuses what conflicts with its memory backend, netdev or chardev, with a hint', () => {
    for (const [args, msg] of [
      [['-numa', 'node,mem=512'], /-numa node,mem=512/],
      [['-machine', 'q35,memory-backend=ram0'], /memory-backend=ram0/],
      [['-M', 'memory-backend=x'], /memory-backend=x/],
      [['-mem-path', '/dev/hugepages'], /-mem-path/],
      [['-object', 'memory-backend-ram,id=mqtap-mem,size=1G'], /id=mqtap-mem/],
      [['-netdev', 'user,id=net0'], /-netdev id=net0/],
      [['-chardev', 'socket,id=net0-vu,path=/x'], /-chardev id=net0-vu/],
      [['-m', 'lots'], /-m lots/],
    ] as Array<[string[], RegExp]>) {
      const e = err(() => plan(args));
      expect(e.code, args.join(' ')).toBe('ERR_INVALID_ARG');
      expect(e.message, args.join(' ')).toMatch(msg);
      expect(e.hint, args.join(' ')).toBeTruthy();
    }
    expect(err(() => plan([], { socket: 'vu.sock' })).message).toMatch(/absolute/);
    expect(err(() => plan([], { queues: 0 })).message).toMatch(/queues/);
  });
});

const notBuilt = cliBuiltReason();

describe.skipIf(!!notBuilt)(`mqtap launch --dry-run (opens nothing)${notBuilt ? ` (skipped: ${notBuilt})` : ''}`, () => {
  const run = (args: string[]): CliRun => runCli(['launch', ...args], { timeoutMs: 30_000 });

  it('prints the final command, shell-quoted, with the fd numbers QEMU will see', () => {
    const r = run(['--queues', '4', '--vhost', 'off', '--mac', '52:54:00:00:00:01', '--dry-run', '--', 'qemu-system-x86_64', '-append', 'console=ttyS0 quiet']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(
      "qemu-system-x86_64 -append 'console=ttyS0 quiet' -netdev tap,id=net0,fds=3:4:5:6,vhost=off -device virtio-net-pci,netdev=net0,mq=on,vectors=10,mac=52:54:00:00:00:01,romfile=",
    );
  });

  it('--json: tap, fds, vhostfds and the final argv; --device-prop overrides the romfile= default', () => {
    const r = run(['--name', 'vm7', '--queues', '2', '--vhost', 'on', '--id', 'hn0', '--device-prop', 'romfile=efi-virtio.rom', '--dry-run', '--json', '--', 'qemu-system-x86_64']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      dryRun: true,
      tap: 'vm7',
      id: 'hn0',
      queues: 2,
      fds: [3, 4],
      vhostfds: [5, 6],
      vhost: true,
      argv: ['qemu-system-x86_64', '-netdev', 'tap,id=hn0,fds=3:4,vhost=on,vhostfds=5:6', '-device', 'virtio-net-pci,netdev=hn0,mq=on,vectors=6,romfile=efi-virtio.rom'],
      warnings: [],
    });
  });

  it('--backend vhost-user --json: the socket in a temp dir, the accelerator, guest RAM and the final argv (vectors=0 without KVM)', () => {
    const r = run(['--backend', 'vhost-user', '--name', 'vu3', '--queues', '4', '--dry-run', '--json', '--', 'qemu-system-x86_64', '-m', '1G']);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { argv: string[]; socket: string };
    expect(j).toMatchObject({ dryRun: true, backend: 'vhost-user', tap: 'vu3', id: 'net0', queues: 4, accel: 'tcg', memBytes: 2 ** 30, warnings: [] });
    expect(j.socket).toMatch(/\/mqtap-launch-XXXXXX\/vu\.sock$/);
    expect(j.argv.slice(3)).toEqual([
      '-object', 'memory-backend-memfd,id=mqtap-mem,size=1G,share=on', '-numa', 'node,memdev=mqtap-mem',
      '-chardev', `socket,id=net0-vu,path=${j.socket},reconnect=1`, '-netdev', 'vhost-user,id=net0,chardev=net0-vu,queues=4',
      '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=0,romfile=',
    ]);
    const bad = run(['--backend', 'vhost-user', '--queues', '2', '--dry-run', '--', 'q', '-numa', 'node']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/-numa/);
  });

  it('--backend vhost-user refuses --vhost on (exit 2) and a missing QEMU (exit 127) before it opens a tap or makes a socket dir', () => {
    const dirs = (): string[] => readdirSync(tmpdir()).filter((f) => f.startsWith('mqtap-launch-'));
    const before = dirs();
    const on = run(['--backend', 'vhost-user', '--vhost', 'on', '--name', 'vux9', '--', 'qemu-system-x86_64']);
    expect(on.code).toBe(2);
    expect(on.stderr).toMatch(/--vhost on/);
    const missing = run(['--backend', 'vhost-user', '--name', 'vux9', '--queues', '2', '--', '/nonexistent/qemu-system-x86_64', '-m', '256']);
    expect(missing.code, missing.stderr).toBe(127);
    expect(missing.stderr).toMatch(/cannot run/);
    expect(dirs()).toEqual(before);
    expect(existsSync('/sys/class/net/vux9')).toBe(false);
  });

  it('usage errors exit 2 with a message and no stack trace', () => {
    for (const [args, msg] of [
      [['--queues', '4', '--active', '2', '--dry-run', '--', 'q'], /QEMU must be handed every queue enabled/],
      [['--queues', '2', '--active', '3', '--dry-run', '--', 'q'], /must be 1\.\.2/],
      [['--queues', '0', '--dry-run', '--', 'q'], /queues/],
      [['--queues', '257', '--dry-run', '--', 'q'], /queues/],
      [['--id', '9x', '--dry-run', '--', 'q'], /not well-formed/],
      [['--device-prop', 'romfile', '--dry-run', '--', 'q'], /KEY=VALUE/],
      [['--vhost', 'off', '--dry-run', '--', 'q', '-netdev', 'tap,id=net0,fds=${MQTAP_FDS_NET0},queues=4'], /queues= cannot be used with fds=/],
    ] as Array<[string[], RegExp]>) {
      const r = run(args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(msg);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
  });
});
