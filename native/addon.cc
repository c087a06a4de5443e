// mqtap native addon: module registration.  See common.h for the rules.
#include "common.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif

namespace {

#if defined(__SANITIZE_ADDRESS__)
// Sanitizer build only (CMakeLists.txt): a leak check now, without exiting.
// Test workers are ended by the runner rather than exiting on their own, so
// the exit-time check would never run in them (test/asan/setup.ts calls this
// after each test file).  Returns 1 when leaks were found (reported to the log).
Napi::Value LsanCheck(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), __lsan_do_recoverable_leak_check());
}
#endif

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  mqtap::InitErrors(env, exports);
  mqtap::InitTun(env, exports);
  mqtap::InitLink(env, exports);
  mqtap::InitRtnl(env, exports);
  mqtap::InitSys(env, exports);
  mqtap::InitVhost(env, exports);
  mqtap::InitMem(env, exports);
  mqtap::InitScm(env, exports);
  mqtap::InitIo(env, exports);
  mqtap::InitBpf(env, exports);
  mqtap::InitVhostUser(env, exports);
#if defined(__SANITIZE_ADDRESS__)
  exports.Set("lsanCheck", Napi::Function::New(env, LsanCheck, "lsanCheck"));
#endif
  return exports;
}

}  // namespace

NODE_API_MODULE(mqtap, Init)
