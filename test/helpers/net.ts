/**
 * UDP sockets for the traffic tests: bound to a link-local address the test
 * put on a tap inside its own network namespace, so that the kernel routes
 * what they send out through that tap (and what the tap receives to them).
 */
import dgram from 'node:dgram';

/** A udp4 socket bound to `address` (port: any free one, unless given); the caller closes it (a failed bind closes it here). */
export async function bindUdp(address: string, port = 0): Promise<dgram.Socket> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve, reject) => {
    const failed = (err: Error): void => {
      s.close();
      reject(err);
    };
    s.once('error', failed);
    s.bind(port, address, () => {
      s.off('error', failed);
      resolve();
    });
  });
  return s;
}

/** Sends `payload` from `s` to `address`:`port`; resolves once the kernel took it. */
export function sendUdp(s: dgram.Socket, payload: Buffer, port: number, address: string): Promise<void> {
  return new Promise((resolve, reject) => s.send(payload, port, address, (err) => (err ? reject(err) : resolve())));
}
