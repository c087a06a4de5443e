/**
 * Input validation (lib/sys/validate.ts, openTap's option checks in lib/tap/tap.ts).
 * Needs no root and no /dev/net/tun: every case here must be refused in
 * JavaScript before any syscall.  The last block proves that by spying on
 * every native function and by pointing devicePath at a path that would fail
 * differently (ENOENT) if the call ever reached open(2).
 */
import { readdirSync } from 'node:fs';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ErrorCodes, MqtapError } from '../../lib/sys/errors.js';
import { getLink } from '../../lib/tap/links.js';
import { K, native } from '../../lib/sys/native.js';
import { deleteTap, offloadFlags, openTap, type OpenTapOptions } from '../../lib/tap/tap.js';
import {
  MAX_IFNAME_BYTES,
  MAX_MTU,
  MAX_QUEUES,
  MIN_MTU,
  formatMac,
  isTemplate,
  parseMac,
  validateIfName,
  validateMtu,
  validateQueueCount,
  validateVnetHdrSize,
} from '../../lib/sys/validate.js';

/** Runs fn, expects an ERR_INVALID_ARG MqtapError, returns it. */
function invalid(fn: () => unknown): MqtapError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, 'expected a validation error').toBeInstanceOf(MqtapError);
  const e = caught as MqtapError;
  expect(e.code).toBe(ErrorCodes.INVALID_ARG);
  expect(e.op).toBe('VALIDATE');
  expect(e.isUsageError).toBe(true);
  expect(e.errno).toBeUndefined();
  return e;
}

describe('validateIfName', () => {
  it('accepts ordinary names up to 15 bytes and returns them', () => {
    expect(MAX_IFNAME_BYTES).toBe(15);
    for (const n of ['tap0', 'a', 'vm-01_net.q', 'x'.repeat(15), 'a.b', '...', 'é'.repeat(7) + 'a'])
      expect(validateIfName(n)).toBe(n);
  });

  it('refuses the empty name', () => {
    expect(invalid(() => validateIfName('')).message).toMatch(/empty/);
  });

  it('refuses 16 ASCII bytes and names whose UTF-8 encoding exceeds 15 bytes', () => {
    expect(invalid(() => validateIfName('x'.repeat(16))).message).toMatch(/16 bytes/);
    // 8 characters, 16 bytes: a length check in UTF-16 units would pass it.
    const multi = 'é'.repeat(8);
    expect(multi.length).toBe(8);
    expect(invalid(() => validateIfName(multi)).message).toMatch(/16 bytes/);
    // 4-byte characters: 4 of them are 16 bytes.
    expect(invalid(() => validateIfName('😀'.repeat(4))).message).toMatch(/16 bytes/);
    expect(validateIfName('😀'.repeat(3) + 'abc')).toBe('😀😀😀abc');
  });

  it("refuses '/', whitespace, NUL, ':' and the names '.' and '..'", () => {
    for (const bad of ['a/b', '/', 'a b', ' tap', 'tap\t', 'ta\np', 'a\0b', 'eth0:1', ':', '.', '..'])
      invalid(() => validateIfName(bad));
    expect(invalid(() => validateIfName('a/b')).message).toMatch(/"\/"/);
    expect(invalid(() => validateIfName('eth0:1')).message).toMatch(/":"/);
  });

  // BUG (lib/sys/validate.ts validateIfName): the kernel's dev_valid_name() runs
  // isspace() on each byte and its ctype table marks 0xA0 as a space, so a
  // name whose UTF-8 contains byte 0xA0 ('à' = C3 A0, 'Ġ' = C4 A0, ...) is
  // refused by the kernel (EINVAL) but passes validation.
  it("refuses names whose UTF-8 bytes the kernel counts as space (0xA0, as in 'à')", () => {
    expect(Buffer.from('tapà')).toEqual(Buffer.from([0x74, 0x61, 0x70, 0xc3, 0xa0]));
    invalid(() => validateIfName('tapà'));
    invalid(() => validateIfName('tap\u00a0x'));
    invalid(() => validateIfName('tap\vx'));
    invalid(() => validateIfName('tap\fx'));
  });

  it('refuses non-strings', () => {
    for (const bad of [undefined, null, 5, {}, ['tap0'], Buffer.from('tap0')]) invalid(() => validateIfName(bad));
  });

  it("accepts one '%d' only where a template is allowed", () => {
    expect(validateIfName('mqt%d', 'name', { template: true })).toBe('mqt%d');
    expect(validateIfName('%d', 'name', { template: true })).toBe('%d');
    expect(validateIfName('a%db', 'name', { template: true })).toBe('a%db');
    expect(isTemplate('mqt%d')).toBe(true);
    expect(isTemplate('mqt0')).toBe(false);
    expect(invalid(() => validateIfName('mqt%d')).hint).toMatch(/not a template/);
    invalid(() => validateIfName('mqt%d', 'name', { template: false }));
  });

  it("refuses '%s', '%d%d', '%%d' and a bare '%' even as templates", () => {
    for (const bad of ['mqt%s', 'mqt%d%d', '%%d', 'mqt%', '%x'])
      expect(invalid(() => validateIfName(bad, 'name', { template: true })).message).toMatch(/%/);
  });

  it('names the argument in the message', () => {
    expect(invalid(() => validateIfName('', 'netns')).message).toMatch(/^netns/);
  });
});

