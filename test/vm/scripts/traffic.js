'use strict';
/**
 * Frames both ways on every pair of netdevs of 1, 2 and 4 pairs, each pair
 * driven by this process through a real /dev/vhost-net; then, on the 4-pair
 * netdev, setActivePairs 4 -> 2 -> 4 with traffic only on the active pairs.
 * Prints one JSON document (see test/vm/vhost.test.ts for what is asserted).
 */
const c = require('./common.js');

function kernelQueues(name) {
  const t = c.lib.getTap(name);
  return t ? { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues } : null;
}

c.runMain(async () => {
  c.sh('ip', ['-V']); // first child process: libuv's SIGCHLD pipe is opened before any fd baseline
  const ns = c.enterNetns();
  const out = { netns: ns.path, sizes: {} };
  const sock = await c.udpSocket().catch(() => null); // bound later, once an address exists
  if (sock) await sock.close();
  let port = 20000;
  for (const pairs of [1, 2, 4]) {
    await c.section(out.sizes, String(pairs), async () => {
      const fdsBefore = c.fdCount();
      const r = { pairs };
      const nd = c.lib.openNetdev({ name: `vt${pairs}x%d`, pairs, vhost: 'on', up: true, mac: c.TAP_MAC });
      let s;
      try {
        r.name = nd.name;
        r.vhostFds = nd.vhostFds().length;
        r.tapFds = nd.tapFds().length;
        r.hdrSize = nd.tap.vnetHdrSize();
        c.configureTap(nd.name);
        const drivers = nd.pairs.map((p) => nd.drive(p.index));
        r.drivers = drivers.map((d) => ({ hdrLen: d.hdrLen, features: `0x${d.features.toString(16)}`, bound: d.bound }));
        s = await c.udpSocket();
        const statsBefore = nd.tap.info().stats;
        r.roundTrip = await c.roundTrip(drivers, drivers.map((_, i) => i), s, { frames: 8, portBase: (port += 100) });
        const statsAfter = nd.tap.info().stats;
        r.kernelRxPackets = statsAfter.rxPackets - statsBefore.rxPackets;
        r.kernelTxPackets = statsAfter.txPackets - statsBefore.txPackets;
        r.calls = drivers.map((d) => {
          const k = d.calls();
          return { rx: Number(k.rx), tx: Number(k.tx) };
        });
        r.errors = drivers.map((d) => Number(d.errors()));
        if (pairs > 1) r.hash = await c.hashFlows(drivers, s, { flows: 64, portBase: (port += 100) });
        if (pairs === 4) {
          // 4 -> 2: pairs 2 and 3 detached from the tap, their vhost backends unbound.
          nd.setActivePairs(2);
          r.down = { kernel: kernelQueues(nd.name), states: nd.pairs.map((p) => p.state), bound: drivers.map((d) => d.bound) };
          try {
            drivers[2].send([c.udpFrame(1, c.LOCAL_PORT, Buffer.from('x'))]);
            r.down.sendOnDisabled = 'accepted';
          } catch (err) {
            r.down.sendOnDisabled = c.errInfo(err);
          }
          // A frame put on disabled pair 2's TX ring by hand, with a kick: an unbound backend
          // leaves it there (a backend still bound to the detached queue would consume it and
          // the tap would drop it).  It must arrive once pair 2 is enabled again.
          const parked = Buffer.from('parked on disabled pair 2');
          const parkedPort = (port += 100);
          const id = drivers[2].tx.alloc();
          const b = drivers[2].tx.buffer(id);
          b.fill(0, 0, drivers[2].hdrLen);
          const pf = c.udpFrame(parkedPort, c.LOCAL_PORT, parked);
          pf.copy(b, drivers[2].hdrLen);
          drivers[2].tx.add(id, drivers[2].hdrLen + pf.length, false);
          drivers[2].tx.publish();
          drivers[2].kick();
          await c.sleep(500);
          drivers[2].tx.collect();
          r.down.parked = { inFlightAfterKick: drivers[2].tx.inFlight, receivedWhileDisabled: s.queue.filter((m) => m.port === parkedPort).length };
          r.down.roundTrip = await c.roundTrip(drivers, [0, 1], s, { frames: 8, portBase: (port += 100) });
          r.down.hash = await c.hashFlows(drivers, s, { flows: 64, portBase: (port += 100) });
          // 2 -> 4: attached again, backends bound again, traffic on all four.
          nd.setActivePairs(4);
          r.up = { kernel: kernelQueues(nd.name), states: nd.pairs.map((p) => p.state), bound: drivers.map((d) => d.bound) };
          const late = await s.take(1, 15_000);
          r.up.parked = { flushed: await drivers[2].flushTx(15_000), received: late.map((m) => ({ port: m.port, msg: m.msg.toString() })), expected: { port: parkedPort, msg: parked.toString() } };
          r.up.roundTrip = await c.roundTrip(drivers, [0, 1, 2, 3], s, { frames: 8, portBase: (port += 100) });
          r.up.hash = await c.hashFlows(drivers, s, { flows: 64, portBase: (port += 100) });
        }
        // VHOST_GET_VRING_BASE (in stop()): where the device stopped, vs. what the driver counted.
        r.stops = drivers.map((d) => ({ counters: d.counters(), txAvail: d.tx.availIndex, bases: d.stop() }));
      } finally {
        if (s) await s.close();
        nd.close();
      }
      r.gone = await c.linkGone(r.name);
      r.fdsBefore = fdsBefore;
      r.fdsAfter = c.fdCount();
      return r;
    });
  }
  out.tapsLeft = c.tunLinks();
  ns.restore();
  return out;
});
