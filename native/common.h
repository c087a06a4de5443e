// Shared helpers for the mqtap addon.
//
// The addon is deliberately thin: each exported function performs one
// syscall (or one fixed netlink exchange) and either returns its result or
// throws.  Validation, ordering and rollback policy live in lib/ (TypeScript).
#pragma once

#include <napi.h>
#include <sys/types.h>

#include <cerrno>
#include <string>

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

// Zeroed anonymous memory (mmap, committed lazily, page-aligned, never
// moved) as an ArrayBuffer that unmaps it when collected.  Throws
// MqtapError(op, mmap) on failure.  Shared by allocPages (mem.cc) and the
// receive slab of QueueIo (io.cc).
Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op);
// The same over mmap(MAP_SHARED) of `fd` at `offset` (page-aligned): memory a
// test shares with the vhost-user data plane (native/vhost_user.cc).
Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op, int fd, off_t offset);

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
