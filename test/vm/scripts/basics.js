'use strict';
/**
 * vhost-net ownership, features, header sizes, ring edge cases, all-or-nothing
 * open and close orders, against the guest's real /dev/vhost-net.  Every
 * section records its findings (or its error) in one JSON document; the
 * assertions are in test/vm/vhost.test.ts.
 */
const c = require('./common.js');

const { lib, native, K } = c;
let port = 30000;
const nextPorts = () => (port += 100);

/** A 2-frame round trip on every pair in `active`: proves a driver still (or again) moves frames both ways. */
function quickTrip(drivers, active, sock, extra = {}) {
  return c.roundTrip(drivers, active, sock, { frames: 2, portBase: nextPorts(), ...extra });
}

function catchErr(fn) {
  try {
    fn();
    return 'no error';
  } catch (err) {
    return c.errInfo(err);
  }
}

function rawVhostSetup(tapFd) {
  const vfd = native.vhostOpen();
  const efds = [];
  const eventfd = () => {
    const fd = native.eventfdOpen(0);
    efds.push(fd);
    return fd;
  };
  native.vhostSetOwner(vfd);
  native.vhostSetFeatures(vfd, 1n << BigInt(K.VIRTIO_F_VERSION_1));
  const num = 16;
  const bufSize = 2112;
  const rxL = lib.vringLayout(num, bufSize, 0);
  const txL = lib.vringLayout(num, bufSize, rxL.descOffset + rxL.size);
  const mem = native.allocPages(txL.descOffset + txL.size);
  const base = native.addressOf(mem);
  native.vhostSetMemTable(vfd, [{ guestPhysAddr: base, memorySize: BigInt(mem.byteLength), userspaceAddr: base }]);
  const rx = new lib.SplitVirtqueue(mem, rxL);
  const tx = new lib.SplitVirtqueue(mem, txL);
  const kick = [eventfd(), eventfd()];
  const call = [eventfd(), eventfd()];
  const err = eventfd();
  for (const [i, q] of [[0, rx], [1, tx]]) {
    native.vhostSetVringNum(vfd, i, num);
    native.vhostSetVringBase(vfd, i, 0);
    native.vhostSetVringAddr(vfd, i, q.addresses());
    native.vhostSetVringKick(vfd, i, kick[i]);
    native.vhostSetVringCall(vfd, i, call[i]);
    native.vhostSetVringErr(vfd, i, err);
  }
  for (let id = rx.alloc(); id >= 0; id = rx.alloc()) rx.add(id, bufSize, true);
  rx.publish();
  native.vhostNetSetBackend(vfd, 0, tapFd);
  native.vhostNetSetBackend(vfd, 1, tapFd);
  native.eventfdWrite(kick[0]);
  return { vfd, mem, rx, tx, kick, call, err, efds, txL };
}

/** One frame TX through the raw rings, the socket's reply collected from the raw RX ring. */
async function rawTrip(v, sock) {
  const p = nextPorts();
  const payload = Buffer.from(`raw ring frame ${p}`);
  const id = v.tx.alloc();
  const b = v.tx.buffer(id);
  b.fill(0, 0, 12);
  c.udpFrame(p, c.LOCAL_PORT, payload).copy(b, 12);
  v.tx.add(id, 12 + 42 + payload.length, false);
  v.tx.publish();
  native.eventfdWrite(v.kick[1]);
  const got = await sock.take(1, 15_000);
  const txOk = got.length === 1 && got[0].msg.equals(payload) && got[0].port === p;
  const reply = Buffer.from(`raw ring reply ${p}`);
  if (txOk) await sock.send(reply, p);
  let rxOk = false;
  const deadline = Date.now() + 15_000;
  while (!rxOk && Date.now() < deadline) {
    for (const e of v.rx.collect(Infinity, true)) {
      const u = c.parseUdp(Buffer.from(v.rx.buffer(e.id).subarray(12, e.len)));
      if (u && u.dstPort === p && u.payload.equals(reply)) rxOk = true;
      v.rx.add(e.id, v.rx.layout.bufSize, true);
    }
    v.rx.publish();
    native.eventfdWrite(v.kick[0]);
    if (!rxOk) await c.sleep(5);
  }
  v.tx.collect();
  return { txOk, rxOk, txInFlight: v.tx.inFlight };
}

