/** Error helpers shared by the unit and integration tests (no kernel, no native calls). */
import { MqtapError } from '../../lib/sys/errors.js';

/** Whatever `fn` throws, of any class (a TypeError too); fails the test when it does not throw. */
export function thrownBy(fn: () => unknown): Error {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected the call to throw');
}

/** Captures what a function throws (fails the test when it does not throw, or throws something other than an MqtapError). */
export function catchError(fn: () => unknown): MqtapError {
  const err = thrownBy(fn);
  if (!(err instanceof MqtapError)) throw new Error(`expected an MqtapError, got ${String(err)}`, { cause: err });
  return err;
}
