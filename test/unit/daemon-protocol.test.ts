/**
 * The daemon's wire protocol (lib/daemon/protocol.ts): request parsing and
 * validation, reply encoding and parsing.  Pure functions, no root, no
 * sockets.
 */
import { describe, expect, it } from 'vitest';
import { MqtapError } from '../../lib/sys/errors.js';
import {
  MAX_FDS_PER_MESSAGE,
  MAX_REPLY_BYTES,
  MAX_REQUEST_BYTES,
  OPS,
  ProtocolError,
  encodeFdChunk,
  encodeReply,
  encodeRequest,
  errorToWire,
  fdChunks,
  parseReply,
  parseRequest,
  validateArgs,
  wireToError,
} from '../../lib/daemon/protocol.js';

const buf = (v: unknown): Buffer => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v));

function protoErr(fn: () => unknown): ProtocolError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ProtocolError);
    return err as ProtocolError;
  }
  throw new Error('expected a ProtocolError');
}

function argErr(fn: () => unknown): MqtapError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(MqtapError);
    expect((err as MqtapError).code).toBe('ERR_INVALID_ARG');
    return err as MqtapError;
  }
  throw new Error('expected an ERR_INVALID_ARG error');
}

describe('parseRequest', () => {
  it('accepts {id, op, args} with numeric or string ids; args default to {}', () => {
    expect(parseRequest(buf({ id: 1, op: 'list' }))).toEqual({ id: 1, op: 'list', args: {} });
    expect(parseRequest(buf({ id: 'a-1', op: 'show', args: { name: 'x' } }))).toEqual({ id: 'a-1', op: 'show', args: { name: 'x' } });
    expect(parseRequest(buf({ id: 0, op: 'hello', args: {} })).id).toBe(0);
  });

  it('knows exactly the documented ops', () => {
    expect([...OPS]).toEqual(['hello', 'create', 'open', 'list', 'show', 'set-active', 'acquire', 'release', 'hotplug', 'unplug', 'delete', 'serve-vhost-user', 'stop-vhost-user']);
    for (const op of OPS) expect(parseRequest(buf({ id: 1, op })).op).toBe(op);
  });

  it('refuses what is not a JSON object, without an id to answer to', () => {
    for (const bad of ['', 'nope', '{', '[1,2]', '"str"', '42', 'null', 'true']) {
      const e = protoErr(() => parseRequest(buf(bad)));
      expect(e.code).toBe('ERR_PROTOCOL');
      expect(e.requestId).toBeNull();
    }
  });

  it('refuses invalid UTF-8', () => {
    const e = protoErr(() => parseRequest(Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d])));
    expect(e.message).toMatch(/UTF-8/);
  });

  it('refuses bad ids', () => {
    for (const id of [undefined, null, -1, 1.5, Number.MAX_SAFE_INTEGER + 2, '', 'x'.repeat(65), {}, [], true]) {
      const e = protoErr(() => parseRequest(buf({ id, op: 'list' })));
      expect(e.requestId).toBeNull();
      expect(e.message).toMatch(/"id"/);
    }
  });

  it('names the request id once it could be read, for op and args errors', () => {
    const unknown = protoErr(() => parseRequest(buf({ id: 9, op: 'format-disk' })));
    expect(unknown.code).toBe('ERR_UNKNOWN_OP');
    expect(unknown.requestId).toBe(9);
    expect(protoErr(() => parseRequest(buf({ id: 9, op: 7 }))).requestId).toBe(9);
    expect(protoErr(() => parseRequest(buf({ id: 9, op: 'list', args: [1] }))).message).toMatch(/"args" must be an object/);
    expect(protoErr(() => parseRequest(buf({ id: 9, op: 'list', args: null }))).requestId).toBe(9);
    expect(protoErr(() => parseRequest(buf({ id: 9, op: 'list', extra: 1 }))).message).toMatch(/unknown field "extra"/);
  });

  it('refuses requests above the size limit', () => {
    const big = Buffer.alloc(MAX_REQUEST_BYTES + 1, 0x20);
    expect(protoErr(() => parseRequest(big)).code).toBe('EMSGSIZE');
    const okSize = buf({ id: 1, op: 'list', args: {} });
    expect(okSize.length).toBeLessThan(MAX_REQUEST_BYTES);
  });

  it('survives deeply nested JSON', () => {
    const deep = `{"id":1,"op":"list","args":${'['.repeat(30_000)}${']'.repeat(30_000)}}`;
    expect(deep.length).toBeLessThan(MAX_REQUEST_BYTES);
    const e = protoErr(() => parseRequest(buf(deep)));
    expect(e.code).toBe('ERR_PROTOCOL');
    expect(e.requestId).toBe(1);
  });
});

