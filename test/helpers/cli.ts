/**
 * The `mqtap` CLI as the tests run it: `node dist/bin/mqtap.js ARGS...` in
 * this thread's network namespace (children spawned after isolateNetns()
 * start in it), with its exit status and output.
 */
import { spawn, spawnSync, type SpawnOptions, type SpawnSyncOptions } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** The repository root. */
export const ROOT = join(__dirname, '..', '..');
/** The compiled CLI the tests run. */
export const CLI = join(ROOT, 'dist', 'bin', 'mqtap.js');

/** Why the CLI tests cannot run here ('' when dist/bin/mqtap.js is built). */
export function cliBuiltReason(): string {
  return existsSync(CLI) ? '' : 'dist/bin/mqtap.js is not built (npm run build)';
}

/**
 * Test helpers that child processes load (plain node, no TypeScript): they
 * require the compiled dist/test/helpers/<name>.js.  tsconfig.json lists each
 * one in its "include", so `npm run build` compiles them for that reason and
 * not only because something in bench/ happens to import them.
 */
export const CHILD_HELPERS = ['vhost-user', 'vu-driver'] as const;

/**
 * Why child processes cannot use the compiled helpers `names` ('' when every
 * dist/test/helpers/<name>.js exists and is not older than its source: a
 * stale one would run other code than the test file's own import of it).
 */
export function childHelpersReason(names: readonly string[] = CHILD_HELPERS, root = ROOT): string {
  for (const name of names) {
    const src = join(root, 'test', 'helpers', `${name}.ts`);
    const js = join(root, 'dist', 'test', 'helpers', `${name}.js`);
    if (!existsSync(js)) return `dist/test/helpers/${name}.js is not built (npm run build)`;
    if (existsSync(src) && statSync(js).mtimeMs < statSync(src).mtimeMs) return `dist/test/helpers/${name}.js is older than test/helpers/${name}.ts (npm run build)`;
  }
  return '';
}

export interface CliRun {
  /** Exit status; null when killed by a signal (see signal) or timed out. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunCliOptions {
  /** Kill it after this long (default 60 000 ms). */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to its stdin (default: none). */
  input?: string;
  /** The command in front of node (e.g. ['setpriv', '--reuid=65534', ...]); default none. */
  wrapper?: string[];
}

function argvOf(args: readonly string[], opts: RunCliOptions): string[] {
  return [...(opts.wrapper ?? []), process.execPath, CLI, ...args];
}

/** Runs `mqtap ARGS` to completion (synchronously) and returns its exit status and output. */
export function runCli(args: readonly string[], opts: RunCliOptions = {}): CliRun {
  const argv = argvOf(args, opts);
  const o: SpawnSyncOptions = { encoding: 'utf8', timeout: opts.timeoutMs ?? 60_000 };
  if (opts.env) o.env = opts.env;
  if (opts.cwd) o.cwd = opts.cwd;
  if (opts.input !== undefined) o.input = opts.input;
  const r = spawnSync(argv[0]!, argv.slice(1), o);
  return { code: r.status, signal: r.signal, stdout: String(r.stdout ?? ''), stderr: String(r.stderr ?? '') };
}

/** Like runCli, without blocking the event loop (for a CLI that needs this process to answer meanwhile, e.g. a guest's checkpoints). */
export function runCliAsync(args: readonly string[], opts: RunCliOptions = {}): Promise<CliRun> {
  const argv = argvOf(args, opts);
  const o: SpawnOptions = { stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] };
  if (opts.env) o.env = opts.env;
  if (opts.cwd) o.cwd = opts.cwd;
  return new Promise((resolve) => {
    const p = spawn(argv[0]!, argv.slice(1), o);
    let stdout = '';
    let stderr = '';
    p.stdout!.on('data', (b: Buffer) => (stdout += b.toString()));
    p.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    if (opts.input !== undefined) p.stdin!.end(opts.input);
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.once('error', (err) => {
      clearTimeout(t);
      resolve({ code: null, signal: null, stdout, stderr: `${stderr}${err.message}` });
    });
    p.once('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, stdout, stderr });
    });
  });
}
