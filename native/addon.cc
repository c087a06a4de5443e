// mqtap native addon: module registration.  See common.h for the rules.
#include "common.h"

namespace {

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
  return exports;
}

}  // namespace

NODE_API_MODULE(mqtap, Init)
