/**
 * A real QEMU that runs no guest, for the QMP, hotplug and launch tests:
 * `-S` (CPUs stopped; devices realized and reset), q35, TCG, no display, no
 * default devices.  ~0.2 s to start; killed with this process (setpriv
 * --pdeathsig where util-linux has it).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { pdeathsigWrapper } from '../../lib/qemu/qemu';
import { need } from './env.js';
import { running, stopChild } from './proc';
import { waitFor } from './wait';

/** The QEMU binary the tests use ($MQTAP_VM_QEMU or qemu-system-x86_64). */
export const QEMU: string = process.env.MQTAP_VM_QEMU || 'qemu-system-x86_64';

/** Where QEMU is, or undefined when it is not installed. */
export function findQemu(): string | undefined {
  const r = spawnSync('sh', ['-c', `command -v "${QEMU}"`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

/**
 * Why a paused QEMU cannot be started here ('' when it can).  With
 * MQTAP_VM_REQUIRED=1 (CI) a missing QEMU throws instead: a failure, not a skip.
 */
export function qemuMissingReason(): string {
  // need(): a skip with the reason printed, or a failure where the run requires QEMU (MQTAP_VM_REQUIRED / MQTAP_REQUIRE).
  return need('qemu', findQemu() ? '' : `${QEMU} not found (apt-get install -y qemu-system-x86)`).reason;
}

/** A machine that realizes and resets its devices and then waits (CPUs stopped): no guest, no console, no monitor. */
export const PAUSED_MACHINE: readonly string[] = ['-M', 'q35', '-accel', 'tcg', '-S', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '64', '-monitor', 'none', '-serial', 'none'];

/** `-qmp unix:PATH,server=on,wait=off`: a QMP socket QEMU listens on. */
export function qmpArgs(qmpPath: string): string[] {
  return ['-qmp', `unix:${qmpPath},server=on,wait=off`];
}

/** `count` PCIe root ports rp0.. (chassis 1..) to hot-plug NICs into. */
export function rootPortArgs(count: number): string[] {
  const a: string[] = [];
  for (let i = 0; i < count; i++) a.push('-device', `pcie-root-port,id=rp${i},chassis=${i + 1}`);
  return a;
}

export interface PausedQemu {
  child: ChildProcess;
  /** QEMU's pid (setpriv execs it: the same process). */
  pid: number;
  qmpPath: string;
  /** SIGKILLs QEMU (if it still runs) and waits for it to be gone. */
  stop(): Promise<void>;
}

/**
 * Starts a paused QEMU listening for QMP on `qmpPath`, with `rootPorts`
 * root ports (rp0..), and waits for the socket.  QEMU's stderr is copied to
 * this process's stderr (prefixed) when `forwardStderr`, else dropped.
 */
export async function startPausedQemu(opts: { qmpPath: string; rootPorts?: number; forwardStderr?: boolean; timeoutMs?: number }): Promise<PausedQemu> {
  const argv = [...pdeathsigWrapper('SIGKILL'), QEMU, ...PAUSED_MACHINE, ...qmpArgs(opts.qmpPath), ...rootPortArgs(opts.rootPorts ?? 1)];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', opts.forwardStderr ? 'pipe' : 'ignore'] });
  child.stderr?.on('data', (b: Buffer) => process.stderr.write(`qemu: ${b.toString()}`));
  const stop = async (): Promise<void> => {
    await stopChild(child, 'SIGKILL', 10_000);
  };
  try {
    await waitFor('the QMP socket', () => existsSync(opts.qmpPath) || !running(child), opts.timeoutMs ?? 30_000);
  } catch (err) {
    await stop();
    throw err;
  }
  if (!running(child)) throw new Error(`${QEMU} exited before it listened for QMP (status ${child.exitCode ?? child.signalCode})`);
  return { child, pid: child.pid!, qmpPath: opts.qmpPath, stop };
}
