/**
 * QMP framing and the hotplug command builders (lib/qemu/qmp.ts, lib/qemu/hotplug.ts):
 * pure functions, no QEMU, no root.
 */
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import { deviceAddArgs, fdNamesFor, netdevAddArgs } from '../../lib/qemu/hotplug.js';
import { validateQemuId } from '../../lib/qemu/qemu';
import { QmpLineParser, encodeCommand } from '../../lib/qemu/qmp.js';

describe('QmpLineParser', () => {
  it('splits CRLF-terminated JSON objects, across and within chunks', () => {
    const p = new QmpLineParser();
    expect(p.push(Buffer.from('{"QMP": {"version": {}, "capabilities": []}}\r\n{"ret'))).toEqual([{ QMP: { version: {}, capabilities: [] } }]);
    expect(p.push(Buffer.from('urn": {}, "id": "a"}\r'))).toEqual([]);
    expect(p.push(Buffer.from('\n{"event": "STOP"}\r\n{"return": 1}\n\r\n'))).toEqual([{ return: {}, id: 'a' }, { event: 'STOP' }, { return: 1 }]);
  });

  it('keeps multi-byte UTF-8 split across chunks intact', () => {
    const p = new QmpLineParser();
    const bytes = Buffer.from('{"desc": "grüße"}\r\n');
    const cut = bytes.indexOf(0xc3) + 1;
    expect(p.push(bytes.subarray(0, cut))).toEqual([]);
    expect(p.push(bytes.subarray(cut))).toEqual([{ desc: 'grüße' }]);
  });

  it('refuses lines that are not JSON objects, and lines over the limit', () => {
    const code = (fn: () => unknown): string => {
      try {
        fn();
      } catch (err) {
        return (err as MqtapError).code;
      }
      return 'no error';
    };
    expect(code(() => new QmpLineParser().push(Buffer.from('nope\n')))).toBe('EPROTO');
    expect(code(() => new QmpLineParser().push(Buffer.from('[1]\n')))).toBe('EPROTO');
    expect(code(() => new QmpLineParser().push(Buffer.from('null\n')))).toBe('EPROTO');
    const small = new QmpLineParser(16);
    expect(code(() => small.push(Buffer.from('{"a": "0123456789abcdef"}\n')))).toBe('EPROTO');
    const growing = new QmpLineParser(16);
    growing.push(Buffer.from('{"a": "01234'));
    expect(code(() => growing.push(Buffer.from('56789abcdef')))).toBe('EPROTO');
  });
});

describe('encodeCommand', () => {
  it('one JSON line with execute, arguments and id', () => {
    const line = encodeCommand('netdev_add', { type: 'tap', vhost: false }, 'x-1');
    expect(line.endsWith('\n')).toBe(true);
    expect(line.slice(0, -1)).not.toContain('\n');
    expect(JSON.parse(line)).toEqual({ execute: 'netdev_add', arguments: { type: 'tap', vhost: false }, id: 'x-1' });
    expect(JSON.parse(encodeCommand('query-version', undefined, 7))).toEqual({ execute: 'query-version', id: 7 });
  });

  it('refuses bad command names and non-object arguments', () => {
    expect(() => encodeCommand('bad name', {}, 1)).toThrow(MqtapError);
    expect(() => encodeCommand('', {}, 1)).toThrow(MqtapError);
    expect(() => encodeCommand('x', [] as unknown as Record<string, unknown>, 1)).toThrow(MqtapError);
  });
});

describe('hotplug command builders', () => {
  it('netdev_add: tap with ":"-joined fd names and vhost as a JSON boolean', () => {
    const n = fdNamesFor('nic1', 4, true, 'abcd');
    expect(n.tap).toEqual(['mqtap-nic1-abcd-t0', 'mqtap-nic1-abcd-t1', 'mqtap-nic1-abcd-t2', 'mqtap-nic1-abcd-t3']);
    expect(n.vhost).toEqual(['mqtap-nic1-abcd-v0', 'mqtap-nic1-abcd-v1', 'mqtap-nic1-abcd-v2', 'mqtap-nic1-abcd-v3']);
    const withVhost = netdevAddArgs('nd1', n.tap, n.vhost);
    expect(withVhost).toEqual({ type: 'tap', id: 'nd1', fds: n.tap.join(':'), vhost: true, vhostfds: n.vhost.join(':') });
    expect(typeof withVhost.vhost).toBe('boolean');
    const without = netdevAddArgs('nd1', n.tap.slice(0, 2), []);
    expect(without).toEqual({ type: 'tap', id: 'nd1', fds: 'mqtap-nic1-abcd-t0:mqtap-nic1-abcd-t1', vhost: false });
    expect(JSON.stringify(without)).toContain('"vhost":false');
  });

  it('fd names are unique per call and never look like fd numbers', () => {
    const a = fdNamesFor('nic1', 2, false);
    const b = fdNamesFor('nic1', 2, false);
    expect(a.tap).not.toEqual(b.tap);
    expect(a.vhost).toEqual([]);
    for (const name of [...a.tap, ...b.tap]) expect(name).toMatch(/^[a-z]/);
  });

  it('device_add: virtio-net-pci, mq boolean, vectors 2N+2, romfile empty', () => {
    expect(deviceAddArgs({ id: 'nic1', netdevId: 'nd1', queues: 4 })).toEqual({ driver: 'virtio-net-pci', id: 'nic1', netdev: 'nd1', mq: true, vectors: 10, romfile: '' });
    expect(deviceAddArgs({ id: 'nic1', netdevId: 'nd1', queues: 1, bus: 'rp0', addr: '0.0', mac: '52:54:00:00:00:01' })).toEqual({
      driver: 'virtio-net-pci',
      id: 'nic1',
      netdev: 'nd1',
      mq: false,
      vectors: 4,
      romfile: '',
      bus: 'rp0',
      addr: '0.0',
      mac: '52:54:00:00:00:01',
    });
    expect(deviceAddArgs({ id: 'n', netdevId: 'd', queues: 256 }).vectors).toBe(514);
  });

  it('QEMU ids as id_wellformed() wants them', () => {
    for (const ok of ['a', 'nic1', 'Nic.1_x-y', 'a'.repeat(127)]) expect(validateQemuId(ok)).toBe(ok);
    for (const bad of ['', '1nic', '-a', 'a b', 'a/b', 'a:b', 'a'.repeat(128), 5, null]) expect(() => validateQemuId(bad)).toThrow(MqtapError);
  });
});
