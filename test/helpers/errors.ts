/** Error helpers shared by the unit and integration tests (no kernel, no native calls). */
import { MqtapError } from '../../lib/sys/errors.js';

/** Captures what a function throws (fails the test when it does not throw, or throws something other than an MqtapError). */
export function catchError(fn: () => unknown): MqtapError {
  try {
    fn();
  } catch (err) {
    if (!(err instanceof MqtapError)) throw new Error(`expected an MqtapError, got ${String(err)}`, { cause: err });
    return err;
  }
  throw new Error('expected the call to throw');
}
