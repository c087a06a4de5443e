/**
 * Guest VM harness: boots a small Debian 6.1 kernel under QEMU TCG (no KVM
 * needed) with the host's root shared read-only over 9p, runs one command in
 * a chroot of it and powers off.  Gives tests a real /dev/vhost-net (the host
 * kernel has none), a kernel of a known version, and a machine to attach taps
 * to.  See test/vm/README.md.
 *
 * The QEMU command line and the guest job script are built in exactly one
 * place, test/vm/run-in-guest.sh (--print-qemu-args); the image is built by
 * test/vm/build.sh.  This module only drives them.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants as fsConstants, rmSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';

/** test/vm/ */
export const VM_DIR: string = __dirname;
/** The repository root (the default working directory of guest commands). */
export const REPO_ROOT: string = path.resolve(__dirname, '..', '..');
const BUILD_SH = path.join(VM_DIR, 'build.sh');
const RUN_SH = path.join(VM_DIR, 'run-in-guest.sh');

export interface GuestImage {
  /** Kernel passed to -kernel: the uncompressed vmlinux (PVH boot) or the bzImage. */
  kernel: string;
  /** The busybox initramfs (test/vm/init.sh is its /init). */
  initrd: string;
  /** lib/modules/<kver> of the guest kernel (full tree, with modules.dep). */
  modulesDir?: string;
  /** Guest kernel release, e.g. 6.1.0-56-amd64. */
  kernelVersion?: string;
  /** The cache dir ($MQTAP_VM_CACHE, /var/cache/mqtap-vm or test/vm/.cache). */
  cacheDir: string;
}

export type VmAvailability = { ok: true } | { ok: false; reason: string };

export interface GuestQemuArgsOptions {
  /** Command and arguments, run with exec (no shell) in the guest. */
  cmd: string[];
  /** Working directory in the guest (default: the repo root; the host root is visible at the same paths). */
  cwd?: string;
  /** Extra environment variables (on top of PATH, HOME=/root, LANG=C.UTF-8, MQTAP_IN_GUEST=1, ...). */
  env?: Record<string, string>;
  /**
   * Host dir shared with the guest (9p tag "results", writable; /run/mqtap in
   * the guest, $MQTAP_GUEST_RESULTS).  job.sh is written there; after QEMU
   * exits it holds stdout, stderr, exitcode (and init-error if the guest's
   * init failed).  Must exist or be creatable; the caller removes it.
   */
  resultsDir: string;
  /** Guest memory in MiB (default 1024). */
  memMiB?: number;
  /** Guest CPUs (default 2). */
  smp?: number;
  /** Extra kernel command line. */
  appendExtra?: string;
  /** Extra kernel modules to load before the command runs (others auto-load on demand). */
  modules?: string[];
  /** Serial console into this file instead of QEMU's stdout. */
  consoleFile?: string;
  /** Also copy the command's stdout/stderr to the serial console (debugging). */
  echo?: boolean;
  /** Log the guest init's steps (with uptime) to the console. */
  debug?: boolean;
}

export interface RunInGuestOptions {
  cmd: string[];
  cwd?: string;
  env?: Record<string, string>;
  /** Kill QEMU after this long (default 180 000 ms); the result then has exitCode null and timedOut true. */
  timeoutMs?: number;
  /** Appended to the QEMU argv, e.g. ['-netdev', 'tap,id=n0,fds=3:4', '-device', 'virtio-net-pci,netdev=n0,mq=on']. */
  qemuExtraArgs?: string[];
  memMiB?: number;
  smp?: number;
  appendExtra?: string;
  modules?: string[];
  echo?: boolean;
  debug?: boolean;
  /**
   * Extra fds for QEMU (e.g. tap queue fds for `-netdev tap,fds=3:4`): entry i
   * becomes fd 3+i in QEMU.
   */
  extraFds?: number[];
  /** Aborting kills QEMU and rejects. */
  signal?: AbortSignal;
}

