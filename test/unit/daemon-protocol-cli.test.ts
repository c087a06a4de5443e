/**
 * The daemon's CLI surface (bin/cmd-daemon.ts), without a daemon: every
 * protocol op has a `mqtap client` command, options parse before and after
 * the op, and the global `--socket` rewrite (routeGlobalSocket) that
 * bin/mqtap.ts can use.
 */
import { describe, expect, it } from 'vitest';
import type { Command } from 'commander';
import { CLIENT_OPS, routeGlobalSocket } from '../../bin/cmd-daemon.js';
import { buildProgram } from '../../bin/mqtap.js';
import { OPS } from '../../lib/daemon/protocol.js';

function parse(args: string[]): { globals: Record<string, unknown> } {
  let globals: Record<string, unknown> = {};
  const program = buildProgram((_fn, g) => {
    globals = g as Record<string, unknown>;
  });
  program.parse(args, { from: 'user' });
  return { globals };
}

describe('mqtap client', () => {
  it('has one command per protocol op', () => {
    const program = buildProgram(() => undefined);
    const client = program.commands.find((c: Command) => c.name() === 'client')!;
    expect(client).toBeDefined();
    expect(client.commands.map((c: Command) => c.name()).sort()).toEqual([...OPS].sort());
    expect([...CLIENT_OPS]).toEqual([...OPS]);
    for (const name of ['daemon', 'hotplug', 'unplug']) expect(program.commands.some((c: Command) => c.name() === name)).toBe(true);
  });

  it('takes --socket and --timeout before or after the op', () => {
    expect(parse(['client', '--socket', '/a.sock', 'list']).globals).toMatchObject({ socket: '/a.sock' });
    expect(parse(['client', 'list', '--socket', '/b.sock', '--timeout', '500']).globals).toMatchObject({ socket: '/b.sock', timeout: 500 });
    expect(parse(['client', 'set-active', 'n0', '3', '--socket', '/c.sock']).globals).toMatchObject({ socket: '/c.sock' });
  });
});

describe('routeGlobalSocket', () => {
  const program = buildProgram(() => undefined);
  const route = (args: string[]): string[] => routeGlobalSocket(args, program);

  it('knows every global option of the program, e.g. --log-format (a daemon delete must never run locally)', () => {
    expect(route(['--log-format', 'json', '--socket', '/s', 'delete', 'vm1'])).toEqual(['--log-format', 'json', 'client', '--socket', '/s', 'delete', 'vm1']);
    expect(route(['--log-format=json', '--log-level=info', '--socket=/s', 'show'])).toEqual(['--log-format=json', '--log-level=info', 'client', '--socket', '/s', 'show']);
    for (const o of program.options) if (o.long !== '--socket' && o.long !== '--version') expect(route([o.long!, ...(o.required ? ['x'] : []), '--socket', '/s', 'list'])).toContain('client');
  });

  it('moves a global --socket in front of a daemon op into `client`', () => {
    expect(route(['--socket', '/s', 'set-active', 'vm1', '2'])).toEqual(['client', '--socket', '/s', 'set-active', 'vm1', '2']);
    expect(route(['--debug', '--socket=/s', '--log-level', 'info', 'create', 'vm1', '-p', '4'])).toEqual([
      '--debug', '--log-level', 'info', 'client', '--socket', '/s', 'create', 'vm1', '-p', '4',
    ]);
    expect(route(['--netns', 'ns1', '--socket', '/s', 'list', '--json'])).toEqual(['--netns', 'ns1', 'client', '--socket', '/s', 'list', '--json']);
  });

  it('leaves everything else alone', () => {
    for (const args of [['create', 'x'], ['--socket', '/s', 'features'], ['daemon', '--socket', '/s'], ['client', '--socket', '/s', 'list'], ['--socket'], []]) {
      expect(route(args)).toEqual(args);
    }
  });

  it('the rewritten arguments parse', () => {
    expect(parse(route(['--socket', '/r.sock', 'show', 'vm1', '--json'])).globals).toMatchObject({ socket: '/r.sock', json: true });
  });
});
