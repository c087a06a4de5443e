/**
 * Property-based tests (fast-check) of the parsers that read bytes mqtap does
 * not control: daemon protocol messages (from any local client), QMP replies
 * and events (from QEMU), virtio-net headers (from the kernel or a guest) and
 * frames.  Each parser, fed anything, either returns a value or throws its
 * own typed error — never another exception, never a hang — and what the
 * encoders write, the parsers read back unchanged.
 *
 * Seed and run count: test/helpers/fuzz.ts (`npm run fuzz -- --runs N`).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MAX_REQUEST_BYTES, OPS, ProtocolError, encodeReply, encodeRequest, parseReply, parseRequest, validateArgs } from '../../lib/daemon/protocol';
import { parseUdp4Frame, udp4Frame } from '../../lib/datapath/frames';
import { VnetHdrError, decodeVnetHdr, encodeVnetHdr, type VnetHdr } from '../../lib/datapath/vnethdr';
import { QmpLineParser } from '../../lib/qemu/qmp';
import { MqtapError } from '../../lib/sys/errors';
import { fuzzAssert, fuzzTimeout } from '../helpers/fuzz';

const T = fuzzTimeout();

/** Runs fn; passes when it returns or throws an instance of one of `allowed`. */
function onlyTyped(fn: () => unknown, ...allowed: Array<abstract new (...a: never[]) => Error>): void {
  try {
    fn();
  } catch (err) {
    if (!allowed.some((c) => err instanceof c)) throw new Error(`unexpected ${(err as Error)?.name}: ${(err as Error)?.message}`, { cause: err });
  }
}

/** JSON-ish values, including the shapes the parsers look for. */
const jsonValue = fc.jsonValue({ maxDepth: 3 });
const requestId = fc.oneof(fc.nat(), fc.string({ minLength: 1, maxLength: 64 }));

describe('daemon protocol (lib/daemon/protocol.ts)', () => {
  it('parseRequest: any bytes give a Request or a ProtocolError', async () => {
    await fuzzAssert(
      fc.property(fc.uint8Array({ maxLength: 512 }), (bytes) => onlyTyped(() => parseRequest(bytes), ProtocolError)),
    );
  }, T);

  it('parseRequest: any JSON value, and objects shaped like requests, give a Request or a ProtocolError', async () => {
    const requestish = fc.record(
      { id: fc.oneof(requestId, jsonValue), op: fc.oneof(fc.constantFrom(...OPS), fc.string()), args: fc.oneof(fc.dictionary(fc.string(), jsonValue), jsonValue) },
      { requiredKeys: [] },
    );
    await fuzzAssert(
      fc.property(fc.oneof(jsonValue, requestish), (v) => onlyTyped(() => parseRequest(Buffer.from(JSON.stringify(v) ?? 'null')), ProtocolError)),
    );
  }, T);

  it('validateArgs: any arguments for any op give checked args or an MqtapError (never a TypeError)', async () => {
    await fuzzAssert(
      fc.property(fc.constantFrom(...OPS), fc.dictionary(fc.constantFrom('name', 'queues', 'active', 'vhost', 'mtu', 'mac', 'owner', 'group', 'netns', 'qmp', 'id', 'persist', 'vnetHdrSize', 'x'), jsonValue), (op, args) =>
        onlyTyped(() => validateArgs(op, args), MqtapError),
      ),
    );
  }, T);

  it('encodeRequest -> parseRequest round trip', async () => {
    await fuzzAssert(
      fc.property(requestId, fc.constantFrom(...OPS), fc.dictionary(fc.string({ maxLength: 16 }), jsonValue, { maxKeys: 6 }), (id, op, args) => {
        const buf = encodeRequest(id, op, args);
        fc.pre(buf.length <= MAX_REQUEST_BYTES);
        const r = parseRequest(buf);
        expect(r.id).toEqual(id);
        expect(r.op).toBe(op);
        expect(r.args).toEqual(JSON.parse(JSON.stringify(args)));
      }),
    );
  }, T);

  it('parseReply: any bytes and any JSON give a reply, an fd chunk or a ProtocolError; encodeReply round trips', async () => {
    await fuzzAssert(fc.property(fc.uint8Array({ maxLength: 512 }), (bytes) => onlyTyped(() => parseReply(bytes), ProtocolError)));
    const replyish = fc.record(
      { id: fc.oneof(requestId, fc.constant(null), jsonValue), ok: fc.oneof(fc.boolean(), jsonValue), result: jsonValue, error: fc.oneof(jsonValue, fc.record({ code: fc.string(), message: fc.string(), errno: jsonValue, op: jsonValue })), fdChunk: fc.oneof(fc.integer(), jsonValue) },
      { requiredKeys: [] },
    );
    await fuzzAssert(fc.property(replyish, (v) => onlyTyped(() => parseReply(Buffer.from(JSON.stringify(v))), ProtocolError)));
    await fuzzAssert(
      fc.property(requestId, fc.dictionary(fc.string({ maxLength: 16 }), jsonValue, { maxKeys: 6 }), (id, result) => {
        expect(parseReply(encodeReply({ id, ok: true, result }))).toEqual({ id, ok: true, result: JSON.parse(JSON.stringify(result)) });
      }),
    );
  }, T);
});

