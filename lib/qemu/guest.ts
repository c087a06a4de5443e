/**
 * The guest VM: boots a small Debian 6.1 kernel under QEMU TCG (no KVM
 * needed) with the host's root shared read-only over 9p, runs one command in
 * a chroot of it and powers off.  `mqtap demo` boots it through `launch` to
 * show a multi-queue tap in a real guest; the tests use it to get a real
 * /dev/vhost-net (a host kernel may have none), a kernel of a known version,
 * and a machine to attach taps to.  See vm/README.md.
 *
 * The QEMU command line and the guest job script are built in exactly one
 * place, vm/run-in-guest.sh (--print-qemu-args); the image is built by
 * vm/build.sh.  This module drives them, and adds what a launch needs around
 * them: requirement checks with the commands that fix them, host/guest
 * checkpoints, and the multi-queue guest script (vm/guest-mq.sh) with its
 * parser.  test/vm/harness.ts re-exports it for the tests.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants as fsConstants, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { pdeathsigWrapper } from './qemu';

/** The package root: the directory holding vm/ (the repository, or node_modules/mqtap). */
function findPackageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 5; i++) {
    if (existsSync(path.join(dir, 'vm', 'run-in-guest.sh'))) return dir;
    dir = path.dirname(dir);
  }
  // lib/qemu/ (sources, under vitest) or dist/lib/qemu/ (compiled): the root is two or three levels up.
  return path.resolve(__dirname, path.basename(path.resolve(__dirname, '../..')) === 'dist' ? '../../..' : '../..');
}

/** The repository (package) root: the default working directory of guest commands. */
export const REPO_ROOT: string = findPackageRoot();
/** vm/: the image builder, the guest's init, the runner and the guest scripts. */
export const VM_DIR: string = path.join(REPO_ROOT, 'vm');
const BUILD_SH = path.join(VM_DIR, 'build.sh');
const RUN_SH = path.join(VM_DIR, 'run-in-guest.sh');
/** The guest side of the multi-queue scenario (see mqGuestCommand). */
export const MQ_GUEST_SCRIPT: string = path.join(VM_DIR, 'guest-mq.sh');

export interface GuestImage {
  /** Kernel passed to -kernel: the uncompressed vmlinux (PVH boot) or the bzImage. */
  kernel: string;
  /** The busybox initramfs (vm/init.sh is its /init). */
  initrd: string;
  /** lib/modules/<kver> of the guest kernel (full tree, with modules.dep). */
  modulesDir?: string;
  /** Guest kernel release, e.g. 6.1.0-56-amd64. */
  kernelVersion?: string;
  /** The cache dir ($MQTAP_VM_CACHE, /var/cache/mqtap-vm, test/vm/.cache or ~/.cache/mqtap-vm). */
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
  /**
   * Accelerators to try, in order (default ['tcg']).  ['kvm', 'tcg'] uses
   * /dev/kvm when it works: inside the guest, modules: ['kvm_amd'] gives
   * nested QEMU one (QEMU's TCG emulates AMD SVM with -cpu max).
   */
  accel?: Array<'kvm' | 'tcg'>;
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
  /** See GuestQemuArgsOptions.accel. */
  accel?: Array<'kvm' | 'tcg'>;
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
  /** Called with each chunk of the serial console as it arrives (\r not removed), e.g. to watch a guest's progress. */
  onConsole?: (chunk: string) => void;
}

