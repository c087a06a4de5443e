'use strict';
/**
 * The CLI in the guest, inside a namespace this script creates (children
 * start in it):
 *   mqtap vhost-selftest --pairs 4 --json, and the human table with --pairs 1;
 *   mqtap exec NAME --queues 2 --vhost on -- node exec-child.js (the child
 *   drives the handed vhost fds itself).
 */
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const c = require('./common.js');

const MQTAP = path.join(c.REPO, 'dist', 'bin', 'mqtap.js');

function run(args) {
  const r = spawnSync(process.execPath, [MQTAP, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, error: r.error ? String(r.error) : undefined };
}

c.runMain(async () => {
  const ns = c.enterNetns();
  const out = {};
  out.selftestJson = run(['vhost-selftest', '--pairs', '4', '--json']);
  out.selftestHuman = run(['vhost-selftest', '--pairs', '1', '--frames', '3']);
  out.exec = run(['exec', 'vx%d', '--queues', '2', '--vhost', 'on', '--', process.execPath, path.join(__dirname, 'exec-child.js')]);
  out.tapsLeft = c.tunLinks();
  ns.restore();
  return out;
});
