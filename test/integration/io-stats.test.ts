/**
 * `mqtap stats NAME` against the real kernel, in a throw-away network
 * namespace (the CLI child starts in it too):
 *
 *   - a persistent tap nobody reads: mqtap attaches --queues N itself and
 *     reports per-queue rates; the counts add up to exactly the frames the
 *     kernel sent, spread over several queues; on SIGINT it detaches again;
 *   - a tap whose queues are held elsewhere (here: by this test process,
 *     which writes known frames on known queues and reads what the kernel
 *     sends): the kernel's per-queue counters (lib/datapath/qstats.ts) — mq child
 *     qdiscs for kernel -> queue, a tcx ingress counter for queue -> kernel
 *     — equal exactly what was written and read per queue, through the
 *     library and through the CLI; the CLI takes no frame away, attaches no
 *     queue, and leaves no tcx program behind, even when SIGKILLed; bpf fds
 *     are O_CLOEXEC;
 *   - a root qdisc that is not mq, --no-bpf, and a CLI without CAP_BPF:
 *     the direction without counters says why ('device' mode when both
 *     lack them), the other still counts;
 *   - the human view has a bar per queue; an unknown name exits 3.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import dgram from 'node:dgram';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadProgram, queueCountProgram, QUEUE_COUNT_ENTRIES, QUEUE_COUNT_VALUE_SIZE } from '../../lib/datapath/bpf.js';
import { openTapIO, type QueueIO, type QueueIOStats } from '../../lib/datapath/io.js';
import { getLink, getTap } from '../../lib/tap/links.js';
import { K, native } from '../../lib/sys/native.js';
import { openQueueStats, tcxIngressPrograms, type QueueCounters } from '../../lib/datapath/qstats.js';
import { openTap, type Tap } from '../../lib/tap/tap.js';
import { CLI, cliBuiltReason, runCli } from '../helpers/cli';
import { fdCount, need, needCommand, netnsSysctls, run, skipNote, tapEnv, useIsolatedNetns } from '../helpers/env.js';
import { tcxMissing } from '../helpers/probes.js';
import { waitFor } from '../helpers/wait.js';

const base = tapEnv();
const env = !base.ok ? base : cliBuiltReason() ? { ok: false, reason: cliBuiltReason() } : need('tcx', tcxMissing());

const NAME = 'sts0';
const LOCAL = '169.254.93.1';
const PEER = '169.254.93.2';

interface Sample {
  name: string;
  mode: 'queues' | 'kernel' | 'device';
  intervalMs: number;
  queues?: Array<{
    queue: number;
    rxFrames: number | null;
    rxBytes: number | null;
    rxPps: number | null;
    txFrames: number | null;
    txBytes: number | null;
    txPps: number | null;
  }>;
  sources?: { rx: string | null; tx: string | null };
  unavailable?: { rx?: string; tx?: string };
  device: { rxPps: number };
  note?: string;
}

// The tap "held elsewhere": 4 queues held (written and read) by this test process.
const HELD = 'stq0';
const HELD_LOCAL = '169.254.94.1';
const HELD_PEER = '169.254.94.2';
const QUEUES = 4;
/** Frames written on queue q: count and length, different per queue. */
const WRITE = [0, 1, 2, 3].map((q) => ({ frames: 3 + 4 * q, len: 64 + 32 * q }));
/** UDP datagrams the kernel sends out of the held tap (fresh flows: spread over the queues). */
const FLOWS = 160;

/** JSON lines of a running `mqtap stats --json --watch`. */
function watchStats(args: string[]): { child: ChildProcessByStdio<null, Readable, Readable>; samples: Sample[]; stderr: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, [CLI, 'stats', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const samples: Sample[] = [];
  let buf = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => {
    buf += d.toString();
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      samples.push(JSON.parse(buf.slice(0, i)) as Sample);
      buf = buf.slice(i + 1);
    }
  });
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, samples, stderr: () => err, exited };
}

