/**
 * Data-path benchmark: frames per second through one and two queues of a
 * tap, library (lib/datapath/io.ts) against the C programs in bench/c (tapio: a plain
 * write()/read() loop; naive io_uring, batches of 32 on a blocking fd; and the
 * best C loop there is: a multishot read into a provided-buffer ring,
 * 256 writes per submit, see bench/c/README.md), in the same run and the
 * same throw-away network namespace (the caller entered it: isolateNetns();
 * C programs and worker threads started from here inherit it).
 *
 * Setup, identical for every implementation: a persistent multi-queue tap
 * (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE), 12-byte virtio-net header,
 * offloads CSUM|TSO4|TSO6, link up, IPv6 off in the namespace.  Each reader or
 * writer attaches its own queue (a tapio process, or a worker thread running
 * the library), so Q queues = Q attached fds = Q CPUs' worth of work.
 *
 *   write  the same frame over and over: 60 B and 1514 B Ethernet/IPv4/UDP to
 *          a MAC that is not the tap's (the stack drops it as OTHERHOST right
 *          after the tap, see bench/c/README.md), and the 64 KB TCPv4 GSO
 *          frame (gso_size 1448) with its virtio-net header.
 *   read   frames the kernel transmits on the tap, from a generator process
 *          (AF_PACKET + PACKET_QDISC_BYPASS + sendmmsg, like tapio's; built
 *          from GEN_C below) sending 64 flows flat out; the kernel spreads the
 *          flows over the queues.  Timing starts at each reader's first frame.
 *
 * The library side runs in worker threads (one per queue) so that Q queues
 * are Q threads, as the C side is Q processes; each worker (pinThread, from
 * lib/sys/affinity.ts) and process (tapio --cpu) is pinned to CPU q.  The read
 * generator: with one queue, on the reader's CPU (`pin: 'same'`) or the other
 * one (`'split'`, the default); with more queues, or `'none'`, it floats
 * (and with 'none' the readers float too).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { IPPROTO, ipv4Checksum, ipv4PseudoHeaderSum } from '../lib/datapath/frames';
import { openQueueIO, type IoEngine, type QueueIO } from '../lib/datapath/io';
import { getLink } from '../lib/tap/links';
import { native } from '../lib/sys/native';
import { pinThread } from '../lib/sys/affinity';
import { deleteTap, openTap } from '../lib/tap/tap';
import { median, textTable } from './stats';

export type Size = 60 | 1514 | 'gso';
export type Dir = 'write' | 'read';
/**
 * c-uring: naive io_uring (32 per submit, blocking fd: io-wq when the reader is ahead); c-best: tapio --mode uring-mshot-drain (reads) /
 * uring-write256 (writes); c-batch (reads only): tapio --mode uring-batch, 64 RWF_NOWAIT reads per enter from the buffer ring, a poll
 * only when the ring ran dry.  c-best reads: tapio --mode uring-mshot-drain (the multishot waits, RWF_NOWAIT batches drain a backlog: issue 12).
 */
export type Impl = 'library' | 'c-plain' | 'c-uring' | 'c-best' | 'c-batch';
/** Where the readers/writers and the read generator run (see the module comment). */
export type PinMode = 'split' | 'same' | 'none';

export interface DataRun {
  impl: Impl;
  /** Library engine (rx/tx) in use, for impl 'library'. */
  engine?: string;
  /** The engine option the library run asked for ('auto', 'poll', 'uring'). */
  engineReq?: string;
  dir: Dir;
  size: Size;
  queues: number;
  /** Per queue: frames/s, and CPU µs per frame of that reader/writer (thread or process). */
  perQueue: Array<{ pps: number; gbps: number; cpuUsPerFrame: number; frames: number; workers?: number; workerCpuUsPerFrame?: number; framesPerEnter?: number }>;
  /** Sum over the queues. */
  pps: number;
  gbps: number;
  /** Device counters over the run: frames the kernel dropped because a queue's ring was full (reads) */
  kernelTxDropped?: number;
  /** Share of the CPUs busy with other work just before the run (see waitQuiet). */
  busyBefore?: number;
  pin?: PinMode;
}

const TAP = 'mqbd0';
const TAP_MAC = '02:6d:71:00:00:01';

// ------------------------------------------------------------ frames (as tapio builds them)

const DST_MAC = [0x02, 0x6d, 0x71, 0x74, 0x61, 0x70];
const SRC_MAC = [0x02, 0x6d, 0x71, 0x74, 0x61, 0x71];
const GSO_MSS = 1448;
const GSO_SEGS = 45;

/**
 * 12-byte virtio-net header + Ethernet frame, like tapio's build_frame();
 * source port 40000 + flow (tapio --flow): each queue writes its own flow.
 */
