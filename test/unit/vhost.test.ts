/**
 * vhost-net without a device (no root): feature-bit decoding and masks, the
 * header size the features imply, what the in-process driver accepts, the
 * probe on a missing or wrong device node, and argument validation of
 * openNetdev and the pair driver (refused before any syscall: no fd opened).
 */
import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../lib/sys/errors.js';
import { openNetdev, type OpenNetdevOptions } from '../../lib/vhost/netdev.js';
import {
  BACKEND_FEATURE_BITS,
  DRIVER_FEATURES,
  FEATURE_BITS,
  VHOST_NET_RX,
  VHOST_NET_TX,
  VhostPairDriver,
  decodeBackendFeatures,
  decodeFeatures,
  driverFeatureMask,
  featureMask,
  probeVhostNet,
  vnetHdrSizeFor,
} from '../../lib/vhost/vhost.js';
import { catchError } from '../helpers/errors.js';

const bit = (n: number): bigint => 1n << BigInt(n);
const fdCount = (): number => readdirSync('/proc/self/fd').length;

describe('feature bits', () => {
  it('have the virtio spec / linux/vhost.h bit numbers', () => {
    // Written out by hand from the virtio 1.2 spec and the kernel headers, not from the addon.
    expect(FEATURE_BITS).toMatchObject({
      CSUM: 0,
      GUEST_CSUM: 1,
      MAC: 5,
      MRG_RXBUF: 15,
      STATUS: 16,
      CTRL_VQ: 17,
      MQ: 22,
      NOTIFY_ON_EMPTY: 24,
      LOG_ALL: 26,
      ANY_LAYOUT: 27,
      VHOST_NET_VIRTIO_NET_HDR: 27,
      INDIRECT_DESC: 28,
      EVENT_IDX: 29,
      VERSION_1: 32,
      ACCESS_PLATFORM: 33,
      RING_PACKED: 34,
      IN_ORDER: 35,
    });
    expect(BACKEND_FEATURE_BITS).toMatchObject({ IOTLB_MSG_V2: 1, IOTLB_BATCH: 2 });
    expect([VHOST_NET_RX, VHOST_NET_TX]).toEqual([0, 1]);
  });

  it('decodeFeatures names every set bit, both names of bit 27, and lists unnamed bits', () => {
    expect(decodeFeatures(0n)).toEqual({ hex: '0x0', names: [], unknownBits: [] });
    expect(decodeFeatures(bit(32))).toEqual({ hex: '0x100000000', names: ['VERSION_1'], unknownBits: [] });
    expect(decodeFeatures(bit(27)).names.sort()).toEqual(['ANY_LAYOUT', 'VHOST_NET_VIRTIO_NET_HDR']);
    expect(decodeFeatures(bit(63) | bit(50) | bit(15))).toEqual({ hex: '0x8004000000008000', names: ['MRG_RXBUF'], unknownBits: [50, 63] });
    // What Linux 6.1's vhost-net offers (VHOST_NET_FEATURES).
    expect(decodeFeatures(0x33d008000n).names).toEqual([
      'MRG_RXBUF',
      'NOTIFY_ON_EMPTY',
      'LOG_ALL',
      'VHOST_NET_VIRTIO_NET_HDR',
      'ANY_LAYOUT',
      'INDIRECT_DESC',
      'EVENT_IDX',
      'VERSION_1',
      'ACCESS_PLATFORM',
    ]);
  });

  it('decodeFeatures and featureMask are inverse for every named bit', () => {
    for (const [name, b] of Object.entries(FEATURE_BITS)) {
      const m = featureMask([name]);
      expect(m).toBe(bit(b));
      expect(decodeFeatures(m).names).toContain(name);
      expect(featureMask(decodeFeatures(m).names)).toBe(m);
    }
    const all = featureMask(Object.keys(FEATURE_BITS));
    expect(featureMask(decodeFeatures(all).names)).toBe(all);
    expect(decodeFeatures(all).unknownBits).toEqual([]);
  });

  it('decodeFeatures refuses what is not a 64-bit mask', () => {
    for (const bad of [-1n, 1n << 64n, 5 as unknown as bigint, '0x1' as unknown as bigint]) {
      expect(catchError(() => decodeFeatures(bad)).code).toBe(ErrorCodes.INVALID_ARG);
    }
  });

  it('backend features are a separate bit space (bit 1 is IOTLB_MSG_V2, not GUEST_CSUM)', () => {
    expect(decodeBackendFeatures(0x2n)).toEqual({ hex: '0x2', names: ['IOTLB_MSG_V2'], unknownBits: [] });
    expect(decodeBackendFeatures(0x6n).names).toEqual(['IOTLB_MSG_V2', 'IOTLB_BATCH']);
    expect(decodeBackendFeatures(bit(40)).unknownBits).toEqual([40]);
  });

  it('featureMask ORs named bits and refuses unknown names (prototype keys included)', () => {
    expect(featureMask([])).toBe(0n);
    expect(featureMask(['VERSION_1', 'MRG_RXBUF'])).toBe(bit(32) | bit(15));
    expect(featureMask(['VERSION_1', 'VERSION_1'])).toBe(bit(32));
    for (const bad of [['VERSION_2'], ['toString'], ['__proto__'], [1 as unknown as string], 'VERSION_1' as unknown as string[]]) {
      const e = catchError(() => featureMask(bad));
      expect(e.code).toBe(ErrorCodes.INVALID_ARG);
    }
    expect(catchError(() => featureMask(['version_1'])).message).toMatch(/unknown feature "version_1" \(known: CSUM, .*VERSION_1/);
  });

  it('driverFeatureMask accepts what the driver implements and names what it refuses, and why', () => {
    expect(driverFeatureMask(DRIVER_FEATURES)).toBe(featureMask(DRIVER_FEATURES));
    expect(driverFeatureMask([])).toBe(0n);
    const cases: Array<[string, RegExp]> = [
      ['EVENT_IDX', /used_event/],
      ['ACCESS_PLATFORM', /IOTLB/],
      ['ANY_LAYOUT', /VHOST_NET_F_VIRTIO_NET_HDR/],
      ['VHOST_NET_VIRTIO_NET_HDR', /header itself/],
      ['LOG_ALL', /dirty-page log/],
      ['RING_PACKED', /split rings only/],
      ['MQ', /device feature/],
    ];
    for (const [name, why] of cases) {
      const e = catchError(() => driverFeatureMask(['VERSION_1', name]));
      expect(e.code, name).toBe(ErrorCodes.UNSUPPORTED);
      expect(e.message, name).toMatch(new RegExp(`cannot negotiate .*${name}`));
      expect(e.message, name).toMatch(why);
      expect(e.hint).toMatch(/implements VERSION_1, MRG_RXBUF/);
    }
    expect(catchError(() => driverFeatureMask(['NOPE'])).code).toBe(ErrorCodes.INVALID_ARG);
  });
});

describe('vnetHdrSizeFor', () => {
  it('is 12 with VERSION_1 or MRG_RXBUF, else 10', () => {
    expect(vnetHdrSizeFor(0n)).toBe(10);
    expect(vnetHdrSizeFor(bit(32))).toBe(12);
    expect(vnetHdrSizeFor(bit(15))).toBe(12);
    expect(vnetHdrSizeFor(bit(32) | bit(15))).toBe(12);
    expect(vnetHdrSizeFor(bit(29) | bit(28) | bit(24))).toBe(10);
    expect(vnetHdrSizeFor(featureMask(['EVENT_IDX', 'VERSION_1']))).toBe(12);
  });
});

describe('probeVhostNet', () => {
  it('a missing device node: not present, not usable, ENOENT with the modprobe hint (never throws)', () => {
    const p = probeVhostNet({ devicePath: '/nonexistent/vhost-net' });
    expect(p).toMatchObject({ devicePath: '/nonexistent/vhost-net', present: false, openable: false, usable: false });
    expect(p.error?.code).toBe('ENOENT');
    expect(p.error?.hint).toMatch(/modprobe vhost_net/);
    expect(p.features).toBeUndefined();
  });

  it('a node that is not vhost-net (/dev/null): openable but not usable, ENOTTY explained (never throws)', () => {
    const before = fdCount();
    const p = probeVhostNet({ devicePath: '/dev/null' });
    expect(p).toMatchObject({ present: true, openable: true, usable: false });
    expect(p.error?.code).toBe('ENOTTY');
    expect(p.error?.message).toMatch(/\/dev\/null is not a vhost-net device/);
    expect(p.error?.hint).toMatch(/modprobe vhost_net/);
    expect(fdCount()).toBe(before);
  });
});

describe('argument validation (before any syscall)', () => {
  const base = { name: 'nd%d', pairs: 2 } as const;
  const cases: Array<[string, unknown, RegExp]> = [
    ['options not an object', null, /options must be an object/],
    ['options a string', 'nd0', /options must be an object/],
    ['pairs missing', { name: 'nd0' }, /pairs must be an integer/],
    ['pairs 0', { ...base, pairs: 0 }, /pairs must be between 1 and 256/],
    ['pairs 257', { ...base, pairs: 257 }, /pairs must be between 1 and 256/],
    ['pairs 1.5', { ...base, pairs: 1.5 }, /pairs must be an integer/],
    ['pairs as string', { ...base, pairs: '2' }, /pairs must be an integer/],
    ['queues instead of pairs', { ...base, queues: 2 }, /use pairs, not queues/],
    ['vhost unknown', { ...base, vhost: 'yes' }, /vhost/],
    ['vhost boolean', { ...base, vhost: true }, /vhost/],
    ['vhostDevicePath relative', { ...base, vhostDevicePath: 'dev/vhost-net' }, /vhostDevicePath must be an absolute path/],
    ['vhostDevicePath number', { ...base, vhostDevicePath: 3 }, /vhostDevicePath must be an absolute path/],
    ['name missing', { pairs: 1 }, /name must be a string/],
    ['name empty', { ...base, name: '' }, /name must not be empty/],
    ['name too long', { ...base, name: 'a-very-long-ifname' }, /at most 15 bytes/],
    ['name with slash', { ...base, name: 'a/b' }, /must not contain "\/"/],
    ['vnetHdr not boolean', { ...base, vnetHdr: 'no' }, /vnetHdr must be a boolean/],
    ['vhost on without vnet header', { ...base, vhost: 'on', vnetHdr: false }, /vhost needs the virtio-net header/],
  ];
  for (const [what, opts, msg] of cases) {
    it(`openNetdev refuses: ${what}`, () => {
      const before = fdCount();
      const e = catchError(() => openNetdev(opts as OpenNetdevOptions));
      expect(e.code).toBe(ErrorCodes.INVALID_ARG);
      expect(e.isUsageError).toBe(true);
      expect(e.message).toMatch(msg);
      expect(fdCount()).toBe(before);
    });
  }

  it('the pair driver refuses bad ring sizes, buffer sizes, features and start indices before touching its fds', () => {
    const before = fdCount();
    // FREE is not an open fd, so the first ioctl would fail with EBADF: these must fail earlier, as usage errors.
    const FREE = 1_000_000;
    expect(catchError(() => new VhostPairDriver(-1, FREE)).message).toMatch(/vhostFd must be an open fd/);
    expect(catchError(() => new VhostPairDriver(FREE, 1.5)).message).toMatch(/tapFd must be an open fd/);
    const cases: Array<[object, RegExp]> = [
      [{ queueSize: 3 }, /queue size must be a power of two/],
      [{ queueSize: 65536 }, /queue size must be a power of two from 1 to 32768/],
      [{ bufSize: 16 }, /buffer size must be an integer from 64/],
      [{ features: ['VERSION_2'] }, /unknown feature "VERSION_2"/],
      [{ features: 'VERSION_1' }, /features must be an array/],
      [{ startIndex: 65536 }, /startIndex must be 0\.\.65535/],
      [{ bufSize: 64, features: ['VERSION_1'] }, /cannot hold a 12-byte header and a minimum Ethernet frame/],
    ];
    for (const [opts, msg] of cases) {
      const e = catchError(() => new VhostPairDriver(FREE, FREE, opts));
      expect(e.code, JSON.stringify(opts)).toBe(ErrorCodes.INVALID_ARG);
      expect(e.message).toMatch(msg);
    }
    // Valid options: the first syscall (VHOST_GET_FEATURES on a closed fd) fails, and nothing is left open.
    const e = catchError(() => new VhostPairDriver(FREE, FREE, {}));
    expect(e).toMatchObject({ code: 'EBADF', op: 'VHOST_GET_FEATURES' });
    expect(fdCount()).toBe(before);
  });
});
