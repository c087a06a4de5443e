// /dev/vhost-net: one small function per ioctl, as in the kernel's
// tools/virtio/vhost_net_test.c and QEMU's hw/virtio/vhost-backend.c.
//
// 64-bit values (feature masks, addresses) cross the boundary as BigInt.
#include <fcntl.h>
// vhost.h pulls in virtio_ring.h, whose legacy vring_init() is C-only.
#define VIRTIO_RING_NO_LEGACY
#include <linux/vhost.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "common.h"
#include "kconst.h"

namespace mqtap {
namespace {

uint64_t PropU64(Napi::Env env, Napi::Object o, const char* key) { return ToU64(env, o.Get(key), key); }

// open(2) /dev/vhost-net.  Non-blocking like QEMU's, and close-on-exec.
Napi::Value VhostOpen(const Napi::CallbackInfo& info) {
  std::string path = info.Length() > 0 && !info[0].IsUndefined() ? ArgString(info, 0) : "/dev/vhost-net";
  int fd = OpenCloexec(path, O_RDWR | O_NONBLOCK);
  if (fd < 0) ThrowSys(info.Env(), "VHOST_OPEN", "open", errno, path);
  return Napi::Number::New(info.Env(), fd);
}

// VHOST_SET_OWNER: binds the device to this process's mm and starts its
// kernel worker.  A second call on the same fd fails with EBUSY.
Napi::Value VhostSetOwner(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  if (ioctl(fd, VHOST_SET_OWNER, nullptr) < 0) ThrowSys(info.Env(), "VHOST_SET_OWNER", "ioctl", errno);
  return info.Env().Undefined();
}

// VHOST_RESET_OWNER: drops the owner, rings and backends (device back to new).
Napi::Value VhostResetOwner(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  if (ioctl(fd, VHOST_RESET_OWNER, nullptr) < 0) ThrowSys(info.Env(), "VHOST_RESET_OWNER", "ioctl", errno);
  return info.Env().Undefined();
}

Napi::Value GetU64(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  int fd = ArgFd(info, 0);
  uint64_t v = 0;
  if (ioctl(fd, req, &v) < 0) ThrowSys(info.Env(), op, "ioctl", errno);
  return Napi::BigInt::New(info.Env(), v);
}

Napi::Value SetU64(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  int fd = ArgFd(info, 0);
  uint64_t v = ArgU64(info, 1);
  if (ioctl(fd, req, &v) < 0) ThrowSys(info.Env(), op, "ioctl", errno);
  return info.Env().Undefined();
}

// VHOST_GET_FEATURES / VHOST_SET_FEATURES: the virtio (and vhost) feature
// bits the device offers / the ones the driver accepted.  SET fails with
// EOPNOTSUPP for bits the device does not offer.
Napi::Value VhostGetFeatures(const Napi::CallbackInfo& info) { return GetU64(info, VHOST_GET_FEATURES, "VHOST_GET_FEATURES"); }
Napi::Value VhostSetFeatures(const Napi::CallbackInfo& info) { return SetU64(info, VHOST_SET_FEATURES, "VHOST_SET_FEATURES"); }
// VHOST_GET/SET_BACKEND_FEATURES: vhost's own protocol features (IOTLB
// message v2, batching), separate from virtio's.
Napi::Value VhostGetBackendFeatures(const Napi::CallbackInfo& info) { return GetU64(info, VHOST_GET_BACKEND_FEATURES, "VHOST_GET_BACKEND_FEATURES"); }
Napi::Value VhostSetBackendFeatures(const Napi::CallbackInfo& info) { return SetU64(info, VHOST_SET_BACKEND_FEATURES, "VHOST_SET_BACKEND_FEATURES"); }

// VHOST_SET_MEM_TABLE: regions [{ guestPhysAddr, memorySize, userspaceAddr }]
// telling the worker how "guest" addresses in the rings map to this
// process's memory.  A userspace driver maps guest address = process address.
Napi::Value VhostSetMemTable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  if (info.Length() < 2 || !info[1].IsArray()) ThrowArg(env, "argument 1: array of regions expected");
  Napi::Array regions = info[1].As<Napi::Array>();
  uint32_t n = regions.Length();
  std::vector<uint8_t> buf(sizeof(struct vhost_memory) + n * sizeof(struct vhost_memory_region));
  struct vhost_memory* mem = reinterpret_cast<struct vhost_memory*>(buf.data());
  mem->nregions = n;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value rv = regions.Get(i);
    if (!rv.IsObject()) ThrowArg(env, "region " + std::to_string(i) + ": object expected");
    Napi::Object r = rv.As<Napi::Object>();
    mem->regions[i].guest_phys_addr = PropU64(env, r, "guestPhysAddr");
    mem->regions[i].memory_size = PropU64(env, r, "memorySize");
    mem->regions[i].userspace_addr = PropU64(env, r, "userspaceAddr");
    mem->regions[i].flags_padding = 0;
  }
  if (ioctl(fd, VHOST_SET_MEM_TABLE, mem) < 0) ThrowSys(env, "VHOST_SET_MEM_TABLE", "ioctl", errno);
  return env.Undefined();
}