export function benchFrame(size: Size, flow = 0): Buffer {
  const hdr = 12;
  const gso = size === 'gso';
  const ipTot = gso ? 20 + 20 + GSO_SEGS * GSO_MSS : (size as number) - 14;
  const len = 14 + ipTot;
  const b = Buffer.alloc(hdr + len);
  const f = hdr;
  Buffer.from(DST_MAC).copy(b, f);
  Buffer.from(SRC_MAC).copy(b, f + 6);
  b.writeUInt16BE(0x0800, f + 12);
  const ip = f + 14;
  b[ip] = 0x45;
  b.writeUInt16BE(ipTot, ip + 2);
  b.writeUInt16BE(0x1234, ip + 4);
  b.writeUInt16BE(0x4000, ip + 6);
  b[ip + 8] = 64;
  b[ip + 9] = gso ? 6 : 17;
  Buffer.from([169, 254, 77, 1]).copy(b, ip + 12);
  Buffer.from([169, 254, 77, 2]).copy(b, ip + 16);
  b.writeUInt16BE(ipv4Checksum(b.subarray(ip, ip + 20)), ip + 10);
  const l4 = ip + 20;
  if (!gso) {
    b.writeUInt16BE(40000 + flow, l4);
    b.writeUInt16BE(9, l4 + 2);
    b.writeUInt16BE(ipTot - 20, l4 + 4);
    for (let i = 14 + 20 + 8; i < len; i++) b[f + i] = i & 0xff;
    return b;
  }
  b.writeUInt16BE(40000 + flow, l4);
  b.writeUInt16BE(5201, l4 + 2);
  b[l4 + 4] = 0x11;
  b[l4 + 11] = 0x01;
  b[l4 + 12] = (20 / 4) << 4;
  b[l4 + 13] = 0x18;
  b.writeUInt16BE(0xffff, l4 + 14);
  for (let i = 14 + 20 + 20; i < len; i++) b[f + i] = i & 0xff;
  // CHECKSUM_PARTIAL: the check field holds the folded pseudo-header sum.
  b.writeUInt16BE(ipv4PseudoHeaderSum(b.subarray(ip + 12, ip + 16), b.subarray(ip + 16, ip + 20), IPPROTO.TCP, ipTot - 20), l4 + 16);
  b[0] = 1; // NEEDS_CSUM
  b[1] = 1; // GSO_TCPV4
  b.writeUInt16LE(54, 2);
  b.writeUInt16LE(GSO_MSS, 4);
  b.writeUInt16LE(34, 6);
  b.writeUInt16LE(16, 8);
  return b;
}

// ------------------------------------------------------------ the read generator

/**
 * Transmits frames on a tap until killed: AF_PACKET + PACKET_QDISC_BYPASS
 * (dev_direct_xmit -> tun_net_xmit, no IP stack, no qdisc), sendmmsg batches
 * of 64, like tapio's generator; but FLOWS different UDP/TCP source ports so
 * the kernel spreads them over the queues.  A full queue ring makes the
 * kernel drop (tx_dropped): the generator just goes on.
 */
const GEN_C = String.raw`
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <net/ethernet.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>
static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s) { for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(p[i] << 8 | p[i + 1]); if (n & 1) s += (uint32_t)(p[n - 1] << 8); return s; }
static uint16_t fold(uint32_t s) { while (s >> 16) s = (s & 0xffff) + (s >> 16); return (uint16_t)s; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: gen IFNAME 60|1514|gso FLOWS [CPU]\n"); return 1; }
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int gso = strcmp(argv[2], "gso") == 0, size = gso ? 0 : atoi(argv[2]), flows = atoi(argv[3]);
  if (flows < 1 || flows > 64) flows = 64;
  if (argc > 4) { cpu_set_t set; CPU_ZERO(&set); CPU_SET(atoi(argv[4]), &set); sched_setaffinity(0, sizeof set, &set); }
  int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0), one = 1;
  if (s < 0) { perror("socket"); return 1; }
  if (setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0) { perror("PACKET_QDISC_BYPASS"); return 1; }
  if (gso && setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) { perror("PACKET_VNET_HDR"); return 1; }
  struct sockaddr_ll sll; memset(&sll, 0, sizeof sll);
  sll.sll_family = AF_PACKET; sll.sll_protocol = htons(ETH_P_ALL); sll.sll_ifindex = (int)if_nametoindex(argv[1]);
  if (!sll.sll_ifindex || bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); return 1; }
  const int mss = 1448, segs = 45;
  size_t vh = gso ? sizeof(struct virtio_net_hdr) : 0;
  size_t len = gso ? 14 + 40 + (size_t)(segs * mss) : (size_t)size;
  static uint8_t bufs[64][10 + 65600];
  for (int k = 0; k < flows; k++) {
    uint8_t *b = bufs[k], *f = b + vh, *ip = f + 14, *l4 = ip + 20;
    memset(b, 0, vh + len);
    memcpy(f, "\x02\x00\x00\x00\x00\x02", 6); memcpy(f + 6, "\x02\x00\x00\x00\x00\x01", 6); put16(f + 12, 0x0800);
    ip[0] = 0x45; put16(ip + 2, (uint16_t)(len - 14)); put16(ip + 6, 0x4000); ip[8] = 64; ip[9] = gso ? 6 : 17;
    memcpy(ip + 12, "\xa9\xfe\x4d\x01", 4); memcpy(ip + 16, "\xa9\xfe\x4d\x02", 4);
    put16(ip + 10, (uint16_t)~fold(sum16(ip, 20, 0)));
    put16(l4, (uint16_t)(40000 + k)); put16(l4 + 2, 9);
    if (!gso) { put16(l4 + 4, (uint16_t)(len - 34)); for (size_t i = 42; i < len; i++) f[i] = (uint8_t)i; continue; }
    l4[12] = 5 << 4; l4[13] = 0x18; put16(l4 + 14, 0xffff);
    for (size_t i = 54; i < len; i++) f[i] = (uint8_t)i;
    put16(l4 + 16, fold(sum16(ip + 12, 8, 0) + 6 + (uint32_t)(len - 34)));
    struct virtio_net_hdr *h = (struct virtio_net_hdr *)b;
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM; h->gso_type = VIRTIO_NET_HDR_GSO_TCPV4; h->hdr_len = 54; h->gso_size = (uint16_t)mss; h->csum_start = 34; h->csum_offset = 16;
  }
  struct iovec iov[64]; struct mmsghdr m[64]; memset(m, 0, sizeof m);
  for (int i = 0; i < 64; i++) { iov[i].iov_base = bufs[i % flows]; iov[i].iov_len = vh + len; m[i].msg_hdr.msg_iov = &iov[i]; m[i].msg_hdr.msg_iovlen = 1; }
  printf("ready\n"); fflush(stdout);
  for (;;) { int n = sendmmsg(s, m, 64, 0); if (n < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("sendmmsg"); return 1; } }
}
`;

