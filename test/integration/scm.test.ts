/**
 * SCM_RIGHTS fd passing on the real kernel (lib/sys/scm.ts + native/scm.cc):
 * fds arrive as copies of the same open file, O_CLOEXEC, owned by a
 * ReceivedFds; truncated control data (MSG_CTRUNC) and truncated messages
 * (MSG_TRUNC) are errors that close whatever arrived; message boundaries on
 * SOCK_SEQPACKET; fds attached to the first bytes on SOCK_STREAM with
 * partial writes; backpressure without loss; the listening socket's mode,
 * stale-file handling and SO_PEERCRED; no fd leaks.  No root needed
 * (eventfds stand in for tap queues).
 */
import { lstatSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, MqtapError } from '../../lib/sys/errors.js';
import { K, native } from '../../lib/sys/native.js';
import { _recvScratch, ReceivedFds, SCM_MAX_FD, UnixServer, UnixSocket } from '../../lib/sys/scm.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      c();
    } catch {
      /* best effort */
    }
  }
});

function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

function eventfds(n: number): number[] {
  const fds = Array.from({ length: n }, () => native.eventfdOpen());
  cleanups.push(() => fds.forEach((fd) => native.close(fd)));
  return fds;
}

function pair(type: 'seqpacket' | 'stream', opts: { maxFds?: number; maxMessageBytes?: number } = {}): [UnixSocket, UnixSocket] {
  const p = UnixSocket.pair(type, opts);
  cleanups.push(() => p.forEach((s) => s.close()));
  return p;
}

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'mqtap-scm-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** Resolves with the next `n` messages (bounded). */
function nextMessages(s: UnixSocket, n: number, timeoutMs = 5000): Promise<Array<{ data: Buffer; fds: ReceivedFds }>> {
  return new Promise((resolve, reject) => {
    const got: Array<{ data: Buffer; fds: ReceivedFds }> = [];
    const timer = setTimeout(() => {
      s.off('message', on);
      reject(new Error(`only ${got.length} of ${n} messages arrived`));
    }, timeoutMs);
    const on = (data: Buffer, fds: ReceivedFds): void => {
      got.push({ data, fds });
      if (got.length === n) {
        clearTimeout(timer);
        s.off('message', on);
        resolve(got);
      }
    };
    s.on('message', on);
  });
}

function nextEvent<T>(s: UnixSocket, name: string, timeoutMs = 5000): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${name}' event`)), timeoutMs);
    s.once(name, (v: T) => {
      clearTimeout(timer);
      resolve(v);
    });
  });
}