export interface RunInGuestResult {
  /** The command's exit status in the guest; null if QEMU was killed (timeout). */
  exitCode: number | null;
  /** The command's stdout / stderr, exactly as written (no console noise, no \r). */
  stdout: string;
  stderr: string;
  /** The serial console (kernel messages, init's messages), \r removed. */
  console: string;
  /** From the call until QEMU exited. */
  durationMs: number;
  timedOut: boolean;
  /** QEMU's own stderr (warnings). */
  qemuStderr: string;
}

/** The QEMU binary ($MQTAP_VM_QEMU or qemu-system-x86_64). */
export function qemuBinary(): string {
  return process.env.MQTAP_VM_QEMU || 'qemu-system-x86_64';
}

function inPath(bin: string): string | undefined {
  if (bin.includes('/')) return isExecutable(bin) ? bin : undefined;
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, bin);
    if (isExecutable(p)) return p;
  }
  return undefined;
}

function isExecutable(p: string): boolean {
  try {
    accessSync(p, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

let availability: VmAvailability | undefined;

/**
 * Quick, synchronous check whether guests can be booted here: Linux x86-64
 * host (the guest runs the host's binaries), QEMU and bash present, and the
 * image built or buildable (`build.sh --check`, no download).  Memoized.
 * MQTAP_VM_DISABLE=1 forces { ok: false }.
 */
export function vmAvailable(): VmAvailability {
  if (availability) return availability;
  availability = checkAvailable();
  // CI sets MQTAP_VM_REQUIRED=1: there a missing guest is a failure, not a skip.
  if (!availability.ok && process.env.MQTAP_VM_REQUIRED === '1')
    throw new Error(`the guest VM is required (MQTAP_VM_REQUIRED=1) but unavailable: ${availability.reason}`);
  return availability;
}

function checkAvailable(): VmAvailability {
  if (process.env.MQTAP_VM_DISABLE && process.env.MQTAP_VM_DISABLE !== '0') {
    return { ok: false, reason: 'MQTAP_VM_DISABLE is set' };
  }
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    return { ok: false, reason: `needs a Linux x86-64 host (this is ${process.platform}/${process.arch})` };
  }
  if (!inPath(qemuBinary())) {
    return { ok: false, reason: `${qemuBinary()} not found (apt-get install -y qemu-system-x86 busybox-static)` };
  }
  if (!inPath('bash')) return { ok: false, reason: 'bash not found' };
  const r = spawnSync(BUILD_SH, ['--check'], { encoding: 'utf8', timeout: 30_000 });
  if (r.error) return { ok: false, reason: `test/vm/build.sh --check: ${r.error.message}` };
  if (r.status === 0 || r.status === 3) return { ok: true };
  const msg = (r.stderr || '').trim().split('\n').filter(Boolean).pop() ?? `exit status ${r.status}`;
  return { ok: false, reason: msg.replace(/^mqtap-vm: (error: )?/, '') };
}

function parseEnvLines(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^(MQTAP_VM_[A-Z_]+)=(.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

interface Captured {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function runScript(file: string, args: string[], timeoutMs: number): Promise<Captured> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

let imagePromise: Promise<GuestImage> | undefined;

/**
 * Builds the guest image if needed (test/vm/build.sh: apt-get download of the
 * kernel the first time, ~15-30 s; a few tens of ms when cached) and returns
 * its paths.  Memoized per process; a failure is not memoized.
 */
export function ensureGuestImage(): Promise<GuestImage> {
  if (!imagePromise) {
    imagePromise = buildImage();
    imagePromise.catch(() => {
      imagePromise = undefined;
    });
  }
  return imagePromise;
}

async function buildImage(): Promise<GuestImage> {
  const r = await runScript(BUILD_SH, [], 20 * 60_000);
  if (r.code !== 0) {
    const tail = r.stderr.trim().split('\n').slice(-15).join('\n');
    throw new Error(`test/vm/build.sh failed (${r.code ?? r.signal}):\n${tail}`);
  }
  const env = parseEnvLines(r.stdout);
  const kernel = env.MQTAP_VM_KERNEL;
  const initrd = env.MQTAP_VM_INITRD;
  const cacheDir = env.MQTAP_VM_CACHE;
  if (!kernel || !initrd || !cacheDir) throw new Error(`test/vm/build.sh printed no image paths:\n${r.stdout}`);
  const image: GuestImage = { kernel, initrd, cacheDir };
  if (env.MQTAP_VM_MODULES_DIR) image.modulesDir = env.MQTAP_VM_MODULES_DIR;
  if (env.MQTAP_VM_KVER) image.kernelVersion = env.MQTAP_VM_KVER;
  return image;
}

/**
 * The full QEMU argv (without the binary) that boots the guest and runs
 * `cmd`, with no NIC (-nodefaults, -nic none) and the serial console on
 * QEMU's stdout (or opts.consoleFile).  Writes resultsDir/job.sh.  Callers can
 * append their own -netdev/-device args and spawn QEMU themselves; after QEMU
 * exits, read resultsDir/{exitcode,stdout,stderr}.
 */
export async function guestQemuArgs(opts: GuestQemuArgsOptions): Promise<string[]> {
  if (!Array.isArray(opts.cmd) || opts.cmd.length === 0) throw new TypeError('guestQemuArgs: cmd must be a non-empty array');
  await ensureGuestImage();
  const args = ['--print-qemu-args', '--results-dir', path.resolve(opts.resultsDir)];
  args.push('--cwd', path.resolve(opts.cwd ?? REPO_ROOT));
  args.push('--node', process.execPath);
  if (opts.memMiB !== undefined) args.push('--mem', String(Math.trunc(opts.memMiB)));
  if (opts.smp !== undefined) args.push('--smp', String(Math.trunc(opts.smp)));
  if (opts.appendExtra) args.push('--append', opts.appendExtra);
  if (opts.modules?.length) args.push('--modules', opts.modules.join(','));
  if (opts.consoleFile) args.push('--console-file', path.resolve(opts.consoleFile));
  if (opts.echo) args.push('--echo');
  if (opts.debug) args.push('--debug');
  for (const [k, v] of Object.entries(opts.env ?? {})) args.push('--env', `${k}=${v}`);
  args.push('--', ...opts.cmd);
  const r = await runScript(RUN_SH, args, 20 * 60_000);
  if (r.code !== 0) {
    throw new Error(`test/vm/run-in-guest.sh --print-qemu-args failed (${r.code ?? r.signal}): ${r.stderr.trim()}`);
  }
  const argv = r.stdout.split('\0');
  if (argv[argv.length - 1] === '') argv.pop();
  if (argv.length === 0) throw new Error('test/vm/run-in-guest.sh printed no QEMU arguments');
  return argv;
}

let pdeathsigWrapper: string[] | undefined;

/** `setpriv --pdeathsig KILL --` if available: QEMU then dies with this process even on SIGKILL. */
function deathWrapper(): string[] {
  if (pdeathsigWrapper) return pdeathsigWrapper;
  const r = spawnSync('setpriv', ['--help'], { encoding: 'utf8' });
  pdeathsigWrapper = !r.error && /--pdeathsig/.test(`${r.stdout}${r.stderr}`) ? ['setpriv', '--pdeathsig', 'KILL', '--'] : [];
  return pdeathsigWrapper;
}

const liveQemus = new Set<ChildProcess>();
const liveDirs = new Set<string>();
let exitHookInstalled = false;

/** On process exit (e.g. vitest tearing down a timed-out test's worker): kill QEMUs, remove temp dirs. */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const c of liveQemus) {
      try {
        c.kill('SIGKILL');
      } catch {
        /* already gone */
      }
    }
    for (const d of liveDirs) {
      try {
        rmSync(d, { recursive: true, force: true });
      } catch {
        /* best effort */
      }
    }
  });
}

async function readOptional(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch {
    return undefined;
  }
}

function tail(text: string, lines: number): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

/**
 * Boots a guest, runs `cmd` in it and returns its exit code and output.
 * QEMU is always killed on timeout, abort, error or process exit, and the
 * temp dir is always removed.  Resolves when the guest reported an exit code
 * or the timeout killed it (exitCode null, timedOut true); rejects when QEMU
 * or the guest's init failed (the error message carries the console tail).
 */
export async function runInGuest(opts: RunInGuestOptions): Promise<RunInGuestResult> {
  const started = Date.now();
  const timeoutMs = opts.timeoutMs ?? 180_000;
  opts.signal?.throwIfAborted();
  installExitHook();
  const resultsDir = await mkdtemp(path.join(os.tmpdir(), 'mqtap-guest-'));
  liveDirs.add(resultsDir);
  let child: ChildProcess | undefined;
  try {
    const qargs: GuestQemuArgsOptions = { cmd: opts.cmd, resultsDir };
    if (opts.cwd !== undefined) qargs.cwd = opts.cwd;
    if (opts.env !== undefined) qargs.env = opts.env;
    if (opts.memMiB !== undefined) qargs.memMiB = opts.memMiB;
    if (opts.smp !== undefined) qargs.smp = opts.smp;
    if (opts.appendExtra !== undefined) qargs.appendExtra = opts.appendExtra;
    if (opts.modules !== undefined) qargs.modules = opts.modules;
    if (opts.echo !== undefined) qargs.echo = opts.echo;
    if (opts.debug !== undefined) qargs.debug = opts.debug;
    const argv = [...(await guestQemuArgs(qargs)), ...(opts.qemuExtraArgs ?? [])];
    opts.signal?.throwIfAborted();

    const wrapper = deathWrapper();
    const file = wrapper.length ? wrapper[0]! : qemuBinary();
    const fullArgs = wrapper.length ? [...wrapper.slice(1), qemuBinary(), ...argv] : argv;
    const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'pipe', 'pipe', ...(opts.extraFds ?? [])];
    const proc = spawn(file, fullArgs, { stdio });
    child = proc;
    liveQemus.add(proc);

    const consoleBufs: Buffer[] = [];
    const errBufs: Buffer[] = [];
    proc.stdout!.on('data', (b: Buffer) => consoleBufs.push(b));
    proc.stderr!.on('data', (b: Buffer) => errBufs.push(b));

    let timedOut = false;
    let aborted = false;
    const status = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
      const timer = setTimeout(() => {
        timedOut = true;
        proc.kill('SIGKILL');
      }, timeoutMs);
      const onAbort = (): void => {
        aborted = true;
        proc.kill('SIGKILL');
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      proc.on('error', (e) => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        reject(e);
      });
      proc.on('close', (code, signal) => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        resolve({ code, signal });
      });
    });
    liveQemus.delete(proc);

    const consoleText = Buffer.concat(consoleBufs).toString('utf8').replace(/\r/g, '');
    const qemuStderr = Buffer.concat(errBufs).toString('utf8');
    if (aborted) throw opts.signal?.reason ?? new Error('runInGuest aborted');

    const [exitText, stdout, stderr, initError] = await Promise.all([
      readOptional(path.join(resultsDir, 'exitcode')),
      readOptional(path.join(resultsDir, 'stdout')),
      readOptional(path.join(resultsDir, 'stderr')),
      readOptional(path.join(resultsDir, 'init-error')),
    ]);
    const result: RunInGuestResult = {
      exitCode: null,
      stdout: stdout ?? '',
      stderr: stderr ?? '',
      console: consoleText,
      durationMs: Date.now() - started,
      timedOut,
      qemuStderr,
    };
    if (exitText !== undefined && /^\d+\s*$/.test(exitText)) {
      result.exitCode = Number.parseInt(exitText, 10);
      return result;
    }
    if (timedOut) return result;
    const why = initError
      ? `guest init failed: ${initError.trim()}`
      : `the guest reported no exit code (QEMU ${status.code !== null ? `exit status ${status.code}` : `signal ${status.signal}`})`;
    const err = new Error(
      `runInGuest(${JSON.stringify(opts.cmd)}): ${why}` +
        (qemuStderr.trim() ? `\nQEMU stderr:\n${tail(qemuStderr, 20)}` : '') +
        `\nconsole (tail):\n${tail(consoleText, 30)}`,
    );
    throw Object.assign(err, { result });
  } finally {
    const c = child;
    if (c && c.pid !== undefined && c.exitCode === null && c.signalCode === null) {
      c.kill('SIGKILL');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 5_000);
        c.once('exit', () => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    if (child) liveQemus.delete(child);
    await rm(resultsDir, { recursive: true, force: true });
    liveDirs.delete(resultsDir);
  }
}