describe('validateArgs', () => {
  it('create: defaults (vhost auto, not persistent) and every option checked', () => {
    expect(validateArgs('create', { name: 'mqt%d', pairs: 4 })).toEqual({ name: 'mqt%d', pairs: 4, vhost: 'auto', persist: false });
    const full = validateArgs('create', {
      name: 'vm1-net0',
      pairs: 8,
      vhost: 'off',
      persist: true,
      active: 2,
      mtu: 9000,
      mac: '52:54:00:12:34:56',
      up: true,
      owner: 1000,
      group: 1000,
      vnetHdrSize: 12,
      netns: 'vm1',
    });
    expect(full).toMatchObject({ name: 'vm1-net0', pairs: 8, vhost: 'off', persist: true, active: 2, mtu: 9000, vnetHdrSize: 12, netns: 'vm1' });
    argErr(() => validateArgs('create', { name: 'x', pairs: 0 }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 257 }));
    argErr(() => validateArgs('create', { name: 'x', pairs: '4' }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, active: 3 }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, vhost: 'yes' }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, vhost: true }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, persist: 'true' }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, mac: '01:00:5e:00:00:01' }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, mtu: 10 }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, vnetHdrSize: 11 }));
    argErr(() => validateArgs('create', { name: 'x', pairs: 2, netns: '' }));
    argErr(() => validateArgs('create', { name: 'a/b', pairs: 2 }));
    argErr(() => validateArgs('create', { name: 'x'.repeat(16), pairs: 2 }));
    expect(argErr(() => validateArgs('create', { name: 'x', pairs: 2, queues: 2 })).message).toMatch(/unknown option "queues"/);
  });

  it('names: templates only for create', () => {
    argErr(() => validateArgs('show', { name: 'mqt%d' }));
    argErr(() => validateArgs('open', { name: 'mqt%d', pairs: 1 }));
    argErr(() => validateArgs('delete', { name: 'mqt%d' }));
    expect(validateArgs('show', { name: 'mqt0' })).toEqual({ name: 'mqt0' });
  });

  it('set-active, delete, unplug', () => {
    expect(validateArgs('set-active', { name: 't0', pairs: 3 })).toEqual({ name: 't0', pairs: 3 });
    argErr(() => validateArgs('set-active', { name: 't0', pairs: 0 }));
    argErr(() => validateArgs('set-active', { name: 't0' }));
    expect(validateArgs('delete', { name: 't0' })).toEqual({ name: 't0', force: false });
    expect(validateArgs('delete', { name: 't0', force: true })).toEqual({ name: 't0', force: true });
    argErr(() => validateArgs('delete', { name: 't0', force: 1 }));
    expect(validateArgs('unplug', { name: 't0', timeoutMs: 5000 })).toEqual({ name: 't0', timeoutMs: 5000 });
    argErr(() => validateArgs('unplug', { name: 't0', timeoutMs: 10 }));
  });

  it('hotplug: absolute QMP path that fits sun_path, QEMU ids', () => {
    expect(validateArgs('hotplug', { name: 't0', qmp: '/run/vm1/qmp.sock', id: 'nic1', bus: 'rp0', addr: '0.0', mac: '52:54:00:00:00:01', netdevId: 'nd1' })).toEqual({
      name: 't0',
      qmp: '/run/vm1/qmp.sock',
      id: 'nic1',
      bus: 'rp0',
      addr: '0.0',
      mac: '52:54:00:00:00:01',
      netdevId: 'nd1',
    });
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: 'qmp.sock', id: 'nic1' }));
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: `/${'x'.repeat(107)}`, id: 'nic1' }));
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: '/q', id: '1nic' }));
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: '/q', id: 'nic 1' }));
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: '/q', id: 'nic1', addr: 'zz' }));
    argErr(() => validateArgs('hotplug', { name: 't0', qmp: '/q' }));
  });

  it('serve-vhost-user: a name and an optional absolute socket path that fits sun_path; stop-vhost-user: a name', () => {
    expect(validateArgs('serve-vhost-user', { name: 't0' })).toEqual({ name: 't0' });
    expect(validateArgs('serve-vhost-user', { name: 't0', socket: '/run/vu.sock' })).toEqual({ name: 't0', socket: '/run/vu.sock' });
    argErr(() => validateArgs('serve-vhost-user', { name: 't0', socket: 'vu.sock' }));
    argErr(() => validateArgs('serve-vhost-user', { name: 't0', socket: `/${'x'.repeat(120)}` }));
    argErr(() => validateArgs('serve-vhost-user', { name: 't0', socket: '/a\0b' }));
    argErr(() => validateArgs('serve-vhost-user', { name: 't0', queues: 2 }));
    argErr(() => validateArgs('serve-vhost-user', { name: 'mqt%d' }));
    expect(validateArgs('stop-vhost-user', { name: 't0' })).toEqual({ name: 't0' });
    argErr(() => validateArgs('stop-vhost-user', { name: 't0', socket: '/x' }));
  });

  it('hello and list take no arguments', () => {
    expect(validateArgs('hello', {})).toEqual({});
    argErr(() => validateArgs('list', { all: true }));
  });
});

