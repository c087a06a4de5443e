'use strict';
/**
 * Shared helpers for the node scripts test/vm/vhost.test.ts runs INSIDE the
 * guest (plain CommonJS, no build step).  They use the repo's compiled
 * library (dist/lib) and print one JSON document on stdout.
 *
 * Frames are built and parsed here, independently of the CLI's selftest, so
 * the two implementations check each other.
 */
const { execFileSync } = require('node:child_process');
const dgram = require('node:dgram');
const { readdirSync, writeFileSync } = require('node:fs');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');

const REPO = path.resolve(__dirname, '..', '..', '..');
const lib = require(path.join(REPO, 'dist', 'lib', 'index.js'));
const { native, K } = require(path.join(REPO, 'dist', 'lib', 'sys', 'native.js'));

/** Link-local addressing used by every script: the tap is LOCAL, a static neighbour PEER sits behind it. */
const LOCAL = '169.254.10.1';
const PEER = '169.254.10.2';
const TAP_MAC = '02:00:00:00:0a:01';
const PEER_MAC = '02:00:00:00:0a:02';
const LOCAL_PORT = 5555;

function sh(cmd, args) {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/**
 * Enters a throw-away network namespace (the JS thread; child processes and
 * sockets created afterwards live there too) with IPv6 off for new devices,
 * so the kernel sends no unsolicited frames (router solicitations, MLD).
 */
function enterNetns() {
  const ns = lib.isolateNetns();
  try {
    writeFileSync('/proc/sys/net/ipv6/conf/default/disable_ipv6', '1');
  } catch {
    /* no IPv6 in this kernel: nothing to silence */
  }
  return ns;
}

/** Address + permanent neighbour on the (already up) tap. */
function configureTap(name) {
  sh('ip', ['addr', 'add', `${LOCAL}/24`, 'dev', name]);
  sh('ip', ['neigh', 'replace', PEER, 'lladdr', PEER_MAC, 'dev', name, 'nud', 'permanent']);
}

function macBytes(m) {
  return m.split(':').map((h) => parseInt(h, 16));
}
function ipBytes(a) {
  return a.split('.').map(Number);
}

/** RFC 791/1071 ones' complement checksum. */
function checksum(buf, initial = 0) {
  let sum = initial;
  for (let i = 0; i + 1 < buf.length; i += 2) sum += buf.readUInt16BE(i);
  if (buf.length % 2) sum += buf[buf.length - 1] << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** Ethernet + IPv4 (header checksum) + UDP (checksum 0) frame from PEER to LOCAL. */
function udpFrame(srcPort, dstPort, payload, opts = {}) {
  const eth = Buffer.from([...macBytes(opts.dstMac ?? TAP_MAC), ...macBytes(opts.srcMac ?? PEER_MAC), 0x08, 0x00]);
  const ip = Buffer.alloc(20);
  ip[0] = 0x45;
  ip.writeUInt16BE(20 + 8 + payload.length, 2);
  ip.writeUInt16BE(opts.id ?? 1, 4);
  ip.writeUInt16BE(0x4000, 6);
  ip[8] = 64;
  ip[9] = 17;
  Buffer.from(ipBytes(opts.src ?? PEER)).copy(ip, 12);
  Buffer.from(ipBytes(opts.dst ?? LOCAL)).copy(ip, 16);
  ip.writeUInt16BE(checksum(ip), 10);
  const udp = Buffer.alloc(8);
  udp.writeUInt16BE(srcPort, 0);
  udp.writeUInt16BE(dstPort, 2);
  udp.writeUInt16BE(8 + payload.length, 4);
  udp.writeUInt16BE(0, 6);
  return Buffer.concat([eth, ip, udp, payload]);
}

/** Parses an Ethernet/IPv4/UDP frame; null for anything else.  Verifies both checksums. */
function parseUdp(frame) {
  if (frame.length < 42 || frame.readUInt16BE(12) !== 0x0800) return null;
  const ihl = (frame[14] & 0x0f) * 4;
  if (frame[14] >> 4 !== 4 || frame[23] !== 17) return null;
  const ip = frame.subarray(14, 14 + ihl);
  const totalLen = ip.readUInt16BE(2);
  const udp = frame.subarray(14 + ihl, 14 + totalLen);
  const udpLen = udp.readUInt16BE(4);
  const payload = Buffer.from(udp.subarray(8, udpLen));
  const pseudo = Buffer.alloc(12);
  ip.copy(pseudo, 0, 12, 20);
  pseudo[9] = 17;
  pseudo.writeUInt16BE(udpLen, 10);
  const udpSum = udp.readUInt16BE(6);
  return {
    dstMac: [...frame.subarray(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':'),
    srcMac: [...frame.subarray(6, 12)].map((b) => b.toString(16).padStart(2, '0')).join(':'),
    src: [...ip.subarray(12, 16)].join('.'),
    dst: [...ip.subarray(16, 20)].join('.'),
    srcPort: udp.readUInt16BE(0),
    dstPort: udp.readUInt16BE(2),
    payload,
    ipChecksumOk: checksum(ip) === 0,
    udpChecksumOk: udpSum === 0 || checksum(Buffer.concat([pseudo, udp.subarray(0, udpLen)])) === 0,
    frameLen: frame.length,
    udpSum,
  };
}

/** A UDP socket bound to address:port (default LOCAL:LOCAL_PORT) that queues what it receives. */
async function udpSocket(port = LOCAL_PORT, address = LOCAL) {
  const sock = dgram.createSocket('udp4');
  const queue = [];
  sock.on('message', (msg, rinfo) => queue.push({ msg, port: rinfo.port, address: rinfo.address }));
  await new Promise((resolve, reject) => {
    sock.once('error', reject);
    sock.bind(port, address, () => {
      sock.off('error', reject);
      resolve();
    });
  });
  return {
    sock,
    queue,
    /** Waits until `n` datagrams are queued (or the timeout) and takes them all. */
    async take(n, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      while (queue.length < n && Date.now() < deadline) await sleep(5);
      return queue.splice(0);
    },
    send(payload, port, address = PEER) {
      return new Promise((resolve, reject) => sock.send(payload, port, address, (err) => (err ? reject(err) : resolve())));
    },
    close() {
      return new Promise((resolve) => sock.close(resolve));
    },
  };
}

/** Polls several drivers' RX rings until `want` UDP frames to PEER arrived in total (or the timeout). */
async function collectRx(drivers, want, timeoutMs = 10_000) {
  const got = drivers.map(() => []);
  const other = drivers.map(() => 0);
  let total = 0;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    for (let i = 0; i < drivers.length; i++) {
      const d = drivers[i];
      if (!d) continue;
      for (const pkt of d.receivePackets()) {
        const u = parseUdp(pkt.frame);
        if (u && u.dst === PEER) {
          got[i].push({ ...u, header: [...pkt.header], buffers: pkt.buffers });
          total++;
        } else other[i]++;
      }
    }
    if (total >= want || Date.now() >= deadline) return { got, other };
    await sleep(3);
  }
}

const TX_SIZES = [1, 60, 513, 1472, 2, 61, 514, 1471];
const RX_SIZES = [1472, 3, 777, 42, 1000, 4, 1400, 100];

/**
 * Round trips on every pair in `active` (indices into `drivers`):
 *
 *   TX: `frames` UDP frames per pair from PEER:portBase+i to LOCAL:LOCAL_PORT,
 *   pushed into pair i's TX ring; the socket must receive each payload
 *   exactly once, byte for byte, from port portBase+i.
 *
 *   RX: the socket answers each datagram (another random payload) to
 *   PEER:portBase+i.  The tap sends a flow's frames on the queue it last
 *   received the flow on (rx-follows-tx), so each reply must come back on
 *   pair i's RX ring, exactly once, byte for byte.  Every driver in
 *   `drivers` is polled, so a reply on the wrong pair (or on a disabled
 *   pair) is seen and counted.
 */
async function roundTrip(drivers, active, sock, opts) {
  const frames = opts.frames ?? 8;
  const portBase = opts.portBase;
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const maxTx = opts.maxTxPayload ?? 1472;
  const crypto = require('node:crypto');
  const pairs = drivers.map((_, i) => ({ pair: i, txSent: 0, txReceived: 0, rxSent: 0, rxOnPair: 0, rxElsewhere: 0, rxBuffersMax: 0 }));
  const txExpect = new Map();
  const stats = { unknownTx: 0, unknownRx: 0, badIpChecksum: 0, badUdpChecksum: 0, zeroUdpChecksum: 0, otherFrames: 0, rxHeaders: [] };
  for (const i of active) {
    const batch = [];
    for (let k = 0; k < frames; k++) {
      const p = crypto.randomBytes(Math.min(TX_SIZES[k % TX_SIZES.length], maxTx));
      txExpect.set(`${portBase + i}|${p.toString('hex')}`, i);
      batch.push(udpFrame(portBase + i, LOCAL_PORT, p, { id: k + 1, dstMac: opts.tapMac }));
    }
    let queued = 0;
    const deadline = Date.now() + timeoutMs;
    while (queued < batch.length && Date.now() < deadline) {
      queued += drivers[i].send(batch.slice(queued));
      if (queued < batch.length) await drivers[i].flushTx(50);
    }
    pairs[i].txSent = queued;
  }
  const flushed = await Promise.all(active.map((i) => drivers[i].flushTx(timeoutMs)));
  const received = await sock.take(txExpect.size, timeoutMs);
  const rxExpect = new Map();
  for (const { msg, port } of received) {
    const key = `${port}|${msg.toString('hex')}`;
    const i = txExpect.get(key);
    if (i === undefined) {
      stats.unknownTx++;
      continue;
    }
    txExpect.delete(key);
    pairs[i].txReceived++;
    const r = crypto.randomBytes(RX_SIZES[pairs[i].rxSent++ % RX_SIZES.length]);
    rxExpect.set(`${port}|${r.toString('hex')}`, i);
    await sock.send(r, port);
  }
  const want = rxExpect.size;
  const rx = await collectRx(drivers, want, timeoutMs);
  rx.got.forEach((list, j) => {
    stats.otherFrames += rx.other[j];
    for (const u of list) {
      if (!u.ipChecksumOk) stats.badIpChecksum++;
      if (!u.udpChecksumOk) stats.badUdpChecksum++;
      if (u.udpSum === 0) stats.zeroUdpChecksum++;
      const key = `${u.dstPort}|${u.payload.toString('hex')}`;
      const i = rxExpect.get(key);
      if (i === undefined) {
        stats.unknownRx++;
        continue;
      }
      rxExpect.delete(key);
      if (i === j) pairs[i].rxOnPair++;
      else pairs[i].rxElsewhere++;
      pairs[i].rxBuffersMax = Math.max(pairs[i].rxBuffersMax, u.buffers);
      if (stats.rxHeaders.length < 1) stats.rxHeaders.push(u.header);
    }
  });
  return { pairs, flushed: flushed.every(Boolean), txMissing: txExpect.size, rxMissing: rxExpect.size, ...stats };
}

/**
 * Kernel-originated flows: `flows` datagrams from LOCAL to PEER:portBase..+flows-1.
 * No frame of these flows ever came from the tap, so the tap picks each one's
 * queue by flow hash.  Every payload must arrive exactly once across the
 * pairs; returns how many each pair got.
 */
async function hashFlows(drivers, sock, opts) {
  const crypto = require('node:crypto');
  const flows = opts.flows ?? 64;
  const expect = new Map();
  for (let f = 0; f < flows; f++) {
    const p = crypto.randomBytes(16 + (f % 32));
    expect.set(`${opts.portBase + f}|${p.toString('hex')}`, f);
    await sock.send(p, opts.portBase + f);
  }
  const rx = await collectRx(drivers, flows, opts.timeoutMs ?? 20_000);
  const perPair = drivers.map(() => 0);
  let unknown = 0;
  let duplicates = 0;
  const seen = new Set();
  rx.got.forEach((list, j) => {
    for (const u of list) {
      const key = `${u.dstPort}|${u.payload.toString('hex')}`;
      if (!expect.has(key)) unknown++;
      else if (seen.has(key)) duplicates++;
      else {
        seen.add(key);
        perPair[j]++;
      }
    }
  });
  return { flows, perPair, missing: flows - seen.size, unknown, duplicates, otherFrames: rx.other.reduce((a, b) => a + b, 0) };
}

/**
 * Lowers this process's soft RLIMIT_NOFILE (util-linux prlimit) so that
 * exactly `free` more fds can be opened; returns the restore function.
 */
function limitFreeFds(free) {
  const { readFileSync, openSync, closeSync } = require('node:fs');
  const m = /^Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
  const [soft, hard] = [m[1], m[2]];
  // Spare fds held while the limit is low, closed before restoring it: the
  // prlimit child needs fds of its own (pipes, /dev/null) to be spawned.
  const spare = Array.from({ length: 8 }, () => openSync('/dev/null', 'r'));
  const open = new Set(readdirSync('/proc/self/fd').map(Number));
  let limit = 0;
  for (let avail = 0; avail < free || open.has(limit); limit++) if (!open.has(limit)) avail++;
  execFileSync('prlimit', ['--pid', String(process.pid), `--nofile=${limit}:${hard}`], { stdio: 'ignore' });
  return () => {
    for (const fd of spare) closeSync(fd);
    execFileSync('prlimit', ['--pid', String(process.pid), `--nofile=${soft}:${hard}`], { stdio: 'ignore' });
  };
}

/** Polls until `name` is gone from this namespace's links (or the timeout); true when gone. */
async function linkGone(name, timeoutMs = 5_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!tunLinks().includes(name)) return true;
    if (Date.now() >= deadline) return false;
    await sleep(10);
  }
}

