/**
 * Imported first by bin/mqtap.ts.  When the native addon cannot be loaded
 * (not built, wrong Node ABI), every other module of the CLI would fail while
 * it is being loaded, before mqtap's own error reporting exists; run as the
 * command, this prints the error the way mqtap prints user errors (message
 * and hint, stack only with --debug) and exits 1 instead.
 */
import type { MqtapError } from '../lib/sys/errors';

const asCommand = require.main !== undefined && /[\\/]bin[\\/]mqtap\.js$/.test(require.main.filename);
if (asCommand) {
  try {
    require('../lib/sys/native');
  } catch (err) {
    const e = err as Partial<MqtapError> & Error;
    process.stderr.write(`mqtap: ${e.message}\n${e.hint ? `hint: ${e.hint}\n` : ''}`);
    if (process.argv.includes('--debug')) process.stderr.write(`${e.stack ?? ''}\n`);
    process.exit(1);
  }
}
