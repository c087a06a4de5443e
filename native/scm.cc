// UNIX sockets with SCM_RIGHTS fd passing (management daemon, QMP getfd).
//
// Node has no API for ancillary data, so these are the thin syscalls the
// library needs: socket/socketpair/bind/listen/accept4/connect (always
// SOCK_CLOEXEC|SOCK_NONBLOCK), sendmsg/recvmsg with fds, SO_PEERCRED, and
// FdPoll, a libuv uv_poll_t on a socket fd so the library learns when it is
// readable/writable without busy polling.  All sockets are non-blocking: a
// call that would block returns a "try again" value (-1, false or null)
// instead of throwing, and lib/sys/scm.ts waits for the next FdPoll callback.
//
// Ownership rules kept here:
// - every fd created here is O_CLOEXEC (received fds too: MSG_CMSG_CLOEXEC);
// - recvmsg never leaks: when the kernel reports truncated control data
//   (MSG_CTRUNC) or a truncated message (MSG_TRUNC), every fd that did arrive
//   is closed before the error is thrown, so no caller can forget them;
// - FdPoll never closes the fd it watches; the owner stops it first (which
//   removes the fd from epoll) and closes the fd afterwards.
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "poll.h"

namespace mqtap {
namespace {

// The kernel's SCM_MAX_FD (include/net/scm.h, not exported to uapi): more fds
// than this in one sendmsg fail with EINVAL.
constexpr int kScmMaxFd = 253;

int SockType(const Napi::CallbackInfo& info, size_t i) {
  int type = ArgInt(info, i);
  if (type != SOCK_STREAM && type != SOCK_SEQPACKET && type != SOCK_DGRAM)
    ThrowArg(info.Env(), "argument " + std::to_string(i) + ": SOCK_STREAM, SOCK_SEQPACKET or SOCK_DGRAM expected");
  return type;
}

// Fills a sockaddr_un for a filesystem path; ENAMETOOLONG when it does not fit
// sun_path (108 bytes with the NUL).  Abstract names are not supported on
// purpose: they are per network namespace and have no file mode.
socklen_t FillAddr(Napi::Env env, const char* op, const std::string& path, struct sockaddr_un* addr) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.empty() || path[0] == '\0' || path.find('\0') != std::string::npos) ThrowArg(env, "socket path must be a non-empty file path");
  if (path.size() >= sizeof addr->sun_path) ThrowSys(env, op, "bind", ENAMETOOLONG, path);
  memcpy(addr->sun_path, path.data(), path.size());
  return static_cast<socklen_t>(offsetof(struct sockaddr_un, sun_path) + path.size() + 1);
}

// socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0).
Napi::Value UnixSocket(const Napi::CallbackInfo& info) {
  int type = SockType(info, 0);
  int fd = socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) ThrowSys(info.Env(), "SOCKET", "socket", errno);
  return Napi::Number::New(info.Env(), fd);
}

// socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0): [a, b].
Napi::Value UnixSocketPair(const Napi::CallbackInfo& info) {
  int type = SockType(info, 0);
  int sv[2];
  if (socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0) ThrowSys(info.Env(), "SOCKETPAIR", "socketpair", errno);
  Napi::Array out = Napi::Array::New(info.Env(), 2);
  out.Set(0u, Napi::Number::New(info.Env(), sv[0]));
  out.Set(1u, Napi::Number::New(info.Env(), sv[1]));
  return out;
}

// bind(fd, path).  The socket file is created with mode 0777 & ~umask: the
// library sets a restrictive umask around this call.
Napi::Value UnixBind(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  std::string path = ArgString(info, 1);
  struct sockaddr_un addr;
  socklen_t len = FillAddr(info.Env(), "BIND", path, &addr);
  if (bind(fd, reinterpret_cast<struct sockaddr*>(&addr), len) < 0) ThrowSys(info.Env(), "BIND", "bind", errno, path);
  return info.Env().Undefined();
}

// listen(fd, backlog).
Napi::Value UnixListen(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int backlog = ArgInt(info, 1);
  if (listen(fd, backlog) < 0) ThrowSys(info.Env(), "LISTEN", "listen", errno);
  return info.Env().Undefined();
}

// accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK): the new fd, or -1
// when no connection is pending (EAGAIN).  EINTR is retried.
Napi::Value UnixAccept(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int c;
  c = NoEintr([&] { return accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK); });
  if (c < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(info.Env(), -1);
    ThrowSys(info.Env(), "ACCEPT", "accept4", errno);
  }
  return Napi::Number::New(info.Env(), c);
}

