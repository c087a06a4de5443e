// /dev/net/tun: one small function per ioctl, as in QEMU's net/tap-linux.c.
//
// Every function takes an fd the library owns and performs exactly one
// syscall.  No retries, no fallbacks, no ordering: the library decides.
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>

#include "common.h"

// UDP segmentation offload for taps arrived in Linux 6.2 (commit "tun: support
// USO"); <linux/if_tun.h> from older kernels (Debian 12 ships 6.1's) lacks the
// two bits.  UAPI values never change and the running kernel may well be newer
// than the headers, so the values are the kernel's own; whether the running
// kernel takes them is up to TUNSETOFFLOAD (EINVAL when it does not).  The
// kernel accepts them only together.
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#endif
#ifndef TUN_F_USO6
#define TUN_F_USO6 0x40
#endif

namespace mqtap {
namespace {

// open(2) /dev/net/tun.  O_CLOEXEC always: a queue fd reaches a child only
// when the library maps it explicitly (dup2 clears the flag on the copy).
Napi::Value TunOpen(const Napi::CallbackInfo& info) {
  std::string path = info.Length() > 0 && !info[0].IsUndefined() ? ArgString(info, 0) : "/dev/net/tun";
  int fd = OpenCloexec(path, O_RDWR);
  if (fd < 0) ThrowSys(info.Env(), "TUN_OPEN", "open", errno, path);
  return Napi::Number::New(info.Env(), fd);
}

// TUNSETIFF: create the device or attach this fd as one more queue of it.
// Returns the name the kernel chose (templates such as "mqt%d" expand here).
Napi::Value TunSetIff(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  std::string name = ArgIfName(info, 1);
  uint32_t flags = ArgUint(info, 2);
  struct ifreq ifr = IfReqFor(name);
  ifr.ifr_flags = static_cast<short>(flags);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) ThrowSys(info.Env(), "TUNSETIFF", "ioctl", errno, name);
  return Napi::String::New(info.Env(), ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));
}

// TUNGETIFF: which device this fd is a queue of, and the device's flags.
// Fails with EBADFD on a tun fd that is not attached to a device.
Napi::Value TunGetIff(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct ifreq ifr = IfReqFor();
  if (ioctl(fd, TUNGETIFF, &ifr) < 0) ThrowSys(info.Env(), "TUNGETIFF", "ioctl", errno);
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("name", Napi::String::New(info.Env(), ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ)));
  out.Set("flags", static_cast<uint32_t>(static_cast<unsigned short>(ifr.ifr_flags)));
  return out;
}

// TUNSETQUEUE: IFF_ATTACH_QUEUE / IFF_DETACH_QUEUE for this fd only.  A
// detached queue keeps its fd and the device; the kernel just stops steering
// packets to it (and moves its last queue into the freed slot).
Napi::Value TunSetQueue(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint32_t flags = ArgUint(info, 1);
  struct ifreq ifr = IfReqFor();
  ifr.ifr_flags = static_cast<short>(flags);
  if (ioctl(fd, TUNSETQUEUE, &ifr) < 0) ThrowSys(info.Env(), "TUNSETQUEUE", "ioctl", errno);
  return info.Env().Undefined();
}

// TUNGETFEATURES: the IFF_* flags this kernel's TUNSETIFF accepts.  Works on
// a fresh, unattached fd.
Napi::Value TunGetFeatures(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  unsigned int features = 0;
  if (ioctl(fd, TUNGETFEATURES, &features) < 0) ThrowSys(info.Env(), "TUNGETFEATURES", "ioctl", errno);
  return Napi::Number::New(info.Env(), features);
}

// TUNSETPERSIST: keep the device when its last queue fd closes (or not).
Napi::Value TunSetPersist(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  unsigned long on = ArgBool(info, 1) ? 1 : 0;
  if (ioctl(fd, TUNSETPERSIST, on) < 0) ThrowSys(info.Env(), "TUNSETPERSIST", "ioctl", errno);
  return info.Env().Undefined();
}

// TUNSETOWNER / TUNSETGROUP: who may attach queues without CAP_NET_ADMIN.
// The kernel takes the id by value; (uid_t)-1 clears it.
Napi::Value TunSetOwner(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  unsigned long uid = ArgUint(info, 1);
  if (ioctl(fd, TUNSETOWNER, uid) < 0) ThrowSys(info.Env(), "TUNSETOWNER", "ioctl", errno);
  return info.Env().Undefined();
}

Napi::Value TunSetGroup(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  unsigned long gid = ArgUint(info, 1);
  if (ioctl(fd, TUNSETGROUP, gid) < 0) ThrowSys(info.Env(), "TUNSETGROUP", "ioctl", errno);
  return info.Env().Undefined();
}