export interface RunInGuestResult {
  /** The command's exit status in the guest; null if QEMU was killed (timeout). */
  exitCode: number | null;
  /** Where exitCode came from: resultsDir/exitcode, or (that file missing or unreadable) init's `mqtap-guest: exit=N` console line; see guestExitStatus. */
  exitCodeFrom: 'file' | 'console' | null;
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
  const r = spawnSync('bash', [BUILD_SH, '--check'], { encoding: 'utf8', timeout: 30_000 });
  if (r.error) return { ok: false, reason: `vm/build.sh --check: ${r.error.message}` };
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

/** Runs one of the vm/ scripts with bash (npm does not always keep the executable bit). */
function runScript(file: string, args: string[], timeoutMs: number, onStderr?: (chunk: string) => void): Promise<Captured> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [file, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => {
      err.push(b);
      onStderr?.(b.toString('utf8'));
    });
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
 * Builds the guest image if needed (vm/build.sh: apt-get download of the
 * kernel the first time, ~15-30 s; a few tens of ms when cached) and returns
 * its paths.  Memoized per process; a failure is not memoized.  `onProgress`
 * gets build.sh's progress lines (only when something is built).
 */
export function ensureGuestImage(opts: { onProgress?: (line: string) => void } = {}): Promise<GuestImage> {
  if (!imagePromise) {
    imagePromise = buildImage(opts.onProgress);
    imagePromise.catch(() => {
      imagePromise = undefined;
    });
  }
  return imagePromise;
}

async function buildImage(onProgress?: (line: string) => void): Promise<GuestImage> {
  const progress = onProgress && ((chunk: string): void => chunk.split('\n').filter(Boolean).forEach((l) => onProgress(l)));
  const r = await runScript(BUILD_SH, [], 20 * 60_000, progress);
  if (r.code !== 0) {
    const tail = r.stderr.trim().split('\n').slice(-15).join('\n');
    throw new Error(`vm/build.sh failed (${r.code ?? r.signal}):\n${tail}`);
  }
  const env = parseEnvLines(r.stdout);
  const kernel = env.MQTAP_VM_KERNEL;
  const initrd = env.MQTAP_VM_INITRD;
  const cacheDir = env.MQTAP_VM_CACHE;
  if (!kernel || !initrd || !cacheDir) throw new Error(`vm/build.sh printed no image paths:\n${r.stdout}`);
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
  if (opts.accel?.length) args.push('--accel', opts.accel.join(':'));
  if (opts.appendExtra) args.push('--append', opts.appendExtra);
  if (opts.modules?.length) args.push('--modules', opts.modules.join(','));
  if (opts.consoleFile) args.push('--console-file', path.resolve(opts.consoleFile));
  if (opts.echo) args.push('--echo');
  if (opts.debug) args.push('--debug');
  for (const [k, v] of Object.entries(opts.env ?? {})) args.push('--env', `${k}=${v}`);
  args.push('--', ...opts.cmd);
  const r = await runScript(RUN_SH, args, 20 * 60_000);
  if (r.code !== 0) {
    throw new Error(`vm/run-in-guest.sh --print-qemu-args failed (${r.code ?? r.signal}): ${r.stderr.trim()}`);
  }
  const argv = r.stdout.split('\0');
  if (argv[argv.length - 1] === '') argv.pop();
  if (argv.length === 0) throw new Error('vm/run-in-guest.sh printed no QEMU arguments');
  return argv;
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

/** The guest command's exit status as init reported it (guestExitStatus). */
export interface GuestExitStatus {
  code: number | null;
  from: 'file' | 'console' | null;
  /** What resultsDir/exitcode held: 'missing', 'empty', or its text (for messages). */
  file: string;
}

const CONSOLE_EXIT = /^mqtap-guest: exit=(\d+)$/gm;

/**
 * The guest command's exit status.  vm/init.sh reports it twice: it writes
 * resultsDir/exitcode over the 9p results share, then prints
 * `mqtap-guest: exit=N` on the serial console and powers off.  The file
 * comes first; when it is missing, empty or not a number (the write over
 * the share failed: init does not stop for that, and the console line
 * follows all the same) the last console line is the answer, so a guest
 * that printed exit=0 never reads as "no exit code".  `consoleText` with
 * \r removed.
 */
export function guestExitStatus(exitText: string | undefined, consoleText: string): GuestExitStatus {
  const file = exitText === undefined ? 'missing' : exitText.trim() === '' ? 'empty' : JSON.stringify(exitText.trim().slice(0, 40));
  if (exitText !== undefined && /^\d+\s*$/.test(exitText)) return { code: Number.parseInt(exitText, 10), from: 'file', file };
  let last: string | undefined;
  for (const m of consoleText.matchAll(CONSOLE_EXIT)) last = m[1];
  if (last !== undefined) return { code: Number.parseInt(last, 10), from: 'console', file };
  return { code: null, from: null, file };
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
    if (opts.accel !== undefined) qargs.accel = opts.accel;
    if (opts.appendExtra !== undefined) qargs.appendExtra = opts.appendExtra;
    if (opts.modules !== undefined) qargs.modules = opts.modules;
    if (opts.echo !== undefined) qargs.echo = opts.echo;
    if (opts.debug !== undefined) qargs.debug = opts.debug;
    const argv = [...(await guestQemuArgs(qargs)), ...(opts.qemuExtraArgs ?? [])];
    opts.signal?.throwIfAborted();

    const wrapper = pdeathsigWrapper('SIGKILL'); // QEMU dies with this process even on SIGKILL
    const file = wrapper.length ? wrapper[0]! : qemuBinary();
    const fullArgs = wrapper.length ? [...wrapper.slice(1), qemuBinary(), ...argv] : argv;
    const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'pipe', 'pipe', ...(opts.extraFds ?? [])];
    const proc = spawn(file, fullArgs, { stdio });
    child = proc;
    liveQemus.add(proc);

    const consoleBufs: Buffer[] = [];
    const errBufs: Buffer[] = [];
    proc.stdout!.on('data', (b: Buffer) => {
      consoleBufs.push(b);
      opts.onConsole?.(b.toString('utf8'));
    });
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
      exitCodeFrom: null,
      stdout: stdout ?? '',
      stderr: stderr ?? '',
      console: consoleText,
      durationMs: Date.now() - started,
      timedOut,
      qemuStderr,
    };
    const exit = guestExitStatus(exitText, consoleText);
    if (exit.code !== null) {
      result.exitCode = exit.code;
      result.exitCodeFrom = exit.from;
      return result;
    }
    if (timedOut) return result;
    const why = initError
      ? `guest init failed: ${initError.trim()}`
      : `the guest reported no exit code (exitcode file: ${exit.file}; no "mqtap-guest: exit=N" on the console; QEMU ${status.code !== null ? `exit status ${status.code}` : `signal ${status.signal}`})`;
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

// ---------------------------------------------------------------------------
// What a host needs for the guest, and how to get it.

/** One thing the guest part needs, and the Debian package that provides it. */
export interface GuestRequirement {
  what: string;
  ok: boolean;
  /** Debian package to install when missing. */
  aptPackage?: string;
  detail?: string;
}

export interface GuestRequirements {
  /** Everything present and the image built or buildable. */
  ok: boolean;
  items: GuestRequirement[];
  /** 'built': ready; 'buildable': vm/build.sh fetches the kernel (~70 MB, once); 'unavailable': see reason. */
  image: 'built' | 'buildable' | 'unavailable';
  /** The first problem, in one line. */
  reason?: string;
  /** Debian packages that would fix what is missing. */
  aptPackages: string[];
  /** The command(s) that get what is missing, e.g. 'apt-get install -y qemu-system-x86 busybox-static && npx mqtap demo'. */
  fix?: string;
}

function staticBusybox(): string | undefined {
  for (const p of ['/bin/busybox', '/usr/bin/busybox', inPath('busybox')]) {
    if (!p || !isExecutable(p)) continue;
    // A static ELF has no PT_INTERP program header; a cheap proxy: no "ld-linux" string in it.
    try {
      const head = readFileSync(p).subarray(0, 4096).toString('latin1');
      if (!head.includes('/lib64/ld-linux') && !head.includes('/lib/ld-linux')) return p;
    } catch {
      /* unreadable */
    }
  }
  return undefined;
}

/**
 * What booting the guest needs on this host (Linux x86-64, QEMU, static
 * busybox, bash, the image) plus `tools` the guest's command uses from the
 * host root (e.g. ['ethtool', 'ip', 'taskset']), with the Debian packages
 * that provide what is missing.  No download, no build (`vm/build.sh --check`).
 */
export function checkGuestRequirements(opts: { tools?: readonly string[] } = {}): GuestRequirements {
  const PKG: Record<string, string> = { ethtool: 'ethtool', ip: 'iproute2', taskset: 'util-linux', setpriv: 'util-linux', bash: 'bash', ping: 'iputils-ping' };
  const items: GuestRequirement[] = [];
  const linux = process.platform === 'linux' && process.arch === 'x64';
  items.push({ what: 'Linux x86-64 host', ok: linux, detail: `${process.platform}/${process.arch}` });
  const qemu = inPath(qemuBinary());
  items.push({ what: qemuBinary(), ok: !!qemu, aptPackage: 'qemu-system-x86', ...(qemu ? { detail: qemu } : {}) });
  const bb = staticBusybox();
  items.push({ what: 'busybox (static)', ok: !!bb, aptPackage: 'busybox-static', ...(bb ? { detail: bb } : {}) });
  for (const t of ['bash', ...(opts.tools ?? [])]) {
    const p = inPath(t);
    items.push({ what: t, ok: !!p, ...(PKG[t] ? { aptPackage: PKG[t] } : {}), ...(p ? { detail: p } : {}) });
  }
  let image: GuestRequirements['image'] = 'unavailable';
  let imageReason: string | undefined;
  if (items.every((i) => i.ok)) {
    const r = spawnSync('bash', [BUILD_SH, '--check'], { encoding: 'utf8', timeout: 30_000 });
    if (r.status === 0) image = 'built';
    else if (r.status === 3) image = 'buildable';
    else imageReason = (r.stderr || r.error?.message || `vm/build.sh --check: exit ${r.status}`).trim().split('\n').pop()!.replace(/^mqtap-vm: (error: )?/, '');
  }
  const missing = items.filter((i) => !i.ok);
  const aptPackages = [...new Set(missing.map((i) => i.aptPackage).filter((p): p is string => !!p))];
  const res: GuestRequirements = { ok: missing.length === 0 && image !== 'unavailable', items, image, aptPackages };
  if (missing.length) res.reason = `missing: ${missing.map((i) => i.what).join(', ')}`;
  else if (image === 'unavailable') res.reason = `the guest image cannot be built here: ${imageReason ?? 'unknown reason'}`;
  if (aptPackages.length) res.fix = `apt-get install -y --no-install-recommends ${aptPackages.join(' ')}`;
  else if (image === 'unavailable') res.fix = `bash ${BUILD_SH}   # shows why the image cannot be built`;
  return res;
}

// ---------------------------------------------------------------------------
// Checkpoints: the guest stops, the host looks at its side, the guest goes on.

export interface Checkpoint {
  name: string;
  /** The line the guest wrote with it. */
  data: string;
  /** Milliseconds since watchCheckpoints was called. */
  atMs: number;
  /** What the handler returned (sent back to the guest, first line only). */
  reply?: string;
  /** What the handler threw (the guest is acknowledged anyway). */
  error?: string;
}

export interface CheckpointWatcher {
  /** Checkpoints seen so far, in order. */
  readonly seen: readonly Checkpoint[];
  /** Stops polling (idempotent); resolves once a running handler finished. */
  stop(): Promise<void>;
}

/**
 * Watches `resultsDir/sync/` for the guest's checkpoints (vm/guest-mq.sh
 * `checkpoint NAME DATA` writes sync/at-NAME and waits up to 120 s for
 * sync/ok-NAME).  For each new one, `onCheckpoint` runs (one at a time) and
 * the guest is acknowledged with its return value, even if it threw (the
 * error is recorded, so the guest never waits for nothing).
 */
export function watchCheckpoints(
  resultsDir: string,
  onCheckpoint: (cp: Checkpoint) => string | void | Promise<string | void>,
  opts: { intervalMs?: number } = {},
): CheckpointWatcher {
  const dir = path.join(resultsDir, 'sync');
  mkdirSync(dir, { recursive: true });
  const started = Date.now();
  const seen: Checkpoint[] = [];
  const known = new Set<string>();
  let stopped = false;
  let busy: Promise<void> = Promise.resolve();
  let timer: NodeJS.Timeout | undefined;
  const poll = async (): Promise<void> => {
    let names: string[] = [];
    try {
      names = readdirSync(dir).filter((n) => n.startsWith('at-') && !known.has(n)).sort();
    } catch {
      /* the dir went away: the run is over */
    }
    for (const file of names) {
      known.add(file);
      const cp: Checkpoint = { name: file.slice(3), data: '', atMs: Date.now() - started };
      try {
        cp.data = readFileSync(path.join(dir, file), 'utf8').trim();
      } catch {
        /* empty */
      }
      seen.push(cp);
      try {
        const r = await onCheckpoint(cp);
        if (typeof r === 'string') cp.reply = r.split('\n')[0];
      } catch (err) {
        cp.error = err instanceof Error ? err.message : String(err);
      }
      try {
        writeFileSync(path.join(dir, `.ok-${cp.name}`), `${cp.reply ?? (cp.error ? `error: ${cp.error}` : 'ok')}\n`);
        renameSync(path.join(dir, `.ok-${cp.name}`), path.join(dir, `ok-${cp.name}`));
      } catch {
        /* the run is over */
      }
    }
  };
  const tick = (): void => {
    if (stopped) return;
    busy = poll().finally(() => {
      if (!stopped) timer = setTimeout(tick, opts.intervalMs ?? 100);
    });
  };
  tick();
  return {
    seen,
    async stop(): Promise<void> {
      stopped = true;
      if (timer) clearTimeout(timer);
      await busy;
    },
  };
}

// ---------------------------------------------------------------------------
// The multi-queue guest scenario (vm/guest-mq.sh).

export interface MqGuestOptions {
  /** 'full' (default): channels, ethtool -L, ping, flows, counters; 'list': only report the NICs. */
  mode?: 'full' | 'list';
  /** The host tap's link-local address (default 169.254.77.1). */
  hostIp?: string;
  /** The guest's address (default 169.254.77.2). */
  guestIp?: string;
  prefix?: number;
  /** Stop at checkpoints until the host acknowledges them (watchCheckpoints).  Default true. */
  sync?: boolean;
  /** TCP connection attempts per guest CPU (default 16). */
  flowsPerCpu?: number;
  /** The interface to work on (default: the first virtio_net one). */
  iface?: string;
}

/** cmd and env for guestQemuArgs() that run vm/guest-mq.sh in the guest. */
export function mqGuestCommand(opts: MqGuestOptions = {}): { cmd: string[]; env: Record<string, string> } {
  const env: Record<string, string> = {
    MQ_MODE: opts.mode ?? 'full',
    MQ_HOST_IP: opts.hostIp ?? '169.254.77.1',
    MQ_GUEST_IP: opts.guestIp ?? '169.254.77.2',
    MQ_PREFIX: String(opts.prefix ?? 24),
    MQ_SYNC: opts.sync === false ? '0' : '1',
    MQ_FLOWS: String(opts.flowsPerCpu ?? 16),
  };
  if (opts.iface) env.MQ_IF = opts.iface;
  return { cmd: ['sh', MQ_GUEST_SCRIPT], env };
}

export interface MqGuestNic {
  name: string;
  mac: string;
  driver: string;
  /** ethtool -l: pre-set maximum and current combined channels (queue pairs); null when unknown. */
  maxCombined: number | null;
  combined: number | null;
}

/** What vm/guest-mq.sh reported. */
export interface MqGuestReport {
  cpus: number | null;
  nics: MqGuestNic[];
  /** Each `ethtool -L IF combined N`: its exit status and the count afterwards. */
  setChannels: Array<{ want: number; rc: number; combined: number | null }>;
  /** Checkpoints as the guest saw them, with the host's reply. */
  syncs: Array<{ name: string; reply: string }>;
  syncTimeouts: string[];
  addr: { cidr: string; rc: number } | null;
  pingHost: { sent: number; received: number } | null;
  flows: Array<{ cpu: number; attempts: number }>;
  /** ethtool -S: rx_queue_I_packets / tx_queue_I_packets. */
  queues: Array<{ queue: number; rxPackets: number; txPackets: number }>;
  failures: string[];
  /** The script got to its end. */
  done: boolean;
}

const num = (s: string | undefined): number | null => (s !== undefined && /^\d+$/.test(s) ? Number(s) : null);

/** Parses the "mq ..." lines of vm/guest-mq.sh; other lines are ignored. */
export function parseMqGuestOutput(stdout: string): MqGuestReport {
  const r: MqGuestReport = { cpus: null, nics: [], setChannels: [], syncs: [], syncTimeouts: [], addr: null, pingHost: null, flows: [], queues: [], failures: [], done: false };
  for (const line of stdout.split('\n')) {
    if (!line.startsWith('mq ')) continue;
    const [, key = '', ...f] = line.trim().split(/\s+/);
    switch (key) {
      case 'cpus':
        r.cpus = num(f[0]);
        break;
      case 'nic':
        r.nics.push({ name: f[0] ?? '', mac: f[1] ?? '', driver: f[2] ?? '', maxCombined: num(f[3]), combined: num(f[4]) });
        break;
      case 'set-channels':
        r.setChannels.push({ want: Number(f[0]), rc: Number(f[1]), combined: num(f[2]) });
        break;
      case 'sync':
        r.syncs.push({ name: f[0] ?? '', reply: f.slice(1).join(' ') });
        break;
      case 'sync-timeout':
        r.syncTimeouts.push(f[0] ?? '');
        break;
      case 'addr':
        r.addr = { cidr: f[0] ?? '', rc: Number(f[1]) };
        break;
      case 'ping-host':
        r.pingHost = { sent: Number(f[0]), received: Number(f[1]) };
        break;
      case 'flows':
        r.flows.push({ cpu: Number(f[0]), attempts: Number(f[1]) });
        break;
      case 'queue':
        r.queues.push({ queue: Number(f[0]), rxPackets: Number(f[1]), txPackets: Number(f[2]) });
        break;
      case 'fail':
        r.failures.push(f.join(' '));
        break;
      case 'done':
        r.done = true;
        break;
      default:
        break;
    }
  }
  r.flows.sort((a, b) => a.cpu - b.cpu);
  return r;
}

// ---------------------------------------------------------------------------
// Host-side ping (iputils ping, or busybox's).

export interface PingResult {
  sent: number;
  received: number;
  /** ping's exit status (null: killed). */
  status: number | null;
  output: string;
}

/** `ping` if installed, else `busybox ping`; undefined when neither is there. */
export function pingCommand(): string[] | undefined {
  if (inPath('ping')) return ['ping'];
  if (staticBusybox() ?? inPath('busybox')) return [staticBusybox() ?? 'busybox', 'ping'];
  return undefined;
}

/**
 * Pings `ip` `count` times from this process's network namespace (the
 * current thread's, when isolateNetns() was called), giving up after
 * `deadlineSec` (default 30).  Never rejects.
 */
export function hostPing(ip: string, opts: { count?: number; deadlineSec?: number } = {}): Promise<PingResult> {
  const count = opts.count ?? 3;
  const deadline = opts.deadlineSec ?? 30;
  const cmd = pingCommand();
  if (!cmd) return Promise.resolve({ sent: 0, received: 0, status: null, output: 'no ping command (install iputils-ping or busybox-static)' });
  return new Promise((resolve) => {
    execFile(cmd[0]!, [...cmd.slice(1), '-c', String(count), '-w', String(deadline), ip], { timeout: (deadline + 10) * 1000, encoding: 'utf8' }, (err, stdout, stderr) => {
      const output = `${stdout}${stderr}`;
      const sent = Number(/(\d+) packets transmitted/.exec(output)?.[1] ?? 0);
      const received = Number(/(\d+) (?:packets )?received/.exec(output)?.[1] ?? 0);
      const code = (err as { code?: unknown } | null)?.code;
      const status = err ? (typeof code === 'number' ? code : null) : 0;
      resolve({ sent, received, status, output });
    });
  });
}

/** Removes a directory tree, ignoring errors (for finally blocks). */
export function removeTree(dir: string | undefined): void {
  if (!dir) return;
  try {
    rmSync(dir, { recursive: true, force: true });
  } catch {
    /* best effort */
  }
}

/** A fresh temp dir for a guest's results (the caller removes it: removeTree). */
export async function makeResultsDir(prefix = 'mqtap-guest-'): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  // Removed at exit if the caller did not get to it (a killed test worker).
  installExitHook();
  liveDirs.add(dir);
  return dir;
}