// connect(fd, path): true when connected, false when the listener's backlog
// is full (EAGAIN on a non-blocking AF_UNIX socket; try again later).
Napi::Value UnixConnect(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  std::string path = ArgString(info, 1);
  struct sockaddr_un addr;
  socklen_t len = FillAddr(info.Env(), "CONNECT", path, &addr);
  int r;
  r = NoEintr([&] { return connect(fd, reinterpret_cast<struct sockaddr*>(&addr), len); });
  if (r < 0) {
    if (errno == EAGAIN) return Napi::Boolean::New(info.Env(), false);
    ThrowSys(info.Env(), "CONNECT", "connect", errno, path);
  }
  return Napi::Boolean::New(info.Env(), true);
}

// scmSend(fd, buffer, fds[, offset, length]): one sendmsg(MSG_NOSIGNAL |
// MSG_DONTWAIT) of buffer[offset, offset+length) with `fds` attached as one
// SCM_RIGHTS message (the kernel duplicates them; the caller keeps its own).
// Returns the bytes sent (a stream socket may take fewer), or -1 when the
// socket buffer is full (EAGAIN): nothing was sent, fds included.
Napi::Value ScmSend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  if (info.Length() < 2 || !info[1].IsBuffer()) ThrowArg(env, "argument 1: Buffer expected");
  Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
  std::vector<int> fds;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsArray()) ThrowArg(env, "argument 2: array of fds expected");
    Napi::Array arr = info[2].As<Napi::Array>();
    if (arr.Length() > static_cast<uint32_t>(kScmMaxFd)) ThrowArg(env, "at most " + std::to_string(kScmMaxFd) + " fds per message (SCM_MAX_FD)");
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Value v = arr.Get(i);
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 0x7fffffff) || d != static_cast<int>(d)) ThrowArg(env, "fds: every entry must be an fd number");
      fds.push_back(static_cast<int>(d));
    }
  }
  size_t offset = info.Length() > 3 && !info[3].IsUndefined() ? ArgUint(info, 3) : 0;
  size_t length = info.Length() > 4 && !info[4].IsUndefined() ? ArgUint(info, 4) : buf.Length() - std::min(offset, buf.Length());
  if (offset > buf.Length() || length > buf.Length() - offset) ThrowArg(env, "offset/length outside the buffer");
  if (length == 0 && !fds.empty()) ThrowArg(env, "fds need at least one byte of data to travel with");

  struct iovec iov;
  iov.iov_base = buf.Data() + offset;
  iov.iov_len = length;
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    struct cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n;
  n = NoEintr([&] { return sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); });
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    ThrowSys(env, "SENDMSG", "sendmsg", errno, fds.empty() ? std::string() : std::to_string(fds.size()) + " fd(s)");
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

// scmRecv(fd, buffer, maxFds): one recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
// into `buffer` with room for `maxFds` fds.  Returns null when nothing is
// queued (EAGAIN), else { bytes, fds } (bytes 0 with no fds: the peer closed).
// Truncated control data (MSG_CTRUNC: more fds than maxFds, or a limit hit in
// the kernel) or a truncated message (MSG_TRUNC: the datagram/seqpacket was
// larger than the buffer; its rest is lost) throw EMSGSIZE after closing every
// fd that did arrive.
Napi::Value ScmRecv(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  if (info.Length() < 2 || !info[1].IsBuffer()) ThrowArg(env, "argument 1: Buffer expected");
  Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
  uint32_t maxFds = ArgUint(info, 2);
  if (maxFds > static_cast<uint32_t>(kScmMaxFd)) ThrowArg(env, "maxFds: at most " + std::to_string(kScmMaxFd));
  if (buf.Length() == 0) ThrowArg(env, "the receive buffer must not be empty");

  struct iovec iov;
  iov.iov_base = buf.Data();
  iov.iov_len = buf.Length();
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // Always some control space: with none the kernel would still drop fds and
  // set MSG_CTRUNC, but a small buffer lets us count and report what came.
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (maxFds > 0 ? maxFds : 1)), 0);
  msg.msg_control = control.data();
  msg.msg_controllen = maxFds > 0 ? control.size() : 0;
  ssize_t n;
  n = NoEintr([&] { return recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
    ThrowSys(env, "RECVMSG", "recvmsg", errno);
  }
  std::vector<int> fds;
  if (msg.msg_controllen > 0) {
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* data = CMSG_DATA(c);
      for (size_t i = 0; i < count; i++) {
        int r;
        memcpy(&r, data + i * sizeof(int), sizeof(int));
        fds.push_back(r);
      }
    }
  }
  if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
    for (int r : fds) close(r);
    std::string what = (msg.msg_flags & MSG_CTRUNC) ? "control data truncated (MSG_CTRUNC): more fds than the " + std::to_string(maxFds) + " allowed per message"
                                                    : "message truncated (MSG_TRUNC): larger than " + std::to_string(buf.Length()) + " bytes";
    if ((msg.msg_flags & MSG_CTRUNC) && (msg.msg_flags & MSG_TRUNC)) what += ", and the message was larger than the buffer";
    what += "; " + std::to_string(fds.size()) + " fd(s) that arrived were closed";
    ThrowSys(env, "RECVMSG", "recvmsg", EMSGSIZE, what);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(n)));
  Napi::Array arr = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  out.Set("fds", arr);
  return out;
}

