// the userspace data path: batched, event-loop driven frame I/O per queue.
#include "common.h"

namespace mqtap {

void InitIo(Napi::Env /*env*/, Napi::Object /*exports*/) {}

}  // namespace mqtap