// ---------------------------------------------------------------------------
// One boot of the multi-queue guest, whoever starts QEMU.

/** QEMU as the caller started it for {@link bootMqGuest}. */
export interface StartedGuestQemu {
  /** The process whose exit ends the boot (QEMU, or `mqtap launch` running it). */
  child: ChildProcess;
  /** Waited for too after the child exits (e.g. launchQemu's `exited`, which closes the netdevs). */
  exited?: Promise<unknown>;
}

export interface MqGuestBootOptions {
  /** vm/guest-mq.sh's scenario (default: the full one with its default addresses). */
  mq?: MqGuestOptions;
  /**
   * Starts QEMU: `qemuArgs` boot the guest (no binary, no NIC; put
   * qemuBinary() in front and add the netdevs), e.g. through launchQemu or
   * `mqtap launch`.  It may throw: the boot then cleans up and rethrows.
   */
  start: (qemuArgs: string[]) => StartedGuestQemu | Promise<StartedGuestQemu>;
  /**
   * Runs at each checkpoint while the guest waits (see watchCheckpoints);
   * `report()` parses what the guest has printed so far.  Its return value
   * is the guest's acknowledgement.
   */
  onCheckpoint?: (cp: Checkpoint, report: () => MqGuestReport) => string | void | Promise<string | void>;
  /** SIGKILL the started process after this long (default 300 000 ms). */
  timeoutMs?: number;
  /** Prefix of the temp results dir (default 'mqtap-guest-'). */
  resultsPrefix?: string;
}