describe('replies', () => {
  it('round-trip a result, an error and an fd chunk', () => {
    expect(parseReply(encodeReply({ id: 3, ok: true, result: { a: 1 } }))).toEqual({ id: 3, ok: true, result: { a: 1 } });
    const err = new MqtapError({ op: 'TUNSETQUEUE', errno: 16, code: 'EBUSY', ifname: 'mqt0', hint: 'later' });
    const wire = errorToWire(err);
    expect(wire).toMatchObject({ code: 'EBUSY', op: 'TUNSETQUEUE', errno: 16, ifname: 'mqt0', hint: 'later' });
    const parsed = parseReply(encodeReply({ id: 'x', ok: false, error: wire }));
    expect(parsed).toEqual({ id: 'x', ok: false, error: wire });
    const back = wireToError(wire);
    expect(back).toBeInstanceOf(MqtapError);
    expect(back).toMatchObject({ code: 'EBUSY', op: 'TUNSETQUEUE', errno: 16, hint: 'later', ifname: 'mqt0' });
    expect(parseReply(encodeFdChunk(3, 2))).toEqual({ id: 3, fdChunk: 2 });
    expect(parseReply(encodeReply({ id: null, ok: false, error: { code: 'EACCES', message: 'no' } }))).toMatchObject({ id: null, ok: false });
  });

  it('non-mqtap errors become ERR_INTERNAL', () => {
    expect(errorToWire(new TypeError('boom'))).toEqual({ code: 'ERR_INTERNAL', message: 'internal error: boom' });
    expect(errorToWire('str').code).toBe('ERR_INTERNAL');
  });

  it('a reply too large to send becomes an EMSGSIZE error reply', () => {
    const b = encodeReply({ id: 1, ok: true, result: { big: 'x'.repeat(MAX_REPLY_BYTES) } });
    expect(b.length).toBeLessThan(1024);
    expect(parseReply(b)).toMatchObject({ id: 1, ok: false, error: { code: 'EMSGSIZE' } });
  });

  it('malformed replies are protocol errors', () => {
    for (const bad of [{ ok: true, result: {} }, { id: 1 }, { id: 1, ok: true }, { id: 1, ok: false, error: 'x' }, { id: 1, ok: false, error: { code: 1, message: 'm' } }, { id: null, fdChunk: 1 }, { id: 1, fdChunk: 0 }]) {
      protoErr(() => parseReply(buf(bad)));
    }
  });

  it('fd chunks of at most MAX_FDS_PER_MESSAGE', () => {
    expect(MAX_FDS_PER_MESSAGE).toBeLessThanOrEqual(253);
    const sizes = (n: number): number[] => fdChunks(Array.from({ length: n }, (_, i) => i)).map((c) => c.length);
    expect(sizes(0)).toEqual([]);
    expect(sizes(1)).toEqual([1]);
    expect(sizes(64)).toEqual([64]);
    expect(sizes(512)).toEqual(Array(8).fill(64));
    expect(sizes(130)).toEqual([64, 64, 2]);
    expect(fdChunks([7, 8, 9], 2)).toEqual([[7, 8], [9]]);
  });

  it('encodeRequest refuses requests the daemon would refuse for size', () => {
    expect(JSON.parse(encodeRequest(1, 'show', { name: 't0' }).toString())).toEqual({ id: 1, op: 'show', args: { name: 't0' } });
    argErr(() => encodeRequest(1, 'create', { name: 'x'.repeat(MAX_REQUEST_BYTES) }));
  });
});
