/**
 * txQueueLen (IFLA_TXQLEN) on the real kernel, in a throw-away namespace:
 * the value lands (rtnetlink, sysfs, iproute2), it is each queue's ring
 * length (a flood while nobody reads keeps exactly txQueueLen frames and the
 * kernel counts the rest in tx_dropped; a longer ring keeps more), a length
 * the kernel cannot allocate fails and leaves nothing behind, and on a
 * device that existed before, openTap puts the old length back when a later
 * step fails.
 */
import type dgram from 'node:dgram';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MqtapError } from '../../lib/sys/errors';
import { native } from '../../lib/sys/native';
import { getLink, getTap, listTaps } from '../../lib/tap/links';
import { openTap, type Tap } from '../../lib/tap/tap';
import { drainFrames } from '../../lib/datapath/frames';
import { bindUdp, sendUdp } from '../helpers/net';
import { catchError, fdCount, ipLink, netnsSysctls, run, skipNote, tapEnv, useIsolatedNetns, useTapTracker } from '../helpers/env';

const env = tapEnv();

const LOCAL = '169.254.77.1';
const PEER = '169.254.77.2';

/**
 * iproute2's view (`ip -j link` reports tx_queue_len as "txqlen").  Not
 * /sys/class/net: sysfs shows the namespace it was mounted in, not this
 * thread's throw-away one.
 */
function ipTxqlen(name: string): number | undefined {
  return (ipLink(name) as { txqlen?: number } | undefined)?.txqlen;
}