/** Runs a named check, recording its result or its error (so one failure does not hide the others). */
async function section(results, name, fn) {
  try {
    results[name] = await fn();
  } catch (err) {
    results[name] = { error: errInfo(err), stack: err && err.stack };
  }
}

function fdCount() {
  return readdirSync('/proc/self/fd').length;
}

function tunLinks() {
  return lib.listTaps().map((t) => t.name);
}

function errInfo(err) {
  if (!err || typeof err !== 'object') return { message: String(err) };
  return { name: err.name, code: err.code, op: err.op, message: err.message, hint: err.hint, queue: err.queue, ifname: err.ifname };
}

/** Runs the async main, prints its result as JSON (or the error) and exits. */
function runMain(main) {
  main().then(
    (result) => {
      process.stdout.write(`${JSON.stringify(result)}\n`);
      process.exit(0);
    },
    (err) => {
      process.stdout.write(`${JSON.stringify({ fatal: errInfo(err), stack: err && err.stack })}\n`);
      process.exit(1);
    },
  );
}

module.exports = {
  REPO, lib, native, K, LOCAL, PEER, TAP_MAC, PEER_MAC, LOCAL_PORT,
  sh, enterNetns, configureTap, udpFrame, parseUdp, checksum, udpSocket, collectRx, roundTrip, hashFlows, limitFreeFds, linkGone, section,
  fdCount, tunLinks, errInfo, runMain, sleep,
};