/** What `tapio --mode probe` found io_uring to offer on this kernel. */
export interface UringProbe {
  uring: boolean;
  deferTaskrun: boolean;
  readWrite: boolean;
  readMultishot: boolean;
  pbufRing: boolean;
  error: string;
}

export interface Programs {
  tapio: string;
  gen: string;
  /** The naive io_uring modes can run (c-uring). */
  uring: boolean;
  /** The best C loops can run (c-best): per direction. */
  best: { read: boolean; write: boolean };
  probe: UringProbe;
}

/** Builds tapio (io_uring through raw syscalls: no liburing needed) and the generator into outDir, and asks tapio what io_uring offers. */
export function buildPrograms(outDir: string, srcDir: string): Programs {
  const cc = process.env.CC ?? 'cc';
  const flags = ['-O2', '-Wall', '-Wextra', '-Werror'];
  const tapio = join(outDir, 'tapio');
  execFileSync(cc, [...flags, '-o', tapio, join(srcDir, 'tapio.c')], { stdio: 'inherit' });
  const probe = JSON.parse(execFileSync(tapio, ['--mode', 'probe'], { encoding: 'utf8' })) as UringProbe;
  const uring = probe.uring && probe.readWrite;
  const genSrc = join(outDir, 'gen.c');
  writeFileSync(genSrc, GEN_C);
  const gen = join(outDir, 'gen');
  execFileSync(cc, [...flags, '-o', gen, genSrc], { stdio: 'inherit' });
  const best = { read: uring && probe.deferTaskrun && probe.readMultishot && probe.pbufRing, write: uring && probe.deferTaskrun };
  return { tapio, gen, uring, best, probe };
}

// ------------------------------------------------------------ helpers

function cpuTimes(): { busy: number; total: number } {
  const f = readFileSync('/proc/stat', 'utf8');
  const v = f.slice(0, f.indexOf('\n')).split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const total = v.reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** Share of all CPUs busy over `ms` (this process is idle meanwhile). */
async function busyShare(ms: number): Promise<number> {
  const a = cpuTimes();
  await new Promise((r) => setTimeout(r, ms));
  const b = cpuTimes();
  return b.total > a.total ? (b.busy - a.busy) / (b.total - a.total) : 0;
}

/**
 * Waits until the machine is quiet (other load below `threshold` of all
 * CPUs in two consecutive 0.5 s samples), at most `maxMs`; returns the last
 * busy share seen (recorded with each run).
 */
export async function waitQuiet(threshold: number, maxMs: number): Promise<number> {
  const end = Date.now() + maxMs;
  let quietInARow = 0;
  let last = 1;
  while (Date.now() < end) {
    last = await busyShare(500);
    quietInARow = last < threshold ? quietInARow + 1 : 0;
    if (quietInARow >= 2) break;
  }
  return last;
}

/** CPU of reader/writer q, or undefined (floating). */
function workerCpu(pin: PinMode, q: number): number | undefined {
  return pin === 'none' ? undefined : q;
}

/** CPU of the read generator: with one queue the reader's (0) for 'same', the other (1) for 'split'; else floating. */
function generatorCpu(pin: PinMode, queues: number): number | undefined {
  if (queues !== 1 || pin === 'none') return undefined;
  return pin === 'same' ? 0 : 1;
}

function deviceStats(): { txDropped: number; txPackets: number } {
  const s = getLink(TAP)?.stats;
  return { txDropped: s?.txDropped ?? 0, txPackets: s?.txPackets ?? 0 };
}

/**
 * Waits until exactly `n` queues are attached: the run's own.  (A queue of
 * the previous run can linger for a moment: a process's io_uring keeps its
 * registered tap fd until the ring's asynchronous teardown has run.)
 */
function waitQueues(n: number, timeoutMs = 10_000): void {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const l = getLink(TAP);
    if (l?.tun && l.tun.numQueues === n) return;
    execFileSync('sleep', ['0.02']);
  }
  throw new Error(`bench: ${TAP} did not get to exactly ${n} attached queue(s) (attached: ${getLink(TAP)?.tun?.numQueues ?? 'no device'})`);
}

