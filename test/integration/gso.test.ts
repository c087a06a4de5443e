/**
 * Segmentation offload through taps, inside a throw-away network namespace
 * (link-local addresses, no default route, IPv4 forwarding on in that
 * namespace only):
 *
 *   gsa0 (169.254.10.1/24)  frames are written here "from" 169.254.10.2
 *   gsb0 (169.254.20.1/24)  no offloads: the kernel must segment for it
 *   gsc0 (169.254.30.1/24)  CSUM|TSO4|TSO6 (+USO when the kernel has it)
 *
 *   - a 64 KB TCPv4 GSO frame (gso_size 1448, NEEDS_CSUM) written into gsa0
 *     for 169.254.20.2 is forwarded as ONE skb and segmented in software on
 *     the way out of gsb0: 45 frames of 1502 bytes, valid checksums, the
 *     payload reassembles byte-exact;
 *   - the same frame for 169.254.30.2 reaches gsc0's reader as one GSO
 *     frame, virtio-net header intact;
 *   - a TCP sender in the namespace (node:net) talking to a peer behind
 *     gsc0 (answered by a tiny TCP responder here) hands the tap GSO frames
 *     with gso_type TCPV4: decoded and reassembled byte-exact;
 *   - USO (when the running kernel takes TUN_F_USO4|USO6): a UDP_L4 GSO
 *     frame is segmented for gsb0 and delivered whole to gsc0.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ETHERTYPE, IPPROTO, ethernetFrame, ipv4Checksum, ipv4Header, ipv4PseudoHeaderSum, l4Checksum4 } from '../../lib/datapath/frames.js';
import { applyOffloads, openQueueIO, type FrameBatch, type QueueIO } from '../../lib/datapath/io.js';
import { getLink } from '../../lib/tap/links.js';
import { openTap, type Offloads, type Tap } from '../../lib/tap/tap.js';
import { VNET_HDR_F, VNET_HDR_GSO, encodeVnetHdr, vnetHdrForTcpGso } from '../../lib/datapath/vnethdr.js';
import { need, netnsSysctls, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';

const env = tapEnv();

const A = { name: 'gsa0', mac: '02:00:00:00:0a:01', local: '169.254.10.1', peer: '169.254.10.2', peerMac: '02:00:00:00:0a:02' };
const B = { name: 'gsb0', mac: '02:00:00:00:0b:01', local: '169.254.20.1', peer: '169.254.20.2', peerMac: '02:00:00:00:0b:02' };
const C = { name: 'gsc0', mac: '02:00:00:00:0c:01', local: '169.254.30.1', peer: '169.254.30.2', peerMac: '02:00:00:00:0c:02' };

// ------------------------------------------------------------------ packets

/** The TCP/UDP checksum over the IPv4 pseudo header and the segment of packet `ip`: 0 means valid (check field included). */
function l4Verify(ip: Buffer): number {
  const ihl = (ip[0]! & 0x0f) * 4;
  return l4Checksum4(ip.subarray(12, 16), ip.subarray(16, 20), ip[9]!, ip.subarray(ihl, ip.readUInt16BE(2)));
}

function ipHeader(src: string, dst: string, proto: number, payloadLen: number, id = 0x4242): Buffer {
  return ipv4Header({ srcIp: src, dstIp: dst, protocol: proto, payloadLength: payloadLen, id });
}

interface TcpSeg {
  sport: number;
  dport: number;
  seq: number;
  ack: number;
  flags: number;
  window: number;
  options?: Buffer;
  payload: Buffer;
}

const SYN = 0x02;
const ACK = 0x10;
const PSH = 0x08;

/** Ethernet/IPv4/TCP.  partial: the check field holds the pseudo-header sum (CHECKSUM_PARTIAL), else the full checksum. */
function tcpFrame(dstMac: string, srcMac: string, src: string, dst: string, t: TcpSeg, partial = false): Buffer {
  const opt = t.options ?? Buffer.alloc(0);
  const tcp = Buffer.alloc(20 + opt.length);
  tcp.writeUInt16BE(t.sport, 0);
  tcp.writeUInt16BE(t.dport, 2);
  tcp.writeUInt32BE(t.seq >>> 0, 4);
  tcp.writeUInt32BE(t.ack >>> 0, 8);
  tcp[12] = (tcp.length / 4) << 4;
  tcp[13] = t.flags;
  tcp.writeUInt16BE(t.window, 14);
  opt.copy(tcp, 20);
  const len = tcp.length + t.payload.length;
  tcp.writeUInt16BE(partial ? ipv4PseudoHeaderSum(src, dst, IPPROTO.TCP, len) : l4Checksum4(src, dst, IPPROTO.TCP, Buffer.concat([tcp, t.payload])), 16);
  return ethernetFrame({ dstMac, srcMac, etherType: ETHERTYPE.IPV4, payload: Buffer.concat([ipHeader(src, dst, IPPROTO.TCP, len), tcp, t.payload]) });
}

