// Shared helpers for the mqtap addon.
//
// The addon is deliberately thin: each exported function performs one
// syscall (or one fixed netlink exchange) and either returns its result or
// throws.  Validation, ordering and rollback policy live in lib/ (TypeScript).
#pragma once

#include <napi.h>
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <string>

struct ifreq;

namespace mqtap {

// Throws the JS error class registered through setErrorClass() (lib/sys/errors.ts
// MqtapError) built from {op, syscall, errno, detail}.  `op` is the step the
// library was performing (e.g. "TUNSETQUEUE"), `syscall` the libc call that
// failed (e.g. "ioctl").  Never returns.
[[noreturn]] void ThrowSys(Napi::Env env, const char* op, const char* syscall,
                           int err, const std::string& detail = std::string());

// Throws a TypeError/RangeError for arguments that lib/ should have validated;
// reaching these means a bug in lib/ or a caller bypassing it.
[[noreturn]] void ThrowArg(Napi::Env env, const std::string& message);

// Argument accessors that throw ThrowArg on the wrong type or range.
int ArgFd(const Napi::CallbackInfo& info, size_t i);
int32_t ArgInt(const Napi::CallbackInfo& info, size_t i);
uint32_t ArgUint(const Napi::CallbackInfo& info, size_t i);
bool ArgBool(const Napi::CallbackInfo& info, size_t i);
std::string ArgString(const Napi::CallbackInfo& info, size_t i);
// An interface name that fits IFNAMSIZ (including the NUL).
std::string ArgIfName(const Napi::CallbackInfo& info, size_t i);

// A 64-bit unsigned value passed as a BigInt (feature masks, addresses,
// counters); anything else, or a BigInt outside 0..2^64-1, is a TypeError
// naming `what`.
uint64_t ToU64(Napi::Env env, Napi::Value v, const std::string& what);
uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i);
// The bytes of a Buffer / typed array argument (a view: no copy).
void ArgBytes(const Napi::CallbackInfo& info, size_t i, uint8_t** data, size_t* len);

// Calls f() again while it fails with EINTR (f returns < 0 and sets errno
// on failure, as a libc call does).  The result of the last call.
template <typename F>
auto NoEintr(F&& f) -> decltype(f()) {
  decltype(f()) r;
  do r = f();
  while (r < 0 && errno == EINTR);
  return r;
}

// open(path, flags | O_CLOEXEC), EINTR retried: every fd the addon opens is
// close-on-exec.  -1 with errno on failure.
int OpenCloexec(const std::string& path, int flags);

// A zeroed struct ifreq (<net/if.h>: include it where this is used; not
// here, since <linux/if.h> users cannot have both) carrying `name` (shorter than IFNAMSIZ: ArgIfName
// checked it; "" for the ioctls that fill the name in).
struct ifreq IfReqFor(const std::string& name = std::string());

// mmap(len) read/write as an ArrayBuffer that unmaps it when collected;
// the memory never moves.  fd -1: zeroed anonymous private memory
// (committed lazily, page-aligned): allocPages (mem.cc) and QueueIo's
// control block and receive slab (io.cc).  Otherwise MAP_SHARED of `fd` at
// `offset` (page-aligned): memory a test shares with the vhost-user data
// plane (mmapShared, native/vhost_user.cc).  `addressable`: entered in the
// registry addressOf() accepts (allocPages and mmapShared memory).  Throws
// MqtapError(op, mmap) on failure, leaving nothing mapped.
Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op, int fd, off_t offset, bool addressable);

// The `constants` object on the exports, created on first use.  Values come
// from the kernel headers the addon was built against, never typed by hand.
Napi::Object Constants(Napi::Object exports);
#define MQTAP_CONST(obj, name) (obj).Set(#name, Napi::Number::New((obj).Env(), static_cast<double>(name)))

// Registration hooks implemented by each source file.
void InitErrors(Napi::Env env, Napi::Object exports);
void InitTun(Napi::Env env, Napi::Object exports);
void InitLink(Napi::Env env, Napi::Object exports);
void InitRtnl(Napi::Env env, Napi::Object exports);
void InitSys(Napi::Env env, Napi::Object exports);
void InitVhost(Napi::Env env, Napi::Object exports);
void InitMem(Napi::Env env, Napi::Object exports);
void InitScm(Napi::Env env, Napi::Object exports);
void InitIo(Napi::Env env, Napi::Object exports);
void InitBpf(Napi::Env env, Napi::Object exports);
void InitVhostUser(Napi::Env env, Napi::Object exports);

}  // namespace mqtap
