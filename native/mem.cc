// Memory the kernel reads and writes behind JavaScript's back (vrings and
// their buffers), and eventfds.
//
// allocPages() returns an ArrayBuffer over an anonymous mmap: page-aligned,
// at a stable address for its whole life, and unmapped by the ArrayBuffer's
// finalizer, so the memory is owned by (and freed with) a JS object.  The
// ring logic itself (descriptors, avail/used indices) lives in TypeScript.
//
// addressOf() hands a process address to the kernel (vhost memory table,
// vring addresses), which keeps using it behind JavaScript's back.  Only
// memory that cannot move or be freed while its ArrayBuffer lives qualifies,
// so addressOf() accepts allocPages() memory only (and mmapShared()'s, made
// by the same MappedArrayBuffer): the live ranges are kept in a registry
// (entered on mapping, removed by the finalizer before munmap), and anything
// else (a Buffer from Node's pool, a plain ArrayBuffer the GC may move or
// free, QueueIo's slab) is a TypeError.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>

#include "common.h"

namespace mqtap {
namespace {

struct Mapping {
  void* addr;
  size_t len;
  bool registered;
};

// Live allocPages ranges: start address -> length.  Process-wide (worker
// threads load the addon too; finalizers run on their threads).
std::mutex g_pages_mu;
std::map<uintptr_t, size_t> g_pages;

void Unmap(Napi::Env, void*, Mapping* m) {
  if (m->registered) {
    std::lock_guard<std::mutex> lock(g_pages_mu);
    g_pages.erase(reinterpret_cast<uintptr_t>(m->addr));
  }
  munmap(m->addr, m->len);
  delete m;
}

// Whether [p, p+len) lies inside one live allocPages range.
bool InAllocatedPages(uintptr_t p, size_t len) {
  std::lock_guard<std::mutex> lock(g_pages_mu);
  auto it = g_pages.upper_bound(p);
  if (it == g_pages.begin()) return false;
  --it;
  return p >= it->first && p - it->first <= it->second && len <= it->second - (p - it->first);
}

}  // namespace

// One mmap as an ArrayBuffer (see common.h): anonymous private memory for
// fd -1, else a MAP_SHARED mapping of fd at offset; registered for
// addressOf() when `addressable`.
Napi::ArrayBuffer MappedArrayBuffer(Napi::Env env, size_t len, const char* op, int fd, off_t offset, bool addressable) {
  int flags = fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED;
  void* addr = mmap(nullptr, len, PROT_READ | PROT_WRITE, flags, fd < 0 ? -1 : fd, fd < 0 ? 0 : offset);
  if (addr == MAP_FAILED) ThrowSys(env, op, "mmap", errno);
  auto* m = new Mapping{addr, len, addressable};
  try {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, addr, len, Unmap, m);
    if (addressable) {
      std::lock_guard<std::mutex> lock(g_pages_mu);
      g_pages[reinterpret_cast<uintptr_t>(addr)] = len;
    }
    return ab;
  } catch (...) {  // the finalizer was never attached: unmap here
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
  return MappedArrayBuffer(env, len, "ALLOC_PAGES", -1, 0, true);
}

// addressOf(arrayBuffer | typed array): the process address of its first
// byte, as a BigInt (what vhost's memory table and vring addresses want).
// Only for memory from allocPages (the ArrayBuffer itself or a view into
// it): anything else is a TypeError (see the top of this file).
Napi::Value AddressOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1) ThrowArg(env, "addressOf: buffer expected");
  uintptr_t p;
  size_t len;
  if (info[0].IsArrayBuffer()) {
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    p = reinterpret_cast<uintptr_t>(ab.Data());
    len = ab.ByteLength();
  } else if (info[0].IsTypedArray() || info[0].IsDataView()) {
    // The raw calls give the view's first byte directly, whatever backs it
    // (a SharedArrayBuffer too, which the C++ wrappers refuse).
    void* data = nullptr;
    napi_status st;
    if (info[0].IsTypedArray()) {
      napi_typedarray_type type;
      size_t n;
      st = napi_get_typedarray_info(env, info[0], &type, &n, &data, nullptr, nullptr);
      if (st == napi_ok) len = info[0].As<Napi::TypedArray>().ByteLength();
    } else {
      st = napi_get_dataview_info(env, info[0], &len, &data, nullptr, nullptr);
    }
    if (st != napi_ok) ThrowArg(env, "addressOf: unreadable view");
    p = reinterpret_cast<uintptr_t>(data);
  } else {
    ThrowArg(env, "addressOf: ArrayBuffer or typed array expected");
  }
  if (p == 0 || !InAllocatedPages(p, len))
    ThrowArg(env, "addressOf: only memory from allocPages() has a stable address the kernel may keep (this buffer is not, or no longer, allocPages memory)");
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
  n = NoEintr([&] { return read(fd, &v, sizeof v); });
  if (n < 0 && errno == EAGAIN) return info.Env().Null();
  if (n != sizeof v) ThrowSys(info.Env(), "EVENTFD_READ", "read", n < 0 ? errno : EIO);
  return Napi::BigInt::New(info.Env(), v);
}

// Adds to the counter (a kick).
Napi::Value EventfdWrite(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint64_t v = info.Length() > 1 ? ArgU64(info, 1) : 1;
  ssize_t n;
  n = NoEintr([&] { return write(fd, &v, sizeof v); });
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
