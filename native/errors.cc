// Error construction across the JS boundary.
//
// Like better-sqlite3, the error class is defined in JavaScript
// (lib/sys/errors.ts) and handed to the addon once at load time; C++ only
// constructs it.  The class turns errno into `code`/message/hint, so the
// native side never flattens errno into a string.
#include <fcntl.h>
#include <net/if.h>

#include <cstring>

#include "common.h"

namespace mqtap {
namespace {

struct AddonData {
  Napi::FunctionReference error_class;
};

AddonData* Data(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsFunction()) ThrowArg(env, "setErrorClass(fn): a constructor is required");
  Data(env)->error_class = Napi::Persistent(info[0].As<Napi::Function>());
  return env.Undefined();
}

// errnoDescribe(n): [strerrorname_np(n), strerror(n)] or null.  glibc knows
// every Linux errno by its header name (libuv's table lacks some).
Napi::Value ErrnoDescribe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int n = ArgInt(info, 0);
  const char* name = strerrorname_np(n);
  if (name == nullptr) return env.Null();
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::String::New(env, name));
  out.Set(1u, Napi::String::New(env, strerrordesc_np(n)));
  return out;
}

}  // namespace

void ThrowSys(Napi::Env env, const char* op, const char* syscall, int err, const std::string& detail) {
  Napi::Object props = Napi::Object::New(env);
  props.Set("op", op);
  props.Set("syscall", syscall);
  props.Set("errno", Napi::Number::New(env, err));
  if (!detail.empty()) props.Set("detail", detail);
  AddonData* data = Data(env);
  if (data != nullptr && !data->error_class.IsEmpty()) {
    Napi::Value e = data->error_class.New({props});
    throw Napi::Error(env, e);
  }
  // Fallback before lib/ registered its class: a plain Error with the fields.
  Napi::Error e = Napi::Error::New(env, std::string(op) + " failed (" + syscall + " errno " + std::to_string(err) + ")");
  e.Set("op", op);
  e.Set("syscall", syscall);
  e.Set("errno", Napi::Number::New(env, err));
  throw e;
}

void ThrowArg(Napi::Env env, const std::string& message) { throw Napi::TypeError::New(env, message); }

int ArgFd(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsNumber()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": fd must be a number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= 0x7fffffff) || v != static_cast<int>(v)) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": fd out of range");
  return static_cast<int>(v);
}

int32_t ArgInt(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsNumber()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": number expected");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= -2147483648.0 && v <= 2147483647.0) || v != static_cast<int32_t>(v)) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": int32 expected");
  return static_cast<int32_t>(v);
}

uint32_t ArgUint(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsNumber()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": number expected");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= 4294967295.0) || v != static_cast<uint32_t>(v)) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": uint32 expected");
  return static_cast<uint32_t>(v);
}

bool ArgBool(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsBoolean()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": boolean expected");
  return info[i].As<Napi::Boolean>().Value();
}

std::string ArgString(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsString()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": string expected");
  return info[i].As<Napi::String>().Utf8Value();
}

std::string ArgIfName(const Napi::CallbackInfo& info, size_t i) {
  std::string name = ArgString(info, i);
  if (name.size() >= IFNAMSIZ || name.find('\0') != std::string::npos) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": interface name must be shorter than IFNAMSIZ");
  return name;
}

uint64_t ToU64(Napi::Env env, Napi::Value v, const std::string& what) {
  if (!v.IsBigInt()) ThrowArg(env, what + ": bigint expected");
  bool lossless = false;
  uint64_t r = v.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) ThrowArg(env, what + ": bigint out of uint64 range");
  return r;
}

uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i) {
  return ToU64(info.Env(), info.Length() > i ? info[i] : info.Env().Undefined(), "argument " + std::to_string(i));
}

void ArgBytes(const Napi::CallbackInfo& info, size_t i, uint8_t** data, size_t* len) {
  if (info.Length() <= i || !info[i].IsTypedArray()) ThrowArg(info.Env(), "argument " + std::to_string(i) + ": Buffer expected");
  Napi::TypedArray t = info[i].As<Napi::TypedArray>();
  *data = static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  *len = t.ByteLength();
}

int OpenCloexec(const std::string& path, int flags) {
  return NoEintr([&] { return open(path.c_str(), flags | O_CLOEXEC); });
}

struct ifreq IfReqFor(const std::string& name) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  memcpy(ifr.ifr_name, name.data(), std::min(name.size(), sizeof ifr.ifr_name - 1));
  return ifr;
}

Napi::Object Constants(Napi::Object exports) {
  if (!exports.Has("constants")) exports.Set("constants", Napi::Object::New(exports.Env()));
  return exports.Get("constants").As<Napi::Object>();
}

void InitErrors(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
  exports.Set("errnoDescribe", Napi::Function::New(env, ErrnoDescribe, "errnoDescribe"));
}

}  // namespace mqtap
