/**
 * lib/daemon/ — at the top of lib/: the management daemon, its client and its wire protocol (docs/daemon.md).
 */
export { MqtapDaemon, type DaemonOptions } from './server';
export {
  DaemonClient,
  type DaemonClientOptions,
  type HelloResult,
  type NetdevSummary,
  type NetdevDetail,
  type AcquiredNetdev,
  type CreateOptions,
} from './client';
export {
  PROTOCOL_VERSION,
  MAX_REQUEST_BYTES,
  MAX_REPLY_BYTES,
  MAX_FDS_PER_MESSAGE,
  DEFAULT_SOCKET,
  DEFAULT_STATE_DIR,
  OPS,
  ProtocolCodes,
  ProtocolError,
  parseRequest,
  validateArgs,
  parseReply,
  type Op,
  type Request,
  type Reply,
  type WireError,
} from './protocol';
export { type Lease, type NetdevState } from './state';