Napi::Value SetVringState(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  int fd = ArgFd(info, 0);
  struct vhost_vring_state s;
  s.index = ArgUint(info, 1);
  s.num = ArgUint(info, 2);
  if (ioctl(fd, req, &s) < 0) ThrowSys(info.Env(), op, "ioctl", errno);
  return info.Env().Undefined();
}

// VHOST_SET_VRING_NUM: ring size (power of two, <= 32768).
Napi::Value VhostSetVringNum(const Napi::CallbackInfo& info) { return SetVringState(info, VHOST_SET_VRING_NUM, "VHOST_SET_VRING_NUM"); }
// VHOST_SET_VRING_BASE: the avail index the worker starts from.
Napi::Value VhostSetVringBase(const Napi::CallbackInfo& info) { return SetVringState(info, VHOST_SET_VRING_BASE, "VHOST_SET_VRING_BASE"); }

// VHOST_GET_VRING_BASE: where the worker stopped (stops the ring).
Napi::Value VhostGetVringBase(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct vhost_vring_state s;
  s.index = ArgUint(info, 1);
  s.num = 0;
  if (ioctl(fd, VHOST_GET_VRING_BASE, &s) < 0) ThrowSys(info.Env(), "VHOST_GET_VRING_BASE", "ioctl", errno);
  return Napi::Number::New(info.Env(), s.num);
}

// VHOST_SET_VRING_ADDR: process addresses of the descriptor table, avail and
// used rings: { descUserAddr, availUserAddr, usedUserAddr, logGuestAddr?, flags? }.
Napi::Value VhostSetVringAddr(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  unsigned int index = ArgUint(info, 1);
  if (info.Length() < 3 || !info[2].IsObject()) ThrowArg(env, "argument 2: addresses object expected");
  Napi::Object a = info[2].As<Napi::Object>();
  struct vhost_vring_addr addr;
  memset(&addr, 0, sizeof addr);
  addr.index = index;
  addr.desc_user_addr = PropU64(env, a, "descUserAddr");
  addr.avail_user_addr = PropU64(env, a, "availUserAddr");
  addr.used_user_addr = PropU64(env, a, "usedUserAddr");
  if (a.Has("logGuestAddr")) addr.log_guest_addr = PropU64(env, a, "logGuestAddr");
  if (a.Has("flags")) addr.flags = a.Get("flags").As<Napi::Number>().Uint32Value();
  if (ioctl(fd, VHOST_SET_VRING_ADDR, &addr) < 0) ThrowSys(env, "VHOST_SET_VRING_ADDR", "ioctl", errno);
  return env.Undefined();
}

