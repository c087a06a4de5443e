/** How the CLI words what goes wrong: commander's errors and log lines about errors.  No kernel, no root. */
import { CommanderError } from 'commander';
import { describe, expect, it } from 'vitest';
import { textLine } from '../../bin/context';
import { buildProgram } from '../../bin/mqtap';

/** What commander writes to stderr for argv (the program's own output configuration, writeErr captured). */
function parserErrorOutput(argv: string[]): string {
  let err = '';
  const program = buildProgram(() => undefined);
  const capture = (cmd: typeof program): void => {
    // writeErr only: outputError (how an error is worded) is the program's own.
    cmd.configureOutput({ writeErr: (s) => void (err += s), writeOut: () => undefined });
    cmd.commands.forEach(capture);
  };
  capture(program);
  expect(() => program.parse(argv, { from: 'user' })).toThrow(CommanderError);
  return err;
}

describe("commander's errors are worded like mqtap's: one `mqtap:` line, one `hint:` line", () => {
  it.each([
    [['create', 'ok0', '--queues', 'four'], "mqtap: option '-q, --queues <n>' argument 'four' is invalid. --queues must be a whole number.\nhint: see `mqtap create --help`\n"],
    [['create'], "mqtap: missing required argument 'name'\nhint: see `mqtap create --help`\n"],
    [['client', 'list', '--bogus'], "mqtap: unknown option '--bogus'\nhint: see `mqtap client list --help`\n"],
    [['shwo'], "mqtap: unknown command 'shwo'\nhint: Did you mean show? see `mqtap --help`\n"],
  ])('%j', (argv, expected) => {
    expect(parserErrorOutput(argv)).toBe(expected);
  });
});

describe('text log lines (the CLI without --log-format json)', () => {
  const err = Object.assign(new Error('close failed: EBADF'), { code: 'EBADF' });
  const line = JSON.stringify({ level: 50, time: 1, pid: 7, hostname: 'h', name: 'mqtap', msg: 'closing netdev after QEMU failed', ifname: 'mq0', err: { type: 'MqtapError', message: err.message, stack: err.stack, code: 'EBADF' } });

  it("an error value shows as its message and code, without pino's JSON or its stack", () => {
    expect(textLine(line)).toBe('mqtap: error: closing netdev after QEMU failed (ifname=mq0 err="close failed: EBADF [EBADF]")\n');
  });

  it('with --debug the stack follows the line', () => {
    const plain = textLine(line);
    const debug = textLine(line, true);
    expect(debug.startsWith(plain)).toBe(true);
    expect(debug.slice(plain.length)).toMatch(/^Error: close failed: EBADF\n(\s+at .+:\d+:\d+\)?\n)+$/);
  });

  it('other values as before', () => {
    expect(textLine(JSON.stringify({ level: 40, msg: 'm', fds: [3, 4], why: 'x y' }))).toBe('mqtap: warning: m (fds=[3,4] why=x y)\n');
  });
});