/**
 * A TX descriptor pointing outside the memory table: the worker cannot
 * translate it and signals the VHOST_SET_VRING_ERR eventfd.
 */
async function rawBadDescriptor(v) {
  const id = v.tx.alloc();
  v.tx.add(id, 60, false);
  new DataView(v.mem).setBigUint64(v.txL.descOffset + id * 16, 0x1000n, true);
  v.tx.publish();
  native.eventfdWrite(v.kick[1]);
  const deadline = Date.now() + 10_000;
  let errors = 0n;
  while (errors === 0n && Date.now() < deadline) {
    errors = native.eventfdRead(v.err) ?? 0n;
    if (errors === 0n) await c.sleep(10);
  }
  return Number(errors);
}

/** Raw fds end to end (no Tap/Netdev/driver objects), closed in `order`. */
async function rawCloseOrder(order, sock) {
  const fdsBefore = c.fdCount();
  const tapFd = native.tunOpen();
  const name = native.tunSetIff(tapFd, `vr${order === 'vhost-first' ? 'v' : 't'}%d`, K.IFF_TAP | K.IFF_NO_PI | K.IFF_MULTI_QUEUE | K.IFF_VNET_HDR);
  native.tunSetVnetHdrSz(tapFd, 12);
  native.ifSetMac(name, Buffer.from(c.TAP_MAC.split(':').map((h) => parseInt(h, 16))));
  native.ifSetFlags(name, native.ifGetFlags(name) | K.IFF_UP);
  c.configureTap(name);
  const v = rawVhostSetup(tapFd);
  const r = { order, name };
  r.trip = await rawTrip(v, sock);
  r.errEventfd = await rawBadDescriptor(v);
  if (order === 'vhost-first') {
    native.close(v.vfd);
    r.afterFirstClose = { present: c.tunLinks().includes(name), kernel: c.lib.getTap(name)?.tun.numQueues ?? null };
    native.close(tapFd);
  } else {
    native.close(tapFd);
    // The backend still holds the tap queue's file: the device and its queue stay until the vhost fd goes.
    r.afterFirstClose = { present: c.tunLinks().includes(name), kernel: c.lib.getTap(name)?.tun.numQueues ?? null };
    native.close(v.vfd);
  }
  r.gone = await c.linkGone(name);
  for (const fd of v.efds) native.close(fd);
  void v.mem.byteLength; // the ring memory outlived the vhost fd
  r.fdsBefore = fdsBefore;
  r.fdsAfter = c.fdCount();
  return r;
}

/** Netdev/QueuePair API, closed in `order`. */
async function libCloseOrder(order, sock) {
  const fdsBefore = c.fdCount();
  const nd = lib.openNetdev({ name: `vl${order === 'vhost-first' ? 'v' : 't'}%d`, pairs: 2, vhost: 'on', up: true, mac: c.TAP_MAC });
  const r = { order, name: nd.name };
  try {
    c.configureTap(nd.name);
    const drivers = nd.pairs.map((p) => nd.drive(p.index));
    r.trip = await quickTrip(drivers, [0, 1], sock);
    if (order === 'vhost-first') {
      for (const p of nd.pairs) p.closeVhost();
      r.afterFirstClose = { present: c.tunLinks().includes(nd.name), kernel: lib.getTap(nd.name)?.tun.numQueues ?? null, vhostFds: nd.pairs.map((p) => p.vhostFd) };
      for (const p of nd.pairs) p.tapQueue.close();
    } else {
      for (const p of nd.pairs) p.tapQueue.close();
      r.afterFirstClose = { present: c.tunLinks().includes(nd.name), kernel: lib.getTap(nd.name)?.tun.numQueues ?? null, vhostFds: nd.pairs.map((p) => p.vhostFd) };
      for (const p of nd.pairs) p.closeVhost();
    }
    r.gone = await c.linkGone(nd.name);
  } finally {
    r.closeAgain = catchErr(() => nd.close());
  }
  r.fdsBefore = fdsBefore;
  r.fdsAfter = c.fdCount();
  return r;
}

