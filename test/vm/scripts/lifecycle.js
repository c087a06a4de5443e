'use strict';
/**
 * A driven pair's tap queue changed directly, not through Netdev: the vhost
 * driver must still follow (its hooks on the TapQueue), against the guest's
 * real /dev/vhost-net.
 *
 *   disable: queue.disable() on a driven pair -> backend unbound (a frame
 *     kicked onto its TX ring stays there), the kernel shows the queue
 *     detached; queue.enable() -> bound again: the parked frame goes out and
 *     frames flow both ways on that pair again.
 *   setActiveQueues: tap.setActiveQueues(1) / (2) -> same as setActivePairs.
 *   close: queue.close() on a driven pair -> driver stopped (the kernel
 *     releases the queue at once: no backend holds its file any more), its
 *     eventfds and the tap fd closed; the other pair still works.
 *   tapClose: tap.close() on a driven netdev -> every driver stopped, the
 *     device gone at once; Netdev.close() afterwards leaves no fd.
 *
 * Prints one JSON document (assertions in test/vm/vhost.test.ts).
 */
const c = require('./common.js');

const { lib } = c;
let port = 40000;
const nextPorts = () => (port += 100);

function kernelQueues(name) {
  const t = lib.getTap(name);
  return t ? { numQueues: t.tun.numQueues, numDisabledQueues: t.tun.numDisabledQueues } : null;
}

function catchErr(fn) {
  try {
    fn();
    return 'no error';
  } catch (err) {
    return c.errInfo(err);
  }
}

/** Puts one UDP frame on `d`'s TX ring by hand and kicks (send() refuses while unbound). */
function park(d, srcPort, text) {
  const id = d.tx.alloc();
  const b = d.tx.buffer(id);
  b.fill(0, 0, d.hdrLen);
  const f = c.udpFrame(srcPort, c.LOCAL_PORT, Buffer.from(text));
  f.copy(b, d.hdrLen);
  d.tx.add(id, d.hdrLen + f.length, false);
  d.tx.publish();
  d.kick();
}

/** A 2-pair netdev, both pairs driven, address configured; `fn(nd, drivers)` runs with a socket. */
async function withNetdev(prefix, fn) {
  const fdsBefore = c.fdCount();
  const nd = lib.openNetdev({ name: `${prefix}%d`, pairs: 2, vhost: 'on', up: true, mac: c.TAP_MAC });
  const name = nd.name;
  let sock;
  let r;
  try {
    c.configureTap(name);
    const drivers = nd.pairs.map((p) => nd.drive(p.index));
    sock = await c.udpSocket();
    r = await fn(nd, drivers, sock);
  } finally {
    if (sock) await sock.close();
    nd.close();
  }
  r.gone = await c.linkGone(name);
  r.fdsBefore = fdsBefore;
  r.fdsAfter = c.fdCount();
  return r;
}

c.runMain(async () => {
  c.sh('ip', ['-V']); // first child process: libuv's SIGCHLD pipe is opened before any fd baseline
  const ns = c.enterNetns();
  const out = { netns: ns.path };
  const fdsAtStart = c.fdCount();

  await c.section(out, 'disable', () =>
    withNetdev('vld', async (nd, drivers, sock) => {
      const r = { before: await c.roundTrip(drivers, [0, 1], sock, { frames: 2, portBase: nextPorts() }) };
      const q = nd.pairs[1].tapQueue;
      q.disable(); // directly on the TapQueue, not through the Netdev
      r.down = { kernel: kernelQueues(nd.name), states: nd.pairs.map((p) => p.state), bound: drivers.map((d) => d.bound), driven: nd.pairs.map((p) => p.driver !== undefined) };
      r.down.sendOnDisabled = catchErr(() => drivers[1].send([c.udpFrame(1, c.LOCAL_PORT, Buffer.from('x'))]));
      const parkedPort = nextPorts();
      park(drivers[1], parkedPort, 'parked on a queue disabled directly');
      await c.sleep(500);
      drivers[1].tx.collect();
      r.down.parked = { inFlightAfterKick: drivers[1].tx.inFlight, receivedWhileDisabled: sock.queue.filter((m) => m.port === parkedPort).length };
      r.down.trip = await c.roundTrip(drivers, [0], sock, { frames: 2, portBase: nextPorts() });
      q.enable(); // directly again
      r.up = { kernel: kernelQueues(nd.name), states: nd.pairs.map((p) => p.state), bound: drivers.map((d) => d.bound) };
      const late = await sock.take(1, 15_000);
      r.up.parked = { flushed: await drivers[1].flushTx(15_000), received: late.map((m) => ({ port: m.port, msg: m.msg.toString() })), expectedPort: parkedPort };
      r.up.trip = await c.roundTrip(drivers, [0, 1], sock, { frames: 2, portBase: nextPorts() });
      r.errors = drivers.map((d) => Number(d.errors()));
      return r;
    }),
  );

  await c.section(out, 'setActiveQueues', () =>
    withNetdev('vls', async (nd, drivers, sock) => {
      const r = {};
      nd.tap.setActiveQueues(1); // the Tap's own call, not setActivePairs
      r.down = { kernel: kernelQueues(nd.name), bound: drivers.map((d) => d.bound) };
      r.down.trip = await c.roundTrip(drivers, [0], sock, { frames: 2, portBase: nextPorts() });
      nd.tap.setActiveQueues(2);
      r.up = { kernel: kernelQueues(nd.name), bound: drivers.map((d) => d.bound) };
      r.up.trip = await c.roundTrip(drivers, [0, 1], sock, { frames: 2, portBase: nextPorts() });
      return r;
    }),
  );

  await c.section(out, 'close', () =>
    withNetdev('vlc', async (nd, drivers, sock) => {
      const r = {};
      const fds = c.fdCount();
      nd.pairs[1].tapQueue.close(); // directly on the TapQueue
      r.after = {
        kernel: kernelQueues(nd.name),
        stopped: drivers.map((d) => d.stopped),
        driven: nd.pairs.map((p) => p.driver !== undefined),
        states: nd.pairs.map((p) => p.state),
        // The tap fd and the driver's 5 eventfds are closed; the vhost fd stays (owner-less) until the pair closes.
        fdsClosed: fds - c.fdCount(),
        vhostFdOpen: nd.pairs[1].vhostFd >= 0,
        useStopped: catchErr(() => drivers[1].send([c.udpFrame(1, c.LOCAL_PORT, Buffer.from('x'))])),
      };
      r.after.trip = await c.roundTrip([drivers[0]], [0], sock, { frames: 2, portBase: nextPorts() });
      // The owner-less vhost fd can be driven again only with a tap queue: the pair is closed.
      r.after.driveClosed = catchErr(() => nd.drive(1));
      return r;
    }),
  );

  await c.section(out, 'tapClose', () =>
    withNetdev('vlt', async (nd, drivers) => {
      const r = {};
      const name = nd.name;
      nd.tap.close(); // the Tap's own close, not Netdev.close()
      r.after = {
        present: c.tunLinks().includes(name),
        stopped: drivers.map((d) => d.stopped),
        driven: nd.pairs.map((p) => p.driver !== undefined),
        vhostFds: nd.pairs.map((p) => p.vhostFd >= 0),
      };
      return r;
    }),
  );

  out.tapsLeft = c.tunLinks();
  out.fdsAtStart = fdsAtStart;
  out.fdsAtEnd = c.fdCount();
  ns.restore();
  return out;
});
