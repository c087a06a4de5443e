/** management daemon and QMP commands (mqtap daemon, hotplug, unplug, and --socket clients). */
import type { Command } from 'commander';
import type { CliContext } from './context';

export function register(_program: Command, _ctx: CliContext): void {
  // no commands yet
}
