/** Small async helpers shared by the integration and guest tests. */
import { readdirSync, readlinkSync } from 'node:fs';
import { expect } from 'vitest';
import { MqtapError } from '../../lib/sys/errors';

/** Polls `cond` every 25 ms until it holds; throws after `timeoutMs` naming `what`. */
export async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The MqtapError `p` rejects with (fails the test if it resolves or rejects with anything else). */
export async function rejection(p: Promise<unknown>): Promise<MqtapError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(MqtapError);
    return err as MqtapError;
  }
  throw new Error('expected a rejection');
}

/** How many of process `pid`'s fds are /dev/net/tun (tap queues). */
export function tunFds(pid: number): number {
  let n = 0;
  for (const f of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${f}`) === '/dev/net/tun') n++;
    } catch {
      /* closed meanwhile */
    }
  }
  return n;
}