// TUNSETVNETHDRSZ / TUNGETVNETHDRSZ: 10 (legacy virtio_net_hdr) or 12
// (virtio_net_hdr_mrg_rxbuf, needed for VERSION_1 / MRG_RXBUF).  The size is
// per device, so every queue reports the same value.
Napi::Value TunSetVnetHdrSz(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int size = ArgInt(info, 1);
  if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0) ThrowSys(info.Env(), "TUNSETVNETHDRSZ", "ioctl", errno);
  return info.Env().Undefined();
}

Napi::Value TunGetVnetHdrSz(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int size = 0;
  if (ioctl(fd, TUNGETVNETHDRSZ, &size) < 0) ThrowSys(info.Env(), "TUNGETVNETHDRSZ", "ioctl", errno);
  return Napi::Number::New(info.Env(), size);
}

// TUNSETOFFLOAD: which TUN_F_* offloads the reader of this device accepts
// (checksum, TSO, USO).  Only meaningful with IFF_VNET_HDR.
Napi::Value TunSetOffload(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  unsigned long flags = ArgUint(info, 1);
  if (ioctl(fd, TUNSETOFFLOAD, flags) < 0) ThrowSys(info.Env(), "TUNSETOFFLOAD", "ioctl", errno);
  return info.Env().Undefined();
}

// TUNSETCARRIER: report link carrier up or down (needs CAP_NET_ADMIN).
Napi::Value TunSetCarrier(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int on = ArgBool(info, 1) ? 1 : 0;
  if (ioctl(fd, TUNSETCARRIER, &on) < 0) ThrowSys(info.Env(), "TUNSETCARRIER", "ioctl", errno);
  return info.Env().Undefined();
}

}  // namespace

void InitTun(Napi::Env env, Napi::Object exports) {
  exports.Set("tunOpen", Napi::Function::New(env, TunOpen, "tunOpen"));
  exports.Set("tunSetIff", Napi::Function::New(env, TunSetIff, "tunSetIff"));
  exports.Set("tunGetIff", Napi::Function::New(env, TunGetIff, "tunGetIff"));
  exports.Set("tunSetQueue", Napi::Function::New(env, TunSetQueue, "tunSetQueue"));
  exports.Set("tunGetFeatures", Napi::Function::New(env, TunGetFeatures, "tunGetFeatures"));
  exports.Set("tunSetPersist", Napi::Function::New(env, TunSetPersist, "tunSetPersist"));
  exports.Set("tunSetOwner", Napi::Function::New(env, TunSetOwner, "tunSetOwner"));
  exports.Set("tunSetGroup", Napi::Function::New(env, TunSetGroup, "tunSetGroup"));
  exports.Set("tunSetVnetHdrSz", Napi::Function::New(env, TunSetVnetHdrSz, "tunSetVnetHdrSz"));
  exports.Set("tunGetVnetHdrSz", Napi::Function::New(env, TunGetVnetHdrSz, "tunGetVnetHdrSz"));
  exports.Set("tunSetOffload", Napi::Function::New(env, TunSetOffload, "tunSetOffload"));
  exports.Set("tunSetCarrier", Napi::Function::New(env, TunSetCarrier, "tunSetCarrier"));

  // Kernel constants, straight from <linux/if_tun.h> at build time.
  Napi::Object c = Constants(exports);
  MQTAP_CONST(c, IFF_TUN);
  MQTAP_CONST(c, IFF_TAP);
  MQTAP_CONST(c, IFF_NAPI);
  MQTAP_CONST(c, IFF_NAPI_FRAGS);
  MQTAP_CONST(c, IFF_NO_CARRIER);
  MQTAP_CONST(c, IFF_NO_PI);
  MQTAP_CONST(c, IFF_ONE_QUEUE);
  MQTAP_CONST(c, IFF_VNET_HDR);
  MQTAP_CONST(c, IFF_TUN_EXCL);
  MQTAP_CONST(c, IFF_MULTI_QUEUE);
  MQTAP_CONST(c, IFF_ATTACH_QUEUE);
  MQTAP_CONST(c, IFF_DETACH_QUEUE);
  MQTAP_CONST(c, IFF_PERSIST);
  MQTAP_CONST(c, IFF_NOFILTER);
  MQTAP_CONST(c, TUN_F_CSUM);
  MQTAP_CONST(c, TUN_F_TSO4);
  MQTAP_CONST(c, TUN_F_TSO6);
  MQTAP_CONST(c, TUN_F_TSO_ECN);
  MQTAP_CONST(c, TUN_F_UFO);
  MQTAP_CONST(c, TUN_F_USO4);
  MQTAP_CONST(c, TUN_F_USO6);
  MQTAP_CONST(c, IFNAMSIZ);
}

}  // namespace mqtap