interface ParsedTcp extends TcpSeg {
  ip: Buffer;
  src: string;
  dst: string;
}

function parseTcp(f: Buffer): ParsedTcp | undefined {
  if (f.length < 54 || f.readUInt16BE(12) !== 0x0800 || f[23] !== 6) return undefined;
  const ip = f.subarray(14, 14 + f.readUInt16BE(16));
  const ihl = (ip[0]! & 0x0f) * 4;
  const tcp = ip.subarray(ihl);
  const doff = (tcp[12]! >> 4) * 4;
  return {
    ip,
    src: ip.subarray(12, 16).join('.'),
    dst: ip.subarray(16, 20).join('.'),
    sport: tcp.readUInt16BE(0),
    dport: tcp.readUInt16BE(2),
    seq: tcp.readUInt32BE(4),
    ack: tcp.readUInt32BE(8),
    flags: tcp[13]!,
    window: tcp.readUInt16BE(14),
    options: Buffer.from(tcp.subarray(20, doff)),
    payload: Buffer.from(tcp.subarray(doff)),
  };
}

/** The 64 KB TCPv4 GSO frame of bench/c/tapio.c: 45 segments of 1448 bytes, with its 10-byte header. */
function gsoTcpFrame(dst: string, payload: Buffer, seq: number): Buffer {
  const f = tcpFrame(A.mac, A.peerMac, A.peer, dst, { sport: 40000, dport: 5201, seq, ack: 1, flags: PSH | ACK, window: 0xffff, payload }, true);
  const hdr = encodeVnetHdr(vnetHdrForTcpGso({ ipVersion: 4, l3Offset: 14, l4Offset: 34, tcpHdrLen: 20, mss: 1448 }), 10);
  return Buffer.concat([hdr, f]);
}

/** Reads frames until `done(frames)` (copies, with their decoded headers), or ~10 s. */
async function readUntil(io: QueueIO, done: (got: Array<{ frame: Buffer; gsoType: number; gsoSize: number; flags: number; hdrLen: number }>) => boolean) {
  const got: Array<{ frame: Buffer; gsoType: number; gsoSize: number; flags: number; hdrLen: number }> = [];
  const deadline = Date.now() + 10_000;
  while (!done(got) && Date.now() < deadline) {
    const b: FrameBatch | undefined = io.tryRead();
    if (!b) {
      await sleep(5);
      continue;
    }
    for (let i = 0; i < b.count; i++) {
      const h = b.header(i);
      got.push({ frame: Buffer.from(b.frame(i)), gsoType: h.gsoType, gsoSize: h.gsoSize, flags: h.flags, hdrLen: h.hdrLen });
    }
  }
  return got;
}

