/**
 * Device-wide settings on an open Tap, checked through the kernel's view
 * (rtnetlink) and the matching TUNGET* ioctls.  Runs in its own namespace.
 */
import { spawnSync } from 'node:child_process';
import { release } from 'node:os';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors';
import { isolateNetns, type IsolatedNetns } from '../../lib/sys/netns';
import { deleteTap, openTap, type Tap } from '../../lib/tap/tap';
import { getTap, listTaps } from '../../lib/tap/links';
import { native } from '../../lib/sys/native';
import { applyOffloads } from '../../lib/datapath/io';

import { needCommand, tapEnv } from '../helpers/env';

const reason = tapEnv().reason;

describe.skipIf(!!reason)(`tap device settings${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let ns: IsolatedNetns;
  let tap: Tap | undefined;
  beforeAll(() => {
    ns = isolateNetns();
  });
  afterEach(() => {
    tap?.close();
    tap = undefined;
    for (const t of listTaps()) deleteTap(t.name);
  });
  afterAll(() => ns?.restore());

  it('vnetHdrSize at open and later, read back with TUNGETVNETHDRSZ on every queue', () => {
    tap = openTap({ name: 'st%d', queues: 3, vnetHdrSize: 12 });
    expect(tap.vnetHdrSize()).toBe(12);
    for (const q of tap.queues) expect(native.tunGetVnetHdrSz(q.fd)).toBe(12); // per device: every queue agrees
    tap.setVnetHdrSize(10);
    expect(native.tunGetVnetHdrSz(tap.queues[2]!.fd)).toBe(10);
    expect(() => tap!.setVnetHdrSize(11 as 10)).toThrow(/vnetHdrSize must be one of/);
  });

  it('carrier off and on shows in the kernel operstate', () => {
    tap = openTap({ name: 'st%d', queues: 2, up: true });
    expect(getTap(tap.name)?.operstate).toBe('unknown'); // tun reports "unknown" while the carrier is on
    tap.setCarrier(false);
    expect(getTap(tap.name)?.operstate).toBe('down');
    tap.setCarrier(true);
    expect(getTap(tap.name)?.operstate).not.toBe('down');
  });

  it('offloads: accepted combinations and the kernel refusing one is a clear error', () => {
    tap = openTap({ name: 'st%d', offloads: { csum: true, tso4: true, tso6: true } });
    tap.setOffloads({});
    tap.setOffloads({ csum: true, tso4: true, tsoEcn: true });
    expect(() => tap!.setOffloads({ tso4: true })).toThrow(/need csum/);
    // applyOffloads (lib/datapath/io.ts) follows the same rules, USO probing aside
    expect(() => applyOffloads(tap!, { tso4: true })).toThrow(/need csum/);
    expect(() => applyOffloads(tap!, { csum: true, tsoEcn: true })).toThrow(/tsoEcn needs tso4 or tso6/);
    expect(() => applyOffloads(tap!, { uso: 'if-available' })).toThrow(/need csum/);
    expect(applyOffloads(tap!, { csum: true, tso4: true })).toMatchObject({ csum: true, tso4: true, uso: 'off' });
    const noHdr = openTap({ name: 'st%d', vnetHdr: false });
    try {
      expect(() => noHdr.setOffloads({ csum: true })).toThrow(/vnetHdr/);
    } finally {
      noHdr.close();
    }
  });

  it('offloads: uso4+uso6 as a pair — the kernel turns on UDP segmentation, or (before 6.2) refuses with a hint', () => {
    const [maj, min] = release().split('.').map(Number) as [number, number];
    const kernelHasUso = maj > 6 || (maj === 6 && min >= 2);
    let err: unknown;
    try {
      tap = openTap({ name: 'st%d', offloads: { csum: true, tso4: true, uso4: true, uso6: true } });
    } catch (e) {
      err = e;
    }
    if (!kernelHasUso) {
      expect(err).toBeInstanceOf(MqtapError);
      expect((err as MqtapError).code).toBe('EINVAL');
      expect((err as MqtapError).hint).toMatch(/USO needs Linux 6\.2/);
      expect(listTaps()).toEqual([]);
      return;
    }
    expect(err).toBeUndefined();
    const feature = (): string => {
      const r = spawnSync('ethtool', ['-k', tap!.name], { encoding: 'utf8' });
      if (r.error) return 'no ethtool';
      return /^tx-udp-segmentation: (\S+)/m.exec(r.stdout)?.[1] ?? 'missing';
    };
    if (feature() === 'no ethtool' && !needCommand('ethtool').ok) return; // USO checked only by TUNSETOFFLOAD succeeding
    expect(feature()).toBe('on');
    tap!.setOffloads({ csum: true, tso4: true });
    expect(feature()).toBe('off');
    expect(() => tap!.setOffloads({ csum: true, uso4: true })).toThrow(/uso4 and uso6 go together/);
  });

  it('setPersist keeps the device after close, and off again removes it with the last queue', () => {
    tap = openTap({ name: 'st%d' });
    const name = tap.name;
    tap.setPersist(true);
    tap.close();
    expect(getTap(name)?.tun.persist).toBe(true);
    tap = openTap({ name, existing: 'require' });
    tap.setPersist(false);
    tap.close();
    expect(getTap(name)).toBeUndefined();
  });

  it('device-wide calls on a closed tap fail with ERR_CLOSED', () => {
    tap = openTap({ name: 'st%d' });
    tap.close();
    try {
      tap.setCarrier(true);
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(MqtapError);
      expect((err as MqtapError).code).toBe('ERR_CLOSED');
    }
  });

  it('mtu, mac and up at open agree with iproute2', () => {
    tap = openTap({ name: 'st%d', mtu: 4000, mac: '52:54:00:ab:cd:ef', up: true });
    const r = spawnSync('ip', ['-d', '-j', 'link', 'show', tap.name], { encoding: 'utf8' });
    const link = JSON.parse(r.stdout)[0] as { mtu: number; address: string; flags: string[] };
    expect(link.mtu).toBe(4000);
    expect(link.address).toBe('52:54:00:ab:cd:ef');
    expect(link.flags).toContain('UP');
  });
});
