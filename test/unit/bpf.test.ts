/**
 * The steering program generator (lib/datapath/bpf.ts), without the kernel: the
 * generated instructions run in a small BPF interpreter below (the subset
 * the generator emits, with the kernel's LD_ABS/LD_IND semantics: network
 * byte order, out of bounds ends the program with 0) and must agree with the
 * userspace model (steeringQueue) and with lib/datapath/steering.ts's Toeplitz hash,
 * including Microsoft's published RSS verification vectors.
 *
 * The interpreter also models what the per-queue counting program
 * (queueCountProgram, a tc program for the tcx ingress hook) touches: a
 * struct __sk_buff context, an array map reached through BPF_LD_MAP_FD and
 * bpf_map_lookup_elem, and 32/64-bit loads and stores into the map value.
 */
import { describe, expect, it } from 'vitest';
import {
  BPF,
  QUEUE_COUNT_ENTRIES,
  QUEUE_COUNT_VALUE_SIZE,
  constantProgram,
  encodeInsns,
  queueCountProgram,
  randomProgram,
  cpuProgram,
  rssInput,
  rssProgram,
  steeringQueue,
  type BpfInsn,
  type BpfProgram,
  type RssConfig,
} from '../../lib/datapath/bpf.js';
import { native } from '../../lib/sys/native.js';
import { IPV4_VECTORS, IPV6_VECTORS } from '../helpers/rss-vectors.js';
import { MICROSOFT_RSS_KEY, defaultIndirectionTable, rssInputIPv4, rssInputIPv6, rssQueue, toeplitzHash } from '../../lib/datapath/steering.js';

const BC = native.bpfConstants;

// ------------------------------------------------------------------ interpreter

const M64 = (1n << 64n) - 1n;
const M32 = (1n << 32n) - 1n;

/** An array map as the interpreter sees it: `entries` values of `valueSize` bytes, back to back. */
interface FakeMap {
  fd: number;
  entries: number;
  valueSize: number;
  mem: Uint8Array;
}

/**
 * Runs a program on a packet (skb->data = the Ethernet header); returns r0
 * (u32), as the kernel's BPF_PROG_RUN does.  With `ctx`, r1 points at those
 * bytes (a struct __sk_buff) and LDX through it reads them; with `map`,
 * BPF_LD_MAP_FD of map.fd and bpf_map_lookup_elem reach map.mem.
 */
