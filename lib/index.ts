/**
 * mqtap: Linux multi-queue tap (and vhost-net) backend for Node.js.
 *
 * @example
 *   import { openTap } from 'mqtap';
 *   using tap = openTap({ name: 'mqt%d', queues: 4 });
 *   tap.setActiveQueues(2);
 */
export { MqtapError, ErrorCodes, errnoName, type MqtapErrorInit } from './sys/errors';
export { openTap, deleteTap, offloadFlags, Tap, TapQueue, type OpenTapOptions, type Offloads, type QueueState, type QueueStates, type ExistingPolicy } from './tap/tap';
export { getLink, getTap, listLinks, listTaps, isTapLink, type LinkInfo, type TapLinkInfo, type TunInfo, type OperState, type LookupOptions, type LinkStats } from './tap/links';
export { probeTun, decodeTunFeatures, type TunFeatures, type TunProbe } from './tap/probe';
export { openNetdev, Netdev, QueuePair, type OpenNetdevOptions, type VhostMode, type PairState } from './vhost/netdev';
export {
  probeVhostNet,
  decodeFeatures,
  decodeBackendFeatures,
  driverFeatureMask,
  DRIVER_FEATURES,
  BACKEND_FEATURE_BITS,
  type RxPacket,
  featureMask,
  vnetHdrSizeFor,
  checkTapForVhost,
  VhostPairDriver,
  FEATURE_BITS,
  VHOST_NET_RX,
  VHOST_NET_TX,
  type VhostProbe,
  type DecodedFeatures,
  type PairDriverOptions,
} from './vhost/vhost';
export { SplitVirtqueue, vringLayout, MAX_QUEUE_SIZE, type VringLayout, type UsedElem, type SplitVirtqueueOptions } from './vhost/vring';
export { pinThread, threadAffinity } from './sys/affinity';
export { spawnWithFds, exitStatus, type SpawnWithFdsOptions, type SpawnedChild, type ChildExit } from './sys/spawn';
export {
  encodeVnetHdr,
  decodeVnetHdr,
  validateVnetHdr,
  vnetHdrForChecksum,
  vnetHdrForTcpGso,
  gsoTypeName,
  VnetHdrError,
  VNET_HDR_F,
  VNET_HDR_GSO,
  type VnetHdr,
} from './datapath/vnethdr';
export { toeplitzHash, rssInputIPv4, rssInputIPv6, rssQueue, defaultIndirectionTable, flowHash, flowHashQueue, MICROSOFT_RSS_KEY } from './datapath/steering';
export {
  onesComplementSum,
  ipv4Checksum,
  ethernetFrame,
  ipv4Header,
  udp4Frame,
  parseUdp4Frame,
  drainFrames,
  ETHERTYPE,
  IPPROTO,
  ETH_HLEN,
  ETH_ZLEN,
  IPV4_HLEN,
  UDP_HLEN,
  type MacAddress,
  type IpAddress,
  type EthernetFrameOptions,
  type Ipv4HeaderOptions,
  type Udp4FrameOptions,
  type Udp4Datagram,
} from './datapath/frames';
export {
  UnixSocket,
  UnixServer,
  ReceivedFds,
  SCM_MAX_FD,
  DEFAULT_MAX_FDS,
  type SocketType,
  type UnixSocketOptions,
  type ConnectOptions,
  type ListenOptions,
} from './sys/scm';
export { QmpClient, QmpError, QmpLineParser, withQmp, encodeCommand, type QmpGreeting, type QmpEvent, type QmpConnectOptions, type ExecuteOptions } from './qemu/qmp';
export {
  hotplugFds,
  hotplugNetdev,
  unplugNetdev,
  fdNamesFor,
  netdevAddArgs,
  deviceAddArgs,
  type HotplugFdsOptions,
  type HotplugNetdevOptions,
  type HotplugResult,
  type UnplugOptions,
} from './qemu/hotplug';
export * from './daemon';
export {
  qemuNetdevArgs,
  planLaunch,
  launchQemu,
  checkTapNetdevOptions,
  parseNetdevArg,
  validateQemuId,
  type LaunchOptions,
  type LaunchPlan,
  type LaunchedQemu,
  type QemuNetdevOptions,
} from './qemu/qemu';
export { openQueueIO, openTapIO, openFdIO, QueueIO, FrameBatch, totalStats, setSendBuffer, getSendBuffer, applyOffloads, defaultEngines, ioCapabilities, defaultSlotSize, defaultBatch, TUN_F, ERR_BATCH_RELEASED, type IoEngine, type TxEngine, type IoCapabilities, type EngineFallback, type QueueIOOptions, type QueueIOStats, type DirectionStats, type WriteResult, type WriteOptions, type OffloadRequest, type OffloadResult } from './datapath/io';
export { rssProgram, constantProgram, randomProgram, cpuProgram, queueCountProgram, QUEUE_COUNT_ENTRIES, QUEUE_COUNT_VALUE_SIZE, steeringQueue, rssInput, loadProgram, testRunProgram, attachSteering, detachSteering, Steering, encodeInsns, BPF, type BpfProgram, type BpfInsn, type RssConfig, type LoadedProgram, type VerifierError } from './datapath/bpf';
export {
  openQueueStats,
  QueueStats,
  openTcxQueueCounter,
  TcxQueueCounter,
  tcxIngressPrograms,
  tcxUnavailableReason,
  mapQdiscsToQueues,
  readQdiscs,
  formatTcHandle,
  possibleCpus,
  type QueueCount,
  type QueueCounters,
  type QueueStatsOptions,
  type QdiscQueueCounters,
  type TcxCounts,
} from './datapath/qstats';
export { serveVhostUser, VhostUserBackend, type ServeVhostUserOptions } from './vhost-user/backend';
export { VhostUserConnection, offeredFeatures, OFFERED_PROTOCOL_FEATURES, type VhostUserOffloads, type PairsState, type ConnectionOptions as VhostUserConnectionOptions } from './vhost-user/connection';
export type { DataPlane, DataPlaneFeatures, DataPlaneOptions, MemRegion, RingConfig, RingDir, RingStatus, PairCounters, TapEngine, TapEngineChoice } from './vhost-user/dataplane-api';
export {
  encodeMessage as encodeVhostUserMessage,
  decodeMessage as decodeVhostUserMessage,
  VhostUserProtocolError,
  Framer as VhostUserFramer,
  REQUEST as VHOST_USER_REQUEST,
  FEATURE as VHOST_USER_FEATURE,
  PROTOCOL_FEATURE as VHOST_USER_PROTOCOL_FEATURE,
  featureNames as vhostUserFeatureNames,
  type Message as VhostUserMessage,
  type Payload as VhostUserPayload,
  type ProtocolErrorReason as VhostUserProtocolErrorReason,
} from './vhost-user/protocol';
export { withNetns, isolateNetns, netnsPath, type IsolatedNetns } from './sys/netns';
export { silentLogger, stderrLogger, type Logger } from './sys/log';
export {
  MAX_QUEUES,
  MAX_IFNAME_BYTES,
  MIN_MTU,
  MAX_MTU,
  VNET_HDR_SIZES,
  validateIfName,
  parseMac,
  formatMac,
  type VnetHdrSize,
} from './sys/validate';
export { native as _native, K as constants, type NativeConstants, type RawQdisc } from './sys/native';
