/** vhost-net commands (mqtap vhost-selftest). */
import type { Command } from 'commander';
import type { CliContext } from './context';

export function register(_program: Command, _ctx: CliContext): void {
  // no commands yet
}
