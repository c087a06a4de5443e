/**
 * eBPF steering for taps: which queue the kernel puts each outgoing frame on.
 *
 * A tap's steering program (TUNSETSTEERINGEBPF) is a BPF_PROG_TYPE_SOCKET_FILTER
 * program the kernel runs for every frame it transmits on the tap
 * (tun_select_queue -> tun_ebpf_select_queue).  It sees the frame from its
 * Ethernet header and returns a number; the kernel uses `(u16)ret % numqueues`
 * as the queue.  Without a program the kernel uses its automatic flow
 * steering (rx follows tx, see docs/datapath.md).
 *
 * The programs here are generated at run time as raw instructions (no
 * compiler, no object files):
 *
 *   rssProgram()       Receive Side Scaling as NICs and virtio-net RSS do it:
 *                      the Toeplitz hash of the IPv4/IPv6 TCP/UDP 4-tuple
 *                      (2-tuple for other IP traffic and fragments) with a
 *                      40-byte key, then an indirection table.  The Toeplitz
 *                      loop is unrolled at generation time: every input bit
 *                      becomes five branch-free instructions that XOR in the
 *                      32-bit key window of that bit (a constant):
 *                      `r1 = (word >> b) & 1; r1 *= window; hash ^= r1`.
 *                      (Not the shorter `(word << (31-b)) s>> 31 & window`:
 *                      recent verifiers split a [-1, 0] range into two
 *                      constant states at the AND, which doubles the paths
 *                      per input bit and hits the 1M-instruction limit.)
 *                      The verifier sees one straight path: ~2,000
 *                      instructions with IPv6, well within its limits.
 *   constantProgram()  every frame to one queue.
 *   randomProgram()    bpf_get_prandom_u32(): frames spread evenly, per frame.
 *   cpuProgram()       bpf_get_smp_processor_id(): each frame to the queue of the
 *                      CPU that transmits it (CPU locality, docs/datapath.md).
 *
 * The queue number is the kernel's slot index: queues are numbered in the
 * order they were attached, and detaching a queue moves the kernel's last
 * queue into the freed slot.  For a tap whose queues were all opened by one
 * openTap() and never disabled, slot i is TapQueue i.
 *
 * `steeringQueue()` computes in JavaScript what rssProgram() computes in the
 * kernel (lib/datapath/steering.ts does the Toeplitz hash), so the placement of a
 * flow can be predicted, and tests check that both agree.
 *
 * One program here is not a steering program:
 *
 *   queueCountProgram()  a tc (sched_cls) program for a tap's tcx ingress
 *                        hook: counts the frames and bytes each queue writes
 *                        into the kernel, by skb->queue_mapping (tun records
 *                        the queue there), in a per-CPU array map, and lets
 *                        every frame through (TCX_NEXT).  Used by `mqtap
 *                        stats` through lib/datapath/qstats.ts.
 */
import { ErrorCodes, MqtapError, invalidArg, withContext } from '../sys/errors';
import { native } from '../sys/native';
import { MICROSOFT_RSS_KEY, defaultIndirectionTable, toeplitzHash } from './steering';
import type { Tap } from '../tap/tap';

const BC = native.bpfConstants;

// ---------------------------------------------------------------- encoding

/** Instruction classes, sizes, modes and operations (linux/bpf_common.h, linux/bpf.h). */
export const BPF = Object.freeze({
  LD: 0x00, LDX: 0x01, ST: 0x02, STX: 0x03, ALU: 0x04, JMP: 0x05, JMP32: 0x06, ALU64: 0x07,
  W: 0x00, H: 0x08, B: 0x10, DW: 0x18,
  IMM: 0x00, ABS: 0x20, IND: 0x40, MEM: 0x60,
  ADD: 0x00, SUB: 0x10, MUL: 0x20, DIV: 0x30, OR: 0x40, AND: 0x50, LSH: 0x60, RSH: 0x70, NEG: 0x80, MOD: 0x90, XOR: 0xa0, MOV: 0xb0, ARSH: 0xc0,
  K: 0x00, X: 0x08,
  JA: 0x00, JEQ: 0x10, JGT: 0x20, JGE: 0x30, JSET: 0x40, JNE: 0x50, CALL: 0x80, EXIT: 0x90,
} as const);