describe('QMP stream (lib/qemu/qmp.ts QmpLineParser)', () => {
  /** Splits `buf` into chunks at the given cut points. */
  function cut(buf: Buffer, points: number[]): Buffer[] {
    const at = [...new Set(points.map((p) => p % (buf.length + 1)))].sort((a, b) => a - b);
    const out: Buffer[] = [];
    let prev = 0;
    for (const p of at) {
      out.push(buf.subarray(prev, p));
      prev = p;
    }
    out.push(buf.subarray(prev));
    return out;
  }

  it('objects written as QEMU writes them come out whole and in order, however the stream is cut', async () => {
    const obj = fc.dictionary(fc.string({ maxLength: 12 }), jsonValue, { maxKeys: 5 });
    await fuzzAssert(
      fc.property(fc.array(obj, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (objs, points) => {
        const stream = Buffer.from(objs.map((o) => `${JSON.stringify(o)}\r\n`).join(''));
        const p = new QmpLineParser();
        const got = cut(stream, points).flatMap((c) => p.push(c));
        expect(got).toEqual(objs.map((o) => JSON.parse(JSON.stringify(o))));
      }),
    );
  }, T);

  it('any bytes give objects or a QMP protocol error (EPROTO), and an over-long line is refused without buffering it', async () => {
    await fuzzAssert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 6 }), (chunks) => {
        const p = new QmpLineParser(256);
        try {
          for (const c of chunks) p.push(Buffer.from(c));
        } catch (err) {
          expect(err).toBeInstanceOf(MqtapError);
          expect((err as MqtapError).code).toBe('EPROTO');
        }
      }),
    );
  }, T);
});

describe('virtio-net header (lib/datapath/vnethdr.ts)', () => {
  it('decodeVnetHdr: any 10 or 12 bytes at any offset give a header or a VnetHdrError; a decoded header encodes back to the same bytes', async () => {
    await fuzzAssert(
      fc.property(fc.constantFrom(10 as const, 12 as const), fc.uint8Array({ minLength: 0, maxLength: 40 }), fc.nat(40), (size, bytes, offset) => {
        const buf = Buffer.from(bytes);
        let hdr: VnetHdr;
        try {
          hdr = decodeVnetHdr(buf, size, offset);
        } catch (err) {
          if (err instanceof VnetHdrError || err instanceof RangeError) return;
          throw err;
        }
        expect(encodeVnetHdr(hdr, size)).toEqual(buf.subarray(offset, offset + size));
      }),
    );
  }, T);
});

describe('frames (lib/datapath/frames.ts)', () => {
  const mac = fc.uint8Array({ minLength: 6, maxLength: 6 });
  const ip = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((a) => a.join('.'));

  it('parseUdp4Frame: any bytes give a datagram or undefined, never an exception', async () => {
    await fuzzAssert(fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => void parseUdp4Frame(bytes)));
  }, T);

  it('udp4Frame -> parseUdp4Frame round trip, and any single-byte corruption of the headers is parsed or refused, never thrown', async () => {
    await fuzzAssert(
      fc.property(mac, mac, ip, ip, fc.nat(65535), fc.nat(65535), fc.uint8Array({ maxLength: 300 }), fc.nat(255), fc.nat(), fc.nat(255), (dst, src, sip, dip, sp, dp, payload, ttl, where, val) => {
        const f = udp4Frame({ dstMac: dst, srcMac: src, srcIp: sip, dstIp: dip, srcPort: sp, dstPort: dp, payload, ttl: Math.max(1, ttl) });
        const d = parseUdp4Frame(f)!;
        expect(d).toMatchObject({ srcIp: sip, dstIp: dip, srcPort: sp, dstPort: dp, ttl: Math.max(1, ttl), ipChecksumOk: true });
        expect(Buffer.compare(d.payload, Buffer.from(payload))).toBe(0);
        const bad = Buffer.from(f);
        bad[where % 42] = val;
        void parseUdp4Frame(bad);
      }),
    );
  }, T);
});
