/**
 * The vhost-user benchmark's arithmetic (bench/vhost-user.ts): the guest
 * testpmd's cumulative RX-packets read from its --stats-period output, the
 * paired ratio (median of per-repeat ratios, not a ratio of medians), and
 * the table (per-pair rates, sizes with the FCS, the CPU model line).
 */
import { describe, expect, it } from 'vitest';
import { batchingFromCliOutput, pairedRatio, testpmdRx, vhostUserTable, type VuResult, type VuRun } from '../../bench/vhost-user';

const STATS = (n: number): string => `
  ######################## NIC statistics for port 0  ########################
  RX-packets: ${n}       RX-missed: 0          RX-bytes:  ${n * 60}
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 0          TX-errors: 0          TX-bytes:  0

  Throughput (since last show)
  Rx-pps:         1234          Rx-bps:       592320
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
`;

const run = (impl: 'mqtap' | 'dpdk', pps: number, cpu = 1): VuRun => ({ impl, dir: 'guest-to-tap', size: 60, pairs: 2, pps, cpuUsPerFrame: cpu, seconds: 5, frames: pps * 5 });

describe('vhost-user bench', () => {
  it('testpmdRx: the latest cumulative RX-packets, undefined before the first stats line', () => {
    expect(testpmdRx('EAL: starting\nPort 0: link up\n')).toBeUndefined();
    expect(testpmdRx(STATS(10) + STATS(12345))).toBe(12345);
    expect(testpmdRx(STATS(0))).toBe(0);
  });

  it("batching: frames per tap syscall and per wake-up from the CLI's last 'disconnected' event, summed over pairs", () => {
    const c = (o: Record<string, number | string>): Record<string, number | string> => ({ txFrames: 0, rxFrames: 0, txSyscalls: 0, rxSyscalls: 0, wakeups: 0, tapEngine: 'uring', ...o });
    const out = [
      '{"event":"ready","socket":"/tmp/x"}',
      JSON.stringify({ event: 'disconnected', reason: null, counters: [c({ txFrames: 1, txSyscalls: 1, wakeups: 1 })] }),
      'mqtap: some text line',
      JSON.stringify({ event: 'disconnected', reason: null, counters: [c({ txFrames: 1000, txSyscalls: 10, rxFrames: 300, rxSyscalls: 30, wakeups: 5 }), c({ txFrames: 600, txSyscalls: 6, wakeups: 3 })] }),
      '{"event":"stopped"}',
    ].join('\n');
    expect(batchingFromCliOutput(out, 'guest-to-tap')).toEqual({ framesPerSyscall: 100, framesPerWakeup: 200, tapEngine: 'uring' });
    expect(batchingFromCliOutput(out, 'tap-to-guest')).toEqual({ framesPerSyscall: 10, framesPerWakeup: 37.5, tapEngine: 'uring' });
    expect(batchingFromCliOutput('{"event":"ready"}\n{"event":"disconnected","reason":null}', 'guest-to-tap')).toBeUndefined();
  });

  it('pairedRatio: median of run-r ratios', () => {
    // ratios 2, 0.5, 1.5 -> median 1.5; the ratio of the medians would be 90 / 100 = 0.9
    expect(pairedRatio([run('mqtap', 200), run('mqtap', 50), run('mqtap', 90)], [run('dpdk', 100), run('dpdk', 100), run('dpdk', 60)])).toBeCloseTo(1.5);
    expect(pairedRatio([run('mqtap', 3)], [run('dpdk', 2)])).toBeCloseTo(1.5);
  });

  it('table: per-pair Mf/s, the frame size, the paired ratio and the CPU model', () => {
    const r: VuResult = { dir: 'guest-to-tap', size: 60, pairs: 2, mqtap: [run('mqtap', 2_000_000, 0.5)], dpdk: [run('dpdk', 1_000_000, 2)], ratio: 2 };
    const t = vhostUserTable([r]);
    expect(t).toMatch(/^CPU: .+ x \d+ vCPUs \(noisy/);
    const row = t.split('\n').at(-1)!.split(/\s{2,}/);
    expect(row).toEqual(['guest-to-tap', '60 B', '2', '1.000', '0.500', '2.00x', '0.500', '2.000']);
  });
});