// getsockopt(SO_PEERCRED): { pid, uid, gid } of the peer at connect() time.
Napi::Value PeerCred(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) ThrowSys(info.Env(), "SO_PEERCRED", "getsockopt", errno);
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("pid", Napi::Number::New(info.Env(), cred.pid));
  out.Set("uid", Napi::Number::New(info.Env(), cred.uid));
  out.Set("gid", Napi::Number::New(info.Env(), cred.gid));
  return out;
}

// getsockopt(SO_ERROR): the pending socket error (0 when none).
Napi::Value SockError(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) ThrowSys(info.Env(), "SO_ERROR", "getsockopt", errno);
  return Napi::Number::New(info.Env(), err);
}

// FdPoll: new FdPoll(fd, callback(status, events)).  A uv_poll_t on the
// loop of this environment.  start(events) watches UV_READABLE/UV_WRITABLE
// (level-triggered: the callback comes again while the condition holds);
// stop() stops watching (and removes the fd from epoll, so the fd may be
// closed right after); close() releases the handle for good.  While started
// the object keeps itself alive and keeps the event loop running (unless
// unref()).  The fd is never closed here.
class FdPoll : public Napi::ObjectWrap<FdPoll> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdPoll",
                       {InstanceMethod<&FdPoll::Start>("start"), InstanceMethod<&FdPoll::Stop>("stop"),
                        InstanceMethod<&FdPoll::Close>("close"), InstanceMethod<&FdPoll::Ref>("ref"),
                        InstanceMethod<&FdPoll::Unref>("unref")});
  }

  explicit FdPoll(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdPoll>(info) {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    if (info.Length() < 2 || !info[1].IsFunction()) ThrowArg(env, "FdPoll(fd, callback): a callback is required");
    poll_.Init(env, this, fd, info[1].As<Napi::Function>(), "mqtap.FdPoll");
  }

 private:
  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int events = ArgInt(info, 0) & (UV_READABLE | UV_WRITABLE | UV_DISCONNECT);
    int r = poll_.Start(events);
    if (r != 0) ThrowSys(env, "POLL_START", "uv_poll_start", -r);
    if (!active_) {
      active_ = true;
      ObjectWrap::Ref();
    }
    return env.Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    poll_.Stop();
    if (active_) {
      active_ = false;
      ObjectWrap::Unref();
    }
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Stop(info);
    poll_.Close();
    return info.Env().Undefined();
  }

  Napi::Value Ref(const Napi::CallbackInfo& info) {
    poll_.SetRef(true);
    return info.Env().Undefined();
  }

  Napi::Value Unref(const Napi::CallbackInfo& info) {
    poll_.SetRef(false);
    return info.Env().Undefined();
  }

  bool active_ = false;
  UvPoll<FdPoll> poll_;
};

}  // namespace

void InitScm(Napi::Env env, Napi::Object exports) {
  exports.Set("unixSocket", Napi::Function::New(env, UnixSocket, "unixSocket"));
  exports.Set("unixSocketPair", Napi::Function::New(env, UnixSocketPair, "unixSocketPair"));
  exports.Set("unixBind", Napi::Function::New(env, UnixBind, "unixBind"));
  exports.Set("unixListen", Napi::Function::New(env, UnixListen, "unixListen"));
  exports.Set("unixAccept", Napi::Function::New(env, UnixAccept, "unixAccept"));
  exports.Set("unixConnect", Napi::Function::New(env, UnixConnect, "unixConnect"));
  exports.Set("scmSend", Napi::Function::New(env, ScmSend, "scmSend"));
  exports.Set("scmRecv", Napi::Function::New(env, ScmRecv, "scmRecv"));
  exports.Set("peerCred", Napi::Function::New(env, PeerCred, "peerCred"));
  exports.Set("sockError", Napi::Function::New(env, SockError, "sockError"));
  exports.Set("FdPoll", FdPoll::Define(env));
  Napi::Object c = Constants(exports);
  MQTAP_CONST(c, SOCK_STREAM);
  MQTAP_CONST(c, SOCK_SEQPACKET);
  MQTAP_CONST(c, SOCK_DGRAM);
  MQTAP_CONST(c, UV_READABLE);
  MQTAP_CONST(c, UV_WRITABLE);
  MQTAP_CONST(c, UV_DISCONNECT);
  c.Set("SCM_MAX_FD", Napi::Number::New(env, kScmMaxFd));
}

}  // namespace mqtap
