/**
 * What every CLI command module shares: exit codes, output helpers, option
 * parsers, logging.  Command modules (bin/cmd-*.ts) register themselves on
 * the commander program through a `register(program, ctx)` function.
 */
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MqtapError, ErrorCodes } from '../lib/sys/errors';
import pino from 'pino';
import { stderrLogger, type Logger } from '../lib/sys/log';

/** Exit codes (also in docs/cli.md). */
export const EXIT = {
  OK: 0,
  FAILURE: 1,
  USAGE: 2,
  NOT_FOUND: 3,
  PERMISSION: 4,
  UNAVAILABLE: 5,
  CONFLICT: 6,
  CANNOT_EXECUTE: 126,
  COMMAND_NOT_FOUND: 127,
} as const;

export function exitCodeFor(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.OK : EXIT.USAGE;
  if (!(err instanceof MqtapError)) return EXIT.FAILURE;
  if (err.isUsageError) return EXIT.USAGE;
  if (err.op === 'SPAWN') return err.code === 'ENOENT' ? EXIT.COMMAND_NOT_FOUND : EXIT.CANNOT_EXECUTE;
  if (err.code === ErrorCodes.UNSUPPORTED) return EXIT.UNAVAILABLE;
  if ((err.op === 'TUN_OPEN' || err.op === 'VHOST_OPEN') && (err.code === 'ENOENT' || err.code === 'ENODEV' || err.code === 'ENXIO')) return EXIT.UNAVAILABLE;
  if (err.op === 'NS_OPEN' && err.code === 'ENOENT') return EXIT.NOT_FOUND; // --netns names no namespace
  switch (err.code) {
    case 'EPERM':
    case 'EACCES':
      return EXIT.PERMISSION;
    case 'ENODEV':
      return EXIT.NOT_FOUND;
    case 'EEXIST':
    case 'EBUSY':
      return EXIT.CONFLICT;
    case 'EINVAL':
      // The name exists but is the wrong kind of device (not a multi-queue tap).
      return err.op === 'LOOKUP' ? EXIT.CONFLICT : EXIT.FAILURE;
    default:
      return EXIT.FAILURE;
  }
}

export interface GlobalOpts {
  debug?: boolean;
  logLevel?: string;
  logFormat?: 'text' | 'json';
  netns?: string;
  socket?: string;
  json?: boolean;
}

export function version(): string {
  try {
    return (JSON.parse(readFileSync(join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

export function intArg(what: string) {
  return (value: string): number => {
    if (!/^\d+$/.test(value)) throw new InvalidArgumentError(`${what} must be a whole number.`);
    return Number(value);
  };
}

export function hdrSizeArg(value: string): number {
  if (!['10', '12', '20'].includes(value)) throw new InvalidArgumentError('Allowed choices are 10, 12, 20.');
  return Number(value);
}

const LEVELS: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warning', 50: 'error', 60: 'fatal' };
const NOISE = new Set(['level', 'time', 'name', 'msg', 'pid', 'hostname']);

/** An error as pino's serializer writes it: `{type, message, stack, ...}`. */
function isSerializedError(v: unknown): v is { message: string; stack?: string; code?: unknown } {
  return typeof v === 'object' && v !== null && typeof (v as { message?: unknown }).message === 'string' && ('stack' in v || 'type' in v);
}

/**
 * pino lines rendered for a person: "mqtap: warning: message (key=value ...)".
 * An error value shows as its message (and code); its stack only with
 * `withStacks` (--debug), on the lines after.
 */
export function textLine(line: string, withStacks = false): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line;
  }
  const stacks: string[] = [];
  const extra = Object.entries(o)
    .filter(([k]) => !NOISE.has(k))
    .map(([k, v]) => {
      if (isSerializedError(v)) {
        if (withStacks && v.stack) stacks.push(v.stack);
        return `${k}=${JSON.stringify(typeof v.code === 'string' ? `${v.message} [${v.code}]` : v.message)}`;
      }
      return `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`;
    })
    .join(' ');
  return `mqtap: ${LEVELS[o.level as number] ?? 'log'}: ${String(o.msg ?? '')}${extra ? ` (${extra})` : ''}\n${stacks.map((st) => `${st}\n`).join('')}`;
}

/** The CLI's logger: stderr, level warn by default; readable text unless --log-format json. */
export function logger(g: GlobalOpts): Logger {
  const level = (g.logLevel ?? (g.debug ? 'debug' : 'warn')) as 'warn';
  if (g.logFormat === 'json') return stderrLogger(level);
  return pino({ level, base: { name: 'mqtap' } }, { write: (line: string) => void process.stderr.write(textLine(line, !!g.debug)) });
}

export function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

export function json(value: unknown): void {
  out(JSON.stringify(value, null, 2));
}


export function netnsOpt(g: GlobalOpts): { netns?: string } {
  return g.netns !== undefined ? { netns: g.netns } : {};
}

/** Runs a command body: the result is the exit code; errors are reported by main(). */
export type Runner = (fn: () => number | Promise<number>, g: GlobalOpts) => void;

export interface CliContext {
  run: Runner;
  /** Global + command options of `cmd`. */
  globals(cmd: Command): GlobalOpts;
}

/**
 * The fds a child gets (tap queues, then vhost-net fds, mapped to 3..) and
 * the environment that describes them: MQTAP_FDS, MQTAP_VHOSTFDS (only with
 * vhost fds), MQTAP_IFNAME, MQTAP_QUEUES.  Used by `exec` and `client acquire`.
 */
export function childFds(ifname: string, tapFds: readonly number[], vhostFds: readonly number[]): { fds: number[]; env: Record<string, string>; tap: number[]; vhost: number[] } {
  const tap = tapFds.map((_, i) => 3 + i);
  const vhost = vhostFds.map((_, i) => 3 + tapFds.length + i);
  return {
    fds: [...tapFds, ...vhostFds],
    tap,
    vhost,
    env: { MQTAP_FDS: tap.join(':'), MQTAP_IFNAME: ifname, MQTAP_QUEUES: String(tapFds.length), ...(vhost.length ? { MQTAP_VHOSTFDS: vhost.join(':') } : {}) },
  };
}
