// Process-level syscalls the library needs around queue fds: close, file
// status flags, and network namespaces (a daemon creates taps inside a VM's
// or pod's namespace; tests create their own throw-away namespace).
//
// Network namespaces are per thread.  All of the addon's calls run on the
// JS thread, so after setns()/unshare() on it every socket and tap created by
// this addon lands in that namespace; libuv's worker threads are unaffected.
#include <fcntl.h>
#include <linux/close_range.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "common.h"

namespace mqtap {
namespace {

// close(2).  Linux releases the descriptor even when close reports EINTR, so
// EINTR is success here; EBADF means the library lost track of an fd.
Napi::Value Close(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  if (close(fd) < 0 && errno != EINTR) ThrowSys(info.Env(), "CLOSE", "close", errno);
  return info.Env().Undefined();
}

// O_NONBLOCK on or off (F_GETFL + F_SETFL).
Napi::Value SetNonBlocking(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  bool on = ArgBool(info, 1);
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) ThrowSys(info.Env(), "SET_NONBLOCK", "fcntl", errno);
  int want = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (want != flags && fcntl(fd, F_SETFL, want) < 0) ThrowSys(info.Env(), "SET_NONBLOCK", "fcntl", errno);
  return info.Env().Undefined();
}

// F_GETFD: the descriptor flags (FD_CLOEXEC).
Napi::Value GetFdFlags(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0) ThrowSys(info.Env(), "F_GETFD", "fcntl", errno);
  return Napi::Number::New(info.Env(), flags);
}

// F_GETFL: the file status flags (O_NONBLOCK, access mode).
Napi::Value GetFlFlags(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) ThrowSys(info.Env(), "F_GETFL", "fcntl", errno);
  return Napi::Number::New(info.Env(), flags);
}

// FD_CLOEXEC on or off (F_GETFD + F_SETFD).
Napi::Value SetCloexec(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  bool on = ArgBool(info, 1);
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0) ThrowSys(info.Env(), "SET_CLOEXEC", "fcntl", errno);
  int want = on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC);
  if (want != flags && fcntl(fd, F_SETFD, want) < 0) ThrowSys(info.Env(), "SET_CLOEXEC", "fcntl", errno);
  return info.Env().Undefined();
}

// close_range(first, ~0U, CLOSE_RANGE_CLOEXEC) (Linux 5.11+): marks every fd
// from `first` up close-on-exec, so a spawned child inherits only what is
// mapped into it explicitly, even fds this process itself inherited.
Napi::Value CloexecFrom(const Napi::CallbackInfo& info) {
  unsigned int first = ArgUint(info, 0);
  if (syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC) < 0) ThrowSys(info.Env(), "CLOSE_RANGE", "close_range", errno);
  return info.Env().Undefined();
}

// open(path, O_RDONLY|O_CLOEXEC): a namespace file such as /run/netns/NAME
// or /proc/self/task/TID/ns/net.
Napi::Value OpenNs(const Napi::CallbackInfo& info) {
  std::string path = ArgString(info, 0);
  int fd = OpenCloexec(path, O_RDONLY);
  if (fd < 0) ThrowSys(info.Env(), "NS_OPEN", "open", errno, path);
  return Napi::Number::New(info.Env(), fd);
}

// setns(fd, nstype) for the calling (JS) thread.
Napi::Value SetNs(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int type = ArgInt(info, 1);
  if (setns(fd, type) < 0) ThrowSys(info.Env(), "SETNS", "setns", errno);
  return info.Env().Undefined();
}

// unshare(flags) for the calling (JS) thread, e.g. CLONE_NEWNET: a fresh,
// anonymous network namespace that disappears with its last reference.
Napi::Value Unshare(const Napi::CallbackInfo& info) {
  int flags = ArgInt(info, 0);
  if (unshare(flags) < 0) ThrowSys(info.Env(), "UNSHARE", "unshare", errno);
  return info.Env().Undefined();
}

// flock(fd, operation): an advisory whole-file lock (LOCK_SH/LOCK_EX,
// LOCK_NB, LOCK_UN) tied to the open file description, released when its
// last fd closes or the process dies.  With LOCK_NB a lock held elsewhere
// is EWOULDBLOCK (EAGAIN); what that means is lib/'s business.
Napi::Value Flock(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int op = ArgInt(info, 1);
  int r;
  r = NoEintr([&] { return flock(fd, op); });
  if (r < 0) ThrowSys(info.Env(), "FLOCK", "flock", errno);
  return info.Env().Undefined();
}

