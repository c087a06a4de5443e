/**
 * A scripted fake QEMU for QMP tests: a UNIX stream server in this process
 * speaking QMP (greeting, qmp_capabilities), logging every command with the
 * fds that arrived with its bytes (as /proc/self/fd link targets; the fds
 * themselves are closed at once) and answering through a handler.  No QEMU,
 * no root.
 */
import { mkdtempSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from '../../lib/sys/native.js';
import { UnixServer, type ReceivedFds, type UnixSocket } from '../../lib/sys/scm.js';

export interface Logged {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
  /** fd targets that arrived with the bytes of this command. */
  fds: string[];
}

export type Handler = (cmd: Logged, send: (msg: unknown) => void, sock: UnixSocket) => unknown;

export const GREETING = { QMP: { version: { qemu: { major: 7, minor: 2, micro: 99 }, package: 'fake' }, capabilities: ['oob'] } };

export interface Fake {
  path: string;
  log: Logged[];
  commands(): string[];
  close(): void;
}

/** Starts a fake QEMU; `cleanups` gets its close (run it after the test). */
export async function fakeQemu(handler: Handler, opts: { greeting?: unknown } = {}, cleanups?: Array<() => void>): Promise<Fake> {
  const dir = mkdtempSync(join(tmpdir(), 'mqtap-fakeqmp-'));
  const path = join(dir, 'qmp.sock');
  const server = await UnixServer.listen(path, { type: 'stream', maxFds: 16 });
  const log: Logged[] = [];
  const socks: UnixSocket[] = [];
  server.on('connection', (s: UnixSocket) => {
    socks.push(s);
    const send = (msg: unknown): void => {
      if (!s.closed) void s.send(`${JSON.stringify(msg)}\r\n`).catch(() => undefined);
    };
    if (opts.greeting !== null) send(opts.greeting ?? GREETING);
    let pending = '';
    s.on('message', (data: Buffer, fds: ReceivedFds) => {
      // The fds came with this read: they belong to the first command in it.
      let targets = fds.takeAll().map((fd) => {
        const t = readlinkSync(`/proc/self/fd/${fd}`);
        native.close(fd);
        return t;
      });
      pending += data.toString('utf8');
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl).trim();
        pending = pending.slice(nl + 1);
        if (!line) continue;
        const m = JSON.parse(line) as Logged;
        const entry: Logged = { ...m, fds: targets };
        targets = [];
        log.push(entry);
        const reply = entry.execute === 'qmp_capabilities' ? { return: {} } : handler(entry, send, s);
        if (reply !== undefined) send({ ...(reply as object), id: m.id });
      }
    });
  });
  const fake: Fake = {
    path,
    log,
    commands: () => log.map((l) => l.execute),
    close: () => {
      for (const s of socks) s.close();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  cleanups?.push(fake.close);
  return fake;
}