Napi::Value SetVringFile(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  int fd = ArgFd(info, 0);
  struct vhost_vring_file f;
  f.index = ArgUint(info, 1);
  f.fd = ArgInt(info, 2);  // -1 unbinds
  if (ioctl(fd, req, &f) < 0) ThrowSys(info.Env(), op, "ioctl", errno);
  return info.Env().Undefined();
}

// VHOST_SET_VRING_KICK / CALL / ERR: eventfds for "driver added buffers",
// "device used buffers" and "ring error".  -1 unbinds.
Napi::Value VhostSetVringKick(const Napi::CallbackInfo& info) { return SetVringFile(info, VHOST_SET_VRING_KICK, "VHOST_SET_VRING_KICK"); }
Napi::Value VhostSetVringCall(const Napi::CallbackInfo& info) { return SetVringFile(info, VHOST_SET_VRING_CALL, "VHOST_SET_VRING_CALL"); }
Napi::Value VhostSetVringErr(const Napi::CallbackInfo& info) { return SetVringFile(info, VHOST_SET_VRING_ERR, "VHOST_SET_VRING_ERR"); }
// VHOST_NET_SET_BACKEND: attach a tap queue fd to virtqueue `index` (0 = RX,
// 1 = TX of this pair); fd -1 detaches it.
Napi::Value VhostNetSetBackend(const Napi::CallbackInfo& info) { return SetVringFile(info, VHOST_NET_SET_BACKEND, "VHOST_NET_SET_BACKEND"); }

}  // namespace

void InitVhost(Napi::Env env, Napi::Object exports) {
  exports.Set("vhostOpen", Napi::Function::New(env, VhostOpen, "vhostOpen"));
  exports.Set("vhostSetOwner", Napi::Function::New(env, VhostSetOwner, "vhostSetOwner"));
  exports.Set("vhostResetOwner", Napi::Function::New(env, VhostResetOwner, "vhostResetOwner"));
  exports.Set("vhostGetFeatures", Napi::Function::New(env, VhostGetFeatures, "vhostGetFeatures"));
  exports.Set("vhostSetFeatures", Napi::Function::New(env, VhostSetFeatures, "vhostSetFeatures"));
  exports.Set("vhostGetBackendFeatures", Napi::Function::New(env, VhostGetBackendFeatures, "vhostGetBackendFeatures"));
  exports.Set("vhostSetBackendFeatures", Napi::Function::New(env, VhostSetBackendFeatures, "vhostSetBackendFeatures"));
  exports.Set("vhostSetMemTable", Napi::Function::New(env, VhostSetMemTable, "vhostSetMemTable"));
  exports.Set("vhostSetVringNum", Napi::Function::New(env, VhostSetVringNum, "vhostSetVringNum"));
  exports.Set("vhostSetVringBase", Napi::Function::New(env, VhostSetVringBase, "vhostSetVringBase"));
  exports.Set("vhostGetVringBase", Napi::Function::New(env, VhostGetVringBase, "vhostGetVringBase"));
  exports.Set("vhostSetVringAddr", Napi::Function::New(env, VhostSetVringAddr, "vhostSetVringAddr"));
  exports.Set("vhostSetVringKick", Napi::Function::New(env, VhostSetVringKick, "vhostSetVringKick"));
  exports.Set("vhostSetVringCall", Napi::Function::New(env, VhostSetVringCall, "vhostSetVringCall"));
  exports.Set("vhostSetVringErr", Napi::Function::New(env, VhostSetVringErr, "vhostSetVringErr"));
  exports.Set("vhostNetSetBackend", Napi::Function::New(env, VhostNetSetBackend, "vhostNetSetBackend"));
  Napi::Object c = Constants(exports);
  for (const struct mqtap_kconst* k = mqtap_virtio_consts; k->name != nullptr; k++) c.Set(k->name, Napi::Number::New(env, k->value));
}

}  // namespace mqtap