describe('queue counts', () => {
  it('accepts 1..256 integers', () => {
    expect(MAX_QUEUES).toBe(256);
    for (const n of [1, 2, 8, 255, 256]) expect(validateQueueCount(n)).toBe(n);
  });

  it("refuses 0, 257, -1, 1.5, '4', NaN, Infinity, null", () => {
    for (const bad of [0, 257, -1, 1.5, '4', Number.NaN, Number.POSITIVE_INFINITY, null, undefined, true]) {
      const e = invalid(() => validateQueueCount(bad));
      expect(e.hint).toMatch(/1 to 256/);
    }
    expect(invalid(() => validateQueueCount(257)).message).toMatch(/between 1 and 256 \(got 257\)/);
    expect(invalid(() => validateQueueCount('4')).message).toMatch(/integer \(got "4"\)/);
    expect(invalid(() => validateQueueCount(Number.NaN)).message).toMatch(/integer/);
  });

  // BUG (lib/sys/validate.ts validateInt, also validateBoolean/validateOneOf/
  // validateVnetHdrSize/parseMac): the message is built with
  // JSON.stringify(value), which throws "TypeError: Do not know how to
  // serialize a BigInt", so a BigInt escapes as a TypeError instead of an
  // ERR_INVALID_ARG MqtapError.
  it('refuses a BigInt with a validation error (not a TypeError)', () => {
    expect(invalid(() => validateQueueCount(4n)).message).toMatch(/integer/);
    invalid(() => validateMtu(1500n));
    invalid(() => validateVnetHdrSize(10n));
  });
});