describe('SCM_RIGHTS over SOCK_SEQPACKET', () => {
  it('sends fds as copies of the same open file, received O_CLOEXEC and owned by ReceivedFds', async () => {
    const [a, b] = pair('seqpacket');
    const fds = eventfds(3);
    const got = nextMessages(b, 1);
    await a.send('three', fds);
    const [{ data, fds: recv }] = await got;
    expect(data.toString()).toBe('three');
    expect(recv.length).toBe(3);
    for (let i = 0; i < 3; i++) {
      const r = recv.peek(i);
      expect(r).toBeGreaterThanOrEqual(0);
      expect(fds).not.toContain(r);
      expect(native.getFdFlags(r) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
      // Same open file: a value written through the original is read through the copy.
      native.eventfdWrite(fds[i]!, BigInt(i + 5));
      expect(native.eventfdRead(r)).toBe(BigInt(i + 5));
    }
    const taken = recv.take(1);
    expect(recv.remaining).toBe(2);
    expect(() => recv.take(1)).toThrow(MqtapError);
    const owned = [recv.peek(0), recv.peek(2)];
    recv.close();
    expect(recv.remaining).toBe(0);
    expect(recv.peek(0)).toBe(-1);
    for (const fd of owned) expect(() => native.getFdFlags(fd)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(native.getFdFlags(taken) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC); // taken: still open, ours to close
    native.close(taken);
  });

  it('keeps message boundaries: every send is one message, fds with the message they were sent with', async () => {
    const [a, b] = pair('seqpacket');
    const fds = eventfds(2);
    const got = nextMessages(b, 4);
    await Promise.all([a.send('m0'), a.send('m1', [fds[0]!]), a.send('m2'), a.send('m3', fds)]);
    const msgs = await got;
    expect(msgs.map((m) => m.data.toString())).toEqual(['m0', 'm1', 'm2', 'm3']);
    expect(msgs.map((m) => m.fds.length)).toEqual([0, 1, 0, 2]);
    msgs.forEach((m) => m.fds.close());
  });

  it('more fds than the receiver allows (MSG_CTRUNC) is an error; the fds that arrived are closed; the socket stays usable', async () => {
    const [a, b] = pair('seqpacket', { maxFds: 2 });
    const fds = eventfds(5);
    const before = fdCount();
    const bad = nextEvent<MqtapError>(b, 'badmessage');
    await a.send('too many', fds);
    const err = await bad;
    expect(err.code).toBe('EMSGSIZE');
    expect(err.op).toBe('RECVMSG');
    expect(err.detail).toMatch(/MSG_CTRUNC/);
    expect(fdCount()).toBe(before);
    const next = nextMessages(b, 1);
    await a.send('after', fds.slice(0, 2));
    const [m] = await next;
    expect(m!.data.toString()).toBe('after');
    expect(m!.fds.length).toBe(2);
    m!.fds.close();
    expect(fdCount()).toBe(before);
  });

  it('a receiver that takes no fds at all (maxFds 0) refuses any, closing them', async () => {
    const [a, b] = pair('seqpacket', { maxFds: 0 });
    const fds = eventfds(1);
    const before = fdCount();
    const bad = nextEvent<MqtapError>(b, 'badmessage');
    await a.send('x', fds);
    expect((await bad).detail).toMatch(/MSG_CTRUNC/);
    expect(fdCount()).toBe(before);
  });

  it('a message larger than the receive buffer (MSG_TRUNC) is an error, its fds closed, the next message intact', async () => {
    const [a, b] = pair('seqpacket', { maxMessageBytes: 16 });
    const fds = eventfds(2);
    const before = fdCount();
    const bad = nextEvent<MqtapError>(b, 'badmessage');
    await a.send(Buffer.alloc(100, 0x61), fds);
    const err = await bad;
    expect(err.code).toBe('EMSGSIZE');
    expect(err.detail).toMatch(/MSG_TRUNC/);
    expect(fdCount()).toBe(before);
    const next = nextMessages(b, 1);
    await a.send('0123456789abcdef');
    expect((await next)[0]!.data.toString()).toBe('0123456789abcdef');
  });

  it('without a badmessage listener a truncated message closes the socket with the error', async () => {
    const [a, b] = pair('seqpacket', { maxMessageBytes: 4 });
    const closed = nextEvent<Error | undefined>(b, 'close');
    await a.send('much too long');
    expect((await closed) as MqtapError).toMatchObject({ code: 'EMSGSIZE' });
    expect(b.closed).toBe(true);
    expect(b.fd).toBe(-1);
  });

  it('a message with no listener has its fds closed at once', async () => {
    const [a, b] = pair('seqpacket');
    const fds = eventfds(3);
    const before = fdCount();
    // b has no 'message' listener.  Fds in flight are not in /proc/self/fd
    // either, so prove the message was read: a second one, sent after it,
    // reaches a listener attached afterwards (messages are read in order).
    b.once('end', () => undefined);
    await a.send('nobody listens', fds);
    await new Promise((r) => setTimeout(r, 50));
    const second = nextEvent<Buffer>(b, 'message');
    await a.send('second');
    expect(String(await second)).toBe('second');
    expect(fdCount()).toBe(before);
  });

  it('refuses more than SCM_MAX_FD fds, and fds without data, before any syscall', async () => {
    const [a] = pair('seqpacket');
    const e1 = await a.send('x', Array.from({ length: SCM_MAX_FD + 1 }, () => 0)).catch((e: MqtapError) => e);
    expect((e1 as MqtapError).code).toBe(ErrorCodes.INVALID_ARG);
    const e2 = await a.send(Buffer.alloc(0), [0]).catch((e: MqtapError) => e);
    expect((e2 as MqtapError).code).toBe(ErrorCodes.INVALID_ARG);
  });

  it('253 fds (SCM_MAX_FD) in one message arrive', async () => {
    const [a, b] = pair('seqpacket', { maxFds: SCM_MAX_FD });
    const fds = eventfds(SCM_MAX_FD);
    const got = nextMessages(b, 1);
    await a.send('max', fds);
    const [m] = await got;
    expect(m!.fds.length).toBe(SCM_MAX_FD);
    m!.fds.close();
  });

  it('backpressure: 20,000 messages to a paused reader queue up (EAGAIN -> wait for POLLOUT) and all arrive in order', async () => {
    const [a, b] = pair('seqpacket');
    b.pause();
    const N = 20_000;
    const sent = Array.from({ length: N }, (_, i) => a.send(`msg ${i}`));
    await new Promise((r) => setTimeout(r, 20));
    expect(a.pendingSends).toBeGreaterThan(0); // the kernel buffer filled up
    const got: string[] = [];
    const all = new Promise<void>((resolve) =>
      b.on('message', (d: Buffer) => {
        got.push(d.toString());
        if (got.length === N) resolve();
      }),
    );
    b.resume();
    await Promise.all(sent);
    await all;
    expect(got.length).toBe(N);
    expect(got.every((m, i) => m === `msg ${i}`)).toBe(true);
  });

  it('the peer closing: pending sends reject, the reader sees end and close', async () => {
    const [a, b] = pair('seqpacket');
    const ended = nextEvent<void>(b, 'end');
    a.close();
    await ended;
    expect(b.closed).toBe(true);
    expect(((await b.send('x').catch((e: MqtapError) => e)) as MqtapError).code).toBe(ErrorCodes.CLOSED);
  });

  it('sending to a closed peer is EPIPE and closes the socket', async () => {
    const [a, b] = pair('seqpacket');
    b.pause();
    b.close();
    const e = (await a.send('x').catch((err: MqtapError) => err)) as MqtapError;
    expect(e.code).toBe('EPIPE');
    expect(e.op).toBe('SENDMSG');
    expect(a.closed).toBe(true);
  });
});

describe('the receive buffer shared by all sockets', () => {
  it('one view per length; what a 16 MiB socket grew it to is dropped when the socket closes', async () => {
    expect(_recvScratch.view(1000)).toBe(_recvScratch.view(1000)); // no allocation per read
    const MiB16 = 16 * 1024 * 1024;
    const [small, peer] = pair('seqpacket'); // the default 64 KiB
    const [a, b] = pair('seqpacket', { maxMessageBytes: MiB16 });
    const got = nextMessages(b, 1);
    await a.send('x');
    expect((await got)[0]!.data.toString()).toBe('x');
    expect(_recvScratch.bytes()).toBe(MiB16);
    a.close();
    expect(_recvScratch.bytes(), 'b still reads with 16 MiB').toBe(MiB16);
    b.close();
    expect(_recvScratch.bytes()).toBeLessThanOrEqual(64 * 1024);
    // the sockets left read as before
    const again = nextMessages(peer, 1);
    await small.send('y');
    expect((await again)[0]!.data.toString()).toBe('y');
    expect(_recvScratch.bytes()).toBe(64 * 1024);
  });
});

describe('SCM_RIGHTS over SOCK_STREAM', () => {
  it('a 4 MiB write is split by the kernel; the fd travels once, with the first bytes; the bytes arrive intact', async () => {
    const [a, b] = pair('stream');
    const fds = eventfds(1);
    const payload = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
    const chunks: Buffer[] = [];
    const fdArrivals: number[] = [];
    let bytes = 0;
    const done = new Promise<void>((resolve) =>
      b.on('message', (d: Buffer, r: ReceivedFds) => {
        if (r.length > 0) fdArrivals.push(bytes);
        r.close();
        chunks.push(d);
        bytes += d.length;
        if (bytes === payload.length) resolve();
      }),
    );
    await a.send(payload, fds);
    await done;
    expect(chunks.length).toBeGreaterThan(1);
    expect(fdArrivals).toEqual([0]);
    expect(Buffer.concat(chunks).equals(payload)).toBe(true);
  });
});

describe('bad socket options', () => {
  it('are refused before any fd exists, and an adopted fd is closed', async () => {
    const before = readdirSync('/proc/self/fd').length;
    expect(() => UnixSocket.pair('seqpacket', { maxFds: 100000 })).toThrow(/maxFds/);
    await expect(UnixSocket.connect('/nonexistent.sock', { type: 'seqpacket', maxMessageBytes: 0 })).rejects.toThrow(/maxMessageBytes/);
    await expect(UnixServer.listen(join(tempDir(), 's.sock'), { type: 'seqpacket', maxFds: -1 })).rejects.toThrow(/maxFds/);
    const [x, y] = native.unixSocketPair((K as unknown as { SOCK_SEQPACKET: number }).SOCK_SEQPACKET);
    native.close(y);
    expect(() => new UnixSocket(x, 'seqpacket', { maxFds: 1.5 })).toThrow(/maxFds/);
    expect(() => native.getFdFlags(x)).toThrow(/EBADF/);
    expect(readdirSync('/proc/self/fd').length).toBe(before);
  });
});

describe('UnixServer', () => {
  it('creates the socket file 0600 (0660 with a group), serves clients, reports SO_PEERCRED, removes the file on close', async () => {
    const dir = tempDir();
    const path = join(dir, 's.sock');
    const server = await UnixServer.listen(path, { type: 'seqpacket' });
    cleanups.push(() => server.close());
    expect(lstatSync(path).mode & 0o777).toBe(0o600);
    expect(lstatSync(path).isSocket()).toBe(true);
    const accepted = new Promise<UnixSocket>((resolve) => server.once('connection', resolve));
    const c = await UnixSocket.connect(path, { type: 'seqpacket' });
    cleanups.push(() => c.close());
    const s = await accepted;
    cleanups.push(() => s.close());
    expect(s.peerCred()).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    expect(native.getFdFlags(s.fd) & K.FD_CLOEXEC).toBe(K.FD_CLOEXEC);
    expect(native.getFlFlags(s.fd) & K.O_NONBLOCK).toBe(K.O_NONBLOCK);
    server.close();
    expect(() => lstatSync(path)).toThrow();

    const gpath = join(dir, 'g.sock');
    const g = await UnixServer.listen(gpath, { type: 'seqpacket', mode: 0o660, group: process.getgid!() });
    cleanups.push(() => g.close());
    expect(lstatSync(gpath).mode & 0o777).toBe(0o660);
  });

  it('refuses a path where a server answers (EADDRINUSE) or a non-socket lies; replaces a stale socket file', async () => {
    const dir = tempDir();
    const path = join(dir, 's.sock');
    const first = await UnixServer.listen(path, { type: 'seqpacket' });
    cleanups.push(() => first.close());
    expect(((await UnixServer.listen(path, { type: 'seqpacket' }).catch((e: MqtapError) => e)) as MqtapError).code).toBe('EADDRINUSE');

    // A stale file: bound by a socket that is closed without unlinking.
    const stalePath = join(dir, 'stale.sock');
    const fd = native.unixSocket((K as unknown as { SOCK_SEQPACKET: number }).SOCK_SEQPACKET);
    native.unixBind(fd, stalePath);
    native.close(fd);
    expect(lstatSync(stalePath).isSocket()).toBe(true);
    const replaced = await UnixServer.listen(stalePath, { type: 'seqpacket' });
    cleanups.push(() => replaced.close());
    const c = await UnixSocket.connect(stalePath, { type: 'seqpacket' });
    c.close();

    const filePath = join(dir, 'file');
    writeFileSync(filePath, 'not a socket');
    expect(((await UnixServer.listen(filePath, { type: 'seqpacket' }).catch((e: MqtapError) => e)) as MqtapError).code).toBe('EEXIST');
    expect(lstatSync(filePath).isFile()).toBe(true);
  });

  it('connect errors carry hints: ENOENT, ECONNREFUSED, EPROTOTYPE', async () => {
    const dir = tempDir();
    const e1 = (await UnixSocket.connect(join(dir, 'none.sock'), { type: 'seqpacket' }).catch((e: MqtapError) => e)) as MqtapError;
    expect(e1.code).toBe('ENOENT');
    expect(e1.op).toBe('CONNECT');
    expect(e1.hint).toMatch(/nothing listens/);
    const stream = await UnixServer.listen(join(dir, 'stream.sock'), { type: 'stream' });
    cleanups.push(() => stream.close());
    const e2 = (await UnixSocket.connect(join(dir, 'stream.sock'), { type: 'seqpacket' }).catch((e: MqtapError) => e)) as MqtapError;
    expect(e2.code).toBe('EPROTOTYPE');
    expect(e2.hint).toMatch(/another type/);
  });

  it('1,000 connections with fds both ways leave no fd behind', async () => {
    const dir = tempDir();
    const path = join(dir, 'leak.sock');
    const server = await UnixServer.listen(path, { type: 'seqpacket', maxFds: 4 });
    cleanups.push(() => server.close());
    const fds = eventfds(2);
    server.on('connection', (s: UnixSocket) => {
      s.on('message', (d: Buffer, r: ReceivedFds) => {
        const got = r.length;
        r.close();
        void s.send(`${d.toString()}:${got}`, fds).catch(() => undefined);
      });
    });
    const before = fdCount();
    for (let i = 0; i < 1000; i++) {
      const c = await UnixSocket.connect(path, { type: 'seqpacket', maxFds: 4 });
      const reply = nextMessages(c, 1);
      await c.send(`c${i}`, [fds[i % 2]!]);
      const [m] = await reply;
      expect(m!.data.toString()).toBe(`c${i}:1`);
      expect(m!.fds.length).toBe(2);
      m!.fds.close();
      c.close();
    }
    const deadline = Date.now() + 5000;
    while (fdCount() !== before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(fdCount()).toBe(before);
  });
});

describe('memory a socket holds (what a long-running daemon accumulates per connection)', () => {
  it('a closed socket is garbage after one collection: its poll callback does not keep it alive', async () => {
    // In a function of its own: a suspended async function keeps its locals.
    const session = async (i: number): Promise<Array<WeakRef<UnixSocket>>> => {
      const [a, b] = UnixSocket.pair('seqpacket');
      const got = nextMessages(b, 1);
      await a.send(`m${i}`);
      expect((await got)[0]!.data.toString()).toBe(`m${i}`);
      a.close();
      b.close();
      return [new WeakRef(a), new WeakRef(b)];
    };
    const refs: Array<WeakRef<UnixSocket>> = [];
    for (let i = 0; i < 20; i++) refs.push(...(await session(i)));
    await new Promise((r) => setImmediate(r));
    gc();
    // Before the fix the native poll handle held the JS callback (and with it
    // the socket and its receive buffer) until the finalizer of its wrapper
    // ran, so a socket outlived the collection that found it unreachable.
    expect(refs.filter((r) => r.deref() !== undefined).length).toBe(0);
  });

  it('open sockets share one receive buffer instead of holding 64 KiB each', async () => {
    gc();
    const before = process.memoryUsage().arrayBuffers;
    const socks: UnixSocket[] = [];
    for (let i = 0; i < 100; i++) socks.push(...pair('seqpacket'));
    // Every one of them reads once (the buffer is only needed to read).
    await Promise.all(socks.map((s, i) => {
      const got = nextMessages(s, 1);
      return socks[i ^ 1]!.send(`x${i}`).then(() => got);
    }));
    const grown = process.memoryUsage().arrayBuffers - before;
    // 200 sockets with a buffer each: 12.5 MiB.
    expect(grown).toBeLessThan(1024 * 1024);
  });

  it('each socket still reads at most its own maxMessageBytes, whatever the others use', async () => {
    const [a, b] = pair('seqpacket', { maxMessageBytes: 256 * 1024 });
    const [c, d] = pair('seqpacket', { maxMessageBytes: 8 });
    const big = nextMessages(b, 1);
    await a.send(Buffer.alloc(200 * 1024, 0x62));
    expect((await big)[0]!.data.length).toBe(200 * 1024);
    const bad = nextEvent<MqtapError>(d, 'badmessage');
    await c.send('123456789');
    expect((await bad).code).toBe('EMSGSIZE');
    const ok = nextMessages(d, 1);
    await c.send('12345678');
    expect((await ok)[0]!.data.toString()).toBe('12345678');
  });
});
