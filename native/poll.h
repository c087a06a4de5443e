// UvPoll: the one libuv uv_poll_t wrapper of the addon, shared by FdPoll
// (native/scm.cc, UNIX sockets) and QueueIo (native/io.cc, tap queues).
//
// A uv_poll_t watches an fd on the environment's event loop and calls a JS
// function (through MakeCallback, so async hooks and the microtask queue
// behave as for Node's own callbacks) with (status, events).  The handle
// memory belongs to libuv until its close callback runs, so Close() hands it
// over with uv_close and forgets it; the owner may be destroyed right after.
// Close() also drops the reference to the callback (OnPoll never runs again).
// Stopping removes the fd from epoll, so the owner may close the fd as soon
// as Stop() or Close() returned.  The fd itself is never closed here.
#pragma once

#include <napi.h>
#include <uv.h>

#include <memory>

#include "common.h"

namespace mqtap {

template <typename Owner>  // a Napi::ObjectWrap: the callback's `this`
class UvPoll {
 public:
  UvPoll() = default;
  UvPoll(const UvPoll&) = delete;
  UvPoll& operator=(const UvPoll&) = delete;
  ~UvPoll() { Close(); }

  // Creates the handle for fd; throws MqtapError (op POLL_INIT) on failure.
  void Init(Napi::Env env, Owner* owner, int fd, Napi::Function callback, const char* resource) {
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) ThrowArg(env, "no event loop");
    auto* h = new uv_poll_t;
    int r = uv_poll_init(loop, h, fd);
    if (r != 0) {
      delete h;
      ThrowSys(env, "POLL_INIT", "uv_poll_init", -r);
    }
    h->data = this;
    handle_ = h;
    owner_ = owner;
    callback_ = Napi::Persistent(callback);
    context_ = std::make_unique<Napi::AsyncContext>(env, resource);
  }

  bool open() const { return handle_ != nullptr; }

  // Watches `events` (UV_READABLE | UV_WRITABLE | UV_DISCONNECT; level
  // triggered).  Returns 0 or a libuv error (negative errno).
  int Start(int events) {
    if (handle_ == nullptr) return UV_EBADF;
    int r = uv_poll_start(handle_, events, OnPoll);
    if (r == 0) watching_ = true;
    return r;
  }

  void Stop() {
    watching_ = false;
    if (handle_ != nullptr) uv_poll_stop(handle_);
  }

  // Whether a started handle keeps the event loop alive (no syscall).
  void SetRef(bool on) {
    if (handle_ == nullptr) return;
    if (on)
      uv_ref(reinterpret_cast<uv_handle_t*>(handle_));
    else
      uv_unref(reinterpret_cast<uv_handle_t*>(handle_));
  }

  // Stops for good and releases the handle and the JS callback.  Harmless
  // when already closed.  The callback is released here, not when the owner
  // is finalized: it usually closes over the owner's JS object, which would
  // otherwise stay alive until the finalizer of the wrapper ran, one
  // garbage collection later than the wrapper itself.
  void Close() {
    if (handle_ == nullptr) return;
    Stop();
    handle_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(handle_), OnClosed);
    handle_ = nullptr;
    // Closed by the callback itself (a socket closing on EOF): the callback
    // and its async context are still in use, OnPoll releases them after it.
    if (!in_callback_) ReleaseCallback();
  }

 private:
  static void OnPoll(uv_poll_t* h, int status, int events) {
    auto* self = static_cast<UvPoll*>(h->data);
    if (self == nullptr || !self->watching_) return;
    Napi::Env env = self->owner_->Env();
    Napi::HandleScope scope(env);
    // The owner's JS object is on the stack (the receiver) for the whole
    // call, so neither the owner nor this object can be finalized during it.
    self->in_callback_ = true;
    try {
      self->callback_.MakeCallback(self->owner_->Value(), {Napi::Number::New(env, status), Napi::Number::New(env, events)}, *self->context_);
    } catch (const Napi::Error& e) {
      // No JavaScript frame to throw into: report it as uncaught, as Node
      // does for exceptions in its own callbacks.
      napi_fatal_exception(env, e.Value());
    }
    self->in_callback_ = false;
    if (self->handle_ == nullptr) self->ReleaseCallback();
  }

  void ReleaseCallback() {
    callback_.Reset();
    context_.reset();
  }

  static void OnClosed(uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); }

  uv_poll_t* handle_ = nullptr;
  Owner* owner_ = nullptr;
  bool watching_ = false;
  bool in_callback_ = false;
  Napi::FunctionReference callback_;
  std::unique_ptr<Napi::AsyncContext> context_;
};

}  // namespace mqtap