describe.skipIf(!env.ok)(`txQueueLen${skipNote(env)}`, () => {
  useIsolatedNetns();
  const track = useTapTracker();
  const sockets: dgram.Socket[] = [];
  beforeAll(() => {
    // No IPv6: no DAD/MLD frames in the rings that are counted.
    netnsSysctls();
  });
  afterEach(() => {
    vi.restoreAllMocks();
    for (const s of sockets.splice(0)) s.close();
    for (const t of listTaps()) run('ip', ['link', 'del', t.name]);
  });

  it('openTap({ txQueueLen }) sets the device tx_queue_len: rtnetlink and iproute2 agree; setTxQueueLen changes it later', () => {
    const tap = track(openTap({ name: 'tq%d', queues: 2 }));
    const dflt = getTap(tap.name)!.txQueueLen;
    expect(dflt).toBeGreaterThan(0);
    expect(ipTxqlen(tap.name)).toBe(dflt);
    const other = track(openTap({ name: 'tq%d', queues: 3, txQueueLen: 4096 }));
    expect(getTap(other.name)!.txQueueLen).toBe(4096);
    expect(ipTxqlen(other.name)).toBe(4096);
    expect(ipTxqlen(tap.name), 'the other tap keeps its length').toBe(dflt);
    other.setTxQueueLen(77);
    expect(ipTxqlen(other.name)).toBe(77);
    expect(() => other.setTxQueueLen(0)).toThrow(/txQueueLen must be between 1 and 4294967295/);
  });

  /** Sends `n` datagrams out of the tap (nobody reads), then reads the queue dry: what was kept, what the kernel dropped. */
  async function flood(tap: Tap, n: number): Promise<{ kept: number; dropped: number; read: number }> {
    const s = await bindUdp(LOCAL);
    sockets.push(s);
    const before = getLink(tap.name)!.stats!;
    for (let i = 0; i < n; i++) await sendUdp(s, Buffer.from(`flood ${i}`), 40000, PEER);
    const fd = tap.queues[0]!.fd;
    native.setNonBlocking(fd, true);
    let kept = 0;
    drainFrames(fd, Buffer.alloc(70000), () => kept++);
    const after = getLink(tap.name)!.stats!;
    return { kept, dropped: after.txDropped - before.txDropped, read: after.txPackets - before.txPackets };
  }

  function upTap(len: number): Tap {
    const tap = track(openTap({ name: 'tqf0', queues: 1, txQueueLen: len, mac: '02:00:00:00:77:01' }));
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', tap.name]);
    run('ip', ['link', 'set', 'dev', tap.name, 'up']);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', '02:00:00:00:77:02', 'dev', tap.name, 'nud', 'permanent']);
    return tap;
  }

  it('each queue ring holds txQueueLen frames: a flood nobody reads keeps exactly that many and the kernel counts the rest as tx_dropped; a longer ring keeps more', async () => {
    const SENT = 150;
    const shortTap = upTap(20);
    expect(await flood(shortTap, SENT)).toEqual({ kept: 20, read: 20, dropped: SENT - 20 });
    shortTap.close();
    const tap = upTap(100);
    expect(await flood(tap, SENT)).toEqual({ kept: 100, read: 100, dropped: SENT - 100 });
    // Resizing an open queue's ring (tun_queue_resize) applies at once.
    tap.setTxQueueLen(8);
    expect(await flood(tap, 30)).toEqual({ kept: 8, read: 8, dropped: 22 });
  });

  it('bad values are refused before any syscall, with a hint', () => {
    const fds = fdCount();
    for (const bad of [0, -1, 1.5, 2 ** 32, '64', Number.NaN]) {
      const e = catchError(() => openTap({ name: 'tqb0', txQueueLen: bad as number }));
      expect(e).toBeInstanceOf(MqtapError);
      expect(e).toMatchObject({ code: 'ERR_INVALID_ARG' });
      expect((e as MqtapError).hint).toMatch(/ring holds/);
    }
    expect(getLink('tqb0')).toBeUndefined();
    expect(fdCount()).toBe(fds);
  });

  it('a length the kernel cannot allocate rings for: IFLA_TXQLEN error with a hint, the new device and every fd gone', () => {
    const fds = fdCount();
    const e = catchError(() => openTap({ name: 'tqk0', queues: 2, txQueueLen: 0xffffffff, mtu: 2000 }));
    expect(e).toBeInstanceOf(MqtapError);
    expect(e).toMatchObject({ op: 'IFLA_TXQLEN', ifname: 'tqk0' });
    // The tun driver's ring resize failing comes back as EPERM (its notifier's NOTIFY_BAD) or ENOMEM; with
    // CAP_NET_ADMIN held (as here) EPERM is not a permission problem: a usage error, the errno kept.
    const err = e as MqtapError;
    if (err.errno === native.ioConstants.EPERM) expect(err).toMatchObject({ code: 'ERR_INVALID_ARG', isUsageError: true });
    else expect(err.code).toBe('ENOMEM');
    expect(err.hint).toMatch(/smaller txQueueLen/);
    expect(getLink('tqk0')).toBeUndefined();
    expect(fdCount()).toBe(fds);
  });

  it('an existing tap: applied with existing: require, and put back (with the mtu) when the kernel refuses the length or a later step fails', () => {
    run('ip', ['tuntap', 'add', 'dev', 'tqe0', 'mode', 'tap', 'multi_queue']);
    run('ip', ['link', 'set', 'dev', 'tqe0', 'mtu', '1400', 'txqueuelen', '333']);
    // the kernel refuses the length: the mtu changed before it is restored
    const e1 = catchError(() => openTap({ name: 'tqe0', existing: 'require', mtu: 3000, txQueueLen: 0xffffffff }));
    expect(e1).toMatchObject({ op: 'IFLA_TXQLEN' });
    expect(getTap('tqe0')).toMatchObject({ mtu: 1400, txQueueLen: 333, tun: { numQueues: 0 } });
    // a step after it fails: the length is restored
    vi.spyOn(native, 'ifSetMac').mockImplementationOnce(() => {
      throw new MqtapError({ op: 'SIOCSIFHWADDR', syscall: 'ioctl', errno: 99 });
    });
    const e2 = catchError(() => openTap({ name: 'tqe0', existing: 'require', txQueueLen: 50, mac: '02:00:00:00:77:09' }));
    expect(e2).toMatchObject({ op: 'SIOCSIFHWADDR' });
    expect((e2 as MqtapError).message).not.toMatch(/could not restore/);
    expect(ipTxqlen('tqe0')).toBe(333);
    vi.restoreAllMocks();
    // and applied when nothing fails; it stays with the (persistent) device
    track(openTap({ name: 'tqe0', existing: 'require', txQueueLen: 50 })).close();
    expect(ipTxqlen('tqe0')).toBe(50);
    // forbid: refused before anything changes
    expect(catchError(() => openTap({ name: 'tqe0', existing: 'forbid', txQueueLen: 60 }))).toMatchObject({ code: 'EEXIST' });
    expect(ipTxqlen('tqe0')).toBe(50);
  });
});