function run(
  prog: BpfProgram,
  pkt: Uint8Array,
  opts: { prandom?: () => number; ctx?: Uint8Array; map?: FakeMap } = {},
): { ret: number; steps: number } {
  const r: bigint[] = new Array<bigint>(11).fill(0n);
  const stack = new Uint8Array(512);
  const FP = 1n << 40n; // r10: a fake address for the top of the stack
  const CTX = 2n << 40n; // the context
  const MAPVAL = 3n << 40n; // map values
  const MAPREF = 4n << 40n; // what BPF_LD_MAP_FD puts in a register
  r[10] = FP;
  r[1] = opts.ctx ? CTX : 0xc7c7n; // ctx
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
  /** The bytes and offset behind an address (stack, context or map value), bounds-checked. */
  const mem = (addr: bigint, n: number, write: boolean): [Uint8Array, number] => {
    if (addr >= MAPVAL && addr < MAPREF && opts.map) {
      const o = Number(addr - MAPVAL);
      if (o < 0 || o + n > opts.map.mem.length) throw new Error(`map value access out of range at ${pc}`);
      return [opts.map.mem, o];
    }
    if (addr >= CTX && addr < MAPVAL && opts.ctx) {
      if (write) throw new Error(`write to the context at ${pc}`);
      const o = Number(addr - CTX);
      if (o < 0 || o + n > opts.ctx.length) throw new Error(`context access out of range at ${pc}`);
      return [opts.ctx, o];
    }
    return [stack, stackAddr(addr, n)];
  };
  const sizeOf = (code: number): number => ({ [BPF.B]: 1, [BPF.H]: 2, [BPF.W]: 4, [BPF.DW]: 8 })[code & 0x18]!;
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
      if (op === BPF.CALL && x.imm === BC.BPF_FUNC_map_lookup_elem) {
        const m = opts.map;
        if (!m || r[1] !== MAPREF + BigInt(m.fd)) throw new Error(`map_lookup_elem without the map in r1 at ${pc}`);
        const [b, o] = mem(r[2]!, 4, false);
        const key = b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! * 2 ** 24);
        r[0] = key < m.entries ? MAPVAL + BigInt(key * m.valueSize) : 0n;
        for (let i = 1; i <= 5; i++) r[i] = 0xdeadn;
        pc++;
        continue;
      }
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
      if (mode === BPF.IMM && size === BPF.DW && x.src === BC.BPF_PSEUDO_MAP_FD) {
        if (!opts.map || x.imm !== opts.map.fd) throw new Error(`BPF_LD_MAP_FD of an unknown map fd ${x.imm} at ${pc}`);
        r[x.dst] = MAPREF + BigInt(x.imm);
        pc += 2;
        continue;
      }
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
      if ((x.code & 0xe0) !== BPF.MEM) throw new Error(`STX mode ${x.code.toString(16)} at ${pc}`);
      const n = sizeOf(x.code);
      const [b, o] = mem(r[x.dst]! + BigInt(x.off), n, true);
      let v = r[x.src]!;
      for (let i = 0; i < n; i++, v >>= 8n) b[o + i] = Number(v & 0xffn);
      pc++;
    } else if (cls === BPF.LDX) {
      const n = sizeOf(x.code);
      const [b, o] = mem(r[x.src]! + BigInt(x.off), n, false);
      let v = 0n;
      for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[o + i]!);
      r[x.dst] = v; // zero-extended, as the kernel's LDX does
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

  it('the CPU program returns bpf_get_smp_processor_id(): a call and an exit', () => {
    const p = cpuProgram();
    expect(p.insns).toHaveLength(2);
    expect(p.insns[0]).toMatchObject({ code: BPF.JMP | BPF.CALL, imm: native.bpfConstants.BPF_FUNC_get_smp_processor_id });
    expect(p.insns[1]!.code).toBe(BPF.JMP | BPF.EXIT);
    expect(p.name).toBe('cpu');
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

describe('queueCountProgram: per-queue counting on the tcx ingress hook', () => {
  const FD = 37;
  const newMap = (entries = QUEUE_COUNT_ENTRIES): FakeMap => ({ fd: FD, entries, valueSize: QUEUE_COUNT_VALUE_SIZE, mem: new Uint8Array(entries * QUEUE_COUNT_VALUE_SIZE) });
  /** A struct __sk_buff with len and queue_mapping set (offsets from the kernel headers, through the addon). */
  const skb = (queueMapping: number, len: number): Uint8Array => {
    const b = Buffer.alloc(Math.max(BC.SKB_LEN, BC.SKB_QUEUE_MAPPING) + 64);
    b.writeUInt32LE(len, BC.SKB_LEN);
    b.writeUInt32LE(queueMapping, BC.SKB_QUEUE_MAPPING);
    return b;
  };
  const entry = (m: FakeMap, key: number): { frames: number; bytes: number } => {
    const b = Buffer.from(m.mem.buffer, m.mem.byteOffset, m.mem.byteLength);
    return { frames: Number(b.readBigUInt64LE(key * 16)), bytes: Number(b.readBigUInt64LE(key * 16 + 8)) };
  };
  const TCX_NEXT_U32 = BC.TCX_NEXT >>> 0;

  it('is a sched_cls program for BPF_TCX_INGRESS that names the map once (BPF_LD_MAP_FD)', () => {
    const p = queueCountProgram(FD);
    expect(p.progType).toBe(BC.BPF_PROG_TYPE_SCHED_CLS);
    expect(p.expectedAttachType).toBe(BC.BPF_TCX_INGRESS);
    expect(BC.TCX_NEXT).toBe(-1);
    const ldMap = p.insns.map((x, i) => ({ x, i })).filter(({ x }) => x.code === (BPF.LD | BPF.DW | BPF.IMM) && x.src === BC.BPF_PSEUDO_MAP_FD);
    expect(ldMap).toHaveLength(1);
    expect(ldMap[0]!.x.imm).toBe(FD);
    // struct bpf_insn: code 0x18, dst r1 / src 1 (pseudo map fd) in one byte, imm = the fd; then the second half
    const at = ldMap[0]!.i * 8;
    expect(p.bytes.subarray(at, at + 16).toString('hex')).toBe('1811000025000000' + '0000000000000000');
    expect(p.insns.filter((x) => x.code === (BPF.JMP | BPF.CALL)).map((x) => x.imm)).toEqual([BC.BPF_FUNC_map_lookup_elem]);
    expect(p.insns.length).toBeLessThan(32);
  });

  it('counts frames and bytes under key queue_mapping (queue q = key q + 1) and always returns TCX_NEXT', () => {
    const map = newMap();
    const p = queueCountProgram(FD);
    const sent: Array<[number, number]> = [];
    // queue q written as queue_mapping q + 1, as tun's skb_record_rx_queue does
    for (let q = 0; q < 4; q++) for (let k = 0; k <= q; k++) sent.push([q + 1, 60 + 10 * q]);
    sent.push([256, 1514]); // queue 255: the last tun can have
    for (const [qm, len] of sent) expect(run(p, Buffer.alloc(0), { ctx: skb(qm, len), map }).ret).toBe(TCX_NEXT_U32);
    for (let q = 0; q < 4; q++) expect(entry(map, q + 1)).toEqual({ frames: q + 1, bytes: (q + 1) * (60 + 10 * q) });
    expect(entry(map, 256)).toEqual({ frames: 1, bytes: 1514 });
    expect(entry(map, 0)).toEqual({ frames: 0, bytes: 0 });
    expect(entry(map, 5)).toEqual({ frames: 0, bytes: 0 });
  });

  it('counts frames with no queue recorded, or a queue_mapping beyond tun\'s 256 queues, under key 0', () => {
    const map = newMap();
    const p = queueCountProgram(FD);
    for (const qm of [0, 257, 1000, 65535]) expect(run(p, Buffer.alloc(0), { ctx: skb(qm, 100), map }).ret).toBe(TCX_NEXT_U32);
    expect(entry(map, 0)).toEqual({ frames: 4, bytes: 400 });
    for (let k = 1; k < QUEUE_COUNT_ENTRIES; k++) expect(entry(map, k).frames).toBe(0);
  });

  it('lets the frame through untouched when the lookup finds nothing', () => {
    const map = newMap(2); // a map too small for key 3: lookup returns NULL
    expect(run(queueCountProgram(FD), Buffer.alloc(0), { ctx: skb(3, 100), map }).ret).toBe(TCX_NEXT_U32);
    expect([...map.mem].every((b) => b === 0)).toBe(true);
  });

  it('accumulates 64-bit byte counts past 2^32', () => {
    const map = newMap();
    const p = queueCountProgram(FD);
    const b = Buffer.from(map.mem.buffer);
    b.writeBigUInt64LE(0xfffffff0n, 1 * 16 + 8);
    run(p, Buffer.alloc(0), { ctx: skb(1, 0x20), map });
    expect(b.readBigUInt64LE(1 * 16 + 8)).toBe(0x100000010n);
  });

  it('refuses a map fd that is not one', () => {
    expect(() => queueCountProgram(-1)).toThrow(/mapFd/);
    expect(() => queueCountProgram(1.5)).toThrow(/mapFd/);
  });
});
