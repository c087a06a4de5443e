/** CLI argument parsing and exit-code mapping: no kernel, no root. */
import { CommanderError } from 'commander';
import { describe, expect, it } from 'vitest';
import { EXIT, buildProgram, exitCodeFor } from '../../bin/mqtap';
import { ErrorCodes, MqtapError, invalidArg } from '../../lib/sys/errors';

/** Parses argv and returns the command's options and arguments instead of running it. */
function parse(argv: string[]): { args: unknown[]; opts: Record<string, unknown>; globals: Record<string, unknown> } {
  let captured: { args: unknown[]; opts: Record<string, unknown>; globals: Record<string, unknown> } | undefined;
  const program = buildProgram(() => undefined);
  program.configureOutput({ writeErr: () => undefined, writeOut: () => undefined });
  for (const cmd of program.commands) {
    cmd.exitOverride();
    cmd.configureOutput({ writeErr: () => undefined, writeOut: () => undefined });
    cmd.action((...a: unknown[]) => {
      const c = a[a.length - 1] as { opts(): Record<string, unknown>; optsWithGlobals(): Record<string, unknown> };
      captured = { args: a.slice(0, -2), opts: c.opts(), globals: c.optsWithGlobals() };
    });
  }
  program.parse(argv, { from: 'user' });
  if (!captured) throw new Error('no command ran');
  return captured;
}

function parseError(argv: string[]): CommanderError {
  try {
    parse(argv);
  } catch (err) {
    if (err instanceof CommanderError) return err;
    throw err;
  }
  throw new Error(`expected ${argv.join(' ')} to fail`);
}

describe('mqtap argument parsing', () => {
  it('create: options and defaults', () => {
    const r = parse(['create', 'tap0', '--queues', '4', '--mtu', '9000', '--mac', '52:54:00:00:00:01', '--up', '--owner', 'root', '--vnet-hdr-size', '12']);
    expect(r.args).toEqual(['tap0']);
    expect(r.opts).toMatchObject({ queues: 4, mtu: 9000, mac: '52:54:00:00:00:01', up: true, owner: 'root', vnetHdr: true, vnetHdrSize: 12 });
    expect(parse(['create', 'tap0']).opts).toMatchObject({ queues: 1, vnetHdr: true });
    expect(parse(['create', 'tap0', '--no-vnet-hdr']).opts.vnetHdr).toBe(false);
  });

  it('exec: the command after -- keeps its own options', () => {
    const r = parse(['exec', 'mqt%d', '-q', '4', '--active', '2', '--', 'qemu-system-x86_64', '-m', '512', '--help']);
    expect(r.args).toEqual(['mqt%d', ['qemu-system-x86_64', '-m', '512', '--help']]);
    expect(r.opts).toMatchObject({ queues: 4, active: 2, existing: 'allow' });
  });

  it('global options come before the command', () => {
    const r = parse(['--netns', 'vm1', '--debug', 'show', '--json']);
    expect(r.globals).toMatchObject({ netns: 'vm1', debug: true, json: true });
  });

  it('refuses malformed numbers and unknown choices (usage errors)', () => {
    for (const argv of [
      ['create', 'tap0', '--queues', 'four'],
      ['create', 'tap0', '--queues', '-1'],
      ['create', 'tap0', '--queues', '1.5'],
      ['create', 'tap0', '--vnet-hdr-size', '11'],
      ['exec', 'tap0', '--existing', 'maybe', '--', 'true'],
      ['exec', 'tap0'],
      ['create'],
      ['frobnicate'],
    ]) {
      const err = parseError(argv);
      expect(exitCodeFor(err), argv.join(' ')).toBe(EXIT.USAGE);
    }
  });
});

describe('exit codes', () => {
  const sys = (op: string, errno: number): MqtapError => new MqtapError({ op, syscall: 'ioctl', errno });
  it('map errors to documented codes', () => {
    expect(exitCodeFor(invalidArg('bad'))).toBe(EXIT.USAGE);
    expect(exitCodeFor(sys('TUNSETIFF', 1))).toBe(EXIT.PERMISSION); // EPERM
    expect(exitCodeFor(sys('TUN_OPEN', 13))).toBe(EXIT.PERMISSION); // EACCES
    expect(exitCodeFor(sys('TUN_OPEN', 2))).toBe(EXIT.UNAVAILABLE); // ENOENT /dev/net/tun
    expect(exitCodeFor(sys('TUNSETIFF', 16))).toBe(EXIT.CONFLICT); // EBUSY
    expect(exitCodeFor(new MqtapError({ op: 'LOOKUP', code: 'EEXIST', errno: 17 }))).toBe(EXIT.CONFLICT);
    expect(exitCodeFor(new MqtapError({ op: 'LOOKUP', code: 'ENODEV', errno: 19 }))).toBe(EXIT.NOT_FOUND);
    expect(exitCodeFor(new MqtapError({ op: 'LOOKUP', code: 'EINVAL', errno: 22 }))).toBe(EXIT.CONFLICT);
    expect(exitCodeFor(sys('TUNSETIFF', 7))).toBe(EXIT.FAILURE); // E2BIG
    expect(exitCodeFor(new MqtapError({ op: 'X', code: ErrorCodes.UNSUPPORTED }))).toBe(EXIT.UNAVAILABLE);
    expect(exitCodeFor(new MqtapError({ op: 'SPAWN', code: 'ENOENT' }))).toBe(EXIT.COMMAND_NOT_FOUND);
    expect(exitCodeFor(new MqtapError({ op: 'SPAWN', code: 'EACCES' }))).toBe(EXIT.CANNOT_EXECUTE);
    expect(exitCodeFor(new Error('boom'))).toBe(EXIT.FAILURE);
  });
});
