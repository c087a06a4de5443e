/**
 * dpdk-testpmd with DPDK's virtio-user PMD as a vhost-user front-end, io
 * forwarding (whatever arrives on RX queue i goes back out on TX queue i),
 * for the tests that put a front-end nobody here wrote in front of the
 * backend (vhost-user-dpdk.test.ts, daemon-vhost-user.test.ts).
 *
 * "Both pairs live" in the backend does NOT mean testpmd forwards.  After
 * its port is started (the last ring enabled) testpmd still checks the link
 * and then, in start_packet_forwarding(), flushes every RX queue (rx_burst
 * and free, twice, 10 ms apart; `--no-flush-rx` turns that off) before the
 * forwarding lcore is launched.  Frames the backend puts into the RX rings
 * in that window are counted in the port's RX-packets and then freed: they
 * never reach the TX rings.  A test that sends as soon as the pairs are
 * live loses every frame on an idle machine (its sends all land in the
 * window: "RX-packets 64, TX-packets 0") and some of them on a busy one.
 * So: `await t.forwarding()` before sending.  With `--stats-period`
 * testpmd prints its first "Port statistics" right after
 * start_packet_forwarding() returns (then every period), so that line
 * means the RX queues were flushed and the forwarding lcore runs.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';

export const TESTPMD = 'dpdk-testpmd';

export function haveTestpmd(): boolean {
  return spawnSync('sh', ['-c', `command -v ${TESTPMD}`]).status === 0;
}

export const TESTPMD_MISSING = `${TESTPMD} is not installed (apt-get install dpdk-dev librte-net-virtio23 librte-mempool-ring23)`;

/** testpmd's "Forward statistics for port 0" block, printed when it stops forwarding (SIGINT). */
export interface ForwardStats {
  rxPackets: number;
  rxDropped: number;
  txPackets: number;
  txDropped: number;
}

export interface Testpmd {
  child: ChildProcess;
  /** stdout and stderr so far. */
  output: () => string;
  /** Resolves with the exit code (null: killed by a signal). */
  exited: Promise<number | null>;
  /** Resolves once testpmd forwards (its RX queues flushed, the forwarding lcore launched); rejects with its output if it exits or `ms` pass first. */
  forwarding: (ms?: number) => Promise<void>;
  /** The forward statistics it printed on its way out, undefined before. */
  forwardStats: () => ForwardStats | undefined;
}

/** Its first --stats-period print: start_packet_forwarding() has returned. */
const FORWARDING = 'Port statistics';

export function parseForwardStats(out: string): ForwardStats | undefined {
  const m = /Forward statistics for port 0\s*-+\s*RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)[^\n]*\n\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)/.exec(out);
  if (!m) return undefined;
  return { rxPackets: Number(m[1]), rxDropped: Number(m[2]), txPackets: Number(m[3]), txDropped: Number(m[4]) };
}

/**
 * testpmd on `socket` with `pairs` queue pairs (io forwarding, one
 * forwarding lcore, stats every second), its runtime directory under
 * /var/run/dpdk/`prefix` (the caller removes it).  `track` gets the child
 * at once, so the caller's cleanup can kill it whatever happens next.
 */
export function startTestpmd(socket: string, prefix: string, track: (c: ChildProcess) => void, pairs = 2): Testpmd {
  const child = spawn(
    TESTPMD,
    [
      '-l', '0-1', '--no-huge', '--no-pci', '-m', '512', '--file-prefix', prefix,
      '--vdev', `net_virtio_user0,path=${socket},queues=${pairs}`,
      '--', '--stats-period', '1', '--forward-mode=io', `--rxq=${pairs}`, `--txq=${pairs}`, '--nb-cores=1', '--total-num-mbufs=16384',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  track(child);
  let out = '';
  let done = false;
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((res) =>
    child.on('exit', (code) => {
      done = true;
      res(code);
    }),
  );
  const forwarding = async (ms = 30_000): Promise<void> => {
    const deadline = Date.now() + ms;
    while (!out.includes(FORWARDING)) {
      if (done) throw new Error(`${TESTPMD} exited before it forwarded; its output:\n${out.slice(-3000)}`);
      if (Date.now() > deadline) throw new Error(`${TESTPMD} did not start forwarding in ${ms} ms; its output:\n${out.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  return { child, output: () => out, exited, forwarding, forwardStats: () => parseForwardStats(out) };
}
