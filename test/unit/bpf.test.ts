/**
 * The steering program generator (lib/bpf.ts), without the kernel: the
 * generated instructions run in a small BPF interpreter below (the subset
 * the generator emits, with the kernel's LD_ABS/LD_IND semantics: network
 * byte order, out of bounds ends the program with 0) and must agree with the
 * userspace model (steeringQueue) and with lib/steering.ts's Toeplitz hash,
 * including Microsoft's published RSS verification vectors.
 */
import { describe, expect, it } from 'vitest';
import {
  BPF,
  constantProgram,
  encodeInsns,
  randomProgram,
  rssInput,
  rssProgram,
  steeringQueue,
  type BpfInsn,
  type BpfProgram,
  type RssConfig,
} from '../../lib/bpf.js';
import { MICROSOFT_RSS_KEY, defaultIndirectionTable, rssInputIPv4, rssInputIPv6, rssQueue, toeplitzHash } from '../../lib/steering.js';

// ------------------------------------------------------------------ interpreter

const M64 = (1n << 64n) - 1n;
const M32 = (1n << 32n) - 1n;

/** Runs a program on a packet (skb->data = the Ethernet header); returns r0 (u32), as the kernel's BPF_PROG_RUN does. */
function run(prog: BpfProgram, pkt: Uint8Array, opts: { prandom?: () => number } = {}): { ret: number; steps: number } {
  const r: bigint[] = new Array<bigint>(11).fill(0n);
  const stack = new Uint8Array(512);
  const FP = 1n << 40n; // r10: a fake address for the top of the stack
  r[10] = FP;
  r[1] = 0xc7c7n; // ctx
  const insns = prog.insns;
  let pc = 0;
  let steps = 0;
  const s32 = (x: bigint): bigint => BigInt.asIntN(32, x);
  const load = (size: number, off: bigint): bigint | undefined => {
    const n = size === BPF.B ? 1 : size === BPF.H ? 2 : 4;
    if (off < 0n || off + BigInt(n) > BigInt(pkt.length)) return undefined;
    let v = 0n;
    for (let i = 0; i < n; i++) v = (v << 8n) | BigInt(pkt[Number(off) + i]!);
    return v;
  };
  const stackAddr = (addr: bigint, n: number): number => {
    const o = Number(addr - FP) + 512;
    if (o < 0 || o + n > 512) throw new Error(`stack access out of range at ${pc}`);
    return o;
  };
  for (;;) {
    if (++steps > 100_000) throw new Error('runaway program');
    const x: BpfInsn = insns[pc]!;
    const cls = x.code & 0x07;
    const imm = BigInt(x.imm);
    if (cls === BPF.ALU || cls === BPF.ALU64) {
      const op = x.code & 0xf0;
      const src = x.code & BPF.X ? r[x.src]! : cls === BPF.ALU64 ? BigInt.asUintN(64, imm) : BigInt.asUintN(32, imm);
      const is64 = cls === BPF.ALU64;
      const a = is64 ? r[x.dst]! : r[x.dst]! & M32;
      const b = is64 ? src : src & M32;
      const mask = is64 ? M64 : M32;
      const bits = is64 ? 64n : 32n;
      let v: bigint;
      switch (op) {
        case BPF.MOV: v = b; break;
        case BPF.ADD: v = a + b; break;
        case BPF.SUB: v = a - b; break;
        case BPF.MUL: v = a * b; break;
        case BPF.AND: v = a & b; break;
        case BPF.OR: v = a | b; break;
        case BPF.XOR: v = a ^ b; break;
        case BPF.LSH: v = a << (b & (bits - 1n)); break;
        case BPF.RSH: v = a >> (b & (bits - 1n)); break;
        case BPF.ARSH: v = BigInt.asIntN(Number(bits), a) >> (b & (bits - 1n)); break;
        default: throw new Error(`alu op ${op.toString(16)} at ${pc}`);
      }
      r[x.dst] = v & mask; // 32-bit ops zero-extend
      pc++;
    } else if (cls === BPF.JMP) {
      const op = x.code & 0xf0;
      if (op === BPF.EXIT) return { ret: Number(r[0]! & M32), steps };
      if (op === BPF.CALL) {
        r[0] = BigInt((opts.prandom ?? (() => 0x12345678))() >>> 0);
        for (let i = 1; i <= 5; i++) r[i] = 0xdeadn;
        pc++;
        continue;
      }
      const a = r[x.dst]!;
      const b = x.code & BPF.X ? r[x.src]! : BigInt.asUintN(64, imm);
      let take: boolean;
      switch (op) {
        case BPF.JA: take = true; break;
        case BPF.JEQ: take = a === b; break;
        case BPF.JNE: take = a !== b; break;
        case BPF.JSET: take = (a & b) !== 0n; break;
        case BPF.JGT: take = a > b; break;
        case BPF.JGE: take = a >= b; break;
        default: throw new Error(`jmp op ${op.toString(16)} at ${pc}`);
      }
      pc += take ? 1 + x.off : 1;
    } else if (cls === BPF.LD) {
      const mode = x.code & 0xe0;
      const size = x.code & 0x18;
      if (mode === BPF.IMM && size === BPF.DW) {
        r[x.dst] = (BigInt.asUintN(32, BigInt(insns[pc + 1]!.imm)) << 32n) | BigInt.asUintN(32, imm);
        pc += 2;
        continue;
      }
      const off = mode === BPF.ABS ? imm : s32(r[x.src]!) + imm;
      const v = load(size, off);
      if (v === undefined) return { ret: 0, steps }; // the kernel ends the program with 0
      r[0] = v;
      for (let i = 1; i <= 5; i++) r[i] = 0xdeadn; // clobbered, as after a call
      pc++;
    } else if (cls === BPF.STX) {
      const n = (x.code & 0x18) === BPF.DW ? 8 : 1;
      const o = stackAddr(r[x.dst]! + BigInt(x.off), n);
      let v = r[x.src]!;
      for (let i = 0; i < n; i++, v >>= 8n) stack[o + i] = Number(v & 0xffn);
      pc++;
    } else if (cls === BPF.LDX) {
      const n = (x.code & 0x18) === BPF.DW ? 8 : 1;
      const o = stackAddr(r[x.src]! + BigInt(x.off), n);
      let v = 0n;
      for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(stack[o + i]!);
      r[x.dst] = v;
      pc++;
    } else {
      throw new Error(`class ${cls} at ${pc}`);
    }
  }
}