/** The bpf fds of a process, with their /proc fdinfo. */
function bpfFds(pid: number): Array<{ kind: string; info: string }> {
  const out: Array<{ kind: string; info: string }> = [];
  for (const f of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const l = readlinkSync(`/proc/${pid}/fd/${f}`);
      if (l.startsWith('anon_inode:bpf')) out.push({ kind: l.slice('anon_inode:'.length), info: readFileSync(`/proc/${pid}/fdinfo/${f}`, 'utf8') });
    } catch {
      /* closed meanwhile */
    }
  }
  return out;
}

describe.skipIf(!env.ok)(`mqtap stats${skipNote(env)}`, () => {
  useIsolatedNetns();
  const sockets: dgram.Socket[] = [];
  beforeAll(() => {
    netnsSysctls();
    // a persistent tap with no queue attached
    openTap({ name: NAME, queues: 1, persist: true, mac: '02:00:00:00:5d:01', up: true }).close();
    run('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', NAME]);
    run('ip', ['neigh', 'replace', PEER, 'lladdr', '02:00:00:00:5d:02', 'dev', NAME, 'nud', 'permanent']);
    // useIsolatedNetns deletes it (and every other tap) in afterAll
  });
  afterEach(() => {
    for (const s of sockets.splice(0)) s.close();
  });

  async function udpSocket(local: string): Promise<dgram.Socket> {
    const s = dgram.createSocket('udp4');
    sockets.push(s);
    await new Promise<void>((resolve) => s.bind(0, local, () => resolve()));
    return s;
  }

  it('attaches its own queues to an idle tap and counts every frame per queue', async () => {
    expect(getTap(NAME)!.tun.numQueues).toBe(0);
    const { child, samples, stderr: err, exited } = watchStats([NAME, '--queues', '4', '--interval', '200', '--watch', '--json']);
    try {
      for (let i = 0; i < 500 && getTap(NAME)!.tun.numQueues < 4; i++) await sleep(20);
      expect(getTap(NAME)!.tun.numQueues, err()).toBe(4);
      const s = dgram.createSocket('udp4');
      sockets.push(s);
      await new Promise<void>((resolve) => s.bind(0, LOCAL, () => resolve()));
      const SENT = 400;
      // The kernel's own count: a frame read from a queue is tx_packets (tun_put_user), one it
      // could not queue is tx_dropped (tun_net_xmit).  mqtap must count every frame it read once.
      const before = getLink(NAME)!.stats!;
      for (let i = 0; i < SENT; i++) await new Promise<void>((resolve, reject) => s.send(Buffer.from(`stats ${i}`), 20000 + i, PEER, (e) => (e ? reject(e) : resolve())));
      const counted = (): number => samples.reduce((a, x) => a + (x.queues ?? []).reduce((b, q) => b + (q.rxFrames ?? 0), 0), 0);
      const kernel = (): { read: number; dropped: number } => {
        const now = getLink(NAME)!.stats!;
        return { read: now.txPackets - before.txPackets, dropped: now.txDropped - before.txDropped };
      };
      for (let i = 0; i < 500 && (counted() < kernel().read || kernel().read + kernel().dropped < SENT); i++) await sleep(20);
      child.kill('SIGINT');
      expect(await exited, err()).toBe(0);
      expect(samples.length).toBeGreaterThan(0);
      for (const x of samples) {
        expect(x.mode).toBe('queues');
        expect(x.queues!.map((q) => q.queue)).toEqual([0, 1, 2, 3]);
        expect(x.queues!.every((q) => q.txFrames === 0)).toBe(true);
      }
      const k = kernel();
      expect(k.read + k.dropped, `every frame sent was read or dropped by the kernel (${k.dropped} dropped)`).toBe(SENT);
      expect(k.dropped, 'at most a few frames dropped by the kernel').toBeLessThan(SENT / 20);
      expect(counted(), 'every frame the kernel handed to a queue, counted once').toBe(k.read);
      const perQueue = [0, 1, 2, 3].map((q) => samples.reduce((a, x) => a + (x.queues![q]!.rxFrames ?? 0), 0));
      expect(perQueue.filter((n) => n > 0).length, `spread ${perQueue.join('/')}`).toBeGreaterThan(1);
      // it detached again
      expect(getTap(NAME)!.tun.numQueues).toBe(0);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });

  it('a tap held elsewhere: reads the kernel\'s per-queue counters and attaches no queue', () => {
    const holder = openTap({ name: NAME, existing: 'require', queues: 1 });
    try {
      const r = runCli(['stats', NAME, '--interval', '150', '--json'], { timeoutMs: 30_000 });
      expect(r.code, r.stderr).toBe(0);
      const sample = JSON.parse(r.stdout.trim()) as Sample;
      expect(sample.mode).toBe('kernel');
      expect(sample.queues!.map((q) => q.queue)).toEqual([0]);
      expect(sample.sources!.tx).toBe('tcx ingress counter');
      expect(getTap(NAME)!.tun.numQueues).toBe(1);
      expect(tcxIngressPrograms(getTap(NAME)!.index)).toEqual([]);
    } finally {
      holder.close();
    }
  });

  it('draws a bar per queue, and exits 3 for an unknown tap', () => {
    const r = runCli(['stats', NAME, '--queues', '2', '--interval', '150'], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^QUEUE\s+RX FRAMES\/S/m);
    expect(r.stdout.split('\n').filter((l) => /^[01]\s/.test(l))).toHaveLength(2);
    expect(r.stdout).toMatch(/\|/);
    const missing = runCli(['stats', 'nosuch0'], { timeoutMs: 30_000 });
    expect(missing.code).toBe(3);
    expect(missing.stderr).toMatch(/no tap named nosuch0/);
  });
  describe('queues held elsewhere: the kernel\'s per-queue counters', () => {
    let tap: Tap;
    let ios: QueueIO[] = [];
    let drained: Promise<unknown> = Promise.resolve();
    let ifindex = 0;
    beforeAll(() => {
      tap = openTap({ name: HELD, queues: QUEUES, mac: '02:00:00:00:5e:01', up: true });
      ifindex = getTap(HELD)!.index;
      run('ip', ['addr', 'add', `${HELD_LOCAL}/24`, 'dev', HELD]);
      run('ip', ['neigh', 'replace', HELD_PEER, 'lladdr', '02:00:00:00:5e:02', 'dev', HELD, 'nud', 'permanent']);
      ios = openTapIO(tap);
      // read (and count, in QueueIO.stats()) everything the kernel sends to each queue
      drained = Promise.all(ios.map(async (io) => { for await (const b of io) void b; }));
    });
    afterAll(async () => {
      for (const io of ios) io.close();
      await drained;
      tap?.close();
    });

    const ioStats = (): QueueIOStats[] => ios.map((io) => io.stats());
    const rxSince = (before: QueueIOStats[]): Array<{ frames: number; bytes: number }> =>
      ioStats().map((s, q) => ({ frames: s.rx.frames - before[q]!.rx.frames, bytes: s.rx.bytes - before[q]!.rx.bytes }));

    /** Writes WRITE[q].frames frames of WRITE[q].len bytes on queue q (to a MAC nobody has: the stack drops them after ingress). */
    async function writeKnown(): Promise<void> {
      for (let q = 0; q < QUEUES; q++) {
        const f = Buffer.alloc(WRITE[q]!.len);
        Buffer.from([2, 0, 0, 0, 0x5e, 0x99, 2, 0, 0, 0, 0x5e, 0x02]).copy(f, 0);
        f.writeUInt16BE(0x88b5, 12); // local experimental ethertype
        f.writeUInt8(q, 14);
        const r = await ios[q]!.writeBatch(Array.from({ length: WRITE[q]!.frames }, () => f));
        expect(r.frames).toBe(WRITE[q]!.frames);
      }
    }

    /** FLOWS datagrams out of the tap, one fresh flow each; resolves when this process's readers have them all. */
    async function sendFlows(before: QueueIOStats[]): Promise<void> {
      const s = await udpSocket(HELD_LOCAL);
      for (let i = 0; i < FLOWS; i++) await new Promise<void>((resolve, reject) => s.send(Buffer.from(`flow ${i}`), 31000 + i, HELD_PEER, (e) => (e ? reject(e) : resolve())));
      await new Promise<void>((resolve) => s.close(() => resolve()));
      sockets.splice(sockets.indexOf(s), 1);
      await waitFor(`the readers to get ${FLOWS} frames`, () => rxSince(before).reduce((a, x) => a + x.frames, 0) >= FLOWS);
    }

    it('bpf fds (map, program, link) are O_CLOEXEC, and closing the link detaches the program', () => {
      const BC = native.bpfConstants;
      const base = fdCount();
      const map = native.bpfMapCreate(BC.BPF_MAP_TYPE_PERCPU_ARRAY, 4, QUEUE_COUNT_VALUE_SIZE, QUEUE_COUNT_ENTRIES, 0, 'mqtap_test');
      let link = -1;
      try {
        expect(native.getFdFlags(map) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
        const prog = loadProgram(queueCountProgram(map));
        try {
          expect(native.getFdFlags(prog.fd) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
          link = native.bpfLinkCreate(prog.fd, ifindex, BC.BPF_TCX_INGRESS, BC.BPF_F_BEFORE);
          expect(native.getFdFlags(link) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
        } finally {
          prog.close(); // the link keeps the program
        }
        expect(tcxIngressPrograms(ifindex)).toHaveLength(1);
      } finally {
        if (link >= 0) native.close(link);
        native.close(map);
      }
      expect(tcxIngressPrograms(ifindex)).toEqual([]);
      expect(fdCount()).toBe(base);
    });

    it('library: per-queue counts equal exactly what was written and read on each queue', async () => {
      const base = fdCount();
      const st = openQueueStats(HELD);
      let before: QueueCounters;
      let after: QueueCounters;
      let io0: QueueIOStats[];
      try {
        expect(st.tcxAttached).toBe(true);
        expect(tcxIngressPrograms(ifindex)).toHaveLength(1);
        before = st.snapshot();
        io0 = ioStats();
        await writeKnown();
        await sendFlows(io0);
        after = st.snapshot();
      } finally {
        st.close();
      }
      expect(tcxIngressPrograms(ifindex), 'closing detaches the counter').toEqual([]);
      expect(fdCount(), 'no fd left open').toBe(base);
      expect(after.numQueues).toBe(QUEUES);

      // queue -> kernel: the tcx counter, per queue, exactly
      if (before.tx.source !== 'tcx' || after.tx.source !== 'tcx') throw new Error(`tcx counter unavailable: ${JSON.stringify(after.tx)}`);
      const b = before.tx;
      const a = after.tx;
      const tx = a.queues.slice(0, QUEUES).map((x, q) => ({ frames: x.frames - b.queues[q]!.frames, bytes: x.bytes - b.queues[q]!.bytes }));
      expect(tx).toEqual(WRITE.map((w) => ({ frames: w.frames, bytes: w.frames * w.len })));
      expect(a.unrecorded.frames - b.unrecorded.frames).toBe(0);
      expect(after.device!.rxPackets - before.device!.rxPackets, 'the device counted the same frames').toBe(WRITE.reduce((x, w) => x + w.frames, 0));

      // kernel -> queue: the mq children, per queue, exactly what each queue's reader got
      if (before.rx.source !== 'qdisc' || after.rx.source !== 'qdisc') throw new Error(`qdisc counters unavailable: ${JSON.stringify(after.rx)}`);
      expect(after.rx.root).toBe('mq 0:');
      const rb = before.rx;
      const rx = after.rx.queues.map((x) => ({ frames: x.frames - rb.queues[x.queue]!.frames, bytes: x.bytes - rb.queues[x.queue]!.bytes }));
      const read = rxSince(io0);
      expect(rx).toEqual(read);
      expect(rx.reduce((x, y) => x + y.frames, 0)).toBe(FLOWS);
      expect(rx.filter((x) => x.frames > 0).length, `spread ${rx.map((x) => x.frames).join('/')}`).toBeGreaterThan(1);
    });

    it('CLI: per-queue rows with exact counts while this process holds the queues; no tcx program afterwards', async () => {
      const w = watchStats([HELD, '--watch', '--interval', '200', '--json']);
      try {
        await waitFor('the first sample', () => w.samples.length >= 1 || w.child.exitCode !== null);
        expect(w.samples.length, w.stderr()).toBeGreaterThan(0);
        // the CLI holds the tcx link (and nothing of the tap): one bpf_link fd for this device's tcx ingress
        const links = bpfFds(w.child.pid!).filter((f) => f.kind === 'bpf_link');
        expect(links).toHaveLength(1);
        expect(links[0]!.info).toMatch(/^link_type:\s*tcx$/m);
        expect(links[0]!.info).toMatch(new RegExp(`^ifindex:\\s*${ifindex}$`, 'm'));
        expect(tcxIngressPrograms(ifindex)).toHaveLength(1);
        expect(getTap(HELD)!.tun.numQueues).toBe(QUEUES);

        const io0 = ioStats();
        await writeKnown();
        await sendFlows(io0);
        const read = rxSince(io0);
        const total = (pick: (q: NonNullable<Sample['queues']>[number]) => number | null): number[] =>
          [0, 1, 2, 3].map((q) => w.samples.reduce((a, x) => a + (pick(x.queues![q]!) ?? 0), 0));
        const wantTx = WRITE.reduce((a, x) => a + x.frames, 0);
        await waitFor('the CLI to count every frame', () => total((q) => q.txFrames).reduce((a, x) => a + x, 0) >= wantTx && total((q) => q.rxFrames).reduce((a, x) => a + x, 0) >= FLOWS);
        w.child.kill('SIGINT');
        expect(await w.exited, w.stderr()).toBe(0);

        for (const x of w.samples) {
          expect(x.mode).toBe('kernel');
          expect(x.queues!.map((q) => q.queue)).toEqual([0, 1, 2, 3]);
          expect(x.sources).toEqual({ rx: 'qdisc mq 0: children', tx: 'tcx ingress counter' });
          expect(x.unavailable).toBeUndefined();
        }
        expect(total((q) => q.txFrames)).toEqual(WRITE.map((x) => x.frames));
        expect(total((q) => q.txBytes)).toEqual(WRITE.map((x) => x.frames * x.len));
        expect(total((q) => q.rxFrames)).toEqual(read.map((x) => x.frames));
        expect(total((q) => q.rxBytes)).toEqual(read.map((x) => x.bytes));
        // it took nothing away: this process read every frame, and still holds its 4 queues
        expect(read.reduce((a, x) => a + x.frames, 0)).toBe(FLOWS);
        expect(getTap(HELD)!.tun.numQueues).toBe(QUEUES);
        expect(tcxIngressPrograms(ifindex), 'the tcx program went with the CLI').toEqual([]);
      } finally {
        if (w.child.exitCode === null) w.child.kill('SIGKILL');
      }
    });

    it('CLI killed with SIGKILL leaves no tcx program behind, and a second run works', async () => {
      const w = watchStats([HELD, '--watch', '--interval', '150', '--json']);
      try {
        await waitFor('the first sample', () => w.samples.length >= 1 || w.child.exitCode !== null);
        expect(w.samples.length, w.stderr()).toBeGreaterThan(0);
        expect(tcxIngressPrograms(ifindex)).toHaveLength(1);
        w.child.kill('SIGKILL');
        await w.exited;
      } finally {
        if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill('SIGKILL');
      }
      // the link fd died with the process: the kernel detached the program (release may finish just after the exit is reported)
      await waitFor('the tcx program to go', () => tcxIngressPrograms(ifindex).length === 0);
      const again = runCli(['stats', HELD, '--interval', '150', '--json'], { timeoutMs: 30_000 });
      expect(again.code, again.stderr).toBe(0);
      const sample = JSON.parse(again.stdout.trim()) as Sample;
      expect(sample.mode).toBe('kernel');
      expect(sample.sources!.tx).toBe('tcx ingress counter');
      expect(tcxIngressPrograms(ifindex)).toEqual([]);
    });

    it('a root qdisc that is not mq: per-queue rx unavailable with the reason; with --no-bpf as well: device mode', () => {
      run('tc', ['qdisc', 'replace', 'dev', HELD, 'root', 'handle', '1:', 'pfifo']);
      try {
        const r = runCli(['stats', HELD, '--interval', '150', '--json'], { timeoutMs: 30_000 });
        expect(r.code, r.stderr).toBe(0);
        const s1 = JSON.parse(r.stdout.trim()) as Sample;
        expect(s1.mode).toBe('kernel');
        expect(s1.sources).toEqual({ rx: null, tx: 'tcx ingress counter' });
        expect(s1.unavailable!.rx).toMatch(/root qdisc is pfifo 1:, not mq/);
        expect(s1.queues!.every((q) => q.rxFrames === null && q.rxPps === null && q.txFrames === 0)).toBe(true);

        const human = runCli(['stats', HELD, '--interval', '150'], { timeoutMs: 30_000 });
        expect(human.code, human.stderr).toBe(0);
        expect(human.stdout).toMatch(/^0\s+-\s+-\s+0 f\/s/m);
        expect(human.stdout).toMatch(/per-queue rx unavailable: the root qdisc is pfifo 1:, not mq/);

        const r2 = runCli(['stats', HELD, '--interval', '150', '--json', '--no-bpf'], { timeoutMs: 30_000 });
        expect(r2.code, r2.stderr).toBe(0);
        const s2 = JSON.parse(r2.stdout.trim()) as Sample;
        expect(s2.mode).toBe('device');
        expect(s2.queues).toBeUndefined();
        expect(s2.unavailable!.rx).toMatch(/not mq/);
        expect(s2.unavailable!.tx).toMatch(/--no-bpf/);
        expect(s2.note).toMatch(/per-queue counters unavailable in both directions/);
      } finally {
        run('tc', ['qdisc', 'del', 'dev', HELD, 'root']); // back to the default mq
      }
      const st = openQueueStats(HELD, { bpf: false });
      try {
        const c = st.snapshot();
        expect(c.rx.source === 'qdisc' && c.rx.root).toBe('mq 0:');
        expect(c.tx).toEqual({ source: null, reason: expect.stringMatching(/--no-bpf/) as unknown as string });
      } finally {
        st.close();
      }
      expect(tcxIngressPrograms(ifindex)).toEqual([]);
    });

    it.skipIf(!needCommand('setpriv').ok)('without CAP_BPF: per-queue rx still, tx unavailable with the reason, exit 0', () => {
      // root, but with CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON gone from the bounding set (and so from the exec'd CLI)
      const r = runCli(['stats', HELD, '--interval', '150', '--json'], { wrapper: ['setpriv', '--bounding-set', '-bpf,-sys_admin,-perfmon', '--inh-caps', '-all'], timeoutMs: 30_000 });
      expect(r.code, r.stderr).toBe(0);
      const s = JSON.parse(r.stdout.trim()) as Sample;
      expect(s.mode).toBe('kernel');
      expect(s.sources).toEqual({ rx: 'qdisc mq 0: children', tx: null });
      // Where kernel.unprivileged_bpf_disabled=0 anyone may create the map, and the program load is what is refused.
      const refused = readFileSync('/proc/sys/kernel/unprivileged_bpf_disabled', 'utf8').trim() === '0' ? 'BPF_PROG_LOAD' : 'BPF_MAP_CREATE';
      expect(s.unavailable!.tx).toMatch(new RegExp(`needs CAP_BPF and CAP_NET_ADMIN \\(${refused}: EPERM\\)`));
      expect(s.queues!.every((q) => q.rxFrames === 0 && q.txFrames === null)).toBe(true);
      expect(tcxIngressPrograms(ifindex)).toEqual([]);
    });

    it('exits 3 with a clear message when the tap does not exist (--json: the error as JSON)', () => {
      const r = runCli(['stats', 'nosuch1', '--json'], { timeoutMs: 30_000 });
      expect(r.code).toBe(3);
      expect(r.stderr).toMatch(/no tap named nosuch1/);
      const e = (JSON.parse(r.stdout) as { error: { code: string; op: string; message: string } }).error;
      expect(e).toMatchObject({ code: 'ENODEV', op: 'LOOKUP', message: 'no tap named nosuch1' });
    });
  });
});
