// Memory the kernel reads and writes behind JavaScript's back (vrings and
// their buffers), and eventfds.
//
// allocPages() returns an ArrayBuffer over an anonymous mmap: page-aligned,
// at a stable address for its whole life, and unmapped by the ArrayBuffer's
// finalizer, so the memory is owned by (and freed with) a JS object.  The
// ring logic itself (descriptors, avail/used indices) lives in TypeScript.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

namespace mqtap {
namespace {

struct Mapping {
  void* addr;
  size_t len;
};

void Unmap(Napi::Env, void*, Mapping* m) {
  munmap(m->addr, m->len);
  delete m;
}

}  // namespace

Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op) {
  void* addr = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (addr == MAP_FAILED) ThrowSys(env, op, "mmap", errno);
  auto* m = new Mapping{addr, len};
  try {
    return Napi::ArrayBuffer::New(env, addr, len, Unmap, m);
  } catch (...) {  // the finalizer was never attached: unmap here
    munmap(addr, len);
    delete m;
    throw;
  }
}

Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op, int fd, off_t offset) {
  void* addr = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  if (addr == MAP_FAILED) ThrowSys(env, op, "mmap", errno);
  auto* m = new Mapping{addr, len};
  try {
    return Napi::ArrayBuffer::New(env, addr, len, Unmap, m);
  } catch (...) {
    munmap(addr, len);
    delete m;
    throw;
  }
}

namespace {

// allocPages(bytes): zeroed, page-aligned memory as an ArrayBuffer.
Napi::Value AllocPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t bytes = ArgUint(info, 0);
  if (bytes == 0) ThrowArg(env, "allocPages: size must be > 0");
  long page = sysconf(_SC_PAGESIZE);
  size_t len = (static_cast<size_t>(bytes) + page - 1) / page * page;
  return MappedArrayBuffer(env, len, "ALLOC_PAGES");
}

// addressOf(arrayBuffer | typed array): the process address of its first
// byte, as a BigInt (what vhost's memory table and vring addresses want).
Napi::Value AddressOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1) ThrowArg(env, "addressOf: buffer expected");
  uintptr_t p;
  if (info[0].IsArrayBuffer()) {
    p = reinterpret_cast<uintptr_t>(info[0].As<Napi::ArrayBuffer>().Data());
  } else if (info[0].IsTypedArray()) {
    Napi::TypedArray t = info[0].As<Napi::TypedArray>();
    p = reinterpret_cast<uintptr_t>(t.ArrayBuffer().Data()) + t.ByteOffset();
  } else {
    ThrowArg(env, "addressOf: ArrayBuffer or typed array expected");
  }
  return Napi::BigInt::New(env, static_cast<uint64_t>(p));
}

// eventfd(initval, EFD_CLOEXEC|EFD_NONBLOCK).
Napi::Value EventfdOpen(const Napi::CallbackInfo& info) {
  uint32_t init = info.Length() > 0 ? ArgUint(info, 0) : 0;
  int fd = eventfd(init, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) ThrowSys(info.Env(), "EVENTFD", "eventfd", errno);
  return Napi::Number::New(info.Env(), fd);
}

// Reads and resets the counter: a BigInt, or null when it is zero (EAGAIN).
Napi::Value EventfdRead(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint64_t v = 0;
  ssize_t n;
  do n = read(fd, &v, sizeof v);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return info.Env().Null();
  if (n != sizeof v) ThrowSys(info.Env(), "EVENTFD_READ", "read", n < 0 ? errno : EIO);
  return Napi::BigInt::New(info.Env(), v);
}

// Adds to the counter (a kick).
Napi::Value EventfdWrite(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint64_t v = 1;
  if (info.Length() > 1) {
    bool lossless = false;
    if (!info[1].IsBigInt()) ThrowArg(info.Env(), "argument 1: bigint expected");
    v = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  }
  ssize_t n;
  do n = write(fd, &v, sizeof v);
  while (n < 0 && errno == EINTR);
  if (n != sizeof v) ThrowSys(info.Env(), "EVENTFD_WRITE", "write", n < 0 ? errno : EIO);
  return info.Env().Undefined();
}

}  // namespace

void InitMem(Napi::Env env, Napi::Object exports) {
  exports.Set("allocPages", Napi::Function::New(env, AllocPages, "allocPages"));
  exports.Set("addressOf", Napi::Function::New(env, AddressOf, "addressOf"));
  exports.Set("eventfdOpen", Napi::Function::New(env, EventfdOpen, "eventfdOpen"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventfdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventfdWrite, "eventfdWrite"));
  Napi::Object c = Constants(exports);
  c.Set("PAGE_SIZE", Napi::Number::New(env, static_cast<double>(sysconf(_SC_PAGESIZE))));
}

}  // namespace mqtap