function startGenerator(gen: string, size: Size, cpu?: number): Promise<ChildProcess> {
  const child = spawn(gen, [TAP, String(size), '64', ...(cpu !== undefined ? [String(cpu)] : [])], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`generator exited with ${code}`)));
    child.stdout!.once('data', () => resolve(child));
  });
}

function stopChild(c: ChildProcess | undefined): Promise<void> {
  if (!c || c.exitCode !== null || c.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    c.removeAllListeners('exit');
    c.once('exit', () => resolve());
    c.kill('SIGKILL');
  });
}

function gbps(bytes: number, seconds: number): number {
  return seconds > 0 ? (bytes * 8) / seconds / 1e9 : 0;
}

// ------------------------------------------------------------ C side

interface TapioResult {
  pps: number;
  gbps: number;
  /** The whole process: the loop's thread and io_uring's io-wq workers (wherever they ran). */
  cpuUsPerFrame: number;
  frames: number;
  /** io-wq worker threads ("iou-wrk") and their share of cpuUsPerFrame: not bound by --cpu, they can run on the other CPU in parallel. */
  workers?: number;
  workerCpuUsPerFrame?: number;
  framesPerEnter?: number;
}

function runTapio(p: Programs, mode: string, dir: Dir, size: Size, frames: number, q: number, cpu: number | undefined, warmupMs = 0): Promise<TapioResult> {
  const args = ['--dev', TAP, '--mode', mode, '--size', String(size), '--frames', String(frames), '--queues', '1', '--queue', '0', ...(cpu !== undefined ? ['--cpu', String(cpu)] : []), '--timeout', '60'];
  if (dir === 'read') args.push('--no-gen', '--warmup-ms', String(warmupMs));
  else args.push('--flow', String(q)); // queue q writes flow q
  return new Promise((resolve, reject) => {
    const c = spawn(p.tapio, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.once('error', reject);
    c.once('exit', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (code !== 0 || !line) return reject(new Error(`tapio ${args.join(' ')} exited with ${code}`));
      const j = JSON.parse(line) as TapioResult;
      resolve({ pps: j.pps, gbps: j.gbps, cpuUsPerFrame: j.cpuUsPerFrame, frames: j.frames, workers: j.workers, workerCpuUsPerFrame: j.workerCpuUsPerFrame, ...(j.framesPerEnter !== undefined ? { framesPerEnter: j.framesPerEnter } : {}) });
    });
  });
}

/**
 * Frames the best C write loop (tapio uring-write256, URING_BEST_WRITE_BATCH)
 * submits per io_uring_enter.  The library's writer passes the same number
 * per writeBatch by default, so the pair compares like with like.
 */
export const C_BEST_WRITE_BATCH = 256;

/** Frames per writeBatch call of the library's writer: --write-batch, else the best C loop's batch. */
export function libraryWriteBatch(tune: { writeBatch?: number } = {}): number {
  const n = tune.writeBatch ?? C_BEST_WRITE_BATCH;
  if (!Number.isInteger(n) || n < 1 || n > 65536) throw new Error(`--write-batch: ${n} is not a frame count 1..65536`);
  return n;
}

/** tapio's mode for a C implementation and direction. */
export function tapioMode(impl: Exclude<Impl, 'library'>, dir: Dir): string {
  if (impl === 'c-best') return dir === 'read' ? 'uring-mshot-drain' : 'uring-write256';
  if (impl === 'c-batch') {
    if (dir !== 'read') throw new Error('bench: c-batch is a read loop');
    return 'uring-batch';
  }
  return (impl === 'c-uring' ? 'uring-' : '') + dir;
}

async function runC(p: Programs, impl: Exclude<Impl, 'library'>, dir: Dir, size: Size, queues: number, frames: number, pin: PinMode, warmupMs: number): Promise<DataRun> {
  const mode = tapioMode(impl, dir);
  let gen: ChildProcess | undefined;
  const before = deviceStats();
  try {
    const runs: Array<Promise<TapioResult>> = [];
    for (let q = 0; q < queues; q++) runs.push(runTapio(p, mode, dir, size, frames, q, workerCpu(pin, q), warmupMs));
    if (dir === 'read') {
      waitQueues(queues);
      gen = await startGenerator(p.gen, size, generatorCpu(pin, queues));
    }
    const res = await Promise.all(runs);
    const after = deviceStats();
    return summarize({ impl, dir, size, queues, perQueue: res, kernelTxDropped: after.txDropped - before.txDropped, pin });
  } finally {
    await stopChild(gen);
  }
}

function summarize(r: Omit<DataRun, 'pps' | 'gbps'>): DataRun {
  return { ...r, pps: r.perQueue.reduce((a, q) => a + q.pps, 0), gbps: r.perQueue.reduce((a, q) => a + q.gbps, 0) };
}

// ------------------------------------------------------------ library side (worker threads)

