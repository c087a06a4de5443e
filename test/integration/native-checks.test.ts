/**
 * Checks the addon makes itself instead of trusting lib/, against the real
 * kernel in a throw-away network namespace:
 *  - bpfMapLookupElem verifies the key and value buffers against the map's
 *    own sizes (BPF_OBJ_GET_INFO_BY_FD; per-CPU maps: round_up(value, 8) per
 *    possible CPU) before the kernel writes into them;
 *  - rtnlGetLinks for one device that does not exist is ENODEV with the
 *    name, not an empty list; getLink turns that (and only that) into undefined.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { getLink, getTap } from '../../lib/tap/links.js';
import { native } from '../../lib/sys/native.js';
import { possibleCpus } from '../../lib/datapath/qstats.js';
import { catchError, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { thrownBy } from '../helpers/errors.js';

const env = tapEnv();
const BC = native.bpfConstants;

/** Whether this process may create BPF maps (CAP_BPF or CAP_SYS_ADMIN). */
function bpfReason(): string {
  try {
    native.close(native.bpfMapCreate(BC.BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, 'mqtap_probe'));
    return '';
  } catch (err) {
    const why = `cannot create a BPF map: ${(err as Error).message}`;
    if (process.env.MQTAP_VM_REQUIRED === '1') throw new Error(`${why} (MQTAP_VM_REQUIRED=1)`);
    console.warn(`bpf lookup checks skipped: ${why}`);
    return why;
  }
}
const noBpf = bpfReason();

describe.skipIf(!!noBpf)(`bpfMapLookupElem checks the buffer sizes itself${noBpf ? ` (skipped: ${noBpf})` : ''}`, () => {
  it('per-CPU array: exactly round_up(value, 8) x possible CPUs is accepted, one byte less is a TypeError', () => {
    const cpus = possibleCpus(readFileSync('/sys/devices/system/cpu/possible', 'utf8'));
    const map = native.bpfMapCreate(BC.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 12, 4, 0, 'mqtap_t_pcpu');
    try {
      const key = Buffer.alloc(4);
      const need = 16 * cpus; // 12 rounded to 8 = 16 per CPU
      const value = Buffer.alloc(need + 8, 0xee);
      expect(native.bpfMapLookupElem(map, key, value.subarray(0, need))).toBe(true);
      expect(value.subarray(0, need).every((b) => b === 0)).toBe(true); // the kernel wrote all of it
      expect(value.subarray(need).every((b) => b === 0xee)).toBe(true); // and not one byte more
      // What lib/ would pass if it forgot the rounding, or the per-CPU factor:
      for (const short of [need - 1, 12 * cpus, 16]) {
        if (short >= need) continue;
        const e = thrownBy(() => native.bpfMapLookupElem(map, key, Buffer.alloc(short)));
        expect(e).toBeInstanceOf(TypeError);
        expect(e.message).toContain(`value buffer is ${short} bytes; a value of this map is ${need} (12 rounded to 8, per possible CPU)`);
      }
      expect(thrownBy(() => native.bpfMapLookupElem(map, Buffer.alloc(2), Buffer.alloc(need))).message).toMatch(/key is 2 bytes; the map's keys are 4/);
      expect(native.bpfMapLookupElem(map, Buffer.from([9, 0, 0, 0]), Buffer.alloc(need))).toBe(false); // no such index: ENOENT
    } finally {
      native.close(map);
    }
  });

  it('plain array: value_size bytes, no per-CPU factor', () => {
    const map = native.bpfMapCreate(BC.BPF_MAP_TYPE_ARRAY, 4, 24, 2, 0, 'mqtap_t_arr');
    try {
      expect(native.bpfMapLookupElem(map, Buffer.alloc(4), Buffer.alloc(24))).toBe(true);
      expect(thrownBy(() => native.bpfMapLookupElem(map, Buffer.alloc(4), Buffer.alloc(23))).message).toMatch(/value buffer is 23 bytes; a value of this map is 24$/);
    } finally {
      native.close(map);
    }
  });

  it('an fd that is not a map: MqtapError from BPF_OBJ_GET_INFO_BY_FD, nothing looked up', () => {
    const efd = native.eventfdOpen();
    try {
      const e = catchError(() => native.bpfMapLookupElem(efd, Buffer.alloc(4), Buffer.alloc(8)));
      expect(e).toBeInstanceOf(MqtapError);
      expect(e).toMatchObject({ op: 'BPF_MAP_LOOKUP_ELEM', syscall: 'bpf', code: 'EINVAL' });
    } finally {
      native.close(efd);
    }
  });
});

describe.skipIf(!env.ok)(`rtnlGetLinks for a missing device${skipNote(env)}`, () => {
  useIsolatedNetns();

  it('is ENODEV naming the device; getLink/getTap answer undefined; an existing one still comes back', () => {
    const e = catchError(() => native.rtnlGetLinks('nosuch0'));
    expect(e).toBeInstanceOf(MqtapError);
    expect(e).toMatchObject({ op: 'RTM_GETLINK', code: 'ENODEV', errno: 19 });
    expect(e.message).toContain('nosuch0');
    expect(getLink('nosuch0')).toBeUndefined();
    expect(getTap('nosuch0')).toBeUndefined();
    expect(native.rtnlGetLinks('lo')).toHaveLength(1);
    expect(getLink('lo')?.name).toBe('lo');
  });
});