// ------------------------------------------------------------------ frames

function ipv4Frame(src: string, dst: string, proto: number, sport?: number, dport?: number, opts: { frag?: number; ihl?: number; pad?: number } = {}): Buffer {
  const ihl = opts.ihl ?? 5;
  const l4 = 8 + (opts.pad ?? 8);
  const f = Buffer.alloc(14 + ihl * 4 + l4);
  Buffer.from('020000000002020000000001', 'hex').copy(f, 0);
  f.writeUInt16BE(0x0800, 12);
  f[14] = 0x40 | ihl;
  f.writeUInt16BE(ihl * 4 + l4, 16);
  f.writeUInt16BE(opts.frag ?? 0x4000, 20);
  f[22] = 64;
  f[23] = proto;
  Buffer.from(src.split('.').map(Number)).copy(f, 26);
  Buffer.from(dst.split('.').map(Number)).copy(f, 30);
  if (sport !== undefined) f.writeUInt16BE(sport, 14 + ihl * 4);
  if (dport !== undefined) f.writeUInt16BE(dport, 14 + ihl * 4 + 2);
  return f;
}

function ipv6Frame(src: string, dst: string, next: number, sport?: number, dport?: number): Buffer {
  const f = Buffer.alloc(14 + 40 + 16);
  f.writeUInt16BE(0x86dd, 12);
  f[14] = 0x60;
  f.writeUInt16BE(16, 18);
  f[20] = next;
  f[21] = 64;
  rssInputIPv6(src, dst).copy(f, 22); // src then dst, network order
  if (sport !== undefined) f.writeUInt16BE(sport, 54);
  if (dport !== undefined) f.writeUInt16BE(dport, 56);
  return f;
}