interface WorkerJob {
  dir: Dir;
  size: Size;
  frames: number;
  engine: IoEngine | 'auto';
  /** Reads: the QueueIO's receive batch (undefined: the library's default). */
  batch?: number;
  /** Writes: frames per writeBatch call (libraryWriteBatch). */
  writeBatch: number;
  slotSize?: number;
  /** Writes: source port 40000 + flow (the queue's index, as tapio --flow). */
  flow: number;
  /** The CPU this worker pins itself to (pinThread), or none. */
  cpu?: number;
  /** Reads: what arrives in the first warmupMs ms after the first batch is not measured (tapio --warmup-ms). */
  warmupMs: number;
}

interface WorkerResult extends TapioResult {
  engine: string;
  /** Writes: the same measurement through writePacked (copies back to back in one buffer). */
  packed?: { pps: number; cpuUsPerFrame: number };
  /** Writes: writeBatch with `batch` distinct Buffers (copies of the frame), as an application building each frame would pass. */
  distinct?: { pps: number; cpuUsPerFrame: number };
}

/**
 * CPU seconds of the calling thread: sum_exec_runtime from
 * /proc/thread-self/schedstat (nanoseconds; CONFIG_SCHED_INFO), else
 * utime + stime from /proc/thread-self/stat (10 ms resolution).
 */
function threadCpu(): number {
  try {
    return Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]) / 1e9;
  } catch {
    const f = readFileSync('/proc/thread-self/stat', 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / 100;
  }
}

/**
 * A reader's clock, as tapio's read_clock: tick(now) for every batch read
 * says 'skip' (before the clock starts), 'start' (this batch starts it and is
 * not counted) or 'count'.  The first batch only starts the clock, or with a
 * warm-up, the first batch read warmupMs ms or more after the first one does
 * (V8 has compiled the loop by then): what came before is not measured.
 */
export function readClock(warmupMs: number): { readonly measuring: boolean; tick(now: number): 'skip' | 'start' | 'count' } {
  let first = -1;
  let measuring = false;
  return {
    get measuring() {
      return measuring;
    },
    tick(now: number) {
      if (measuring) return 'count';
      if (first < 0) {
        first = now;
        if (warmupMs > 0) return 'skip';
      } else if (now - first < warmupMs) return 'skip';
      measuring = true;
      return 'start';
    },
  };
}

async function workerMain(job: WorkerJob): Promise<void> {
  const port = parentPort!;
  if (job.cpu !== undefined) pinThread(job.cpu); // this worker thread only (lib/sys/affinity.ts)
  // Worker threads share the process's fds: close the queue whatever happens,
  // or it stays attached and the next run finds one queue too many.
  // 'done' goes out only after the queue is closed: the main thread
  // terminates the worker as soon as it has every result.
  const tap = openTap({ name: TAP, existing: 'require', queues: 1 });
  let io: QueueIO | undefined;
  let res: WorkerResult;
  try {
    io = openQueueIO(tap.queues[0]!, { engine: job.engine, ...(job.batch !== undefined ? { batch: job.batch } : {}), ...(job.slotSize !== undefined ? { slotSize: job.slotSize } : {}) });
    res = await measure(job, io, port);
  } finally {
    io?.close();
    tap.close();
  }
  port.postMessage({ type: 'done', res });
}