c.runMain(async () => {
  c.sh('ip', ['-V']); // first child process: libuv's SIGCHLD pipe is opened before any fd baseline
  const ns = c.enterNetns();
  const out = { netns: ns.path };
  const fdsAtStart = c.fdCount();

  await c.section(out, 'probe', () => lib.probeVhostNet());

  // All or nothing: with fds for 4 tap queues and 2 vhost fds only, opening 4 pairs fails at pair 2.
  // openNetdev opens the 4 vhost-net fds, then the 4 tap queues: with 2 free
  // fds it fails among the vhost fds, with 6 among the tap queues (after all
  // vhost fds are open).  Either way nothing may stay.
  for (const [section, free] of [['emfileVhost', 2], ['emfile', 6]]) {
    await c.section(out, section, () => {
      const fdsBefore = c.fdCount();
      const restore = c.limitFreeFds(free);
      let openError;
      try {
        lib.openNetdev({ name: 've%d', pairs: 4, vhost: 'on' }).close();
        openError = 'no error';
      } catch (err) {
        openError = c.errInfo(err);
      }
      restore();
      return { openError, taps: c.tunLinks(), fdsBefore, fdsAfter: c.fdCount() };
    });
  }

  // Ownership, features and restart on one 2-pair netdev.
  {
    const nd = lib.openNetdev({ name: 'vo%d', pairs: 2, vhost: 'on', up: true, mac: c.TAP_MAC });
    let sock;
    try {
      c.configureTap(nd.name);
      sock = await c.udpSocket();
      const [p0, p1] = nd.pairs;

      // openNetdev opened the vhost fds without VHOST_SET_OWNER: whoever drives them (QEMU) can.
      await c.section(out, 'notOwnedAfterOpen', () => {
        native.vhostSetOwner(p1.vhostFd);
        native.vhostResetOwner(p1.vhostFd);
        return { setOwner: 'ok' };
      });

      await c.section(out, 'ownerTwice', async () => {
        const d0 = nd.drive(0);
        const r = {};
        r.setOwnerAgain = catchErr(() => native.vhostSetOwner(p0.vhostFd));
        r.secondDriver = catchErr(() => new lib.VhostPairDriver(p0.vhostFd, p0.tapQueue.fd));
        // The failed attempts must not have reset the first driver's device.
        r.tripAfter = await quickTrip([d0], [0], sock);
        r.errors = Number(d0.errors());
        return r;
      });

      await c.section(out, 'restart', async () => {
        const d0 = p0.driver;
        const counters = d0.counters();
        p0.stopDriver(); // unbind, GET_VRING_BASE, RESET_OWNER; the fd stays
        const r = { counters, stopped: d0.stopped, driverAfterStop: p0.driver === undefined };
        r.useStopped = catchErr(() => d0.send([Buffer.alloc(60)]));
        const again = nd.drive(0); // VHOST_SET_OWNER again on the same fd
        r.sameObject = again === d0;
        r.trip = await quickTrip([again], [0], sock);
        return r;
      });

      await c.section(out, 'features', async () => {
        const r = {};
        r.notOffered = catchErr(() => nd.drive(1, { features: ['VERSION_1', 'MQ'] }));
        r.notImplemented = catchErr(() => nd.drive(1, { features: ['VERSION_1', 'ACCESS_PLATFORM'] }));
        r.unknownName = catchErr(() => nd.drive(1, { features: ['VERSION_2'] }));
        r.kernelRefuses = catchErr(() => native.vhostSetFeatures(p1.vhostFd, 1n << BigInt(K.VIRTIO_NET_F_MQ)));
        r.driverAfterFailures = p1.driver === undefined;
        // Nothing was left half set up (no owner): the pair can be driven now.
        const d1 = nd.drive(1);
        r.trip = await quickTrip([p0.driver, d1], [0, 1], sock);
        return r;
      });

      // Control: a frame with a broken IPv4 header checksum goes through vhost (the
      // tap counts it) but the kernel drops it, so the socket checks are not vacuous.
      await c.section(out, 'badChecksumControl', async () => {
        const d0 = p0.driver;
        const before = nd.tap.info().stats.rxPackets;
        const bad = c.udpFrame(29001, c.LOCAL_PORT, Buffer.from('bad checksum'));
        bad.writeUInt16BE(bad.readUInt16BE(24) ^ 0xffff, 24);
        const good = c.udpFrame(29002, c.LOCAL_PORT, Buffer.from('good checksum'));
        d0.send([bad, good]);
        const flushed = await d0.flushTx(10_000);
        const got = await sock.take(1, 10_000);
        await c.sleep(200);
        got.push(...sock.queue.splice(0));
        return { flushed, received: got.map((g) => ({ port: g.port, msg: g.msg.toString() })), tapRxPackets: nd.tap.info().stats.rxPackets - before };
      });
    } finally {
      if (sock) await sock.close();
      nd.close();
    }
  }

  // Header sizes: a 10-byte tap header refuses VERSION_1 (12) and works with legacy (10).
  await c.section(out, 'hdr10', async () => {
    const nd = lib.openNetdev({ name: 'vh%d', pairs: 1, vhost: 'on', up: true, mac: c.TAP_MAC, vnetHdrSize: 10 });
    let sock;
    try {
      c.configureTap(nd.name);
      sock = await c.udpSocket();
      const r = { tapHdr: nd.tap.vnetHdrSize() };
      r.version1 = catchErr(() => nd.drive(0));
      const d = nd.drive(0, { features: [] });
      r.legacy = { hdrLen: d.hdrLen, features: `0x${d.features.toString(16)}` };
      r.trip = await quickTrip([d], [0], sock, { frames: 4 });
      return r;
    } finally {
      if (sock) await sock.close();
      nd.close();
    }
  });

  // MRG_RXBUF with 256-byte buffers: big replies span several RX buffers (num_buffers).
  await c.section(out, 'mergeable', async () => {
    const nd = lib.openNetdev({ name: 'vm%d', pairs: 1, vhost: 'on', up: true, mac: c.TAP_MAC });
    let sock;
    try {
      c.configureTap(nd.name);
      sock = await c.udpSocket();
      const d = nd.drive(0, { features: ['VERSION_1', 'MRG_RXBUF'], bufSize: 256 });
      const r = { hdrLen: d.hdrLen, mergeable: d.mergeable };
      r.trip = await c.roundTrip([d], [0], sock, { frames: 8, portBase: nextPorts(), maxTxPayload: 256 - 12 - 42 });
      r.counters = d.counters();
      return r;
    } finally {
      if (sock) await sock.close();
      nd.close();
    }
  });

  // 16-bit ring indices wrapping: start at 65530 with 8-entry rings, 24 frames each way.
  await c.section(out, 'wrap', async () => {
    const nd = lib.openNetdev({ name: 'vw%d', pairs: 1, vhost: 'on', up: true, mac: c.TAP_MAC });
    let sock;
    try {
      c.configureTap(nd.name);
      sock = await c.udpSocket();
      const d = nd.drive(0, { startIndex: 65530, queueSize: 8 });
      const trips = [];
      for (let i = 0; i < 3; i++) trips.push(await c.roundTrip([d], [0], sock, { frames: 8, portBase: nextPorts() }));
      const counters = d.counters();
      const bases = d.stop();
      return { trips, counters, bases, availIndex: { rx: d.rx.availIndex, tx: d.tx.availIndex } };
    } finally {
      if (sock) await sock.close();
      nd.close();
    }
  });

  // Close orders: vhost first / tap first, through the library and with raw fds.
  await c.section(out, 'closeOrders', async () => {
    const r = {};
    for (const order of ['vhost-first', 'tap-first']) {
      r[`lib-${order}`] = await withTapSocket((sock) => libCloseOrder(order, sock));
      r[`raw-${order}`] = await withTapSocket((sock) => rawCloseOrder(order, sock));
    }
    return r;
  });

  out.tapsLeft = c.tunLinks();
  out.fdsAtStart = fdsAtStart;
  out.fdsAtEnd = c.fdCount();
  ns.restore();
  return out;
});

/** The close-order runs create and remove their own taps: a socket on 0.0.0.0 outlives each of them. */
async function withTapSocket(fn) {
  const sock = await c.udpSocket(c.LOCAL_PORT, '0.0.0.0');
  try {
    return await fn(sock);
  } finally {
    await sock.close();
  }
}