const IPV4_VECTORS = [
  { dst: '161.142.100.80', dport: 1766, src: '66.9.149.187', sport: 2794, ip: 0x323e8fc2, tcp: 0x51ccc178 },
  { dst: '65.69.140.83', dport: 4739, src: '199.92.111.2', sport: 14230, ip: 0xd718262a, tcp: 0xc626b0ea },
  { dst: '12.22.207.184', dport: 38024, src: '24.19.198.95', sport: 12898, ip: 0xd2d0a5de, tcp: 0x5c2b394a },
  { dst: '209.142.163.6', dport: 2217, src: '38.27.205.30', sport: 48228, ip: 0x82989176, tcp: 0xafc7327f },
  { dst: '202.188.127.2', dport: 1303, src: '153.39.163.191', sport: 44251, ip: 0x5d1809c5, tcp: 0x10e828a2 },
];
const IPV6_VECTORS = [
  { dst: '3ffe:2501:200:3::1', dport: 1766, src: '3ffe:2501:200:1fff::7', sport: 2794, ip: 0x2cc18cd5, tcp: 0x40207d3d },
  { dst: 'ff02::1', dport: 4739, src: '3ffe:501:8::260:97ff:fe40:efab', sport: 14230, ip: 0x0f0c461c, tcp: 0xdde51bbf },
  { dst: 'fe80::200:f8ff:fe21:67cf', dport: 38024, src: '3ffe:1900:4545:3:200:f8ff:fe21:67cf', sport: 44251, ip: 0x4b61e985, tcp: 0x02d1feef },
];

/** A deterministic pseudo-random sequence (xorshift32). */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>>= 0);
  };
}

function ip4(r: () => number): string {
  return [r() & 255, r() & 255, r() & 255, r() & 255].join('.');
}

// ------------------------------------------------------------------ tests

describe('instruction encoding', () => {
  it('packs struct bpf_insn: code, dst/src nibbles, little-endian off and imm', () => {
    const b = encodeInsns([{ code: 0xb7, dst: 0, src: 0, off: 0, imm: 7 }, { code: 0x79, dst: 1, src: 10, off: -8, imm: 0 }, { code: 0x95, dst: 0, src: 0, off: 0, imm: 0 }]);
    expect(b.toString('hex')).toBe('b700000007000000' + '79a1f8ff00000000' + '9500000000000000');
  });

  it('a constant program is "r0 = q; exit"', () => {
    const p = constantProgram(3);
    expect(p.bytes.toString('hex')).toBe('b700000003000000' + '9500000000000000');
    expect(run(p, Buffer.alloc(60)).ret).toBe(3);
  });

  it('the random program calls bpf_get_prandom_u32 and returns it', () => {
    const p = randomProgram();
    expect(p.insns[0]!.code).toBe(BPF.JMP | BPF.CALL);
    expect(run(p, Buffer.alloc(60), { prandom: () => 0xabcd }).ret).toBe(0xabcd);
  });
});