async function measure(job: WorkerJob, io: QueueIO, port: NonNullable<typeof parentPort>): Promise<WorkerResult> {
  port.postMessage({ type: 'ready', tid: native.gettid() });
  await new Promise<void>((resolve) => port.once('message', () => resolve()));
  let frames = 0;
  let bytes = 0;
  let t0 = 0;
  let c0 = 0;
  let seconds = 0;
  let cpu = 0;
  let packedRes: WorkerResult['packed'];
  let distinctRes: WorkerResult['distinct'];
  if (job.dir === 'write') {
    // Like tapio writing one buffer over and over: the same frame (with its
    // 12-byte header) `writeBatch` times per call (256 by default, what the
    // best C loop submits per io_uring_enter), through writeBatch(Buffer[]).
    // Also measured (half as many frames each): writePacked with as many
    // copies back to back in one buffer, and writeBatch with as many
    // distinct Buffers (each frame its own allocation, as an application
    // building frames one by one would pass them).
    const frame = benchFrame(job.size, job.flow);
    const batch: Buffer[] = new Array<Buffer>(job.writeBatch).fill(frame);
    const distinct: Buffer[] = Array.from({ length: job.writeBatch }, () => Buffer.from(frame));
    const packed = Buffer.concat(batch);
    const lengths = new Uint32Array(job.writeBatch).fill(frame.length);
    // JIT warm-up, as the C program (compiled) never needs: up to 1000 calls
    // (no more frames than are measured) of the measured call alone, so its
    // type feedback is what an application writing one kind of batch gives V8
    // (interleaving the three kinds made the first measurement run on code
    // still being re-optimized: +3-5% CPU/frame).
    const calls = (most: number, frames: number): number => Math.min(most, Math.ceil(frames / job.writeBatch));
    for (let i = 0; i < calls(1000, job.frames); i++) await io.writeBatch(batch, { withHeader: true });
    const side = async (write: () => Promise<unknown>): Promise<{ pps: number; cpuUsPerFrame: number }> => {
      for (let i = 0; i < calls(200, job.frames / 2); i++) await write();
      const a = io.stats().tx;
      const c = threadCpu();
      const t = performance.now();
      for (let n = 0; n < job.frames / 2; n += job.writeBatch) await write();
      const b = io.stats().tx;
      const sec = (performance.now() - t) / 1000;
      return { pps: (b.frames - a.frames) / sec, cpuUsPerFrame: ((threadCpu() - c) * 1e6) / Math.max(1, b.frames - a.frames) };
    };
    // The main measurement first, right after the warm-up, as the C
    // programs measure from their start.
    const s0 = io.stats().tx;
    c0 = threadCpu();
    t0 = performance.now();
    for (let n = 0; n < job.frames; n += batch.length) await io.writeBatch(batch, { withHeader: true });
    const s1 = io.stats().tx;
    seconds = (performance.now() - t0) / 1000;
    cpu = threadCpu() - c0;
    frames = s1.frames - s0.frames;
    bytes = s1.bytes - s0.bytes;
    packedRes = await side(() => io.writePacked(packed, lengths, { withHeader: true }));
    distinctRes = await side(() => io.writeBatch(distinct, { withHeader: true }));
  } else {
    const clock = readClock(job.warmupMs);
    const timeout = setTimeout(() => io.close(), 60_000);
    for await (const b of io) {
      // Every batch gets the same work, warm-up included (as tapio sums every
      // batch's bytes): the code that is timed is the code V8 warmed up.
      let n = 0;
      for (let i = 0; i < b.count; i++) n += b.length(i);
      if (!clock.measuring) {
        const now = performance.now();
        if (clock.tick(now) === 'start') {
          c0 = threadCpu();
          t0 = now;
        }
        continue;
      }
      bytes += n;
      frames += b.count;
      if (frames >= job.frames) break;
    }
    clearTimeout(timeout);
  }
  if (job.dir === 'read') {
    seconds = (performance.now() - t0) / 1000;
    cpu = threadCpu() - c0;
  }
  // The engines, and the receive batch and slot the library chose (a tap this worker did not
  // create has unknown offloads: 64 KiB slots; the bench's tap has TSO on anyway).
  const engine = `${io.engine.rx}/${io.engine.tx}${job.dir === 'read' ? ` batch ${io.batchSize} x ${io.slotSize} B` : ''}`;
  return { pps: frames / seconds, gbps: gbps(bytes, seconds), cpuUsPerFrame: (cpu * 1e6) / Math.max(1, frames), frames, engine, ...(packedRes ? { packed: packedRes } : {}), ...(distinctRes ? { distinct: distinctRes } : {}) };
}

