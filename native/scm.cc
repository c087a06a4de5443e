// SCM_RIGHTS fd passing over UNIX sockets (management daemon, QMP getfd).
#include "common.h"

namespace mqtap {

void InitScm(Napi::Env /*env*/, Napi::Object /*exports*/) {}

}  // namespace mqtap