/** One struct bpf_insn. */
export interface BpfInsn {
  code: number;
  dst: number;
  src: number;
  off: number;
  imm: number;
}

/** A generated program: its instructions as the kernel wants them (8 bytes each, little-endian host). */
export interface BpfProgram {
  /** What it does, for logs and errors. */
  readonly name: string;
  readonly insns: readonly BpfInsn[];
  /** struct bpf_insn[] bytes. */
  readonly bytes: Buffer;
  /** BPF_PROG_TYPE_*; absent: a socket filter (steering programs). */
  readonly progType?: number;
  /** bpf_attr.expected_attach_type (e.g. BPF_TCX_INGRESS); absent: 0. */
  readonly expectedAttachType?: number;
}

/** Encodes instructions as struct bpf_insn[] (x86-64 / little-endian layout). */
export function encodeInsns(insns: readonly BpfInsn[]): Buffer {
  const b = Buffer.alloc(insns.length * 8);
  insns.forEach((x, i) => {
    b[i * 8] = x.code;
    b[i * 8 + 1] = ((x.src & 0xf) << 4) | (x.dst & 0xf);
    b.writeInt16LE(x.off, i * 8 + 2);
    b.writeInt32LE(x.imm | 0, i * 8 + 4);
  });
  return b;
}

/** A tiny assembler with forward labels. */
class Asm {
  readonly insns: BpfInsn[] = [];
  readonly #labels = new Map<string, number>();
  readonly #fixups: Array<{ at: number; label: string }> = [];

  emit(code: number, dst = 0, src = 0, off = 0, imm = 0): this {
    this.insns.push({ code, dst, src, off, imm: imm | 0 });
    return this;
  }