async function runLibrary(dir: Dir, size: Size, queues: number, frames: number, engine: IoEngine | 'auto', gen: string, tune: { batch?: number; writeBatch?: number; slotSize?: number } = {}, pin: PinMode = 'split', warmupMs = 0): Promise<DataRun> {
  const workers: Worker[] = [];
  let g: ChildProcess | undefined;
  const before = deviceStats();
  try {
    const ready: Array<Promise<void>> = [];
    const done: Array<Promise<WorkerResult>> = [];
    for (let q = 0; q < queues; q++) {
      const cpu = workerCpu(pin, q);
      const w = new Worker(__filename, { workerData: { dir, size, frames, engine, ...(tune.batch !== undefined ? { batch: tune.batch } : {}), writeBatch: libraryWriteBatch(tune), flow: q, ...(tune.slotSize !== undefined ? { slotSize: tune.slotSize } : {}), ...(cpu !== undefined ? { cpu } : {}), warmupMs } satisfies WorkerJob });
      workers.push(w);
      ready.push(
        new Promise((resolve, reject) => {
          w.once('error', reject);
          w.once('message', (m: { type: string; tid: number; message?: string }) => {
            if (m.type !== 'ready') return reject(new Error(`library worker: ${m.message ?? m.type}`));
            resolve();
          });
        }),
      );
      done.push(
        new Promise((resolve, reject) => {
          w.on('error', reject);
          w.on('message', (m: { type: string; res?: WorkerResult; message?: string }) => {
            if (m.type === 'done') resolve(m.res!);
            else if (m.type === 'error') reject(new Error(`library worker: ${m.message}`));
          });
        }),
      );
      done[done.length - 1]!.catch(() => undefined); // reported through `ready` or Promise.all(done)
    }
    await Promise.all(ready);
    waitQueues(queues);
    for (const w of workers) w.postMessage('go');
    if (dir === 'read') g = await startGenerator(gen, size, generatorCpu(pin, queues));
    const res = await Promise.all(done);
    const after = deviceStats();
    return summarize({ impl: 'library', engine: res[0]!.engine, engineReq: engine, dir, size, queues, perQueue: res, kernelTxDropped: after.txDropped - before.txDropped, pin });
  } finally {
    await stopChild(g);
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

// ------------------------------------------------------------ orchestration

export interface DataBenchOptions {
  outDir: string;
  srcDir: string;
  repeats: number;
  sizes: Size[];
  queues: number[];
  dirs: Dir[];
  /** Library engines to measure ('auto' = what openQueueIO picks). */
  engines: Array<IoEngine | 'auto'>;
  /** Frames per run for 60 B, 1514 B and GSO. */
  frames: Record<string, number>;
  /** Before each run, wait until other load is below this share of the CPUs (0 = do not wait). */
  quiet?: number;
  /** ... for at most this long. */
  quietMaxMs?: number;
  /**
   * Library tuning: QueueIO batch (receive batch) and slotSize options, default the library's;
   * writeBatch: frames per writeBatch call of the writer, default C_BEST_WRITE_BATCH.
   */
  tune?: { batch?: number; writeBatch?: number; slotSize?: number };
  /** CPU placements to measure, each a full set of runs (default ['split']). */
  pins?: PinMode[];
  /**
   * Reads: each reader (tapio and the library alike) measures from the first
   * frame or batch it reads this many ms after its first one (default 0: from
   * its first frame).  --frames counts measured frames.
   */
  readWarmupMs?: number;
  log?: (line: string) => void;
}

/** The median run (by aggregate pps) of repeated runs. */
function medianRun(runs: DataRun[]): DataRun & { repeats: number; ppsAll: number[]; cpuUsPerFrame: number; cpuAll: number[] } {
  const sorted = [...runs].sort((a, b) => a.pps - b.pps);
  const m = sorted[(sorted.length - 1) >> 1]!;
  const cpu = runs.map((r) => r.perQueue.reduce((a, q) => a + q.cpuUsPerFrame, 0) / r.perQueue.length);
  return {
    ...m,
    pps: median(runs.map((r) => r.pps)),
    gbps: median(runs.map((r) => r.gbps)),
    repeats: runs.length,
    ppsAll: runs.map((r) => Math.round(r.pps)),
    cpuUsPerFrame: median(cpu),
    cpuAll: cpu.map((c) => Math.round(c * 1000) / 1000),
  };
}

export type DataResult = ReturnType<typeof medianRun>;

/**
 * Runs every (direction, size, queues) case for every implementation,
 * alternating the implementations within each repeat so they see the same
 * machine state, and returns the median run of each.
 */
export async function runDataBench(o: DataBenchOptions): Promise<{ results: DataResult[]; uring: boolean; programs: Programs }> {
  const log = o.log ?? (() => undefined);
  const p = buildPrograms(o.outDir, o.srcDir);
  // No IPv6 in the namespace: keeps DAD / MLD frames out of the read numbers.
  execFileSync('sysctl', ['-qw', 'net.ipv6.conf.default.disable_ipv6=1', 'net.ipv6.conf.all.disable_ipv6=1']);
  const setup = openTap({ name: TAP, queues: 1, existing: 'forbid', persist: true, vnetHdrSize: 12, offloads: { csum: true, tso4: true, tso6: true }, mac: TAP_MAC, up: true });
  setup.close();
  const all = new Map<string, DataRun[]>();
  try {
    for (const dir of o.dirs) {
      // The (first) library engine runs right next to the best C loop in every
      // repeat (this order, then reversed): the ratio that matters most is
      // paired across seconds, not across the slow plain loop (with --quiet,
      // the wait for a quiet machine comes in between).  This shared VM changes speed
      // by up to 2x every few seconds; runs further apart land in different
      // speeds more often.
      const impls: Array<{ impl: Impl; engine?: IoEngine | 'auto' }> = [
        { impl: 'c-plain' },
        ...(p.uring ? [{ impl: 'c-uring' as const }] : []),
        ...(p.best[dir] && dir === 'read' ? [{ impl: 'c-batch' as const }] : []),
        ...(p.best[dir] ? [{ impl: 'c-best' as const }] : []),
        ...o.engines.map((engine) => ({ impl: 'library' as const, engine })),
      ];
      for (const size of o.sizes) {
        for (const queues of o.queues) {
          for (const pin of o.pins ?? ['split']) {
            const frames = o.frames[String(size)]!;
            for (let r = 0; r < o.repeats; r++) {
              const order = r % 2 === 0 ? impls : [...impls].reverse();
              for (const { impl, engine } of order) {
                const key = `${dir}|${size}|${queues}|${pin}|${impl}|${engine ?? ''}`;
                const busyBefore = o.quiet ? await waitQuiet(o.quiet, o.quietMaxMs ?? 300_000) : undefined;
                const warm = dir === 'read' ? (o.readWarmupMs ?? 0) : 0;
                const run = impl === 'library' ? await runLibrary(dir, size, queues, frames, engine!, p.gen, o.tune, pin, warm) : await runC(p, impl, dir, size, queues, frames, pin, warm);
                if (busyBefore !== undefined) run.busyBefore = busyBefore;
                if (!all.has(key)) all.set(key, []);
                all.get(key)!.push(run);
                log(
                  `  ${dir} ${String(size).padStart(4)} B x${queues}q pin=${pin} ${impl}${engine ? `(${run.engine})` : ''}: ${(run.pps / 1e6).toFixed(3)} Mpps ${run.gbps.toFixed(2)} Gbit/s, ` +
                    `${run.perQueue.map((q) => q.cpuUsPerFrame.toFixed(3)).join('/')} µs CPU/frame` +
                    // C: how much of that CPU io_uring's io-wq threads used (in parallel, maybe on the other CPU), and CQEs per enter
                    (run.perQueue.some((q) => q.workers) ? ` (io-wq: ${run.perQueue.map((q) => `${q.workers} threads ${(q.workerCpuUsPerFrame ?? 0).toFixed(3)} µs`).join('/')})` : '') +
                    (run.perQueue.some((q) => q.framesPerEnter !== undefined) ? ` ${run.perQueue.map((q) => (q.framesPerEnter ?? 0).toFixed(1)).join('/')} frames/enter` : '') +
                    (busyBefore !== undefined ? ` (other load before: ${(busyBefore * 100).toFixed(0)}%)` : ''),
                );
              }
            }
          }
        }
      }
    }
  } finally {
    try {
      deleteTap(TAP);
    } catch {
      /* the namespace goes away anyway */
    }
  }
  return { results: [...all.values()].map(medianRun), uring: p.uring, programs: p };
}

// ------------------------------------------------------------ table

function fmtPps(pps: number): string {
  return pps >= 1e6 ? `${(pps / 1e6).toFixed(2)} M` : `${(pps / 1e3).toFixed(0)} k`;
}

/** Median over the repeats of a.pps[r] / b.pps[r] (runs of one repeat are back to back). */
export function pairedRatio(a: { ppsAll: number[] }, b: { ppsAll: number[] }): number {
  const n = Math.min(a.ppsAll.length, b.ppsAll.length);
  const rs: number[] = [];
  for (let r = 0; r < n; r++) if (b.ppsAll[r]! > 0) rs.push(a.ppsAll[r]! / b.ppsAll[r]!);
  return rs.length ? median(rs) : NaN;
}

/** The results as a text table (also used for docs/performance.md). */
export function dataTable(results: DataResult[], libEngine: string = 'auto'): string {
  const find = (dir: Dir, size: Size, q: number, pin: PinMode | undefined, impl: Impl, engine?: string): DataResult | undefined =>
    results.find((r) => r.dir === dir && r.size === size && r.queues === q && r.pin === pin && r.impl === impl && (impl !== 'library' || r.engineReq === engine));
  const pins = new Set(results.map((r) => r.pin));
  const head = [
    'dir', 'size', 'Q', ...(pins.size > 1 ? ['pin'] : []), 'library pps', 'Gbit/s', 'C plain pps', 'lib/C', 'C uring x32 pps', 'lib/x32', 'C best pps', 'lib/best',
    'lib µs/f', 'C µs/f', 'x32 µs/f', 'best µs/f', 'lib 2q/1q', 'packed pps', 'distinct pps', 'C batch pps', 'lib/batch', 'batch µs/f',
  ];
  const rows: string[][] = [];
  const seen = new Set<string>();
  for (const r of results) {
    const k = `${r.dir}|${r.size}|${r.queues}|${r.pin}`;
    if (seen.has(k)) continue;
    seen.add(k);
    const lib = find(r.dir, r.size, r.queues, r.pin, 'library', libEngine);
    const c = find(r.dir, r.size, r.queues, r.pin, 'c-plain');
    const u = find(r.dir, r.size, r.queues, r.pin, 'c-uring');
    const b = find(r.dir, r.size, r.queues, r.pin, 'c-best');
    const bt = find(r.dir, r.size, r.queues, r.pin, 'c-batch');
    const one = find(r.dir, r.size, 1, r.pin, 'library', libEngine);
    const cpu = (x: DataResult | undefined): string => (x ? x.cpuUsPerFrame.toFixed(3) : '-');
    // Ratios are paired: repeat r of the library against repeat r of the C
    // program, run back to back, then the median over the repeats.  The
    // machine's speed drifts over minutes (a shared VM host): pairing cancels
    // what a ratio of two separate medians would keep.
    const ratio = (a: DataResult | undefined, b: DataResult | undefined): string => (a && b ? `${pairedRatio(a, b).toFixed(2)}x` : '-');
    rows.push([
      r.dir,
      r.size === 'gso' ? '64K GSO' : `${r.size} B`,
      String(r.queues),
      ...(pins.size > 1 ? [r.pin ?? ''] : []),
      lib ? fmtPps(lib.pps) : '-',
      lib ? lib.gbps.toFixed(2) : '-',
      c ? fmtPps(c.pps) : '-',
      ratio(lib, c),
      u ? fmtPps(u.pps) : '-',
      ratio(lib, u),
      b ? fmtPps(b.pps) : '-',
      ratio(lib, b),
      cpu(lib),
      cpu(c),
      cpu(u),
      cpu(b),
      lib && one && r.queues > 1 ? `${(lib.pps / one.pps).toFixed(2)}x` : '',
      lib && r.dir === 'write' ? fmtPps(lib.perQueue.reduce((a, q) => a + ((q as { packed?: { pps: number } }).packed?.pps ?? 0), 0)) : '',
      lib && r.dir === 'write' ? fmtPps(lib.perQueue.reduce((a, q) => a + ((q as { distinct?: { pps: number } }).distinct?.pps ?? 0), 0)) : '',
      bt ? fmtPps(bt.pps) : '',
      bt ? ratio(lib, bt) : '',
      bt ? cpu(bt) : '',
    ]);
  }
  return textTable(head, rows, 3);
}

if (!isMainThread && (workerData as WorkerJob | undefined)?.dir) {
  workerMain(workerData as WorkerJob).catch((err: unknown) => {
    parentPort!.postMessage({ type: 'error', message: String((err as Error)?.stack ?? err) });
    throw err;
  });
}