describe.skipIf(!env.ok)(`GSO through taps${skipNote(env)}`, () => {
  useIsolatedNetns();
  const ios: QueueIO[] = [];
  let a: Tap;
  let b: Tap;
  let c: Tap;
  let ioA: QueueIO;
  let ioB: QueueIO;
  let ioC: QueueIO;
  let uso: 'on' | 'off' | 'unsupported' = 'off';

  function upTap(t: typeof A, offloads?: Offloads): Tap {
    const tap = openTap({ name: t.name, mac: t.mac, up: true, ...(offloads ? { offloads } : {}) });
    run('ip', ['addr', 'add', `${t.local}/24`, 'dev', t.name]);
    run('ip', ['neigh', 'replace', t.peer, 'lladdr', t.peerMac, 'dev', t.name, 'nud', 'permanent']);
    return tap;
  }

  beforeAll(() => {
    netnsSysctls({ ipForward: true });
    a = upTap(A);
    b = upTap(B);
    c = upTap(C);
    uso = applyOffloads(c, { csum: true, tso4: true, tso6: true, uso: 'if-available' }).uso;
    expect(run('ip', ['-j', 'route', 'show', 'default']).trim()).toMatch(/^\[?\]?$/);
    ioA = openQueueIO(a.queues[0]!);
    ioB = openQueueIO(b.queues[0]!);
    ioC = openQueueIO(c.queues[0]!);
    ios.push(ioA, ioB, ioC);
    return () => {
      for (const io of ios) io.close();
      for (const t of [a, b, c]) t.close();
    };
  });
  afterEach(() => {
    // drain whatever is left so tests do not see each other's frames
    for (const io of [ioB, ioC]) while (io.tryRead());
  });

  it('a 64 KB TCP GSO frame written into one tap leaves another tap as 45 MTU-sized segments, byte-exact', async () => {
    const payload = randomBytes(45 * 1448);
    const seq = 0x10000000;
    const before = getLink(A.name)!.stats!;
    const r = await ioA.writeBatch([gsoTcpFrame(B.peer, payload, seq)], { withHeader: true });
    expect(r.frames).toBe(1);
    expect(getLink(A.name)!.stats!.rxPackets - before.rxPackets, 'the kernel took it as one frame').toBe(1);
    const got = (await readUntil(ioB, (g) => g.length >= 45)).map((x) => ({ ...x, tcp: parseTcp(x.frame)! }));
    expect(got).toHaveLength(45);
    let off = 0;
    got.forEach((g, i) => {
      expect(g.gsoType, 'segmented: no GSO left').toBe(VNET_HDR_GSO.NONE);
      expect(g.frame.length, `segment ${i} size`).toBe(14 + 20 + 20 + 1448);
      expect(g.tcp.src).toBe(A.peer);
      expect(g.tcp.dst).toBe(B.peer);
      expect(g.tcp.ip[8], 'TTL decremented: forwarded').toBe(63);
      expect(ipv4Checksum(g.tcp.ip.subarray(0, 20)), 'IPv4 header checksum').toBe(0);
      expect(l4Verify(g.tcp.ip), `TCP checksum of segment ${i}`).toBe(0);
      expect(g.tcp.seq).toBe((seq + off) >>> 0);
      expect(g.tcp.flags & PSH ? i : -1, 'PSH only on the last segment').toBe(g.tcp.flags & PSH ? 44 : -1);
      off += g.tcp.payload.length;
    });
    expect(Buffer.concat(got.map((g) => g.tcp.payload)).equals(payload), 'payload reassembles byte-exact').toBe(true);
    expect(ioB.stats().rx.drops).toBe(0);
  });

  it('the same frame reaches a tap with TSO as one GSO frame, header intact', async () => {
    const payload = randomBytes(45 * 1448);
    await ioA.writeBatch([gsoTcpFrame(C.peer, payload, 7)], { withHeader: true });
    const got = await readUntil(ioC, (g) => g.length >= 1);
    expect(got).toHaveLength(1);
    const g = got[0]!;
    expect(g.gsoType).toBe(VNET_HDR_GSO.TCPV4);
    expect(g.gsoSize).toBe(1448);
    expect(g.flags & VNET_HDR_F.NEEDS_CSUM).toBe(VNET_HDR_F.NEEDS_CSUM);
    expect(g.frame.length).toBe(14 + 20 + 20 + 45 * 1448);
    const t = parseTcp(g.frame)!;
    expect(t.ip[8]).toBe(63);
    expect(t.payload.equals(payload)).toBe(true);
  });

  it('a TCP sender in the namespace hands the tap GSO frames (gso_type TCPV4), reassembled byte-exact', async () => {
    const data = randomBytes(512 * 1024);
    const sock = net.connect({ host: C.peer, port: 5001, localAddress: C.local });
    sock.on('error', () => undefined);
    try {
      // SYN
      const syn = (await readUntil(ioC, (g) => g.some((x) => parseTcp(x.frame)?.flags === SYN))).map((x) => parseTcp(x.frame)).find((t) => t?.flags === SYN)!;
      expect(syn).toBeDefined();
      const cport = syn.sport;
      const isn = 0x2000000;
      let rcvNext = (syn.seq + 1) >>> 0;
      const reply = (flags: number, options?: Buffer): Buffer =>
        tcpFrame(C.mac, C.peerMac, C.peer, C.local, { sport: 5001, dport: cport, seq: flags & SYN ? isn : (isn + 1) >>> 0, ack: rcvNext, flags, window: 0xffff, ...(options ? { options } : {}), payload: Buffer.alloc(0) });
      // SYN-ACK: MSS 1460, window scale 7 (8 MB window)
      const opts = Buffer.from([2, 4, 0x05, 0xb4, 1, 3, 3, 7]);
      await ioC.writeBatch([reply(SYN | ACK, opts)]);
      await new Promise<void>((resolve, reject) => {
        sock.once('connect', resolve);
        sock.once('error', reject);
      });
      sock.write(data);
      // receive, ACK what arrived in order, until everything is there
      const buf = Buffer.alloc(data.length);
      const base = rcvNext;
      let gso = 0;
      let maxLen = 0;
      let mss = 0;
      const deadline = Date.now() + 20_000;
      while (((rcvNext - base) >>> 0) < data.length && Date.now() < deadline) {
        const batch = ioC.tryRead();
        if (!batch) {
          await sleep(2);
          continue;
        }
        let progressed = false;
        for (let i = 0; i < batch.count; i++) {
          const t = parseTcp(batch.frame(i));
          if (!t || t.dport !== 5001 || t.payload.length === 0) continue;
          const h = batch.header(i);
          if (h.gsoType !== VNET_HDR_GSO.NONE) {
            expect(h.gsoType & ~VNET_HDR_GSO.ECN).toBe(VNET_HDR_GSO.TCPV4);
            expect(h.flags & VNET_HDR_F.NEEDS_CSUM).toBeTruthy();
            expect(t.payload.length).toBeGreaterThan(h.gsoSize);
            gso++;
            mss = h.gsoSize;
          }
          maxLen = Math.max(maxLen, batch.length(i));
          const at = (t.seq - base) >>> 0;
          if (at <= ((rcvNext - base) >>> 0) && at + t.payload.length > ((rcvNext - base) >>> 0)) {
            t.payload.copy(buf, at);
            rcvNext = (base + at + t.payload.length) >>> 0;
            progressed = true;
          }
        }
        if (progressed) await ioC.writeBatch([reply(ACK)]);
      }
      expect((rcvNext - base) >>> 0).toBe(data.length);
      expect(buf.equals(data), 'the stream reassembles byte-exact').toBe(true);
      expect(gso, 'GSO frames seen').toBeGreaterThan(0);
      expect(mss).toBeGreaterThan(0);
      expect(mss).toBeLessThanOrEqual(1460);
      expect(maxLen, 'frames longer than the MTU').toBeGreaterThan(1514);
    } finally {
      sock.destroy();
      // tell the kernel the connection is gone (RST) so it stops retransmitting
      await ioC.writeBatch([tcpFrame(C.mac, C.peerMac, C.peer, C.local, { sport: 5001, dport: 1, seq: 0, ack: 0, flags: 0x04, window: 0, payload: Buffer.alloc(0) })]).catch(() => undefined);
    }
  });

  it('USO: a UDP GSO frame is segmented for a tap without USO and delivered whole to one with it', async (ctx) => {
    if (uso !== 'on') {
      need('uso', `the kernel did not take TUN_F_USO4|TUN_F_USO6 (${uso}); USO needs Linux 6.2+`);
      return ctx.skip();
    }
    const seg = 1000;
    const payload = randomBytes(10 * seg + 123);
    const udpFor = (dst: string): Buffer => {
      const udp = Buffer.alloc(8);
      udp.writeUInt16BE(40001, 0);
      udp.writeUInt16BE(9, 2);
      udp.writeUInt16BE(8 + payload.length, 4);
      udp.writeUInt16BE(ipv4PseudoHeaderSum(A.peer, dst, IPPROTO.UDP, 8 + payload.length), 6); // partial
      const f = ethernetFrame({ dstMac: A.mac, srcMac: A.peerMac, etherType: ETHERTYPE.IPV4, payload: Buffer.concat([ipHeader(A.peer, dst, IPPROTO.UDP, 8 + payload.length), udp, payload]) });
      const hdr = encodeVnetHdr({ flags: VNET_HDR_F.NEEDS_CSUM, gsoType: VNET_HDR_GSO.UDP_L4, hdrLen: 42, gsoSize: seg, csumStart: 34, csumOffset: 6 }, 10);
      return Buffer.concat([hdr, f]);
    };
    await ioA.writeBatch([udpFor(B.peer)], { withHeader: true });
    const toB = await readUntil(ioB, (g) => g.length >= 11);
    expect(toB).toHaveLength(11);
    const parts = toB.map((g) => {
      const ip = g.frame.subarray(14);
      expect(g.gsoType).toBe(VNET_HDR_GSO.NONE);
      expect(l4Verify(ip.subarray(0, ip.readUInt16BE(2))), 'UDP checksum').toBe(0);
      return ip.subarray(28, ip.readUInt16BE(2));
    });
    expect(parts.slice(0, 10).every((p) => p.length === seg)).toBe(true);
    expect(Buffer.concat(parts).equals(payload)).toBe(true);
    await ioA.writeBatch([udpFor(C.peer)], { withHeader: true });
    const toC = await readUntil(ioC, (g) => g.length >= 1);
    expect(toC).toHaveLength(1);
    expect(toC[0]!.gsoType).toBe(VNET_HDR_GSO.UDP_L4);
    expect(toC[0]!.gsoSize).toBe(seg);
    expect(toC[0]!.frame.subarray(42).equals(payload)).toBe(true);
  });
});
