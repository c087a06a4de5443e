/**
 * The guest VM harness for the tests.  The implementation moved to
 * lib/qemu/guest.ts (compiled into dist/, used by `mqtap demo`) and the scripts to
 * vm/ (shipped with the npm package); this module re-exports the same API
 * (VM_DIR now names vm/, where the scripts are).  See vm/README.md.
 */
export * from '../../lib/qemu/guest';
