/**
 * Logging.  The library is silent unless the caller passes a pino logger;
 * the CLI logs to stderr (stdout is for results).
 */
import pino from 'pino';

export type Logger = pino.Logger;

/** The library's default: a logger that writes nothing. */
export const silentLogger: Logger = pino({ level: 'silent' });

/** A pino logger writing JSON lines to stderr (fd 2). */
export function stderrLogger(level: pino.LevelWithSilent = 'info'): Logger {
  return pino({ level, base: { name: 'mqtap' } }, pino.destination({ fd: 2, sync: true }));
}
