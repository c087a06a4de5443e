// Link settings through the classic SIOCxIF* ioctls, as libvirt's
// virNetDevSetMTU/SetMAC/SetOnline do: no shelling out to `ip`.  Each call
// opens a short-lived AF_UNIX control socket (closed before returning) and
// performs one ioctl.
#include <net/if.h>
#include <net/if_arp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "common.h"

namespace mqtap {
namespace {

// Owns the control socket for the duration of one call.
class ControlSocket {
 public:
  explicit ControlSocket(Napi::Env env, const char* op) {
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) ThrowSys(env, op, "socket", errno);
  }
  ~ControlSocket() { close(fd_); }
  ControlSocket(const ControlSocket&) = delete;
  ControlSocket& operator=(const ControlSocket&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_;
};

void Ioctl(Napi::Env env, const char* op, unsigned long request, struct ifreq* ifr) {
  ControlSocket sock(env, op);
  if (ioctl(sock.fd(), request, ifr) < 0) ThrowSys(env, op, "ioctl", errno, ifr->ifr_name);
}

Napi::Value IfSetMtu(const Napi::CallbackInfo& info) {
  struct ifreq ifr = IfReqFor(ArgIfName(info, 0));
  ifr.ifr_mtu = ArgInt(info, 1);
  Ioctl(info.Env(), "SIOCSIFMTU", SIOCSIFMTU, &ifr);
  return info.Env().Undefined();
}

// SIOCSIFHWADDR with an Ethernet address (a 6-byte Buffer).
Napi::Value IfSetMac(const Napi::CallbackInfo& info) {
  struct ifreq ifr = IfReqFor(ArgIfName(info, 0));
  if (info.Length() < 2 || !info[1].IsBuffer() || info[1].As<Napi::Buffer<uint8_t>>().Length() != 6)
    ThrowArg(info.Env(), "argument 1: 6-byte Buffer expected");
  ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
  memcpy(ifr.ifr_hwaddr.sa_data, info[1].As<Napi::Buffer<uint8_t>>().Data(), 6);
  Ioctl(info.Env(), "SIOCSIFHWADDR", SIOCSIFHWADDR, &ifr);
  return info.Env().Undefined();
}

Napi::Value IfGetFlags(const Napi::CallbackInfo& info) {
  struct ifreq ifr = IfReqFor(ArgIfName(info, 0));
  Ioctl(info.Env(), "SIOCGIFFLAGS", SIOCGIFFLAGS, &ifr);
  return Napi::Number::New(info.Env(), static_cast<unsigned short>(ifr.ifr_flags));
}

Napi::Value IfSetFlags(const Napi::CallbackInfo& info) {
  struct ifreq ifr = IfReqFor(ArgIfName(info, 0));
  ifr.ifr_flags = static_cast<short>(ArgUint(info, 1));
  Ioctl(info.Env(), "SIOCSIFFLAGS", SIOCSIFFLAGS, &ifr);
  return info.Env().Undefined();
}

// if_nametoindex(3); 0 (not an error) when there is no such device.
Napi::Value IfNameToIndex(const Napi::CallbackInfo& info) {
  std::string name = ArgIfName(info, 0);
  return Napi::Number::New(info.Env(), if_nametoindex(name.c_str()));
}

}  // namespace

void InitLink(Napi::Env env, Napi::Object exports) {
  exports.Set("ifSetMtu", Napi::Function::New(env, IfSetMtu, "ifSetMtu"));
  exports.Set("ifSetMac", Napi::Function::New(env, IfSetMac, "ifSetMac"));
  exports.Set("ifGetFlags", Napi::Function::New(env, IfGetFlags, "ifGetFlags"));
  exports.Set("ifSetFlags", Napi::Function::New(env, IfSetFlags, "ifSetFlags"));
  exports.Set("ifNameToIndex", Napi::Function::New(env, IfNameToIndex, "ifNameToIndex"));
  Napi::Object c = Constants(exports);
  MQTAP_CONST(c, IFF_UP);
  MQTAP_CONST(c, IFF_RUNNING);
  MQTAP_CONST(c, ARPHRD_ETHER);
}

}  // namespace mqtap