describe('MAC addresses', () => {
  it('parses colon and dash forms, any case, into 6 bytes', () => {
    expect([...parseMac('52:54:00:12:34:56')]).toEqual([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    expect([...parseMac('02-AA-bb-CC-dd-EE')]).toEqual([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    expect(formatMac(parseMac('02-AA-bb-CC-dd-EE'))).toBe('02:aa:bb:cc:dd:ee');
  });

  it('refuses multicast (odd first octet) and broadcast', () => {
    for (const m of ['01:00:5e:00:00:01', '33:33:00:00:00:01', 'ff:ff:ff:ff:ff:ff', '03:00:00:00:00:01'])
      expect(invalid(() => parseMac(m)).message).toMatch(/multicast/);
  });

  it('refuses all zeros', () => {
    expect(invalid(() => parseMac('00:00:00:00:00:00')).message).toMatch(/zeros/);
  });

  it('refuses bad formats', () => {
    for (const bad of ['', '52:54:00:12:34', '52:54:00:12:34:56:78', '5254.0012.3456', '525400123456', 'zz:54:00:12:34:56', '52:54:00:12:34:5', ' 52:54:00:12:34:56', 42, null])
      expect(invalid(() => parseMac(bad)).message).toMatch(/look like/);
  });
});

describe('mtu, vnetHdrSize', () => {
  it('mtu must be an integer in 68..65521', () => {
    expect([MIN_MTU, MAX_MTU]).toEqual([68, 65521]);
    for (const ok of [68, 1500, 9000, 65521]) expect(validateMtu(ok)).toBe(ok);
    for (const bad of [67, 0, -1, 65522, 65536, 1500.5, '1500', Number.NaN]) invalid(() => validateMtu(bad));
  });

  it('vnetHdrSize must be 10, 12 or 20', () => {
    for (const ok of [10, 12, 20]) expect(validateVnetHdrSize(ok)).toBe(ok);
    for (const bad of [0, 8, 11, 16, 24, '10', undefined, null]) expect(invalid(() => validateVnetHdrSize(bad)).message).toMatch(/10, 12, 20/);
  });
});

describe('offloadFlags', () => {
  it('maps flags to TUN_F_* bits', () => {
    expect(offloadFlags({})).toBe(0);
    expect(offloadFlags({ csum: true })).toBe(K.TUN_F_CSUM);
    expect(offloadFlags({ csum: true, tso4: true, tso6: true, tsoEcn: true })).toBe(K.TUN_F_CSUM | K.TUN_F_TSO4 | K.TUN_F_TSO6 | K.TUN_F_TSO_ECN);
    expect(offloadFlags({ csum: false, tso4: false })).toBe(0);
  });

  it('refuses TSO/USO without csum, and tsoEcn without TSO', () => {
    for (const o of [{ tso4: true }, { tso6: true }, { csum: false, tso4: true }, { uso4: true }, { uso6: true }])
      expect(invalid(() => offloadFlags(o)).message).toMatch(/csum/);
    expect(invalid(() => offloadFlags({ csum: true, tsoEcn: true })).message).toMatch(/tsoEcn/);
  });

  it('refuses unknown keys, non-booleans and non-objects', () => {
    expect(invalid(() => offloadFlags({ csum: true, ufo: true } as never)).message).toMatch(/unknown option "ufo"/);
    invalid(() => offloadFlags({ csum: 'yes' } as never));
    invalid(() => offloadFlags({ csum: 1 } as never));
    invalid(() => offloadFlags(null as never));
    invalid(() => offloadFlags('csum' as never));
  });

  it('USO: uso4 and uso6 as a pair with the kernel UAPI values (0x20, 0x40), one alone refused', () => {
    expect(K.TUN_F_USO4).toBe(0x20);
    expect(K.TUN_F_USO6).toBe(0x40);
    expect(offloadFlags({ csum: true, uso4: true, uso6: true })).toBe(K.TUN_F_CSUM | 0x20 | 0x40);
    expect(offloadFlags({ csum: true, tso4: true, uso4: true, uso6: true })).toBe(K.TUN_F_CSUM | K.TUN_F_TSO4 | 0x60);
    for (const o of [{ csum: true, uso4: true }, { csum: true, uso6: true }, { csum: true, uso4: true, uso6: false }]) {
      const e = invalid(() => offloadFlags(o));
      expect(e.message).toMatch(/uso4 and uso6 go together/);
      expect(e.hint).toMatch(/both/);
    }
  });
});

describe('openTap option validation', () => {
  const BAD: Array<[string, unknown, RegExp]> = [
    ['no options', undefined, /options must be an object/],
    ['null options', null, /options must be an object/],
    ['string options', 'tap0', /options must be an object/],
    ['missing name', {}, /name must be a string/],
    ['typo queue: 4', { name: 'tap0', queue: 4 }, /unknown option "queue"/],
    ['unknown key', { name: 'tap0', multiQueue: true }, /unknown option "multiQueue"/],
    ["existing: 'maybe'", { name: 'tap0', existing: 'maybe' }, /existing must be one of/],
    ["'require' with a template", { name: 'mqt%d', existing: 'require' }, /needs a device name/],
    ['queues 0', { name: 'tap0', queues: 0 }, /queues must be between 1 and 256/],
    ['queues 257', { name: 'tap0', queues: 257 }, /queues must be between 1 and 256/],
    ['queues 1.5', { name: 'tap0', queues: 1.5 }, /queues must be an integer/],
    ["queues '4'", { name: 'tap0', queues: '4' }, /queues must be an integer/],
    ['queues NaN', { name: 'tap0', queues: Number.NaN }, /queues must be an integer/],
    ['bad name', { name: 'a/b' }, /"\/"/],
    ['long name', { name: 'x'.repeat(16) }, /16 bytes/],
    ["template '%s'", { name: 'mqt%s' }, /template/],
    ["template '%d%d'", { name: 'mqt%d%d' }, /template/],
    ['vnetHdr not boolean', { name: 'tap0', vnetHdr: 1 }, /vnetHdr must be true or false/],
    ['vnetHdrSize 11', { name: 'tap0', vnetHdrSize: 11 }, /vnetHdrSize/],
    ['vnetHdrSize without vnetHdr', { name: 'tap0', vnetHdr: false, vnetHdrSize: 12 }, /needs vnetHdr/],
    ['offloads without vnetHdr', { name: 'tap0', vnetHdr: false, offloads: { csum: true } }, /offloads need vnetHdr/],
    ['TSO without csum', { name: 'tap0', offloads: { tso4: true } }, /csum/],
    ['persist not boolean', { name: 'tap0', persist: 'yes' }, /persist/],
    ['owner -1', { name: 'tap0', owner: -1 }, /owner/],
    ['owner 2^32-1', { name: 'tap0', owner: 0xffffffff }, /owner/],
    ['group 1.5', { name: 'tap0', group: 1.5 }, /group/],
    ['mtu 67', { name: 'tap0', mtu: 67 }, /mtu/],
    ['mtu 65522', { name: 'tap0', mtu: 65522 }, /mtu/],
    ['multicast mac', { name: 'tap0', mac: '01:00:5e:00:00:01' }, /multicast/],
    ['zero mac', { name: 'tap0', mac: '00:00:00:00:00:00' }, /zeros/],
    ['bad mac', { name: 'tap0', mac: 'nope' }, /mac must look like/],
    ['up not boolean', { name: 'tap0', up: 1 }, /up must be true or false/],
    ['relative devicePath', { name: 'tap0', devicePath: 'dev/net/tun' }, /absolute/],
    ['netns not a string', { name: 'tap0', netns: 3 }, /netns/],
  ];

  const spies: Array<{ mockRestore(): void }> = [];
  afterEach(() => {
    for (const s of spies.splice(0)) s.mockRestore();
  });

  /** Spies on every function of the addon: none may run for a refused call. */
  function spyOnNative(): Array<{ name: string; calls: number }> {
    const out: Array<{ name: string; spy: ReturnType<typeof vi.spyOn> }> = [];
    for (const name of Object.keys(native) as Array<keyof typeof native>) {
      if (typeof native[name] !== 'function') continue;
      const spy = vi.spyOn(native, name as never);
      spies.push(spy);
      out.push({ name, spy });
    }
    expect(out.length).toBeGreaterThan(20);
    return out.map(({ name, spy }) => ({
      name,
      get calls() {
        return spy.mock.calls.length;
      },
    }));
  }

  it.each(BAD)('refuses %s before any syscall', (_what, opts, message) => {
    const calls = spyOnNative();
    // If validation were skipped, this devicePath would fail with ENOENT (TUN_OPEN) instead.
    const withPath =
      typeof opts === 'object' && opts !== null && !('devicePath' in opts) ? { ...opts, devicePath: '/nonexistent/mqtap/tun' } : opts;
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const e = invalid(() => openTap(withPath as OpenTapOptions));
    expect(e.message).toMatch(message);
    expect(readdirSync('/proc/self/fd').length).toBe(fdsBefore);
    expect(calls.filter((c) => c.calls > 0).map((c) => c.name)).toEqual([]);
  });

  it('a valid plan does reach the addon (the spies and devicePath trick are live)', () => {
    const calls = spyOnNative();
    let e: unknown;
    try {
      openTap({ name: 'mqt%d', devicePath: '/nonexistent/mqtap/tun' });
    } catch (err) {
      e = err;
    }
    expect(e).toBeInstanceOf(MqtapError);
    expect((e as MqtapError).code).toBe('ENOENT');
    expect((e as MqtapError).op).toBe('TUN_OPEN');
    expect(calls.find((c) => c.name === 'tunOpen')!.calls).toBe(1);
  });

  it('deleteTap and getLink validate the name before any syscall', () => {
    const calls = spyOnNative();
    invalid(() => deleteTap('a/b'));
    invalid(() => deleteTap('mqt%d'));
    invalid(() => getLink(''));
    invalid(() => getLink('x'.repeat(16)));
    expect(calls.filter((c) => c.calls > 0).map((c) => c.name)).toEqual([]);
  });
});
