'use strict';
/**
 * The command `mqtap exec NAME --queues N --vhost on -- node exec-child.js`
 * runs: it finds the tap queue fds (MQTAP_FDS) and the vhost-net fds
 * (MQTAP_VHOSTFDS) it was handed, takes ownership of each vhost fd
 * (VHOST_SET_OWNER: proves mqtap did not) by driving pair i = (tap fd i,
 * vhost fd i) itself, and moves frames both ways on every pair.
 */
const { readlinkSync } = require('node:fs');
const c = require('./common.js');

c.runMain(async () => {
  const env = {
    MQTAP_FDS: process.env.MQTAP_FDS,
    MQTAP_VHOSTFDS: process.env.MQTAP_VHOSTFDS,
    MQTAP_IFNAME: process.env.MQTAP_IFNAME,
    MQTAP_QUEUES: process.env.MQTAP_QUEUES,
  };
  const tapFds = (env.MQTAP_FDS ?? '').split(':').filter(Boolean).map(Number);
  const vhostFds = (env.MQTAP_VHOSTFDS ?? '').split(':').filter(Boolean).map(Number);
  const links = Object.fromEntries([...tapFds, ...vhostFds].map((fd) => [fd, readlinkSync(`/proc/self/fd/${fd}`)]));
  const name = env.MQTAP_IFNAME;
  const mac = c.lib.getTap(name).address;
  c.sh('ip', ['link', 'set', 'dev', name, 'up']);
  c.configureTap(name);
  const drivers = [];
  const owner = [];
  for (let i = 0; i < tapFds.length; i++) {
    try {
      drivers.push(new c.lib.VhostPairDriver(vhostFds[i], tapFds[i]));
      owner.push('ok');
    } catch (err) {
      owner.push(c.errInfo(err));
    }
  }
  let trip = null;
  if (drivers.length === tapFds.length && drivers.length > 0) {
    const sock = await c.udpSocket();
    try {
      trip = await c.roundTrip(drivers, drivers.map((_, i) => i), sock, { frames: 4, portBase: 45000, tapMac: mac });
    } finally {
      await sock.close();
    }
  }
  for (const d of drivers) d.stop();
  return { env, tapFds, vhostFds, links, owner, trip };
});