describe('rssProgram: the Toeplitz hash, unrolled', () => {
  it('stays far below the 4096-instruction classic limit, IPv4 only and with IPv6', () => {
    const v4 = rssProgram({ ipv6: false, key: MICROSOFT_RSS_KEY.subarray(0, 16) });
    const v6 = rssProgram({});
    expect(v4.insns.length).toBeLessThan(700);
    expect(v6.insns.length).toBeLessThan(4096);
    // straight-line hashing: the only jumps are the protocol dispatch (a handful)
    const jumps = v6.insns.filter((x) => (x.code & 0x07) === BPF.JMP && (x.code & 0xf0) !== BPF.EXIT).length;
    expect(jumps).toBeLessThan(16);
  });

  it("returns Microsoft's published RSS hashes for the IPv4 TCP and 2-tuple vectors", () => {
    const p = rssProgram({ output: 'hash' });
    for (const v of IPV4_VECTORS) {
      expect(run(p, ipv4Frame(v.src, v.dst, 6, v.sport, v.dport)).ret, `tcp ${v.src}`).toBe(v.tcp);
      // not TCP/UDP: the 2-tuple hash
      expect(run(p, ipv4Frame(v.src, v.dst, 47)).ret, `gre ${v.src}`).toBe(v.ip);
      // a fragment has no ports: 2-tuple too
      expect(run(p, ipv4Frame(v.src, v.dst, 6, v.sport, v.dport, { frag: 0x2000 })).ret, `MF ${v.src}`).toBe(v.ip);
      expect(run(p, ipv4Frame(v.src, v.dst, 17, v.sport, v.dport, { frag: 0x0010 })).ret, `offset ${v.src}`).toBe(v.ip);
    }
  });

  it("returns Microsoft's published RSS hashes for the IPv6 vectors", () => {
    const p = rssProgram({ output: 'hash' });
    for (const v of IPV6_VECTORS) {
      expect(run(p, ipv6Frame(v.src, v.dst, 6, v.sport, v.dport)).ret, `tcp ${v.src}`).toBe(v.tcp);
      expect(run(p, ipv6Frame(v.src, v.dst, 58)).ret, `icmpv6 ${v.src}`).toBe(v.ip);
    }
  });

  it('finds the ports after IPv4 options (IHL > 5)', () => {
    const p = rssProgram({ output: 'hash' });
    const v = IPV4_VECTORS[0]!;
    expect(run(p, ipv4Frame(v.src, v.dst, 6, v.sport, v.dport, { ihl: 7 })).ret).toBe(v.tcp);
  });

  it('agrees with steeringQueue() and with rssQueue(toeplitzHash(...)) for 2,000 random flows and tables', () => {
    const r = rng(0x6d717461);
    for (let t = 0; t < 4; t++) {
      const queues = [1, 2, 3, 4, 8, 16][r() % 6]!;
      const size = [1, 8, 64, 128, 256][r() % 5]!;
      const key = Buffer.from(Array.from({ length: 40 }, () => r() & 255));
      const table = size === 128 ? defaultIndirectionTable(128, queues) : Array.from({ length: size }, () => r() % queues);
      const cfg: RssConfig = { key, table };
      const p = rssProgram(cfg);
      for (let i = 0; i < 500; i++) {
        const src = ip4(r);
        const dst = ip4(r);
        const sport = r() & 0xffff;
        const dport = r() & 0xffff;
        const proto = i % 3 === 0 ? 6 : 17;
        const f = ipv4Frame(src, dst, proto, sport, dport);
        const want = rssQueue(toeplitzHash(key, rssInputIPv4(src, dst, sport, dport)), table);
        expect(steeringQueue(f, cfg)).toBe(want);
        expect(run(p, f).ret).toBe(want);
      }
    }
  });

  it('agrees with the model for IPv6 TCP/UDP and other next headers', () => {
    const r = rng(42);
    const cfg: RssConfig = { queues: 4 };
    const p = rssProgram(cfg);
    for (let i = 0; i < 200; i++) {
      const hex = (): string => (r() & 0xffff).toString(16);
      const src = `2001:db8:${hex()}::${hex()}`;
      const dst = `fe80::${hex()}:${hex()}`;
      const next = [6, 17, 58][i % 3]!;
      const f = ipv6Frame(src, dst, next, 1000 + i, 2000 + i);
      const input = next === 58 ? rssInputIPv6(src, dst) : rssInputIPv6(src, dst, 1000 + i, 2000 + i);
      expect(rssInput(f)!.equals(input)).toBe(true);
      const want = rssQueue(toeplitzHash(MICROSOFT_RSS_KEY, input), defaultIndirectionTable(128, 4));
      expect(run(p, f).ret).toBe(want);
      expect(steeringQueue(f, cfg)).toBe(want);
    }
  });

  it('sends non-IP frames to the fallback queue, and IPv6 there too when ipv6 is off', () => {
    const arp = Buffer.alloc(60);
    arp.writeUInt16BE(0x0806, 12);
    expect(run(rssProgram({ queues: 4, fallbackQueue: 3 }), arp).ret).toBe(3);
    expect(steeringQueue(arp, { queues: 4, fallbackQueue: 3 })).toBe(3);
    const v6 = ipv6Frame('2001:db8::1', '2001:db8::2', 17, 1, 2);
    const cfg: RssConfig = { queues: 4, ipv6: false, fallbackQueue: 2, key: MICROSOFT_RSS_KEY.subarray(0, 16) };
    expect(run(rssProgram(cfg), v6).ret).toBe(2);
    expect(steeringQueue(v6, cfg)).toBe(2);
  });

  it('returns 0 for frames too short for the headers it reads, as LD_ABS does in the kernel', () => {
    const p = rssProgram({ queues: 4, fallbackQueue: 1 });
    const f = ipv4Frame('10.0.0.1', '10.0.0.2', 17, 1, 2);
    expect(run(p, f.subarray(0, 20)).ret).toBe(0);
    expect(steeringQueue(f.subarray(0, 20), { queues: 4, fallbackQueue: 1 })).toBe(0);
    expect(run(p, f.subarray(0, 12)).ret).toBe(0);
  });

  it('validates its configuration before generating anything', () => {
    expect(() => rssProgram({ table: [0, 1, 2] })).toThrow(/power-of-two/);
    expect(() => rssProgram({ table: [0, 256] })).toThrow(/0\.\.255/);
    expect(() => rssProgram({ key: Buffer.alloc(16) })).toThrow(/40 bytes/);
    expect(() => rssProgram({ queues: 0 })).toThrow(/1\.\.256/);
    expect(() => rssProgram({ bogus: 1 } as unknown as RssConfig)).toThrow(/unknown RSS option/);
    expect(() => constantProgram(-1)).toThrow();
  });
});
