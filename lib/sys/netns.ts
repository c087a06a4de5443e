/**
 * Network namespaces.  A daemon often creates a VM's taps inside the VM's (or
 * pod's) namespace; tests create their own throw-away namespace.
 *
 * Linux network namespaces are per thread.  mqtap's syscalls all run on the
 * JavaScript thread, so entering a namespace there (and leaving it before any
 * other JavaScript runs) makes every tap and socket the library creates land
 * in that namespace.  Queue fds keep working after the thread leaves.
 */
import { K, native } from './native';
import { MqtapError, invalidArg } from './errors';

/** '/run/netns/NAME' for a bare name (as `ip netns` names them), or the path as given. */
export function netnsPath(nameOrPath: string): string {
  if (nameOrPath.includes('/')) return nameOrPath;
  // `ip netns` names are file names under /run/netns (CNI uses 40-byte ones).
  if (nameOrPath === '' || nameOrPath === '.' || nameOrPath === '..' || nameOrPath.includes('\0') || Buffer.byteLength(nameOrPath) > 255)
    throw invalidArg(`netns ${JSON.stringify(nameOrPath)} is not a namespace name (a file name under /run/netns) or a path`);
  return `/run/netns/${nameOrPath}`;
}

function currentNsFd(): number {
  return native.openNs(`/proc/self/task/${native.gettid()}/ns/net`);
}

/**
 * Runs `fn` (synchronously) with the JavaScript thread inside network
 * namespace `ns` (a name under /run/netns or a path), then returns to the
 * original namespace.  With `ns` undefined it just runs `fn`.
 */
export function withNetns<T>(ns: string | undefined, fn: () => T): T {
  if (ns === undefined) return fn();
  const target = native.openNs(netnsPath(ns));
  let self = -1;
  try {
    self = currentNsFd();
    native.setns(target, K.CLONE_NEWNET);
    try {
      return fn();
    } finally {
      try {
        native.setns(self, K.CLONE_NEWNET);
      } catch (err) {
        // Still inside `ns`: everything this thread does next would happen
        // there.  Never carry on silently.
        process.stderr.write(`mqtap: cannot return from network namespace ${ns} (${(err as Error).message}); aborting\n`);
        process.abort();
      }
    }
  } finally {
    native.close(target);
    if (self >= 0) native.close(self);
  }
}

/** A throw-away network namespace entered by the JavaScript thread. */
export interface IsolatedNetns {
  /** A path other processes can use (`nsenter --net=PATH`) while this handle is open. */
  readonly path: string;
  /** Returns the thread to its original namespace.  The new one disappears with its last user. */
  restore(): void;
}

/**
 * Moves the JavaScript thread into a new, empty network namespace
 * (unshare(CLONE_NEWNET)); child processes spawned afterwards start in it too.
 * Nothing is mounted, so nothing can be left behind: the namespace (and any
 * tap in it) is gone once `restore()` ran and its last fd closed.
 */
export function isolateNetns(): IsolatedNetns {
  const self = currentNsFd();
  try {
    native.unshare(K.CLONE_NEWNET);
  } catch (err) {
    native.close(self);
    throw err;
  }
  const tid = native.gettid();
  let restored = false;
  return {
    path: `/proc/${process.pid}/task/${tid}/ns/net`,
    restore(): void {
      if (restored) return;
      try {
        native.setns(self, K.CLONE_NEWNET);
      } catch (err) {
        throw new MqtapError({ op: 'SETNS', code: (err as MqtapError).code, message: `cannot return to the original network namespace: ${(err as Error).message}` });
      } finally {
        restored = true;
        native.close(self);
      }
    },
  };
}