export interface MqGuestBoot {
  /** How the started process ended (signal SIGKILL and timedOut: the timeout). */
  exit: { code: number | null; signal: NodeJS.Signals | null };
  timedOut: boolean;
  /** vm/guest-mq.sh's report. */
  report: MqGuestReport;
  /** The guest command's exit status (null: none reported). */
  guestExitCode: number | null;
  checkpoints: Checkpoint[];
  /** The guest command's stdout and stderr, and the serial console (\r removed). */
  stdout: string;
  stderr: string;
  console: string;
  /** From the call until the process exited. */
  durationMs: number;
}

function readText(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/**
 * Boots the guest once with vm/guest-mq.sh: makes a results dir, builds the
 * QEMU arguments, watches the checkpoints (calling `onCheckpoint` at each),
 * lets `start` launch QEMU, waits for it to exit (killing it after
 * `timeoutMs`), and returns what the guest reported.  Whatever happens, when
 * it returns or throws the process it started is gone (SIGKILLed if it still
 * ran), the watcher stopped and the results dir removed.
 */
export async function bootMqGuest(opts: MqGuestBootOptions): Promise<MqGuestBoot> {
  const started = Date.now();
  const resultsDir = await makeResultsDir(opts.resultsPrefix ?? 'mqtap-guest-');
  const stdoutFile = path.join(resultsDir, 'stdout');
  const consoleFile = path.join(resultsDir, 'console.log');
  const report = (): MqGuestReport => parseMqGuestOutput(readText(stdoutFile));
  let watcher: CheckpointWatcher | undefined;
  let proc: StartedGuestQemu | undefined;
  try {
    const args = await guestQemuArgs({ ...mqGuestCommand(opts.mq), resultsDir, consoleFile });
    watcher = watchCheckpoints(resultsDir, (cp) => opts.onCheckpoint?.(cp, report));
    proc = await opts.start(args);
    const child = proc.child;
    const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; timedOut: boolean }>((resolve) => {
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, opts.timeoutMs ?? 300_000);
      const done = (code: number | null, signal: NodeJS.Signals | null): void => {
        clearTimeout(timer);
        resolve({ code, signal, timedOut });
      };
      if (child.exitCode !== null || child.signalCode !== null) done(child.exitCode, child.signalCode as NodeJS.Signals | null);
      else {
        child.once('exit', done);
        child.once('error', () => done(child.exitCode, child.signalCode as NodeJS.Signals | null)); // could not start: no 'exit' may follow
      }
    });
    await proc.exited?.catch(() => undefined);
    await watcher.stop();
    const exitFile = path.join(resultsDir, 'exitcode');
    const consoleText = readText(consoleFile).replace(/\r/g, '');
    return {
      exit: { code: exit.code, signal: exit.signal },
      timedOut: exit.timedOut,
      report: report(),
      guestExitCode: guestExitStatus(existsSync(exitFile) ? readText(exitFile) : undefined, consoleText).code,
      checkpoints: [...watcher.seen],
      stdout: readText(stdoutFile),
      stderr: readText(path.join(resultsDir, 'stderr')),
      console: consoleText,
      durationMs: Date.now() - started,
    };
  } finally {
    const c = proc?.child;
    if (c && c.exitCode === null && c.signalCode === null) {
      c.kill('SIGKILL');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 10_000);
        c.once('exit', () => {
          clearTimeout(t);
          resolve();
        });
      });
      await proc?.exited?.catch(() => undefined);
    }
    await watcher?.stop();
    removeTree(resultsDir);
    liveDirs.delete(resultsDir);
  }
}