  label(name: string): this {
    if (this.#labels.has(name)) throw new Error(`bpf asm: label ${name} defined twice`);
    this.#labels.set(name, this.insns.length);
    return this;
  }

  /** Conditional jump against an immediate (64-bit compare). */
  jmpImm(op: number, dst: number, imm: number, label: string): this {
    this.#fixups.push({ at: this.insns.length, label });
    return this.emit(BPF.JMP | op | BPF.K, dst, 0, 0, imm);
  }

  ja(label: string): this {
    this.#fixups.push({ at: this.insns.length, label });
    return this.emit(BPF.JMP | BPF.JA);
  }

  alu32(op: number, dst: number, imm: number): this {
    return this.emit(BPF.ALU | op | BPF.K, dst, 0, 0, imm);
  }

  alu32x(op: number, dst: number, src: number): this {
    return this.emit(BPF.ALU | op | BPF.X, dst, src);
  }

  alu64(op: number, dst: number, imm: number): this {
    return this.emit(BPF.ALU64 | op | BPF.K, dst, 0, 0, imm);
  }

  alu64x(op: number, dst: number, src: number): this {
    return this.emit(BPF.ALU64 | op | BPF.X, dst, src);
  }

  /** r0 = ntoh(*(size *)(skb->data + off)); out of bounds ends the program with 0. */
  ldAbs(size: number, off: number): this {
    return this.emit(BPF.LD | BPF.ABS | size, 0, 0, 0, off);
  }

  /** r0 = ntoh(*(size *)(skb->data + src + off)). */
  ldInd(size: number, src: number, off: number): this {
    return this.emit(BPF.LD | BPF.IND | size, 0, src, 0, off);
  }

  /** dst = the map behind fd `mapFd` (BPF_LD_MAP_FD: the kernel replaces the fd with the map when it loads the program). */
  ldMapFd(dst: number, mapFd: number): this {
    this.emit(BPF.LD | BPF.DW | BPF.IMM, dst, BC.BPF_PSEUDO_MAP_FD, 0, mapFd);
    return this.emit(0, 0, 0, 0, 0);
  }

  /** dst = imm64 (two instruction slots). */
  ldImm64(dst: number, v: bigint): this {
    const lo = Number(BigInt.asIntN(32, v & 0xffffffffn));
    const hi = Number(BigInt.asIntN(32, (v >> 32n) & 0xffffffffn));
    this.emit(BPF.LD | BPF.DW | BPF.IMM, dst, 0, 0, lo);
    return this.emit(0, 0, 0, 0, hi);
  }

  stx(size: number, dst: number, src: number, off: number): this {
    return this.emit(BPF.STX | BPF.MEM | size, dst, src, off);
  }

  ldx(size: number, dst: number, src: number, off: number): this {
    return this.emit(BPF.LDX | BPF.MEM | size, dst, src, off);
  }

  call(fn: number): this {
    return this.emit(BPF.JMP | BPF.CALL, 0, 0, 0, fn);
  }

  exit(): this {
    return this.emit(BPF.JMP | BPF.EXIT);
  }

  finish(name: string, load: { progType?: number; expectedAttachType?: number } = {}): BpfProgram {
    for (const f of this.#fixups) {
      const to = this.#labels.get(f.label);
      if (to === undefined) throw new Error(`bpf asm: undefined label ${f.label}`);
      const off = to - f.at - 1;
      if (off < -32768 || off > 32767) throw new Error(`bpf asm: jump to ${f.label} out of range`);
      this.insns[f.at]!.off = off;
    }
    return { name, insns: this.insns, bytes: encodeInsns(this.insns), ...load };
  }
}

// ---------------------------------------------------------------- RSS

/** Configuration of rssProgram() / steeringQueue(). */
export interface RssConfig {
  /** Toeplitz key: at least 40 bytes with IPv6 (36-byte input + 4), 16 for IPv4 only.  Default: Microsoft's RSS key. */
  key?: Uint8Array;
  /** Indirection table: queue (kernel slot) per entry; length a power of two, 1..256; entries 0..255. */
  table?: readonly number[];
  /** Builds the default table (128 entries round-robin over this many queues) when `table` is absent.  Default 1. */
  queues?: number;
  /** Hash IPv6 too.  Default true. */
  ipv6?: boolean;
  /** Queue for frames that are neither IPv4 nor (with ipv6) IPv6: ARP, LLDP, ...  Default 0. */
  fallbackQueue?: number;
  /**
   * 'queue' (default): return the table entry.  'hash': return the 32-bit
   * Toeplitz hash itself (for checking the program against known hashes with
   * BPF_PROG_TEST_RUN; as a steering program the kernel would use
   * (u16)hash % numqueues).
   */
  output?: 'queue' | 'hash';
}

interface RssPlan {
  key: Uint8Array;
  table: number[];
  ipv6: boolean;
  fallbackQueue: number;
  output: 'queue' | 'hash';
}

function planRss(cfg: RssConfig): RssPlan {
  if (typeof cfg !== 'object' || cfg === null) throw invalidArg('RSS config must be an object');
  for (const k of Object.keys(cfg)) if (!['key', 'table', 'queues', 'ipv6', 'fallbackQueue', 'output'].includes(k)) throw invalidArg(`unknown RSS option "${k}"`);
  const ipv6 = cfg.ipv6 ?? true;
  if (typeof ipv6 !== 'boolean') throw invalidArg('ipv6 must be a boolean');
  const key = cfg.key ?? MICROSOFT_RSS_KEY;
  if (!(key instanceof Uint8Array) || key.length < (ipv6 ? 40 : 16))
    throw invalidArg(`the Toeplitz key must be a Uint8Array of at least ${ipv6 ? 40 : 16} bytes (${ipv6 ? 'IPv6 4-tuple: 36 input bytes + 4' : 'IPv4 4-tuple: 12 input bytes + 4'})`);
  let table: number[];
  if (cfg.table !== undefined) {
    if (!Array.isArray(cfg.table)) throw invalidArg('table must be an array of queue numbers');
    table = [...cfg.table];
  } else {
    const q = cfg.queues ?? 1;
    if (!Number.isInteger(q) || q < 1 || q > 256) throw invalidArg('queues must be 1..256');
    table = defaultIndirectionTable(128, q);
  }
  const n = table.length;
  if (n < 1 || n > 256 || (n & (n - 1)) !== 0) throw invalidArg(`the indirection table needs a power-of-two length 1..256, got ${n}`);
  if (!table.every((e) => Number.isInteger(e) && e >= 0 && e <= 255)) throw invalidArg('indirection table entries must be queue numbers 0..255');
  const fallbackQueue = cfg.fallbackQueue ?? 0;
  if (!Number.isInteger(fallbackQueue) || fallbackQueue < 0 || fallbackQueue > 255) throw invalidArg('fallbackQueue must be 0..255');
  const output = cfg.output ?? 'queue';
  if (output !== 'queue' && output !== 'hash') throw invalidArg("output must be 'queue' or 'hash'");
  return { key: Uint8Array.from(key), table, ipv6, fallbackQueue, output };
}

/** The 32 key bits starting at bit `p` (bit 0 = most significant bit of key[0]). */
function keyWindow(key: Uint8Array, p: number): number {
  let w = 0;
  for (let i = 0; i < 32; i++) {
    const bit = p + i;
    w = (w << 1) | ((key[bit >> 3]! >> (7 - (bit & 7))) & 1);
  }
  return w >>> 0;
}

// Registers: r6 = skb (LD_ABS/IND need it there), r7 = hash, r8 = IPv4
// header length, r9 = L4 protocol; r0..r5 are clobbered by every LD_ABS.
const R0 = 0, R1 = 1, R2 = 2, R6 = 6, R7 = 7, R8 = 8, R9 = 9, R10 = 10;

/** hash ^= Toeplitz contribution of the 32-bit word in r0, input bits base..base+31. */
function hashWord(a: Asm, key: Uint8Array, base: number): void {
  for (let b = 31; b >= 0; b--) {
    const k = keyWindow(key, base + (31 - b));
    a.alu32x(BPF.MOV, R1, R0); // r1 = word
    if (b !== 0) a.alu32(BPF.RSH, R1, b);
    a.alu32(BPF.AND, R1, 1); // bit b: 0 or 1
    a.alu32(BPF.MUL, R1, k); // 0 or the key window
    a.alu32x(BPF.XOR, R7, R1);
  }
}

/**
 * The RSS steering program (see the module comment).  Returns table[hash &
 * (table.length - 1)] for IPv4 (and IPv6) frames, the fallback queue for
 * anything else and for frames too short to hold the headers it reads.
 */
export function rssProgram(cfg: RssConfig = {}): BpfProgram {
  const p = planRss(cfg);
  const a = new Asm();
  const size = p.table.length;
  a.alu64x(BPF.MOV, R6, R1);
  a.alu64(BPF.MOV, R7, 0);
  // The indirection table on the stack, 8 entries per store.
  const tbl = Math.max(8, size);
  for (let i = 0; i < tbl; i += 8) {
    let v = 0n;
    for (let j = 7; j >= 0; j--) v = (v << 8n) | BigInt(p.table[(i + j) % size]!);
    a.ldImm64(R1, v);
    a.stx(BPF.DW, R10, R1, -tbl + i);
  }
  // Ethernet type.
  a.ldAbs(BPF.H, 12);
  a.jmpImm(BPF.JEQ, R0, 0x0800, 'ipv4');
  if (p.ipv6) a.jmpImm(BPF.JEQ, R0, 0x86dd, 'ipv6');
  a.ja('fallback');

  // IPv4: src, dst; then ports for TCP/UDP unless it is a fragment.
  a.label('ipv4');
  a.ldAbs(BPF.B, 14);
  a.alu64x(BPF.MOV, R8, R0);
  a.alu64(BPF.AND, R8, 0x0f);
  a.alu64(BPF.LSH, R8, 2); // IHL * 4
  a.ldAbs(BPF.B, 14 + 9);
  a.alu64x(BPF.MOV, R9, R0);
  a.ldAbs(BPF.W, 14 + 12);
  hashWord(a, p.key, 0);
  a.ldAbs(BPF.W, 14 + 16);
  hashWord(a, p.key, 32);
  a.ldAbs(BPF.H, 14 + 6);
  a.jmpImm(BPF.JSET, R0, 0x3fff, 'lookup'); // MF or a fragment offset: 2-tuple
  a.jmpImm(BPF.JEQ, R9, 6, 'ipv4ports');
  a.jmpImm(BPF.JEQ, R9, 17, 'ipv4ports');
  a.ja('lookup');
  a.label('ipv4ports');
  a.ldInd(BPF.W, R8, 14); // sport << 16 | dport
  hashWord(a, p.key, 64);
  a.ja('lookup');

  if (p.ipv6) {
    // IPv6: src, dst; ports when the next header is TCP/UDP (no extension headers).
    a.label('ipv6');
    a.ldAbs(BPF.B, 14 + 6);
    a.alu64x(BPF.MOV, R9, R0);
    for (let w = 0; w < 8; w++) {
      a.ldAbs(BPF.W, 14 + 8 + 4 * w);
      hashWord(a, p.key, 32 * w);
    }
    a.jmpImm(BPF.JEQ, R9, 6, 'ipv6ports');
    a.jmpImm(BPF.JEQ, R9, 17, 'ipv6ports');
    a.ja('lookup');
    a.label('ipv6ports');
    a.ldAbs(BPF.W, 14 + 40);
    hashWord(a, p.key, 256);
    a.ja('lookup');
  }

  // r0 = table[hash & (size - 1)], read from the stack.
  a.label('lookup');
  if (p.output === 'hash') {
    a.alu32x(BPF.MOV, R0, R7).exit();
  } else {
    a.alu64x(BPF.MOV, R0, R7);
    a.alu64(BPF.AND, R0, size - 1);
    a.alu64x(BPF.MOV, R1, R10);
    a.alu64(BPF.ADD, R1, -tbl);
    a.alu64x(BPF.ADD, R1, R0);
    a.ldx(BPF.B, R0, R1, 0);
    a.exit();
  }

  a.label('fallback');
  a.alu64(BPF.MOV, R0, p.fallbackQueue);
  a.exit();
  return a.finish(`rss(${p.output === 'hash' ? 'hash' : `table ${size}`}${p.ipv6 ? ', ipv4+ipv6' : ', ipv4'})`);
}

/** Every frame to queue `queue` (modulo the enabled queues). */
export function constantProgram(queue: number): BpfProgram {
  if (!Number.isInteger(queue) || queue < 0 || queue > 0xffff) throw invalidArg('queue must be 0..65535');
  return new Asm().alu64(BPF.MOV, R0, queue).exit().finish(`constant(${queue})`);
}

/**
 * Each frame to the queue numbered as the CPU that transmits it
 * (bpf_get_smp_processor_id; the kernel takes it modulo the enabled queues):
 * with queue i's reader pinned to CPU i (pinThread), a frame is read on the
 * CPU that produced it — a local sender's, or the one whose softirq forwards
 * it.  No flow affinity beyond that: a flow whose sender moves between CPUs
 * moves between queues (and can be reordered across them).
 */
export function cpuProgram(): BpfProgram {
  return new Asm().call(BC.BPF_FUNC_get_smp_processor_id).exit().finish('cpu');
}

/** A random queue per frame (bpf_get_prandom_u32): even spread, no flow affinity. */
export function randomProgram(): BpfProgram {
  return new Asm().call(BC.BPF_FUNC_get_prandom_u32).exit().finish('random');
}

// ---------------------------------------------------------------- per-queue counting (tcx ingress)

/**
 * Layout of the map queueCountProgram() counts into: an array (per-CPU) of
 * QUEUE_COUNT_ENTRIES values of QUEUE_COUNT_VALUE_SIZE bytes, key = u32.
 * Key k = skb->queue_mapping: tun records queue q as q + 1
 * (skb_record_rx_queue), so key q + 1 counts queue q (the kernel's slot) and
 * key 0 counts frames with no queue recorded.  tun has at most 256 queues,
 * hence 257 entries; a larger queue_mapping (not from tun) also counts in 0.
 * Each value is { u64 frames; u64 bytes } (host byte order).
 */
export const QUEUE_COUNT_ENTRIES = 257;
export const QUEUE_COUNT_VALUE_SIZE = 16;

/**
 * A tc (BPF_PROG_TYPE_SCHED_CLS) program for a device's tcx ingress hook
 * that counts every frame and its bytes (skb->len: at tc ingress the
 * Ethernet header is included) under key skb->queue_mapping in the map
 * behind `mapFd` (see QUEUE_COUNT_ENTRIES), and returns TCX_NEXT: the frame
 * goes on unchanged (next tcx program, then the stack).
 *
 *   r6 = ctx
 *   r2 = ctx->queue_mapping;  if r2 > 256: r2 = 0
 *   *(u32 *)(fp - 4) = r2
 *   r0 = bpf_map_lookup_elem(map, fp - 4);  if !r0: goto out
 *   r0->frames += 1;  r0->bytes += ctx->len      (per-CPU value: no atomics)
 *   out: return TCX_NEXT
 */
export function queueCountProgram(mapFd: number): BpfProgram {
  if (!Number.isInteger(mapFd) || mapFd < 0 || mapFd > 0x7fffffff) throw invalidArg('mapFd must be a file descriptor');
  const a = new Asm();
  a.alu64x(BPF.MOV, R6, R1);
  a.ldx(BPF.W, R2, R6, BC.SKB_QUEUE_MAPPING);
  a.jmpImm(BPF.JGT, R2, QUEUE_COUNT_ENTRIES - 1, 'unrecorded');
  a.ja('key');
  a.label('unrecorded');
  a.alu64(BPF.MOV, R2, 0);
  a.label('key');
  a.stx(BPF.W, R10, R2, -4);
  a.ldMapFd(R1, mapFd);
  a.alu64x(BPF.MOV, R2, R10);
  a.alu64(BPF.ADD, R2, -4);
  a.call(BC.BPF_FUNC_map_lookup_elem);
  a.jmpImm(BPF.JEQ, R0, 0, 'out');
  a.ldx(BPF.DW, R1, R0, 0);
  a.alu64(BPF.ADD, R1, 1);
  a.stx(BPF.DW, R0, R1, 0);
  a.ldx(BPF.W, R1, R6, BC.SKB_LEN);
  a.ldx(BPF.DW, R2, R0, 8);
  a.alu64x(BPF.ADD, R2, R1);
  a.stx(BPF.DW, R0, R2, 8);
  a.label('out');
  a.alu64(BPF.MOV, R0, BC.TCX_NEXT);
  a.exit();
  return a.finish('queue_count', { progType: BC.BPF_PROG_TYPE_SCHED_CLS, expectedAttachType: BC.BPF_TCX_INGRESS });
}

// ---------------------------------------------------------------- the userspace model

/**
 * The RSS hash input rssProgram() uses for this Ethernet frame (4-tuple for
 * TCP/UDP, 2-tuple for other IP and for IPv4 fragments), or undefined for a
 * frame that is neither IPv4 nor (with ipv6) IPv6.  Same layout as
 * lib/datapath/steering.ts rssInputIPv4/rssInputIPv6.
 */
export function rssInput(frame: Uint8Array, opts: { ipv6?: boolean } = {}): Buffer | undefined {
  const f = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  if (f.length < 14) return undefined;
  const type = f.readUInt16BE(12);
  if (type === 0x0800) {
    if (f.length < 14 + 20) return undefined;
    const ihl = (f[14]! & 0x0f) * 4;
    const proto = f[14 + 9]!;
    const frag = f.readUInt16BE(14 + 6) & 0x3fff;
    const addrs = f.subarray(14 + 12, 14 + 20);
    if (frag === 0 && (proto === 6 || proto === 17)) {
      if (f.length < 14 + ihl + 4) return undefined;
      return Buffer.concat([addrs, f.subarray(14 + ihl, 14 + ihl + 4)]);
    }
    return Buffer.from(addrs);
  }
  if (type === 0x86dd && (opts.ipv6 ?? true)) {
    if (f.length < 14 + 40) return undefined;
    const next = f[14 + 6]!;
    const addrs = f.subarray(14 + 8, 14 + 40);
    if (next === 6 || next === 17) {
      if (f.length < 14 + 44) return undefined;
      return Buffer.concat([addrs, f.subarray(14 + 40, 14 + 44)]);
    }
    return Buffer.from(addrs);
  }
  return undefined;
}

/**
 * What rssProgram(cfg) returns for this frame (before the kernel's modulo by
 * the number of enabled queues).  A frame too short for the headers the
 * program reads makes the kernel's program return 0 (LD_ABS out of bounds).
 */
export function steeringQueue(frame: Uint8Array, cfg: RssConfig = {}): number {
  const p = planRss(cfg);
  const f = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  if (f.length < 14) return 0;
  const type = f.readUInt16BE(12);
  const isIp = type === 0x0800 || (p.ipv6 && type === 0x86dd);
  if (!isIp) return p.fallbackQueue;
  const input = rssInput(f, { ipv6: p.ipv6 });
  if (!input) return 0;
  const hash = toeplitzHash(p.key, input);
  return p.output === 'hash' ? hash : p.table[hash & (p.table.length - 1)]!;
}

// ---------------------------------------------------------------- kernel

/** A loaded program: its fd (close it when done; an attached program stays with the tap). */
export interface LoadedProgram {
  readonly fd: number;
  readonly name: string;
  close(): void;
}

/** Thrown by loadProgram when the verifier refuses a program; `verifierLog` has its whole text. */
export interface VerifierError extends MqtapError {
  verifierLog: string;
}

/**
 * bpf(BPF_PROG_LOAD) as the program's type (a socket filter unless
 * `prog.progType` says otherwise) with its expected attach type.  On
 * failure the load is repeated with a verifier log buffer (log level 1) and
 * the error carries the verifier's text: the last lines in the message, all
 * of it in `err.verifierLog`.
 */
export function loadProgram(prog: BpfProgram): LoadedProgram {
  const name = `mqtap_${prog.name.replace(/[^A-Za-z0-9_]/g, '_')}`.slice(0, 15);
  const type = prog.progType ?? BC.BPF_PROG_TYPE_SOCKET_FILTER;
  const attachType = prog.expectedAttachType ?? 0;
  const what = type === BC.BPF_PROG_TYPE_SOCKET_FILTER ? 'steering' : 'counting';
  let fd: number;
  try {
    fd = native.bpfProgLoad(type, prog.bytes, 'MIT', name, null, 0, attachType);
  } catch (first) {
    if (!(first instanceof MqtapError)) throw first;
    if (first.code === 'EPERM' || first.code === 'ENOSYS') {
      const hint = bpfHint(first);
      throw withContext(first, hint !== undefined ? { hint } : {});
    }
    const log = Buffer.alloc(4 << 20);
    try {
      fd = native.bpfProgLoad(type, prog.bytes, 'MIT', name, log, 1, attachType);
    } catch (err) {
      const text = log.subarray(0, Math.max(0, log.indexOf(0))).toString('utf8');
      const tail = text.trim().split('\n').slice(-3).join(' | ');
      // No log at all: the kernel refused before the verifier ran (an
      // unknown program or attach type on an older kernel, a bad size): not
      // the generator's fault.
      const e = new MqtapError({
        op: 'BPF_PROG_LOAD',
        code: (err as MqtapError).code ?? first.code,
        errno: (err as MqtapError).errno ?? first.errno,
        syscall: 'bpf',
        message: text.trim()
          ? `the kernel's verifier refused the ${prog.name} ${what} program (${prog.insns.length} instructions): ${tail}`
          : `the kernel refused to load the ${prog.name} ${what} program (program type ${type}, attach type ${attachType}) before verifying it: ${(err as Error).message}`,
        hint: text.trim() ? 'this is a bug in mqtap\'s program generator: please report it with err.verifierLog' : 'the running kernel may not know this program or attach type',
        cause: err,
      }) as VerifierError;
      e.verifierLog = text;
      throw e;
    }
    // Loaded with the log (it failed without?): keep the program anyway.
  }
  let closed = false;
  return {
    fd,
    name: prog.name,
    close(): void {
      if (closed) return;
      closed = true;
      native.close(fd);
    },
  };
}

function bpfHint(e: MqtapError): string | undefined {
  if (e.code === 'EPERM') return 'loading BPF programs needs CAP_BPF (or CAP_SYS_ADMIN) when kernel.unprivileged_bpf_disabled is set';
  if (e.code === 'ENOSYS') return 'this kernel has no bpf() syscall (CONFIG_BPF_SYSCALL)';
  return undefined;
}

/**
 * Runs a program in the kernel on one Ethernet frame (BPF_PROG_TEST_RUN) and
 * returns its return value.  The kernel strips a 14-byte Ethernet header
 * from a socket filter's test packet first, so a dummy one is put in front:
 * the program sees `frame` from its first byte, as under tun.
 */
export function testRunProgram(prog: LoadedProgram, frame: Uint8Array): number {
  const dummy = Buffer.from([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
  return native.bpfProgTestRun(prog.fd, Buffer.concat([dummy, frame])).retval;
}

/** The steering program attached to a tap through this library. */
export class Steering {
  readonly tap: Tap;
  #name: string;
  #attached = true;

  /** @internal */
  constructor(tap: Tap, name: string) {
    this.tap = tap;
    this.#name = name;
  }

  /** What is attached now ('' after detach()). */
  get program(): string {
    return this.#attached ? this.#name : '';
  }

  /** Replaces the program (one TUNSETSTEERINGEBPF: the kernel swaps it atomically). */
  replace(next: BpfProgram | RssConfig): void {
    this.#name = setSteering(this.tap, next);
    this.#attached = true;
  }

  /** Back to the kernel's automatic steering (TUNSETSTEERINGEBPF -1).  Harmless when detached. */
  detach(): void {
    if (!this.#attached) return;
    detachSteering(this.tap);
    this.#attached = false;
  }
}

function anyFd(tap: Tap, op: string): number {
  const q = tap.openQueues()[0];
  if (!q) throw new MqtapError({ op, code: ErrorCodes.CLOSED, ifname: tap.name, message: `${tap.name} is closed` });
  return q.fd;
}

function setSteering(tap: Tap, p: BpfProgram | RssConfig): string {
  const prog = 'bytes' in p && 'insns' in p ? (p as BpfProgram) : rssProgram(p as RssConfig);
  const fd = anyFd(tap, 'TUNSETSTEERINGEBPF');
  const loaded = loadProgram(prog);
  try {
    native.tunSetSteeringEbpf(fd, loaded.fd);
  } catch (err) {
    throw withContext(err, { ifname: tap.name });
  } finally {
    loaded.close(); // the tap holds its own reference
  }
  tap.logger.info({ ifname: tap.name, program: prog.name, insns: prog.insns.length }, 'steering program attached');
  return prog.name;
}

/**
 * Loads `program` (or rssProgram(config)) and makes it the tap's steering
 * program (device-wide; replaces one attached before).  The program stays
 * with the device until detached or the device is deleted — for a
 * persistent tap, also after this process exits.
 */
export function attachSteering(tap: Tap, program: BpfProgram | RssConfig): Steering {
  const name = setSteering(tap, program);
  return new Steering(tap, name);
}

/** Removes the tap's steering program, whoever attached it (TUNSETSTEERINGEBPF with -1). */
export function detachSteering(tap: Tap): void {
  const fd = anyFd(tap, 'TUNSETSTEERINGEBPF');
  try {
    native.tunSetSteeringEbpf(fd, -1);
  } catch (err) {
    throw withContext(err, { ifname: tap.name });
  }
}