// sched_setaffinity(0, cpus): the CPUs the *calling thread* (0 = this
// thread, not the process) may run on, from an array of CPU indices.  Which
// CPUs, and whether to pin at all, is lib/'s choice (lib/sys/affinity.ts).
Napi::Value SchedSetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) ThrowArg(env, "schedSetAffinity: an array of CPU indices expected");
  Napi::Array list = info[0].As<Napi::Array>();
  uint32_t max = 0;
  std::vector<uint32_t> cpus;
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsNumber()) ThrowArg(env, "schedSetAffinity: CPU indices must be numbers");
    double d = v.As<Napi::Number>().DoubleValue();
    // Integers only: Int64Value() would turn 1.5 into 1 and NaN into 0.
    if (!(d >= 0 && d < (1 << 20)) || d != static_cast<double>(static_cast<int64_t>(d))) ThrowArg(env, "schedSetAffinity: a CPU index is an integer from 0 to 2^20-1");
    int64_t c = static_cast<int64_t>(d);
    cpus.push_back(static_cast<uint32_t>(c));
    if (c > max) max = static_cast<uint32_t>(c);
  }
  size_t size = CPU_ALLOC_SIZE(max + 1);
  cpu_set_t* set = CPU_ALLOC(max + 1);
  if (set == nullptr) ThrowSys(env, "SCHED_SETAFFINITY", "sched_setaffinity", ENOMEM);
  CPU_ZERO_S(size, set);
  for (uint32_t c : cpus) CPU_SET_S(c, size, set);
  int rc = sched_setaffinity(0, size, set);
  int err = errno;
  CPU_FREE(set);
  if (rc < 0) ThrowSys(env, "SCHED_SETAFFINITY", "sched_setaffinity", err);
  return env.Undefined();
}

// sched_getaffinity(0): the CPUs the calling thread may run on, as indices.
// The mask grows until the kernel's cpumask fits (EINVAL below nr_cpu_ids).
Napi::Value SchedGetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  for (int n = 1024;; n *= 2) {
    size_t size = CPU_ALLOC_SIZE(n);
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) ThrowSys(env, "SCHED_GETAFFINITY", "sched_getaffinity", ENOMEM);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) < 0) {
      int err = errno;
      CPU_FREE(set);
      if (err == EINVAL && n < (1 << 20)) continue;
      ThrowSys(env, "SCHED_GETAFFINITY", "sched_getaffinity", err);
    }
    Napi::Array out = Napi::Array::New(env);
    for (int c = 0; c < n; c++)
      if (CPU_ISSET_S(c, size, set)) out.Set(out.Length(), Napi::Number::New(env, c));
    CPU_FREE(set);
    return out;
  }
}

// gettid(2): the JS thread's id, to name its own namespace file.
Napi::Value GetTid(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), gettid()); }

}  // namespace

void InitSys(Napi::Env env, Napi::Object exports) {
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("setNonBlocking", Napi::Function::New(env, SetNonBlocking, "setNonBlocking"));
  exports.Set("getFdFlags", Napi::Function::New(env, GetFdFlags, "getFdFlags"));
  exports.Set("getFlFlags", Napi::Function::New(env, GetFlFlags, "getFlFlags"));
  exports.Set("setCloexec", Napi::Function::New(env, SetCloexec, "setCloexec"));
  exports.Set("cloexecFrom", Napi::Function::New(env, CloexecFrom, "cloexecFrom"));
  exports.Set("openNs", Napi::Function::New(env, OpenNs, "openNs"));
  exports.Set("setns", Napi::Function::New(env, SetNs, "setns"));
  exports.Set("unshare", Napi::Function::New(env, Unshare, "unshare"));
  exports.Set("gettid", Napi::Function::New(env, GetTid, "gettid"));
  exports.Set("schedSetAffinity", Napi::Function::New(env, SchedSetAffinity, "schedSetAffinity"));
  exports.Set("schedGetAffinity", Napi::Function::New(env, SchedGetAffinity, "schedGetAffinity"));
  exports.Set("flock", Napi::Function::New(env, Flock, "flock"));
  Napi::Object c = Constants(exports);
  MQTAP_CONST(c, CLONE_NEWNET);
  MQTAP_CONST(c, FD_CLOEXEC);
  MQTAP_CONST(c, O_NONBLOCK);
  MQTAP_CONST(c, LOCK_SH);
  MQTAP_CONST(c, LOCK_EX);
  MQTAP_CONST(c, LOCK_NB);
  MQTAP_CONST(c, LOCK_UN);
}

}  // namespace mqtap
